"""Which layers a model has, in forward order, and how a user selects the ones to reset.

A layer is a module with variables of its own: a Conv, Dense, BatchNorm or LayerNorm, or a
free-standing tensor (a ViT's position embedding, a ConvNeXt's layer scale); its name is the
torch module name ("layer1.0.conv1"), which is also its Flax path. Layers are grouped into blocks
("layer1.0") and stages ("layer1"); what comes before the first block is the stem, what follows
the last one is the head.

A family tells the inventory what the module tree alone does not, through optional methods of
its root module: `place(path)` (the block and stage of a layer outside the `block_depth` rule,
a ConvNeXt stage's downsample), `sub_kind(path, kind)` (a Dense of attention or MLP),
`on_shortcut(path)` (a projection shortcut) and `is_branch_end(path)` (the layer whose zero
output removes a residual branch; by default the branch's last BatchNorm).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import re
import warnings
from typing import Iterable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lc_jax import errors
from lc_jax import schema
from lc_jax.errors import UserError

# 'groupnorm' occurs in models outside the registry (lc_jax.adapters); 'attn_qkv', 'attn_proj'
# and 'mlp' are Linears of a transformer block's attention and MLP (a
# ConvNeXt's MLP too, 1x1 convs in its small variants); 'embedding' is a position embedding or
# class token, 'layer_scale' a per-channel branch scale (gamma).
KINDS = ('conv', 'depthwise_conv', 'linear', 'attn_qkv', 'attn_proj', 'mlp', 'batchnorm',
         'layernorm', 'groupnorm', 'embedding', 'layer_scale')
# A type a user selects -> the kinds it covers: a depthwise conv is a torch Conv2d, attention
# and MLP layers are Linears.
TYPES = {'conv': ('conv', 'depthwise_conv'), 'depthwise_conv': ('depthwise_conv',),
         'linear': ('linear', 'attn_qkv', 'attn_proj', 'mlp'), 'attn_qkv': ('attn_qkv',),
         'attn_proj': ('attn_proj',), 'mlp': ('mlp',), 'batchnorm': ('batchnorm',),
         'layernorm': ('layernorm',), 'groupnorm': ('groupnorm',), 'embedding': ('embedding',),
         'layer_scale': ('layer_scale',)}
DEFAULT_TYPES = ('conv', 'linear')  # the paper's released results: every Conv2d and Linear
GRANULARITIES = ('layer', 'block', 'stage')


@dataclasses.dataclass(frozen=True)
class Layer:
  """One resettable module."""

  name: str  # torch module name, e.g. 'layer1.0.downsample.0'
  path: tuple[str, ...]  # Flax path, e.g. ('layer1', '0', 'downsample', '0')
  kind: str  # one of KINDS
  shapes: dict[str, tuple[int, ...]]  # {'params/kernel': (3, 3, 64, 64), 'batch_stats/mean': ...}
  block: str  # 'layer1.0', or schema.STEM / schema.HEAD ('stem' / 'head')
  stage: str  # 'layer1', or schema.STEM / schema.HEAD
  index: int  # position in forward order among all layers
  groups: int = 1  # a conv's feature groups (its output channels for a depthwise conv)
  residual: bool = False  # its block adds a shortcut (identity or projection) to its branch
  shortcut: bool = False  # it lies on the block's projection shortcut, not on the branch
  branch_end: bool = False  # its zero output removes a residual branch (reset mode 'skip')

  @property
  def num_params(self) -> int:
    """Learnable parameters (running statistics not counted)."""
    return sum(math.prod(s) for k, s in self.shapes.items() if k.startswith('params/'))


@dataclasses.dataclass(frozen=True)
class Target:
  """What one reset replaces: a layer, or all layers of a block or stage."""

  name: str
  layers: tuple[Layer, ...]


def inventory(module: nn.Module, block_depth: int, input_size: int | None = None) -> list[Layer]:
  """Every layer of `module` in the order the forward pass calls them.

  The order is recorded by intercepting module calls while the model is traced abstractly
  (no weights are allocated); a layer is a module with variables of its own. `block_depth` is
  how many path components name a block. The family's optional methods (see the module
  docstring) place, refine and mark layers. The trace runs at `input_size`, by default the
  module's own `img_size` (a ViT's position embedding fixes it) or 64.
  """
  input_size = input_size or getattr(module, 'img_size', None) or 64
  calls: dict[tuple[str, ...], nn.Module] = {}
  same_shape: dict[str, bool] = {}  # block -> its output has its input's shape

  def record(next_fun, args, kwargs, context):
    path = tuple(context.module.scope.path)
    if context.method_name == '__call__':
      calls.setdefault(path, context.module)
    out = next_fun(*args, **kwargs)
    if len(path) == block_depth and args and hasattr(out, 'shape'):
      same_shape['.'.join(path)] = tuple(args[0].shape) == tuple(out.shape)
    return out

  images = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  with nn.intercept_methods(record):
    # The key is made inside the trace: an eager key would compile a program of its own.
    shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)

  place = getattr(module, 'place', lambda path: None)
  sub_kind = getattr(module, 'sub_kind', lambda path, kind: kind)
  layers, seen_block = [], False
  for path, layer_module in calls.items():
    leaves = {}  # the module's own variables; container modules have none
    for collection in ('params', 'batch_stats'):
      node = shapes.get(collection, {})
      for part in path:
        node = node.get(part, {})
      leaves.update({f'{collection}/{k}': tuple(v.shape) for k, v in node.items()
                     if not isinstance(v, dict)})
    if not leaves:
      continue
    placed = place(path)
    if placed is not None:
      (block, stage), seen_block = placed, True
    elif len(path) > block_depth:
      block, stage, seen_block = '.'.join(path[:block_depth]), '.'.join(path[:block_depth - 1]), True
    else:
      block = stage = schema.outside_blocks(seen_block)
    layers.append(Layer(name='.'.join(path), path=path,
                        kind=sub_kind(path, _kind(layer_module, leaves)), shapes=leaves,
                        block=block, stage=stage, index=len(layers),
                        groups=getattr(layer_module, 'feature_group_count', 1)))
  # A block has a shortcut if it keeps its input's shape (the identity can be added) or has a
  # projection; blocks that change shape without one have none.
  on_shortcut = getattr(module, 'on_shortcut', lambda path: False)
  layers = [dataclasses.replace(layer, shortcut=bool(on_shortcut(layer.path))) for layer in layers]
  projected = {layer.block for layer in layers if layer.shortcut}
  if hasattr(module, 'is_branch_end'):
    ends = {layer.name for layer in layers if module.is_branch_end(layer.path)}
  else:
    last_bn = {}  # block -> the name of the last BatchNorm on its branch
    for layer in layers:
      if layer.kind == 'batchnorm' and schema.in_block(layer.block) and not layer.shortcut:
        last_bn[layer.block] = layer.name
    ends = set(last_bn.values())
  return [dataclasses.replace(layer, residual=same_shape.get(layer.block, False)
                              or layer.block in projected, branch_end=layer.name in ends)
          for layer in layers]


def _kind(module: nn.Module, shapes: dict[str, tuple[int, ...]]) -> str:
  # Told by the variables, so a family's own BatchNorm variant (BN + activation in one module,
  # as timm's BatchNormAct2d) counts as a BatchNorm.
  if 'batch_stats/mean' in shapes and 'params/scale' in shapes:
    return 'batchnorm'
  if isinstance(module, nn.LayerNorm):
    return 'layernorm'
  if getattr(module, 'kind', None) in ('embedding', 'layer_scale'):  # models.common.Parameter
    return module.kind
  if isinstance(module, nn.Dense):
    return 'linear'
  if isinstance(module, nn.Conv):
    kernel = shapes['params/kernel']
    groups = module.feature_group_count
    return 'depthwise_conv' if groups > 1 and kernel[2] == 1 and kernel[3] == groups else 'conv'
  raise ValueError(f'layer {"/".join(module.scope.path)} of type {type(module).__name__} is '
                   'none of Conv, Dense, BatchNorm, LayerNorm or Parameter; the inventory does '
                   'not know it')


def select(layers: Sequence[Layer], types: Iterable[str] = DEFAULT_TYPES, pattern: str = '',
           granularity: str = 'layer') -> list[Target]:
  """The reset targets a user asked for, in forward order.

  `types` keeps layers of those kinds ('conv' covers depthwise convs). `pattern` narrows them:
  empty for all; 'first:N', 'last:N' or an index range 'A:B' over the typed layers; or a
  comma-separated list whose items are names (of a layer, or of a block, stage or module,
  standing for the layers in it), globs or regexes (full match) on layer names; a layer is
  selected when any item matches it. A plain name that matches nothing is an error naming the
  closest layers. `granularity` 'block' or 'stage' groups the selected layers into one target
  per block or stage.
  """
  types = [t.strip() for t in types if t.strip()]
  if not types:
    raise UserError(f'no layer type selected: give one or more of {", ".join(TYPES)}')
  unknown = [t for t in types if t not in TYPES]
  if unknown:
    raise errors.unknown('layer type', unknown[0], TYPES)
  if granularity not in GRANULARITIES:
    raise errors.unknown('granularity', granularity, GRANULARITIES)
  kinds = {k for t in types for k in TYPES[t]}
  typed = [layer for layer in layers if layer.kind in kinds]
  chosen = _match(typed, layers, pattern.strip())
  if not chosen:
    raise UserError(f'layer pattern {pattern!r} selects no layer of type {"/".join(types)}')
  if granularity == 'layer':
    return [Target(layer.name, (layer,)) for layer in chosen]
  groups: dict[str, list[Layer]] = {}
  for layer in chosen:
    groups.setdefault(getattr(layer, granularity), []).append(layer)
  return [Target(name, tuple(members)) for name, members in groups.items()]


def check_pattern(pattern: str) -> None:
  """Refuses what is wrong with a layer pattern before any model is at hand: 'first:' or
  'last:' followed by anything but a whole number."""
  count = re.fullmatch(r'(first|last):(.*)', pattern.strip())
  if count and not re.fullmatch(r'\d+', count[2].strip()):
    raise UserError(f'layer pattern {pattern.strip()!r}: {count[1]}: needs a whole number of '
                    f'layers, e.g. {count[1]}:2')


def _match(typed: list[Layer], every: Sequence[Layer], pattern: str) -> list[Layer]:
  if not pattern:
    return typed
  check_pattern(pattern)
  slice_match = re.fullmatch(r'(first|last):(\d+)|(-?\d*):(-?\d*)', pattern)
  if slice_match:
    if slice_match[1] == 'first':
      return typed[:int(slice_match[2])]
    if slice_match[1] == 'last':
      return typed[-int(slice_match[2]):] if int(slice_match[2]) else []
    start, stop = (int(v) if v else None for v in (slice_match[3], slice_match[4]))
    return typed[start:stop]
  names = [layer.name for layer in typed]
  chosen: set[str] = set()
  items = _split(pattern)
  for item in items:
    hits = {layer.name for layer in typed if _item_matches(item, layer)}
    if not hits and _is_plain_name(item):
      raise _unknown_layer(item, names, every)
    error = None if hits else _regex_error(item)
    if error:
      raise UserError(f'invalid layer pattern {item!r}: it is no regex ({error}), and as a glob '
                      'it matches no layer')
    if not hits and len(items) > 1:  # a typo in a list would otherwise pass unnoticed
      span = f', {names[0]} to {names[-1]}' if names else ''
      raise UserError(f'layer pattern item {item!r} (of {pattern!r}) matches no layer of '
                      f'the selected types (the model has {len(names)} such layers{span})')
    chosen |= hits
  return [layer for layer in typed if layer.name in chosen]


def _split(pattern: str) -> list[str]:
  """Comma-separated items; commas inside (), [] or {} belong to a regex ('[0-9]{1,2}')."""
  items, depth, current = [], 0, ''
  for char in pattern:
    depth += (char in '([{') - (char in ')]}')
    if char == ',' and depth == 0:
      items.append(current)
      current = ''
    else:
      current += char
  return [item.strip() for item in items + [current] if item.strip()]


def _item_matches(item: str, layer: Layer) -> bool:
  """A name (of the layer, its block or stage, or a module containing it), a glob or a regex."""
  if item in (layer.name, layer.block, layer.stage) or layer.name.startswith(item + '.'):
    return True
  if _is_plain_name(item):
    return False
  if fnmatch.fnmatchcase(layer.name, item):
    return True
  regex = _compiled(item)  # not a regex ('*.conv1'): the glob above has had its say
  return isinstance(regex, re.Pattern) and regex.fullmatch(layer.name) is not None


def _regex_error(item: str) -> str | None:
  """Why `item` does not compile as a regex, or None when it does."""
  regex = _compiled(item)
  return regex if isinstance(regex, str) else None


@functools.lru_cache(maxsize=256)
def _compiled(item: str) -> re.Pattern | str:
  """`item` compiled as a regex, or why it does not compile."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', FutureWarning)  # 'possible nested set': a regex all the same
    try:
      return re.compile(item)
    except re.error as e:
      return str(e)


def _is_plain_name(pattern: str) -> bool:
  return re.fullmatch(r'[A-Za-z_][\w]*(\.[\w]+)*', pattern) is not None


def _unknown_layer(name: str, typed_names: list[str], every: Sequence[Layer]) -> UserError:
  other = next((layer for layer in every if layer.name == name), None)
  if other is not None:
    return UserError(f'layer {name!r} is a {other.kind} layer, which the selected types leave '
                     f'out; add {other.kind.replace("depthwise_", "")} to the layer types')
  return errors.unknown('layer', name, typed_names)
