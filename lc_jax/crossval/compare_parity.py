"""The parity check: the original model's logits and every module output, lc-jax against torch on
the same weights and images (`converters.parity.compare`), and the first module, stage and layer
where they part."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from converters import parity
from lc_jax import layers as layers_lib
from lc_jax import schema
from lc_jax.crossval.report import Check
from lc_jax.crossval.report import judged

# Parity quantities of what cannot be compared: a side not finite, or zeros on both sides.
NOT_FINITE = 'not finite in {}'
ALL_ZEROS = 'all zeros in both'
PARITY_BATCH = 8  # images per parity batch: every module output of the batch is kept


def parity_checks(module, variables: dict, model, images: np.ndarray,
                  tolerances: Mapping[str, float]) -> list[Check]:
  """The original's logits and module outputs, lc-jax against the torch `model` holding the
  same weights, over uint8 `images` in batches (`converters.parity.compare`); in torch's
  forward order, the logits first.

  An output that is not finite on either side fails (quantity NOT_FINITE), and so does one that
  is all zeros on both sides while the logits are not (ALL_ZEROS): neither compares anything.
  """
  diffs: dict[str, float] = {}
  scales: dict[str, float] = {}
  for start in range(0, len(images), PARITY_BATCH):
    batch = np.asarray(images[start:start + PARITY_BATCH], np.float32) / 255
    found = parity.compare(module, variables, model, batch)
    for name, diff in found['diffs'].items():
      diffs[name] = _largest(diffs.get(name, 0.0), diff)
      scales[name] = _largest(scales.get(name, 0.0), found['scales'][name])
  checks = []
  for name, diff in diffs.items():
    scale, tolerance = scales[name], tolerances['logits' if name == 'logits' else 'activations']
    # |lc-jax - torch| is finite exactly when both sides are; the largest |torch value| tells
    # which side is not.
    if not math.isfinite(diff):
      side = 'torch' if not math.isfinite(scale) else 'lc-jax'
      checks.append(Check('parity', name, None, NOT_FINITE.format(side), scale, math.nan,
                          math.nan, tolerance, math.inf))
    elif diff == 0 and scale == 0 and name != 'logits' and scales['logits'] > 0:
      checks.append(Check('parity', name, None, ALL_ZEROS, 0.0, 0.0, math.nan, tolerance,
                          math.inf))
    else:
      checks.append(judged('parity', name, None, 'relative max diff', scale, math.nan,
                            diff / max(1.0, scale), tolerance))
  return checks


def _largest(a: float, b: float) -> float:
  """max(a, b), but NaN when either is (Python's max keeps a NaN only in first place)."""
  return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def first_disagreement(checks: Sequence[Check], layers: Sequence[layers_lib.Layer]
                       ) -> tuple[str | None, str | None, str | None]:
  """(module, stage, layer): the first module output over its tolerance in forward order, the
  stage it lies in, and the first inventory layer over it (None where all are within)."""
  by_name = {layer.name: layer for layer in layers}
  blocks = {layer.block: layer.stage for layer in layers if schema.in_block(layer.block)}
  module = stage = layer = None
  seen_block = False
  for c in checks:
    if c.check != 'parity' or c.name == 'logits':
      continue
    if c.name in by_name:
      where = by_name[c.name].stage
    else:
      # A block, a stage, or a module inside one; outside them, the stem or the head.
      where = next((s for b, s in blocks.items() if c.name in (b, s)
                    or c.name.startswith(b + '.')), None)
      where = where or schema.outside_blocks(seen_block)
    seen_block |= schema.in_block(where)
    if not c.passed:
      if module is None:
        module, stage = c.name, where
      if layer is None and c.name in by_name:
        layer = c.name
  return module, stage, layer
