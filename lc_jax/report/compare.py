"""Our results against the paper's released ones, model by model: mean criticality, the rank
correlation of the per-layer profiles, the largest per-layer differences in units of the trial
spread, and the original top-1 against the value the model zoo expects.

    comparisons = compare(report.load('paper_results.csv'), report.load('out/paper/m1') + ...)
    print(comparison_table(comparisons))

A layer's difference is measured in standard errors of the two means over trials together,
z = |ours - paper| / sqrt(se_ours^2 + se_paper^2), se = sd / sqrt(trials) (sample sd), with the
combined error floored at MIN_SE (one trial has no spread). A model disagrees when a layer's z
exceeds `z_limit` (5 by default: with 54 layers and 51 models, a chance 5-sigma difference is
unlikely), or when its original top-1 is more than TOP1_TOLERANCE points from the expected one.
Rows whose criticality is NaN or inf are left out, and the table says how many, per model.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from lc_jax import schema
from lc_jax.report.stats import original_top1
from lc_jax.report.stats import spearman

MIN_SE = 1e-3  # criticality (a fraction): 0.1 percentage point
TOP1_TOLERANCE = 1.0  # percentage points


@dataclasses.dataclass(frozen=True)
class Comparison:
  """One model in both results."""

  model_id: str
  layers: int  # layers both hold
  ours: float  # mean criticality over those layers (a fraction)
  paper: float
  rank_correlation: float  # Spearman's rho of the per-layer mean criticalities
  worst_layer: str
  worst_z: float  # its difference in combined standard errors
  worst_difference: float  # ours - paper at that layer
  ours_top1: float  # the original's top-1 (%), NaN without labels
  paper_top1: float
  expected_top1: float  # the zoo's value for the paper's 10,000 images; NaN if unknown
  disagrees: str  # why the model is flagged; '' when it agrees
  # Rows of ours and of the paper's whose criticality is NaN or inf: left out of the above.
  left_out: tuple[int, int] = (0, 0)


def _nonfinite(rows: Sequence[dict[str, Any]]) -> dict[str, int]:
  """model_id -> its rows of a reset layer whose criticality is NaN or inf."""
  counts: dict[str, int] = {}
  for row in rows:
    if row['layer'] != schema.ORIGINAL and not np.isfinite(row['criticality']):
      counts[row['model_id']] = counts.get(row['model_id'], 0) + 1
  return counts


def _per_layer(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, tuple[float, float]]]:
  """model_id -> layer -> (mean, standard error) of the finite criticalities over trials."""
  values: dict[str, dict[str, list[float]]] = {}
  for row in rows:
    if row['layer'] != schema.ORIGINAL and np.isfinite(row['criticality']):
      values.setdefault(row['model_id'], {}).setdefault(row['layer'], []).append(
          row['criticality'])
  out: dict[str, dict[str, tuple[float, float]]] = {}
  for model, layers in values.items():
    out[model] = {}
    for layer, v in layers.items():
      v = np.asarray(v, np.float64)
      se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
      out[model][layer] = (float(v.mean()), se)
  return out


def _original_top1(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
  """model_id -> the original's top-1 (%), as the summaries take it (stats.original_top1)."""
  by_model: dict[str, list[dict[str, Any]]] = {}
  for row in rows:
    by_model.setdefault(row['model_id'], []).append(row)
  return {model: original_top1(model_rows) for model, model_rows in by_model.items()}


def _expected_top1(model_id: str) -> float:
  try:
    from lc_jax import zoo  # pylint: disable=g-import-not-at-top
    return float(zoo.get(model_id).expected_top1)
  except Exception:  # pylint: disable=broad-except  # not a zoo model, or no zoo
    return math.nan


def compare(paper_rows: Sequence[dict[str, Any]], our_rows: Sequence[dict[str, Any]],
            z_limit: float = 5.0) -> list[Comparison]:
  """A Comparison for every model in both, in the order of `our_rows`."""
  paper, ours = _per_layer(paper_rows), _per_layer(our_rows)
  paper_top1, ours_top1 = _original_top1(paper_rows), _original_top1(our_rows)
  paper_nonfinite, ours_nonfinite = _nonfinite(paper_rows), _nonfinite(our_rows)
  comparisons = []
  for model, layers in ours.items():
    if model not in paper:
      continue
    common = [layer for layer in layers if layer in paper[model]]
    if not common:
      continue
    a = np.asarray([layers[l][0] for l in common])
    b = np.asarray([paper[model][l][0] for l in common])
    se = np.asarray([math.hypot(*(0.0 if math.isnan(x) else x
                                  for x in (layers[l][1], paper[model][l][1])))
                     for l in common])
    z = np.abs(a - b) / np.maximum(se, MIN_SE)
    worst = int(np.argmax(z))
    expected = _expected_top1(model)
    top1 = ours_top1.get(model, math.nan)
    reasons = []
    if z[worst] > z_limit:
      reasons.append(f'{common[worst]} differs by {z[worst]:.1f} standard errors')
    if np.isfinite(expected) and np.isfinite(top1) and abs(top1 - expected) > TOP1_TOLERANCE:
      reasons.append(f'top-1 {top1:.2f}% where {expected:.2f}% is expected')
    comparisons.append(Comparison(
        model_id=model, layers=len(common), ours=float(a.mean()), paper=float(b.mean()),
        rank_correlation=spearman(a, b) if len(common) > 1 else math.nan,
        worst_layer=common[worst], worst_z=float(z[worst]),
        worst_difference=float(a[worst] - b[worst]), ours_top1=top1,
        paper_top1=paper_top1.get(model, math.nan), expected_top1=expected,
        disagrees='; '.join(reasons),
        left_out=(ours_nonfinite.get(model, 0), paper_nonfinite.get(model, 0))))
  return comparisons


def comparison_table(comparisons: Sequence[Comparison]) -> str:
  """One line per model, then the verdict."""
  width = max([len('model')] + [len(c.model_id) for c in comparisons])
  lines = [f'{"model":{width}s}  layers  crit % ours  paper    rho   worst layer '
           f'                 z   diff %   top-1 ours  paper  expected']
  for c in comparisons:
    lines.append(
        f'{c.model_id:{width}s}  {c.layers:6d}  {100 * c.ours:9.2f}  {100 * c.paper:5.2f}  '
        f'{c.rank_correlation:5.3f}   {c.worst_layer:24s} {c.worst_z:5.1f}  '
        f'{100 * c.worst_difference:+6.2f}   {_pct(c.ours_top1):>10s} {_pct(c.paper_top1):>6s} '
        f'{_pct(c.expected_top1):>9s}' + (f'  DISAGREES: {c.disagrees}' if c.disagrees else ''))
  for c in comparisons:
    if any(c.left_out):
      lines.append(f'{c.model_id}: left out, NaN or inf criticality: {c.left_out[0]} of our '
                   f"rows, {c.left_out[1]} of the paper's")
  flagged = [c.model_id for c in comparisons if c.disagrees]
  lines.append(f'{len(comparisons)} models compared; '
               + (f'{len(flagged)} disagree beyond the trial noise: {", ".join(flagged)}'
                  if flagged else 'all agree within the trial noise'))
  return '\n'.join(lines)


def _pct(value: float) -> str:
  return f'{value:.2f}' if np.isfinite(value) else '-'
