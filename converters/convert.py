"""`convert`: a PyTorch or safetensors checkpoint -> (architecture, Flax variables, metadata)."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

import lc_jax
from converters import mapping
from converters import reader
from converters import recipes
from converters.reader import ConversionError
from lc_jax import models


def convert(src: str, arch: str | None = None, *, trust_pickle: bool = False,
            mean: Sequence[float] | None = None,
            std: Sequence[float] | None = None) -> tuple[str, dict, dict[str, Any]]:
  """Converts the checkpoint at `src` into Flax variables, strictly.

  `arch` is inferred from the checkpoint when not given; a checkpoint of another architecture
  or family is refused. Every model variable must be filled and every checkpoint key used,
  except keys dropped by a named rule (reported under metadata['dropped']); otherwise a
  `ConversionError` lists what is missing, unexpected or of the wrong shape. `mean`/`std`
  override the architecture's input normalisation (use 0 and 1 for models trained without).

  Returns (arch, variables, metadata) with variables {'params': ..., 'batch_stats': ...}.
  """
  checkpoint = reader.read(src, trust_pickle=trust_pickle)
  if not checkpoint.tensors:
    raise ConversionError(f'{checkpoint.path} holds no tensors of a network')
  found = recipes.detect(checkpoint.tensors)
  if arch is None:
    if found is None:
      keys = ', '.join(list(checkpoint.tensors)[:4])
      families = ', '.join(sorted({models.get(n).family for n in models.names()}))
      raise ConversionError(
          f'cannot tell the architecture of {checkpoint.path}: its keys ({keys}, ...) fit no '
          f'registered family ({families}); pass the architecture explicitly')
    recipe, arch = found
  else:
    spec = models.get(arch)
    recipe = recipes.for_family(spec.family)
    if found is not None and found[1] != arch:
      raise ConversionError(f'{checkpoint.path} holds {found[1]} weights, not {arch}; '
                            f'convert it as {found[1]} or leave the architecture out')
  spec = models.get(arch)
  tensors = recipe.rename(dict(checkpoint.tensors))

  num_classes = spec.num_classes
  if recipe.classifier in tensors:
    num_classes = int(tensors[recipe.classifier].shape[0])
  overrides: dict[str, Any] = {'num_classes': num_classes}
  if mean is not None:
    overrides['mean'] = tuple(float(m) for m in mean)
  if std is not None:
    overrides['std'] = tuple(float(s) for s in std)
  module = spec.create(**overrides)
  shapes = models.variable_shapes(module, spec.input_size)

  variables, mismatch = mapping.fill(shapes, tensors)
  if mismatch:
    raise mapping.MismatchError(
        f'{checkpoint.path} does not fit {arch}: {mismatch.summary()}', mismatch)

  metadata = {
      'arch': arch,
      'family': spec.family,
      'num_classes': num_classes,
      'mean': list(module.mean),
      'std': list(module.std),
      'source': checkpoint.path,
      'sha256': checkpoint.sha256,
      'format': checkpoint.format,
      'container': checkpoint.container,
      'stripped_prefix': checkpoint.prefix,
      'dropped': checkpoint.dropped,
      'num_tensors': len(tensors),
      'num_parameters': int(sum(np.size(v) for v in jax.tree.leaves(variables['params']))),
      'lc_jax_version': lc_jax.__version__,
  }
  return arch, variables, metadata

