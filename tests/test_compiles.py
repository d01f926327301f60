"""A first run compiles only what computes, and compiles it ahead, together.

Counted from empty in-memory caches and without the persistent cache, with lc_jax.evaluate's
Compiles (JAX's monitoring events: one per XLA compile, on the run's thread or its compile_all
workers). On an accelerator each compile costs about 0.35 s, so a program that computes nothing
(a copy per weight shape, an eager zeros) costs the first run as much as a segment does.
"""

import jax
import numpy as np
import pytest
import torch

from lc_jax import evaluate
from lc_jax import experiment
from lc_jax import init
from lc_jax import reset
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import timing
from tests import run_config

# The random-key programs of a run: one for a trial's key (fold_in(key(seed), trial)), one for
# every layer's key and its split, drawn together (lc_jax.init.layer_keys).
KEY_PROGRAMS = 2
# The metrics of the original against itself and of a reset against the original.
METRIC_PROGRAMS = 2


def _first_run(config, workdir):
  jax.clear_caches()
  config.compilation_cache_dir = 'none'
  config.progress = False
  with timing.Compiles() as compiles:
    rows = experiment.run(config, str(workdir))
  return compiles, rows


@pytest.fixture(scope='module')
def resnet50_checkpoint(tmp_path_factory):
  import timm  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp('resnet50') / 'resnet50.pth'
  torch.save(timm.create_model('resnet50').state_dict(), path)
  return str(path)


def test_resnet50_first_run_compiles_its_segments_metrics_and_keys(resnet50_checkpoint,
                                                                   tmp_path):
  config, _ = run_config.of([
      '--config=configs/paper.py', f'--config.model.checkpoint={resnet50_checkpoint}',
      '--config.model.arch=resnet50', '--config.data.source=photos',
      '--config.data.order=sorted', '--config.data.num_images=2', '--config.data.batch_size=2',
      '--config.data.crop_size=32', '--config.data.resize_size=37', '--config.trials=1'])
  compiles, rows = _first_run(config, tmp_path / 'run')
  assert len(rows) == 1 + 54
  spec = models.get('resnet50')
  module = spec.create()
  forward = evaluate.Forward(module, layers_lib.inventory(module, spec.block_depth))
  segments = forward.programs(forward.inputs(
      jax.tree.map(np.asarray, models.load(str(tmp_path / 'run' / 'model'))[1]),
      jax.ShapeDtypeStruct((2, 32, 32, 3), np.uint8)))
  print(f'resnet50, 54 layers, 1 trial: {compiles.count} programs ({segments} segment '
        f'programs), {compiles.ahead} compiled ahead in {compiles.seconds:.1f} s '
        f'({compiles.work:.1f} s of compile work)')
  assert segments == 10  # 18 segments: a stage's blocks after its first share one program
  # At most 16: the 10 segment programs, the 2 metric programs, the 2 key programs, and 2 to
  # spare. A copy per weight shape (jnp.asarray of the converted variables: 30 programs) or an
  # eager op per fresh BatchNorm leaf (6) would exceed it.
  assert compiles.count <= 16
  # Every segment and metric program was compiled ahead, in parallel; only the key programs,
  # which run when a trial's fresh model is drawn, compile on the way.
  assert compiles.ahead == segments + METRIC_PROGRAMS
  assert compiles.count - compiles.ahead <= KEY_PROGRAMS


def test_demo_first_run_with_three_layers(tmp_path):
  config, _ = run_config.of(['--config.reset.layers=first:3'])
  compiles, rows = _first_run(config, tmp_path / 'demo')
  assert len(rows) == 1 + 3 * 3
  print(f'demo, 3 layers: {compiles.count} programs, {compiles.ahead} compiled ahead')
  # At most 24: Lite0's 18 segments in 14 programs, 2 metric and 2 key programs, and 6 to spare
  # (the count is the same for 3 layers as for 99).
  assert compiles.count <= 24
  assert compiles.count - compiles.ahead <= KEY_PROGRAMS


def test_fresh_draws_make_numpy_leaves_with_the_jax_keys_bits():
  spec = models.get('resnet18')
  module = spec.create()
  chosen = layers_lib.inventory(module, spec.block_depth)
  key = init.trial_key(3, 2)
  assert np.array_equal(jax.random.key_data(key),
                        jax.random.key_data(jax.random.fold_in(jax.random.key(3), 2)))
  jax.clear_caches()
  with timing.Compiles() as compiles:
    fresh = init.fresh_variables(chosen, spec.init_scheme, key)
  assert compiles.count <= 1  # the layer keys, all in one program
  leaves = jax.tree.leaves(fresh)
  assert leaves and all(isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
                        for leaf in leaves)
  # Each layer's draws are those of its JAX key: fold_in(key, index), split in two for a
  # weight and a bias (the fc layer: torch's default for Linear).
  fc = next(layer for layer in chosen if layer.name == 'fc')
  layer_key = jax.random.fold_in(key, fc.index)
  weight_key, bias_key = jax.random.split(layer_key)
  bound = 1 / np.sqrt(fc.shapes['params/kernel'][0])
  np.testing.assert_array_equal(fresh['params']['fc']['kernel'],
                                init.uniform(weight_key, fc.shapes['params/kernel'], bound))
  np.testing.assert_array_equal(fresh['params']['fc']['bias'],
                                init.uniform(bias_key, fc.shapes['params/bias'], bound))


def test_host_resets_equal_jnp_arithmetic():
  rng = np.random.default_rng(0)
  spec = models.get('resnet18')
  module = spec.create()
  chosen = layers_lib.inventory(module, spec.block_depth)
  target = layers_lib.select(chosen, ['conv'], 'layer1.0.conv1', 'layer')[0]
  shape = target.layers[0].shapes['params/kernel']
  trained = {'params': {'layer1': {'0': {'conv1': {'kernel': jax.numpy.asarray(
      rng.standard_normal(shape).astype(np.float32))}}}}}
  fresh = {'params': {'layer1': {'0': {'conv1': {'kernel': rng.standard_normal(shape).astype(
      np.float32)}}}}}
  for alpha in (0.0, 0.3, 0.7, 1.0):
    mixed = reset.interpolate(trained, target.layers, fresh, alpha)
    got = mixed['params']['layer1']['0']['conv1']['kernel']
    kernel = trained['params']['layer1']['0']['conv1']['kernel']
    want = (1 - alpha) * jax.numpy.asarray(fresh['params']['layer1']['0']['conv1']['kernel']) \
        + alpha * kernel
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  zeroed = reset.zero(trained, target.layers)['params']['layer1']['0']['conv1']['kernel']
  assert zeroed.shape == shape and zeroed.dtype == np.float32 and not np.any(zeroed)
