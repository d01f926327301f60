"""EfficientNet-Lite0..Lite4 in Flax, laid out like timm's ``tf_efficientnet_lite0..4``.

Variable paths mirror timm's state_dict keys (``params/blocks/1/0/conv_pw/kernel`` is
``blocks.1.0.conv_pw.weight``): ``blocks/S/I`` is block I of stage S. These are the TF-trained
networks, so convs pad like TensorFlow's 'SAME' (asymmetric, extra row/column at the bottom/right
when a strided conv needs odd padding), BatchNorm uses TF's eps 1e-3, and the activation is
ReLU6. Unlike EfficientNet-B*, Lite has no squeeze-excite, and its stem (32) and head (1280)
widths stay fixed while the stages are scaled.

The forward is a chain of segments, ``stem``, one per block (``blocks.0.0``, ...) and ``head``;
``apply(variables, x, start, stop)`` runs segments [start, stop) only (see `lc_jax.evaluate`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lc_jax import constants
from lc_jax import init
from lc_jax import layers
from lc_jax.models import common
from lc_jax.models import registry

FAMILY = 'efficientnet_lite'  # its architectures' family in the registry, which its recipe shares

# timm's BN_EPS_TF_DEFAULT: TensorFlow's BatchNormalization default, which these weights used.
BN_EPS = 1e-3

STEM_WIDTH = 32
HEAD_WIDTH = 1280

# EfficientNet-B0's stages, which Lite0 keeps: the first is a depthwise-separable block,
# the rest are inverted residuals with expansion 6.
BASE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
BASE_WIDTHS = (16, 24, 40, 80, 112, 192, 320)
KERNELS = (3, 3, 5, 3, 5, 5, 3)
STRIDES = (1, 2, 2, 2, 1, 2, 1)
EXPANSIONS = (1, 6, 6, 6, 6, 6, 6)


def make_divisible(value: float, divisor: int = 8) -> int:
  """timm's `make_divisible`: the nearest multiple of `divisor`, never more than 10% below."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def stage_widths(channel_multiplier: float) -> tuple[int, ...]:
  """Output channels of each stage, scaled and rounded as timm's `round_channels` does."""
  return tuple(make_divisible(w * channel_multiplier) for w in BASE_WIDTHS)


def stage_depths(depth_multiplier: float) -> tuple[int, ...]:
  """Blocks per stage: repeats scaled up (ceil), except the first and last stage (Lite's rule)."""
  last = len(BASE_DEPTHS) - 1
  return tuple(d if s in (0, last) else int(math.ceil(d * depth_multiplier))
               for s, d in enumerate(BASE_DEPTHS))


def _conv(features: int, kernel: int, stride: int = 1, *, groups: int = 1, dtype: Any,
          name: str) -> nn.Conv:
  # timm's Conv2dSame pads like TF 'SAME'; flax's 'SAME' splits the padding identically.
  cls = common.DepthwiseConv if groups > 1 else nn.Conv
  return cls(features, (kernel, kernel), strides=(stride, stride), padding='SAME',
             feature_group_count=groups, use_bias=False, dtype=dtype, name=name)


class BatchNormAct(nn.Module):
  """timm's BatchNormAct2d at inference: BatchNorm with running statistics, then ReLU6 if `act`.

  One module, as in timm, so that its output is what a torch hook on the same name sees. Its
  variables are nn.BatchNorm's (params scale/bias, batch_stats mean/var).
  """

  act: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    shape = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, shape, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, shape, jnp.float32)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, shape, jnp.float32).value
    var = self.variable('batch_stats', 'var', jnp.ones, shape, jnp.float32).value
    y = (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
    if self.act:
      y = nn.relu6(y)
    return y.astype(self.dtype)


class DepthwiseSeparable(nn.Module):
  """Depthwise conv -> pointwise conv, no expansion; timm's DepthwiseSeparableConv (stage 0)."""

  features: int
  kernel: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    y = _conv(in_features, self.kernel, self.stride, groups=in_features, dtype=self.dtype,
              name='conv_dw')(x)
    y = BatchNormAct(dtype=self.dtype, name='bn1')(y)
    y = _conv(self.features, 1, dtype=self.dtype, name='conv_pw')(y)
    y = BatchNormAct(act=False, dtype=self.dtype, name='bn2')(y)
    if self.stride == 1 and in_features == self.features:
      y = y + x
    return y


class InvertedResidual(nn.Module):
  """Pointwise expansion -> depthwise conv -> linear projection; timm's InvertedResidual."""

  features: int
  kernel: int
  stride: int = 1
  expansion: int = 6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    mid = make_divisible(in_features * self.expansion)
    y = _conv(mid, 1, dtype=self.dtype, name='conv_pw')(x)
    y = BatchNormAct(dtype=self.dtype, name='bn1')(y)
    y = _conv(mid, self.kernel, self.stride, groups=mid, dtype=self.dtype, name='conv_dw')(y)
    y = BatchNormAct(dtype=self.dtype, name='bn2')(y)
    y = _conv(self.features, 1, dtype=self.dtype, name='conv_pwl')(y)
    y = BatchNormAct(act=False, dtype=self.dtype, name='bn3')(y)
    if self.stride == 1 and in_features == self.features:
      y = y + x
    return y


def _make_block(stage: int, width: int, index: int, dtype: Any,
                name: str | None = None) -> nn.Module:
  """Block `index` of stage number `stage` (kernel, stride, expansion from the tables above);
  only the first one strides."""
  kernel, expansion = KERNELS[stage], EXPANSIONS[stage]
  stride = STRIDES[stage] if index == 0 else 1
  if expansion == 1:
    return DepthwiseSeparable(width, kernel, stride, dtype, name=name)
  return InvertedResidual(width, kernel, stride, expansion, dtype, name=name)


class Stage(nn.Module):
  """Stage number `stage` (kernel, stride, expansion from the tables above) with `depth` blocks.

  Blocks are named '0', '1', ...; only the first one strides.
  """

  stage: int
  width: int
  depth: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, start: int = 0, stop: int | None = None):
    """Runs blocks [start, stop) of the stage (all by default)."""
    for index in range(start, self.depth if stop is None else stop):
      x = _make_block(self.stage, self.width, index, self.dtype, name=str(index))(x)
    return x


