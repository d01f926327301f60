"""Fresh initialisation: the primitives families build their schemes from, the registry of
schemes by name, and `fresh_variables`, a newly initialised model's variables.

A scheme is a function `(layer, key) -> leaves` that draws one layer as its family's PyTorch
code does; each family registers its own next to its model (lc_jax.models.resnet:
'timm_resnet', 'torchvision_resnet'; lc_jax.models.efficientnet: 'goog'; lc_jax.models.vit:
'timm_vit'; lc_jax.models.convnext: 'timm_convnext'), and `reset.init_scheme` picks any by
name. Here: 'pytorch_default', conv and Linear weight and bias ~ U(+-1/sqrt(fan_in))
(kaiming_uniform with a = sqrt(5)); BatchNorm and LayerNorm 1/0.

Random weights come from numpy's PCG64 seeded with the bits of the layer's JAX key
(`fold_in(key, layer index)`), so they are reproducible from (seed, trial, layer) alone. Every
leaf is a float32 numpy array made on the host: drawing a model compiles one program (the layer
keys, `layer_keys`), not one per weight shape, and placing it on the devices is one transfer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import numpy as np

from lc_jax import errors
from lc_jax.errors import UserError
from lc_jax.layers import Layer

Leaves = dict[str, np.ndarray]  # {'params/kernel': ..., 'batch_stats/mean': ...}


@dataclasses.dataclass(frozen=True)
class LayerKey:
  """A layer's JAX key as host bits: `data`, the key data of `fold_in(key, layer index)`, and
  `children`, the key data of its `jax.random.split` in two. Every scheme's draws come from
  these, so a layer's weights are those of the JAX key, drawn without a program per layer."""

  data: np.ndarray
  children: tuple[np.ndarray, np.ndarray]


Key = LayerKey | jax.Array
Scheme = Callable[[Layer, Key], Leaves]


@functools.partial(jax.jit, static_argnums=1)
def _layer_key_data(key: jax.Array, indices: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  folded = jax.vmap(lambda i: jax.random.fold_in(key, i))(np.asarray(indices, np.uint32))
  children = jax.vmap(jax.random.split)(folded)
  return jax.random.key_data(folded), jax.random.key_data(children)


def layer_keys(key: jax.Array, indices: Sequence[int]) -> dict[int, LayerKey]:
  """{index: LayerKey of `fold_in(key, index)`} for every layer index, in one program."""
  indices = tuple(int(i) for i in indices)
  if not indices:
    return {}
  folded, children = jax.device_get(_layer_key_data(key, indices))
  return {i: LayerKey(folded[n], (children[n, 0], children[n, 1]))
          for n, i in enumerate(indices)}


@jax.jit
def _trial_key(seed: jax.Array, trial: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), trial)


def trial_key(seed: int, trial: int) -> jax.Array:
  """`fold_in(key(seed), trial)`: the key trial `trial` of a run seeded `seed` draws from (one
  program for every seed and trial)."""
  return _trial_key(np.uint32(seed), np.uint32(trial))


def split(key: Key) -> tuple[Key, Key]:
  """`jax.random.split(key)` in two: a LayerKey's children, or JAX's split of a JAX key."""
  if isinstance(key, LayerKey):
    return key.children
  first, second = jax.random.split(key)
  return first, second


def _fans(layer: Layer) -> tuple[int, int]:
  """torch's fan_in and fan_out of a conv or linear weight (fan_out not divided by groups)."""
  kernel = layer.shapes['params/kernel']
  if len(kernel) == 2:
    return kernel[0], kernel[1]
  kh, kw, in_per_group, out = kernel
  return in_per_group * kh * kw, out * kh * kw


def _generator(key: Key | np.ndarray) -> np.random.Generator:
  """numpy's PCG64 seeded with the bits of a key (a LayerKey, a split child's key data, or a JAX
  key): one generator per (trial, layer) key.

  Drawing with JAX would compile one random program per weight shape (or one large one), which
  on CPU takes longer (about 10 s for ResNet-50) than drawing every weight here."""
  if isinstance(key, LayerKey):
    key = key.data
  elif isinstance(key, jax.Array):
    key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) \
        else key
  return np.random.default_rng(np.asarray(key).ravel().tolist())


