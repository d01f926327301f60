"""What the entry points (run.py, python -m lc_jax.sweep) share: the malloc setting made before JAX
starts, the flags of a run (config file, workdir, processes), and joining a run over several
processes. Imports no JAX at module level: `one_malloc_arena` must run before JAX's threads do.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys


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
  from absl import flags  # pylint: disable=g-import-not-at-top
  from lc_jax import errors  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return Flags(
      config=errors.define_config_file(
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
  from lc_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if run_flags.distributed.value or run_flags.coordinator.value:
    try:
      jax.distributed.initialize(run_flags.coordinator.value or None,
                                 run_flags.num_processes.value or None,
                                 None if run_flags.process_id.value < 0
                                 else run_flags.process_id.value)
    except (RuntimeError, ValueError) as e:
      raise UserError(f'cannot join the run over several processes: {e}') from None
  elif run_flags.num_processes.value or run_flags.process_id.value >= 0:
    raise app.UsageError('--num_processes and --process_id need --coordinator_address or '
                         '--distributed')


def config_of(run_flags: Flags):
  """Joins the processes, then gives the config of the command line (progress off with --quiet).
  An empty --workdir is refused first (it would be the current folder)."""
  if not run_flags.workdir.value.strip():
    from lc_jax.errors import UserError  # pylint: disable=g-import-not-at-top
    raise UserError('--workdir is empty: give a folder for the results, e.g. --workdir=out/run')
  join_processes(run_flags)
  config = run_flags.config.value
  if run_flags.quiet.value:
    config.progress = False
  return config
