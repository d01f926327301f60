"""Signals sent to a run at a moment the test has seen, not after a duration: the process is
stopped (SIGSTOP) while the test looks at what it wrote, so what the test saw is still true when
the signal arrives, however fast the run is."""

import contextlib
import signal
import time

import pytest


def freeze(process) -> bool:
  """Stops `process` and returns once it is stopped: True, or False if it ended first."""
  if process.poll() is not None:
    return False
  process.send_signal(signal.SIGSTOP)
  while process.poll() is None:
    try:
      with open(f'/proc/{process.pid}/stat') as f:
        state = f.read().rsplit(')', 1)[1].split()[0]
    except FileNotFoundError:  # it ended: poll() sees it
      continue
    if state in ('T', 't'):
      return True
    time.sleep(0.001)
  return False


def thaw(process) -> None:
  """Lets a frozen process go on; a signal sent while it was frozen is delivered now."""
  if process.poll() is None:
    process.send_signal(signal.SIGCONT)


def signal_frozen(process, number) -> None:
  """Sends `number` to a frozen process, then lets it go on to receive it."""
  process.send_signal(number)
  thaw(process)


def freeze_when(predicate, process, timeout=300) -> bool:
  """Waits for `predicate()` and freezes `process`, with the predicate checked again while it is
  frozen: True once it holds there; False if the process ended, or the timeout passed, first."""
  deadline = time.time() + timeout
  while time.time() < deadline and process.poll() is None:
    if predicate():
      if not freeze(process):
        return False
      if predicate():
        return True
      thaw(process)
    time.sleep(0.01)
  return False


class Stopped(Exception):
  """What `stopping_after` raises: a run stopped in this process right after a save."""


@contextlib.contextmanager
def stopping_after(monkeypatch, batches_done: int):
  """Within the block, a run raises Stopped right after it saved the partial sums of its first
  `batches_done` batches (results.Store.save_partial), as a kill there would leave it; the block
  expects that. Saving works as before once the block ends."""
  from lc_jax import results  # pylint: disable=g-import-not-at-top
  save = results.Store.save_partial

  def save_then_stop(store, done, sums):
    save(store, done, sums)
    if done == batches_done:
      raise Stopped
  monkeypatch.setattr(results.Store, 'save_partial', save_then_stop)
  try:
    with pytest.raises(Stopped):
      yield
  finally:
    monkeypatch.setattr(results.Store, 'save_partial', save)
