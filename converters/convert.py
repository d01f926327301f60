"""`convert`: a PyTorch or safetensors checkpoint file -> (architecture, Flax variables, metadata).

Local files only (a path, or bundled:NAME); a zoo model's files are fetched, and read in their
layout, by lc_jax.checkpoints."""

from __future__ import annotations

import hashlib
import sys
from typing import Any, Sequence

import jax
import numpy as np

from converters import mapping
from converters import reader
from converters import recipes
from converters.reader import ConversionError
from lc_jax import models
from lc_jax.version import __version__


class ArchitectureMismatch(ConversionError):
  """A checkpoint (`where`) of another architecture (`found`) than the one asked for (`arch`);
  the message advises converting it as what it holds, which suits a checkpoint whose
  architecture is free to choose."""

  def __init__(self, where: str, found: str, arch: str):
    super().__init__(f'{where} holds {found} weights, not {arch}; '
                     f'convert it as {found} or leave the architecture out')
    self.where, self.found, self.arch = where, found, arch


def convert(src: str, arch: str | None = None, *, trust_pickle: bool = False,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            allow_nonfinite: bool = False) -> tuple[str, dict, dict[str, Any]]:
  """Converts the checkpoint at `src` into Flax variables, strictly.

  `src` is a file, or 'bundled:NAME' for a checkpoint shipped in an installed package (a zoo
  model: lc_jax.checkpoints.convert('zoo:ID')).

  `arch` is inferred from the checkpoint when not given; a checkpoint of another architecture
  or family is refused. Every model variable must be filled and every checkpoint key used,
  except keys dropped by a named rule (reported under metadata['dropped']); otherwise a
  `ConversionError` lists what is missing, unexpected or of the wrong shape. `mean`/`std`
  override the architecture's input normalisation (use 0 and 1 for models trained without), or
  the normaliser the checkpoint holds (the robustness library's `normalizer`), which is used
  when they are not given; where they differ from it, a line on stderr says so. A tensor that
  holds NaN or inf is refused, naming it, unless `allow_nonfinite`.

  Returns (arch, variables, metadata) with variables {'params': ..., 'batch_stats': ...}.
  """
  checkpoint = reader.read(src, trust_pickle=trust_pickle)
  arch, variables, metadata = build(checkpoint.tensors, arch, mean, std, checkpoint.path,
                                    normalization=checkpoint.normalization,
                                    allow_nonfinite=allow_nonfinite)
  return arch, variables, {
      **metadata, 'source': checkpoint.path, 'sha256': checkpoint.sha256,
      'format': checkpoint.format, 'container': checkpoint.container,
      'stripped_prefix': checkpoint.prefix, 'dropped': checkpoint.dropped}


