r"""Tables and figures of layer criticality, from the runner's results.csv or the paper's.

    python -m lc_jax.report OUT1 OUT2 ... [--out DIR] [--top 10]

Each argument is a workdir holding results.csv, or a results CSV itself: the runner's, or the
paper's released raw-results/results.csv (github.com/paulgavrikov/layer_criticality), which holds
many models in one file. Writes DIR/heatmap.png (models x layers, the paper's Figure 1) and
DIR/scatter.png (original top-1 against mean criticality), and prints a table per model.

In a notebook or the runner:

    rows = report.load('OUT')                 # one dict per (trial, layer), file order kept
    summaries = report.summarize(rows)        # one LayerSummary per (model, layer)
    print(report.table(summaries))
    report.plot_criticality(summaries, 'OUT/criticality.png')

Intervals are 95%. Across trials: mean +- t_{0.975, n-1} * sd / sqrt(n) (Student t, sample sd),
none with one trial. Across images: the runner's criticality_ci_images (a normal interval of one
trial's mean over the images), averaged over the trials.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
import warnings
from typing import Any, Iterable, Sequence

import numpy as np

from lc_jax import errors
from lc_jax.errors import UserError

RESULTS_FILE = 'results.csv'
ORIGINAL = 'original'  # the layer value of the unmodified model's row

# The runner's columns (lc_jax.metrics.COLUMNS plus bookkeeping), kept here so that reading a
# CSV does not import JAX.
TEXT_COLUMNS = ('model_id', 'layer', 'mode', 'kind', 'stage')
NUMERIC_COLUMNS = ('num_params', 'num_images', 'top1_acc', 'top5_acc', 'loss', 'pred_cos_sim',
                   'pred_l1_err', 'pred_l2_err', 'pred_kl_div', 'pred_agreement',
                   'recovered_acc', 'criticality', 'criticality_ci_images', 'seconds')
# Other spellings of the same quantities. The paper's 'pred_ce_loss' is deliberately not mapped:
# it is a cross-entropy with raw logits as soft targets (negative, no relation to pred_kl_div).
ALIASES = {'model': 'model_id', 'module': 'layer', 'layer_name': 'layer',
           'cos_sim': 'pred_cos_sim', 'kl_div': 'pred_kl_div', 'agreement': 'pred_agreement'}
# Wrappers around the network whose prefix the paper's layer names carry ('model.conv1').
WRAPPER_PREFIXES = ('model.', 'module.')
STAGE_PATTERN = re.compile(r'^(layer\d+|blocks\.\d+|stages\.\d+|features\.\d+)(\.|$)')

# t_{0.975, dof} for dof 1..30; beyond, a Cornish-Fisher expansion (error < 1e-7).
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
         2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
         2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
         2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054


def t_quantile_975(dof: int) -> float:
  """The 0.975 quantile of Student's t with `dof` degrees of freedom (inf: the normal's)."""
  if dof < 1:
    raise ValueError(f't quantile needs dof >= 1, got {dof}')
  if dof <= len(_T975):
    return _T975[dof - 1]
  z, nu = _Z975, float(dof)
  return (z + (z**3 + z) / (4 * nu) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * nu**2)
          + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * nu**3)
          + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * nu**4))


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------

def resolve(path: str) -> str:
  """The results CSV that `path` names: the file itself, or results.csv in a workdir."""
  if os.path.isdir(path):
    found = os.path.join(path, RESULTS_FILE)
    if not os.path.isfile(found):
      raise UserError(f'{path} has no {RESULTS_FILE}; give a workdir that run.py wrote to, or '
                      'a results CSV')
    return found
  if not os.path.isfile(path):
    raise UserError(f'{path}: no such file or folder')
  return path


def clean_layer_name(name: str) -> str:
  """A torch module name without the wrappers the paper's code put around the network."""
  name = name.strip()
  stripped = True
  while stripped:
    stripped = False
    for prefix in WRAPPER_PREFIXES:
      if name.startswith(prefix) and len(name) > len(prefix):
        name, stripped = name[len(prefix):], True
  return name


def guess_kind(layer: str) -> str:
  """A layer's kind from its name alone, for files without a kind column (the paper's)."""
  last = layer.rsplit('.', 1)[-1]
  if last in ('fc', 'classifier') or layer.endswith('head.fc'):
    return 'linear'
  if last.startswith('bn') or layer.endswith('downsample.1'):
    return 'batchnorm'
  if last == 'conv_dw':
    return 'depthwise_conv'
  return 'conv'


