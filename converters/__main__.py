r"""Converts a PyTorch or safetensors checkpoint into a Flax model folder.

    python -m converters SRC [--arch resnet50] --out DIR [--trust_pickle] [--mean 0,0,0 --std 1,1,1]
        [--allow_nonfinite]

SRC is a checkpoint file, or bundled:NAME for a checkpoint shipped in an installed package.
Writes DIR/variables (orbax) and DIR/model.json, and prints a one-screen summary.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

import converters
from converters import cli
from lc_jax import errors
from lc_jax import launch
from lc_jax import models
from lc_jax.errors import UserError

USAGE = 'python -m converters SRC [--arch ARCH] --out DIR'

# Defined when run as a program (`_run`).
_ARCH = _OUT = _OVERWRITE = _TRUST_PICKLE = _ALLOW_NONFINITE = _MEAN = _STD = None


@errors.exits_cleanly
def main(argv):
  if len(argv) == 3 and _OUT.value is None:  # `python -m converters SRC DIR`
    raise UserError(f'unexpected argument {argv[2]}; give the output folder as a flag: '
                    f'python -m converters {argv[1]} --out {argv[2]}')
  src = cli.one_source(argv, f'{USAGE} (--help lists the flags)')
  arch, variables, metadata = converters.convert(
      src, _ARCH.value, trust_pickle=_TRUST_PICKLE.value,
      mean=cli.floats(_MEAN.value, 'mean'), std=cli.floats(_STD.value, 'std'),
      allow_nonfinite=_ALLOW_NONFINITE.value)
  metadata['arch_inferred'] = _ARCH.value is None
  if _OUT.value:
    converters.save(_OUT.value, arch, variables, metadata, overwrite=_OVERWRITE.value)
  print(cli.summary(metadata, variables, os.path.abspath(_OUT.value) if _OUT.value else None))


def _run() -> None:
  # pylint: disable=global-statement
  global _ARCH, _OUT, _OVERWRITE, _TRUST_PICKLE, _ALLOW_NONFINITE, _MEAN, _STD
  _ARCH = flags.DEFINE_string('arch', None, 'Architecture name; inferred from the checkpoint when '
                              f'left out. Known: {", ".join(models.names())}.')
  _OUT = flags.DEFINE_string('out', None, 'Output folder for the converted model.')
  _OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace a model already in --out.')
  _TRUST_PICKLE = flags.DEFINE_bool(
      'trust_pickle', False, 'Allow legacy checkpoints that hold Python objects besides tensors. '
      'Unpickling runs code from the file: use only for files you trust.')
  _ALLOW_NONFINITE = flags.DEFINE_bool(
      'allow_nonfinite', False, 'Keep tensors that hold NaN or inf (refused by default: a model '
      'with them computes NaN).')
  _MEAN = flags.DEFINE_list('mean', None, 'Input normalisation mean per channel, e.g. 0,0,0.')
  _STD = flags.DEFINE_list('std', None, 'Input normalisation std per channel, e.g. 1,1,1.')
  app.run(main, flags_parser=launch.parse_flags)


if __name__ == '__main__':
  _run()
