"""What the entry points share: the malloc setting made before JAX starts, flag parsing with every
error in one line and `--help` (`parse_flags`, `define_config_file`), the flags of a run (config
file, workdir, processes), and joining a run over several processes.

    if __name__ == '__main__':
      app.run(main, flags_parser=launch.parse_flags)   # main wrapped in @errors.exits_cleanly

Bad flags (an unknown config key, a value of the wrong type, a config file that does not load)
end in one line and exit status 1, and Ctrl-C in one line and exit status 130. `--help` prints
the entry point's usage (its docstring) and the flags this project defines, and exits 0; absl's
own flags (logging, debugging) are listed by `--helpfull`. Imports no JAX at module level:
`one_malloc_arena` must run before JAX's threads do. Defines no flag at import: entry points
call `define_flags` and `define_config_file` when run as programs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import sys
from typing import Sequence

from absl import flags

from lc_jax import errors

# Packages whose flags an entry point's `--help` lists: the entry point's own (`__main__`) and
# this project's. Flags of other packages (absl's logging and debugging, orbax's) are listed by
# `--helpfull`.
OWN_PACKAGES = ('__main__', 'lc_jax', 'converters', 'benchmarks')
HELP = ('--help', '-help', '-h', '-?', '--helpshort', '-helpshort')
HELPFULL = ('--helpfull', '-helpfull')


def one_malloc_arena() -> None:
  """Makes glibc's malloc use one arena for all threads (unless MALLOC_ARENA_MAX is set).

  XLA's CPU runtime allocates and frees its buffers on several threads; with glibc's default of
  an arena per thread, memory freed in one arena stays resident while another grows. One arena
  lowers the peak resident memory of a ResNet-50 run at batch 32 from 1395 to 1117 MiB at the
  same speed (docs/speed.md, memory). Linux only; a no-op where malloc is not glibc's.
  """
  if not sys.platform.startswith('linux') or 'MALLOC_ARENA_MAX' in os.environ:
    return
  try:  # Arenas are made lazily: this runs before jax starts its threads.
    ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX
  except (OSError, AttributeError):  # not glibc
    pass


@dataclasses.dataclass(frozen=True)
class Flags:
  """The flag holders of a run's command line."""

  config: object
  workdir: object
  quiet: object
  distributed: object
  coordinator: object
  num_processes: object
  process_id: object


def define_flags(default_workdir: str) -> Flags:
  """Defines --config (the demo by default, found from any folder), --workdir, --quiet and the
  flags of a run over several processes."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return Flags(
      config=define_config_file(
          'config', os.path.join(root, 'configs', 'demo.py'), 'Experiment config file.'),
      workdir=flags.DEFINE_string('workdir', default_workdir, 'Folder for the results.'),
      quiet=flags.DEFINE_bool('quiet', False, 'No progress lines.'),
      distributed=flags.DEFINE_bool(
          'distributed', False, 'Run over several processes (hosts) as '
          'jax.distributed.initialize() finds them (Cloud TPU, SLURM, Open MPI, ...).'),
      coordinator=flags.DEFINE_string(
          'coordinator_address', '', 'HOST:PORT of process 0, for a run over --num_processes '
          'processes (implies --distributed).'),
      num_processes=flags.DEFINE_integer(
          'num_processes', 0, 'Processes of the run, with --coordinator_address.'),
      process_id=flags.DEFINE_integer(
          'process_id', -1, "This process's index, from 0, with --coordinator_address."))


def join_processes(run_flags: Flags) -> None:
  """Joins the run over several processes that the flags describe (none: one process)."""
  from absl import app  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  if run_flags.distributed.value or run_flags.coordinator.value:
    try:
      jax.distributed.initialize(run_flags.coordinator.value or None,
                                 run_flags.num_processes.value or None,
                                 None if run_flags.process_id.value < 0
                                 else run_flags.process_id.value)
    except (RuntimeError, ValueError) as e:
      raise errors.UserError(f'cannot join the run over several processes: {e}') from None
  elif run_flags.num_processes.value or run_flags.process_id.value >= 0:
    raise app.UsageError('--num_processes and --process_id need --coordinator_address or '
                         '--distributed')


def config_of(run_flags: Flags):
  """Joins the processes, then gives the config of the command line (progress off with --quiet).
  An empty --workdir is refused first (it would be the current folder)."""
  if not run_flags.workdir.value.strip():
    raise errors.UserError('--workdir is empty: give a folder for the results, e.g. '
                           '--workdir=out/run')
  join_processes(run_flags)
  config = run_flags.config.value
  if run_flags.quiet.value:
    config.progress = False
  return config


_CONFIG_FLAGS: list[str] = []


def define_config_file(name: str, default: str, help_text: str):
  """ml_collections' DEFINE_config_file, with a misspelt override (`--config.reset.mdoe=zero`,
  seen as the flag is defined) ending in one line that names the closest known key."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  try:
    holder = config_flags.DEFINE_config_file(name, default, help_text)
  except (AttributeError, KeyError) as e:
    errors.fail(_unknown_key(str(e), sys.argv))
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
    errors.fail('interrupted', errors.INTERRUPTED)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown field
    errors.fail(_unknown_key(str(e), argv))
  except OSError as e:  # a config file that cannot be found, seen when overrides apply to it
    errors.fail(_config_file_error(str(e), argv))
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    # A config file that raised: its traceback ends with the exception's own line.
    errors.fail(lines[0] if len(lines) == 1 else f'{lines[0]} {lines[-1]}')
  except Exception as e:  # pylint: disable=broad-except  # a config file that does not compile
    errors.fail(f'the config file failed to load: {type(e).__name__}: {str(e).splitlines()[0]}')
  # Config files load lazily: load them now, so a missing one fails here, in one line.
  for name in _CONFIG_FLAGS:
    try:
      flags.FLAGS[name].value.keys()
    except OSError as e:
      errors.fail(_config_file_error(str(e), argv))
    except Exception as e:  # pylint: disable=broad-except  # the config file itself raised
      errors.fail(f'the config file failed to load: {type(e).__name__}: {str(e).splitlines()[0]}')
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
  """An override of a field the config does not have (ml_collections' message) as
  `errors.unknown`'s line, with the key path as given and ml_collections' nearest field."""
  text = message.encode().decode('unicode_escape') if '\\n' in message else message
  key = re.search(r"'([^'\\]+)", text)
  hint = re.search(r'Did you mean "([^"]+)"', text)
  name, close = key.group(1) if key else '?', hint.group(1) if hint else None
  for arg in argv:
    match = re.match(r'--(\w+)\.([\w.]+)', arg)
    if match and name in match.group(2).split('.'):
      path = match.group(2).split('.')
      at = path.index(name)
      name = '.'.join(path[:at + 1])
      close = '.'.join(path[:at] + [close]) if close else None
      break
  return str(errors.unknown('config key', name, close=[close] if close else [],
                            listed_by='docs/command_line.md'))


def _config_file_error(message: str, argv: Sequence[str]) -> str:
  given = next((a.split('=', 1)[1] for a in argv if re.match(r'--\w+=', a)
                and a.split('=', 1)[0] in ('--config',)), None)
  lines = [line.strip() for line in message.splitlines() if line.strip()]
  if 'No such file' in message:
    where = (given or 'the default config file').split(':')[0]
    return (f'config file not found: {where} (give a path relative to the current folder, or '
            'absolute)')
  return f'the config file {given or ""} failed to load: {lines[-1] if lines else message}'
