"""The metric check: every metric column of every (trial, layer) row, lc-jax's results.csv against
the torch loop's rows."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from lc_jax import schema
from lc_jax.crossval.report import Check
from lc_jax.crossval.report import judged

# Metric columns that count images, and the share of the images one unit of each is.
COUNTED = {'top1_acc': 0.01, 'top5_acc': 0.01, 'pred_agreement': 1.0, 'recovered_acc': None}
# Metric columns that are empty in both frameworks without labels (lc_jax.metrics.finalize;
# recovered_acc also when the original's top-1 is 0); any other column empty is a failure.
LABELLED = ('top1_acc', 'top5_acc', 'loss', 'recovered_acc')


def metric_checks(theirs: Sequence[Mapping[str, Any]], ours: Mapping[tuple[str, int], Mapping],
                  tolerances: Mapping[str, float]) -> list[Check]:
  """Every metric column of every row of the torch loop (`theirs`) against lc-jax's row of the
  same (layer, trial) in `ours`; LABELLED columns both leave empty (no labels) are left out,
  any other column empty or not finite on either side fails."""
  original_top1 = theirs[0]['top1_acc']
  checks = []
  for row in theirs:
    mine = ours.get((row['layer'], row['trial']))
    if mine is None:
      raise RuntimeError(f'lc-jax has no row of {row["layer"]} trial {row["trial"]}')
    for column in schema.METRICS:
      torch_value, value = float(row[column]), float(mine[column])
      if math.isnan(torch_value) and math.isnan(value) and column in LABELLED:
        continue
      if column in COUNTED:
        # recovered_acc is top1_acc / the original's: one image is original_top1 / 100 / N.
        unit = COUNTED[column] or original_top1 / 100
        difference, tolerance = abs(value - torch_value) * unit, tolerances['images']
      else:
        difference = abs(value - torch_value) / max(1.0, abs(torch_value))
        tolerance = tolerances['metrics']
      if not math.isfinite(difference):  # NaN or inf on a side: nothing compared
        difference = math.nan
      checks.append(judged('metric', row['layer'], row['trial'], column, torch_value, value,
                            difference, tolerance))
  return checks
