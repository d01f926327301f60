"""ConvNeXt in Flax, laid out like timm's ``ConvNeXt``.

Variable paths mirror timm's state_dict keys (``params/stages/1/blocks/0/conv_dw/kernel`` is
``stages.1.blocks.0.conv_dw.weight``; a block's layer scale ``stages.1.blocks.0.gamma`` is
``params/stages/1/blocks/0/gamma/value``). The stem is a 4x4 conv of stride 4 and a LayerNorm
(``stem.0``, ``stem.1``); every stage but the first opens with a downsample, LayerNorm and 2x2
conv of stride 2 (``stages.N.downsample.0``, ``.1``); a block is a 7x7 depthwise conv, a
LayerNorm over channels, two pointwise Linears with exact GELU (``mlp.fc1``, ``mlp.fc2``; 1x1
convs in the small variants, timm's conv_mlp, the same function), times the layer scale, plus
the block's input. The head averages over space, normalises and classifies (``head.norm``,
``head.fc``). Every LayerNorm has eps 1e-6; timm's LayerNorm2d is a LayerNorm over the channel
axis, which NHWC makes the last.

The forward is a chain of segments, ``stem``, one per block (``stages.0.blocks.0``, ...) and
``head``; a stage's downsample runs in its first block's segment.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lc_jax import constants
from lc_jax import init
from lc_jax import layers
from lc_jax.models import common
from lc_jax.models import registry

FAMILY = 'convnext'  # its architectures' family in the registry, which its recipe shares

LS_INIT_VALUE = 1e-6  # timm's ls_init_value: a fresh block's layer scale
HEAD_INIT_SCALE = 1.0  # timm's head_init_scale: a fresh head's weight and bias times this


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2 on the channel axis: Linears, or 1x1 convs (timm's ConvMlp)."""

  hidden: int
  conv: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    def dense(features, name):
      if self.conv:
        return nn.Conv(features, (1, 1), dtype=self.dtype, name=name)
      return nn.Dense(features, dtype=self.dtype, name=name)
    y = common.gelu(dense(self.hidden, 'fc1')(x))
    return dense(x.shape[-1], 'fc2')(y)


class Block(nn.Module):
  """x + gamma * mlp(norm(conv_dw(x)))."""

  conv_mlp: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    y = common.DepthwiseConv(width, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=width,
                             use_bias=True, dtype=self.dtype, name='conv_dw')(x)
    y = common.layer_norm(dtype=self.dtype, name='norm')(y)
    y = Mlp(4 * width, self.conv_mlp, self.dtype, name='mlp')(y)
    gamma = common.Parameter((width,), 'layer_scale', name='gamma')()
    return x + y * gamma.astype(self.dtype)


class Downsample(nn.Module):
  """timm's ``Sequential(LayerNorm2d, Conv2d(k=2, s=2))`` opening a stage, children '0', '1'."""

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = common.layer_norm(dtype=self.dtype, name='0')(x)
    return nn.Conv(self.features, (2, 2), strides=(2, 2), padding='VALID', dtype=self.dtype,
                   name='1')(x)


class Blocks(nn.Module):
  """A stage's ``blocks``: a run of blocks named '0', '1', ..."""

  depth: int
  conv_mlp: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, start: int, stop: int):
    for index in range(start, stop):
      x = Block(self.conv_mlp, self.dtype, name=str(index))(x)
    return x


class Stages(nn.Module):
  """timm's ``stages``: stage N is ``stages.N``, its downsample (stages after the first) and its
  ``blocks``.

  The caller runs it stage by stage (`stage`), as the segments it runs ask.
  """

  depths: Sequence[int]
  dims: Sequence[int]
  conv_mlp: bool
  dtype: Any = jnp.float32

  @nn.compact
  def stage(self, x, index: int, start: int, stop: int):
    """Runs blocks [start, stop) of stage `index` on `x`; its downsample runs with block 0."""
    return StageBody(self.dims[index], self.depths[index], index > 0, self.conv_mlp, self.dtype,
                     name=str(index))(x, start, stop)


class StageBody(nn.Module):
  """One stage: the downsample (if it has one, with block 0) and blocks [start, stop)."""

  width: int
  depth: int
  downsample: bool
  conv_mlp: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, start: int, stop: int):
    if start == 0 and self.downsample:
      x = Downsample(self.width, self.dtype, name='downsample')(x)
    return Blocks(self.depth, self.conv_mlp, self.dtype, name='blocks')(x, start, stop)


