"""How each model family initialises a fresh model, layer by layer, as its PyTorch code does.

Schemes (torch layouts in brackets; Flax kernels are HWIO and (in, out)):
- 'timm_resnet': conv weight ~ N(0, 2 / fan_out), fan_out = out_ch * kh * kw (kaiming_normal,
  mode='fan_out', untruncated); BatchNorm weight 1, bias 0, running mean 0, var 1, except the
  last BatchNorm of each residual branch (bn3, or bn2 in a basic block), whose weight is 0
  (timm's zero_init_last); Linear: PyTorch's default.
- 'torchvision_resnet': the same without zeroing the last BatchNorm.
- 'goog' (timm EfficientNet): conv weight ~ N(0, 2 / fan_out) with fan_out = kh * kw * out_ch
  / groups; BatchNorm 1/0; Linear weight ~ U(+-1/sqrt(out_features)), bias 0.
- 'pytorch_default': conv and Linear weight and bias ~ U(+-1/sqrt(fan_in)) (kaiming_uniform
  with a = sqrt(5)); BatchNorm 1/0.

Random weights come from numpy's PCG64 seeded with the bits of the layer's JAX key
(`fold_in(key, layer index)`), so they are reproducible from (seed, trial, layer) alone.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lc_jax.errors import UserError
from lc_jax.layers import Layer

Leaves = dict[str, jax.Array]  # {'params/kernel': ..., 'batch_stats/mean': ...}


def _fans(layer: Layer) -> tuple[int, int]:
  """torch's fan_in and fan_out of a conv or linear weight (fan_out not divided by groups)."""
  kernel = layer.shapes['params/kernel']
  if len(kernel) == 2:
    return kernel[0], kernel[1]
  kh, kw, in_per_group, out = kernel
  return in_per_group * kh * kw, out * kh * kw


def _generator(key: jax.Array) -> np.random.Generator:
  """numpy's PCG64 seeded with the bits of a JAX key: one generator per (trial, layer) key.

  Drawing with JAX would compile one random program per weight shape (or one large one), which
  on CPU takes longer (about 10 s for ResNet-50) than drawing every weight here."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _uniform(key, shape, bound):
  values = _generator(key).uniform(-bound, bound, shape)
  return jnp.asarray(values, jnp.float32)


def _normal(key, shape, std):
  return jnp.asarray(std * _generator(key).standard_normal(shape, np.float32), jnp.float32)


def _batchnorm(layer: Layer, scale: float = 1.0) -> Leaves:
  shape = layer.shapes['params/scale']
  return {'params/scale': jnp.full(shape, scale, jnp.float32),
          'params/bias': jnp.zeros(shape, jnp.float32),
          'batch_stats/mean': jnp.zeros(shape, jnp.float32),
          'batch_stats/var': jnp.ones(shape, jnp.float32)}


def _pytorch_default(layer: Layer, key) -> Leaves:
  fan_in, _ = _fans(layer)
  bound = 1 / math.sqrt(fan_in)
  weight_key, bias_key = jax.random.split(key)
  leaves = {'params/kernel': _uniform(weight_key, layer.shapes['params/kernel'], bound)}
  if 'params/bias' in layer.shapes:
    leaves['params/bias'] = _uniform(bias_key, layer.shapes['params/bias'], bound)
  return leaves


def _kaiming_fan_out(layer: Layer, key, divide_by_groups: bool) -> Leaves:
  _, fan_out = _fans(layer)
  if divide_by_groups:
    fan_out //= layer.groups
  leaves = {'params/kernel': _normal(key, layer.shapes['params/kernel'], math.sqrt(2 / fan_out))}
  if 'params/bias' in layer.shapes:
    leaves['params/bias'] = jnp.zeros(layer.shapes['params/bias'], jnp.float32)
  return leaves


def _goog_linear(layer: Layer, key) -> Leaves:
  bound = 1 / math.sqrt(layer.shapes['params/kernel'][1])
  return {'params/kernel': _uniform(key, layer.shapes['params/kernel'], bound),
          'params/bias': jnp.zeros(layer.shapes['params/bias'], jnp.float32)}


def last_batchnorm_of_branches(layers: Sequence[Layer]) -> set[str]:
  """Names of the last BatchNorm of each block's residual branch (not of its shortcut)."""
  last: dict[str, str] = {}
  for layer in layers:
    if (layer.kind == 'batchnorm' and layer.block not in ('stem', 'head')
        and 'downsample' not in layer.path):
      last[layer.block] = layer.name
  return set(last.values())


def _resnet_scheme(zero_init_last: bool):
  def scheme(layer: Layer, key, zero_last: set[str]) -> Leaves:
    if layer.kind == 'batchnorm':
      return _batchnorm(layer, 0.0 if zero_init_last and layer.name in zero_last else 1.0)
    if layer.kind == 'linear':
      return _pytorch_default(layer, key)
    return _kaiming_fan_out(layer, key, divide_by_groups=False)
  return scheme


def _goog(layer: Layer, key, zero_last: set[str]) -> Leaves:
  del zero_last
  if layer.kind == 'batchnorm':
    return _batchnorm(layer)
  if layer.kind == 'linear':
    return _goog_linear(layer, key)
  return _kaiming_fan_out(layer, key, divide_by_groups=True)


def _default(layer: Layer, key, zero_last: set[str]) -> Leaves:
  del zero_last
  return _batchnorm(layer) if layer.kind == 'batchnorm' else _pytorch_default(layer, key)


SCHEMES: dict[str, Callable[[Layer, jax.Array, set[str]], Leaves]] = {
    'timm_resnet': _resnet_scheme(zero_init_last=True),
    'torchvision_resnet': _resnet_scheme(zero_init_last=False),
    'goog': _goog,
    'pytorch_default': _default,
}


def scheme(name: str) -> Callable[[Layer, jax.Array, set[str]], Leaves]:
  """The initialiser of a scheme: (layer, key, names of last branch BNs) -> the layer's leaves."""
  if name not in SCHEMES:
    raise UserError(f'unknown initialisation scheme {name!r}; choose from {", ".join(SCHEMES)}')
  return SCHEMES[name]


def fresh_variables(layers: Sequence[Layer], scheme_name: str, key: jax.Array) -> dict:
  """A newly initialised model's variables, {'params': ..., 'batch_stats': ...}.

  Layer i draws from `fold_in(key, i)`, so a layer's fresh weights depend on the key and its
  position only, not on which other layers are reset.
  """
  init = scheme(scheme_name)
  zero_last = last_batchnorm_of_branches(layers)
  variables: dict = {}
  for layer in layers:
    for name, value in init(layer, jax.random.fold_in(key, layer.index), zero_last).items():
      collection, leaf = name.split('/')
      node = variables.setdefault(collection, {})
      for part in layer.path:
        node = node.setdefault(part, {})
      node[leaf] = value
  return variables
