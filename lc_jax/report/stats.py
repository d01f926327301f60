"""Summaries of results rows: one LayerSummary per (model, layer) with its 95% intervals, and the
per-model figures (mean criticality, original top-1, Spearman's rho) the tables and plots use."""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Sequence

import numpy as np

from lc_jax import schema


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  """One layer of one model, over its trials. Criticality and intervals are fractions (not %)."""

  model: str  # unique label of the model among those summarized (usually its model_id)
  model_id: str
  layer: str
  kind: str
  stage: str
  mode: str
  num_params: float
  trials: int  # trials with a finite criticality
  criticality: float  # mean over trials of 1 - pred_cos_sim
  ci_trials: float  # half-width of the 95% Student t interval over trials; NaN with one trial
  ci_images: float  # mean over trials of criticality_ci_images; NaN when not recorded
  top1_acc: float
  recovered_acc: float  # a fraction of the original's top-1
  pred_kl_div: float
  pred_agreement: float
  original_top1: float  # the unmodified model's top-1 (%); NaN without labels
  source: str
  nonfinite: int = 0  # trials whose criticality is NaN or inf: left out of its mean, and shown
  num_images: float = math.nan  # images each trial was measured on; NaN when not recorded
  per_trial: tuple[tuple[int, float], ...] = ()  # (trial, criticality) of each trial


def finite_mean(values: Iterable[float]) -> float:
  """The mean of the finite `values`; NaN when there is none."""
  values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
  return float(values.mean()) if values.size else math.nan


def interval(values: Sequence[float]) -> tuple[float, float]:
  """(mean, half-width of the 95% Student t interval) of the finite `values`.

  The half-width is t_{0.975, n-1} * sd / sqrt(n) with the sample sd (ddof 1); NaN for n < 2.
  """
  from scipy import stats  # pylint: disable=g-import-not-at-top  (slow import, needed here only)
  values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
  if values.size == 0:
    return math.nan, math.nan
  if values.size == 1:
    return float(values[0]), math.nan
  sd = float(values.std(ddof=1))
  t = float(stats.t.ppf(0.975, values.size - 1))
  return float(values.mean()), t * sd / math.sqrt(values.size)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (ties get their average rank); NaN when x or y is constant."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (slow import, needed here only)
  x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
  if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
    return math.nan
  rho, _ = stats.spearmanr(x, y)
  return float(rho)


def original_top1(rows: Sequence[dict[str, Any]]) -> float:
  """The unmodified model's top-1 (%) among one model's rows: its own row, or (the paper's
  file has none) the median of top1_acc / recovered_acc; NaN without labels."""
  for row in rows:
    if row['layer'] == schema.ORIGINAL and np.isfinite(row['top1_acc']):
      return row['top1_acc']
  # The paper's file drops the original's row but keeps recovered_acc = top1 / original top1.
  ratios = [r['top1_acc'] / r['recovered_acc'] for r in rows
            if r['layer'] != schema.ORIGINAL and np.isfinite(r['top1_acc'])
            and np.isfinite(r['recovered_acc']) and r['recovered_acc'] > 0]
  return float(np.median(ratios)) if ratios else math.nan


def _labels(keys: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], str]:
  # model_id alone where it is unique; else add the reset mode, then the input's folder.
  labels = {}
  for key in keys:
    source, model_id, mode = key
    same_id = [k for k in keys if k[1] == model_id]
    label = model_id
    if len(same_id) > 1 and len({k[2] for k in same_id}) > 1:
      label += f' ({mode or "?"})'
    if len(same_id) > 1 and len({k[0] for k in same_id}) > 1:
      label += f' [{os.path.basename(os.path.dirname(os.path.abspath(source)))}]'
    labels[key] = label
  counts: dict[str, int] = {}
  for key in keys:  # still equal (the same folder name twice): number them
    counts[labels[key]] = counts.get(labels[key], 0) + 1
  seen: dict[str, int] = {}
  for key in keys:
    if counts[labels[key]] > 1:
      seen[labels[key]] = seen.get(labels[key], 0) + 1
      labels[key] = f'{labels[key]} #{seen[labels[key]]}'
  return labels


