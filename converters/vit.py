"""ViT and DeiT checkpoints in timm's key names (.pth, or .safetensors as the Hub's timm/ repos).

A state_dict with ``patch_embed.proj.weight`` and ``blocks.N.attn.qkv.weight`` is a ViT. The
variant is told from the keys: depth (the blocks), width (the patch embedding's output) and
patch size (its kernel); the heads, which no shape holds, come with the registered variant of
that width, as timm names them. The input size is the position embedding's (a ViT fine-tuned at
384 converts as its variant with img_size 384, which the model card keeps). vit_* and deit_*
variants of one size share every layer: such a checkpoint needs its architecture named. A
distilled DeiT (``dist_token``, ``head_dist``) is refused: its second head is not modelled.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

from converters import recipes
from converters.reader import ConversionError
from lc_jax import models
from lc_jax.models.vit import FAMILY


def shape_of(tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
  """depth, embed_dim and patch_size of a timm ViT state_dict."""
  depth = 1 + max(int(m[1]) for key in tensors if (m := re.match(r'blocks\.(\d+)\.', key)))
  proj = tensors['patch_embed.proj.weight']  # (embed_dim, 3, patch, patch)
  return {'depth': depth, 'embed_dim': int(proj.shape[0]), 'patch_size': int(proj.shape[-1])}


def settings(tensors: Mapping[str, np.ndarray]) -> dict[str, int]:
  """The input size the position embedding is learned for: img_size."""
  if 'pos_embed' not in tensors:
    return {}  # no position embedding: the conversion reports it missing
  patches = tensors['pos_embed'].shape[1] - 1  # one token is the class token's
  side = math.isqrt(patches)
  if side * side != patches:
    raise ConversionError(f'the position embedding has {patches} patch tokens, not a square '
                          'grid of patches')
  return {'img_size': side * int(tensors['patch_embed.proj.weight'].shape[-1])}


def detect(tensors: Mapping[str, np.ndarray]) -> tuple[str, ...] | None:
  """The registered ViTs a state_dict fits; None if it is no ViT."""
  if 'patch_embed.proj.weight' not in tensors or 'blocks.0.attn.qkv.weight' not in tensors:
    return None
  if 'dist_token' in tensors or any(k.startswith('head_dist.') for k in tensors):
    raise ConversionError('the checkpoint is a distilled DeiT (dist_token, head_dist): its '
                          'distillation token and second head are not modelled; use the '
                          'non-distilled deit_*_patch16_224 weights')
  shape = shape_of(tensors)
  fits = tuple(name for name in models.names(FAMILY)
               if all(models.get(name).kwargs[k] == v for k, v in shape.items()))
  if not fits:
    described = ', '.join(f'{k} {v}' for k, v in shape.items())
    raise ConversionError(f'the checkpoint is a ViT with {described}, which matches no '
                          f'registered ViT ({", ".join(models.names(FAMILY))})')
  return fits


recipes.register(recipes.Recipe(family=FAMILY, detect=detect, classifier='head.weight',
                                settings=settings))
