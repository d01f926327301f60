"""lc_jax.criticality for research code: on a registered model it gives run.py's numbers; on any
linen or NNX model each layer's value is what a hand-written replace-and-apply loop gives; resets
vmap over alphas; the examples run.
"""

import os
import subprocess
import sys

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import lc_jax  # pylint: disable=g-import-not-at-top,g-bad-import-order
from lc_jax import adapters
from lc_jax import config as lc_config
from lc_jax import data
from lc_jax import experiment
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import reset
from lc_jax import schema
from lc_jax import torch_reference
from lc_jax.errors import UserError

import numpy_metrics  # pylint: disable=g-import-not-at-top
import pixels  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16


def _images(count=10, seed=0):
  return np.random.RandomState(seed).rand(count, SIZE, SIZE, 3).astype(np.float32)


def _criticality(ref_logits, logits):
  """1 - cos(softmax(ref), softmax(logits)) per image, in numpy float64."""
  def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
  p, q = softmax(ref_logits), softmax(logits)
  return 1 - (p * q).sum(-1) / np.linalg.norm(p, axis=-1) / np.linalg.norm(q, axis=-1)


# ------------------------------------------------------------------ a registered model -------

def test_the_api_and_run_py_agree_on_a_registered_resnet18(tmp_path):
  # Both faces run one engine (lc_jax.engine): this checks that they hand it the same images,
  # keys, targets and settings, not that its numbers are right. Those are anchored elsewhere:
  # timm/torchvision logits (test_resnet.py, ...), the float64 numpy metrics and the paper's
  # torch loop (test_protocol_parity.py, test_crossval.py), resets against timm's
  # initialisers (test_reset.py).
  torch.manual_seed(0)
  model = torch_reference.calibrated(timm.create_model('resnet18'),
                                     np.random.RandomState(0).rand(4, 64, 64, 3).astype(np.float32))
  torch.save(model.state_dict(), tmp_path / 'resnet18.pth')
  config = lc_config.default()
  config.model.checkpoint = str(tmp_path / 'resnet18.pth')
  config.data.source, config.data.num_images, config.data.order = 'photos', 6, 'sorted'
  config.data.resize_size, config.data.crop_size, config.data.batch_size = 72, 64, 4
  config.reset.layer_types, config.reset.layers = 'conv,linear,batchnorm', 'conv1,layer2.*,fc'
  config.trials, config.seed, config.progress = 2, 5, False
  config.cache_dir = str(tmp_path / 'cache')
  rows = experiment.run(config, str(tmp_path / 'run'))

  images, _, _ = data.load(lc_config.check(config).data, cache_dir=config.cache_dir)
  module, variables, _ = models.load(str(tmp_path / 'run' / 'model'))
  result = lc_jax.criticality(module, variables, images, layers='conv,linear,batchnorm',
                              pattern='conv1,layer2.*,fc', trials=2, key=jax.random.key(5),
                              batch_size=4, model_id=rows[0]['model_id'], dataset='photos')
  assert [(r['layer'], r['trial']) for r in result.rows] == [
      (r['layer'], r['trial']) for r in rows]
  assert {r['dataset'] for r in rows} == {r['dataset'] for r in result.rows} == {'photos'}
  worst = 0.0
  for ours, theirs in zip(result.rows, rows):
    for column in schema.METRICS:
      a, b = ours[column], theirs[column]
      assert np.isnan(a) == np.isnan(b), column
      if not np.isnan(a):
        worst = max(worst, abs(a - b))
    assert (ours['kind'], ours['stage'], ours['num_params'], ours['num_images']) == (
        theirs['kind'], theirs['stage'], theirs['num_params'], theirs['num_images'])
  print(f'lc_jax.criticality vs run.py: {len(rows)} rows, largest metric difference {worst:.2g}')
  assert worst <= 1e-6


# ------------------------------------------------------------------ any Flax model -----------

