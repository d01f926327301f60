"""Progress of a run (its images, compile and resets phases) and of a sweep, on stderr.

    with progress.Phase('resets', total, 'image-resets', enabled, status=busy_text) as phase:
      phase.advance(done_now)
    progress.say('prefix reuse: ...', enabled)

On a terminal (stderr is a TTY) a phase is one live tqdm bar with its rate, time left and a
status (the device's busy share); it stays on screen as a finished line. Elsewhere (a pod's
log, CI, a pipe) a phase writes a line at most every $LC_JAX_PROGRESS_EVERY seconds (default
10) and one when it ends. Off a terminal, lines go through absl logging once an entry point has
set it up (app.run: each line carries its time), else plainly to stderr (a library call).

The rate and the time left are measured from a phase's first step on: the first step's own
time holds one-off costs (a program compiled at first use, a thread pool starting), so a
phase's estimate comes from the steady work after it.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import threading
import time
from typing import Callable

from absl import logging
import tqdm

from lc_jax.errors import UserError

EVERY = 'LC_JAX_PROGRESS_EVERY'  # seconds between progress lines off a terminal
DEFAULT_EVERY = 10.0


def every() -> float:
  """Seconds between a phase's progress lines off a terminal: $LC_JAX_PROGRESS_EVERY, else 10."""
  value = os.environ.get(EVERY, '').strip()
  try:
    seconds = float(value) if value else DEFAULT_EVERY
  except ValueError:
    seconds = -1.0
  if not seconds >= 0:
    raise UserError(f'${EVERY} is {value!r}; give the seconds between progress lines off a '
                    'terminal, e.g. 10')
  return seconds


def terminal() -> bool:
  """Whether stderr is a terminal, where phases are live bars."""
  isatty = getattr(sys.stderr, 'isatty', None)
  return bool(isatty and isatty())


def _columns() -> int:
  try:
    return os.get_terminal_size(sys.stderr.fileno()).columns
  except (OSError, ValueError, AttributeError):
    return 0


def say(text: str, enabled: bool = True) -> None:
  """One line of what a run found or did: above the live bars on a terminal, else logged."""
  if not enabled:
    return
  if terminal():
    tqdm.tqdm.write(text, file=sys.stderr)
  else:
    _log(text)


def _log(text: str) -> None:
  # absl's handler is on the root logger once app.run set logging up; before that (a library
  # call, a notebook) an INFO record would be dropped, so the line goes to stderr as it is. The
  # entry points turn library INFO logs off (errors.exits_cleanly): progress has a logger of
  # its own, at INFO, whose records reach absl's handler all the same.
  if logging.get_absl_handler() in std_logging.getLogger().handlers:
    if _LOGGER.level == std_logging.NOTSET:
      _LOGGER.setLevel(std_logging.INFO)
    _LOGGER.info('%s', text)
  else:
    print(text, file=sys.stderr, flush=True)


_LOGGER = std_logging.getLogger('lc_jax.progress')


def duration(seconds: float) -> str:
  """`seconds` as 1h02m or 3m04s, for progress lines."""
  minutes, seconds = divmod(int(seconds + 0.5), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}h{minutes:02d}m' if hours else f'{minutes}m{seconds:02d}s'


class Phase:
  """One phase of work, `total` steps of `unit` (images, programs, image-resets): `advance(n)`
  as steps finish, `close()` (or a `with` block) when it ends. `status`, when given, is asked
  for a short text at each line (the device's busy share). Nothing is shown unless `enabled`.

  Where steps of a unit cost unequal time, `work` is the phase's cost in units of its own
  (`advance(n, work=w)` as it is done), and the time left is the cost left at the measured
  cost per second: a reset of an early layer runs more of the network than one of a late one."""

  def __init__(self, name: str, total: float, unit: str, enabled: bool = True,
               status: Callable[[], str] | None = None, work: float | None = None):
    self.name, self.total, self.unit, self.enabled = name, total, unit, enabled
    self.status = status
    self.work = total if work is None else work
    self.done = self.worked = 0.0
    self.start = self.shown = time.perf_counter()
    # (time, done, worked) at the end of the first step
    self._first: tuple[float, float, float] | None = None
    self._every = every() if enabled else 0.0
    self._lock = threading.Lock()  # compile workers advance a phase from their threads
    self._closed = False
    self._bar = None
    if enabled and terminal():
      sized = _columns() > 0  # a terminal without a size (a bare pty) gets a fixed width
      self._bar = tqdm.tqdm(
          total=round(total), desc=name, unit=unit, file=sys.stderr, leave=True,
          dynamic_ncols=sized, ncols=None if sized else 100, mininterval=0.2,
          bar_format='{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit}{postfix}')

  def __enter__(self) -> 'Phase':
    return self

  def __exit__(self, kind, value, traceback) -> None:
    if kind is None:
      self.close()
    elif self._bar is not None:  # stopped: the bar ends where it got to, on a line of its own
      self._bar.close()
      self._bar = None

  def advance(self, count: float = 1, work: float | None = None) -> None:
    """`count` more steps done, of cost `work` (default: `count`)."""
    with self._lock:
      self.done += count
      self.worked += count if work is None else work
      now = time.perf_counter()
      if self._first is None:
        self._first = (now, self.done, self.worked)
      if not self.enabled or self._closed:
        return
      if self._bar is not None:
        self._bar.set_postfix_str(self._tail(now), refresh=False)
        self._bar.update(round(self.done) - self._bar.n)
      elif now - self.shown >= self._every and self.done < self.total:  # close() says the end
        self.shown = now
        _log(self._line(now))

  def close(self) -> None:
    """The phase's last line: its steps, rate and time taken."""
    with self._lock:
      if not self.enabled or self._closed:
        return
      self._closed = True
      now = time.perf_counter()
      took = f'done in {duration(now - self.start)}'
      if self._bar is not None:
        self._bar.set_postfix_str(self._tail(now, took), refresh=False)
        self._bar.update(round(self.done) - self._bar.n)
        self._bar.close()
        self._bar = None
      else:
        _log(self._line(now, took))

  def rate(self, now: float | None = None) -> float | None:
    """Steps per second since the first step ended; over the whole phase while there is no
    later step to measure."""
    now = time.perf_counter() if now is None else now
    if self._first is not None and self.done > self._first[1] and now > self._first[0]:
      return (self.done - self._first[1]) / (now - self._first[0])
    return self.done / (now - self.start) if self.done and now > self.start else None

  def _left(self, now: float) -> str:
    if self._first is None or self.worked <= self._first[2] or now <= self._first[0]:
      return '?'  # nothing steady measured yet
    per_second = (self.worked - self._first[2]) / (now - self._first[0])
    return duration(max(self.work - self.worked, 0) / per_second)

  def _tail(self, now: float, end: str | None = None) -> str:
    rate = self.rate(now)
    parts = [f'{rate:.0f} {self.unit}/s' if rate is not None else f'? {self.unit}/s']
    state = self.status() if self.status else ''
    if state:
      parts.append(state)
    parts.append(end or f'{self._left(now)} left')
    return '  '.join(parts)

  def _line(self, now: float, end: str | None = None) -> str:
    share = 100 * self.done / self.total if self.total else 100.0
    return (f'{self.name} {share:3.0f}% {round(self.done)}/{round(self.total)} {self.unit}  '
            f'{self._tail(now, end)}')