def build(tensors: dict[str, np.ndarray], arch: str | None, mean, std, where: str,
          origin: dict[str, str] | None = None, *,
          normalization: tuple[Sequence[float], Sequence[float]] | None = None,
          allow_nonfinite: bool = False) -> tuple[str, dict, dict[str, Any]]:
  """Fills an architecture's variables from torch-named `tensors` (read from `where`), strictly:
  the architecture is inferred by the families' recipes when `arch` is None, and one of another
  family or variant is refused; `origin` names a renamed key's name in its file, for messages.
  `normalization`: the (mean, std) the file holds, used where `mean`/`std` are None (a given
  one that differs is stated on stderr). A tensor with NaN or inf is refused unless
  `allow_nonfinite`. Returns (arch, variables, metadata of the model: arch, classes,
  normalisation, sizes)."""
  if not tensors:
    raise ConversionError(f'{where} holds no tensors of a network')
  found = recipes.detect(tensors)
  if arch is None:
    if found is None:
      keys = ', '.join(list(tensors)[:4])
      families = ', '.join(sorted({models.get(n).family for n in models.names()}))
      raise ConversionError(
          f'cannot tell the architecture of {where}: its keys ({keys}, ...) fit no '
          f'registered family ({families}); pass the architecture explicitly')
    recipe, (arch, *others) = found
    if others:
      raise ConversionError(
          f'{where} fits {" and ".join([arch, *others])}, which have the same layers and '
          'differ in their input normalisation; pass the architecture')
  else:
    recipe = recipes.for_family(models.get(arch).family)
    if found is not None and arch not in found[1]:
      raise ArchitectureMismatch(where, found[1][0], arch)
  spec = models.get(arch)
  tensors = recipe.rename(dict(tensors))
  num_classes = spec.num_classes
  if recipe.classifier in tensors:
    num_classes = int(tensors[recipe.classifier].shape[0])
  settings = recipe.settings(tensors)
  overrides: dict[str, Any] = {'num_classes': num_classes, **settings}
  if normalization is not None:
    _state_other_normalization(where, normalization, mean, std)
    mean = normalization[0] if mean is None else mean
    std = normalization[1] if std is None else std
  if mean is not None:
    overrides['mean'] = tuple(float(m) for m in mean)
  if std is not None:
    overrides['std'] = tuple(float(s) for s in std)
  module = spec.create(**overrides)
  variables, mismatch = mapping.fill(models.variable_shapes(module, spec.input_size), tensors)
  if mismatch:
    shown = _with_origin(mismatch, origin) if origin else mismatch
    raise mapping.MismatchError(f'{where} does not fit {arch}: {shown.summary()}', mismatch)
  if not allow_nonfinite:
    _refuse_nonfinite(tensors, where, origin or {})
  return arch, variables, {
      'arch': arch,
      'family': spec.family,
      'num_classes': num_classes,
      **({'module_settings': settings} if settings else {}),
      'mean': list(module.mean),
      'std': list(module.std),
      **({'checkpoint_normalization': {'mean': list(normalization[0]),
                                       'std': list(normalization[1])}}
         if normalization is not None else {}),
      'num_tensors': len(tensors),
      'num_parameters': int(sum(np.size(v) for v in jax.tree.leaves(variables['params']))),
      'lc_jax_version': __version__,
  }


def _state_other_normalization(where: str, own, mean, std) -> None:
  """One line on stderr where a given mean or std is not the one the checkpoint holds."""
  differ = [(name, given, held)
            for name, given, held in (('mean', mean, own[0]), ('std', std, own[1]))
            if given is not None and not np.allclose(given, held, rtol=1e-6, atol=0)]
  if differ:
    print(f'{where} normalises its inputs with its own '
          + ', '.join(f'{name} {tuple(held)}' for name, _, held in differ) + '; using '
          + ', '.join(f'{name} {tuple(float(v) for v in given)}' for name, given, _ in differ)
          + ' as given', file=sys.stderr, flush=True)


def _refuse_nonfinite(tensors: dict[str, np.ndarray], where: str, origin: dict[str, str]) -> None:
  """A ConversionError naming the tensors that hold NaN or inf: a model with them computes NaN
  or inf, and every criticality measured on it is meaningless."""
  bad = []
  for key, value in tensors.items():
    if np.issubdtype(value.dtype, np.floating):
      finite = int(np.count_nonzero(np.isfinite(value)))
      if finite < value.size:
        label = f'{key} ({origin[key]})' if key in origin else key
        bad.append(f'{label} ({value.size - finite} of {value.size} values)')
  if bad:
    more = f', and {len(bad) - 4} more' if len(bad) > 4 else ''
    raise ConversionError(
        f'{where}: {len(bad)} tensor{"s hold" if len(bad) > 1 else " holds"} NaN or inf: '
        f'{", ".join(bad[:4])}{more}; if you mean to keep them, allow it: '
        '--config.model.allow_nonfinite=true for run.py, --allow_nonfinite for python -m '
        'converters, allow_nonfinite=True in Python')


def _with_origin(mismatch: mapping.Mismatch, origin: dict[str, str]) -> mapping.Mismatch:
  """The misfits with each renamed key followed by its name in the file, so the user can find
  it: 'fc.weight (module.linear.weight in head.pth)'."""
  def label(key: str) -> str:
    return f'{key} ({origin[key]})' if key in origin else key
  return mapping.Mismatch(missing=mismatch.missing,
                          unexpected=[(label(k), s) for k, s in mismatch.unexpected],
                          shapes=[(label(k), e, f) for k, e, f in mismatch.shapes])


def digests_sha256(digests: Sequence[str]) -> str:
  """One file's sha256 is its own; several files' (backbone, then head) is the sha256 of their
  hex digests concatenated in order."""
  if len(digests) == 1:
    return digests[0]
  return hashlib.sha256(''.join(digests).encode()).hexdigest()
