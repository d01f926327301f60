"""The paper's findings as tested statements: early- and deep-layer criticality by category, their
changes between categories with bootstrap intervals and permutation p-values, and the paper's
three statements judged by a stated rule.

    python -m lc_jax.report --claims paper_results.csv [--early=stem,layer1 --deep=layer3,layer4]

    c = claims.claims(summaries, categories_of)    # Claims: definitions, estimates, statements
    print(claims.markdown(c)); claims.write(c, 'out/report')   # claims.md, claims.csv

Early and deep are sets of stages (`regions`); a model's early (deep) criticality in a trial is
the mean over the layers of those stages. The formulas are in docs/statistics.md.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Mapping, Sequence

import numpy as np

from lc_jax import errors
from lc_jax import schema
from lc_jax.report import stats
from lc_jax.report.categories import OTHER
from lc_jax.report.read import per_image_of
from lc_jax.report.stats import LayerSummary, by_model

QUANTITIES = ('early', 'deep', 'deep - early')
BASELINE = 'baseline'
# The stages that are never early or deep: before the first stage, after the last.
STEM, HEAD = schema.STEM, schema.HEAD
PER_IMAGE_TOLERANCE = 1e-5  # per-image means must give the CSV's trial values within this
RULE = ('holds: the 95% interval of the effect lies wholly on the stated side of 0; does not '
        'hold: wholly on the other side; not resolved: it contains 0.')


@dataclasses.dataclass(frozen=True)
class Statement:
  """One of the paper's statements, as a sign of a change in (deep - early) criticality."""

  text: str
  category: str
  against: str
  direction: int  # -1: the change is stated to be negative (criticality moves to early layers)


# The abstract of Gavrikov et al. (2024): improved training regimes and self-supervised training
# increase the importance of early layers while under-utilising deeper layers; adversarial
# training displays the opposite trend.
STATEMENTS = (
    Statement('improved training regimes increase the importance of early layers and '
              'under-utilise deeper layers', 'training_recipes', BASELINE, -1),
    Statement('self-supervised training increases the importance of early layers and '
              'under-utilises deeper layers', 'contrastive', BASELINE, -1),
    Statement('adversarial training displays the opposite trend (deeper layers gain '
              'importance over early ones)', 'adversarial_training', BASELINE, +1),
)


@dataclasses.dataclass(frozen=True)
class Definition:
  """Early and deep for one architecture (one forward order of stages)."""

  stages: tuple[str, ...]
  models: int
  early: tuple[str, ...]
  deep: tuple[str, ...]
  early_layers: int  # layers of the early stages, in the first model of the architecture
  deep_layers: int


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A category's level (kind 'category', b '') or a change a - b (kind 'change'), in
  criticality fractions."""

  kind: str
  a: str
  b: str
  quantity: str  # one of QUANTITIES
  effect: float
  low: float  # the 95% percentile bootstrap interval
  high: float
  p_value: float  # two-sided permutation p over models; NaN unless both sides have 2 or more
  models_a: int
  models_b: int
  over: str  # what the bootstrap resampled


@dataclasses.dataclass(frozen=True)
class Verdict:
  """A statement, the change it is judged on, and the verdict by RULE."""

  statement: Statement
  effect: Estimate | None  # the change in 'deep - early'; None when a category has no model
  early: Estimate | None
  deep: Estimate | None
  verdict: str  # 'holds', 'does not hold' or 'not resolved'
  reason: str  # why it is not resolved for lack of models; '' otherwise
  # The same rule on each part: early changes against `direction`, deep with it.
  parts: str = ''


@dataclasses.dataclass(frozen=True)
class Claims:
  definitions: list[Definition]
  estimates: list[Estimate]
  verdicts: list[Verdict]
  categories: list[str]  # in band order
  notes: list[str]
  resamples: int
  seed: int


def stages_of(layers: Sequence[LayerSummary]) -> tuple[str, ...]:
  """A model's stages in forward order."""
  return tuple(dict.fromkeys(s.stage for s in layers))


