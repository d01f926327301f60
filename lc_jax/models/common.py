"""What the model families share: the forward as a chain of segments, PyTorch-exact conv/BN,
input normalisation."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lc_jax import schema

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


def stage_ranges(depths: Sequence[int], start: int, stop: int):
  """For each stage with blocks among segments [start, stop): (stage, first block, end block).

  Segment 0 is the stem, then come the blocks stage after stage, then the head."""
  first = 1  # the segment index of the stage's block 0
  for stage, depth in enumerate(depths):
    lo, hi = max(start - first, 0), min(stop - first, depth)
    if lo < hi:
      yield stage, lo, hi
    first += depth


# What `SegmentedModel.standalone(k)` returns: a segment's block as a module of its own and the
# path of its variables, or None.
Standalone = Optional[tuple[nn.Module, tuple[str, ...]]]
# A family's `stage_runner()`: `run(x, stage, lo, hi)` runs blocks [lo, hi) of stage `stage`.
StageRunner = Callable[[Any, int, int, int], Any]


class SegmentedModel(nn.Module):
  """A classifier whose forward is a chain of segments: the stem, one per block, the head.

  `apply(variables, x, start, stop)` runs segments [start, stop) only, which is how a reset of a
  layer re-runs the network from its block on (`lc_jax.evaluate`). A family's root module
  subclasses it, adds its own fields (positional, before these keyword-only ones) and gives,
  each decorated `nn.nowrap`:

  - `blocks_per_stage()`: how many blocks each stage has, in forward order;
  - `block_name(stage, index)`: the block's torch module name, which is its variables' path
    joined by '.' ('layer1.0' in a ResNet);
  - `block_module(stage, index)`: the block as a module of its own, built outside the model, or
    None where the block alone is not the whole of its segment;
  - `forward_stem(x)`: the stem, on normalised images;
  - `stage_runner()`: a `StageRunner`, made once per forward, so that stages under one parent
    module (timm's `blocks`, `stages`) share it;
  - `forward_head(x)`: the head, on the last block's output.
  """

  _: dataclasses.KW_ONLY
  # The input normalisation, (x - mean) / std per channel: the registered variant's
  # (lc_jax.models.registry.Architecture), or the checkpoint's own.
  mean: Sequence[float]
  std: Sequence[float]
  num_classes: int = 1000
  dtype: Any = jnp.float32

  @nn.nowrap
  def segments(self) -> tuple[str, ...]:
    """The forward's segments in order: the stem, every block by its name, the head."""
    return (schema.STEM, *(self.block_name(stage, index)
                           for stage, depth in enumerate(self.blocks_per_stage())
                           for index in range(depth)), schema.HEAD)

  @nn.nowrap  # builds a module of its own, not a child of this one
  def standalone(self, k: int) -> Standalone:
    """Segment k's block as a module of its own and its variables' path; None for the stem,
    the head and a block that is not its whole segment. lc_jax.evaluate runs such a segment as
    that module on its variables re-rooted, so equal blocks share one compiled program."""
    place = next(stage_ranges(self.blocks_per_stage(), k, k + 1), None)  # (stage, k's index, +1)
    if place is None:
      return None
    stage, index, _ = place
    block = self.block_module(stage, index)
    return None if block is None else (block, tuple(self.block_name(stage, index).split('.')))

  @nn.compact
  def __call__(self, x, start: int = 0, stop: int | None = None):
    """Logits of NHWC images in [0, 1].

    With `start`/`stop`, only segments [start, stop) of `segments()` run: `x` is the input of
    segment `start` (the images when 0) and the result the output of segment `stop - 1`.
    """
    depths = self.blocks_per_stage()
    head = sum(depths) + 1
    stop = head + 1 if stop is None else stop
    if start == 0 < stop:
      x = self.forward_stem(normalize(x, self.mean, self.std, self.dtype))
    ranges = list(stage_ranges(depths, start, stop))
    if ranges:
      run = self.stage_runner()
      for stage, lo, hi in ranges:
        x = run(x, stage, lo, hi)
    if start <= head < stop:
      x = self.forward_head(x).astype(jnp.float32)
    return x


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
