"""The one error type a user can cause and fix; entry points print it on one line and exit 1.

    if __name__ == '__main__':
      app.run(main, flags_parser=errors.parse_flags)   # main wrapped in @errors.exits_cleanly

Bad flags (an unknown config key, a value of the wrong type, a config file that does not load)
end the same way, and Ctrl-C ends in one line and exit status 130. `--help` prints the entry
point's usage (its docstring) and the flags this project defines, and exits 0; absl's own flags
(logging, debugging) are listed by `--helpfull`.
"""

import difflib
import functools
import re
import sys
from typing import Iterable, Sequence

from absl import flags
from absl import logging

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT

# Packages whose flags an entry point's `--help` lists: the entry point's own (`__main__`) and
# this project's. Flags of other packages (absl's logging and debugging, orbax's) are listed by
# `--helpfull`.
OWN_PACKAGES = ('__main__', 'lc_jax', 'converters', 'benchmarks')
HELP = ('--help', '-help', '-h', '-?', '--helpshort', '-helpshort')
HELPFULL = ('--helpfull', '-helpfull')


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


_CONFIG_FLAGS: list[str] = []


def define_config_file(name: str, default: str, help_text: str):
  """ml_collections' DEFINE_config_file, with a misspelt override (`--config.reset.mdoe=zero`,
  seen as the flag is defined) ending in one line that names the closest known key."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_text)
  except (AttributeError, KeyError) as e:
    fail(_unknown_key(str(e), sys.argv))
  _CONFIG_FLAGS.append(name)
  return holder


def parse_flags(argv: Sequence[str], usage: str | None = None) -> list[str]:
  """absl's flag parsing (pass as `app.run(..., flags_parser=parse_flags)`), with every error
  as one line: a misspelt config key with the closest known one, a wrong value, a config file
  that is missing or fails to load. `--help` (and `--helpfull`) print `help_text(usage)` and
  exit 0; `usage` defaults to the docstring of the program's `__main__` module."""
  options = list(argv[1:argv.index('--')] if '--' in argv else argv[1:])
  wanted = [a for a in options if a in HELP + HELPFULL]
  if wanted:
    try:
      print(help_text(usage, full=any(a in HELPFULL for a in wanted)))
      sys.stdout.flush()
    except BrokenPipeError:  # `--help | head`
      pass
    sys.exit(0)
  try:
    remaining = flags.FLAGS(argv)
  except KeyboardInterrupt:
    fail('interrupted', INTERRUPTED)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
    fail(_unknown_key(str(e), argv))
  except OSError as e:  # a config file that cannot be found, seen when overrides apply to it
    fail(_config_file_error(str(e), argv))
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A config file that raised: its traceback ends with the exception's own line.
    fail(lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}')
  except Exception as e:  # pylint: disable=broad-except  # a config file that does not compile
    fail(f'the config file failed to load: {type(e).__name__}: {str(e).splitlines()[0]}')
  # Config files load lazily: load them now, so a missing one fails here, in one line.
  for name in _CONFIG_FLAGS:
    try:
      flags.FLAGS[name].value.keys()
    except OSError as e:
      fail(_config_file_error(str(e), argv))
    except Exception as e:  # pylint: disable=broad-except  # the config file itself raised
      fail(f'the config file failed to load: {type(e).__name__}: {str(e).splitlines()[0]}')
  return remaining


def help_text(usage: str | None = None, full: bool = False) -> str:
  """What `--help` prints: `usage` (default: the `__main__` module's docstring), then each flag
  that this project's modules define (OWN_PACKAGES) with its help and default; `full` adds the
  flags of every other module (absl's logging and debugging flags, ...)."""
  if usage is None:
    usage = sys.modules['__main__'].__doc__ or f'usage: {sys.argv[0]} [flags]'
  own, others = [], []
  for module, defined in flags.FLAGS.flags_by_module_dict().items():
    # absl names the `__main__` module after the program's path (sys.argv[0]).
    mine = module == sys.argv[0] or module.split('.')[0] in OWN_PACKAGES
    (own if mine else others).append((module, defined))
  lines = [usage.strip('\n').rstrip(), '', 'flags:']
  seen = set()
  for _, defined in own:
    for flag in defined:
      if flag.name not in seen:
        seen.add(flag.name)
        lines += _describe(flag)
  if _CONFIG_FLAGS:
    lines.append(flags.text_wrap(
        f'--{_CONFIG_FLAGS[0]}.FIELD=VALUE sets one field of the config file, e.g. '
        f'--{_CONFIG_FLAGS[0]}.data.batch_size=64 (docs/command_line.md lists them).',
        indent='    ', firstline_indent='  '))
  if full:
    for module, defined in others:
      lines += ['', f'{module}:']
      for flag in defined:
        if flag.name not in seen:
          seen.add(flag.name)
          lines += _describe(flag)
  else:
    lines += ['', "absl's own flags (logging, debugging): --helpfull"]
  return '\n'.join(lines)


def _describe(flag) -> list[str]:
  """A flag's lines in `--help`: `--name: help`, then its default."""
  name = f'--[no]{flag.name}' if flag.boolean else f'--{flag.name}'
  lines = [flags.text_wrap(f'{name}: {flag.help}', indent='    ', firstline_indent='  ')]
  if flag.default_as_str is not None:  # not `default`: a config flag's loads the file
    lines.append(f'    (default: {flag.default_as_str})')
  return lines


def _unknown_key(message: str, argv: Sequence[str]) -> str:
  text = message.encode().decode('unicode_escape') if '\\n' in message else message
  key = re.search(r"'([^'\\]+)", text)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  name = key.group(1) if key else '?'
  for arg in argv:
    match = re.match(r'--(\w+)\.([\w.]+)', arg)
    if match and name in match.group(2).split('.'):
      path = match.group(2).split('.')
      shown = '.'.join(path[:path.index(name) + 1])
      suggestion = ''
      if hint:
        path[path.index(name)] = hint.group(1)
        suggestion = f'; did you mean {".".join(path[:path.index(hint.group(1)) + 1])}?'
      return f'unknown config key {shown}{suggestion}'
  return f'unknown config key {name}' + (f'; did you mean {hint.group(1)}?' if hint else '')


def _config_file_error(message: str, argv: Sequence[str]) -> str:
  given = next((a.split('=', 1)[1] for a in argv if re.match(r'--\w+=', a)
                and a.split('=', 1)[0] in ('--config',)), None)
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if 'No such file' in message:
    where = (given or 'the default config file').split(':')[0]
    return f'config file not found: {where} (give a path relative to the current folder, or absolute)'
  return f'the config file {given or ""} failed to load: {lines[-1] if lines else message}'
