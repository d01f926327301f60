"""ResNet checkpoints (torchvision and timm share the key names): recognised by their blocks.

A state_dict with `conv1.weight` and `layerS.I.` keys is a ResNet; the block type (a `conv3`
in the first block means bottlenecks) and the stage depths name the registered variant.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from converters import recipes
from converters.reader import ConversionError
from lc_jax import models
from lc_jax.models.resnet import FAMILY


def detect(tensors: Mapping[str, np.ndarray]) -> str | None:
  """The registered ResNet a state_dict holds; None if it is no ResNet."""
  blocks: dict[int, set[int]] = {}
  for key in tensors:
    match = re.match(r'layer([1-4])\.(\d+)\.', key)
    if match:
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if 'conv1.weight' not in tensors or not blocks:
    return None
  depths = tuple(max(blocks.get(stage, {-1})) + 1 for stage in (1, 2, 3, 4))
  block = 'bottleneck' if 'layer1.0.conv3.weight' in tensors else 'basic'
  for name in models.names(FAMILY):
    kwargs = models.get(name).kwargs
    if kwargs['block'] == block and tuple(kwargs['stage_depths']) == depths:
      return name
  raise ConversionError(f'the checkpoint is a ResNet with {block} blocks and stage depths '
                        f'{"-".join(map(str, depths))}, which matches no registered ResNet '
                        f'({", ".join(models.names(FAMILY))})')


recipes.register(recipes.Recipe(family=FAMILY, detect=detect, classifier='fc.weight'))