def summarize(rows: Sequence[dict[str, Any]]) -> list[LayerSummary]:
  """One LayerSummary per (model, layer), models and layers in order of first appearance.

  A model is a (source file, model_id, mode); rows from several `load`s may be concatenated.
  A row repeated for the same (model, trial, layer), as a resumed run may write, counts once
  (the last one wins). The 'original' row is no layer: it gives original_top1.
  """
  # The original's row (mode 'none') serves every reset mode of its file and model.
  originals: dict[tuple[str, str], list[dict[str, Any]]] = {}
  groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
  for row in rows:
    if row['layer'] == schema.ORIGINAL:
      originals.setdefault((row['source'], row['model_id']), []).append(row)
    else:
      groups.setdefault((row['source'], row['model_id'], row['mode']), []).append(row)
  labels = _labels(list(groups))
  summaries = []
  for key, model_rows in groups.items():
    top1 = original_top1(originals.get(key[:2], []) + model_rows)
    by_layer: dict[str, dict[int, dict[str, Any]]] = {}
    for row in model_rows:
      by_layer.setdefault(row['layer'], {})[row['trial']] = row
    for layer, trials in by_layer.items():
      trial_rows = [trials[t] for t in sorted(trials)]
      criticality, ci_trials = interval([r['criticality'] for r in trial_rows])
      first = trial_rows[0]
      summaries.append(LayerSummary(
          model=labels[key], model_id=key[1], layer=layer, kind=first['kind'],
          stage=first['stage'], mode=key[2], num_params=first['num_params'],
          trials=int(sum(np.isfinite(r['criticality']) for r in trial_rows)),
          criticality=criticality, ci_trials=ci_trials,
          ci_images=finite_mean(r['criticality_ci_images'] for r in trial_rows),
          top1_acc=finite_mean(r['top1_acc'] for r in trial_rows),
          recovered_acc=finite_mean(r['recovered_acc'] for r in trial_rows),
          pred_kl_div=finite_mean(r['pred_kl_div'] for r in trial_rows),
          pred_agreement=finite_mean(r['pred_agreement'] for r in trial_rows),
          original_top1=top1, source=key[0],
          nonfinite=int(sum(not np.isfinite(r['criticality']) for r in trial_rows)),
          num_images=finite_mean(r['num_images'] for r in trial_rows),
          per_trial=tuple((r['trial'], r['criticality']) for r in trial_rows)))
  return summaries


def nonfinite_note(layers: Sequence[LayerSummary]) -> str | None:
  """The layers with a NaN or inf criticality in some trial ('bn1 (2 of 3 trials)', ...), or
  None when every trial of every layer is finite."""
  marked = [f'{s.layer} ({s.nonfinite} of {s.trials + s.nonfinite} trials)'
            for s in layers if s.nonfinite]
  return ', '.join(marked) if marked else None


def by_model(summaries: Sequence[LayerSummary]) -> dict[str, list[LayerSummary]]:
  """The summaries grouped by model label, in order of first appearance."""
  grouped: dict[str, list[LayerSummary]] = {}
  for s in summaries:
    grouped.setdefault(s.model, []).append(s)
  return grouped


def model_points(summaries: Sequence[LayerSummary]) -> list[tuple[str, float, float]]:
  """(model, mean criticality over its layers in %, original top-1 in %) of every model."""
  return [(model, 100 * finite_mean(s.criticality for s in layers), layers[0].original_top1)
          for model, layers in by_model(summaries).items()]


def model_interval(layers: Sequence[LayerSummary]) -> tuple[float, float]:
  """(mean criticality over one model's layers, half-width of its 95% Student t interval over
  trials), both in %: each trial's mean over its finite layers, then `interval` over the
  trials; the half-width is NaN with one trial."""
  per_trial: dict[int, list[float]] = {}
  for s in layers:
    for trial, value in s.per_trial:
      per_trial.setdefault(trial, []).append(value)
  mean, half = interval([finite_mean(values) for values in per_trial.values()])
  return 100 * finite_mean(s.criticality for s in layers), 100 * half
