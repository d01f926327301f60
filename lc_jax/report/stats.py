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
  dataset: str = ''  # the image set measured on (results.csv's dataset); '' when unknown


UNKNOWN_SET = 'unknown'  # how tables, figures and file names call the dataset '' beside named ones


def image_sets(datasets: Iterable[str]) -> list[str]:
  """The image sets named among `datasets` (rows' or summaries' dataset; '' names none), in
  order of first appearance."""
  return [d for d in dict.fromkeys(datasets) if d]


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


def _labels(keys: Sequence[tuple[str, str, str, str]]
            ) -> dict[tuple[str, str, str, str], str]:
  # model_id alone where it is unique; else add the reset mode, the image set, then the input's
  # folder where those still leave two alike; then a number.
  labels = {}
  for key in keys:
    source, model_id, mode, dataset = key
    same_id = [k for k in keys if k[1] == model_id]
    label = model_id
    if len({k[2] for k in same_id}) > 1:
      label += f' ({mode or "?"})'
    if len({k[3] for k in same_id}) > 1:
      label += f' [{dataset or UNKNOWN_SET}]'
    alike = [k for k in same_id if k[2:] == key[2:]]
    if len({k[0] for k in alike}) > 1:
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

  A model is a (source file, model_id, mode, dataset): criticality measured on two image sets
  is never averaged together. Rows from several `load`s may be concatenated. A row repeated
  for the same (model, trial, layer), as a resumed run may write, counts once (the last one
  wins). The 'original' row is no layer: it gives original_top1.
  """
  # The original's row (mode 'none') serves every reset mode of its file, model and image set.
  # Rows made by hand may lack a dataset: unknown, as in the paper's file.
  originals: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
  groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = {}
  for row in rows:
    dataset = row.get('dataset', '')
    if row['layer'] == schema.ORIGINAL:
      originals.setdefault((row['source'], row['model_id'], dataset), []).append(row)
    else:
      groups.setdefault((row['source'], row['model_id'], row['mode'], dataset), []).append(row)
  labels = _labels(list(groups))
  summaries = []
  for key, model_rows in groups.items():
    top1 = original_top1(originals.get((key[0], key[1], key[3]), []) + model_rows)
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
          per_trial=tuple((r['trial'], r['criticality']) for r in trial_rows),
          dataset=key[3]))
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


# ----------------------------------------------------------------------------------------------
# Resampling: bootstrap intervals and permutation p-values (formulas: docs/statistics.md).

RESAMPLES = 10_000  # bootstrap replicates, and random permutations, by default
SEED = 0  # of every resampling; the same inputs and seed give the same intervals


def rng_for(seed: int, *salt: int) -> np.random.Generator:
  """A generator for one resampling, from the seed and integers that name the resampling, so that
  each one's draws do not depend on which others ran before it."""
  return np.random.default_rng([seed, *salt])