def _guess_stages(layers: Sequence[str]) -> dict[str, str]:
  # By position: what precedes the first stage is the stem, what follows one is the head.
  stages, seen_stage = {}, False
  for layer in layers:
    match = STAGE_PATTERN.match(layer)
    if match:
      stages[layer], seen_stage = match.group(1), True
    else:
      stages[layer] = 'head' if seen_stage else 'stem'
  return stages


def _number(text: str, column: str, where: str) -> float:
  text = text.strip()
  if not text or text.lower() in ('nan', 'none', 'null'):
    return math.nan
  try:
    return float(text)
  except ValueError:
    raise UserError(f'{where}: {column} is {text!r}, not a number') from None


def load(path: str) -> list[dict[str, Any]]:
  """The rows of a results CSV (or of a workdir's results.csv), in file order.

  Each row is a dict with every column of the runner's format: text columns as str ('' when
  the file lacks them; kind and stage are then guessed from the layer name), numeric ones as
  float (NaN when empty or missing), 'trial' as int, and 'source' (the CSV's path). Layer names
  lose a leading 'model.' / 'module.'; criticality is derived as 1 - pred_cos_sim when missing.
  The 'original' row is kept; `summarize` sets it apart.
  """
  csv_path = resolve(path)
  try:
    with open(csv_path, newline='', encoding='utf-8-sig') as f:
      reader = csv.reader(f)
      header = next(reader, None)
      records = [(i, r) for i, r in enumerate(reader, start=2) if any(c.strip() for c in r)]
  except (UnicodeDecodeError, csv.Error) as e:
    raise UserError(f'{csv_path} is not a readable CSV file ({e})') from None
  if not header or not records:
    raise UserError(f'{csv_path} is empty: no results rows')
  columns = [ALIASES.get(c.strip(), c.strip()) for c in header]
  if 'layer' not in columns:
    raise UserError(f'{csv_path} has no layer column (it has {", ".join(columns)}); is it a '
                    'layer-criticality results file?')
  if 'criticality' not in columns and 'pred_cos_sim' not in columns:
    raise UserError(f'{csv_path} has neither a criticality nor a pred_cos_sim column (it has '
                    f'{", ".join(columns)}); is it a layer-criticality results file?')

  default_model = os.path.basename(os.path.dirname(os.path.abspath(csv_path))) or 'model'
  rows = []
  for line, record in records:
    raw = dict(zip(columns, record))
    where = f'{csv_path}, line {line}'
    row: dict[str, Any] = {c: raw.get(c, '').strip() for c in TEXT_COLUMNS}
    row['layer'] = clean_layer_name(row['layer'])
    if not row['layer']:
      raise UserError(f'{where}: the layer is empty')
    row['model_id'] = row['model_id'] or default_model
    for column in NUMERIC_COLUMNS:
      row[column] = _number(raw.get(column, ''), column, where)
    if math.isnan(row['criticality']):
      row['criticality'] = 1 - row['pred_cos_sim']
    trial = _number(raw.get('trial', ''), 'trial', where)
    row['trial'] = 0 if math.isnan(trial) else int(trial)  # the paper writes 0.0
    row['source'] = csv_path
    rows.append(row)

  # Guessed per model, so that each model's own first stage marks the end of its stem.
  layers_of: dict[str, list[str]] = {}
  for row in rows:
    if row['layer'] != ORIGINAL:
      layers_of.setdefault(row['model_id'], []).append(row['layer'])
  guessed = {m: _guess_stages(list(dict.fromkeys(ls))) for m, ls in layers_of.items()}
  for row in rows:
    if row['layer'] != ORIGINAL:
      row['kind'] = row['kind'] or guess_kind(row['layer'])
      row['stage'] = row['stage'] or guessed[row['model_id']][row['layer']]
  return rows


# ------------------------------------------------------------------------------------------------
# Summaries
# ------------------------------------------------------------------------------------------------

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


def _mean(values: Iterable[float]) -> float:
  values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
  return float(values.mean()) if values.size else math.nan


