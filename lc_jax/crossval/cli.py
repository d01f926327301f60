r"""Cross-framework validation: one checkpoint, the same reset weights and the same images through
the paper's loop in PyTorch (`lc_jax.torch_reference`) and through lc-jax, compared.

    python -m lc_jax.crossval --out=out/crossval        # the demo's config, configs/demo.py
    python -m lc_jax.crossval --config=configs/paper.py --out=out/crossval \
      --config.model.checkpoint=/ckpt/resnet50.pth --config.data.path=/data/imagenet/val \
      --layers='layer1.*' --tolerance=metrics=1e-5

The checkpoint, images, layers, trials and seed come from the run config, as for run.py
(`--layers` stands for `--config.reset.layers`). Each trial's fresh model is drawn in torch by
the architecture's counterpart (`Architecture.timm_name`) and saved as
OUT/fresh/trialT.safetensors; the torch loop loads those tensors and lc-jax converts them (a run
of reset mode 'checkpoint' in OUT/jax/trialT), so both frameworks reset from the same numbers.
Checked (docs/crossval.md):

- parity: the original model's logits and every module output (stages, blocks, layers) on every
  image, lc-jax against torch on the same weights (`converters.parity.compare`);
- metric: every metric column of every (trial, layer) row, lc-jax's results.csv against the
  torch loop's rows;
- init: per layer kind and variable, lc-jax's own fresh draws (`lc_jax.init`, the
  architecture's scheme) against the torch initialiser's: two-sample KS test, std ratio, bounds.

Writes OUT/crossval.md (the verdict, then the worst lines first) and OUT/crossval.csv (every
check); exits with status 2 when a tolerance is broken, 1 on bad input. Needs the torch extra.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags

from lc_jax import errors
from lc_jax import launch
from lc_jax.crossval import validate
from lc_jax.crossval.report import describe
from lc_jax.crossval.tolerances import parse_tolerances
from lc_jax.crossval.tolerances import TOLERANCES

DISAGREE = 2  # exit status when a tolerance is broken (bad input: 1)
# The layers checked when neither --layers nor the config names any: the first ones, whose resets
# reach every later module: a minute or two, where all of the demo's 99 take about ten.
QUICK_LAYERS = 'first:6'

_FLAGS: dict[str, Any] = {}


@errors.exits_cleanly
def main(argv: Sequence[str]) -> None:
  """Cross-validates the config of the flags, prints the verdict and the worst lines; exits
  with DISAGREE when a tolerance is broken."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _FLAGS['config'].value
  tolerances = parse_tolerances(_FLAGS['tolerance'].value)
  if _FLAGS['layers'].value is not None:
    config.reset.layers = _FLAGS['layers'].value
  elif not config.reset.layers:  # the config's all layers: the torch loop would take long
    config.reset.layers = QUICK_LAYERS
  if _FLAGS['quiet'].value:
    config.progress = False
  report = validate.run(config, _FLAGS['out'].value, tolerances)
  print(report.verdict())
  print('worst lines:')
  for c in report.worst(5):
    print(f'  {describe(c)}')
  out = os.path.abspath(_FLAGS['out'].value)
  print(f'report: {os.path.join(out, "crossval.md")}, every check: '
        f'{os.path.join(out, "crossval.csv")}')
  if not report.passed:
    sys.exit(DISAGREE)


def run() -> None:
  """Defines the flags and runs `main` (python -m lc_jax.crossval)."""
  # Flags are defined only when run as a program: importing lc_jax.crossval defines none.
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  _FLAGS.update(
      config=launch.define_config_file('config', os.path.join(root, 'configs', 'demo.py'),
                                       'Run config file (checkpoint, images, layers, trials).'),
      out=flags.DEFINE_string('out', 'out/crossval', 'Folder for crossval.md, crossval.csv, '
                              'the fresh models and the lc-jax runs.'),
      layers=flags.DEFINE_string(
          'layers', None, 'Layers to reset (as --config.reset.layers); by default the '
          f"config's, or {QUICK_LAYERS} when it names none (all); --layers= for all."),
      tolerance=flags.DEFINE_string(
          'tolerance', '', 'Tolerance overrides, name=value,... with names '
          f'{", ".join(TOLERANCES)}.'),
      quiet=flags.DEFINE_bool('quiet', False, 'No progress lines.'))
  app.run(main, flags_parser=functools.partial(launch.parse_flags, usage=__doc__))
