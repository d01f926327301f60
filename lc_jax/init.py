"""Fresh initialisation: the primitives families build their schemes from, the registry of
schemes by name, and `fresh_variables`, a newly initialised model's variables.

A scheme is a function `(layer, key) -> leaves` that draws one layer as its family's PyTorch
code does; each family registers its own next to its model (lc_jax.models.resnet:
'timm_resnet', 'torchvision_resnet'; lc_jax.models.efficientnet: 'goog'; lc_jax.models.vit:
'timm_vit'; lc_jax.models.convnext: 'timm_convnext'), and `reset.init_scheme` picks any by
name. Here: 'pytorch_default', conv and Linear weight and bias ~ U(+-1/sqrt(fan_in))
(kaiming_uniform with a = sqrt(5)); BatchNorm and LayerNorm 1/0.

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
Scheme = Callable[[Layer, jax.Array], Leaves]


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


def uniform(key, shape, bound) -> jax.Array:
  """U(-bound, bound) float32 of `shape`, drawn from `key`."""
  values = _generator(key).uniform(-bound, bound, shape)
  return jnp.asarray(values, jnp.float32)


def normal(key, shape, std) -> jax.Array:
  """N(0, std^2) float32 of `shape`, drawn from `key`."""
  return jnp.asarray(std * _generator(key).standard_normal(shape, np.float32), jnp.float32)


def trunc_normal(key, shape, std, bound=2.0) -> jax.Array:
  """N(0, std^2) truncated to [-bound, bound] (absolute bounds, as timm's `trunc_normal_`: at
  std .02 its default bound of 2 is 100 standard deviations), float32 of `shape`."""
  generator = _generator(key)
  values = std * generator.standard_normal(shape)
  outside = np.abs(values) > bound
  while outside.any():  # redraw what falls outside: the normal conditioned on the interval
    values[outside] = std * generator.standard_normal(int(outside.sum()))
    outside = np.abs(values) > bound
  return jnp.asarray(values, jnp.float32)


def trunc_normal_zero_bias(layer: Layer, key, std: float = 0.02, gain: float = 1.0) -> Leaves:
  """timm's init of ViT and ConvNeXt convs and Linears: weight ~ trunc_normal(std), bias 0;
  both times `gain` (ConvNeXt's head_init_scale)."""
  leaves = {'params/kernel': gain * trunc_normal(key, layer.shapes['params/kernel'], std)}
  if 'params/bias' in layer.shapes:
    leaves['params/bias'] = jnp.zeros(layer.shapes['params/bias'], jnp.float32)
  return leaves


def layernorm(layer: Layer) -> Leaves:
  """A fresh LayerNorm: weight 1, bias 0."""
  shape = layer.shapes['params/scale']
  return {'params/scale': jnp.ones(shape, jnp.float32),
          'params/bias': jnp.zeros(shape, jnp.float32)}


def constant(layer: Layer, value: float) -> Leaves:
  """A free-standing tensor (models.common.Parameter) filled with `value` (a layer scale)."""
  return {'params/value': jnp.full(layer.shapes['params/value'], value, jnp.float32)}


def batchnorm(layer: Layer, scale: float = 1.0) -> Leaves:
  """A fresh BatchNorm: weight `scale`, bias 0, running mean 0, var 1."""
  shape = layer.shapes['params/scale']
  return {'params/scale': jnp.full(shape, scale, jnp.float32),
          'params/bias': jnp.zeros(shape, jnp.float32),
          'batch_stats/mean': jnp.zeros(shape, jnp.float32),
          'batch_stats/var': jnp.ones(shape, jnp.float32)}


def pytorch_default(layer: Layer, key) -> Leaves:
  """torch's default for conv and Linear: weight and bias ~ U(+-1/sqrt(fan_in))."""
  fan_in, _ = _fans(layer)
  bound = 1 / math.sqrt(fan_in)
  weight_key, bias_key = jax.random.split(key)
  leaves = {'params/kernel': uniform(weight_key, layer.shapes['params/kernel'], bound)}
  if 'params/bias' in layer.shapes:
    leaves['params/bias'] = uniform(bias_key, layer.shapes['params/bias'], bound)
  return leaves


def kaiming_normal_fan_out(layer: Layer, key, divide_by_groups: bool) -> Leaves:
  """Weight ~ N(0, 2 / fan_out) (untruncated; fan_out over groups if asked), bias 0."""
  _, fan_out = _fans(layer)
  if divide_by_groups:
    fan_out //= layer.groups
  leaves = {'params/kernel': normal(key, layer.shapes['params/kernel'], math.sqrt(2 / fan_out))}
  if 'params/bias' in layer.shapes:
    leaves['params/bias'] = jnp.zeros(layer.shapes['params/bias'], jnp.float32)
  return leaves


def _default(layer: Layer, key) -> Leaves:
  if layer.kind == 'batchnorm':
    return batchnorm(layer)
  if layer.kind == 'layernorm':
    return layernorm(layer)
  if layer.kind in ('embedding', 'layer_scale'):
    raise UserError(f'{layer.name} is a {layer.kind.replace("_", " ")}, which torch has no '
                    'default initialiser for; use the architecture\'s own init scheme')
  return pytorch_default(layer, key)


SCHEMES: dict[str, Scheme] = {'pytorch_default': _default}


def register_scheme(name: str, scheme_fn: Scheme) -> None:
  """Adds a family's scheme under `name` (a name is registered once)."""
  if name in SCHEMES:
    raise ValueError(f'initialisation scheme {name!r} is registered twice')
  SCHEMES[name] = scheme_fn


def scheme(name: str) -> Scheme:
  """The initialiser of a scheme: (layer, key) -> the layer's leaves."""
  if name not in SCHEMES:
    raise UserError(f'unknown initialisation scheme {name!r}; choose from {", ".join(SCHEMES)}')
  return SCHEMES[name]


def fresh_variables(layers: Sequence[Layer], scheme_name: str, key: jax.Array) -> dict:
  """A newly initialised model's variables, {'params': ..., 'batch_stats': ...}.

  Layer i draws from `fold_in(key, i)`, so a layer's fresh weights depend on the key and its
  position only, not on which other layers are reset.
  """
  init = scheme(scheme_name)
  variables: dict = {}
  for layer in layers:
    for name, value in init(layer, jax.random.fold_in(key, layer.index)).items():
      collection, leaf = name.split('/')
      node = variables.setdefault(collection, {})
      for part in layer.path:
        node = node.setdefault(part, {})
      node[leaf] = value
  return variables
