"""The one error type a user can cause and fix; entry points print it on one line and exit 1."""

import functools
import sys

from absl import flags
from absl import logging


class UserError(Exception):
  """Bad input from the user (a wrong path, a checkpoint that does not fit, an unknown name).

  Its message says what was wrong and what to do; command-line entry points print it alone,
  without a traceback, and exit non-zero.
  """


def exits_cleanly(main):
  """Wraps an absl `main` so a UserError ends in one line on stderr and exit status 1."""

  @functools.wraps(main)
  def wrapper(*args, **kwargs):
    # Library INFO logs (orbax's save steps, JAX's backend probing) bury the output; --verbosity
    # brings them back.
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(*args, **kwargs)
    except UserError as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)

  return wrapper
