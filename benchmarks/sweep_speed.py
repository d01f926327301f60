r"""Where a sweep's time goes: N ResNet-50s of the zoo through `lc_jax.sweep`, each model's wall
time split into conversion, compile, image load and compute, and the paper's whole study
projected onto an accelerator.

    python benchmarks/sweep_speed.py --num_models=3 --num_images=500 --batch_size=500 --trials=1 \
      --layers='layer4.*,fc'
    python benchmarks/sweep_speed.py ... --peak_tflops=495 --accelerator='H100 SXM, TF32 dense'

Draws NUM_MODELS random ResNet-50s (the timm resnet50 with seeds 0, 1, ..., BatchNorm calibrated
on images of --image_size, benchmarks/_shared.make_checkpoint; kept in WORKDIR/checkpoints and
reused), registers them as the files of as many zoo models of the plain state_dict layout in a
zoo cache of their own (WORKDIR/zoo, made afresh: `lc_jax.checkpoints.add`), writes NUM_IMAGES
generated JPEGs (benchmarks/decode.py's), and runs `lc_jax.sweep.run` over them into
WORKDIR/sweep with the paper's protocol (configs/paper.py: conv + linear layers, fresh resets,
seed 0) at --batch_size and --trials, an empty image cache and an empty persistent compilation
cache: the first model decodes the images and compiles every program, the others read the
cache and reuse the programs. Only the sweep is timed, not the set-up.

Prints, per model and in total: the wall time of its run (lc_jax.experiment's phases:
conversion = hashing and converting the checkpoint; compile = XLA compiling; images = loading
them, decoded or from the cache; compute = evaluating the original and every reset, compiles
taken out; rest = the run's other work; ahead = the seconds its conversion took in the
background while the model before it computed, not part of its wall time), the device's busy
fraction (the run's measured `device_busy` / wall: the share of the wall time in which the
device had reset work unfinished, lc_jax.timing.Busy; a lower bound), the model FLOPs it executed (2 * MACs of every conv and linear,
counted on the timm model with forward hooks, padding rows included) against the protocol's
minimum (the original, and per reset the forward from the reset layer on, over the images), and
the executed FLOP/s while computing. Then the overhead (conversion + compile + images) of each
model after the first as a fraction of the first model's wall time, and the projected time of
the paper's study (51 ResNet-50s x 3 trials x 54 layers x 10,000 images, as this pipeline
executes it) on --accelerator at --peak_tflops: at the peak rate; at the peak rate while busy
the share of the time the models after the first were (the steady state of a long sweep, whose
first model's compile is a vanishing part), and the whole sweep's share beside it; and with the
later models' measured overheads added to compute at peak. --precision sets every run's
precision (float32, tf32, bfloat16).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from lc_jax import launch

launch.one_malloc_arena()  # as run.py: before JAX starts its threads

from absl import app
from absl import flags

from benchmarks import _shared
from lc_jax import config as lc_config
from lc_jax import errors
from lc_jax import schema
# pylint: enable=g-import-not-at-top,wrong-import-position

ARCH = 'resnet50'
PHASES = ('conversion', 'compile', 'images', 'compute')

_NUM_MODELS = flags.DEFINE_integer('num_models', 3, 'ResNet-50s in the sweep.')
_NUM_IMAGES = flags.DEFINE_integer('num_images', 32, 'JPEGs to generate and evaluate.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 500, 'data.batch_size (the paper: 500).')
_TRIALS = flags.DEFINE_integer('trials', 1, 'Trials of fresh resets per model (the paper: 3).')
_IMAGE_SIZE = flags.DEFINE_integer(
    'image_size', 224, 'data.crop_size; data.resize_size keeps the ratio 256/224.')
_LAYERS = flags.DEFINE_string('layers', '', 'reset.layers: a pattern of layers (empty: all 54).')
_PEAK_TFLOPS = flags.DEFINE_float(
    'peak_tflops', 67.0, "The accelerator's peak in TFLOP/s at the run's precision (67: an H100 "
    'SXM in float32 without tensor cores, which matmul precision highest asks for).')
_ACCELERATOR = flags.DEFINE_string('accelerator', 'H100 SXM, float32',
                                   'The name of the accelerator --peak_tflops describes.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Folder for everything; empty: a temporary one.')
_QUIET = flags.DEFINE_bool('quiet', False, "No progress lines from the sweep's runs.")
_PRECISION = flags.DEFINE_enum('precision', 'float32', ['float32', 'tf32', 'bfloat16'],
                               "The runs' precision (--config.precision).")


def zoo_ids(count: int) -> list[str]:
  """`count` zoo models of one file in the plain state_dict layout whose sha256 is not pinned
  (so a file of ours can stand for theirs)."""
  from lc_jax import zoo  # pylint: disable=g-import-not-at-top
  ids = [i for i in zoo.ids() if zoo.get(i).recipe == 'state_dict'
         and len(zoo.get(i).sources) == 1 and not zoo.get(i).sources[0].sha256]
  if count > len(ids):
    raise app.UsageError(f'--num_models={count}: the zoo has {len(ids)} models a random '
                         'checkpoint can stand for')
  return ids[:count]


def set_up(workdir: str, ids: list[str]) -> str:
  """Checkpoints, zoo cache and images in `workdir`; returns the images' folder."""
  from lc_jax import checkpoints  # pylint: disable=g-import-not-at-top
  size = _IMAGE_SIZE.value
  os.environ['LC_JAX_ZOO_DIR'] = zoo_dir = os.path.join(workdir, 'zoo')
  shutil.rmtree(zoo_dir, ignore_errors=True)  # no conversion kept from an earlier run
  os.makedirs(os.path.join(workdir, 'checkpoints'), exist_ok=True)
  for seed, model_id in enumerate(ids):
    path = os.path.join(workdir, 'checkpoints', f'{ARCH}_seed{seed}_{size}px.pth')
    if not os.path.exists(path):
      _shared.make_checkpoint(path, ARCH, seed=seed, image_size=size)
    checkpoints.add(model_id, [path])
  images = os.path.join(workdir, 'images')
  shutil.rmtree(images, ignore_errors=True)
  _shared.make_images(images, _NUM_IMAGES.value)
  return images


