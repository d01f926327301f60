"""Pure reset functions: variables in, variables out; the original tree is never mutated.

Every function returns a tree of the same structure, shapes and dtypes as its input, so a
jitted forward that takes the variables as an argument serves every reset without compiling
again. Unchanged subtrees are shared with the input, not copied. New leaves are made on the host
(numpy) unless they are traced, so a reset compiles no program of its own.

Modes (the `mode` of `make`):
- 'fresh': the target's parameters, and a BatchNorm's running statistics, from a freshly
  initialised model (`lc_jax.init.fresh_variables`, one per trial);
- 'zero': the target's learnable parameters set to zero, running statistics kept (what the
  paper's code does);
- 'checkpoint': values from another checkpoint of the same architecture, e.g. the weights at
  epoch 0 (Zhang et al.'s re-initialisation);
- 'interpolate': (1 - alpha) * fresh + alpha * trained (Chatterji et al.'s module criticality);
- 'skip': at block granularity, residual branches are removed so the block returns its
  shortcut (Veit et al.'s lesion): the layer that ends each selected branch outputs 0.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lc_jax import errors
from lc_jax import layers as layers_lib
from lc_jax.errors import UserError
from lc_jax.layers import Layer, Target

MODES = ('fresh', 'zero', 'checkpoint', 'interpolate', 'skip')
# The modes that draw a fresh model per trial; the others give the same numbers every time.
RANDOM_MODES = ('fresh', 'interpolate')
# What 'skip' zeroes besides the selected types: the layers that end a residual branch
# (BatchNorm in ResNets and EfficientNets, layer scale in ConvNeXts; a ViT's branch ends are
# Linears, selected by type: attn_proj, mlp or both with linear).
BRANCH_ENDS = ('batchnorm', 'layer_scale')
Reset = Callable[[dict, Target], dict]


def trials(mode: str, asked: int) -> int:
  """Trials run: `asked` for a random mode, one for the deterministic ones."""
  return asked if mode in RANDOM_MODES else 1


def layer_types(mode: str, types: Iterable[str]) -> list[str]:
  """The layer types a reset of `mode` selects from: `types`, and for 'skip' the branch ends."""
  types = [t.strip() for t in types if t.strip()]
  if mode == 'skip':
    types += [t for t in BRANCH_ENDS if t not in types]
  return types


def targets(layers: Sequence[Layer], mode: str, types: Iterable[str], pattern: str = '',
            granularity: str = 'layer') -> list[Target]:
  """The targets of a run in forward order (lc_jax.layers.select of `layer_types`); 'skip' keeps
  only those with a residual layer (the stem and head have no shortcut to return)."""
  chosen = layers_lib.select(layers, layer_types(mode, types), pattern, granularity)
  if mode == 'skip':
    chosen = [t for t in chosen if any(layer.residual for layer in t.layers)]
  return chosen


def _get(tree: dict, path: Iterable[str]):
  for part in path:
    tree = tree[part]
  return tree


def _set(tree: dict, path: tuple[str, ...], value) -> dict:
  """A copy of `tree` with the subtree at `path` replaced; only the dicts on the path are new."""
  if not path:
    return value
  return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def map_layers(variables: dict, layers: Iterable[Layer],
               fn: Callable[[Layer, str, str, jax.Array], jax.Array]) -> dict:
  """Applies `fn(layer, collection, leaf_name, value)` to every variable of `layers`."""
  for layer in layers:
    for collection in ('params', 'batch_stats'):
      node = variables.get(collection, {})
      try:
        node = _get(node, layer.path)
      except KeyError:
        continue
      new = {leaf: fn(layer, collection, leaf, value) for leaf, value in node.items()}
      variables = {**variables, collection: _set(variables[collection], layer.path, new)}
  return variables


def _traced(*values) -> bool:
  return any(isinstance(v, jax.core.Tracer) for v in values)


def _zeros_like(value):
  """Zeros of `value`'s shape and dtype: on the host, or traced where `value` is."""
  return jnp.zeros_like(value) if _traced(value) else np.zeros(np.shape(value), value.dtype)


def _like(new, old):
  """`new` cast to `old`'s dtype and checked against its shape: a reset never changes what jit
  sees."""
  if not hasattr(new, 'dtype'):
    new = np.asarray(new)
  if np.shape(new) != np.shape(old):
    raise UserError(f'reset weights of shape {np.shape(new)} do not fit a variable of shape '
                    f'{np.shape(old)}; the reset source is of another architecture')
  return new if new.dtype == old.dtype else new.astype(old.dtype)


