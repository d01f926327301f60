"""Per-family conversion recipes: how to recognise a family's checkpoint and name its keys.

Each family registers its recipe from its own converter file (converters/resnet.py, ...), which
`converters` imports for every family of lc_jax.models.FAMILIES, in that order.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How checkpoints of one model family map onto its Flax architectures.

  `detect(tensors)` names the architecture a state_dict holds (or, when registered variants
  share their layers and differ in what the keys cannot tell, such as a ViT's and a DeiT's input
  normalisation, a tuple of every one that fits), returns None when the state_dict is not of
  this family, and raises ConversionError when it is of the family but no registered variant
  fits. `rename(tensors)` brings foreign key namings onto the torch names the Flax paths
  mirror. `classifier` is the key of the final linear layer's weight. `settings(tensors)` gives
  module settings the keys fix beyond the registered variant (a ViT's input size, from its
  position embedding), which the model card keeps.
  """

  family: str
  detect: Callable[[Mapping[str, np.ndarray]], str | tuple[str, ...] | None]
  classifier: str
  rename: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] = lambda tensors: tensors
  settings: Callable[[Mapping[str, np.ndarray]], dict] = lambda tensors: {}


_RECIPES: dict[str, Recipe] = {}


def register(recipe: Recipe) -> Recipe:
  """Adds the recipe of a model family."""
  _RECIPES[recipe.family] = recipe
  return recipe


def for_family(family: str) -> Recipe:
  """The recipe of `family`."""
  return _RECIPES[family]


def detect(tensors: Mapping[str, np.ndarray]) -> tuple[Recipe, tuple[str, ...]] | None:
  """(recipe, the architectures that fit) of the first family that recognises the state_dict,
  or None."""
  for recipe in _RECIPES.values():
    arch = recipe.detect(recipe.rename(dict(tensors)))
    if arch is not None:
      return recipe, (arch,) if isinstance(arch, str) else tuple(arch)
  return None