def regions(stages: Sequence[str], early: Sequence[str] | None = None,
            deep: Sequence[str] | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(early stages, deep stages) of an architecture whose stages are `stages`, forward order.

  By default, of the n body stages (all but STEM and HEAD): early is the stem and the first
  max(1, round(n / 4)) of them (none with n = 1), deep the last max(1, n // 2); the head is
  neither. ResNet-50: early = stem + layer1, deep = layer3 + layer4. `early` and `deep`, when
  given, replace the defaults (stage names).
  """
  body = [s for s in stages if s not in (STEM, HEAD)]
  n = len(body)
  default_early = ([STEM] if STEM in stages else []) + body[:max(1, round(n / 4)) if n > 1 else 0]
  default_deep = body[n - max(1, n // 2):] if n else []
  return (tuple(early) if early is not None else tuple(default_early),
          tuple(deep) if deep is not None else tuple(default_deep))


def check_stages(summaries: Sequence[LayerSummary], early: Sequence[str] | None,
                 deep: Sequence[str] | None) -> None:
  """Refuses an --early or --deep stage that no model has, naming the known ones."""
  known = list(dict.fromkeys(s.stage for s in summaries))
  for flag, names in (('early', early), ('deep', deep)):
    for name in names or ():
      if name not in known:
        raise errors.unknown(f'--{flag} stage', name, known)


def _region_trials(layers: Sequence[LayerSummary], stages: Sequence[str]
                   ) -> dict[int, list[float]]:
  values: dict[int, list[float]] = {}
  for s in layers:
    if s.stage in stages:
      for trial, value in s.per_trial:
        if np.isfinite(value):
          values.setdefault(trial, []).append(value)
  return values


def _unit(layers: Sequence[LayerSummary], early: Sequence[str], deep: Sequence[str]
          ) -> tuple[np.ndarray | None, bool, str]:
  """(array (3, T, N) of a model's early, deep and deep - early per trial and image, whether
  N counts images, a note when per-image values were set aside); the array is None when the
  model has no finite layer in early or in deep."""
  by_early, by_deep = _region_trials(layers, early), _region_trials(layers, deep)
  trials = sorted(set(by_early) & set(by_deep))
  if not trials:
    return None, False, ''
  e = np.array([np.mean(by_early[t]) for t in trials])
  d = np.array([np.mean(by_deep[t]) for t in trials])
  by_trials = np.stack([e, d, d - e])[:, :, None]
  kept = per_image_of(layers[0].source)
  if kept is None:
    return by_trials, False, ''
  names = {'early': [s.layer for s in layers if s.stage in early],
           'deep': [s.layer for s in layers if s.stage in deep]}
  try:
    scores = [[np.mean([kept[(t, l)] for l in names[r]], axis=0) for t in trials]
              for r in ('early', 'deep')]
    images = np.array(scores)  # (2, T, N)
  except (KeyError, ValueError):  # a row not kept, or runs of different image counts
    return by_trials, False, f'{layers[0].model}: per-image values incomplete; over trials only'
  images = np.concatenate([images, images[1:2] - images[0:1]])
  finite = np.all(np.isfinite(images), axis=(0, 1))
  if not finite.all() or not np.allclose(images.mean(axis=2), by_trials[:, :, 0],
                                         rtol=0, atol=PER_IMAGE_TOLERANCE):
    return by_trials, False, (f'{layers[0].model}: per-image values do not reproduce its '
                              'results (non-finite, or another run); over trials only')
  return images, True, ''


def _change(a: str, b: str, q: int, reps: Mapping[str, np.ndarray], points, model_values,
            over: str, seed: int, salt: int) -> Estimate:
  diff = reps[a][:, q] - reps[b][:, q]
  low, high = stats.percentile_interval(diff)
  p = stats.permutation_p(model_values[a][:, q], model_values[b][:, q], seed=seed,
                          permutations=stats.RESAMPLES, salt=salt)
  return Estimate('change', a, b, QUANTITIES[q], float(points[a][q] - points[b][q]), float(low),
                  float(high), p, len(model_values[a]), len(model_values[b]), over)


def verdict(low: float, high: float, direction: int) -> str:
  """The verdict of RULE on an interval [low, high] for a change stated to have the sign
  `direction`."""
  if direction * low > 0 and direction * high > 0:
    return 'holds'
  if direction * low < 0 and direction * high < 0:
    return 'does not hold'
  return 'not resolved'


def claims(summaries: Sequence[LayerSummary], categories_of: Mapping[str, str],
           order: Sequence[str], early: Sequence[str] | None = None,
           deep: Sequence[str] | None = None, resamples: int = stats.RESAMPLES,
           seed: int = stats.SEED) -> Claims:
  """Early, deep and deep - early criticality of each category, their changes between every
  pair of categories (the later in `order` minus the earlier), and the STATEMENTS' verdicts.

  `categories_of` maps model_id to category; `order` is the band order (categories.assign).
  Intervals: 95% percentile bootstrap over models, trials and, where kept, images
  (stats.hierarchical_bootstrap); p-values: permutation over models (stats.permutation_p).
  """
  check_stages(summaries, early, deep)
  grouped = by_model(summaries)
  definitions: dict[tuple[str, ...], Definition] = {}
  units: dict[str, list[np.ndarray]] = {}
  with_images: dict[str, bool] = {}
  notes = []
  for model, layers in grouped.items():
    stages = stages_of(layers)
    e, d = regions(stages, early, deep)
    if stages not in definitions:
      definitions[stages] = Definition(
          stages, 0, e, d, sum(s.stage in e for s in layers), sum(s.stage in d for s in layers))
    definitions[stages] = dataclasses.replace(definitions[stages],
                                              models=definitions[stages].models + 1)
    unit, images, note = _unit(layers, e, d)
    if note:
      notes.append(note)
    if unit is None:
      notes.append(f'{model}: no finite layer among early ({"+".join(e) or "none"}) or deep '
                   f'({"+".join(d) or "none"}); left out')
      continue
    category = categories_of.get(layers[0].model_id, OTHER)
    units.setdefault(category, []).append(unit)
    with_images[category] = with_images.get(category, True) and images
  present = [c for c in order if c in units]

  reps, points, model_values = {}, {}, {}
  for index, category in enumerate(order):
    if category not in units:
      continue
    reps[category] = stats.hierarchical_bootstrap(units[category], resamples, seed, salt=index)
    points[category] = stats.nested_mean(units[category])
    model_values[category] = np.array([u.mean(axis=(1, 2)) for u in units[category]])

  def over(*cats):
    images = all(with_images[c] for c in cats)
    return 'models, trials, images' if images else 'models, trials'

  estimates = []
  for category in present:
    low, high = stats.percentile_interval(reps[category])
    for q, quantity in enumerate(QUANTITIES):
      estimates.append(Estimate('category', category, '', quantity, float(points[category][q]),
                                float(low[q]), float(high[q]), math.nan,
                                len(units[category]), 0, over(category)))
  changes = {}
  pair = 0
  for i, b in enumerate(present):
    for a in present[i + 1:]:
      pair += 1
      for q in range(len(QUANTITIES)):
        change = _change(a, b, q, reps, points, model_values, over(a, b), seed,
                         salt=1000 + 10 * pair + q)
        estimates.append(change)
        changes[(a, b, QUANTITIES[q])] = change

  verdicts = []
  for statement in STATEMENTS:
    missing = [c for c in (statement.category, statement.against) if c not in units]
    if missing:
      verdicts.append(Verdict(statement, None, None, None, 'not resolved',
                              f'no model of category {", ".join(missing)}'))
      continue
    a, b = statement.category, statement.against
    sign = 1
    if (a, b, 'deep - early') not in changes:  # the pair in the other order
      a, b, sign = b, a, -1
    got = [changes[(a, b, q)] for q in QUANTITIES]
    if sign < 0:
      got = [dataclasses.replace(g, a=g.b, b=g.a, effect=-g.effect, low=-g.high, high=-g.low,
                                 models_a=g.models_b, models_b=g.models_a) for g in got]
    early_change, deep_change, effect = got
    d = statement.direction
    parts = (f'early {verdict(early_change.low, early_change.high, -d)}, '
             f'deep {verdict(deep_change.low, deep_change.high, d)}')
    verdicts.append(Verdict(statement, effect, early_change, deep_change,
                            verdict(effect.low, effect.high, d), '', parts))
  for category in present:
    if len(units[category]) == 1:
      notes.append(f'{category} has one model: its intervals cover the trial'
                   f'{" and image" if with_images[category] else ""} noise of that model, not '
                   'the spread between models')
  return Claims(list(definitions.values()), estimates, verdicts, list(order), notes, resamples,
                seed)


def _pp(value: float, sign: str = '+') -> str:
  return f'{100 * value:{sign}.2f}' if np.isfinite(value) else '-'


def _interval(e: Estimate) -> str:
  return f'[{_pp(e.low)}, {_pp(e.high)}]'


def _p(value: float) -> str:
  return '-' if not np.isfinite(value) else (f'{value:.4f}' if value >= 1e-4 else '<1e-4')


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)]
  line = lambda cells: '| ' + ' | '.join(c.ljust(w) for c, w in zip(cells, widths)) + ' |'
  return [line(header), '|' + '|'.join('-' * (w + 2) for w in widths) + '|'] + [
      line(r) for r in rows]


def statements_table(c: Claims) -> str:
  """The paper's statements: the change in (deep - early) against the baseline with its 95%
  interval, the changes in early and deep, and the verdict."""
  rows = []
  for v in c.verdicts:
    s = v.statement
    if v.effect is None:
      rows.append([s.text, f'{s.category} - {s.against}', '-', '-', '-', '-',
                   f'{v.verdict} ({v.reason})', '-'])
      continue
    rows.append([s.text, f'{s.category} - {s.against}', ('< 0' if s.direction < 0 else '> 0'),
                 f'{_pp(v.effect.effect)} {_interval(v.effect)}',
                 f'{_pp(v.early.effect)} {_interval(v.early)}',
                 f'{_pp(v.deep.effect)} {_interval(v.deep)}', v.verdict, v.parts])
  return '\n'.join(_table(['statement', 'change', 'stated', 'deep - early, pp [95%]',
                           'early, pp [95%]', 'deep, pp [95%]', 'verdict', 'parts'], rows))


def definitions_text(c: Claims) -> list[str]:
  out = []
  for d in c.definitions:
    out.append(f'- stages {", ".join(d.stages)} ({d.models} model{"s" * (d.models != 1)}): '
               f'early = {" + ".join(d.early) or "none"} ({d.early_layers} layers), '
               f'deep = {" + ".join(d.deep) or "none"} ({d.deep_layers} layers)')
  return out


def markdown(c: Claims) -> str:
  """claims.md: the statements, the rule, the definitions, the categories and every change."""
  out = ['# The paper\'s claims, measured', '',
         'Criticality in percentage points (pp); a change is the first category minus the '
         'second. 95% intervals: percentile bootstrap over models and, within a model, over its '
         f'trials (and images where per-image values are kept), {c.resamples} replicates, seed '
         f'{c.seed}. p: two-sided permutation test over models (where both sides have two or '
         'more).', '',
         '## Statements', '', statements_table(c), '', f'Rule: {RULE} The effect is the change '
         'in deep - early criticality against the baseline; "parts" applies the same rule to the '
         'early change (stated against the direction) and the deep change (stated with it).', '',
         '## Early and deep', ''] + definitions_text(c) + [
         '', 'A model\'s early (deep) criticality in a trial: the mean over the layers of the '
         'early (deep) stages. Change them with --early=STAGE,... and --deep=STAGE,....', '']
  levels = [e for e in c.estimates if e.kind == 'category']
  out += ['## Categories', '']
  out += _table(['category', 'models', 'quantity', 'mean, pp', '95% interval', 'over'],
                [[e.a, str(e.models_a), e.quantity, _pp(e.effect, ''),
                  f'[{_pp(e.low, "")}, {_pp(e.high, "")}]', e.over] for e in levels])
  out += ['', '## Changes between categories', '']
  out += _table(['change', 'models', 'quantity', 'effect, pp', '95% interval', 'p', 'excludes 0',
                 'over'],
                [[f'{e.a} - {e.b}', f'{e.models_a} vs {e.models_b}', e.quantity, _pp(e.effect),
                  _interval(e), _p(e.p_value), 'yes' if e.low > 0 or e.high < 0 else 'no',
                  e.over] for e in c.estimates if e.kind == 'change'])
  if c.notes:
    out += ['', '## Notes', ''] + [f'- {n}' for n in c.notes]
  return '\n'.join(out) + '\n'


CSV_COLUMNS = ('kind', 'a', 'b', 'quantity', 'effect', 'low', 'high', 'p_value', 'models_a',
               'models_b', 'over', 'verdict', 'statement')


def write(c: Claims, folder: str) -> tuple[str, str]:
  """Writes claims.md and claims.csv (criticality as fractions, as in results.csv) into
  `folder`; returns their paths."""
  md, table = os.path.join(folder, 'claims.md'), os.path.join(folder, 'claims.csv')
  with open(md, 'w', encoding='utf-8') as f:
    f.write(markdown(c))
  with open(table, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f, lineterminator='\n')
    writer.writerow(CSV_COLUMNS)

    def row(kind, e, verdict_text='', statement=''):
      writer.writerow([kind, e.a, e.b, e.quantity, repr(e.effect), repr(e.low), repr(e.high),
                       '' if math.isnan(e.p_value) else repr(e.p_value), e.models_a,
                       e.models_b if e.kind == 'change' else '', e.over, verdict_text, statement])

    for v in c.verdicts:
      if v.effect is None:
        writer.writerow(['statement', v.statement.category, v.statement.against,
                         'deep - early', '', '', '', '', '', '', '', v.verdict, v.statement.text])
      else:
        row('statement', v.effect, v.verdict, v.statement.text)
    for e in c.estimates:
      row(e.kind, e)
  return md, table
