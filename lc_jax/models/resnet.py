"""ResNet-18/34/50/101/152 in Flax, laid out like torchvision's and timm's ResNet.

Variable paths mirror the torch state_dict keys (``params/layer1/0/conv1/kernel`` is
``layer1.0.conv1.weight``), so a layer id is both a torch module name and a Flax path.
Padding is explicit and equal to PyTorch's (never 'SAME'), the stride of a bottleneck sits
on its 3x3 conv (ResNet v1.5), and BatchNorm uses eps 1e-5 with running statistics. The
outputs of the stem's max-pool and of the global pool, which are not modules, are sown as
intermediates under timm's module names so parity can be checked stage by stage.

The forward is a chain of segments, ``stem``, one per residual block (``layer1.0``, ...) and
``head``; ``apply(variables, x, start, stop)`` runs segments [start, stop) only, which is how a
reset of a layer re-runs the network from its block on (see `lc_jax.evaluate`).
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

FAMILY = 'resnet'  # its architectures' family in the registry, which its recipe shares


# BasicBlock and Bottleneck share their shape on purpose: each mirrors its torch class, whose
# module names the state_dict keys carry.
class BasicBlock(nn.Module):
  """Two 3x3 convs; the residual branch of ResNet-18/34."""

  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  expansion = 1

  @nn.compact
  def __call__(self, x):
    conv, bn = common.conv_bn_factories(self.dtype)
    shortcut = x
    y = conv(self.planes, 3, self.stride, 1, name='conv1')(x)
    y = nn.relu(bn(name='bn1')(y))
    y = conv(self.planes, 3, 1, 1, name='conv2')(y)
    y = bn(name='bn2')(y)
    if self.downsample:
      shortcut = Downsample(self.planes, self.stride, self.dtype, name='downsample')(x)
    return nn.relu(y + shortcut)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 convs; the residual branch of ResNet-50/101/152."""

  planes: int
  stride: int = 1
  downsample: bool = False
  dtype: Any = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x):
    conv, bn = common.conv_bn_factories(self.dtype)
    shortcut = x
    y = conv(self.planes, 1, 1, 0, name='conv1')(x)
    y = nn.relu(bn(name='bn1')(y))
    y = conv(self.planes, 3, self.stride, 1, name='conv2')(y)
    y = nn.relu(bn(name='bn2')(y))
    y = conv(self.planes * self.expansion, 1, 1, 0, name='conv3')(y)
    y = bn(name='bn3')(y)
    if self.downsample:
      shortcut = Downsample(
          self.planes * self.expansion, self.stride, self.dtype, name='downsample')(x)
    return nn.relu(y + shortcut)


class Downsample(nn.Module):
  """The projection shortcut: torch's ``Sequential(conv1x1, BatchNorm2d)``, children '0' and '1'."""

  features: int
  stride: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv, bn = common.conv_bn_factories(self.dtype)
    x = conv(self.features, 1, self.stride, 0, name='0')(x)
    return bn(name='1')(x)


def _make_block(block_cls: Any, planes: int, stage_stride: int, in_features: int, index: int,
                dtype: Any, name: str | None = None) -> nn.Module:
  """Block `index` of a stage: the first one strides, and projects its shortcut when the shape
  changes."""
  stride = stage_stride if index == 0 else 1
  downsample = index == 0 and (stride != 1 or in_features != planes * block_cls.expansion)
  return block_cls(planes, stride, downsample, dtype, name=name)


class Stage(nn.Module):
  """``layerN`` of torch: a run of blocks named '0', '1', ...; the first one may downsample."""

  block_cls: Any
  planes: int
  depth: int
  stride: int
  in_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, start: int = 0, stop: int | None = None):
    """Runs blocks [start, stop) of the stage (all by default)."""
    for index in range(start, self.depth if stop is None else stop):
      x = _make_block(self.block_cls, self.planes, self.stride, self.in_features, index,
                      self.dtype, name=str(index))(x)
    return x