def percentile_interval(replicates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The 2.5 and 97.5 percentiles of bootstrap `replicates` along axis 0 (the percentile
  bootstrap's 95% interval)."""
  low, high = np.percentile(replicates, [2.5, 97.5], axis=0)
  return low, high


def _weights(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
  """(resamples, n) bootstrap weights: each row the counts of a draw of n out of n with
  replacement, divided by n (so a weighted sum is the resample's mean)."""
  if n == 1:
    return np.ones((resamples, 1))
  return rng.multinomial(n, np.full(n, 1.0 / n), size=resamples) / n


_CHUNK = 512  # replicates per matrix product over images: bounds the weights' memory


def _image_means(rng: np.random.Generator, values: np.ndarray, resamples: int) -> np.ndarray:
  """(resamples, *values.shape[:-1]): means over the last axis (images) of `resamples`
  bootstrap resamples of it, one resample of the images shared by all other entries."""
  n = values.shape[-1]
  flat = values.reshape(-1, n)
  if n == 1:
    return np.broadcast_to(flat[:, 0], (resamples, flat.shape[0])).reshape(
        (resamples,) + values.shape[:-1])
  out = np.empty((resamples, flat.shape[0]))
  for start in range(0, resamples, _CHUNK):
    stop = min(resamples, start + _CHUNK)
    out[start:stop] = _weights(rng, n, stop - start) @ flat.T
  return out.reshape((resamples,) + values.shape[:-1])


def hierarchical_bootstrap(units: Sequence[np.ndarray], resamples: int = RESAMPLES,
                           seed: int = SEED, salt: int = 0) -> np.ndarray:
  """Bootstrap replicates of a mean over units (models) of each unit's mean over trials and,
  within a trial, over images: (resamples, Q).

  `units[m]` is an array (Q, T_m, N_m): Q quantities (early, deep, ...) of model m, its T_m
  trials, its N_m images (N_m = 1: a trial's value without per-image values). One replicate
  draws M models with replacement; for each model it draws T_m trials with replacement and
  N_m images with replacement, once per replicate (a model drawn twice in a replicate reuses
  its draws), the same draws for all Q quantities. The point estimate is the same mean without
  resampling (`nested_mean`).
  """
  rng = rng_for(seed, salt)
  model_weights = _weights(rng, len(units), resamples)  # (B, M)
  out = np.zeros((resamples, units[0].shape[0]))
  for m, unit in enumerate(units):
    per_trial = _image_means(rng, unit, resamples)  # (B, Q, T)
    trial_weights = _weights(rng, unit.shape[1], resamples)  # (B, T)
    out += model_weights[:, m:m + 1] * np.einsum('bqt,bt->bq', per_trial, trial_weights)
  return out


def nested_mean(units: Sequence[np.ndarray]) -> np.ndarray:
  """The mean over units of the mean over trials of the mean over images: (Q,)."""
  return np.mean([unit.mean(axis=(1, 2)) for unit in units], axis=0)


def permutation_p(a: Sequence[float], b: Sequence[float], permutations: int = RESAMPLES,
                  seed: int = SEED, salt: int = 0) -> float:
  """Two-sided permutation p-value of mean(a) - mean(b) over the pooled values' labels.

  Every relabelling when there are at most `permutations` of them (exact: the share of
  relabellings whose |difference| is at least the observed one); else `permutations` random
  ones, p = (1 + k) / (1 + permutations). NaN when a side has fewer than two values.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.size < 2 or b.size < 2:
    return math.nan
  pooled = np.concatenate([a, b])
  observed = abs(a.mean() - b.mean())
  tolerance = 1e-12 * max(1.0, float(np.abs(pooled).max()))  # equal up to rounding counts
  total, n = pooled.sum(), pooled.size
  if math.comb(n, a.size) <= permutations:
    import itertools  # pylint: disable=g-import-not-at-top
    sums = np.array([pooled[list(c)].sum() for c in itertools.combinations(range(n), a.size)])
    diffs = np.abs(sums / a.size - (total - sums) / b.size)
    return float(np.mean(diffs >= observed - tolerance))
  rng = rng_for(seed, salt)
  shuffled = rng.permuted(np.broadcast_to(pooled, (permutations, n)), axis=1)
  sums = shuffled[:, :a.size].sum(axis=1)
  diffs = np.abs(sums / a.size - (total - sums) / b.size)
  return float((1 + np.sum(diffs >= observed - tolerance)) / (1 + permutations))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = SEED, salt: int = 0) -> np.ndarray:
  """Bootstrap replicates of mean(b) - mean(a) per layer: (resamples, L).

  `a` and `b` are arrays (T, L, N): trials, layers, images, the same N images in the same
  order on both sides. One replicate draws N images with replacement, the same for both sides,
  every trial and layer; and T trials with replacement, by index on both sides when they have
  as many trials (trial t of one against trial t of the other), else on each side apart.
  """
  if a.shape[1:] != b.shape[1:]:
    raise ValueError(f'paired_bootstrap needs the same layers and images: {a.shape} vs {b.shape}')
  rng = rng_for(seed, salt)
  both = np.concatenate([a, b], axis=0)  # (Ta + Tb, L, N): one draw of the images for both
  per_trial = _image_means(rng, both, resamples)  # (B, Ta + Tb, L)
  ta = a.shape[0]
  wa = _weights(rng, ta, resamples)
  wb = wa if b.shape[0] == ta else _weights(rng, b.shape[0], resamples)
  return (np.einsum('btl,bt->bl', per_trial[:, ta:], wb)
          - np.einsum('btl,bt->bl', per_trial[:, :ta], wa))


def paired_t(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean(b) - mean(a), half-width of its 95% interval) per layer from trial values (T, L).

  With as many trials on both sides: the Student t interval of the per-trial differences
  b_t - a_t (`interval`). Else the two sides' Student t half-widths combined,
  sqrt(h_a^2 + h_b^2). The half-width is NaN where a side has one trial.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  difference = b.mean(axis=0) - a.mean(axis=0)
  if a.shape[0] == b.shape[0]:
    half = np.array([interval(column)[1] for column in (b - a).T])
  else:
    half = np.hypot([interval(c)[1] for c in a.T], [interval(c)[1] for c in b.T])
  return difference, half