def interval(values: Sequence[float]) -> tuple[float, float]:
  """(mean, half-width of the 95% Student t interval) of the finite `values`.

  The half-width is t_{0.975, n-1} * sd / sqrt(n) with the sample sd (ddof 1); NaN for n < 2.
  """
  values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
  if values.size == 0:
    return math.nan, math.nan
  if values.size == 1:
    return float(values[0]), math.nan
  sd = float(values.std(ddof=1))
  return float(values.mean()), t_quantile_975(values.size - 1) * sd / math.sqrt(values.size)


def _original_top1(rows: Sequence[dict[str, Any]]) -> float:
  for row in rows:
    if row['layer'] == ORIGINAL and np.isfinite(row['top1_acc']):
      return row['top1_acc']
  # The paper's file drops the original's row but keeps recovered_acc = top1 / original top1.
  ratios = [r['top1_acc'] / r['recovered_acc'] for r in rows
            if r['layer'] != ORIGINAL and np.isfinite(r['top1_acc'])
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
    if row['layer'] == ORIGINAL:
      originals.setdefault((row['source'], row['model_id']), []).append(row)
    else:
      groups.setdefault((row['source'], row['model_id'], row['mode']), []).append(row)
  labels = _labels(list(groups))
  summaries = []
  for key, model_rows in groups.items():
    original_top1 = _original_top1(originals.get(key[:2], []) + model_rows)
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
          ci_images=_mean(r['criticality_ci_images'] for r in trial_rows),
          top1_acc=_mean(r['top1_acc'] for r in trial_rows),
          recovered_acc=_mean(r['recovered_acc'] for r in trial_rows),
          pred_kl_div=_mean(r['pred_kl_div'] for r in trial_rows),
          pred_agreement=_mean(r['pred_agreement'] for r in trial_rows),
          original_top1=original_top1, source=key[0]))
  return summaries


def by_model(summaries: Sequence[LayerSummary]) -> dict[str, list[LayerSummary]]:
  """The summaries grouped by model label, in order of first appearance."""
  grouped: dict[str, list[LayerSummary]] = {}
  for s in summaries:
    grouped.setdefault(s.model, []).append(s)
  return grouped


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------

def _pct(value: float, width: int, digits: int = 1, sign: str = '') -> str:
  if not np.isfinite(value):
    return f'{"-":>{width}s}'
  return f'{sign}{100 * value:.{digits}f}'.rjust(width)


def _layer_lines(layers: Sequence[LayerSummary], name_width: int) -> list[str]:
  lines = [f'  {"layer":{name_width}s} {"kind":14s} {"stage":8s} {"crit %":>7s} {"±trials":>8s} '
           f'{"±images":>8s} {"recov %":>8s} {"agree %":>8s}']
  for s in layers:
    lines.append(f'  {s.layer:{name_width}s} {s.kind:14s} {s.stage:8s} '
                 f'{_pct(s.criticality, 7)} {_pct(s.ci_trials, 8, sign="±")} '
                 f'{_pct(s.ci_images, 8, 2, sign="±")} {_pct(s.recovered_acc, 8)} '
                 f'{_pct(s.pred_agreement, 8)}')
  return lines


def _trials_note(layers: Sequence[LayerSummary]) -> str | None:
  both = [s for s in layers if np.isfinite(s.ci_trials) and np.isfinite(s.ci_images)]
  wider = sum(s.ci_trials > s.ci_images for s in both)
  if both and wider > len(both) / 2:
    trials = max(s.trials for s in layers)
    return (f'note: the interval over trials is wider than the one over images for {wider} of '
            f'{len(both)} layers: the draw of the fresh weights dominates, and {trials} trials '
            'may not be enough (raise --config.trials).')
  return None


