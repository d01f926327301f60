"""Checkpoint conversion: PyTorch (.pth, .pth.tar, .pt, .ckpt) and safetensors -> Flax variables.

    arch, variables, metadata = converters.convert('resnet50.pth')
    converters.save('out/resnet50', arch, variables, metadata)
    module, variables, metadata = lc_jax.models.load('out/resnet50')
"""

from converters.convert import convert, source_sha256, ZOO
from converters.layouts import LAYOUTS, convert_layout
from converters.mapping import Mismatch, MismatchError
from converters.reader import DROP_RULES, ConversionError, DropRule, read
from lc_jax.models.store import save
# Importing a family's converter registers its recipe.
from converters import resnet  # noqa: F401  pylint: disable=g-bad-import-order
from converters import efficientnet  # noqa: F401  pylint: disable=g-bad-import-order
from converters import vit  # noqa: F401  pylint: disable=g-bad-import-order
from converters import convnext  # noqa: F401  pylint: disable=g-bad-import-order
from converters import zoo_check  # noqa: F401  pylint: disable=g-bad-import-order
