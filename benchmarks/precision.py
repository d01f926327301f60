r"""What lower precision does to a criticality run: the same protocol at precision float32 (the
reference, matmul precision 'highest'), tf32 (TensorFloat-32 convolutions and matmuls on GPUs
that have them; on CPU the same float32 arithmetic) and bfloat16, compared layer by layer.

    python benchmarks/precision.py                         # the demo: Lite0, 99 layers, 7 photos
    python benchmarks/precision.py --config=configs/paper.py --random_arch=resnet50 \
      --config.data.source=photos --config.data.num_images=0 --config.data.order=sorted \
      --config.data.batch_size=8

Runs `lc_jax.experiment.run` (run.py's pipeline) once per setting of --settings, in this
process, each into WORKDIR/<setting>/, on the config given as run.py takes it (--config and
--config.a.b=v overrides). With --random_arch the checkpoint is the timm ARCH drawn with seed 0,
BatchNorm calibrated (benchmarks/_shared.make_checkpoint), saved to WORKDIR/ARCH.pth and reused:
its weights are random, so only the differences between settings mean anything. The images are
loaded into the cache once before the first setting, and every setting compiles its own
programs (no persistent compilation cache unless the config names one), so each setting's wall
time is its conversion, compiles and compute.

Prints, per setting: the model-level mean criticality; against the reference, per layer (the
mean over trials), the largest and the mean absolute difference in percentage points, the same
in units of the reference's trial spread (the half-width of its 95% interval over trials,
lc_jax.report.stats; over the layers whose spread is more than rounding, SPREAD_FLOOR) and
Spearman's rank correlation of the layer profile; then its wall time, compile time and compute
time (lc_jax.experiment's phases). Below the table, the yardsticks of the reference: a layer's
median trial spread, the trial spread of the model-level mean, and the rank correlation between
two of its trials.
"""

from __future__ import annotations

import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from lc_jax import launch

launch.one_malloc_arena()  # as run.py: before JAX starts its threads

from absl import app
from absl import flags
import numpy as np

from benchmarks import _shared
from lc_jax import config as lc_config
from lc_jax import data
from lc_jax import errors
from lc_jax import experiment
from lc_jax import report
# pylint: enable=g-import-not-at-top,wrong-import-position

# A layer's trial spread below this (a fraction) is rounding: its trials drew the same reset
# (BatchNorm's fresh reset is the same constants in every trial), and differences in its units
# would be meaningless.
SPREAD_FLOOR = 1e-5

# name: (matmul_precision, precision, what it is)
SETTINGS = {
    'highest': ('highest', 'float32', 'float32, matmul highest (reference)'),
    'tf32': ('highest', 'tf32', 'tf32 (TensorFloat-32 matmuls)'),
    'bfloat16': ('highest', 'bfloat16', 'bfloat16'),
}

_CONFIG = launch.define_config_file('config', os.path.join(ROOT, 'configs', 'demo.py'),
                                    'Experiment config file, as run.py takes it.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Folder for every setting; empty: a temporary one.')
_SETTINGS = flags.DEFINE_list('settings', list(SETTINGS),
                              f'Settings to run, the reference first: {", ".join(SETTINGS)}.')
_RANDOM_ARCH = flags.DEFINE_string(
    'random_arch', '', 'A timm architecture (resnet50, ...): run a calibrated random checkpoint '
    'of it instead of the config\'s.')


def layer_profile(rows) -> tuple[list[str], np.ndarray, np.ndarray]:
  """(layers in forward order, mean criticality over trials, half-width of its 95% interval
  over trials) of one run's rows."""
  summaries = report.stats.summarize([{**row, 'source': ''} for row in rows])
  return ([s.layer for s in summaries], np.array([s.criticality for s in summaries]),
          np.array([s.ci_trials for s in summaries]))


def compare(reference, other) -> dict[str, float]:
  """The figures of `other`'s layer profile against `reference`'s (both from layer_profile)."""
  names, crit, spread = reference
  other_names, other_crit, _ = other
  if other_names != names:
    raise ValueError('the settings evaluated different layers')
  diff = np.abs(other_crit - crit)
  wide = spread > SPREAD_FLOOR  # NaN (one trial) drops out too
  return {'mean_crit': float(np.mean(other_crit)), 'max_diff': float(diff.max()),
          'mean_diff': float(diff.mean()),
          'max_spread': float((diff[wide] / spread[wide]).max()) if wide.any() else np.nan,
          'mean_spread': float((diff[wide] / spread[wide]).mean()) if wide.any() else np.nan,
          'spearman': report.stats.spearman(crit, other_crit)}