def table(summaries: Sequence[LayerSummary], top: int = 10) -> str:
  """The `top` most and least critical layers of each model, as printable text.

  Columns: criticality (%), its 95% intervals over trials and over images, recovered top-1
  (% of the original's) and top-1 agreement with the original (%).
  """
  out = []
  for model, layers in by_model(summaries).items():
    trials = max(s.trials for s in layers)
    mode = f'{layers[0].mode}, ' if layers[0].mode else ''
    top1 = layers[0].original_top1
    labelled = f'original top-1 {top1:.2f}%' if np.isfinite(top1) else 'no labels'
    out.append(f'{model}: {mode}{len(layers)} layers, {trials} trial{"s" * (trials != 1)}, '
               f'{labelled}; mean criticality {_pct(_mean(s.criticality for s in layers), 0)}%')
    ranked = sorted((s for s in layers if np.isfinite(s.criticality)),
                    key=lambda s: -s.criticality)
    shown = ranked if len(ranked) <= 2 * top else ranked[:top] + ranked[-top:]
    width = max([12] + [len(s.layer) for s in shown])
    if len(ranked) <= 2 * top:
      out.append(f' all {len(ranked)} layers, most critical first:')
      out += _layer_lines(ranked, width)
    else:
      out.append(f' most critical {top}:')
      out += _layer_lines(ranked[:top], width)
      out.append(f' least critical {top}:')
      out += _layer_lines(ranked[-top:], width)
    interval_text = (f'Student t over {trials} trials' if trials >= 2 else
                     'none with one trial')
    out.append(f' 95% intervals: ±trials {interval_text}; ±images over the images, '
               'mean over trials.')
    note = _trials_note(layers)
    if note:
      out.append(' ' + note)
    out.append('')
  return '\n'.join(out).rstrip('\n')


def model_table(summaries: Sequence[LayerSummary]) -> str:
  """One line per model: layers, trials, mean criticality over layers (%), original top-1."""
  grouped = by_model(summaries)
  width = max(5, *(len(m) for m in grouped))
  lines = [f'{"model":{width}s} {"layers":>6s} {"trials":>6s} {"mean crit %":>11s} '
           f'{"top-1 %":>8s}']
  for model, layers in grouped.items():
    top1 = layers[0].original_top1
    lines.append(f'{model:{width}s} {len(layers):6d} {max(s.trials for s in layers):6d} '
                 f'{_pct(_mean(s.criticality for s in layers), 11)} '
                 f'{f"{top1:.2f}" if np.isfinite(top1) else "-":>8s}')
  return '\n'.join(lines)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
  """Spearman's rank correlation (ties get their average rank)."""
  def ranks(values):
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind='stable')
    result = np.empty(len(values))
    result[order] = np.arange(len(values), dtype=np.float64)
    for value in np.unique(values):
      tied = values == value
      result[tied] = result[tied].mean()
    return result
  rx, ry = ranks(x), ranks(y)
  if rx.std() == 0 or ry.std() == 0:
    return math.nan
  return float(np.corrcoef(rx, ry)[0, 1])


# ------------------------------------------------------------------------------------------------
# Figures
# ------------------------------------------------------------------------------------------------

KIND_COLORS = {'conv': '#4C72B0', 'depthwise_conv': '#55A868', 'linear': '#C44E52',
               'batchnorm': '#8172B2'}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only: no display on clusters, and no GUI backend probing
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _stage_spans(stages: Sequence[str]) -> list[tuple[str, int, int]]:
  """(stage, first index, end index) of each run of equal stages."""
  spans = []
  for i, stage in enumerate(stages):
    if spans and spans[-1][0] == stage:
      spans[-1] = (stage, spans[-1][1], i + 1)
    else:
      spans.append((stage, i, i + 1))
  return spans


def _short_name(layer: str, stage: str) -> str:
  # The stage band already names it: 'layer1.0.conv1' under 'layer1' reads '0.conv1'.
  if stage and layer.startswith(stage + '.'):
    return layer[len(stage) + 1:]
  return layer


def _save(fig, path: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=150, bbox_inches='tight')


