"""Entry points' shared pieces: one wording for unknown names, and no flags defined at import."""

import os
import subprocess
import sys

import pytest

from lc_jax import errors
from lc_jax import launch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_unknown_names_the_closest_and_the_known_ones():
  error = errors.unknown('reset mode', 'frsh', ('fresh', 'zero'))
  assert isinstance(error, errors.UserError)
  assert str(error) == "unknown reset mode 'frsh' (did you mean fresh?); known: fresh, zero"
  assert str(errors.unknown('reset mode', 'xyz', ('fresh', 'zero'))) == (
      "unknown reset mode 'xyz'; known: fresh, zero")
  many = [f'conv{i}' for i in range(30)]
  assert str(errors.unknown('layer', 'conv99', many)).endswith(
      '; known: ' + ', '.join(many[:errors.SHOWN]) + ', ... (30 in all)')
  listed = errors.unknown('model id', 'dinoo', ['dino'], listed_by='python -m lc_jax.zoo list',
                          error=ValueError)
  assert type(listed) is ValueError  # pylint: disable=unidiomatic-typecheck
  assert str(listed) == ("unknown model id 'dinoo' (did you mean dino?); "
                         'python -m lc_jax.zoo list lists them')


def test_a_misspelt_config_key_is_named_with_its_path():
  import ml_collections  # pylint: disable=g-import-not-at-top
  with pytest.raises(AttributeError) as raised:  # what ml_collections raises for the override
    _ = ml_collections.ConfigDict({'reset': {'mode': 'zero'}}).reset.mdoe
  message = str(raised.value)
  assert launch._unknown_key(message, ['run.py', '--config.reset.mdoe=zero']) == (
      "unknown config key 'reset.mdoe' (did you mean reset.mode?); docs/command_line.md lists "
      'them')


def test_no_module_defines_flags_at_import():
  """Importing every module of lc_jax and converters (as a notebook or a library user would)
  defines no absl flag: entry points define theirs when run as programs."""
  code = '''
import importlib, pkgutil, sys
from absl import flags
import lc_jax, converters
names = []
for package in (lc_jax, converters):
  for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
    if info.name.rsplit('.', 1)[-1] == '__main__':
      continue  # the programs themselves
    try:
      importlib.import_module(info.name)
    except ImportError as e:  # an extra that is not installed
      print('skipped', info.name, e, file=sys.stderr)
    names.append(info.name)
own = {m: [f.name for f in fs] for m, fs in flags.FLAGS.flags_by_module_dict().items()
       if m.split('.')[0] in ('lc_jax', 'converters')}
print(len(names), own)
'''
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  count, own = result.stdout.split(' ', 1)
  assert int(count) > 40 and own.strip() == '{}', result.stdout