class ResNet(common.SegmentedModel):
  """ResNet classifier on NHWC images in [0, 1]; normalisation is part of the model."""

  block: str  # 'basic' or 'bottleneck'
  stage_depths: Sequence[int]  # blocks per stage (torch's `layers` argument)

  def on_shortcut(self, path: Sequence[str]) -> bool:
    """Whether the layer at `path` lies on a block's projection shortcut, not its branch."""
    return 'downsample' in path

  @nn.nowrap
  def blocks_per_stage(self) -> tuple[int, ...]:
    """Blocks per stage (common.SegmentedModel)."""
    return tuple(self.stage_depths)

  @nn.nowrap
  def block_name(self, stage: int, index: int) -> str:
    """'layer1.0', ...: torch's name of block `index` of stage `stage`."""
    return f'layer{stage + 1}.{index}'

  @nn.nowrap  # builds a module of its own, not a child of this one
  def block_module(self, stage: int, index: int) -> nn.Module:
    """Block `index` of stage `stage` on its own (common.SegmentedModel)."""
    block_cls = _BLOCKS[self.block]
    return _make_block(block_cls, *self._stage_settings(stage, block_cls), index, self.dtype)

  def _stage_settings(self, stage: int, block_cls: Any) -> tuple[int, int, int]:
    """(planes, stride, input channels) of stage `stage`."""
    planes = 64 * 2**stage
    return planes, 1 if stage == 0 else 2, 64 if stage == 0 else planes // 2 * block_cls.expansion

  @nn.nowrap
  def forward_stem(self, x):
    """conv1, bn1, ReLU and the max-pool."""
    conv, bn = common.conv_bn_factories(self.dtype)
    x = conv(64, 7, 2, 3, name='conv1')(x)
    x = nn.relu(bn(name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    self.sow('intermediates', 'maxpool', x)
    return x

  @nn.nowrap
  def stage_runner(self) -> common.StageRunner:
    """Stage S is torch's ``layer{S+1}``."""
    block_cls = _BLOCKS[self.block]

    def run(x, stage, lo, hi):
      planes, stride, in_features = self._stage_settings(stage, block_cls)
      return Stage(block_cls, planes, self.stage_depths[stage], stride, in_features, self.dtype,
                   name=f'layer{stage + 1}')(x, lo, hi)
    return run

  @nn.nowrap
  def forward_head(self, x):
    """The global average pool and fc."""
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'global_pool', x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)


_BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}

_DEPTHS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
    'resnet101': ('bottleneck', (3, 4, 23, 3)),
    'resnet152': ('bottleneck', (3, 8, 36, 3)),
}

# ------------------------------------------------------------------------ initialisation -------
# As timm and torchvision draw a fresh ResNet: conv weight ~ N(0, 2 / fan_out), fan_out = out_ch
# * kh * kw (kaiming_normal, mode='fan_out', untruncated); BatchNorm 1/0/0/1, except that timm
# zeroes the weight of the last BatchNorm of each residual branch (zero_init_last); Linear:
# PyTorch's default.

def _scheme(zero_init_last: bool) -> init.Scheme:
  def scheme(layer: layers.Layer, key) -> init.Leaves:
    if layer.kind == 'batchnorm':
      return init.batchnorm(layer, 0.0 if zero_init_last and layer.branch_end else 1.0)
    if layer.kind == 'linear':
      return init.pytorch_default(layer, key)
    return init.kaiming_normal_fan_out(layer, key, divide_by_groups=False)
  return scheme


init.register_scheme('timm_resnet', _scheme(zero_init_last=True))
init.register_scheme('torchvision_resnet', _scheme(zero_init_last=False))

for _name, (_block, _depths) in _DEPTHS.items():
  registry.register(registry.Architecture(
      name=_name, family=FAMILY, build=ResNet,
      kwargs={'block': _block, 'stage_depths': _depths},
      mean=constants.IMAGENET_MEAN, std=constants.IMAGENET_STD, timm_name=_name,
      init_scheme='timm_resnet', block_depth=2))