def plot_criticality(summaries: Sequence[LayerSummary], path: str) -> None:
  """A bar per layer (forward order) of one model: criticality (%) with its 95% interval over
  trials (over images when there is only one trial), on bands that name the stages."""
  grouped = by_model(summaries)
  if len(grouped) != 1:
    raise ValueError(f'plot_criticality draws one model, got {len(grouped)}: {list(grouped)}')
  (model, layers), = grouped.items()
  plt = _pyplot()
  n = len(layers)
  trials = max(s.trials for s in layers)
  values = np.array([100 * s.criticality for s in layers])
  errors_of = 'ci_trials' if trials >= 2 else 'ci_images'
  bars = np.array([100 * getattr(s, errors_of) for s in layers])
  bars = np.where(np.isfinite(bars), bars, 0.0)

  # Criticality lies in [0, 100] %; an interval past a bound is drawn to the bound.
  low = np.clip(values - bars, 0, 100)
  high = np.clip(values + bars, 0, 100)

  width = max(8.0, 0.13 * n + 2.5)
  fig, ax = plt.subplots(figsize=(width, 4.8))
  bar_inches = width * fig.subplotpars.right - width * fig.subplotpars.left
  bar_inches /= max(n, 1)
  for i, (stage, start, end) in enumerate(_stage_spans([s.stage for s in layers])):
    if i % 2:
      ax.axvspan(start - 0.5, end - 0.5, color='0.92', zorder=0, lw=0)
    wide = (end - start) * bar_inches > 0.07 * len(stage) + 0.05  # room to write it flat
    ax.text((start + end - 1) / 2, 1.01, stage, transform=ax.get_xaxis_transform(),
            ha='center', va='bottom', fontsize=8 if wide else 6, rotation=0 if wide else 90)
  x = np.arange(n)
  ax.bar(x, values, width=0.75, color=[KIND_COLORS.get(s.kind, '0.5') for s in layers],
         zorder=2)
  if np.any(high > low):
    ax.errorbar(x, values, yerr=[values - low, high - values], fmt='none', ecolor='black',
                elinewidth=0.7, capsize=1.5, zorder=3)
  ax.set_xlim(-0.5, n - 0.5)
  ax.set_ylim(0, 102)
  ax.set_xticks(x)
  ax.set_xticklabels([_short_name(s.layer, s.stage) for s in layers], rotation=90,
                     fontsize=6 if n <= 70 else 5)
  ax.tick_params(axis='x', length=2, pad=1)
  ax.set_ylabel('criticality (1 - cos sim), %')
  ax.grid(axis='y', color='0.8', lw=0.5, zorder=1)
  kinds = list(dict.fromkeys(s.kind for s in layers))
  handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS.get(k, '0.5')) for k in kinds]
  interval_text = (f'95% interval\nover {trials} trials\n(Student t)' if trials >= 2 else
                   '95% interval\nover images\n(one trial)')
  ax.legend(handles, kinds, fontsize=7, loc='upper left', bbox_to_anchor=(1.005, 1.0),
            title=f'error bars:\n{interval_text}', title_fontsize=7, frameon=False)
  mode = f', {layers[0].mode} reset' if layers[0].mode else ''
  _title_above(fig, ax, f'{model}: layer criticality{mode}, {trials} trial'
               f'{"s" * (trials != 1)}', fontsize=11)
  _save(fig, path)
  plt.close(fig)


def _title_above(fig, ax, text: str, fontsize: float) -> None:
  # Above everything drawn over the axes (stage names, top tick labels), whose height depends
  # on the names: measure them first.
  fig.draw_without_rendering()  # places the tick labels
  top = ax.get_tightbbox(fig.canvas.get_renderer()).y1 + 6 * fig.dpi / 72  # 6 points clear
  y = fig.transFigure.inverted().transform((0, top))[1]
  fig.suptitle(text, fontsize=fontsize, y=y, va='bottom')


def layer_union(orders: Sequence[Sequence[str]]) -> list[str]:
  """The layers of several models in one forward order: the first model's order, and a layer
  that a later model adds goes just before the next of that model's layers already placed (so
  BatchNorm layers interleave with the convs of a model without them), or at the end when none
  follows (a different architecture: first-seen order)."""
  union: list[str] = []
  for order in orders:
    placed = set(union)
    for i, layer in enumerate(order):
      if layer in placed:
        continue
      anchor = next((later for later in order[i + 1:] if later in placed), None)
      union.insert(union.index(anchor) if anchor is not None else len(union), layer)
      placed.add(layer)
  return union


def _matrix(summaries: Sequence[LayerSummary]) -> tuple[list[str], list[str], list[str],
                                                         np.ndarray]:
  """(models, the union of their layers in forward order, their stages, criticality % matrix)."""
  grouped = by_model(summaries)
  stage_of = {}
  for model_layers in grouped.values():
    for s in model_layers:
      stage_of.setdefault(s.layer, s.stage)
  layers = layer_union([[s.layer for s in ls] for ls in grouped.values()])
  column = {layer: j for j, layer in enumerate(layers)}
  matrix = np.full((len(grouped), len(layers)), np.nan)
  for i, model_layers in enumerate(grouped.values()):
    for s in model_layers:
      matrix[i, column[s.layer]] = 100 * s.criticality
  return list(grouped), layers, [stage_of[l] for l in layers], matrix


