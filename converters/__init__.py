"""Checkpoint conversion: PyTorch (.pth, .pth.tar, .pt, .ckpt) and safetensors -> Flax variables.

Local files only: a path, or bundled:NAME. Checkpoint arguments of every kind (zoo:ID too) are
lc_jax.checkpoints'.

    arch, variables, metadata = converters.convert('resnet50.pth')
    converters.save('out/resnet50', arch, variables, metadata)
    module, variables, metadata = lc_jax.models.load('out/resnet50')
"""

import importlib

from converters.convert import ArchitectureMismatch, convert, digests_sha256
from converters.layouts import LAYOUTS, convert_layout
from converters.mapping import Mismatch, MismatchError
from converters.reader import DROP_RULES, ConversionError, DropRule, read
from lc_jax.models.store import save
from lc_jax.models import FAMILIES

for _family in FAMILIES:  # importing a family's converter registers its recipe
  importlib.import_module(f'{__name__}.{_family}')
