"""Researchers' own Flax models, for `run.py --config.model.factory=factory_models:NAME` (with
tests/ on PYTHONPATH) and for `lc_jax.criticality` on the same model (tests/test_factory.py).

Both are a small CNN with BatchNorm on float NHWC images in [0, 1], normalising inside, with 10
classes; weights are drawn from a fixed seed, so every process and every call gives the same
model.
"""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

MEAN = jnp.array([0.485, 0.456, 0.406])
STD = jnp.array([0.229, 0.224, 0.225])


class LinenCNN(nn.Module):
  """conv -> BatchNorm -> relu, twice, a global average and a linear head."""

  @nn.compact
  def __call__(self, x):
    x = (x - MEAN) / STD
    x = nn.relu(nn.BatchNorm(use_running_average=True, name='bn1')(
        nn.Conv(8, (3, 3), strides=2, name='conv1')(x)))
    x = nn.relu(nn.BatchNorm(use_running_average=True, name='bn2')(
        nn.Conv(16, (3, 3), strides=2, name='conv2')(x)))
    return nn.Dense(10, name='head')(x.mean(axis=(1, 2)))


def _calibrated(variables):
  """BatchNorm statistics away from (0, 1), so a fresh BatchNorm differs from the trained one."""
  stats = jax.tree.map(lambda v: v, variables['batch_stats'])
  for name in stats:
    stats[name]['mean'] = stats[name]['mean'] + 0.1
    stats[name]['var'] = stats[name]['var'] * 1.5
  return {**variables, 'batch_stats': stats}


def linen_cnn():
  module = LinenCNN()
  variables = module.init(jax.random.key(42), jnp.zeros((1, 32, 32, 3)))
  return module, _calibrated(variables)


class NnxCNN(nnx.Module):
  """The same network in NNX."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = (x - MEAN) / STD
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.bn2(self.conv2(x)))
    return self.head(x.mean(axis=(1, 2)))


def nnx_cnn():
  model = NnxCNN(nnx.Rngs(42))
  for bn in (model.bn1, model.bn2):
    bn.mean[...] = bn.mean[...] + 0.1
    bn.var[...] = bn.var[...] * 1.5
  model.eval()
  return model


def perturbed_cnn():
  """linen_cnn with its second BatchNorm's scale perturbed (by 1 + 0.5 N(0, 1), a fixed draw)."""
  module, variables = linen_cnn()
  params = jax.tree.map(lambda v: v, variables['params'])
  scale = params['bn2']['scale']
  params['bn2']['scale'] = scale * (1 + 0.5 * jax.random.normal(jax.random.key(9), scale.shape))
  return module, {**variables, 'params': params}


def not_a_model():
  return 'no model here'


def raising():
  raise RuntimeError('kaboom')