def plot_heatmap(summaries: Sequence[LayerSummary], path: str) -> None:
  """The paper's Figure 1: models (rows) by layers (columns, forward order), cell = mean
  criticality in %, with each model's mean over layers and each layer's mean over models."""
  plt = _pyplot()
  models, layers, stages, matrix = _matrix(summaries)
  rows, cols = matrix.shape
  with warnings.catch_warnings():  # an all-NaN row or column has a NaN mean, drawn blank
    warnings.simplefilter('ignore', RuntimeWarning)
    row_mean = np.nanmean(matrix, axis=1)
    col_mean = np.nanmean(matrix, axis=0)
  # Grey: a layer this model does not have.
  cmap = plt.get_cmap('viridis_r').with_extremes(bad='0.85')
  style = dict(cmap=cmap, vmin=0, vmax=100, aspect='auto', interpolation='nearest')

  # Laid out in inches, so that cells, gaps and labels keep their size whatever the number of
  # models and layers; savefig's tight box then crops to what was drawn.
  cell_w = 0.17 if cols <= 120 else max(0.06, 20 / cols)
  cell_h = 0.28
  label_size = 6 if cols <= 120 else 4
  main_w, main_h = cols * cell_w, rows * cell_h
  gap, mean_w, bar_w, stage_gap = 0.08, 0.32, 0.15, 0.3
  width = main_w + gap + mean_w + 2 * gap + bar_w + 1.0
  height = main_h + stage_gap + cell_h + 0.4
  fig = plt.figure(figsize=(width, height))

  def axes(left, bottom, w, h):  # inches from the lower left corner
    return fig.add_axes((left / width, bottom / height, w / width, h / height))

  bottom_y = 0.2
  main_y = bottom_y + cell_h + stage_gap
  ax = axes(0, main_y, main_w, main_h)
  image = ax.imshow(np.ma.masked_invalid(matrix), **style)
  ax.set_yticks(range(rows))
  ax.set_yticklabels(models, fontsize=8)
  ax.set_xticks(range(cols))
  ax.set_xticklabels([_short_name(l, s) for l, s in zip(layers, stages)], rotation=90,
                     fontsize=label_size)
  ax.xaxis.tick_top()
  ax.tick_params(axis='x', length=2, pad=1)
  for stage, start, end in _stage_spans(stages):
    if start:
      ax.axvline(start - 0.5, color='white', lw=1.5)
    ax.annotate(stage, ((start + end - 1) / 2, 0), xycoords=ax.get_xaxis_transform(),
                xytext=(0, -3), textcoords='offset points', ha='center', va='top',
                fontsize=7 if end - start > 2 else 5)
  if rows * cols <= 400:  # few enough cells to read numbers in
    for i in range(rows):
      for j in range(cols):
        if np.isfinite(matrix[i, j]):
          ax.text(j, i, f'{matrix[i, j]:.0f}', ha='center', va='center', fontsize=5,
                  color='white' if matrix[i, j] > 50 else 'black')

  side = axes(main_w + gap, main_y, mean_w, main_h)
  side.imshow(np.ma.masked_invalid(row_mean[:, None]), **style)
  side.set_xticks([0])
  side.set_xticklabels(['mean'], fontsize=7)
  side.xaxis.tick_top()
  side.set_yticks([])
  for i, value in enumerate(row_mean):
    if np.isfinite(value):
      side.text(0, i, f'{value:.0f}', ha='center', va='center', fontsize=7,
                color='white' if value > 50 else 'black')

  bottom = axes(0, bottom_y, main_w, cell_h)
  bottom.imshow(np.ma.masked_invalid(col_mean[None, :]), **style)
  bottom.set_yticks([0])
  bottom.set_yticklabels(['mean over models'], fontsize=7)
  bottom.set_xticks([])
  if cols <= 120:
    for j, value in enumerate(col_mean):
      if np.isfinite(value):
        bottom.text(j, 0, f'{value:.0f}', ha='center', va='center', fontsize=5,
                    color='white' if value > 50 else 'black')

  # Beside the heatmap and the mean row, so that it stays legible with only a model or two.
  bar_h = main_y + main_h - bottom_y
  colorbar = fig.colorbar(image, cax=axes(main_w + 3 * gap + mean_w, bottom_y, bar_w, bar_h))
  colorbar.set_label('criticality (1 - cos sim), %' if bar_h > 1.8 else 'criticality, %',
                     fontsize=8)
  colorbar.ax.tick_params(labelsize=7)
  _title_above(fig, ax, f'layer criticality of {rows} model{"s" * (rows != 1)}, mean over '
               'trials', fontsize=10)
  _save(fig, path)
  plt.close(fig)