class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3))(x)))
    x = nn.Conv(8, (3, 3), feature_group_count=8, name='depthwise')(x)
    x = nn.LayerNorm()(nn.Conv(16, (3, 3), strides=2)(x)).mean((1, 2))
    return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))


def test_a_linen_model_equals_replacing_each_layer_by_hand():
  module, images = LinenCNN(), _images()
  variables = module.init(jax.random.key(1), images)
  key, trials = jax.random.key(7), 2
  result = lc_jax.criticality(module, variables, images, layers='conv,linear,batchnorm,layernorm',
                              trials=trials, key=key, batch_size=4, keep_per_image=True)
  reference = module.apply(variables, images)
  names = ['Conv_0', 'BatchNorm_0', 'depthwise', 'Conv_1', 'LayerNorm_0', 'Dense_1', 'Dense_0']
  assert [r['layer'] for r in result.rows[1::trials]] == names  # call order
  kinds = {r['layer']: r['kind'] for r in result.rows}
  assert (kinds['BatchNorm_0'], kinds['depthwise'], kinds['LayerNorm_0']) == (
      'batchnorm', 'depthwise_conv', 'layernorm')
  worst = 0.0
  for trial in range(trials):
    fresh = module.init(jax.random.fold_in(key, trial), images[:1])  # the layers' own inits
    for name in names:
      by_hand = {c: {**tree, name: fresh[c][name]} if name in tree else tree
                 for c, tree in variables.items()}
      values = _criticality(reference, module.apply(by_hand, images))
      row = next(r for r in result.rows if (r['layer'], r['trial']) == (name, trial))
      worst = max(worst, abs(row['criticality'] - values.mean()),
                  np.abs(result.per_image[(trial, name)] - values).max())
  print(f'linen: largest difference to the loop by hand {worst:.2g}')
  assert worst <= 1e-6


class NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.norm = nnx.BatchNorm(8, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)])

  def __call__(self, x):
    x = nnx.relu(self.norm(self.conv(x))).mean((1, 2))
    return self.layers[1](nnx.relu(self.layers[0](x)))


def test_an_nnx_model_equals_replacing_each_layer_by_hand():
  model, images = NNXModel(nnx.Rngs(0)), _images()  # in training mode, as constructed
  key, trials = jax.random.key(3), 2
  result = lc_jax.criticality(model, None, images, layers='conv,linear,batchnorm', trials=trials,
                              key=key, batch_size=4, fresh=lambda k: NNXModel(nnx.Rngs(k)))
  assert model.norm.use_running_average is False  # evaluated in eval mode, on a copy
  model.eval()
  reference = model(images)
  assert [r['layer'] for r in result.rows[1::trials]] == ['conv', 'norm', 'layers.0', 'layers.1']
  worst = 0.0
  for trial in range(trials):
    fresh = NNXModel(nnx.Rngs(jax.random.fold_in(key, trial)))
    for path in (('conv',), ('norm',), ('layers', 0), ('layers', 1)):
      by_hand = nnx.clone(model)
      parent, fresh_parent = by_hand, fresh
      for part in path[:-1]:
        parent, fresh_parent = getattr(parent, part), getattr(fresh_parent, part)
      if isinstance(path[-1], int):
        parent[path[-1]] = nnx.clone(fresh_parent[path[-1]])
      else:
        setattr(parent, path[-1], nnx.clone(getattr(fresh_parent, path[-1])))
      by_hand.eval()
      name = '.'.join(map(str, path))
      row = next(r for r in result.rows if (r['layer'], r['trial']) == (name, trial))
      worst = max(worst, abs(row['criticality'] - _criticality(reference, by_hand(images)).mean()))
  print(f'nnx: largest difference to the loop by hand {worst:.2g}')
  assert worst <= 1e-6


