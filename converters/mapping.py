"""Torch state_dict -> Flax variables, strictly: every variable filled, every key used.

Flax paths mirror torch module names, so the mapping is mechanical: the variable
``params/layer1/0/conv1/kernel`` comes from ``layer1.0.conv1.weight``, transposed from OIHW to
HWIO. Anything that does not fit is collected and reported in one error.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from converters.reader import ConversionError

# (collection, Flax leaf name) -> torch tensor name within the module.
_TORCH_NAMES = {
    ('params', 'kernel'): 'weight',
    ('params', 'bias'): 'bias',
    ('params', 'scale'): 'weight',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}


def torch_key(collection: str, path: tuple[str, ...]) -> str:
  """The torch state_dict key of a Flax variable: ('params', ('fc', 'kernel')) -> 'fc.weight';
  a free-standing tensor (models.common.Parameter) is its module: ('params', ('cls_token',
  'value')) -> 'cls_token'."""
  if (collection, path[-1]) == ('params', 'value'):
    return '.'.join(path[:-1])
  try:
    leaf = _TORCH_NAMES[(collection, path[-1])]
  except KeyError:
    raise ValueError(f'no torch name for Flax variable {collection}/{"/".join(path)}') from None
  return '.'.join(path[:-1] + (leaf,))


# Kernel axis orders by rank: torch conv OIHW <-> Flax HWIO, torch linear (out, in) <-> (in, out).
_TO_FLAX = {4: (2, 3, 1, 0), 2: (1, 0)}
_TO_TORCH = {4: (3, 2, 0, 1), 2: (1, 0)}


def _permutation(leaf: str, ndim: int, table: dict[int, tuple[int, ...]]) -> tuple[int, ...]:
  return table.get(ndim, tuple(range(ndim))) if leaf == 'kernel' else tuple(range(ndim))


def to_flax_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  """Torch layout -> Flax layout: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
  return np.transpose(value, _permutation(leaf, value.ndim, _TO_FLAX))


def to_torch_layout(value: np.ndarray, leaf: str) -> np.ndarray:
  """Flax layout -> torch layout: the inverse of `to_flax_layout`."""
  return np.transpose(value, _permutation(leaf, value.ndim, _TO_TORCH))


def torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  """Flax shape -> the torch shape it comes from (the inverse of `to_flax_layout`)."""
  return tuple(shape[axis] for axis in _permutation(leaf, len(shape), _TO_TORCH))


@dataclasses.dataclass
class Mismatch:
  """What keeps a state_dict from filling a variable tree."""

  missing: list[tuple[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)
  unexpected: list[tuple[str, tuple[int, ...]]] = dataclasses.field(default_factory=list)
  shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(
      default_factory=list)

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.shapes)

  def summary(self, limit: int = 4) -> str:
    """One line: counts and the first few keys of each kind of misfit."""
    def listing(items: list[str]) -> str:
      more = f', and {len(items) - limit} more' if len(items) > limit else ''
      return ', '.join(items[:limit]) + more
    parts = []
    if self.missing:
      parts.append(f'{len(self.missing)} missing ('
                   + listing([f'{k} {s}' for k, s in self.missing]) + ')')
    if self.unexpected:
      parts.append(f'{len(self.unexpected)} unexpected ('
                   + listing([f'{k} {s}' for k, s in self.unexpected]) + ')')
    if self.shapes:
      parts.append(f'{len(self.shapes)} shape mismatches ('
                   + listing([f'{k}: expected {e}, found {f}' for k, e, f in self.shapes]) + ')')
    return '; '.join(parts)

  def report(self) -> str:
    """Every misfit, one per line: ' - missing', ' + unexpected', ' ~ shape'."""
    lines = [f' - {k} {s}' for k, s in self.missing]
    lines += [f' + {k} {s}' for k, s in self.unexpected]
    lines += [f' ~ {k}: expected {e}, found {f}' for k, e, f in self.shapes]
    return '\n'.join(lines)


class MismatchError(ConversionError):
  """A checkpoint that does not fit the architecture; `.mismatch` holds every misfit."""

  def __init__(self, message: str, mismatch: Mismatch):
    super().__init__(message)
    self.mismatch = mismatch


def fill(shapes: dict, tensors: dict[str, np.ndarray],
         key_of: Callable[[str, tuple[str, ...]], str] = torch_key) -> tuple[dict, Mismatch]:
  """Fills a variable tree of shapes from `tensors`; returns (variables, misfits).

  `key_of(collection, path)` names the torch key of each variable. Keys of `tensors` that fill
  no variable are reported as unexpected.
  """
  mismatch = Mismatch()
  used: set[str] = set()

  def visit(collection: str, prefix: tuple[str, ...], node):
    if isinstance(node, dict):
      return {k: visit(collection, prefix + (k,), v) for k, v in node.items()}
    key = key_of(collection, prefix)
    want = torch_shape(tuple(node.shape), prefix[-1])
    if key not in tensors:
      mismatch.missing.append((key, want))
      return None
    used.add(key)
    value = tensors[key]
    if tuple(value.shape) != want:
      mismatch.shapes.append((key, want, tuple(value.shape)))
      return None
    return np.ascontiguousarray(to_flax_layout(value, prefix[-1]), dtype=node.dtype)

  variables = {c: visit(c, (), tree) for c, tree in shapes.items()}
  mismatch.unexpected = [(k, tuple(v.shape)) for k, v in tensors.items() if k not in used]
  return variables, mismatch


def to_state_dict(variables: dict,
                  key_of: Callable[[str, tuple[str, ...]], str] = torch_key) -> dict[str, np.ndarray]:
  """Flax variables -> a torch state_dict of numpy arrays (without num_batches_tracked).

  The inverse of `fill`: lets a torch model run on exactly the weights a Flax model holds.
  """
  state: dict[str, np.ndarray] = {}

  def visit(collection: str, prefix: tuple[str, ...], node):
    if isinstance(node, dict):
      for k, v in node.items():
        visit(collection, prefix + (k,), v)
    else:
      state[key_of(collection, prefix)] = np.ascontiguousarray(
          to_torch_layout(np.asarray(node), prefix[-1]))

  for collection, tree in variables.items():
    visit(collection, (), tree)
  return state
