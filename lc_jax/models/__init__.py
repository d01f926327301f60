"""Flax models whose variable paths mirror torch state_dict keys, registered by name.

    model = lc_jax.models.create('resnet50')
    logits = model.apply(variables, images)   # images: float NHWC in [0, 1]
"""

from lc_jax.models.registry import Architecture, create, get, names, register, variable_shapes
from lc_jax.models.store import create_from_card, load, save

# Importing a family registers its architectures.
from lc_jax.models import resnet  # noqa: F401  pylint: disable=g-bad-import-order
from lc_jax.models import efficientnet  # noqa: F401  pylint: disable=g-bad-import-order
from lc_jax.models import vit  # noqa: F401  pylint: disable=g-bad-import-order
from lc_jax.models import convnext  # noqa: F401  pylint: disable=g-bad-import-order