def test_interpolation_vmaps_over_alphas():
  module, images = LinenCNN(), _images(4)
  variables = module.init(jax.random.key(1), images)
  initial = module.init(jax.random.key(2), images)
  found = adapters.linen_inventory(module, images[:1])
  target = layers_lib.select(found, ['conv'], 'Conv_1')[0]
  alphas = jnp.asarray([0.0, 0.3, 0.7, 1.0])

  def logits(alpha):
    return module.apply(reset.interpolate(variables, target.layers, initial, alpha), images)
  stacked = jax.vmap(logits)(alphas)
  for i, alpha in enumerate(alphas.tolist()):
    np.testing.assert_allclose(stacked[i], logits(alpha), atol=1e-6, err_msg=str(alpha))
  np.testing.assert_allclose(stacked[-1], module.apply(variables, images), atol=1e-6)
  # ... and over trials: fresh trees stacked along a leading axis, one reset vmapped.
  sources = [module.init(jax.random.key(k), images) for k in (3, 4)]
  stacked_sources = jax.tree.map(lambda *leaves: jnp.stack(leaves), *sources)
  both = jax.vmap(lambda src: module.apply(reset.replace(variables, target.layers, src),
                                           images))(stacked_sources)
  for i, source in enumerate(sources):
    np.testing.assert_allclose(both[i], module.apply(
        reset.replace(variables, target.layers, source), images), atol=1e-6)


def test_results_write_read_and_plot(tmp_path):
  module, images = LinenCNN(), _images()
  variables = module.init(jax.random.key(1), images)
  result = lc_jax.criticality(module, variables, images, labels=np.arange(10) % 10, trials=2)
  assert {row['dataset'] for row in result.rows} == {''}  # arrays without a name
  result.to_csv(str(tmp_path / 'results.csv'))
  result.plot(str(tmp_path / 'criticality.png'))
  from lc_jax import report  # pylint: disable=g-import-not-at-top
  assert len(report.read.load(str(tmp_path / 'results.csv'))) == len(result.rows)
  pixels.check_bars(str(tmp_path / 'criticality.png'), result.summaries())
  assert 'most critical first' in result.table() and 'original top-1 ' in result.table()
  assert set(result.criticality()) == {'Conv_0', 'depthwise', 'Conv_1', 'Dense_1', 'Dense_0'}


def _same_rows(got, want, atol=0.0):
  """Row by row, the same layers and trials and every metric within `atol` (NaN where NaN)."""
  assert [(r['layer'], r['trial']) for r in got] == [(r['layer'], r['trial']) for r in want]
  worst = 0.0
  for ours, theirs in zip(got, want):
    assert (ours['num_images'], ours['kind'], ours['mode']) == (
        theirs['num_images'], theirs['kind'], theirs['mode'])
    for column in schema.METRICS:
      a, b = ours[column], theirs[column]
      assert np.isnan(a) == np.isnan(b), (ours['layer'], column, a, b)
      if not np.isnan(a):
        worst = max(worst, abs(a - b))
  assert worst <= atol, worst
  return worst


def test_batches_and_image_label_pairs_give_the_rows_of_the_arrays():
  module, images = LinenCNN(), _images(10)
  labels = np.random.RandomState(1).randint(0, 10, 10)
  variables = module.init(jax.random.key(1), images)
  settings = dict(trials=2, key=jax.random.key(4), batch_size=4)
  parts = [slice(0, 4), slice(4, 8), slice(8, 10)]  # the array's batches of 4
  whole = lc_jax.criticality(module, variables, images, labels=labels, **settings)
  assert not np.isnan(whole.rows[0]['top1_acc'])
  pairs = lc_jax.criticality(module, variables, ((images[p], labels[p]) for p in parts),
                             **settings)
  _same_rows(pairs.rows, whole.rows)
  unlabelled = lc_jax.criticality(module, variables, images, **settings)
  assert np.isnan(unlabelled.rows[0]['top1_acc'])
  batches = lc_jax.criticality(module, variables, [images[p] for p in parts], **settings)
  _same_rows(batches.rows, unlabelled.rows)


