"""Any Flax model in the one form the criticality loop takes (`Adapted`): its layers, its variables
as {'params': ..., 'batch_stats': ...} dicts, a pure apply, and a fresh model per key.

- A registered architecture, or a linen module with `segments()` (lc_jax.models): the family's
  inventory and init scheme, and prefix reuse through lc_jax.evaluate.Forward.
- Any other `flax.linen.Module` whose `apply(variables, x)` gives logits: every `nn.Conv`,
  `nn.ConvTranspose`, `nn.Dense`, `nn.DenseGeneral`, `nn.Einsum`, `nn.BatchNorm`,
  `nn.LayerNorm`, `nn.GroupNorm` and `nn.Embed` it calls is a layer, in call order, named by its
  path; a fresh model is `module.init(key, x)`, so every layer is drawn by its own initialisers.
- A `flax.nnx.Module`: the same classes of `flax.nnx`, found by running the model once; its
  `nnx.Param` and `nnx.BatchStat` variables become the two dicts (paths as in `nnx.state`), and
  the model runs in eval mode (`model.eval()`, on a copy). NNX modules do not keep their
  initialisers, so a fresh model comes from `fresh(key) -> a new model` when given, else from
  flax's default initialisers of each layer's class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp

from lc_jax import init
from lc_jax import layers as layers_lib
from lc_jax import models

COLLECTIONS = ('params', 'batch_stats')


@dataclasses.dataclass
class Adapted:
  """A model as the criticality loop takes it."""

  layers: list[layers_lib.Layer]
  variables: dict  # {'params': ..., 'batch_stats': ...}
  apply: Callable[[dict, jax.Array], jax.Array]  # (variables, images) -> logits, jittable
  fresh: Callable[[jax.Array], dict]  # key -> a fresh model's variables
  module: nn.Module | None = None  # a module with segments: prefix reuse (lc_jax.evaluate)


def adapt(model: Any, variables: dict | None, example: jax.Array, *,
          scheme: str | None = None, fresh: Callable[[jax.Array], Any] | None = None) -> Adapted:
  """`model` (a registered architecture's name, a linen module or an NNX module) as an Adapted.

  `example` is a batch of images as the model takes them (only its shape and dtype are used);
  `scheme` names an lc_jax.init scheme to draw fresh layers with instead of the model's own.
  """
  if isinstance(model, str):
    model = models.create(model)
  if isinstance(model, nnx.Module):
    return _nnx(model, example, scheme, fresh)
  if not isinstance(model, nn.Module):
    raise TypeError(f'model must be a registered architecture name, a flax.linen.Module or a '
                    f'flax.nnx.Module, not {type(model).__name__}')
  if variables is None:
    raise TypeError('a linen model needs its variables')
  variables = {c: variables[c] for c in COLLECTIONS if c in variables}
  if hasattr(model, 'segments'):
    spec = registered_spec(model)
    layers = layers_lib.inventory(model, spec.block_depth)
    name = scheme or spec.init_scheme
    return Adapted(layers, variables, model.apply,
                   lambda key: init.fresh_variables(layers, name, key), module=model)
  layers = linen_inventory(model, example)
  if scheme:
    draw = lambda key: init.fresh_variables(layers, scheme, key)
  else:
    draw = lambda key: {c: v for c, v in model.init(key, example).items() if c in COLLECTIONS}
  return Adapted(layers, variables, model.apply, draw)


def registered_spec(module: nn.Module) -> models.Architecture:
  for name in models.names():
    spec = models.get(name)
    if isinstance(module, spec.build) and all(
        getattr(module, k) == v for k, v in spec.kwargs.items() if k != 'img_size'):
      return spec
  raise TypeError(f'{type(module).__name__} has segments() but is no registered architecture')


# ---------------------------------------------------------------------- the layers found -----

LINEN_KINDS = ((nn.BatchNorm, 'batchnorm'), (nn.LayerNorm, 'layernorm'),
               (nn.GroupNorm, 'groupnorm'), (nn.Embed, 'embedding'), (nn.Conv, 'conv'),
               (nn.ConvTranspose, 'conv'), (nn.Dense, 'linear'), (nn.DenseGeneral, 'linear'),
               (nn.Einsum, 'linear'))
NNX_KINDS = ((nnx.BatchNorm, 'batchnorm'), (nnx.LayerNorm, 'layernorm'),
             (nnx.GroupNorm, 'groupnorm'), (nnx.Embed, 'embedding'), (nnx.Conv, 'conv'),
             (nnx.ConvTranspose, 'conv'), (nnx.Linear, 'linear'), (nnx.LinearGeneral, 'linear'),
             (nnx.Einsum, 'linear'))


def _kind_of(module, table) -> str | None:
  return next((kind for cls, kind in table if isinstance(module, cls)), None)


def linen_inventory(module: nn.Module, example: jax.Array) -> list[layers_lib.Layer]:
  """Every layer of LINEN_KINDS that `module` calls on `example`, in call order, named by path."""
  calls: dict[tuple[str, ...], nn.Module] = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and _kind_of(context.module, LINEN_KINDS):
      calls.setdefault(tuple(context.module.scope.path), context.module)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    shapes = jax.eval_shape(module.init, jax.random.key(0), example)
  return _layers([(path, _kind_of(m, LINEN_KINDS), getattr(m, 'feature_group_count', 1))
                  for path, m in calls.items()], shapes)


def _layers(found: Sequence[tuple[tuple, str, int]], shapes: dict) -> list[layers_lib.Layer]:
  """Layers of (path, kind, groups) with the leaves under each path in `shapes`; a layer's block
  is its parent module and its stage the first part of its path (both itself at the top
  level)."""
  layers = []
  for path, kind, groups in found:
    leaves = {}
    for collection in COLLECTIONS:
      node = shapes.get(collection, {})
      for part in path:
        node = node.get(part, {}) if isinstance(node, dict) else {}
      leaves.update({f'{collection}/{k}': tuple(v.shape) for k, v in node.items()
                     if not isinstance(v, dict)})
    if not leaves:
      continue  # a shared module called twice, or one without variables
    kernel = leaves.get('params/kernel', ())
    if kind == 'conv' and groups > 1 and len(kernel) == 4 and kernel[2] == 1:
      kind = 'depthwise_conv'
    name = '.'.join(map(str, path))
    layers.append(layers_lib.Layer(name=name, path=tuple(path), kind=kind, shapes=leaves,
                                   block='.'.join(map(str, path[:-1])) or name,
                                   stage=str(path[0]), index=len(layers), groups=groups))
  return layers


# ------------------------------------------------------------------------------ NNX -----------

def _nnx(model: nnx.Module, example: jax.Array, scheme: str | None,
         fresh: Callable[[jax.Array], nnx.Module] | None) -> Adapted:
  model = nnx.clone(model)
  model.eval()
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  variables = {'params': nnx.to_pure_dict(params), 'batch_stats': nnx.to_pure_dict(stats)}

  def apply(tree: dict, x: jax.Array) -> jax.Array:
    own_params = jax.tree.map(lambda v: v, params)  # copies: the templates stay as they are
    own_stats = jax.tree.map(lambda v: v, stats)
    nnx.replace_by_pure_dict(own_params, tree['params'])
    nnx.replace_by_pure_dict(own_stats, tree['batch_stats'])
    return nnx.merge(graphdef, own_params, own_stats, rest)(x)

  layers = nnx_inventory(model, example, variables)
  if scheme:
    draw = lambda key: init.fresh_variables(layers, scheme, key)
  elif fresh is not None:
    def draw(key):
      new = fresh(key)
      new.eval()
      _, new_params, new_stats, _ = nnx.split(new, nnx.Param, nnx.BatchStat, ...)
      return {'params': nnx.to_pure_dict(new_params), 'batch_stats': nnx.to_pure_dict(new_stats)}
  else:
    draw = lambda key: _flax_defaults(layers, key)
  return Adapted(layers, variables, apply, draw)


def nnx_inventory(model: nnx.Module, example: jax.Array, variables: dict
                  ) -> list[layers_lib.Layer]:
  """Every layer of NNX_KINDS that `model` calls on `example`, in call order, named by path."""
  paths = {id(node): path for path, node in nnx.iter_graph(model) if isinstance(node, nnx.Module)}
  order: list[int] = []
  originals = {cls: cls.__call__ for cls, _ in NNX_KINDS}

  def recording(cls):
    def call(self, *args, **kwargs):
      if id(self) not in order:
        order.append(id(self))
      return originals[cls](self, *args, **kwargs)
    return call
  try:
    for cls, _ in NNX_KINDS:
      cls.__call__ = recording(cls)
    jax.eval_shape(lambda x: model(x), example)
  finally:
    for cls, call in originals.items():
      cls.__call__ = call
  modules = {id(node): node for _, node in nnx.iter_graph(model)}
  shapes = jax.tree.map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.result_type(v)),
                        variables)
  found = []
  for ident in order:
    node = modules[ident]
    kind = next(k for cls, k in NNX_KINDS if isinstance(node, cls))
    groups = getattr(node, 'feature_group_count', 1)
    found.append((paths[ident], kind, groups))
  return _layers(found, shapes)


def _flax_defaults(layers: Sequence[layers_lib.Layer], key: jax.Array) -> dict:
  """A fresh model by flax's default initialisers of each class: kernels lecun_normal, biases 0,
  norms 1/0 with running statistics 0/1, embeddings N(0, 1)."""
  tree: dict = {}
  lecun = nn.initializers.lecun_normal()
  for layer in layers:
    layer_key = jax.random.fold_in(key, layer.index)
    for name, shape in layer.shapes.items():
      collection, leaf = name.split('/')
      if leaf == 'kernel':
        value = lecun(layer_key, shape, jnp.float32)
      elif leaf == 'embedding':
        value = jax.random.normal(layer_key, shape, jnp.float32)
      elif leaf in ('scale', 'var'):
        value = jnp.ones(shape, jnp.float32)
      else:
        value = jnp.zeros(shape, jnp.float32)
      node = tree.setdefault(collection, {})
      for part in layer.path:
        node = node.setdefault(part, {})
      node[leaf] = value
  return tree
