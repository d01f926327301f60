"""The one error type a user can cause and fix; entry points print it on one line and exit 1."""


class UserError(Exception):
  """Bad input from the user (a wrong path, a checkpoint that does not fit, an unknown name).

  Its message says what was wrong and what to do; command-line entry points print it alone,
  without a traceback, and exit non-zero.
  """
