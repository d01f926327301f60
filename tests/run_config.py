"""The config and workdir that `python run.py ARGS` runs, built in the test's own process.

A run that a test only needs as set-up or as a reference (its results, not its command line)
runs in-process with `lc_jax.experiment.run(*run_config.of(args))`: the same measured fields as
the command's, so a workdir of either is the other's, without a new interpreter's imports,
conversion and report. Tests of the command itself (exit status, error lines, locks, signals)
keep running run.py.
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def of(args):
  """(config, workdir) of run.py's arguments `args` (the interpreter and run.py may lead): the
  config file (--config=PATH, relative to the repository; configs/demo.py by default), each
  --config.a.b=VALUE override parsed as the field's type, --quiet as progress off."""
  args = [a for a in map(str, args) if a.startswith('--')]
  files = [a.split('=', 1)[1] for a in args if a.startswith('--config=')]
  path = os.path.join(ROOT, files[-1] if files else os.path.join('configs', 'demo.py'))
  spec = importlib.util.spec_from_file_location('run_config_file', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  workdir = None
  for arg in args:
    name, _, value = arg[2:].partition('=')
    if name == 'workdir':
      workdir = value
    elif name == 'quiet':
      config.progress = False
    elif name.startswith('config.'):
      *parents, leaf = name[len('config.'):].split('.')
      holder = config
      for parent in parents:
        holder = holder[parent]
      kind = type(holder[leaf])
      holder[leaf] = {'true': True, 'false': False}[value.lower()] if kind is bool else kind(value)
    elif name != 'config':
      raise ValueError(f'{arg}: not a flag of a one-process run')
  return config, workdir