def test_uint8_images_to_any_model_are_scaled_by_1_over_255():
  module = LinenCNN()
  raw = (np.random.RandomState(3).rand(6, SIZE, SIZE, 3) * 256).astype(np.uint8)
  variables = module.init(jax.random.key(1), _images(2))
  settings = dict(trials=2, key=jax.random.key(4), batch_size=4)
  scaled = lc_jax.criticality(module, variables, raw.astype(np.float32) / 255, **settings)
  worst = _same_rows(lc_jax.criticality(module, variables, raw, **settings).rows, scaled.rows,
                     atol=1e-6)
  print(f'uint8 vs float/255: largest metric difference {worst:.2g}')


def test_zero_resets_of_whole_blocks_equal_zeroing_them_by_hand():
  """mode='zero', granularity='block' on a registered ResNet-18 (run by segments from each
  block): each row is the metrics, in float64 numpy, of the model applied with the block's
  convs (and the fc) set to zero by hand."""
  module = models.get('resnet18').create()
  rng = np.random.RandomState(0)

  def draw(path, leaf):  # He-scaled kernels, BatchNorm statistics near the identity
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0, np.sqrt(2 / np.prod(leaf.shape[:-1])), leaf.shape).astype(np.float32)
    if name in ('scale', 'var'):
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0, 0.1, leaf.shape).astype(np.float32)
  variables = jax.tree_util.tree_map_with_path(draw, models.variable_shapes(module, 32))
  images = np.random.RandomState(1).rand(6, 32, 32, 3).astype(np.float32)
  labels = np.random.RandomState(2).randint(0, 1000, 6)
  result = lc_jax.criticality(module, variables, images, labels=labels, layers='conv,linear',
                              pattern='layer1.0,layer3.0,fc', granularity='block', mode='zero',
                              batch_size=4)
  by_hand = {'layer1.0': [('layer1', '0', 'conv1'), ('layer1', '0', 'conv2')],
             'layer3.0': [('layer3', '0', 'conv1'), ('layer3', '0', 'conv2'),
                          ('layer3', '0', 'downsample', '0')],
             'head': [('fc',)]}
  assert [(r['layer'], r['trial'], r['mode']) for r in result.rows] == [
      ('original', 0, 'none')] + [(name, 0, 'zero') for name in by_hand]
  reference = np.asarray(module.apply(variables, images))
  worst = 0.0
  for row, (name, paths) in zip(result.rows[1:], by_hand.items()):
    zeroed = jax.tree.map(np.array, variables)
    for path in paths:
      params = zeroed['params']
      for part in path:
        params = params[part]
      for leaf in params.values():
        leaf[...] = 0
    want = numpy_metrics.numpy_reference(reference, np.asarray(module.apply(zeroed, images)),
                                         labels)
    assert want['criticality'] > 1e-3, name  # each block's reset moves the predictions
    for column, value in want.items():
      worst = max(worst, abs(row[column] - value))
  print(f'zero resets of blocks vs by hand: largest metric difference {worst:.2g}')
  assert worst <= 1e-5


def test_bad_input_is_one_clear_error():
  module, images = LinenCNN(), _images(2)
  variables = module.init(jax.random.key(1), images)
  with pytest.raises(UserError, match='the image set is empty'):
    lc_jax.criticality(module, variables, images[:0])
  with pytest.raises(UserError, match='3 labels for 2 images'):
    lc_jax.criticality(module, variables, images, labels=np.zeros(3, int))
  with pytest.raises(UserError, match='unknown layer'):
    lc_jax.criticality(module, variables, images, pattern='Conv_9')
  with pytest.raises(UserError, match='needs the other checkpoint'):
    lc_jax.criticality(module, variables, images, mode='checkpoint')
  with pytest.raises(UserError, match="dataset= names the image set .* not None"):
    lc_jax.criticality(module, variables, images, dataset=None)
  # Settings of another mode change nothing; they are refused rather than ignored.
  with pytest.raises(UserError, match="alpha=0.5 applies to mode interpolate only"):
    lc_jax.criticality(module, variables, images, alpha=0.5)
  with pytest.raises(UserError, match="source= applies to mode 'checkpoint' only"):
    lc_jax.criticality(module, variables, images, mode='zero', source=variables)


