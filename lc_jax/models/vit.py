"""Vision Transformers (ViT, DeiT) in Flax, laid out like timm's ``VisionTransformer``.

Variable paths mirror timm's state_dict keys (``params/blocks/0/attn/qkv/kernel`` is
``blocks.0.attn.qkv.weight``; the free-standing ``cls_token`` and ``pos_embed`` are
``params/cls_token/value`` and ``params/pos_embed/value``). The model is timm's default: a
patch-embedding conv, a class token, a learned position embedding over the class token and the
patches, pre-norm blocks (LayerNorm eps 1e-6, multi-head attention with one qkv Linear, an MLP
of ratio 4 with exact GELU, no layer scale), a final LayerNorm, the class token's output into a
Linear head.

The forward is a chain of segments, ``stem`` (patches, class token, position embedding), one per
block (``blocks.0``, ...) and ``head``; ``apply(variables, x, start, stop)`` runs segments
[start, stop) only (see `lc_jax.evaluate`). The position embedding fixes the input size
(`img_size`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lc_jax import constants
from lc_jax import init
from lc_jax import layers
from lc_jax.models import common
from lc_jax.models import registry

FAMILY = 'vit'  # its architectures' family in the registry, which its recipe shares


class PatchEmbed(nn.Module):
  """timm's ``PatchEmbed``: a conv with stride = kernel = patch size, flattened to tokens."""

  embed_dim: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    p = self.patch_size
    x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                name='proj')(x)
    return x.reshape(x.shape[0], -1, x.shape[-1])  # row-major patches, as torch's flatten(2)


class Attention(nn.Module):
  """Multi-head self-attention with one qkv Linear and an output projection (timm's)."""

  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, tokens, width = x.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)  # timm's order of q, k, v
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * head_dim**-0.5, k)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(batch, tokens, width)
    return nn.Dense(width, dtype=self.dtype, name='proj')(out)


class Mlp(nn.Module):
  """fc1 -> GELU -> fc2 (timm's ``Mlp``)."""

  hidden: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = common.gelu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2')(y)


class Block(nn.Module):
  """A pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

  num_heads: int
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = x + Attention(self.num_heads, self.dtype, name='attn')(
        common.layer_norm(dtype=self.dtype, name='norm1')(x))
    hidden = int(x.shape[-1] * self.mlp_ratio)
    return x + Mlp(hidden, self.dtype, name='mlp')(
        common.layer_norm(dtype=self.dtype, name='norm2')(x))


class Blocks(nn.Module):
  """timm's ``blocks``: a run of blocks named '0', '1', ..."""

  depth: int
  num_heads: int
  mlp_ratio: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, start: int = 0, stop: int | None = None):
    """Runs blocks [start, stop) (all by default)."""
    for index in range(start, self.depth if stop is None else stop):
      x = Block(self.num_heads, self.mlp_ratio, self.dtype, name=str(index))(x)
    return x


