"""Progress (lc_jax.progress): a live bar per phase on a terminal, a logged line at most every N
seconds elsewhere, the time left from the steps after the first, per-row lines only with
config.verbose. The phases on a clock the test sets; then run.py on the demo, on a
pseudo-terminal and on a pipe."""

import datetime
import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios

import pytest

from lc_jax import progress
from lc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ('--config.reset.layers=first:6', '--config.trials=1')
# An absl log line: level, date, time, thread, file:line] message.
ABSL = re.compile(r'^[IWEF]\d{4} (\d\d:\d\d:\d\d\.\d{6}) +\d+ \S+:\d+\] (.*)$')
PHASE = re.compile(r'^(images|compile|resets) +\d+% ')


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(progress.time, 'perf_counter', clock)
  return clock


def test_lines_off_a_terminal_at_most_every_n_seconds(clock, monkeypatch, capsys):
  monkeypatch.setenv(progress.EVERY, '10')
  with progress.Phase('resets', 40, 'image-resets', status=lambda: 'device busy  80%') as phase:
    for _ in range(40):  # a step a second: a line at 10, 20 and 30 s, and one at the end
      clock.now += 1
      phase.advance()
  lines = capsys.readouterr().err.splitlines()
  print('\n'.join(lines))
  assert len(lines) == 4 and '\r' not in ''.join(lines)
  assert lines[0] == 'resets  25% 10/40 image-resets  1 image-resets/s  device busy  80%  0m30s left'
  assert lines[-1].endswith('40/40 image-resets  1 image-resets/s  device busy  80%  done in 0m40s')

  monkeypatch.setenv(progress.EVERY, '0')  # every step
  with progress.Phase('images', 3, 'images') as phase:
    for _ in range(3):
      clock.now += 1
      phase.advance()
  assert len(capsys.readouterr().err.splitlines()) == 3  # the third step is the closing line's


def test_time_left_counts_from_the_steps_after_the_first(clock, monkeypatch, capsys):
  """The first step holds one-off costs (a program compiled at first use): 100 s, then a step
  a second. The estimate is the steady rate's, not the average's (about 34 s a step)."""
  monkeypatch.setenv(progress.EVERY, '0')
  phase = progress.Phase('resets', 100, 'image-resets')
  clock.now = 100.0
  phase.advance()
  assert capsys.readouterr().err.strip().endswith('? left')  # nothing steady measured yet
  for _ in range(9):
    clock.now += 1
    phase.advance()
  line = capsys.readouterr().err.splitlines()[-1]
  assert line.endswith('1 image-resets/s  1m30s left'), line  # 90 steps of 1 s
  phase.close()


def test_disabled_phase_and_say_print_nothing(clock, capsys):
  with progress.Phase('compile', 2, 'programs', enabled=False) as phase:
    clock.now += 20
    phase.advance(2)
  progress.say('resuming: ...', enabled=False)
  assert capsys.readouterr().err == ''


def test_a_bad_interval_is_refused(monkeypatch):
  monkeypatch.setenv(progress.EVERY, 'often')
  with pytest.raises(UserError, match=r'LC_JAX_PROGRESS_EVERY is .often.; give the seconds'):
    progress.every()


def _demo(workdir, *extra, env=None, tty=False):
  """stderr of `python run.py` on the demo, on a pipe or on a pseudo-terminal of 120 columns."""
  args = [sys.executable, 'run.py', f'--workdir={workdir}', *DEMO, *extra]
  env = dict(os.environ, **(env or {}))
  if not tty:
    result = subprocess.run(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr
  main, other = pty.openpty()
  fcntl.ioctl(other, termios.TIOCSWINSZ, struct.pack('HHHH', 40, 120, 0, 0))
  process = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=other)
  os.close(other)
  err = b''
  while True:  # read as it comes: a full pseudo-terminal would block the run
    ready, _, _ = select.select([main], [], [], 0.5)
    if ready:
      try:
        chunk = os.read(main, 65536)
      except OSError:  # the run closed its end
        break
      if not chunk:
        break
      err += chunk
    elif process.poll() is not None:
      break
  os.close(main)
  assert process.wait(timeout=600) == 0, err.decode(errors='replace')[-3000:]
  return err.decode(errors='replace')


def test_terminal_shows_a_live_bar_per_phase(tmp_path):
  err = _demo(tmp_path / 'tty', '--config.verbose=true', tty=True)
  print(repr(err[-1500:]))
  # Each phase redraws its bar in place (carriage returns) with its rate and time left.
  bars = re.findall(r'\r(compile|resets): +(\d+)%\|', err)
  assert {'compile', 'resets'} <= {name for name, _ in bars}
  assert re.search(r'\rresets: 100%\|[^\r\n]*42/42 image-resets, \d+ image-resets/s  '
                   r'(device busy +\d+%  )?done in \dm\d\ds', err), err[-1500:]
  assert re.search(r'image-resets/s  (device busy +\d+%  )?(\?|\dm\d\ds) left', err)
  # One-off lines and the verbose rows are whole lines above the bars, not log records.
  assert 'prefix reuse: 18 segments' in err and 'compiled ' in err
  assert re.search(r'\[   6/6\] trial 0 blocks\.0\.0\.bn2 +criticality +[\d.]+%', err)
  assert not any(ABSL.match(line) for line in err.replace('\r', '\n').splitlines())


def test_pipe_gets_absl_lines_at_most_every_n_seconds_and_no_rows(tmp_path):
  every = 1.0
  err = _demo(tmp_path / 'pipe', env={progress.EVERY: str(every)})
  print(err)
  assert '\r' not in err
  lines = [line for line in err.splitlines() if line.strip()]
  records = [ABSL.match(line) for line in lines]
  assert all(records), [line for line, r in zip(lines, records) if not r]  # time on each line
  messages = [r[2] for r in records]
  assert any(m.startswith('prefix reuse: ') for m in messages)
  assert any(re.match(r'compiled \d+ programs in [\d.]+ s \([\d.]+ s of compile work\)', m)
             for m in messages)
  # The run's last line splits its wall time; the parts add up to it (each printed to 0.1 s).
  took = re.fullmatch(r'took (\S+) s: conversion (\S+) s, images (\S+) s, compile (\S+) s, '
                      r'compute (\S+) s, other (\S+) s', messages[-1])
  assert took, messages[-1]
  wall, *parts = [float(v) for v in took.groups()]
  assert min(parts) >= 0 and parts[3] > 0 and sum(parts) == pytest.approx(wall, abs=0.3)
  assert not any(re.match(r'\[ *\d+/6\] ', m) for m in messages), 'rows only with verbose'
  # A phase's lines while it runs are at least `every` apart; its closing line comes at its end.
  shown = {}
  for record in records:
    if PHASE.match(record[2]) and 'done in' not in record[2]:
      when = datetime.datetime.strptime(record[1], '%H:%M:%S.%f')
      phase = record[2].split()[0]
      if phase in shown:
        assert (when - shown[phase]).total_seconds() >= every - 0.05, (record[2], messages)
      shown[phase] = when
  assert any(re.match(r'resets 100% 42/42 image-resets  \d+ image-resets/s  '
                      r'(device busy +\d+%  )?done in', m) for m in messages), messages