def by_trial(rows) -> dict[int, dict[str, float]]:
  """{trial: {layer: criticality}} of one run's rows."""
  found = {}
  for row in rows:
    if row['layer'] != 'original':
      found.setdefault(row['trial'], {})[row['layer']] = row['criticality']
  return found


def yardsticks(rows) -> tuple[float, float]:
  """Of one run's rows: the half-width of the 95% interval over trials of the model-level mean,
  and Spearman's rho between the layer profiles of trial 0 and trial 1 (NaN with one trial)."""
  trials = by_trial(rows)
  _, spread = report.stats.interval([np.mean(list(t.values())) for t in trials.values()])
  if len(trials) < 2:
    return spread, float('nan')
  layers = list(trials[0])
  return spread, report.stats.spearman([trials[0][l] for l in layers],
                                       [trials[1][l] for l in layers])


def benchmark(workdir: str) -> None:
  """Runs every setting into `workdir` and prints the table."""
  names = [s.strip() for s in _SETTINGS.value if s.strip()]
  unknown = [s for s in names if s not in SETTINGS]
  if unknown:
    raise errors.unknown('setting', unknown[0], SETTINGS, error=app.UsageError)
  if not names:
    raise app.UsageError(f'--settings is empty: give one or more of {", ".join(SETTINGS)}')
  config = _CONFIG.value
  config.progress = False
  if not config.compilation_cache_dir:
    config.compilation_cache_dir = 'none'  # every setting pays its own compiles
  if _RANDOM_ARCH.value:
    checkpoint = os.path.join(workdir, f'{_RANDOM_ARCH.value}.pth')
    if not os.path.exists(checkpoint):
      print(f'drawing a calibrated random {_RANDOM_ARCH.value} into {checkpoint}',
            file=sys.stderr, flush=True)
      _shared.make_checkpoint(checkpoint, _RANDOM_ARCH.value, seed=0,
                              image_size=config.data.crop_size)
    config.model.checkpoint, config.model.arch = checkpoint, _RANDOM_ARCH.value
  settings = lc_config.check(config)
  _, _, info = data.load(settings.data, cache_dir=settings.cache_dir or None)

  runs = {}
  for name in names:
    config.matmul_precision, config.precision, _ = SETTINGS[name]
    folder = os.path.join(workdir, name)
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run, not a resumed one
    print(f'running {name} into {folder}', file=sys.stderr, flush=True)
    timings = {}
    rows = experiment.run(config, folder, timings)
    runs[name] = (rows, timings)

  reference_rows = runs[names[0]][0]
  reference = layer_profile(reference_rows)
  layers, _, spread = reference
  print(f'{reference_rows[0]["model_id"]}: {settings.reset.mode} resets of {len(layers)} layers, '
        f'{settings.num_trials} trials, {info.num_images} images, batch '
        f'{settings.data.batch_size}; jax {_shared.version("jax")} on '
        f'{jax_device()}; differences against {SETTINGS[names[0]][2]}')
  header = (f'  {"setting":38s} {"mean crit %":>11s} {"max|d| pp":>9s} {"mean|d| pp":>10s} '
            f'{"max|d|/sp":>9s} {"mean|d|/sp":>10s} {"spearman":>8s} {"wall s":>7s} '
            f'{"compile s":>9s} {"compute s":>9s}')
  print(header)
  for name in names:
    rows, timings = runs[name]
    c = compare(reference, layer_profile(rows))
    print(f'  {SETTINGS[name][2]:38s} {100 * c["mean_crit"]:11.3f} {100 * c["max_diff"]:9.3f} '
          f'{100 * c["mean_diff"]:10.3f} {c["max_spread"]:9.3f} {c["mean_spread"]:10.3f} '
          f'{c["spearman"]:8.4f} {timings["wall"]:7.1f} {timings["compile"]:9.1f} '
          f'{timings["compute"]:9.1f}')
  wide = spread > SPREAD_FLOOR
  print(f'  pp: percentage points of criticality, per layer (mean over trials); sp: the '
        f'reference\'s trial spread (95% half-width over trials), over the {int(wide.sum())} '
        f'of {len(layers)} layers where it is above {100 * SPREAD_FLOOR:g} pp')
  mean_spread, agreement = yardsticks(reference_rows)
  print(f'  yardsticks, of the reference: median trial spread of a layer '
        f'{100 * np.median(spread[wide]) if wide.any() else float("nan"):.3f} pp; trial spread '
        f'of the model-level mean {100 * mean_spread:.3f} pp; spearman of trial 0 against trial '
        f'1 {agreement:.4f}')


def jax_device() -> str:
  """This process's devices, as '1 x cpu'."""
  import jax  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  return f'{len(devices)} x {devices[0].device_kind}'


@errors.exits_cleanly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  _shared.in_workdir(benchmark, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=launch.parse_flags)
