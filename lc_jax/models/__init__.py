"""Flax models whose variable paths mirror torch state_dict keys, registered by name.

    model = lc_jax.models.create('resnet50')
    logits = model.apply(variables, images)   # images: float NHWC in [0, 1]
"""

import importlib

from lc_jax.models.registry import Architecture, create, get, names, register, variable_shapes
from lc_jax.models.store import create_from_card, load, save

# The model families, each a module of this package and one of `converters` of the same name.
# Importing a family registers its architectures here and its checkpoint recipe there; the
# order is the order in which converters try to recognise a checkpoint.
FAMILIES = ('resnet', 'efficientnet', 'vit', 'convnext')

for _family in FAMILIES:
  importlib.import_module(f'{__name__}.{_family}')
