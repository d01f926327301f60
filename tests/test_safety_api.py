"""Nothing silently wrong (issue 27): lc_jax.criticality refuses bad input in one UserError before
any work, the report marks NaN rows and drops a line cut short, and crossval fails a model whose
compared tensors are not finite or all zeros on both sides."""

import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lc_jax
from lc_jax import models
from lc_jax import report
from lc_jax import schema
from lc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8


class TinyCNN(nn.Module):
  """Ten classes from a conv and a dense layer."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(nn.relu(nn.Conv(4, (3, 3))(x)).mean((1, 2)))


class DictOut(nn.Module):
  @nn.compact
  def __call__(self, x):
    return {'logits': nn.Dense(10)(x.mean((1, 2)))}


class ScalarOut(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(10)(x.mean((1, 2))).sum()


def _images(count=4, seed=0):
  return np.random.RandomState(seed).rand(count, SIZE, SIZE, 3).astype(np.float32)


@pytest.fixture(scope='module')
def tiny():
  module = TinyCNN()
  return module, module.init(jax.random.key(1), _images(1))


def _refused(tiny, match, images=None, labels=None, **kwargs):
  module, variables = tiny
  with pytest.raises(UserError, match=match):
    lc_jax.criticality(module, variables, _images() if images is None else images, labels,
                       **kwargs)


# ------------------------------------------------------------------ lc_jax.criticality --------

def test_criticality_int32_images(tiny):
  images = (_images() * 255).astype(np.int32)  # 0..255 as int32: read as is, criticality ~1
  _refused(tiny, 'int32', images)
  _refused(tiny, 'bool', images > 100)


def test_criticality_nan_images(tiny):
  for value in (np.nan, np.inf):
    images = _images()
    images[2, 1, 1, 0] = value
    _refused(tiny, r'NaN or inf.*image 2', images)


def test_criticality_float_images_outside_unit_range_on_a_registered_model():
  module = models.create('resnet18', num_classes=10)
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables)
  images = np.random.RandomState(0).rand(2, 32, 32, 3).astype(np.float32) * 255
  with pytest.raises(UserError, match=r'\[0, 1\]'):
    lc_jax.criticality(module, variables, images)


def test_criticality_label_out_of_range(tiny):
  _refused(tiny, r'label 10 .*10 classes', labels=np.array([0, 1, 10, 2]))
  _refused(tiny, r'label 999 .*10 classes', labels=np.array([0, 999, 1, 2]))


def test_criticality_negative_or_fractional_labels(tiny):
  _refused(tiny, 'labels must be integer', labels=np.array([0, 0.5, 1, 2]))
  _refused(tiny, '-1', labels=np.array([0, -1, 1, 2]))
  _refused(tiny, r'one class per image.*\(4, 1\)', labels=np.zeros((4, 1), int))


@pytest.mark.parametrize('trials', [0, -1, 1.5, True, '3'])
def test_criticality_bad_trials(tiny, trials):
  _refused(tiny, 'trials must be a positive integer', trials=trials)


def test_criticality_bad_batch_size(tiny):
  _refused(tiny, 'batch_size must be a positive integer', batch_size=1.5)


def test_criticality_nchw(tiny):
  images = _images().transpose(0, 3, 1, 2)  # (4, 3, 8, 8)
  _refused(tiny, r'\(4, 3, 8, 8\).*NHWC', images)


def test_criticality_rank3_images(tiny):
  _refused(tiny, r'shape \(4, 8, 8\).*\(N, H, W, C\)', _images()[..., 0])


def test_criticality_one_channel_images(tiny):
  _refused(tiny, r'does not run on images of shape \(4, 8, 8, 1\)', _images()[..., :1])


def test_criticality_one_channel_images_on_a_registered_model():
  # A registered model normalises by a 3-channel mean: one channel would broadcast silently.
  module = models.create('resnet18', num_classes=10)
  variables = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables)
  images = np.zeros((2, 32, 32, 1), np.uint8)
  with pytest.raises(UserError, match='1 channel.*takes 3'):
    lc_jax.criticality(module, variables, images)


def test_criticality_apply_returns_dict():
  module = DictOut()
  variables = module.init(jax.random.key(0), _images(1))
  with pytest.raises(UserError, match='returned a dict'):
    lc_jax.criticality(module, variables, _images(), layers='linear')


def test_criticality_apply_returns_scalar():
  module = ScalarOut()
  variables = module.init(jax.random.key(0), _images(1))
  with pytest.raises(UserError, match=r'\(N, classes\).*shape \(\)'):
    lc_jax.criticality(module, variables, _images(), layers='linear')


def test_criticality_empty_params(tiny):
  module, _ = tiny
  for variables in ({}, {'params': {}}, None):
    with pytest.raises(UserError, match='params'):
      lc_jax.criticality(module, variables, _images())


def test_criticality_not_a_model():
  with pytest.raises(UserError, match='flax.linen.Module'):
    lc_jax.criticality(object(), {}, _images())


def test_criticality_nan_weights(tiny):
  module, variables = tiny
  broken = jax.tree.map(lambda v: v, variables)
  broken['params']['Conv_0']['kernel'] = broken['params']['Conv_0']['kernel'].at[0].set(jnp.nan)
  with pytest.raises(UserError, match=r'params/Conv_0/kernel'):
    lc_jax.criticality(module, broken, _images())


class LogOut(nn.Module):
  """Finite weights, but logits that are NaN where a value falls below zero."""

  @nn.compact
  def __call__(self, x):
    return jnp.log(nn.Dense(10)(x.mean((1, 2))))


def test_criticality_nan_logits():
  module = LogOut()
  variables = module.init(jax.random.key(0), _images(1))
  with pytest.raises(UserError, match="own logits are not finite"):
    lc_jax.criticality(module, variables, _images(), layers='linear', trials=1)


def test_criticality_mismatched_pairs(tiny):
  module, variables = tiny
  pairs = [(_images(2), np.array([0, 1])), (_images(2, 1), np.array([0, 1, 2]))]
  with pytest.raises(UserError, match='batch 1: 3 labels for 2 images'):
    lc_jax.criticality(module, variables, iter(pairs))
  mixed = [(_images(2), np.array([0, 1])), _images(2, 1)]
  with pytest.raises(UserError, match='batch 1 has no labels'):
    lc_jax.criticality(module, variables, mixed)
  with pytest.raises(UserError, match='labels= goes with an array'):
    lc_jax.criticality(module, variables, [_images(2)], labels=np.array([0, 1]))
  triple = [(_images(2), np.array([0, 1]), 'x')]
  with pytest.raises(UserError, match=r'\(images, labels\) pair'):
    lc_jax.criticality(module, variables, triple)
  other = [_images(2), np.random.RandomState(1).rand(2, SIZE, SIZE, 1).astype(np.float32)]
  with pytest.raises(UserError, match='batch 1: images have 1 channel; the first batch has 3'):
    lc_jax.criticality(module, variables, other)


def test_criticality_good_input_still_runs(tiny):
  module, variables = tiny
  uint8 = (_images() * 255).astype(np.uint8)
  result = lc_jax.criticality(module, variables, uint8, labels=[0, 9, 3, 3], trials=1)
  assert [r['layer'] for r in result.rows] == [schema.ORIGINAL, 'Conv_0', 'Dense_0']
  assert all(r['model_id'] == 'model' for r in result.rows)
  pairs = [(_images(2), np.array([0, 1], np.int64)), (_images(2, 1), np.array([2, 3], np.uint8))]
  rows = lc_jax.criticality(module, variables, pairs, trials=1).rows
  assert rows[0]['num_images'] == 4 and rows[0]['top1_acc'] >= 0


def test_criticality_model_by_name_labels_rows():
  module = models.create('resnet18')
  variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  result = lc_jax.criticality('resnet18', variables, images, pattern='fc', trials=1)
  assert {r['model_id'] for r in result.rows} == {'resnet18'}
  assert [r['layer'] for r in result.rows] == [schema.ORIGINAL, 'fc']


# ------------------------------------------------------------------ the report ----------------

def _write(path, rows, cut=0):
  """A runner-format results.csv of `rows` (layer, trial, criticality); `cut` characters of the
  last line cut off, as a kill can leave it."""
  text = schema.header()
  for layer, trial, c in [(schema.ORIGINAL, 0, 0.0)] + rows:
    cos = 1 - c
    text += schema.format_row({
        'model_id': 'm', 'dataset': 'imagenet2012', 'layer': layer, 'trial': trial,
        'mode': 'none' if layer == schema.ORIGINAL else 'fresh', 'kind': 'conv', 'stage': 'stem',
        'num_params': 10, 'num_images': 8, 'top1_acc': 50.0, 'top5_acc': 90.0, 'loss': 1.0,
        'pred_cos_sim': cos, 'pred_l1_err': c, 'pred_l2_err': c, 'pred_kl_div': c,
        'pred_agreement': 1.0, 'recovered_acc': 1.0, 'criticality': c,
        'criticality_ci_images': 0.01, 'run_id': 'abc'})
  path.write_text(text[:len(text) - cut] if cut else text)
  return str(path)


def test_report_nan_rows_marked(tmp_path):
  rows = [('conv1', t, 0.8) for t in range(2)] + [('conv2', t, 0.6) for t in range(2)]
  rows += [('bn1', 0, math.nan), ('bn1', 1, math.nan), ('conv3', 0, 0.4), ('conv3', 1, math.nan)]
  summaries = report.summarize(report.load(_write(tmp_path / 'results.csv', rows)))
  assert [s.layer for s in summaries] == ['conv1', 'conv2', 'bn1', 'conv3']
  assert [s.nonfinite for s in summaries] == [0, 0, 2, 1]
  text = report.table(summaries)
  assert 'm: fresh, 4 layers' in text
  assert 'not finite' in text and 'bn1 (2 of 2 trials)' in text and 'conv3 (1 of 2' in text
  assert 'mean criticality 60.0% of 3 layers' in text, text
  assert 'bn1' in text.split('not finite')[1]
  line = report.model_table(summaries).splitlines()[1]
  assert '60.0*' in line
  assert 'not finite' in report.model_table(summaries)
  paper = [dict(r, source='paper') for r in report.load(_write(tmp_path / 'p.csv', rows[:4]))]
  comparison = report.compare(paper, report.load(str(tmp_path / 'results.csv')))
  assert comparison[0].left_out == (3, 0) and comparison[0].layers == 2
  assert 'm: left out, NaN or inf criticality: 3 of our rows' in report.comparison_table(
      comparison)


def test_report_all_finite_unmarked(tmp_path):
  rows = [('conv1', t, 0.8) for t in range(2)] + [('conv2', t, 0.6) for t in range(2)]
  summaries = report.summarize(report.load(_write(tmp_path / 'results.csv', rows)))
  assert 'not finite' not in report.table(summaries) + report.model_table(summaries)
  assert '*' not in report.model_table(summaries)


@pytest.mark.parametrize('cut', [5, 40, 75])
def test_report_truncated_line(tmp_path, capsys, cut):
  rows = [('conv1', 0, 0.8), ('conv2', 0, 0.6), ('conv3', 0, 0.4)]
  whole = _write(tmp_path / 'whole.csv', rows)
  with open(whole, encoding='utf-8') as f:
    last = f.read().splitlines()[-1]
  assert cut < len(last)
  path = _write(tmp_path / 'results.csv', rows, cut=cut)
  loaded = report.load(path)
  assert [r['layer'] for r in loaded] == [schema.ORIGINAL, 'conv1', 'conv2']
  assert 'line 5 is cut short' in capsys.readouterr().err
  summaries = report.summarize(loaded)
  assert {s.model for s in summaries} == {'m'} and len(summaries) == 2


def test_report_truncated_line_of_a_foreign_csv(tmp_path, capsys):
  # Without the runner's header: a last line with fewer cells than the header is cut short.
  path = tmp_path / 'paper.csv'
  path.write_text('model_id,layer,trial,pred_cos_sim\nm,conv1,0,0.2\nm,conv2,0,0.4\nm,conv3')
  assert [r['layer'] for r in report.load(str(path))] == ['conv1', 'conv2']
  assert 'line 4 is cut short' in capsys.readouterr().err
  path.write_text('model_id,layer,trial,pred_cos_sim\nm,conv1,0,0.2\nm,conv2,0,0.4')
  assert [r['layer'] for r in report.load(str(path))] == ['conv1', 'conv2']
  assert 'cut short' not in capsys.readouterr().err


def test_report_broken_pipe(tmp_path):
  rows = [(f'layer{i}.conv', t, i / 100) for i in range(60) for t in range(2)]
  path = _write(tmp_path / 'results.csv', rows)
  env = dict(os.environ, PYTHONPATH=ROOT)
  reader, writer = os.pipe()
  os.close(reader)  # the reader is gone before the first line: every write meets a closed pipe
  try:
    result = subprocess.run([sys.executable, '-m', 'lc_jax.report', path, '--top', '40',
                             '--out', str(tmp_path)], cwd=tmp_path, env=env, stdout=writer,
                            stderr=subprocess.PIPE, text=True, timeout=120, check=False)
  finally:
    os.close(writer)
  assert 'Traceback' not in result.stderr and 'BrokenPipe' not in result.stderr, result.stderr
  assert result.stderr == ''
  assert result.returncode == 141  # as a tool ended by SIGPIPE
  assert (tmp_path / 'heatmap.png').exists(), 'the figures are drawn before the text is printed'


# ------------------------------------------------------------------ crossval -------------------

def _resnet18_pair(edit):
  """A ResNet-18 at 10 classes in lc-jax and torch with the same weights, `edit`ed first."""
  from converters import parity  # pylint: disable=g-import-not-at-top
  module = models.create('resnet18', num_classes=10)
  variables = module.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  variables = jax.tree.map(np.array, variables)
  edit(variables)
  return module, variables, parity.torch_model('resnet18', variables, 10)


def _parity(module, variables, model):
  from lc_jax import crossval  # pylint: disable=g-import-not-at-top
  images = np.random.RandomState(0).randint(0, 256, (2, 32, 32, 3)).astype(np.uint8)
  return crossval.parity_checks(module, variables, model, images, crossval.TOLERANCES)


def test_crossval_nan_model_fails():
  pytest.importorskip('torch')
  pytest.importorskip('timm')
  from lc_jax import crossval  # pylint: disable=g-import-not-at-top

  def nan_weights(variables):
    variables['params']['layer1']['0']['conv1']['kernel'][...] = np.nan
  checks = _parity(*_resnet18_pair(nan_weights))
  broken = [c for c in checks if not c.passed]
  assert broken and all(c.quantity.startswith('not finite') for c in broken)
  names = {c.name for c in broken}
  assert 'layer1.0.conv1' in names and 'logits' in names
  assert 'conv1' not in names  # before the NaN: compared as usual, and equal
  report = crossval.Report('resnet18', checks, dict(crossval.TOLERANCES), [], None, None, None,
                           None, [])
  assert not report.passed
  assert 'not finite' in report.verdict() and 'layer1.0.conv1' in report.verdict()


def test_crossval_all_zero_tensors_fail():
  pytest.importorskip('torch')
  pytest.importorskip('timm')

  def zero_branch(variables):  # layer1.0's branch computes zeros; the residual carries on
    variables['params']['layer1']['0']['conv1']['kernel'][...] = 0
  checks = _parity(*_resnet18_pair(zero_branch))
  broken = {c.name: c for c in checks if not c.passed}
  assert 'layer1.0.conv1' in broken and 'logits' not in broken
  assert broken['layer1.0.conv1'].quantity == 'all zeros in both'


def test_crossval_nan_metrics_fail():
  from lc_jax import crossval  # pylint: disable=g-import-not-at-top
  nan = math.nan
  labelled = ('top1_acc', 'top5_acc', 'loss', 'recovered_acc')
  theirs = [{'layer': schema.ORIGINAL, 'trial': 0,
             **{c: nan if c in labelled else 0.0 for c in schema.METRICS}},
            {'layer': 'fc', 'trial': 0, **{c: nan for c in schema.METRICS}}]
  ours = {(r['layer'], r['trial']): dict(r) for r in theirs}
  checks = crossval.metric_checks(theirs, ours, crossval.TOLERANCES)
  broken = {c.quantity for c in checks if not c.passed}
  # Without labels, the accuracy columns are empty on both sides: left out, not failed.
  assert broken == set(schema.METRICS) - set(labelled)


def test_crossval_counted_columns_are_held_to_a_share_of_the_images():
  # 2000 images, the original's top-1 50%: one image more right is 0.05 points of top-1 and
  # top-5 and 0.001 of recovered_acc (top-1 / 50%), a share 1/2000 = 5e-4 of the images, within
  # the 1e-3 tolerance; three images (1.5e-3) are over it.
  from lc_jax import crossval  # pylint: disable=g-import-not-at-top

  def rows(top1):
    zeros = {c: 0.0 for c in schema.METRICS}
    return [{'layer': schema.ORIGINAL, 'trial': 0, **zeros, 'top1_acc': 50.0, 'top5_acc': 50.0,
             'recovered_acc': 1.0},
            {'layer': 'fc', 'trial': 0, **zeros, 'top1_acc': top1, 'top5_acc': top1,
             'recovered_acc': top1 / 50.0}]
  theirs = rows(40.0)
  for images, passed in ((1, True), (3, False)):
    ours = {(r['layer'], r['trial']): r for r in rows(40.0 + 0.05 * images)}
    checks = {c.quantity: c for c in crossval.metric_checks(theirs, ours, crossval.TOLERANCES)
              if c.name == 'fc'}
    for column in ('top1_acc', 'top5_acc', 'recovered_acc'):
      assert checks[column].difference == pytest.approx(images / 2000, rel=1e-6), column
      assert checks[column].passed == passed, column


def test_crossval_a_zero_tolerance_passes_only_no_difference():
  from lc_jax.crossval.report import judged  # pylint: disable=g-import-not-at-top
  assert judged('metric', 'fc', 0, 'loss', 1.0, 1.0, 0.0, 0.0).passed
  assert not judged('metric', 'fc', 0, 'loss', 1.0, 1.0 + 1e-12, 1e-12, 0.0).passed


def test_crossval_first_disagreement_is_the_first_in_forward_order():
  from lc_jax import layers as layers_lib  # pylint: disable=g-import-not-at-top
  from lc_jax.crossval.compare_parity import first_disagreement  # pylint: disable=g-import-not-at-top
  from lc_jax.crossval.report import judged  # pylint: disable=g-import-not-at-top
  spec = models.get('resnet18')
  layers = layers_lib.inventory(spec.create(), spec.block_depth)
  over = {'logits', 'layer1.0.conv1', 'layer1.0', 'layer2.0.conv2'}  # torch's forward order:
  names = ['logits', 'conv1', 'bn1', 'layer1.0.conv1', 'layer1.0.bn1', 'layer1.0',
           'layer2.0.conv2']
  checks = [judged('parity', n, None, 'relative max diff', 1.0, math.nan,
                   2e-4 if n in over else 0.0, 1e-4) for n in names]
  assert first_disagreement(checks, layers) == ('layer1.0.conv1', 'layer1', 'layer1.0.conv1')