@pytest.mark.parametrize('script,expect', [
    ('linen_cnn.py', 'most critical first'), ('nnx_cnn.py', 'most critical first'),
    ('module_criticality.py', 'alpha*')])
def test_examples_run(script, expect):
  out = subprocess.run([sys.executable, os.path.join('examples', script)], cwd=ROOT,
                       capture_output=True, text=True, check=False, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert expect in out.stdout


# ------------------------------------------------------------------ draws, schemes and modes ---

def test_an_nnx_model_without_fresh_draws_flax_defaults():
  # No fresh=: each layer is drawn by flax's default initialiser of its class. Truth: the
  # kernels of an NNX model built anew (other keys) come from the same distribution (a KS test
  # that rejects a uniform draw of the same std, shown below), biases and BatchNorm as flax's.
  from scipy import stats  # pylint: disable=g-import-not-at-top
  import factory_models  # pylint: disable=g-import-not-at-top
  model = factory_models.nnx_cnn()
  adapted = adapters.adapt(model, None, jnp.zeros((1, SIZE, SIZE, 3)))
  ours = [adapted.fresh(jax.random.key(k))['params'] for k in range(30)]
  theirs = [nnx.state(factory_models.NnxCNN(nnx.Rngs(100 + k)), nnx.Param) for k in range(30)]
  for name in ('conv1', 'conv2', 'head'):
    a = np.concatenate([np.ravel(p[name]['kernel']) for p in ours])
    b = np.concatenate([np.ravel(s[name]['kernel'][...]) for s in theirs])
    p_value = stats.ks_2samp(a, b).pvalue
    uniform = np.random.RandomState(0).uniform(-1, 1, a.size) * np.std(b) * np.sqrt(3)
    print(f'{name}: KS p {p_value:.3g} against nnx, {stats.ks_2samp(uniform, b).pvalue:.3g} '
          'for a uniform of the same std')
    assert p_value > 1e-3 and stats.ks_2samp(uniform, b).pvalue < 1e-3
    assert all(np.all(np.asarray(p[name]['bias']) == 0) for p in ours)
  fresh = adapted.fresh(jax.random.key(0))
  assert np.all(np.asarray(fresh['params']['bn1']['scale']) == 1)
  assert np.all(np.asarray(fresh['batch_stats']['bn1']['var']) == 1)
  assert np.all(np.asarray(fresh['batch_stats']['bn1']['mean']) == 0)
  # And the API runs on it without fresh=: every reset moves the predictions.
  result = lc_jax.criticality(model, None, _images(4), trials=1, batch_size=4)
  assert all(row['criticality'] > 0 for row in result.rows[1:])


def test_scheme_draws_fresh_layers_with_the_named_scheme():
  # scheme='pytorch_default': torch's default of nn.Conv2d/nn.Linear, kernels uniform in
  # +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5)), instead of the linen model's own
  # lecun normal.
  from scipy import stats  # pylint: disable=g-import-not-at-top
  import factory_models  # pylint: disable=g-import-not-at-top
  module, variables = factory_models.linen_cnn()
  example = jnp.zeros((1, SIZE, SIZE, 3))
  drawn = adapters.adapt(module, variables, example, scheme='pytorch_default').fresh(
      jax.random.key(0))['params']['conv2']['kernel']
  bound = 1 / np.sqrt(3 * 3 * 8)
  values = np.ravel(drawn) / bound
  assert np.abs(values).max() <= 1 and stats.kstest(values, 'uniform', (-1, 2)).pvalue > 1e-3
  own = adapters.adapt(module, variables, example).fresh(jax.random.key(0))['params']
  assert stats.kstest(np.ravel(own['conv2']['kernel']) / bound, 'uniform', (-1, 2)).pvalue < 1e-3
  images = _images(6)
  with_scheme = lc_jax.criticality(module, variables, images, trials=1, layers='conv',
                                   scheme='pytorch_default')
  without = lc_jax.criticality(module, variables, images, trials=1, layers='conv')
  assert [r['layer'] for r in with_scheme.rows] == [r['layer'] for r in without.rows]
  assert with_scheme.rows[1]['criticality'] != without.rows[1]['criticality']


def test_zero_and_interpolate_modes_against_their_closed_forms():
  # 'zero' on the head: every logit is 0, the prediction uniform, so each image's criticality is
  # 1 - cos(softmax(reference), uniform), in numpy float64. 'interpolate' at alpha 1 keeps the
  # trained weights: the same logits, criticality 0 up to the last bit of the metric's own
  # arithmetic (below 1e-12; an alpha ignored gives the fresh reset's, above 1e-3).
  import factory_models  # pylint: disable=g-import-not-at-top
  module, variables = factory_models.linen_cnn()
  images = _images(6)
  zero = lc_jax.criticality(module, variables, images, layers='linear', mode='zero',
                            keep_per_image=True)
  assert [r['layer'] for r in zero.rows] == ['original', 'head'] and zero.rows[1]['trial'] == 0
  reference = module.apply(variables, images)
  want = _criticality(reference, np.zeros_like(reference))
  got = zero.per_image[(0, 'head')]
  print(f'zero head: largest difference from the closed form {np.abs(got - want).max():.3g}')
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  kept = lc_jax.criticality(module, variables, images, mode='interpolate', alpha=1.0, trials=2)
  assert all(row['pred_l1_err'] == 0 and row['criticality'] < 1e-12 for row in kept.rows[1:])
  halfway = lc_jax.criticality(module, variables, images, mode='interpolate', alpha=0.5,
                               trials=1, layers='linear')
  fresh = lc_jax.criticality(module, variables, images, mode='fresh', trials=1, layers='linear')
  assert 0 < halfway.rows[1]['criticality'] < fresh.rows[1]['criticality']


class _Unit(nn.Module):
  """conv -> BatchNorm -> relu: a block of its own (its layers' parent module)."""
  width: int

  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.BatchNorm(use_running_average=True, name='bn')(
        nn.Conv(self.width, (3, 3), name='conv')(x)))


