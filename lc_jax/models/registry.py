"""Architectures by name: a name says everything needed to build, load and preprocess a model."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lc_jax.errors import did_you_mean
from lc_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Architecture:
  """A registered model: its family, how to build it, and its pretrained preprocessing."""

  name: str
  family: str
  build: Callable[..., nn.Module]
  kwargs: Mapping[str, Any]
  mean: Sequence[float]
  std: Sequence[float]
  input_size: int = 224
  num_classes: int = 1000
  # The timm model with the same state_dict keys, used as the PyTorch reference in parity checks.
  timm_name: str | None = None
  # How a fresh model of this architecture is initialised (a name in lc_jax.init.SCHEMES).
  init_scheme: str = 'pytorch_default'
  # Path components that name a block ('layer1', '0' in a ResNet); the stage is one fewer.
  block_depth: int = 2

  def create(self, **overrides) -> nn.Module:
    """The Flax module; `overrides` replace registered settings (num_classes, mean, std, dtype)."""
    cfg = dict(self.kwargs, num_classes=self.num_classes, mean=tuple(self.mean),
               std=tuple(self.std))
    cfg.update(overrides)
    return self.build(**cfg)


_ARCHITECTURES: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
  """Adds an architecture under its name; a name can be registered once."""
  if arch.name in _ARCHITECTURES:
    raise ValueError(f'architecture {arch.name!r} is registered twice')
  _ARCHITECTURES[arch.name] = arch
  return arch


def names(family: str | None = None) -> list[str]:
  """Registered architecture names, optionally of one family."""
  return sorted(n for n, a in _ARCHITECTURES.items() if family in (None, a.family))


def get(name: str) -> Architecture:
  """The architecture registered under `name`; an unknown name fails with the closest ones."""
  try:
    return _ARCHITECTURES[name]
  except KeyError:
    raise UserError(f'unknown architecture {name!r}{did_you_mean(name, _ARCHITECTURES)} (known: '
                    f'{", ".join(names())})') from None


def create(arch: str, **overrides) -> nn.Module:
  """The Flax module of a registered architecture; `module.apply(variables, images)` gives logits.

  Images are float NHWC in [0, 1]; normalisation with the model's mean/std happens inside.
  """
  return get(arch).create(**overrides)


def variable_shapes(module: nn.Module, input_size: int = 224) -> dict:
  """The module's variable tree as `jax.ShapeDtypeStruct`s, without allocating any weights.

  Traced at `input_size`, or at the module's own `img_size` where it has one (a ViT)."""
  input_size = getattr(module, 'img_size', None) or input_size
  images = jax.ShapeDtypeStruct((1, input_size, input_size, 3), jnp.float32)
  # The key is made inside the trace: an eager key would compile a program of its own.
  shapes = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), images)
  return {k: v for k, v in shapes.items() if k != 'intermediates'}
