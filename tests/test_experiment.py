"""The criticality run: metrics, resumable results after SIGKILL, refusals, bad input."""

import csv
import ctypes
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lc_jax import batches
from lc_jax import data
from lc_jax import engine
from lc_jax import metrics
from lc_jax import schema
from lc_jax.errors import UserError
from tests import devices

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import numpy_metrics  # pylint: disable=g-import-not-at-top
import processes  # pylint: disable=g-import-not-at-top
import run_config  # pylint: disable=g-import-not-at-top
from lc_jax import torch_reference as torch_models  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------ chunks


@pytest.mark.parametrize('batch_size,limit,devices,rows', [
    (500, 128, 1, 125), (500, 0, 1, 500), (4, 3, 1, 2), (7, 3, 1, 3), (4, 9, 1, 4), (5, 1, 1, 1),
    (500, 100, 8, 88), (500, 128, 8, 128), (4, 3, 8, 8), (12, 5, 2, 4)])
def test_chunks_are_even_and_padded_like_a_batch(batch_size, limit, devices, rows):
  assert batches.chunk_rows(batch_size, limit, devices) == rows
  x = np.arange(batch_size, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  mask = np.arange(batch_size) < batch_size - 1  # the batch's last row is padding already
  for labels in (None, np.arange(batch_size, dtype=np.int32)):
    chunks = batches.split((x, labels, mask), rows)
    assert len(chunks) == -(-batch_size // rows)
    assert {tuple(part.shape[0] for part in chunk) for chunk in chunks} == {(rows, rows, rows)}
    xs, ys, masks = (np.concatenate(parts) for parts in zip(*chunks))
    np.testing.assert_array_equal(xs[:batch_size], x)
    np.testing.assert_array_equal(masks[:batch_size], mask)
    np.testing.assert_array_equal(ys[:batch_size], -1 if labels is None else labels)
    assert not masks[batch_size:].any() and not xs[batch_size:].any()
    assert (ys[batch_size:] == -1).all()


def test_a_negative_chunk_size_is_refused_before_the_run():
  from lc_jax import config as lc_config  # pylint: disable=g-import-not-at-top
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  config = lc_config.default()
  config.model.checkpoint = 'bundled:efficientnet_lite0'
  config.chunk_size = -2
  with pytest.raises(UserError, match=r'chunk_size=-2: give a number of images, or 0'):
    experiment.check(config)
  config.chunk_size = 0
  experiment.check(config)


# ------------------------------------------------------------------------------------ metrics


def _metrics(ref, logits, labels=None, mask=None):
  mask = np.ones(len(ref), bool) if mask is None else mask
  y = np.full(len(ref), -1, np.int32) if labels is None else labels
  total = metrics.accumulate(None, metrics.per_image(
      jnp.asarray(ref), jnp.asarray(logits), jnp.asarray(y), jnp.asarray(mask)))
  return metrics.finalize(total, labels is not None)


def test_metrics_by_hand():
  # p uniform over 3 classes; q = softmax([ln 2, 0, 0]) = (1/2, 1/4, 1/4).
  got = _metrics(np.zeros((1, 3), np.float32), np.log(np.array([[2.0, 1.0, 1.0]], np.float32)),
                 labels=np.array([1], np.int32))
  cos = (1 / 3) / (math.sqrt(1 / 3) * math.sqrt(1 / 4 + 2 / 16))
  assert got['pred_cos_sim'] == pytest.approx(cos, abs=1e-6)
  assert got['criticality'] == pytest.approx(1 - cos, abs=1e-6)
  assert got['pred_l1_err'] == pytest.approx(1 / 3, abs=1e-6)
  assert got['pred_l2_err'] == pytest.approx(math.sqrt(1 / 36 + 2 / 144), abs=1e-6)
  assert got['pred_kl_div'] == pytest.approx((math.log(2 / 3) + 2 * math.log(4 / 3)) / 3, abs=1e-6)
  assert got['pred_agreement'] == 1.0  # argmax of uniform p is class 0, as q's
  assert got['top1_acc'] == 0.0 and got['top5_acc'] == 100.0
  assert got['loss'] == pytest.approx(math.log(4), abs=1e-6)


def test_tied_logits_rank_like_argmax():
  # A zeroed classifier scores every class equally: only the first class counts as predicted.
  got = _metrics(np.zeros((2, 10), np.float32), np.zeros((2, 10), np.float32),
                 labels=np.array([0, 7], np.int32))
  assert got['top1_acc'] == 50.0 and got['top5_acc'] == 50.0


def test_top5_counts_each_rank_from_first_to_fifth():
  # Logits 9, 8, ..., 0: the label at rank k (0-based) is in the top 5 for k < 5 only.
  logits = np.tile(np.arange(9, -1, -1, dtype=np.float32), (10, 1))
  got = _metrics(logits, logits, labels=np.arange(10, dtype=np.int32))
  assert got['top1_acc'] == 10.0 and got['top5_acc'] == 50.0


def test_metrics_match_numpy_and_ignore_masked_rows():
  rng = np.random.RandomState(0)
  ref = rng.randn(12, 50).astype(np.float32) * 3
  logits = ref + rng.randn(12, 50).astype(np.float32) * 2
  labels = rng.randint(0, 50, 12).astype(np.int32)
  mask = np.arange(12) < 9
  junk = logits.copy()
  junk[9:] = 0
  junk[np.arange(9, 12), labels[9:]] = 1e4  # padding rows, right if they counted
  want = numpy_metrics.numpy_reference(ref[:9], logits[:9], labels[:9])
  padded = labels.copy()
  padded[9:] = -1  # as lc_jax.batches.pad_batch pads: wrong if they counted
  for padding_labels in (labels, padded):
    got = _metrics(ref, junk, padding_labels, mask)
    for key, value in want.items():
      assert got[key] == pytest.approx(value, abs=1e-5), key
  assert _metrics(ref, ref)['pred_kl_div'] == pytest.approx(0, abs=1e-6)
  assert math.isnan(_metrics(ref, logits)['top1_acc'])


def test_tiny_criticality_keeps_its_precision():
  # Against itself: exactly 0. Logits moved by ~2e-4: criticality ~1e-8, far below float32's
  # resolution near cos = 1 (6e-8), still within 1% of the float64 value.
  rng = np.random.RandomState(1)
  ref = rng.randn(16, 1000).astype(np.float32) * 2
  assert _metrics(ref, ref)['criticality'] == 0.0
  assert _metrics(ref, ref)['criticality_ci_images'] == 0.0
  nudged = ref + rng.randn(16, 1000).astype(np.float32) * 2e-4
  want = numpy_metrics.numpy_reference(ref, nudged, None)['criticality']
  got = _metrics(ref, nudged)['criticality']
  p, q = jax.nn.softmax(jnp.asarray(ref)), jax.nn.softmax(jnp.asarray(nudged))
  cos = jnp.sum(p * q, -1) / (jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(q, axis=-1))
  plain = float(np.mean(1 - np.asarray(cos, np.float64)))  # 1 - cos in float32, per image
  print(f'criticality {got:.4g}, float64 {want:.4g}: relative error {abs(got / want - 1):.2g} '
        f'(1 - cos in float32: {plain:.2g})')
  assert 1e-10 < want < 1e-7 and got == pytest.approx(want, rel=1e-2)


def test_sums_keep_a_small_spread_under_a_large_mean():
  # 4096 images of criticality 0.3 +- 1e-4: the variance (1e-8) is what is left of the sum of
  # squares (about 369) once n * mean^2 is taken off. Summed in float64 the interval is within
  # 6e-11 of numpy's (relative) and the mean exact; summed in float32 they are off by 6% and 2e-9.
  rng = np.random.RandomState(3)
  crit = (0.3 + 1e-4 * rng.randn(4096)).astype(np.float32)
  values = {k: jnp.zeros(len(crit), jnp.float32) for k in metrics.SUMS if k != 'crit_sq'}
  values.update(count=jnp.ones(len(crit), jnp.float32), crit=jnp.asarray(crit))
  got = metrics.finalize(metrics.accumulate(None, values), has_labels=False)
  exact = crit.astype(np.float64)
  want = 1.96 * exact.std(ddof=1) / math.sqrt(len(exact))
  print(f'interval off by {abs(got["criticality_ci_images"] / want - 1):.2g}, mean off by '
        f'{abs(got["criticality"] / exact.mean() - 1):.2g} (relative)')
  assert got['criticality_ci_images'] == pytest.approx(want, rel=1e-8)
  assert got['criticality'] == pytest.approx(exact.mean(), rel=1e-12)


# ------------------------------------------------------------------------------------ the run


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """A timm ResNet-18 with calibrated BatchNorm, saved as a torch checkpoint."""
  images = np.random.RandomState(0).rand(4, 64, 64, 3).astype(np.float32)
  torch.manual_seed(0)
  model = torch_models.calibrated(timm.create_model('resnet18'), images)
  path = tmp_path_factory.mktemp('ckpt') / 'resnet18.pth'
  torch.save(model.state_dict(), path)
  return str(path)


# Images of 32 px: what is tested needs no more (ResNet-18 runs the same blocks, down to 1x1 in
# layer4), and XLA's CPU convolutions take a quarter of the time they take at 64 px.
SMALL = ('--config.data.resize_size=36', '--config.data.crop_size=32')


def _run_args(checkpoint, workdir, cache, *extra):
  return [sys.executable, 'run.py', '--config=configs/demo.py', f'--workdir={workdir}',
          f'--config.model.checkpoint={checkpoint}', '--config.model.arch=resnet18', *SMALL,
          '--config.data.batch_size=4', '--config.reset.layer_types=conv,linear',
          '--config.trials=2', f'--config.cache_dir={cache}', *extra]


def _run(*args):
  return subprocess.run(list(args), cwd=ROOT, capture_output=True, text=True, check=False)


def _config(checkpoint, cache, *extra):
  """The config of `python run.py *_run_args(checkpoint, ..., cache, *extra)`, for a run in
  this process (tests/run_config.py)."""
  return run_config.of(_run_args(checkpoint, 'unused', cache, *extra))[0]


def _run_here(config, workdir):
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  return experiment.run(config, str(workdir))


def _rows(workdir):
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def uninterrupted(checkpoint, tmp_path_factory):
  """(workdir, cache) of the run the killed ones are compared with, run in this process (its
  results.csv is what run.py writes: a resumed run.py run must give it byte for byte)."""
  root = tmp_path_factory.mktemp('uninterrupted')
  _run_here(_config(checkpoint, root / 'cache'), root / 'full')
  rows = _rows(root / 'full')
  assert len(rows) == 1 + 2 * 21  # the original, then 2 trials of ResNet-18's 21 conv + fc
  assert rows[0]['layer'] == 'original' and rows[1]['layer'] == 'conv1'
  assert {r['num_images'] for r in rows} == {'7'}  # 7 photos in batches of 4: one pad row
  assert os.path.isfile(root / 'full' / 'run.json')
  return root / 'full', root / 'cache'


@pytest.mark.parametrize('number', [signal.SIGKILL, signal.SIGTERM], ids=['kill-9', 'sigterm'])
def test_killed_run_resumes_to_the_same_results(checkpoint, uninterrupted, tmp_path, number):
  # SIGTERM has no handler: it ends the run where it is, as kill -9 does.
  full, cache = uninterrupted
  killed = tmp_path / 'killed'
  process = subprocess.Popen(_run_args(checkpoint, killed, cache, '--config.verbose=true'),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
  # The verbose line of its 4th reset row, then frozen while its rows are counted: the signal
  # comes after what was counted, however fast the run goes on.
  for line in process.stderr:
    finished = re.search(r'\[\s*(\d+)/42\] ', line)
    if finished and int(finished[1]) >= 4:
      break
  assert processes.freeze(process), 'the run ended before its 4th reset'
  done_before = len(_rows(killed))
  processes.signal_frozen(process, number)
  process.communicate()
  assert process.returncode == -number
  print(f'killed by {signal.Signals(number).name} after {done_before} of 43 rows')
  assert 5 <= done_before < 43

  resumed = _run(*_run_args(checkpoint, killed, cache))
  assert resumed.returncode == 0, resumed.stderr
  assert f'resuming: {done_before - 1} of 42 resets already in results.csv' in resumed.stderr
  assert (killed / 'results.csv').read_bytes() == (full / 'results.csv').read_bytes()
  for name in ('run.json', 'criticality.png'):  # what run.py leaves besides results.csv
    assert os.path.isfile(killed / name), name


def test_mismatched_workdir_is_refused_and_bad_input_loses_nothing(checkpoint, tmp_path, capfd):
  from lc_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  cache = tmp_path / 'cache'
  workdir = tmp_path / 'run'
  _run_here(_config(checkpoint, cache, '--config.reset.layers=layer1.*'), workdir)
  before = (workdir / 'results.csv').read_bytes()

  cases = [
      ('other config', ['--config.reset.layers=layer1.*', '--config.seed=1'],
       'holds a run of another configuration (config.seed: 0 -> 1'),
      ('unknown layer', ['--config.reset.layers=layer1.0.conv9'],
       "unknown layer 'layer1.0.conv9' (did you mean layer1.0.conv"),
      ('checkpoint does not fit', ['--config.model.arch=resnet50'],
       'holds resnet18 weights, not resnet50'),
      ('unreadable data path', ['--config.reset.layers=layer1.*',
                                '--config.data.source=imagefolder',
                                f'--config.data.path={tmp_path / "nowhere"}'], 'nowhere'),
  ]
  # Each case runs in this process, with run.py's config of those flags (tests/run_config.py):
  # one UserError of one line, which run.py prints as its last line, `error: ...`, with exit
  # status 1 (checked below on one case through run.py itself).
  for index, (name, extra, fragment) in enumerate(cases):
    # Bad input on the finished workdir is refused before anything is touched; on a new
    # workdir it fails with its own message and writes no results.
    elsewhere = tmp_path / f'new{index}'
    places = [(workdir, 'holds a run of another configuration')]
    if name != 'other config':  # a new config on a new workdir is just a new run
      places.append((elsewhere, fragment))
    for target, expected in places:
      with pytest.raises(UserError) as raised:
        _run_here(_config(checkpoint, cache, *extra), target)
      message = str(raised.value)
      print(f'{name} in {target.name}: {message}')
      assert '\n' not in message and expected in message, (name, message)
    assert (workdir / 'results.csv').read_bytes() == before, f'{name}: results kept'
    assert not (elsewhere / 'results.csv').exists(), name

  result = _run(*_run_args(checkpoint, tmp_path / 'new1', cache,
                           '--config.reset.layers=layer1.0.conv9'))
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert lines[-1].startswith('error: ') and cases[1][2] in lines[-1], lines[-1:]
  assert not (tmp_path / 'new1').exists()

  capfd.readouterr()
  _run_here(_config(checkpoint, cache, '--config.reset.layers=layer1.*', '--quiet'), workdir)
  assert 'images/s' not in capfd.readouterr().err
  assert (workdir / 'results.csv').read_bytes() == before, 'a finished run recomputes nothing'


@pytest.mark.parametrize('mode,extra,rows,moved', [
    ('zero', {}, 21, True),
    ('checkpoint', {'init_checkpoint': 'SELF'}, 21, False),  # reset to itself: nothing moves
    ('interpolate', {'alpha': 1.0}, 2 * 21, False),  # alpha 1 keeps the trained weights
    ('skip', {'granularity': 'block'}, 8, True),
])
def test_every_reset_mode_runs(checkpoint, tmp_path, mode, extra, rows, moved):
  from lc_jax import config as lc_config  # pylint: disable=g-import-not-at-top
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  config = lc_config.default()
  config.model.checkpoint = checkpoint
  config.data.update(source='photos', num_images=0, order='sorted', batch_size=4,
                     resize_size=36, crop_size=32)
  config.reset.mode = mode
  config.reset.update({k: checkpoint if v == 'SELF' else v for k, v in extra.items()})
  config.trials, config.progress, config.cache_dir = 2, False, str(tmp_path / 'cache')
  result = [r for r in experiment.run(config, str(tmp_path / mode)) if r['layer'] != 'original']
  assert len(result) == rows  # deterministic modes run one trial
  criticality = max(r['criticality'] for r in result)
  print(f'{mode}: {len(result)} rows, largest criticality {criticality:.3g}')
  assert (criticality > 1e-3) if moved else (criticality < 1e-6)
  if mode == 'skip':
    assert [r['layer'] for r in result][:2] == ['layer1.0', 'layer1.1']


@pytest.fixture(scope='module')
def second_checkpoint(tmp_path_factory):
  """Another ResNet-18 (other weights, other BatchNorm statistics): a checkpoint to reset from."""
  images = np.random.RandomState(1).rand(4, 64, 64, 3).astype(np.float32)
  torch.manual_seed(1)
  model = torch_models.calibrated(timm.create_model('resnet18'), images, seed=1)
  path = tmp_path_factory.mktemp('ckpt2') / 'resnet18_epoch0.pth'
  torch.save(model.state_dict(), path)
  return str(path)


def _reset_config(checkpoint, tmp_path, mode, **reset):
  from lc_jax import config as lc_config  # pylint: disable=g-import-not-at-top
  config = lc_config.default()
  config.model.checkpoint = checkpoint
  config.data.update(source='photos', num_images=0, order='sorted', batch_size=4,
                     resize_size=36, crop_size=32)
  config.reset.update(mode=mode, layers='conv1,layer2.0.downsample.0,layer3.1.conv2,fc', **reset)
  config.trials, config.progress, config.cache_dir = 2, False, str(tmp_path / 'cache')
  return config


def _worst_difference(ours, theirs):
  """The largest metric difference of two runs' rows, relative for values above 1 (KL, loss)."""
  want = {(r['layer'], int(r['trial'])): r for r in theirs}
  got = {(r['layer'], int(r['trial'])): r for r in ours}
  assert got.keys() == want.keys()
  worst = 0.0
  for key, row in want.items():
    for column in schema.METRICS:
      if column in ('top1_acc', 'top5_acc', 'recovered_acc', 'loss'):  # photos carry no labels
        continue
      a, b = float(got[key][column]), float(row[column])
      worst = max(worst, abs(a - b) / max(1.0, abs(b)))
  return worst


def test_checkpoint_and_interpolate_resets_equal_timm(checkpoint, second_checkpoint, tmp_path):
  """Zhang et al.'s re-initialisation: a layer reset from a second checkpoint gives timm's
  numbers with that module loaded from the second checkpoint (torch.load, no conversion), and
  interpolation at alpha 0.3 gives timm's with the layer at 0.7 * fresh + 0.3 * trained."""
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  from converters import mapping  # pylint: disable=g-import-not-at-top
  trained = timm.create_model('resnet18')
  trained.load_state_dict(torch.load(checkpoint))
  trained.eval()
  mean, std = trained.pretrained_cfg['mean'], trained.pretrained_cfg['std']
  settings = experiment.check(_reset_config(checkpoint, tmp_path, 'checkpoint',
                                            init_checkpoint=second_checkpoint))
  images, _, info = data.load(settings.data, cache_dir=settings.cache_dir, progress=False)
  assert info.valid.all() and len(images) == 7
  names = settings.reset.layers.split(',')

  second = {k: v.numpy() for k, v in torch.load(second_checkpoint).items()}
  ours = experiment.run(settings, str(tmp_path / 'checkpoint'))
  theirs = torch_models.run_protocol(trained, [second], images, None, names, mean, std, 4)
  assert len(ours) == 1 + len(names)  # a checkpoint reset is deterministic: one trial
  moved = min(float(r['criticality']) for r in ours if r['layer'] != 'original')
  worst = _worst_difference(ours, theirs)
  print(f'checkpoint: smallest criticality {moved:.3g}, worst metric difference {worst:.2g}')
  assert moved > 1e-3, 'the second checkpoint moved every layer'
  assert worst <= 1e-5

  alpha = 0.3
  settings = experiment.check(_reset_config(checkpoint, tmp_path, 'interpolate', alpha=alpha))
  model = experiment.prepare_model(settings, str(tmp_path / 'model'))
  trained_state = {k: v.numpy() for k, v in trained.state_dict().items()}
  mixed = []
  for trial in range(2):  # the trial's fresh draw, mixed with the trained weights in numpy
    fresh = mapping.to_state_dict(experiment.reset_source(settings, model, trial))
    mixed.append({k: (1 - alpha) * fresh[k].astype(np.float64) + alpha * trained_state[k]
                  for k in fresh})
  mixed = [{k: v.astype(np.float32) for k, v in state.items()} for state in mixed]
  ours = experiment.run(settings, str(tmp_path / 'interpolate'))
  theirs = torch_models.run_protocol(trained, mixed, images, None, names, mean, std, 4)
  moved = min(float(r['criticality']) for r in ours if r['layer'] != 'original')
  worst = _worst_difference(ours, theirs)
  print(f'interpolate at {alpha}: smallest criticality {moved:.3g}, worst metric difference '
        f'{worst:.2g}')
  assert moved > 1e-4
  assert worst <= 1e-5


def _numbers(workdir):
  return {(r['layer'], r['trial']): np.array([float(r[c] or 'nan') for c in schema.METRICS])
          for r in _rows(workdir)}


# Runs on eight CPU devices need an interpreter of their own (the device count is fixed when
# jax starts): both of them in one, one after the other, on configs made here.
_EIGHT_DEVICES = """
import json, sys
import ml_collections
from lc_jax import experiment
for workdir, config in json.loads(sys.argv[1]):
  experiment.run(ml_collections.ConfigDict(config), workdir)
"""


def test_prefix_reuse_and_eight_devices_give_the_same_results(checkpoint, tmp_path, capsys):
  cache = tmp_path / 'cache'
  args = ('--config.reset.layers=conv1,layer1.*,layer4.1.*,fc', '--config.trials=1')
  _run_here(_config(checkpoint, cache, *args), tmp_path / 'reused')
  # Without prefix reuse every reset runs the whole network through the same compiled
  # segments: the very same file.
  _run_here(_config(checkpoint, cache, *args, '--config.reuse_prefix=false'), tmp_path / 'whole')
  assert ((tmp_path / 'whole' / 'results.csv').read_bytes()
          == (tmp_path / 'reused' / 'results.csv').read_bytes())
  # Over 8 devices, batches of 4 padded to 8 and sharded, or resets spread over 4 groups of 2
  # devices each; or on one device, each batch of 4 in chunks of 2 (chunk_size=3 splits it
  # evenly): equal within float32 rounding.
  eight = devices.cpu_devices(8)
  runs = [(str(tmp_path / name), _config(checkpoint, cache, *args, *extra).to_dict())
          for name, extra in (('sharded', ()), ('spread', ('--config.spread_resets=4',)))]
  result = subprocess.run([sys.executable, '-c', _EIGHT_DEVICES, json.dumps(runs)], cwd=ROOT,
                          env=eight, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  capsys.readouterr()
  _run_here(_config(checkpoint, cache, *args, '--config.chunk_size=3'), tmp_path / 'chunked')
  chunked = capsys.readouterr().err
  assert 'for a chunk of 2 (2 per batch of 4)' in chunked
  want = _numbers(tmp_path / 'reused')
  for name in ('sharded', 'spread', 'chunked'):
    got = _numbers(tmp_path / name)
    assert want.keys() == got.keys() and len(want) == 9
    # Within 1e-6; relative to the value for those above 1 (KL and loss, in nats, unbounded).
    difference = max(np.nanmax(np.abs(got[k] - want[k]) / np.maximum(1, np.abs(want[k])))
                     for k in want)
    print(f'{name} vs one device, whole batches: largest metric difference {difference:.2g}')
    assert difference <= 1e-6


def test_two_processes_give_the_single_process_results(checkpoint, tmp_path):
  """Two processes of two CPU devices each (as two hosts), a jax.distributed run: each decodes
  half of every batch, the first writes the workdir; the numbers are one process's."""
  cache = tmp_path / 'cache'
  args = ('--config.reset.layers=conv1,layer4.1.*,fc', '--config.trials=1', '--config.verbose=true')
  _run_here(_config(checkpoint, cache, *args), tmp_path / 'one')  # one process: this one
  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  env = devices.cpu_devices(2)

  def two(workdir, *extra):  # each host decodes its own part: a cache of their own
    processes = [subprocess.Popen(
        _run_args(checkpoint, workdir, tmp_path / 'cache_two', *args, *extra,
                  '--num_processes=2', f'--coordinator_address=localhost:{port}',
                  f'--process_id={index}'),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for index in range(2)]
    outputs = [process.communicate(timeout=600) for process in processes]
    return [process.returncode for process in processes], outputs

  # A checkpoint that does not fit fails on the process that converts it; the other one is
  # told so and stops too (no process is left waiting).
  codes, outputs = two(tmp_path / 'bad', '--config.model.arch=resnet50')
  assert codes == [1, 1]
  assert outputs[0][1].strip().splitlines()[-1].endswith('holds resnet18 weights, not resnet50; '
                                                         'convert it as resnet18 or leave the '
                                                         'architecture out')
  assert outputs[1][1].strip().splitlines()[-1] == (
      'error: process 0 failed while converting the checkpoint; its output says why')

  codes, outputs = two(tmp_path / 'two')
  assert codes == [0, 0], outputs
  assert sorted(os.listdir(tmp_path / 'cache_two')) == [
      f'{name}-host{index}of2-batch4.{ext}' for index in range(2) for ext in ('json', 'npy')
      for name in [os.listdir(tmp_path / 'cache')[0].rsplit('.', 1)[0]]]
  assert 'most critical' in outputs[0][0] and 'criticality' not in outputs[1][0]
  assert '[   4/4] trial 0 fc' in outputs[0][1] and 'trial 0' not in outputs[1][1]
  with open(tmp_path / 'two' / 'run.json') as f:
    assert json.load(f)['processes'] == 2
  want, got = _numbers(tmp_path / 'one'), _numbers(tmp_path / 'two')
  assert want.keys() == got.keys() and len(want) == 5
  difference = max(np.nanmax(np.abs(got[k] - want[k]) / np.maximum(1, np.abs(want[k])))
                   for k in want)
  print(f'2 processes x 2 devices vs 1 process: largest metric difference {difference:.2g}')
  assert difference <= 1e-6


def test_process_flags_need_a_coordinator(tmp_path):
  result = _run(sys.executable, 'run.py', '--num_processes=2', f'--workdir={tmp_path / "out"}')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      '--num_processes and --process_id need --coordinator_address or --distributed')
  assert not (tmp_path / 'out').exists()


def test_run_interrupted_between_batches_resumes_exactly(checkpoint, tmp_path, monkeypatch,
                                                         capsys):
  from lc_jax import config as lc_config  # pylint: disable=g-import-not-at-top
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  config = lc_config.default()
  config.model.checkpoint = checkpoint
  config.data.update(source='photos', num_images=0, order='sorted', batch_size=3,
                     resize_size=36, crop_size=32)  # 7 photos: 3 batches
  config.reset.layers = 'layer2.*,fc'
  config.trials, config.progress, config.cache_dir = 2, False, str(tmp_path / 'cache')
  full = experiment.run(config, str(tmp_path / 'full'))

  with processes.stopping_after(monkeypatch, 2):
    experiment.run(config, str(tmp_path / 'killed'))
  assert _rows(tmp_path / 'killed') == []  # rows are written after the last batch
  assert (tmp_path / 'killed' / 'partial.json').exists()

  # The resumed run takes up the sums of the two batches done and adds the third.
  config.progress = True
  resumed = experiment.run(config, str(tmp_path / 'killed'))
  err = capsys.readouterr().err
  assert 'resuming: 0 of 12 resets already in results.csv, 2 of 3 batches' in err
  assert re.search(r'image-resets/s  device busy +\d+%  ', err), err  # progress lines
  assert [r['layer'] for r in resumed] == [r['layer'] for r in full]
  assert ((tmp_path / 'killed' / 'results.csv').read_bytes()
          == (tmp_path / 'full' / 'results.csv').read_bytes())
  assert not (tmp_path / 'killed' / 'partial.json').exists()


def test_a_run_resumed_from_some_of_its_rows_measures_exactly_the_others(checkpoint, tmp_path,
                                                                         capsys):
  # A results.csv that holds a target's trial 0 without its trial 1, and another's trial 1
  # without its trial 0 (as a file repaired by hand leaves it): the resumed run appends exactly
  # the rows missing, each once, in the uninterrupted run's order, and rewrites none.
  from lc_jax import config as lc_config  # pylint: disable=g-import-not-at-top
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  config = lc_config.default()
  config.model.checkpoint = checkpoint
  config.data.update(source='photos', num_images=0, order='sorted', batch_size=4,
                     resize_size=36, crop_size=32)
  config.reset.layers = 'layer2.0.*,fc'
  config.trials, config.progress, config.cache_dir = 2, False, str(tmp_path / 'cache')
  experiment.run(config, str(tmp_path / 'full'))
  lines = (tmp_path / 'full' / 'results.csv').read_text().splitlines(keepends=True)
  rows = _rows(tmp_path / 'full')
  targets = list(dict.fromkeys(r['layer'] for r in rows[1:]))
  assert len(targets) == 4 and len(rows) == 1 + 2 * len(targets)
  keep = {('original', '0'), (targets[0], '0'), (targets[1], '1'), (targets[-1], '1')}
  kept = [lines[0]] + [line for line, r in zip(lines[1:], rows) if (r['layer'], r['trial']) in keep]
  shutil.copytree(tmp_path / 'full', tmp_path / 'resumed')
  (tmp_path / 'resumed' / 'results.csv').write_text(''.join(kept))

  config.progress = True
  experiment.run(config, str(tmp_path / 'resumed'))
  assert 'resuming: 3 of 8 resets already in results.csv' in capsys.readouterr().err
  missing = [line for line in lines[1:] if line not in kept]
  assert len(missing) == 5
  assert (tmp_path / 'resumed' / 'results.csv').read_text() == ''.join(kept + missing)


def test_one_ahead_makes_the_next_item_before_handing_out_one():
  """The pipelining of a run: the next batch's transfer, the next step's dispatch, start before
  the current one is used."""
  made = []

  def items():
    for k in range(3):
      made.append(k)
      yield k
  assert [(k, list(made)) for k in engine._one_ahead(items())] == [
      (0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]
  assert not list(engine._one_ahead([]))


_ARENAS = """
import sys
if sys.argv[1] == 'run':
  import run  # sets the arena limit first thing, as `python run.py` does
import ctypes, os, tempfile, threading
import numpy as np
arrays = []
def work():
  arrays.append(np.ones(50_000))  # a malloc on a thread of its own
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
path = tempfile.NamedTemporaryFile(delete=False).name
stream = libc.fopen(path.encode(), b'w')
libc.malloc_info(0, ctypes.c_void_p(stream))
libc.fclose(ctypes.c_void_p(stream))
print(open(path).read().count('<heap nr='))
os.remove(path)
"""


def test_run_keeps_malloc_to_one_arena():
  """run.py limits glibc to one malloc arena (lower peak memory under XLA); without it, the
  threads get arenas of their own. An explicit MALLOC_ARENA_MAX is left to glibc."""
  if not sys.platform.startswith('linux') or not hasattr(ctypes.CDLL(None), 'malloc_info'):
    pytest.skip('malloc is not glibc')
  env = {k: v for k, v in os.environ.items() if k != 'MALLOC_ARENA_MAX'}
  def arenas(mode, **extra):
    out = subprocess.run([sys.executable, '-c', _ARENAS, mode], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={**env, **extra})
    return int(out.stdout.split()[-1])
  assert arenas('run') == 1
  assert arenas('plain') > 1
  assert arenas('run', MALLOC_ARENA_MAX='8') > 1
