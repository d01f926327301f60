"""One engine, two faces: your own Flax model through run.py (`--config.model.factory`) with
run.py's durability, and `lc_jax.criticality` on the same model with a workdir; both give the
same rows.

The models are tests/factory_models.py's small CNNs (linen and NNX), on the 7 bundled photos at
32 px. The runs are killed for real (SIGKILL while frozen once partial sums are on disk,
tests/processes.py) and resumed; the API's own interrupted run is stopped by an exception
right after it saved a batch's sums.
"""

import csv
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import processes
import run_config
import factory_models
import lc_jax
from lc_jax import config as lc_config
from lc_jax import data
from lc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')
TRIALS = 4
MEASURED = ('top1_acc', 'top5_acc', 'loss', 'criticality', 'pred_agreement', 'recovered_acc',
            'pred_cos_sim', 'pred_l1_err', 'pred_l2_err', 'pred_kl_div')


def _args(workdir, cache, factory, *extra):
  """run.py's command for `factory` (a function of tests/factory_models.py): one image a batch
  (7 batches, so partial sums are saved between them), every conv, linear and BatchNorm."""
  return [sys.executable, 'run.py', '--config=configs/demo.py', f'--workdir={workdir}',
          '--config.model.checkpoint=', '--config.model.arch=',
          f'--config.model.factory=factory_models:{factory}', '--config.data.resize_size=36',
          '--config.data.crop_size=32', '--config.data.batch_size=1',
          '--config.reset.layer_types=conv,linear,batchnorm', f'--config.trials={TRIALS}',
          '--config.keep_per_image=true', f'--config.cache_dir={cache}', *extra]


def _env():
  return {**os.environ, 'PYTHONPATH': os.pathsep.join(
      [TESTS] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p])}


def _rows(workdir):
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    return list(csv.DictReader(f))


def _model(factory):
  made = getattr(factory_models, factory)()
  return made if isinstance(made, tuple) else (made, None)


def _images(cache):
  """The run's images and labels, as run.py loads them (from its image cache)."""
  config, _ = run_config.of(_args('unused', cache, 'linen_cnn'))
  images, labels, _ = data.load(lc_config.check(config).data, cache_dir=str(cache),
                                progress=False)
  return images, labels


def _same(ours, theirs, what):
  """Rows of two runs equal within 1e-6 in every measured column, (layer, trial) by (layer,
  trial)."""
  ours = {(r['layer'], int(r['trial'])): r for r in ours}
  theirs = {(r['layer'], int(r['trial'])): r for r in theirs}
  assert set(ours) == set(theirs), what
  worst = 0.0
  for key, row in ours.items():
    for column in MEASURED:
      a, b = (float('nan') if v in ('', None) else float(v)
              for v in (row[column], theirs[key][column]))
      if not (np.isnan(a) and np.isnan(b)):
        worst = max(worst, abs(a - b))
  print(f'{what}: {len(ours)} rows, largest difference {worst:.3g}')
  assert worst <= 1e-6, what