def model_points(summaries: Sequence[LayerSummary]) -> list[tuple[str, float, float]]:
  """(model, mean criticality over its layers in %, original top-1 in %) of every model."""
  return [(model, 100 * _mean(s.criticality for s in layers), layers[0].original_top1)
          for model, layers in by_model(summaries).items()]


def plot_scatter(summaries: Sequence[LayerSummary], path: str) -> list[str]:
  """Original top-1 against mean criticality over layers, a labelled point per model (the
  paper's Figure 2). Returns the models left out for lack of labels; writes nothing when no
  model has labels."""
  points = model_points(summaries)
  labelled = [p for p in points if np.isfinite(p[1]) and np.isfinite(p[2])]
  skipped = [p[0] for p in points if p not in labelled]
  if not labelled:
    return skipped
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  x = np.array([p[1] for p in labelled])
  y = np.array([p[2] for p in labelled])
  ax.scatter(x, y, s=22, color='#4C72B0', zorder=2)
  for (model, px, py) in labelled:
    ax.annotate(model, (px, py), xytext=(3, 3), textcoords='offset points', fontsize=6)
  ax.set_xlabel('mean layer criticality over layers, %')
  ax.set_ylabel('top-1 accuracy of the original model, %')
  title = 'accuracy vs. mean criticality'
  if len(labelled) >= 3:
    title += f' (Spearman rho {spearman(x, y):.2f}, {len(labelled)} models)'
  ax.set_title(title, fontsize=10)
  ax.grid(color='0.85', lw=0.5, zorder=0)
  ax.margins(0.15)
  _save(fig, path)
  plt.close(fig)
  return skipped


def write_workdir_report(workdir: str, top: int = 10) -> str:
  """Writes WORKDIR/criticality.png for the run in `workdir` and returns its table as text."""
  csv_path = resolve(workdir)
  summaries = summarize(load(csv_path))
  if not summaries:
    raise UserError(f'{csv_path} has no reset layer yet, only the original model')
  grouped = by_model(summaries)
  for model, layers in grouped.items():
    name = ('criticality.png' if len(grouped) == 1 else
            f"criticality_{re.sub(r'[^A-Za-z0-9_.-]+', '_', model)}.png")
    plot_criticality(layers, os.path.join(os.path.dirname(csv_path), name))
  return table(summaries, top)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------

@errors.exits_cleanly
def main(argv: Sequence[str]) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  paths = argv[1:]
  if not paths:
    raise UserError('give at least one workdir or results CSV: '
                    'python -m lc_jax.report OUT1 OUT2 ... [--out DIR]')
  out, top = flags.FLAGS.out, flags.FLAGS.top
  rows = []
  for path in paths:
    rows += load(path)
  summaries = summarize(rows)
  if not summaries:
    raise UserError(f'no reset layer in {", ".join(paths)}: only original-model rows')

  if top > 0:
    print(table(summaries, top), end='\n\n')
  print(model_table(summaries))
  heatmap = os.path.join(out, 'heatmap.png')
  plot_heatmap(summaries, heatmap)
  print(f'\nwrote {heatmap}')
  scatter = os.path.join(out, 'scatter.png')
  skipped = plot_scatter(summaries, scatter)
  if len(skipped) == len(by_model(summaries)):
    print('no scatter plot: no model has labelled images (original top-1 unknown)')
  else:
    print(f'wrote {scatter}')
    if skipped:
      print(f'  left out for lack of labels: {", ".join(skipped)}')


def _run() -> None:
  # Flags are defined only when run as a program: the runner imports this module as a library
  # and may define flags of the same names.
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('out', '.', 'Folder for heatmap.png and scatter.png.')
  flags.DEFINE_integer('top', 10, 'Most and least critical layers listed per model; 0: none.')
  app.run(main)


if __name__ == '__main__':
  _run()