class _Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = _Unit(8, name='unit1')(x)
    x = _Unit(8, name='unit2')(x)
    return nn.Dense(10, name='head')(x.mean(axis=(1, 2)))


def test_block_granularity_resets_each_block_whole():
  # granularity='block' groups a model's layers by their parent module: one row per block, and
  # zeroing a block equals zeroing its conv and BatchNorm by hand (numpy float64 metrics).
  module, images = _Nested(), _images(5)
  variables = module.init(jax.random.key(2), images)
  result = lc_jax.criticality(module, variables, images, layers='conv,batchnorm,linear',
                              granularity='block', mode='zero', keep_per_image=True)
  assert [r['layer'] for r in result.rows] == ['original', 'unit1', 'unit2', 'head']
  assert result.rows[1]['kind'] == 'batchnorm+conv' and result.rows[1]['stage'] == 'unit1'
  reference = module.apply(variables, images)
  for block in ('unit1', 'unit2'):
    zeroed = jax.tree.map(lambda v: v, variables)
    for layer in ('conv', 'bn'):
      zeroed['params'][block][layer] = jax.tree.map(jnp.zeros_like,
                                                    variables['params'][block][layer])
    want = _criticality(reference, module.apply(zeroed, images))
    np.testing.assert_allclose(result.per_image[(0, block)], want, rtol=0, atol=1e-6)
  stages = lc_jax.criticality(module, variables, images, layers='conv', granularity='stage',
                              mode='zero')
  assert [r['layer'] for r in stages.rows] == ['original', 'unit1', 'unit2']
