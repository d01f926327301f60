"""Building blocks shared by the model families: PyTorch-exact conv/BN and input normalisation."""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PyTorch's BatchNorm2d default; timm and torchvision ResNets keep it.
BN_EPS = 1e-5
# timm's LayerNorm eps in ViT and ConvNeXt.
LN_EPS = 1e-6


def conv(features: int, kernel: int, stride: int, padding: int, *, dtype: Any = jnp.float32,
         groups: int = 1, use_bias: bool = False, name: str | None = None) -> nn.Conv:
  """A Conv2d with torch's symmetric integer padding (never 'SAME')."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 feature_group_count=groups, use_bias=use_bias, dtype=dtype, name=name)


def batch_norm(*, dtype: Any = jnp.float32, eps: float = BN_EPS,
               name: str | None = None) -> nn.BatchNorm:
  """BatchNorm in inference mode (running statistics), as in every evaluation here."""
  return nn.BatchNorm(use_running_average=True, epsilon=eps, dtype=dtype, name=name)


def layer_norm(*, dtype: Any = jnp.float32, eps: float = LN_EPS,
               name: str | None = None) -> nn.LayerNorm:
  """torch's LayerNorm over the last (channel) axis: variance in two passes, as torch computes
  it, not E[x^2] - E[x]^2, which loses digits on the large-mean activations of transformers."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False, name=name)


def gelu(x):
  """torch's nn.GELU(): the exact, erf-based GELU (jax's default is the tanh approximation)."""
  return nn.gelu(x, approximate=False)


class Parameter(nn.Module):
  """A free-standing learnable tensor of torch (a ViT's ``cls_token``, a ConvNeXt's ``gamma``).

  Held as the module's one variable ``value``, so it is a layer of its own for the inventory
  (of `kind`) and a reset; its torch key is the module's name (converters.mapping). Called, it
  returns the tensor.
  """

  shape: tuple[int, ...]
  kind: str  # the layer kind (lc_jax.layers.KINDS): 'embedding' or 'layer_scale'

  @nn.compact
  def __call__(self):
    return self.param('value', nn.initializers.zeros_init(), self.shape, jnp.float32)


def conv_bn_factories(dtype: Any):
  """`conv(features, kernel, stride, padding, name=...)` and `bn(name=...)` bound to a dtype."""
  return (lambda *args, **kw: conv(*args, dtype=dtype, **kw),
          functools.partial(batch_norm, dtype=dtype))


def segment_names(block_names: Sequence[str]) -> tuple[str, ...]:
  """A model's segments in forward order: 'stem', its blocks, 'head' (see `stage_ranges`)."""
  return ('stem', *block_names, 'head')


def stage_ranges(depths: Sequence[int], start: int, stop: int):
  """For each stage with blocks among segments [start, stop): (stage, first block, end block).

  Segment 0 is the stem, then come the blocks stage after stage, then the head."""
  first = 1  # the segment index of the stage's block 0
  for stage, depth in enumerate(depths):
    lo, hi = max(start - first, 0), min(stop - first, depth)
    if lo < hi:
      yield stage, lo, hi
    first += depth


# What a family's `standalone(k)` returns: a segment's block as a module of its own and the
# path of its variables, or None.
Standalone = Optional[tuple[nn.Module, tuple[str, ...]]]


def standalone(depths: Sequence[int], k: int,
               build: Callable[[int, int], Standalone]) -> Standalone:
  """What a family's `standalone(k)` returns for segment k of a model of stages of `depths`
  blocks: `build(stage, index)` for a block (the block module, built outside the model, and
  its variables' path; None where the block alone is not the whole segment), None for the stem
  and the head. lc_jax.evaluate runs such a segment as that module on its variables re-rooted,
  so equal blocks share one compiled program."""
  place = next(stage_ranges(depths, k, k + 1), None)  # (stage, index, index + 1)
  return None if place is None else build(*place[:2])


def normalize(images, mean: Sequence[float], std: Sequence[float], dtype: Any):
  """Maps images in [0, 1] to the model's input space, (x - mean) / std per channel."""
  images = jnp.asarray(images, jnp.float32)
  images = (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return images.astype(dtype)


class DepthwiseConv(nn.Conv):
  """A depthwise Conv (feature_group_count == features, kernel (kh, kw, 1, C)) that is fast on CPU.

  XLA's CPU backend runs grouped convolutions about 8x slower than the same work written as a
  sum over the kernel's taps of shifted, per-channel-scaled inputs; on CPU the taps are summed
  directly (same variables, same padding, float32 results equal to rounding), elsewhere the
  regular convolution runs. A bias, if any, is added after the taps, as the convolution adds it.
  """

  @nn.compact
  def __call__(self, inputs):
    if jax.default_backend() != 'cpu':
      return super().__call__(inputs)
    kh, kw = self.kernel_size
    strides = self.strides or 1
    stride_h, stride_w = (strides, strides) if isinstance(strides, int) else strides
    channels = inputs.shape[-1]
    if self.feature_group_count != channels or self.features != channels:
      raise ValueError('DepthwiseConv takes one filter per input channel')
    kernel = self.param('kernel', self.kernel_init, (kh, kw, 1, channels), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(inputs, kernel, dtype=self.dtype)
    (top, bottom), (left, right) = _explicit_padding(
        self.padding, x.shape[1:3], (kh, kw), (stride_h, stride_w))
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (x.shape[1] - kh) // stride_h + 1
    out_w = (x.shape[2] - kw) // stride_w + 1
    out = None
    for i in range(kh):
      for j in range(kw):
        window = x[:, i:i + stride_h * (out_h - 1) + 1:stride_h,
                   j:j + stride_w * (out_w - 1) + 1:stride_w, :]
        term = window * kernel[i, j, 0]
        out = term if out is None else out + term
    if self.use_bias:
      bias = self.param('bias', self.bias_init, (channels,), self.param_dtype)
      out = out + jnp.asarray(bias, out.dtype)
    return out


def _explicit_padding(padding, size, kernel, strides):
  """((top, bottom), (left, right)) of an nn.Conv padding: 'SAME' (TF), 'VALID' or pairs."""
  if padding == 'VALID':
    return ((0, 0), (0, 0))
  if padding == 'SAME':
    pads = []
    for n, k, s in zip(size, kernel, strides):
      total = max((-(-n // s) - 1) * s + k - n, 0)
      pads.append((total // 2, total - total // 2))  # TF puts the odd pixel at the end
    return tuple(pads)
  return tuple(tuple(p) for p in padding)
