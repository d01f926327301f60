"""EfficientNet-Lite0..Lite4 in Flax, laid out like timm's ``tf_efficientnet_lite0..4``.

Variable paths mirror timm's state_dict keys (``params/blocks/1/0/conv_pw/kernel`` is
``blocks.1.0.conv_pw.weight``): ``blocks/S/I`` is block I of stage S. These are the TF-trained
networks, so convs pad like TensorFlow's 'SAME' (asymmetric, extra row/column at the bottom/right
when a strided conv needs odd padding), BatchNorm uses TF's eps 1e-3, and the activation is
ReLU6. Unlike EfficientNet-B*, Lite has no squeeze-excite, and its stem (32) and head (1280)
widths stay fixed while the stages are scaled.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lc_jax.models import common
from lc_jax.models import registry

# timm's BN_EPS_TF_DEFAULT: TensorFlow's BatchNormalization default, which these weights used.
BN_EPS = 1e-3

# timm's pretrained config for the tf_efficientnet_lite* weights: inputs scaled to [-1, 1].
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)

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
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding='SAME',
                 feature_group_count=groups, use_bias=False, dtype=dtype, name=name)


def _bn(name: str, dtype: Any) -> nn.BatchNorm:
  return common.batch_norm(dtype=dtype, eps=BN_EPS, name=name)


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
    y = nn.relu6(_bn('bn1', self.dtype)(y))
    y = _conv(self.features, 1, dtype=self.dtype, name='conv_pw')(y)
    y = _bn('bn2', self.dtype)(y)
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
    y = nn.relu6(_bn('bn1', self.dtype)(y))
    y = _conv(mid, self.kernel, self.stride, groups=mid, dtype=self.dtype, name='conv_dw')(y)
    y = nn.relu6(_bn('bn2', self.dtype)(y))
    y = _conv(self.features, 1, dtype=self.dtype, name='conv_pwl')(y)
    y = _bn('bn3', self.dtype)(y)
    if self.stride == 1 and in_features == self.features:
      y = y + x
    return y


class Stage(nn.Module):
  """Stage number `stage` (kernel, stride, expansion from the tables above) with `depth` blocks.

  Blocks are named '0', '1', ...; only the first one strides.
  """

  stage: int
  width: int
  depth: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel, expansion = KERNELS[self.stage], EXPANSIONS[self.stage]
    for index in range(self.depth):
      stride = STRIDES[self.stage] if index == 0 else 1
      if expansion == 1:
        block = DepthwiseSeparable(self.width, kernel, stride, self.dtype, name=str(index))
      else:
        block = InvertedResidual(self.width, kernel, stride, expansion, self.dtype,
                                 name=str(index))
      x = block(x)
    return x


class Blocks(nn.Module):
  """timm's ``blocks``: stages named '0', '1', ..., each a run of blocks named '0', '1', ...

  Returns the output of every stage, so the caller can record each one.
  """

  widths: Sequence[int]
  depths: Sequence[int]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    outputs = []
    for stage, (width, depth) in enumerate(zip(self.widths, self.depths)):
      x = Stage(stage, width, depth, self.dtype, name=str(stage))(x)
      outputs.append(x)
    return outputs


class EfficientNetLite(nn.Module):
  """EfficientNet-Lite classifier on NHWC images in [0, 1]; normalisation is part of the model."""

  widths: Sequence[int]
  depths: Sequence[int]
  num_classes: int = 1000
  mean: Sequence[float] = MEAN
  std: Sequence[float] = STD
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = common.normalize(images, self.mean, self.std, self.dtype)

    x = _conv(STEM_WIDTH, 3, 2, dtype=self.dtype, name='conv_stem')(x)
    x = nn.relu6(_bn('bn1', self.dtype)(x))
    self.sow('intermediates', 'stem', x)

    # Named like timm's stage modules (`blocks.0` ...), so a name works as a torch hook target.
    outputs = Blocks(self.widths, self.depths, self.dtype, name='blocks')(x)
    for stage, y in enumerate(outputs):
      self.sow('intermediates', f'blocks.{stage}', y)
    x = outputs[-1]

    x = _conv(HEAD_WIDTH, 1, dtype=self.dtype, name='conv_head')(x)
    x = nn.relu6(_bn('bn2', self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'pool', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='classifier')(x)
    return x.astype(jnp.float32)


# (channel multiplier, depth multiplier, input size), as in timm's _gen_efficientnet_lite.
_VARIANTS = {
    'efficientnet_lite0': (1.0, 1.0, 224),
    'efficientnet_lite1': (1.0, 1.1, 240),
    'efficientnet_lite2': (1.1, 1.2, 260),
    'efficientnet_lite3': (1.2, 1.4, 280),
    'efficientnet_lite4': (1.4, 1.8, 300),
}

for _name, (_width_mult, _depth_mult, _size) in _VARIANTS.items():
  registry.register(registry.Architecture(
      name=_name, family='efficientnet_lite', build=EfficientNetLite,
      kwargs={'widths': stage_widths(_width_mult), 'depths': stage_depths(_depth_mult)},
      mean=MEAN, std=STD, input_size=_size, timm_name=f'tf_{_name}'))