def sweep_config(workdir: str, images: str):
  """The paper's protocol at this benchmark's sizes, with empty caches."""
  config = lc_config.default()
  config.data.source = 'imagefolder'
  config.data.path = images
  config.data.num_images = _NUM_IMAGES.value
  config.data.batch_size = _BATCH_SIZE.value
  config.data.crop_size = _IMAGE_SIZE.value
  config.data.resize_size = round(_IMAGE_SIZE.value * 256 / 224)
  config.reset.layers = _LAYERS.value
  config.trials = _TRIALS.value
  config.precision = _PRECISION.value
  config.progress = not _QUIET.value
  config.cache_dir = os.path.join(workdir, 'image_cache')
  config.compilation_cache_dir = os.path.join(workdir, 'compilation_cache')
  for folder in (config.cache_dir, config.compilation_cache_dir):
    shutil.rmtree(folder, ignore_errors=True)
  return config


def benchmark(workdir: str) -> None:
  """Sets up, runs the sweep in `workdir` and prints the figures."""
  import jax  # pylint: disable=g-import-not-at-top
  from lc_jax import sweep  # pylint: disable=g-import-not-at-top
  from lc_jax import zoo  # pylint: disable=g-import-not-at-top

  ids = zoo_ids(_NUM_MODELS.value)
  images = set_up(workdir, ids)
  config = sweep_config(workdir, images)
  out = os.path.join(workdir, 'sweep')
  shutil.rmtree(out, ignore_errors=True)
  timings = {}
  start = time.perf_counter()
  state = sweep.run(config, out, ids, timings)
  total_wall = time.perf_counter() - start
  if state['failed']:
    raise RuntimeError(f'the sweep failed: {state["failed"]}')

  # ---------------------------------------------------------------- FLOPs ---------------------
  settings = lc_config.check(sweep.model_config(config, ids[0]))
  flops = _shared.layer_flops(ARCH, settings.data.crop_size)
  with open(os.path.join(out, ids[0], schema.RUN), encoding='utf-8') as f:
    run_info = json.load(f)
  targets, num_images = run_info['targets'], run_info['num_images']
  counted = _shared.run_flops(flops, settings.num_trials, targets)
  rows = -(-num_images // settings.data.batch_size) * settings.data.batch_size
  executed = counted['ours'] * rows  # padding rows are computed too
  minimum = counted['minimum'] * num_images

  devices = jax.devices()
  print(f'sweep of {len(ids)} {ARCH}s (random weights, seeds 0-{len(ids) - 1}): '
        f'{len(targets)} layers, {settings.num_trials} trial(s), {num_images} images at '
        f'{settings.data.crop_size} px, batch {settings.data.batch_size}; jax '
        f'{_shared.version("jax")} on {len(devices)} x {devices[0].device_kind}, '
        f'{len(os.sched_getaffinity(0))} CPU cores')
  print(f'  {"model":38s} {"wall s":>8s} ' + ' '.join(f'{p + " s":>12s}' for p in PHASES)
        + f' {"rest s":>7s} {"ahead s":>7s} {"busy %":>6s} {"GFLOP":>10s} {"x min":>5s}'
        f' {"GFLOP/s":>8s}')

  def line(name, t):
    rest = t['wall'] - sum(t[p] for p in PHASES)
    count = executed * t['models']
    print(f'  {name:38s} {t["wall"]:8.1f} ' + ' '.join(f'{t[p]:12.1f}' for p in PHASES)
          + f' {rest:7.1f} {t["converted_ahead"]:7.1f} {100 * t["device_busy"] / t["wall"]:6.1f}'
          f' {count / 1e9:10.1f} {count / (minimum * t["models"]):5.2f}'
          f' {count / t["compute"] / 1e9:8.1f}')

  for model_id in ids:
    timings[model_id].setdefault('converted_ahead', 0.0)  # the first model converts in front
  for k, model_id in enumerate(ids):
    line(f'{k + 1} {model_id}', {**timings[model_id], 'models': 1})
  total = {p: sum(timings[i][p] for i in ids)
           for p in (*PHASES, 'wall', 'converted_ahead', 'device_busy')}
  line('all models', {**total, 'models': len(ids)})
  print(f'  sweep wall time {total_wall:.1f} s (the models, and the checks and figures '
        f'around them); device busy {100 * total["device_busy"] / total_wall:.1f}%')

  first = timings[ids[0]]['wall']
  for k, model_id in enumerate(ids[1:], 2):
    overhead = sum(timings[model_id][p] for p in ('conversion', 'compile', 'images'))
    print(f'  overhead of model {k} (conversion + compile + images): {overhead:.2f} s = '
          f'{100 * overhead / first:.2f}% of the first model\'s wall time')

  # ---------------------------------------------------------------- the paper's study ---------
  protocol = lc_config.default()  # the paper's: 3 trials, 10,000 images at 224 px
  study_models, study_images = len(zoo.ids()), protocol.data.num_images
  full_flops = _shared.layer_flops(ARCH, protocol.data.crop_size)
  study = _shared.run_flops(full_flops, protocol.trials)
  study_flops = study['ours'] * study_images * study_models
  peak = _PEAK_TFLOPS.value * 1e12
  busy = max(total['device_busy'] / total_wall, 1e-9)
  later = ids[1:] or ids
  overhead = sum(timings[i][p] for i in later for p in ('conversion', 'compile', 'images')
                 ) / len(later)
  # The steady state: a study's models after the first compile nothing and read cached images,
  # so their busy share, not the first model's compile, is what 51 models at 10,000 images see.
  steady = max(sum(timings[i]['device_busy'] for i in later)
               / sum(timings[i]['wall'] for i in later), 1e-9)
  print(f'the paper\'s study: {study_models} {ARCH}s x {protocol.trials} trials x '
        f'{len(full_flops)} layers x {study_images} images at {protocol.data.crop_size} px: '
        f'{study_flops / 1e15:.0f} PFLOP executed ({study["ours"] / study["minimum"]:.2f}x the '
        f'minimum, {study["minimum"] * study_images * study_models / 1e15:.0f} PFLOP)')
  print(f'  on {_ACCELERATOR.value} at {_PEAK_TFLOPS.value:g} TFLOP/s: '
        f'{hours(study_flops / peak)} at the peak rate; {hours(study_flops / peak / steady)} at '
        f'the peak rate while busy {100 * steady:.1f}% of the time (the steady state: this '
        f'sweep\'s models after the first; {hours(study_flops / peak / busy)} at the whole '
        f'sweep\'s {100 * busy:.1f}%); {hours(study_flops / peak + study_models * overhead)} '
        f'with each model\'s overhead as measured here for models after the first '
        f'({overhead:.1f} s)')
  print(f'  on this machine at its measured rate while computing '
        f'({executed * len(ids) / total["compute"] / 1e9:.1f} GFLOP/s): '
        f'{hours(study_flops / (executed * len(ids) / total["compute"]) / steady)} at the '
        'steady busy fraction')


def hours(seconds: float) -> str:
  """`seconds` as hours (or minutes under one hour)."""
  return f'{seconds / 3600:.1f} h' if seconds >= 3600 else f'{seconds / 60:.1f} min'


@errors.exits_cleanly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  _shared.in_workdir(benchmark, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main, flags_parser=launch.parse_flags)