class Stem(nn.Module):
  """timm's ``Sequential(Conv2d(k=4, s=4), LayerNorm2d)``, children '0', '1'."""

  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (4, 4), strides=(4, 4), padding='VALID', dtype=self.dtype,
                name='0')(x)
    return common.layer_norm(dtype=self.dtype, name='1')(x)


class Head(nn.Module):
  """timm's ``NormMlpClassifierHead`` without its pre-logits: LayerNorm, then the fc."""

  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = common.layer_norm(dtype=self.dtype, name='norm')(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


class ConvNeXt(common.SegmentedModel):
  """ConvNeXt classifier on NHWC images in [0, 1]; normalisation is part of the model."""

  depths: Sequence[int]
  dims: Sequence[int]
  conv_mlp: bool = False

  @nn.nowrap
  def blocks_per_stage(self) -> tuple[int, ...]:
    """Blocks per stage (common.SegmentedModel)."""
    return tuple(self.depths)

  @nn.nowrap
  def block_name(self, stage: int, index: int) -> str:
    """'stages.0.blocks.0', ...: timm's name of block `index` of stage `stage`."""
    return f'stages.{stage}.blocks.{index}'

  @nn.nowrap  # builds a module of its own, not a child of this one
  def block_module(self, stage: int, index: int) -> nn.Module | None:
    """Block `index` of stage `stage` on its own (common.SegmentedModel); None for the first
    block of a stage after the first, whose segment runs the stage's downsample too."""
    return None if stage and not index else Block(self.conv_mlp, self.dtype)

  def place(self, path: Sequence[str]) -> tuple[str, str] | None:
    """A stage's layers: block 'stages.N.blocks.M' (block 0 for the downsample), stage
    'stages.N'."""
    if path[0] != 'stages':
      return None
    block = path[3] if path[2] == 'blocks' else '0'
    return f'stages.{path[1]}.blocks.{block}', f'stages.{path[1]}'

  def sub_kind(self, path: Sequence[str], kind: str) -> str:
    """The MLP's Linears (or 1x1 convs) are 'mlp'."""
    return 'mlp' if len(path) > 1 and path[-2] == 'mlp' else kind

  def is_branch_end(self, path: Sequence[str]) -> bool:
    """The layer scale ends a block's branch: at 0 the block returns its input."""
    return path[-1] == 'gamma'

  @nn.nowrap
  def forward_stem(self, x):
    """timm's ``stem``: the 4x4 patchify conv and a LayerNorm."""
    return Stem(self.dims[0], self.dtype, name='stem')(x)

  @nn.nowrap
  def stage_runner(self) -> common.StageRunner:
    """Stage N is timm's ``stages.N``."""
    return Stages(self.depths, self.dims, self.conv_mlp, self.dtype, name='stages').stage

  @nn.nowrap
  def forward_head(self, x):
    """The global average pool, then timm's ``head``: a LayerNorm and the fc."""
    return Head(self.num_classes, self.dtype, name='head')(jnp.mean(x, axis=(1, 2)))


# ------------------------------------------------------------------------ initialisation -------
# As timm draws a fresh ConvNeXt (_init_weights): every conv and Linear weight ~
# trunc_normal(std .02), bias 0, the head's fc then times head_init_scale; LayerNorm 1/0; layer
# scale ls_init_value.

def _timm_convnext(layer: layers.Layer, key) -> init.Leaves:
  if layer.kind == 'layernorm':
    return init.layernorm(layer)
  if layer.kind == 'layer_scale':
    return init.constant(layer, LS_INIT_VALUE)
  gain = HEAD_INIT_SCALE if layer.name.startswith('head.') else 1.0
  return init.trunc_normal_zero_bias(layer, key, gain=gain)


init.register_scheme('timm_convnext', _timm_convnext)

# (depths, dims, conv_mlp) of timm's convnext_* model functions.
_VARIANTS = {
    'convnext_atto': ((2, 2, 6, 2), (40, 80, 160, 320), True),
    'convnext_tiny': ((3, 3, 9, 3), (96, 192, 384, 768), False),
    'convnext_small': ((3, 3, 27, 3), (96, 192, 384, 768), False),
    'convnext_base': ((3, 3, 27, 3), (128, 256, 512, 1024), False),
}

for _name, (_depths, _dims, _conv_mlp) in _VARIANTS.items():
  registry.register(registry.Architecture(
      name=_name, family=FAMILY, build=ConvNeXt,
      kwargs={'depths': _depths, 'dims': _dims, 'conv_mlp': _conv_mlp},
      mean=constants.IMAGENET_MEAN, std=constants.IMAGENET_STD, input_size=224, timm_name=_name,
      # a block is 'stages.N.blocks.M': four path components
      init_scheme='timm_convnext', block_depth=4))
