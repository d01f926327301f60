"""Building blocks shared by the model families: PyTorch-exact conv/BN and input normalisation."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PyTorch's BatchNorm2d default; timm and torchvision ResNets keep it.
BN_EPS = 1e-5


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


def conv_bn_factories(dtype: Any):
  """`conv(features, kernel, stride, padding, name=...)` and `bn(name=...)` bound to a dtype."""
  return (lambda *args, **kw: conv(*args, dtype=dtype, **kw),
          functools.partial(batch_norm, dtype=dtype))


def normalize(images, mean: Sequence[float], std: Sequence[float], dtype: Any):
  """Maps images in [0, 1] to the model's input space, (x - mean) / std per channel."""
  images = jnp.asarray(images, jnp.float32)
  images = (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
  return images.astype(dtype)