def uniform(key, shape, bound) -> np.ndarray:
  """U(-bound, bound) float32 of `shape`, drawn from `key`."""
  return _generator(key).uniform(-bound, bound, shape).astype(np.float32)


def normal(key, shape, std) -> np.ndarray:
  """N(0, std^2) float32 of `shape`, drawn from `key`."""
  return (std * _generator(key).standard_normal(shape, np.float32)).astype(np.float32)


def trunc_normal(key, shape, std, bound=2.0) -> np.ndarray:
  """N(0, std^2) truncated to [-bound, bound] (absolute bounds, as timm's `trunc_normal_`: at
  std .02 its default bound of 2 is 100 standard deviations), float32 of `shape`."""
  generator = _generator(key)
  values = std * generator.standard_normal(shape)
  outside = np.abs(values) > bound
  while outside.any():  # redraw what falls outside: the normal conditioned on the interval
    values[outside] = std * generator.standard_normal(int(outside.sum()))
    outside = np.abs(values) > bound
  return values.astype(np.float32)


def trunc_normal_zero_bias(layer: Layer, key, std: float = 0.02, gain: float = 1.0) -> Leaves:
  """timm's init of ViT and ConvNeXt convs and Linears: weight ~ trunc_normal(std), bias 0;
  both times `gain` (ConvNeXt's head_init_scale)."""
  leaves = {'params/kernel': gain * trunc_normal(key, layer.shapes['params/kernel'], std)}
  if 'params/bias' in layer.shapes:
    leaves['params/bias'] = np.zeros(layer.shapes['params/bias'], np.float32)
  return leaves


def layernorm(layer: Layer) -> Leaves:
  """A fresh LayerNorm: weight 1, bias 0."""
  shape = layer.shapes['params/scale']
  return {'params/scale': np.ones(shape, np.float32),
          'params/bias': np.zeros(shape, np.float32)}


def constant(layer: Layer, value: float) -> Leaves:
  """A free-standing tensor (models.common.Parameter) filled with `value` (a layer scale)."""
  return {'params/value': np.full(layer.shapes['params/value'], value, np.float32)}


def batchnorm(layer: Layer, scale: float = 1.0) -> Leaves:
  """A fresh BatchNorm: weight `scale`, bias 0, running mean 0, var 1."""
  shape = layer.shapes['params/scale']
  return {'params/scale': np.full(shape, scale, np.float32),
          'params/bias': np.zeros(shape, np.float32),
          'batch_stats/mean': np.zeros(shape, np.float32),
          'batch_stats/var': np.ones(shape, np.float32)}


def pytorch_default(layer: Layer, key) -> Leaves:
  """torch's default for conv and Linear: weight and bias ~ U(+-1/sqrt(fan_in))."""
  fan_in, _ = _fans(layer)
  bound = 1 / math.sqrt(fan_in)
  weight_key, bias_key = split(key)
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
    leaves['params/bias'] = np.zeros(layer.shapes['params/bias'], np.float32)
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
    raise errors.unknown('initialisation scheme', name, SCHEMES)
  return SCHEMES[name]


def fresh_variables(layers: Sequence[Layer], scheme_name: str, key: jax.Array) -> dict:
  """A newly initialised model's variables, {'params': ..., 'batch_stats': ...}, numpy leaves.

  Layer i draws from `fold_in(key, i)`, so a layer's fresh weights depend on the key and its
  position only, not on which other layers are reset.
  """
  init = scheme(scheme_name)
  keys = layer_keys(key, [layer.index for layer in layers])
  variables: dict = {}
  for layer in layers:
    for name, value in init(layer, keys[layer.index]).items():
      collection, leaf = name.split('/')
      node = variables.setdefault(collection, {})
      for part in layer.path:
        node = node.setdefault(part, {})
      node[leaf] = value
  return variables
