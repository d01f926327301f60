"""The one error type a user can cause and fix, and how entry points end on it.

    @errors.exits_cleanly
    def main(argv): ...

    if __name__ == '__main__':
      app.run(main, flags_parser=launch.parse_flags)

A UserError ends in one line on stderr (`error: ...`) and exit status 1, Ctrl-C in one line and
exit status 130. `unknown(what, name, known)` words every "unknown X" error one way. Flag parsing
(bad flags end the same way) lives in lc_jax.launch.
"""

import difflib
import functools
import sys
from typing import Iterable, Sequence

from absl import flags
from absl import logging

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


class UserError(Exception):
  """Bad input from the user (a wrong path, a checkpoint that does not fit, an unknown name).

  Its message says what was wrong and what to do; command-line entry points print it alone,
  without a traceback, and exit non-zero. `shared`: every process raised it at the same step
  (lc_jax.sharding.agreed), so all of them may go on together past it (a sweep's next model).
  """
  shared: bool = False


def closest(name: str, known: Iterable[str], n: int = 3) -> list[str]:
  """The (at most `n`) known names closest to `name`, closest first; [] when none is close."""
  return difflib.get_close_matches(str(name), list(known), n=n, cutoff=0.5)


def did_you_mean(name: str, known, n: int = 3) -> str:
  """'; did you mean a, b?' with the known names closest to `name`, or '' when none is close."""
  close = closest(name, known, n)
  return f'; did you mean {", ".join(close)}?' if close else ''


# An "unknown X" message spells out at most this many known names.
SHOWN = 12


def unknown(what: str, name: str, known: Iterable[str] = (), listed_by: str = '',
            close: Sequence[str] | None = None, error: type[Exception] = UserError
            ) -> Exception:
  """The error for a `name` that is none of `known`, worded one way for every kind `what`:

      unknown reset mode 'frsh' (did you mean fresh?); known: fresh, zero, ...
      unknown model id 'dino' (did you mean resnet50_dino?); python -m lc_jax.zoo list lists them

  The nearest names come in parentheses when any is close (`close` gives them where the caller
  knows better). Then the known names, the first SHOWN of a longer list and their count, or,
  with `listed_by`, the command or page that lists them. Returns an `error` (a UserError, or
  e.g. a ConversionError) for the caller to raise.
  """
  known = list(known)
  close = closest(name, known) if close is None else list(close)
  message = f'unknown {what} {name!r}'
  if close:
    message += f' (did you mean {", ".join(close)}?)'
  if listed_by:
    message += f'; {listed_by} lists them'
  elif known:
    shown = ', '.join(str(k) for k in known[:SHOWN])
    message += f'; known: {shown}' + (f', ... ({len(known)} in all)' if len(known) > SHOWN else '')
  return error(message)


def fail(message: str, status: int = 1):
  """Prints `error: message` on stderr and exits with `status`."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def exits_cleanly(main):
  """Wraps an absl `main` so a UserError ends in one line on stderr and exit status 1, and
  Ctrl-C in one line and status 130 (what was written durably stays; the run resumes)."""

  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    # Library INFO logs (orbax's save steps, JAX's backend probing) bury the output; --verbosity
    # brings them back.
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(*args, **kwargs)
    except UserError as e:
      fail(str(e))
    except KeyboardInterrupt:
      fail('interrupted; run the same command to resume', INTERRUPTED)

  return wrapper
