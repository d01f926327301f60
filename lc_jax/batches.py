"""A batch on its way to a model: uint8 pixels scaled to [0, 1], rows padded with a mask, chunks.

Every path into a model (run.py's loop, `lc_jax.criticality`, the torch cross-checks) scales and
pads here, so the rule is written once. Imports numpy only: the functions take numpy arrays, and
`to_unit` JAX arrays too (under jit as well).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lc_jax.constants import PIXEL_MAX


def to_unit(pixels):
  """uint8 `pixels` (0..255) as float32 in [0, 1], pixels / 255; any other dtype as it is (float
  images come in [0, 1] already). For numpy and JAX arrays alike."""
  if pixels.dtype != np.uint8:
    return pixels
  return pixels.astype(np.float32) / PIXEL_MAX


def pad(batch: np.ndarray, multiple: int, fill: Any = 0) -> np.ndarray:
  """`batch` with rows of `fill` appended up to a multiple of `multiple`."""
  missing = -len(batch) % multiple
  if not missing:
    return batch
  return np.concatenate([batch, np.full((missing, *batch.shape[1:]), fill, batch.dtype)])


def pad_batch(images: np.ndarray, labels: np.ndarray | None, mask: np.ndarray, multiple: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(images, labels, mask) padded to a multiple of `multiple` rows: padding rows are zeros with
  label -1 and mask False. Labels None (a source without labels) become -1 throughout."""
  labels = np.full(mask.shape, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
  return pad(images, multiple), pad(labels, multiple, -1), pad(mask, multiple, False)


def split(batch: tuple, rows: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """A host batch (images, labels or None, mask) as chunks of `rows` rows, the last padded
  (`pad_batch`)."""
  x, y, mask = pad_batch(*batch, rows)
  return [(x[i:i + rows], y[i:i + rows], mask[i:i + rows]) for i in range(0, len(mask), rows)]


def chunk_rows(batch_size: int, limit: int, multiple: int = 1) -> int:
  """Rows per chunk when a batch of `batch_size` runs in chunks of at most `limit` images (0: no
  limit), each a multiple of `multiple` (a process's devices): the fewest chunks, as even as
  that allows, so the padding stays small."""
  if not limit or limit >= batch_size:
    return -(-batch_size // multiple) * multiple
  most = max(multiple, limit // multiple * multiple)
  count = -(-batch_size // most)
  rows = -(-batch_size // count)
  return -(-rows // multiple) * multiple
