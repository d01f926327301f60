"""Per-family conversion recipes: how to recognise a family's checkpoint and name its keys."""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import numpy as np

from converters.reader import ConversionError
from lc_jax import models


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How checkpoints of one model family map onto its Flax architectures.

  `detect(tensors)` names the architecture a state_dict holds, returns None when the state_dict
  is not of this family, and raises ConversionError when it is of the family but no registered
  variant fits. `rename(tensors)` brings foreign key namings onto the torch names the Flax paths
  mirror. `classifier` is the key of the final linear layer's weight.
  """

  family: str
  detect: Callable[[Mapping[str, np.ndarray]], str | None]
  classifier: str
  rename: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda tensors: tensors


_RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
  """Adds the recipe of a model family."""
  _RECIPES[recipe.family] = recipe
  return recipe


def for_family(family: str) -> Recipe:
  """The recipe of `family`."""
  return _RECIPES[family]


def detect(tensors: Mapping[str, np.ndarray]) -> tuple[Recipe, str] | None:
  """(recipe, architecture) of the first family that recognises the state_dict, or None."""
  for recipe in _RECIPES.values():
    arch = recipe.detect(recipe.rename(dict(tensors)))
    if arch is not None:
      return recipe, arch
  return None


# ---------------------------------------------------------------------------------------------
# ResNet (torchvision and timm share the key names)
# ---------------------------------------------------------------------------------------------

def _detect_resnet(tensors: Mapping[str, np.ndarray]) -> str | None:
  blocks: dict[int, set[int]] = {}
  for key in tensors:
    match = re.match(r'layer([1-4])\.(\d+)\.', key)
    if match:
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  if 'conv1.weight' not in tensors or not blocks:
    return None
  depths = tuple(max(blocks.get(stage, {-1})) + 1 for stage in (1, 2, 3, 4))
  block = 'bottleneck' if 'layer1.0.conv3.weight' in tensors else 'basic'
  for name in models.names('resnet'):
    kwargs = models.get(name).kwargs
    if kwargs['block'] == block and tuple(kwargs['layers']) == depths:
      return name
  raise ConversionError(f'the checkpoint is a ResNet with {block} blocks and stage depths '
                        f'{"-".join(map(str, depths))}, which matches no registered ResNet '
                        f'({", ".join(models.names("resnet"))})')


register(Recipe(family='resnet', detect=_detect_resnet, classifier='fc.weight'))