class Blocks(nn.Module):
  """timm's ``blocks``: stages named '0', '1', ..., each a run of blocks named '0', '1', ...

  The caller runs it stage by stage (`stage`), so that it can record every stage's output under
  its torch name; a `__call__` returning all of them would not be what torch's ``blocks`` returns.
  """

  widths: Sequence[int]
  depths: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def stage(self, x, index: int, start: int = 0, stop: int | None = None):
    """Runs blocks [start, stop) of stage `index` on `x`."""
    return Stage(index, self.widths[index], self.depths[index], self.dtype,
                 name=str(index))(x, start, stop)


class EfficientNetLite(common.SegmentedModel):
  """EfficientNet-Lite classifier on NHWC images in [0, 1]; normalisation is part of the model."""

  widths: Sequence[int]
  depths: Sequence[int]

  @nn.nowrap
  def blocks_per_stage(self) -> tuple[int, ...]:
    """Blocks per stage (common.SegmentedModel)."""
    return tuple(self.depths)

  @nn.nowrap
  def block_name(self, stage: int, index: int) -> str:
    """'blocks.0.0', ...: timm's name of block `index` of stage `stage`."""
    return f'blocks.{stage}.{index}'

  @nn.nowrap  # builds a module of its own, not a child of this one
  def block_module(self, stage: int, index: int) -> nn.Module:
    """Block `index` of stage `stage` on its own (common.SegmentedModel)."""
    return _make_block(stage, self.widths[stage], index, self.dtype)

  @nn.nowrap
  def forward_stem(self, x):
    """conv_stem and bn1."""
    x = _conv(STEM_WIDTH, 3, 2, dtype=self.dtype, name='conv_stem')(x)
    x = BatchNormAct(dtype=self.dtype, name='bn1')(x)
    self.sow('intermediates', 'stem', x)
    return x

  @nn.nowrap
  def stage_runner(self) -> common.StageRunner:
    """Stage S is timm's ``blocks.S``; a stage's output is recorded under that name."""
    blocks = Blocks(self.widths, self.depths, self.dtype, name='blocks')

    def run(x, stage, lo, hi):
      x = blocks.stage(x, stage, lo, hi)
      if hi == self.depths[stage]:  # named as timm's stage modules: also a torch hook target
        self.sow('intermediates', f'blocks.{stage}', x)
      return x
    return run

  @nn.nowrap
  def forward_head(self, x):
    """conv_head, bn2, the global average pool and the classifier."""
    x = _conv(HEAD_WIDTH, 1, dtype=self.dtype, name='conv_head')(x)
    x = BatchNormAct(dtype=self.dtype, name='bn2')(x)
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'pool', x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)


# (channel multiplier, depth multiplier, input size): multipliers from timm's
# _gen_efficientnet_lite, input sizes from timm's pretrained configs of tf_efficientnet_liteN.
_VARIANTS = {
    'efficientnet_lite0': (1.0, 1.0, 224),
    'efficientnet_lite1': (1.0, 1.1, 240),
    'efficientnet_lite2': (1.1, 1.2, 260),
    'efficientnet_lite3': (1.2, 1.4, 300),
    'efficientnet_lite4': (1.4, 1.8, 380),
}



# ------------------------------------------------------------------------ initialisation -------
# timm initialises EfficientNets as TF did ('goog'): conv weight ~ N(0, 2 / fan_out) with
# fan_out = kh * kw * out_ch / groups; BatchNorm 1/0; Linear weight ~ U(+-1/sqrt(out_features)),
# bias 0.

def _goog(layer: layers.Layer, key) -> init.Leaves:
  if layer.kind == 'batchnorm':
    return init.batchnorm(layer)
  if layer.kind == 'linear':
    bound = 1 / math.sqrt(layer.shapes['params/kernel'][1])
    return {'params/kernel': init.uniform(key, layer.shapes['params/kernel'], bound),
            'params/bias': np.zeros(layer.shapes['params/bias'], np.float32)}
  return init.kaiming_normal_fan_out(layer, key, divide_by_groups=True)


init.register_scheme('goog', _goog)

for _name, (_width_mult, _depth_mult, _size) in _VARIANTS.items():
  registry.register(registry.Architecture(
      name=_name, family=FAMILY, build=EfficientNetLite,
      kwargs={'widths': stage_widths(_width_mult), 'depths': stage_depths(_depth_mult)},
      # timm's pretrained config of the tf_efficientnet_lite* weights: inputs scaled to [-1, 1]
      mean=constants.IMAGENET_INCEPTION_MEAN, std=constants.IMAGENET_INCEPTION_STD,
      input_size=_size, timm_name=f'tf_{_name}',
      # timm initialises EfficientNets as TF did ('goog'); a block is 'blocks.S.I', three parts.
      init_scheme='goog', block_depth=3))