def replace(variables: dict, layers: Iterable[Layer], source: dict) -> dict:
  """`variables` with the subtrees of `layers` taken from `source` (same architecture)."""
  return map_layers(variables, layers, lambda layer, collection, leaf, value: _like(
      _get(source[collection], layer.path)[leaf], value))


def zero(variables: dict, layers: Iterable[Layer]) -> dict:
  """`variables` with the learnable parameters of `layers` set to 0; running statistics kept."""
  return map_layers(variables, layers, lambda layer, collection, leaf, value: (
      _zeros_like(value) if collection == 'params' else value))


def interpolate(variables: dict, layers: Iterable[Layer], source: dict, alpha: float) -> dict:
  """(1 - alpha) * source + alpha * variables on `layers`: alpha 0 is a full reset, 1 none.

  `alpha` may be traced: `jax.vmap` over alphas gives one model per alpha."""
  if isinstance(alpha, (int, float)) and not 0.0 <= alpha <= 1.0:
    raise UserError(f'interpolation alpha must lie in [0, 1], got {alpha}')
  def mix(layer, collection, leaf, value):
    fresh = _get(source[collection], layer.path)[leaf]
    if _traced(alpha, fresh, value):
      return _like((1 - alpha) * jnp.asarray(fresh) + alpha * value, value)
    # On the host, in the variable's dtype: the scalars are cast first, as jnp casts a weak
    # Python float, so the values equal jnp's elementwise (1 - alpha) * fresh + alpha * value.
    dtype = np.dtype(value.dtype)
    return _like(dtype.type(1 - alpha) * np.asarray(fresh, dtype)
                 + dtype.type(alpha) * np.asarray(value), value)
  return map_layers(variables, layers, mix)


def skip(variables: dict, block: Target) -> dict:
  """The block's residual branches among the target's layers output 0: the block returns its
  shortcut plus the branches left.

  A branch ends in a layer whose parameters at 0 make it output exactly 0 whatever its input
  (`Layer.branch_end`): a ResNet's or EfficientNet's last BatchNorm (scale and bias), a ViT's
  attention projection or second MLP Linear, a ConvNeXt's layer scale. A ResNet block then
  computes relu(0 + shortcut), and its shortcut is non-negative, so relu leaves it as is. Which
  branches go is which ends the selected layer types include: a ViT block loses its attention
  branch with type attn_proj, its MLP branch with mlp, both with linear. Blocks without a
  shortcut (an EfficientNet block that strides or changes width) are refused.
  """
  ends = [layer for layer in block.layers if layer.branch_end and layer.residual]
  if not ends:
    raise UserError(f'{block.name!r} has no residual branch among its selected layers; skip '
                    'resets whole residual blocks (granularity block) and needs the layer type '
                    "that ends a branch: batchnorm (ResNet, EfficientNet), attn_proj or mlp "
                    '(ViT), layer_scale (ConvNeXt)')
  return map_layers(variables, ends, lambda layer, collection, leaf, value: (
      _zeros_like(value) if collection == 'params' else value))


def check_mode(mode: str) -> None:
  """Refuses an unknown reset mode, naming the known ones."""
  if mode not in MODES:
    raise errors.unknown('reset mode', mode, MODES)


def check_alpha(mode: str, alpha: float, field: str = 'alpha') -> None:
  """Refuses an interpolation share outside [0, 1], or one given to a mode that does not
  interpolate (it would change nothing, yet enter the run's identity)."""
  if not 0.0 <= alpha <= 1.0:
    raise UserError(f'{field}={alpha} must lie in [0, 1] (the trained weights\' share: 0 is the '
                    'reset, 1 the trained layer)')
  if alpha and mode != 'interpolate':
    raise UserError(f'{field}={alpha} applies to mode interpolate only, and this run resets in '
                    f'mode {mode}: leave it at 0, or interpolate')


def make(mode: str, all_layers: list[Layer], *, source: dict | None = None,
         alpha: float = 0.0) -> Reset:
  """The reset function `(variables, target) -> variables` of a mode.

  `source` is the fresh model of the trial ('fresh', 'interpolate') or the initial checkpoint
  ('checkpoint'); `alpha` is the trained weights' share for 'interpolate'.
  """
  check_mode(mode)
  if mode in ('fresh', 'checkpoint', 'interpolate') and source is None:
    raise UserError(f'reset mode {mode!r} needs reset weights (a fresh model or a checkpoint)')
  if mode in ('fresh', 'checkpoint'):
    return lambda variables, target: replace(variables, target.layers, source)
  if mode == 'interpolate':
    return lambda variables, target: interpolate(variables, target.layers, source, alpha)
  if mode == 'zero':
    return lambda variables, target: zero(variables, target.layers)
  return lambda variables, target: skip(variables, target)