class VisionTransformer(common.SegmentedModel):
  """ViT classifier on NHWC images in [0, 1] of `img_size`; normalisation is part of the model.

  After the stem, a segment's input and output are tokens (batch, 1 + patches, embed_dim).
  """

  patch_size: int
  embed_dim: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  img_size: int = 224

  @nn.nowrap
  def blocks_per_stage(self) -> tuple[int, ...]:
    """One stage of `depth` blocks (common.SegmentedModel)."""
    return (self.depth,)

  @nn.nowrap
  def block_name(self, stage: int, index: int) -> str:
    """'blocks.0', ...: timm's name of block `index`."""
    return f'blocks.{index}'

  @nn.nowrap  # builds a module of its own, not a child of this one
  def block_module(self, stage: int, index: int) -> nn.Module:
    """Block `index` on its own (common.SegmentedModel): the blocks, all equal, are one
    program."""
    return Block(self.num_heads, self.mlp_ratio, self.dtype)

  def sub_kind(self, path: Sequence[str], kind: str) -> str:
    """Linears of attention ('attn_qkv', 'attn_proj') and of the MLP ('mlp') by their path."""
    if kind != 'linear' or len(path) < 2:
      return kind
    if path[-2] == 'attn':
      return {'qkv': 'attn_qkv', 'proj': 'attn_proj'}[path[-1]]
    return 'mlp' if path[-2] == 'mlp' else kind

  def is_branch_end(self, path: Sequence[str]) -> bool:
    """The attention projection and the second MLP Linear end the block's two branches."""
    return tuple(path[-2:]) in (('attn', 'proj'), ('mlp', 'fc2'))

  @nn.nowrap
  def forward_stem(self, x):
    """Patches, the class token before them, the position embedding added."""
    if x.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f'this ViT takes {self.img_size}x{self.img_size} images (its position '
                       f'embedding is learned for that size), got {x.shape[1]}x{x.shape[2]}')
    x = PatchEmbed(self.embed_dim, self.patch_size, self.dtype, name='patch_embed')(x)
    cls_token = common.Parameter((1, 1, self.embed_dim), 'embedding', name='cls_token')()
    x = jnp.concatenate(
        [jnp.broadcast_to(cls_token.astype(self.dtype), (x.shape[0], 1, self.embed_dim)), x],
        axis=1)
    tokens = (self.img_size // self.patch_size)**2 + 1
    return x + common.Parameter((1, tokens, self.embed_dim), 'embedding',
                                name='pos_embed')().astype(self.dtype)

  @nn.nowrap
  def stage_runner(self) -> common.StageRunner:
    """The one stage is timm's ``blocks``."""
    return lambda x, _, lo, hi: Blocks(self.depth, self.num_heads, self.mlp_ratio, self.dtype,
                                       name='blocks')(x, lo, hi)

  @nn.nowrap
  def forward_head(self, x):
    """The final LayerNorm, the class token's output (timm's global_pool='token'), the head."""
    x = common.layer_norm(dtype=self.dtype, name='norm')(x)
    return nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x[:, 0])


# ------------------------------------------------------------------------ initialisation -------
# As timm draws a fresh VisionTransformer (init_weights, mode ''): every Linear (qkv, proj, the
# MLP's, the head) weight ~ trunc_normal(std .02), bias 0; the position embedding trunc_normal
# (std .02), the class token N(0, 1e-6^2); LayerNorm 1/0; the patch-embedding conv keeps torch's
# default (U(+-1/sqrt(fan_in)) for weight and bias).

def _timm_vit(layer: layers.Layer, key) -> init.Leaves:
  if layer.kind == 'layernorm':
    return init.layernorm(layer)
  if layer.kind == 'embedding':
    shape = layer.shapes['params/value']
    if layer.name == 'cls_token':
      return {'params/value': init.normal(key, shape, 1e-6)}
    return {'params/value': init.trunc_normal(key, shape, 0.02)}
  if layer.kind == 'conv':
    return init.pytorch_default(layer, key)
  return init.trunc_normal_zero_bias(layer, key)


init.register_scheme('timm_vit', _timm_vit)

# (embed_dim, depth, heads, mean/std): timm's vit_* (augreg weights, inputs scaled to [-1, 1])
# and deit_* (ImageNet mean/std); all of patch 16 at 224.
_AUGREG = (constants.IMAGENET_INCEPTION_MEAN, constants.IMAGENET_INCEPTION_STD)
_DEIT = (constants.IMAGENET_MEAN, constants.IMAGENET_STD)
_VARIANTS = {
    'vit_tiny_patch16_224': (192, 12, 3, *_AUGREG),
    'vit_small_patch16_224': (384, 12, 6, *_AUGREG),
    'vit_base_patch16_224': (768, 12, 12, *_AUGREG),
    'deit_small_patch16_224': (384, 12, 6, *_DEIT),
    'deit_base_patch16_224': (768, 12, 12, *_DEIT),
}

for _name, (_dim, _depth, _heads, _mean, _std) in _VARIANTS.items():
  registry.register(registry.Architecture(
      name=_name, family=FAMILY, build=VisionTransformer,
      kwargs={'patch_size': 16, 'embed_dim': _dim, 'depth': _depth, 'num_heads': _heads,
              'img_size': 224},
      mean=_mean, std=_std, input_size=224, timm_name=_name, init_scheme='timm_vit',
      block_depth=2))
