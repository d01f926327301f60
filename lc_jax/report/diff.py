"""Two models, or two runs of one, compared layer by layer: B - A with a paired 95% interval, and
the layers whose interval excludes 0 marked (its ends within ROUNDING of 0, float32 rounding,
counted as 0).

    python -m lc_jax.report --diff A B [--out DIR]      # A, B: workdirs, or CSV@MODEL_ID

    d = diff.diff(report.load(a), report.load(b), per_image_a, per_image_b)
    print(diff.table(d)); diff.plot(d, 'diff.png')

With per-image values on both sides (per_image.npz) over the same images, the interval is a paired
bootstrap over images and trials (stats.paired_bootstrap); else a paired Student t over trials
(stats.paired_t); with one trial and no per-image values, the two sides' image intervals
(criticality_ci_images) combined. The formulas are in docs/statistics.md.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from lc_jax.errors import UserError
from lc_jax.report import read
from lc_jax.report import stats
from lc_jax.report.stats import LayerSummary, by_model, summarize

# Criticality (a fraction) within which two runs of the same model and images agree whatever
# their batch and chunk layout: each image's float32 arithmetic rounds differently under another
# layout (docs/speed.md, tested to 1e-6). An interval end or difference within it counts as 0,
# so that rounding is not marked as a change.
ROUNDING = 1e-6


@dataclasses.dataclass(frozen=True)
class LayerDiff:
  """One layer in both: criticality of each (fractions), b - a and its 95% interval."""

  layer: str
  stage: str
  a: float
  b: float
  difference: float
  low: float
  high: float

  @property
  def marked(self) -> bool:
    """Whether the interval excludes 0, its ends within ROUNDING of 0 counted as 0."""
    return bool(self.low > ROUNDING or self.high < -ROUNDING)


@dataclasses.dataclass(frozen=True)
class Diff:
  a: str  # the labels of the two sides
  b: str
  layers: list[LayerDiff]
  over: str  # what the interval is over
  notes: list[str]


def select(spec: str) -> tuple[list[dict[str, Any]], str]:
  """(rows of one model, its label) from 'PATH' (a workdir or a results CSV of one model) or
  'PATH@MODEL_ID' (a model of a CSV that holds several)."""
  path, model = spec, None
  if not os.path.exists(spec) and '@' in spec:
    path, model = spec.rsplit('@', 1)
  rows = read.load(path)
  models = list(dict.fromkeys(r['model_id'] for r in rows))
  if model is None:
    if len(models) > 1:
      raise UserError(f'{path} holds {len(models)} models; pick one: --diff {path}@MODEL_ID '
                      f'(e.g. {path}@{models[0]})')
    model = models[0]
  elif model not in models:
    from lc_jax import errors  # pylint: disable=g-import-not-at-top
    raise errors.unknown(f'model of {path}', model, models)
  return [r for r in rows if r['model_id'] == model], f'{model} ({path})'


def _trial_matrix(layers: Sequence[LayerSummary], trials: Sequence[int]) -> np.ndarray:
  """(T, L) criticality; NaN where a trial of a layer is missing or not finite."""
  out = np.full((len(trials), len(layers)), math.nan)
  index = {t: i for i, t in enumerate(trials)}
  for j, s in enumerate(layers):
    for trial, value in s.per_trial:
      if trial in index:
        out[index[trial], j] = value
  return out


def _image_arrays(kept, trials, layers) -> np.ndarray | None:
  """(T, L, N) per-image values of `layers` in `trials`; None when one is missing, the counts
  differ or a value is not finite."""
  if kept is None:
    return None
  try:
    array = np.array([[kept[(t, l)] for l in layers] for t in trials], dtype=np.float64)
  except (KeyError, ValueError):
    return None
  return array if array.ndim == 3 and np.all(np.isfinite(array)) else None


def diff(rows_a: Sequence[dict[str, Any]], rows_b: Sequence[dict[str, Any]],
         per_image_a: Mapping | None = None, per_image_b: Mapping | None = None,
         same_images: bool = True, resamples: int = stats.RESAMPLES,
         seed: int = stats.SEED, labels: tuple[str, str] = ('A', 'B')) -> Diff:
  """B - A per layer that both hold, in A's forward order (see the module's docstring).

  `per_image_*`: read.per_image_of of each side, or None; `same_images`: whether the two runs
  measured the same images in the same order (their run.json agree), which pairing needs.
  Runs whose run.json name two architectures are refused (a UserError); a side without one
  (the paper's CSV, an API run without a workdir) is taken as it is.
  """
  archs = [read.run_arch(rows[0]['source']) if rows else '' for rows in (rows_a, rows_b)]
  if all(archs) and archs[0] != archs[1]:
    raise UserError(f'{labels[0]} is a {archs[0]} and {labels[1]} a {archs[1]} (their run.json): '
                    '--diff pairs layers by name, and in another architecture a name is '
                    'another layer; compare two runs of one architecture')
  sides = []
  for rows, label in ((rows_a, labels[0]), (rows_b, labels[1])):
    grouped = by_model(summarize(rows))
    if len(grouped) != 1:
      raise UserError(f'{label}: --diff compares one model with one model, found '
                      f'{len(grouped)}: {", ".join(grouped)}')
    sides.append(next(iter(grouped.values())))
  of_b = {s.layer: s for s in sides[1]}
  common = [s.layer for s in sides[0] if s.layer in of_b]
  if not common:
    raise UserError(f'{labels[0]} and {labels[1]} have no layer in common')
  a_layers = [s for s in sides[0] if s.layer in of_b]
  b_layers = [of_b[l] for l in common]
  trials_a = sorted({t for s in a_layers for t, _ in s.per_trial})
  trials_b = sorted({t for s in b_layers for t, _ in s.per_trial})
  ma, mb = _trial_matrix(a_layers, trials_a), _trial_matrix(b_layers, trials_b)
  a_mean = np.array([s.criticality for s in a_layers])
  b_mean = np.array([s.criticality for s in b_layers])
  notes = []

  images_a = _image_arrays(per_image_a, trials_a, common)
  images_b = _image_arrays(per_image_b, trials_b, common)
  if images_a is not None and images_b is not None and (
      images_a.shape[2] == images_b.shape[2] and same_images):
    reps = stats.paired_bootstrap(images_a, images_b, resamples, seed)
    low, high = stats.percentile_interval(reps)
    difference = images_b.mean(axis=(0, 2)) - images_a.mean(axis=(0, 2))
    paired = 'trials paired by index' if len(trials_a) == len(trials_b) else 'trials apart'
    over = (f'paired bootstrap over {images_a.shape[2]} images and the trials ({paired}), '
            f'{resamples} replicates, seed {seed}')
  else:
    if per_image_a is not None or per_image_b is not None:
      if per_image_a is None or per_image_b is None:
        why = 'only one side has per-image values'
      elif images_a is None or images_b is None:
        why = 'per-image values incomplete or not finite'
      else:
        why = 'the runs measured different images'
      notes.append(f'per-image values not used: {why}')
    _, half = stats.paired_t(ma, mb)
    difference = b_mean - a_mean  # each side's own mean over its finite trials
    over = ('Student t over the paired trial differences' if len(trials_a) == len(trials_b)
            else 'Student t over each side\'s trials, combined')
    if not np.any(np.isfinite(half)):
      half = np.hypot([s.ci_images for s in a_layers], [s.ci_images for s in b_layers])
      over = 'the two image intervals combined (one trial; unpaired, normal)'
    low, high = difference - half, difference + half
  layers = [LayerDiff(l, sa.stage, float(x), float(y), float(d), float(lo), float(hi))
            for l, sa, x, y, d, lo, hi in zip(common, a_layers, a_mean, b_mean, difference, low,
                                              high)]
  only = [s.layer for s in sides[0] if s.layer not in of_b] + [
      s.layer for s in sides[1] if s.layer not in {x.layer for x in sides[0]}]
  if only:
    notes.append(f'{len(only)} layers in one side only, left out: {", ".join(only[:8])}'
                 + (' ...' if len(only) > 8 else ''))
  return Diff(labels[0], labels[1], layers, over, notes)


def table(d: Diff) -> str:
  """One line per layer: A, B, B - A with its interval (percentage points), '*' when marked."""
  width = max(5, *(len(l.layer) for l in d.layers))
  lines = [f'B - A per layer, criticality in percentage points; A = {d.a}, B = {d.b}',
           f'{"layer":{width}s} {"stage":8s} {"A %":>7s} {"B %":>7s} {"B - A":>8s} '
           f'{"95% interval":>18s}']
  for l in d.layers:
    lines.append(f'{l.layer:{width}s} {l.stage:8s} {100 * l.a:7.2f} {100 * l.b:7.2f} '
                 f'{100 * l.difference:+8.2f} {_interval(l):>18s}' + (' *' if l.marked else ''))
  marked = [l.layer for l in d.layers if l.marked]
  lines.append(f'95% intervals: {d.over}. *: the interval excludes 0 '
               f'({len(marked)} of {len(d.layers)} layers), its ends within {100 * ROUNDING:g} '
               'pp of 0 counted as 0 (float32 rounding: runs of other batch sizes differ by '
               'that much)')
  lines += [f'note: {n}' for n in d.notes]
  return '\n'.join(lines)


def _interval(l: LayerDiff) -> str:
  if not (np.isfinite(l.low) and np.isfinite(l.high)):
    return '-'
  return f'[{100 * l.low:+.2f}, {100 * l.high:+.2f}]'


def write_csv(d: Diff, path: str) -> None:
  """diff.csv: layer, stage, a, b, difference, low, high, marked (fractions)."""
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(('layer', 'stage', 'a', 'b', 'difference', 'low', 'high', 'marked'))
    for l in d.layers:
      writer.writerow((l.layer, l.stage, repr(l.a), repr(l.b), repr(l.difference), repr(l.low),
                       repr(l.high), int(l.marked)))