@pytest.mark.parametrize('factory', ['linen_cnn', 'nnx_cnn'])
def test_own_model_through_run_py_resumes_and_equals_the_api(factory, tmp_path):
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  process = subprocess.Popen(_args(workdir, cache, factory), cwd=ROOT, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  assert processes.freeze_when(lambda: (workdir / 'partial.json').exists(), process), (
      'the run ended before it saved partial sums: ' + process.communicate()[1][-2000:])
  processes.signal_frozen(process, signal.SIGKILL)
  process.communicate()
  assert process.returncode == -signal.SIGKILL
  assert _rows(workdir) == []  # rows are written after the last batch

  resumed = subprocess.run(_args(workdir, cache, factory), cwd=ROOT, env=_env(),
                           capture_output=True, text=True, check=False)
  assert resumed.returncode == 0, resumed.stderr
  assert 'resuming: 0 of ' in resumed.stderr and ' batches of the others done' in resumed.stderr
  rows = _rows(workdir)
  assert rows[0]['layer'] == 'original' and rows[0]['model_id'] == factory
  assert {r['layer'] for r in rows[1:]} == {'conv1', 'bn1', 'conv2', 'bn2', 'head'}
  assert len(rows) == 1 + 5 * TRIALS
  assert not (workdir / 'partial.json').exists()

  module, variables = _model(factory)
  images, labels = _images(cache)
  api = lc_jax.criticality(module, variables, images, labels, layers='conv,linear,batchnorm',
                           trials=TRIALS, key=jax.random.key(0), batch_size=1,
                           keep_per_image=True)
  _same(rows, api.rows, f'{factory}: run.py resumed against lc_jax.criticality')
  # Each image's criticality, kept through the kill (the batches before it from
  # per_image.partial/), equals the API's.
  with np.load(workdir / 'per_image.npz') as kept:
    assert sorted(kept.files) == sorted(f'{t}/{n}' for t, n in api.per_image)
    for (trial, name), values in api.per_image.items():
      np.testing.assert_allclose(kept[f'{trial}/{name}'], values, rtol=0, atol=1e-6)
      assert len(values) == len(images)
  assert not (workdir / 'per_image.partial').exists()
  # Every reset moved the predictions: the rows measure something.
  assert all(float(r['criticality']) > 0 for r in rows[1:])


def test_the_api_with_a_workdir_resumes_to_the_same_rows(tmp_path, monkeypatch):
  module, variables = _model('linen_cnn')
  images = np.random.RandomState(0).randint(0, 256, (5, 32, 32, 3)).astype(np.uint8)
  labels = np.arange(5)
  settings = dict(layers='conv,linear', trials=2, key=jax.random.key(3), batch_size=2)
  whole = lc_jax.criticality(module, variables, images, labels, **settings)

  with processes.stopping_after(monkeypatch, 2):
    lc_jax.criticality(module, variables, images, labels, workdir=str(tmp_path), **settings)
  assert (tmp_path / 'partial.json').exists() and _rows(tmp_path) == []

  resumed = lc_jax.criticality(module, variables, images, labels, workdir=str(tmp_path),
                               progress=True, **settings)
  assert [(r['layer'], r['trial']) for r in resumed.rows] == [
      (r['layer'], r['trial']) for r in whole.rows]
  _same(resumed.rows, whole.rows, 'the API resumed against the API whole')
  assert len(_rows(tmp_path)) == len(whole.rows) and (tmp_path / 'run.json').exists()
  # Run again on the finished workdir: nothing is computed, the same rows come back.
  again = lc_jax.criticality(module, variables, images, labels, workdir=str(tmp_path),
                             **settings)
  _same(again.rows, whole.rows, 'the finished workdir read back')
  # Other weights on that workdir are another run: refused, the rows kept.
  other = jax.tree.map(lambda v: v * 2, variables)
  with pytest.raises(UserError, match='holds a run of another'):
    lc_jax.criticality(module, other, images, labels, workdir=str(tmp_path), **settings)
  with pytest.raises(UserError, match='needs the images as one array'):
    lc_jax.criticality(module, variables, iter([images]), workdir=str(tmp_path / 'x'))


@pytest.mark.parametrize('extra, message', [
    (['--config.model.checkpoint=bundled:efficientnet_lite0'],
     'model.factory and model.checkpoint (with model.arch) exclude each other'),
    (['--config.model.factory=factory_models'], 'is not package.module:function'),
    (['--config.model.factory=no_such_module:f'], 'cannot import no_such_module'),
    (['--config.model.factory=factory_models:missing'], 'has no function missing'),
    (['--config.model.factory=factory_models:not_a_model'], 'returned a str'),
    (['--config.model.factory=factory_models:raising'],
     "model.factory='factory_models:raising' raised RuntimeError calling it: kaboom"),
    (['--config.reset.mode=checkpoint', '--config.reset.init_checkpoint=x.pth'],
     'needs model.checkpoint, not model.factory'),
    (['--config.precision=bfloat16'], 'needs a registered architecture'),
])
def test_a_bad_factory_is_one_error_before_any_row(extra, message, tmp_path, monkeypatch):
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  monkeypatch.syspath_prepend(TESTS)
  config, _ = run_config.of(_args('unused', tmp_path / 'cache', 'linen_cnn', *extra))
  with pytest.raises(UserError, match=re.escape(message)) as raised:
    experiment.run(config, str(tmp_path / 'run'))
  assert '\n' not in str(raised.value)
  assert not (tmp_path / 'run').exists()  # nothing left behind: no lock, no converted model


def test_per_image_values_are_not_promised_for_rows_measured_without_them(tmp_path,
                                                                           monkeypatch):
  # A finished workdir run again with keep_per_image, and one whose first rows were measured
  # without it: refused in one line, the rows and files as they were (a finished row is not
  # measured again, so its values could never be written).
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  monkeypatch.syspath_prepend(TESTS)
  plain, _ = run_config.of(_args('unused', tmp_path / 'cache', 'linen_cnn', '--quiet',
                                 '--config.keep_per_image=false'))
  kept, _ = run_config.of(_args('unused', tmp_path / 'cache', 'linen_cnn', '--quiet',
                                '--config.keep_per_image=true'))
  experiment.run(plain, str(tmp_path / 'run'))
  rows = (tmp_path / 'run' / 'results.csv').read_bytes()
  with pytest.raises(UserError, match=r'keep_per_image: (\d+) of the \1 rows in results.csv were '
                                      r'measured without their per-image values'):
    experiment.run(kept, str(tmp_path / 'run'))
  assert (tmp_path / 'run' / 'results.csv').read_bytes() == rows
  assert not (tmp_path / 'run' / 'per_image.npz').exists()
  # Rows measured with it resume with it, as test_per_image_values_resume_bit_identical shows.
  experiment.run(kept, str(tmp_path / 'kept'))
  experiment.run(kept, str(tmp_path / 'kept'))


def test_per_image_values_resume_bit_identical(tmp_path, monkeypatch):
  # In this process: a run stopped right after it saved its second batch, resumed, keeps the
  # very per-image values (and rows) of an uninterrupted run.
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  monkeypatch.syspath_prepend(TESTS)
  config, _ = run_config.of(_args('unused', tmp_path / 'cache', 'linen_cnn', '--quiet'))
  experiment.run(config, str(tmp_path / 'full'))

  with processes.stopping_after(monkeypatch, 2):
    experiment.run(config, str(tmp_path / 'stopped'))
  assert sorted(os.listdir(tmp_path / 'stopped' / 'per_image.partial')) == [
      '000000.npz', '000001.npz']
  experiment.run(config, str(tmp_path / 'stopped'))
  assert ((tmp_path / 'stopped' / 'results.csv').read_bytes()
          == (tmp_path / 'full' / 'results.csv').read_bytes())
  with np.load(tmp_path / 'full' / 'per_image.npz') as full, \
       np.load(tmp_path / 'stopped' / 'per_image.npz') as resumed:
    assert sorted(full.files) == sorted(resumed.files) and len(full.files) == 5 * TRIALS
    for key in full.files:
      assert full[key].dtype == np.float64 and len(full[key]) == 7
      np.testing.assert_array_equal(full[key], resumed[key])
