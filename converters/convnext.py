"""ConvNeXt checkpoints in timm's key names (.pth, or .safetensors as the Hub's timm/ repos).

A state_dict with ``stem.0.weight`` and ``stages.N.blocks.M.conv_dw.weight`` is a ConvNeXt; the
stage depths, the stage widths and whether the MLP is made of 1x1 convs (4-d ``mlp.fc1``
weights, timm's conv_mlp) name the registered variant. Checkpoints of Facebook's original
layout (``downsample_layers``, ``norm``) are timm's to remap first.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from converters import recipes
from converters.reader import ConversionError
from lc_jax import models
from lc_jax.models.convnext import FAMILY


def detect(tensors: Mapping[str, np.ndarray]) -> str | None:
  """The registered ConvNeXt a state_dict holds; None if it is no ConvNeXt."""
  if 'stem.0.weight' not in tensors or 'stages.0.blocks.0.conv_dw.weight' not in tensors:
    return None
  blocks: dict[int, set[int]] = {}
  for key in tensors:
    if match := re.match(r'stages\.(\d+)\.blocks\.(\d+)\.', key):
      blocks.setdefault(int(match[1]), set()).add(int(match[2]))
  depths = tuple(max(blocks[s]) + 1 for s in sorted(blocks))
  dims = tuple(int(tensors[f'stages.{s}.blocks.0.conv_dw.weight'].shape[0]) for s in sorted(blocks))
  conv_mlp = tensors['stages.0.blocks.0.mlp.fc1.weight'].ndim == 4
  for name in models.names(FAMILY):
    kwargs = models.get(name).kwargs
    if (tuple(kwargs['depths']), tuple(kwargs['dims']), kwargs['conv_mlp']) == (
        depths, dims, conv_mlp):
      return name
  raise ConversionError(f'the checkpoint is a ConvNeXt with depths {"-".join(map(str, depths))}, '
                        f'widths {"-".join(map(str, dims))} and '
                        f'{"conv" if conv_mlp else "linear"} MLPs, which matches no registered '
                        f'ConvNeXt ({", ".join(models.names(FAMILY))})')


recipes.register(recipes.Recipe(family=FAMILY, detect=detect, classifier='head.fc.weight'))
