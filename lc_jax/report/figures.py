"""Matplotlib figures of LayerSummary lists: one model's criticality per layer, the paper's
models-by-layers heatmap (Figure 1) and its accuracy-vs-criticality scatter (Figure 2), a
model's criticality per image set, and the study's figures together (`plot_study`)."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from typing import Mapping, Sequence

import numpy as np

from lc_jax.report.categories import OTHER
from lc_jax.report.stats import LayerSummary, UNKNOWN_SET, by_model, finite_mean, image_sets
from lc_jax.report.stats import model_interval, spearman

KIND_COLORS = {'conv': '#4C72B0', 'depthwise_conv': '#55A868', 'linear': '#C44E52',
               'batchnorm': '#8172B2'}
DPI = 150  # of the saved PNGs
LABEL_PT = 8  # tick labels, stage names and legends: legible at the saved size
ROW_INCHES = 0.16  # a layer's bar, or a heatmap's column: room for an 8 pt name across it
VERTICAL_FROM = 60  # a criticality chart of more layers than this gets a row per layer


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


def _shade_stages(ax, stages: Sequence[str]) -> None:
  """Every other stage's columns shaded, and each stage named above its columns."""
  for i, (stage, start, end) in enumerate(_stage_spans(stages)):
    if i % 2:
      ax.axvspan(start - 0.5, end - 0.5, color='0.93', lw=0, zorder=0)
    ax.text((start + end - 1) / 2, 1.01, stage, transform=ax.get_xaxis_transform(), ha='center',
            va='bottom', fontsize=LABEL_PT)


def _layer_axes(ax, layers: Sequence[str], stages: Sequence[str]) -> None:
  """An axes of criticality (%) per layer: stages shaded and named, the layers' names below in
  forward order, y from 0 to 100 % (a band wider than that is cut at its ends)."""
  _shade_stages(ax, stages)
  ax.set_xlim(-0.5, len(layers) - 0.5)
  ax.set_ylim(0, 102)
  ax.set_xticks(range(len(layers)))
  ax.set_xticklabels(layers, rotation=90, fontsize=LABEL_PT)
  ax.set_ylabel('criticality, %', fontsize=9)
  ax.tick_params(axis='y', labelsize=LABEL_PT)
  ax.grid(axis='y', color='0.85', lw=0.5)


def file_part(name: str) -> str:
  """`name` (a model label, an image set such as 'imagenet2012_corrupted/fog_3') as part of a
  file name: every run of characters other than letters, digits, '_', '.' and '-' becomes
  '_'."""
  return re.sub(r'[^A-Za-z0-9_.-]+', '_', name)


def _save(fig, path: str) -> None:
  """Writes `fig` to `path` (its folder made if needed) and closes it."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  try:
    fig.savefig(path, dpi=DPI, bbox_inches='tight')
  finally:
    _pyplot().close(fig)


def _plural(count: float, word: str) -> str:
  return f'{count:.0f} {word}{"s" * (count != 1)}'


def _common(values) -> str | None:
  """The one value all of `values` share, as text; None when they differ or there is none."""
  values = {v for v in values if not (isinstance(v, float) and not np.isfinite(v))}
  return str(values.pop()) if len(values) == 1 else None


def _count(counts, word: str) -> str:
  """'3 trials', or '2-3 trials' where the counts differ."""
  low, high = min(counts), max(counts)
  return _plural(high, word) if low == high else f'{low:.0f}-{high:.0f} {word}s'


def _protocol(layers: Sequence[LayerSummary]) -> list[str]:
  """What the layers were measured under, where they agree: 'fresh reset', '7 images of
  imagenet_r' (the image set where results.csv names it), '3 trials' (the most of a model's
  layers; '2-3 trials' where the models differ)."""
  parts = []
  mode = _common(s.mode for s in layers)
  if mode:
    parts.append(f'{mode} reset')
  images = _common(s.num_images for s in layers)
  image_set = _common(s.dataset for s in layers)
  if images is not None:
    parts.append(_plural(float(images), 'image') + (f' of {image_set}' if image_set else ''))
  elif image_set:
    parts.append(image_set)
  trials = {}
  for s in layers:
    trials[s.model] = max(trials.get(s.model, 0), s.trials)
  parts.append(_count(trials.values(), 'trial'))
  return parts


def _intervals(layers: Sequence[LayerSummary]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                         str]:
  """(criticality %, lower and upper end of its 95% interval in % clipped to [0, 100], what the
  interval is over): over trials, or over images with one trial."""
  trials = max(s.trials for s in layers)
  values = np.array([100 * s.criticality for s in layers])
  errors_of = 'ci_trials' if trials >= 2 else 'ci_images'
  half = np.array([100 * getattr(s, errors_of) for s in layers])
  half = np.where(np.isfinite(half), half, 0.0)
  over = f'over {trials} trials (Student t)' if trials >= 2 else 'over images (one trial)'
  return values, values - half, values + half, over


def criticality_figure(summaries: Sequence[LayerSummary]):
  """The figure of `plot_criticality`, not saved: a matplotlib Figure (its first axes the bars)."""
  grouped = by_model(summaries)
  if len(grouped) != 1:
    raise ValueError(f'plot_criticality draws one model, got {len(grouped)}: {list(grouped)}')
  (model, layers), = grouped.items()
  plt = _pyplot()
  n = len(layers)
  vertical = n > VERTICAL_FROM
  values, low, high, over = _intervals(layers)
  clipped_high, clipped_low = high > 100, low < 0
  low, high = np.clip(low, 0, 100), np.clip(high, 0, 100)

  if vertical:  # a row per layer, top to bottom: names stay flat and 8 pt at any depth
    fig, ax = plt.subplots(figsize=(8.0, ROW_INCHES * n + 1.6))
  else:
    fig, ax = plt.subplots(figsize=(max(8.0, ROW_INCHES * n + 3.0), 4.8))
  along = ax.get_yaxis_transform() if vertical else ax.get_xaxis_transform()
  span = ax.axhspan if vertical else ax.axvspan
  inches = (fig.get_figheight() * (fig.subplotpars.top - fig.subplotpars.bottom) if vertical else
            fig.get_figwidth() * (fig.subplotpars.right - fig.subplotpars.left)) / max(n, 1)
  for i, (stage, start, end) in enumerate(_stage_spans([s.stage for s in layers])):
    if i % 2:
      span(start - 0.5, end - 0.5, color='0.92', zorder=0, lw=0)
    if vertical:  # to the right of its rows
      ax.text(1.01, (start + end - 1) / 2, stage, transform=along, ha='left', va='center',
              fontsize=LABEL_PT)
    else:  # above its bars, flat where it fits
      flat = (end - start) * inches > 0.065 * len(stage) + 0.05
      ax.text((start + end - 1) / 2, 1.01, stage, transform=along, ha='center', va='bottom',
              fontsize=LABEL_PT, rotation=0 if flat else 90)
  position = np.arange(n)
  colors = [KIND_COLORS.get(s.kind, '0.5') for s in layers]
  names = [s.layer for s in layers]
  error = [values - low, high - values]
  bar_style = dict(color=colors, zorder=2)
  line_style = dict(fmt='none', ecolor='black', elinewidth=0.7, capsize=1.5, zorder=3)
  mark_style = dict(linestyle='none', color='black', markersize=4, zorder=4, clip_on=False)
  if vertical:
    ax.barh(position, values, height=0.75, **bar_style)
    if np.any(high > low):
      ax.errorbar(values, position, xerr=error, **line_style)
    ax.plot(np.full(clipped_high.sum(), 100.0), position[clipped_high], marker='>', **mark_style)
    ax.plot(np.zeros(clipped_low.sum()), position[clipped_low], marker='<', **mark_style)
    ax.set_ylim(n - 0.5, -0.5)  # forward order from the top
    ax.set_xlim(0, 102)
    ax.set_yticks(position)
    ax.set_yticklabels(names, fontsize=LABEL_PT)
    ax.tick_params(axis='y', length=2, pad=1)
    ax.tick_params(axis='x', labelsize=LABEL_PT, top=True, labeltop=True)
    ax.set_xlabel('criticality (1 - cos sim), %', fontsize=9)
    ax.grid(axis='x', color='0.8', lw=0.5, zorder=1)
  else:
    ax.bar(position, values, width=0.75, **bar_style)
    if np.any(high > low):
      ax.errorbar(position, values, yerr=error, **line_style)
    ax.plot(position[clipped_high], np.full(clipped_high.sum(), 100.0), marker='^', **mark_style)
    ax.plot(position[clipped_low], np.zeros(clipped_low.sum()), marker='v', **mark_style)
    ax.set_xlim(-0.5, n - 0.5)
    ax.set_ylim(0, 102)
    ax.set_xticks(position)
    ax.set_xticklabels(names, rotation=90, fontsize=LABEL_PT)
    ax.tick_params(axis='x', length=2, pad=1)
    ax.tick_params(axis='y', labelsize=LABEL_PT)
    ax.set_ylabel('criticality (1 - cos sim), %', fontsize=9)
    ax.grid(axis='y', color='0.8', lw=0.5, zorder=1)

  kinds = list(dict.fromkeys(s.kind for s in layers))
  handles = [plt.Rectangle((0, 0), 1, 1, color=KIND_COLORS.get(k, '0.5')) for k in kinds]
  labels = list(kinds)
  if clipped_high.any() or clipped_low.any():
    handles.append(plt.Line2D([], [], marker='>' if vertical else '^', **{
        k: v for k, v in mark_style.items() if k not in ('zorder', 'clip_on')}))
    labels.append('interval clipped\nat 0 or 100 %')
  legend = dict(fontsize=LABEL_PT, title_fontsize=LABEL_PT, frameon=False)
  if vertical:  # above the bars, clear of the top tick labels: the stage names take the right
    ax.legend(handles, [l.replace('\n', ' ') for l in labels], loc='lower left',
              bbox_to_anchor=(0, 1.0 + 0.3 / fig.get_figheight()), ncol=len(handles),
              title=f'error bars: 95% interval {over}', alignment='left', **legend)
  else:
    interval_text = f'95% interval\n{over.replace(" (", chr(10) + "(")}'
    ax.legend(handles, labels, loc='upper left', bbox_to_anchor=(1.005, 1.0),
              title=f'error bars:\n{interval_text}', **legend)
  mean = finite_mean(s.criticality for s in layers)
  _title_above(fig, ax, f'{model}: layer criticality, {", ".join(_protocol(layers))}\n'
               f'mean criticality over {_plural(n, "layer")}: {100 * mean:.1f}%',
               fontsize=11)
  return fig


def plot_criticality(summaries: Sequence[LayerSummary], path: str) -> None:
  """A bar per layer (forward order) of one model: criticality (%) with its 95% interval over
  trials (over images when there is only one trial), on bands that name the stages. Up to
  VERTICAL_FROM layers the bars stand side by side; a deeper model gets a row per layer, top to
  bottom. An interval clipped at 0 or 100 % ends in a triangle; the title gives the model, the
  reset mode, the images, the trials and the mean criticality."""
  _save(criticality_figure(summaries), path)


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


def _compatible(a: Sequence[LayerSummary], b: Sequence[LayerSummary]) -> bool:
  """Whether two models are one architecture, to share a heatmap's columns: at least half of
  the smaller one's layers are named in both, and each layer named in both is of one kind and,
  where both know it, one size (resnet18's and resnet50's layer1.0.conv1 differ)."""
  of_a = {s.layer: s for s in a}
  shared = [(of_a[s.layer], s) for s in b if s.layer in of_a]
  if 2 * len(shared) < min(len(a), len(b)):
    return False
  return all(x.kind == y.kind and (not (np.isfinite(x.num_params) and np.isfinite(y.num_params))
                                   or x.num_params == y.num_params) for x, y in shared)


def architecture_groups(summaries: Sequence[LayerSummary]) -> list[list[str]]:
  """The models of `summaries` in groups of one architecture (`_compatible` with every model of
  the group), groups and models in order of first appearance: a heatmap panel each."""
  grouped = by_model(summaries)
  groups: list[list[str]] = []
  for model, layers in grouped.items():
    home = next((g for g in groups if all(_compatible(grouped[m], layers) for m in g)), None)
    if home is None:
      groups.append([model])
    else:
      home.append(model)
  return groups


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


def _cell_text(ax, values: np.ndarray, fontsize: float) -> None:
  for (i, j), value in np.ndenumerate(values):
    if np.isfinite(value):
      ax.text(j, i, f'{value:.0f}', ha='center', va='center', fontsize=fontsize,
              color='white' if value > 50 else 'black')


def _bands(models: Sequence[str], matrix: np.ndarray, category_of: Mapping[str, str],
           order: Sequence[str]) -> tuple[list[str], np.ndarray, list[tuple[str, int, int]]]:
  """Rows grouped by category: (row labels, rows, (category, first row, end row) per band).

  Bands follow `order`; within a band the models are sorted by mean criticality over their
  layers, most critical first (ties by name); under every band a row 'mean of CATEGORY (n)'
  holds the mean of each layer over the band's models that have it (the model itself in a band
  of one, so that every band reads the same way, as in the paper's Figure 1); n is the band's
  models, '1-2' where some lack a layer.
  """
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    model_mean = np.nanmean(matrix, axis=1)
  index = {m: i for i, m in enumerate(models)}
  labels, rows, bands = [], [], []
  for category in order:
    members = [m for m in models if category_of.get(m, OTHER) == category]
    if not members:
      continue
    members.sort(key=lambda m: (-np.nan_to_num(model_mean[index[m]], nan=-1.0), m))
    start = len(rows)
    for m in members:
      labels.append(m)
      rows.append(matrix[index[m]])
    chosen = matrix[[index[m] for m in members]]
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', RuntimeWarning)
      rows.append(np.nanmean(chosen, axis=0))
    labels.append(f'mean of {category} ({_models_per_layer(chosen, bare=True)})')
    bands.append((category, start, len(rows)))
  return labels, np.array(rows), bands


def _models_per_layer(matrix: np.ndarray, bare: bool = False) -> str:
  """How many models (rows of `matrix`) a mean row's cells are over: '3 models', or '1-3
  models' where some lack a layer (a layer no model has is left out); `bare`: the count alone."""
  counts = np.sum(np.isfinite(matrix), axis=0)
  counts = counts[counts > 0].tolist() or [len(matrix)]
  text = _count(counts, 'model')
  return text.split(' ')[0] if bare else text


def heatmap_figure(summaries: Sequence[LayerSummary],
                   category_of: Mapping[str, str] | None = None,
                   order: Sequence[str] = ()):
  """The figure of `plot_heatmap`, not saved: a matplotlib Figure whose axes labelled 'panel'
  are the panels' heatmaps, top to bottom. `category_of` (model label -> category) and `order`
  (the categories' band order) group the rows into bands (`_bands`) when any model has a
  category other than OTHER."""
  plt = _pyplot()
  grouped_rows = bool(category_of) and any(c != OTHER for c in category_of.values())
  panels = []
  for models in architecture_groups(summaries):
    _, layers, stages, matrix = _matrix([s for s in summaries if s.model in models])
    bands = []
    labels = list(models)
    shown = matrix
    if grouped_rows:
      labels, shown, bands = _bands(models, matrix, category_of,
                                    list(order) + [c for c in dict.fromkeys(
                                        category_of.values()) if c not in order])
    panels.append((models, layers, stages, matrix, labels, shown, bands))
  # Grey: a layer this model does not have.
  cmap = plt.get_cmap('viridis_r').with_extremes(bad='0.85')
  style = dict(cmap=cmap, vmin=0, vmax=100, aspect='auto', interpolation='nearest')

  # Laid out in inches, so that cells, gaps and labels keep their size whatever the number of
  # models and layers; savefig's tight box then crops to what was drawn.
  cell_w, cell_h, gap, mean_w, bar_w = ROW_INCHES + 0.02, 0.28, 0.08, 0.36, 0.15
  names_h = [0.066 * max(len(l) for l in p[1]) + 0.15 for p in panels]
  mean_row = [len(p[0]) > 1 for p in panels]
  heights = [len(p[4]) * cell_h + names_h[k] + (gap + cell_h) * mean_row[k] + 0.35
             for k, p in enumerate(panels)]
  main_w = max(len(p[1]) for p in panels) * cell_w
  band_names = [b[0] for p in panels for b in p[6]]
  band_w = 0.07 * max(len(n) for n in band_names) + 0.2 if band_names else 0.0
  width = main_w + gap + mean_w + band_w + 2 * gap + bar_w + 1.0
  height = sum(heights) + 0.1
  fig = plt.figure(figsize=(width, height))

  def axes(left, bottom, w, h):  # inches from the lower left corner
    return fig.add_axes((left / width, bottom / height, w / width, h / height))

  top = height
  first = None
  for k, (models, layers, stages, matrix, labels, shown, bands) in enumerate(panels):
    rows, cols = shown.shape
    panel_w = cols * cell_w
    main_y = top - names_h[k] - rows * cell_h
    ax = axes(0, main_y, panel_w, rows * cell_h)
    ax.set_label('panel')
    first = first or ax
    image = ax.imshow(np.ma.masked_invalid(shown), **style)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(labels, fontsize=LABEL_PT)
    ax.set_xticks(range(cols))
    ax.set_xticklabels(layers, rotation=90, fontsize=LABEL_PT)
    ax.xaxis.tick_top()
    ax.tick_params(axis='x', length=2, pad=1)
    for _, start, _ in _stage_spans(stages)[1:]:
      ax.axvline(start - 0.5, color='white', lw=1.5)
    if rows * cols <= 400:  # few enough cells to read numbers in
      _cell_text(ax, shown, 6)
    with warnings.catch_warnings():  # an all-NaN row or column has a NaN mean, drawn blank
      warnings.simplefilter('ignore', RuntimeWarning)
      row_mean = np.nanmean(shown, axis=1)
      col_mean = np.nanmean(matrix, axis=0)
    side = axes(panel_w + gap, main_y, mean_w, rows * cell_h)
    side.imshow(np.ma.masked_invalid(row_mean[:, None]), **style)
    side.set_xticks([0])
    side.set_xticklabels(['mean'], fontsize=LABEL_PT)
    side.xaxis.tick_top()
    side.set_yticks([])
    _cell_text(side, row_mean[:, None], LABEL_PT)
    for category, start, end in bands:  # a rule between bands, the category beside its band
      if start:
        for a in (ax, side):
          a.axhline(start - 0.5, color='black', lw=1.5)
      for label in ax.get_yticklabels()[start:end]:
        if label.get_text().startswith('mean of '):
          label.set_fontweight('bold')
      side.annotate(category, xy=(1.0, 1 - (start + end) / 2 / rows), xycoords='axes fraction',
                    xytext=(6, 0), textcoords='offset points', ha='left', va='center',
                    fontsize=LABEL_PT, fontweight='bold')
    bottom_y = main_y
    if mean_row[k]:  # a layer's mean over the models of this architecture
      bottom_y = main_y - gap - cell_h
      bottom = axes(0, bottom_y, panel_w, cell_h)
      bottom.imshow(np.ma.masked_invalid(col_mean[None, :]), **style)
      bottom.set_yticks([0])
      bottom.set_yticklabels([f'mean of {_models_per_layer(matrix)}'], fontsize=LABEL_PT)
      bottom.set_xticks([])
      if cols <= 120:
        _cell_text(bottom, col_mean[None, :], 6)
    top -= heights[k]

  # Beside the panels, so that it stays legible with only a model or two.
  bar_h = height - names_h[0] - bottom_y
  colorbar = fig.colorbar(image, cax=axes(main_w + 3 * gap + mean_w + band_w, bottom_y, bar_w,
                                          bar_h))
  colorbar.set_label('criticality (1 - cos sim), %' if bar_h > 1.8 else 'criticality, %',
                     fontsize=LABEL_PT)
  colorbar.ax.tick_params(labelsize=LABEL_PT)
  count = len(by_model(summaries))
  title = f'layer criticality of {_plural(count, "model")}'
  if len(panels) > 1:
    title += f' of {len(panels)} architectures (a panel each)'
  if grouped_rows:
    title += ' by category (most critical first in a band)'
  title += f'; {", ".join(_protocol(summaries))}, mean over trials, %'
  _title_above(fig, first, title, fontsize=10)
  return fig


def plot_heatmap(summaries: Sequence[LayerSummary], path: str,
                 category_of: Mapping[str, str] | None = None, order: Sequence[str] = ()) -> None:
  """The paper's Figure 1: models (rows) by layers (columns, forward order), cell = mean
  criticality in %, with each model's mean over layers and, for two models or more, each
  layer's mean over the models. Models of different architectures (`architecture_groups`) are
  drawn as panels one above the other, each with its own columns and means. With categories
  (model label -> category, and their order), the rows of a panel are grouped in bands, named
  beside them, with a rule between bands and a mean row under each band (`_bands`)."""
  _save(heatmap_figure(summaries, category_of, order), path)


def _mean_band(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per column of `rows` (models x columns): the mean over models and the half-width of its
  95% Student t interval (`interval`); NaN half-width with one model."""
  from lc_jax.report.stats import interval  # pylint: disable=g-import-not-at-top
  pairs = [interval(column) for column in rows.T]
  return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def profiles_figure(summaries: Sequence[LayerSummary], category_of: Mapping[str, str],
                    order: Sequence[str]):
  """The figure of `plot_profiles`, not saved: per architecture a row of two axes, labelled
  'layers' and 'stages'."""
  plt = _pyplot()
  groups = architecture_groups(summaries)
  fig, grid = plt.subplots(len(groups), 2, squeeze=False, gridspec_kw={'width_ratios': [3, 1]},
                           figsize=(15.0, 4.6 * len(groups)))
  colors = plt.get_cmap('tab10').colors
  present = [c for c in order if c in set(category_of.values())]
  present += [c for c in dict.fromkeys(category_of.values()) if c not in present]
  for (ax, stage_ax), models in zip(grid, groups):
    ax.set_label('layers')
    stage_ax.set_label('stages')
    model_rows, layers, stages, matrix = _matrix([s for s in summaries if s.model in models])
    _layer_axes(ax, layers, stages)
    spans = _stage_spans(stages)
    stage_names = [span[0] for span in spans]
    for k, category in enumerate(present):
      members = [i for i, m in enumerate(model_rows) if category_of.get(m, OTHER) == category]
      if not members:
        continue
      color = colors[k % len(colors)]
      rows = matrix[members]
      mean, half = _mean_band(rows)
      x = np.arange(len(layers))
      ax.plot(x, mean, color=color, lw=1.4, label=f'{category} ({len(members)})')
      if np.any(np.isfinite(half)):
        ax.fill_between(x, mean - half, mean + half, color=color, alpha=0.18, lw=0)
      with warnings.catch_warnings():
        warnings.simplefilter('ignore', RuntimeWarning)
        per_stage = np.array([[np.nanmean(r[start:end]) for _, start, end in spans]
                              for r in rows])
      mean, half = _mean_band(per_stage)
      stage_ax.errorbar(np.arange(len(spans)) + 0.06 * (k - len(present) / 2), mean,
                        yerr=np.where(np.isfinite(half), half, 0.0), color=color, marker='o',
                        markersize=3, lw=1.2, capsize=2)
    ax.legend(fontsize=LABEL_PT, frameon=False, loc='best')
    stage_ax.set_xticks(range(len(spans)))
    stage_ax.set_xticklabels(stage_names, rotation=90, fontsize=LABEL_PT)
    stage_ax.tick_params(axis='y', labelsize=LABEL_PT)
    stage_ax.set_ylabel('mean criticality of the stage, %', fontsize=9)
    stage_ax.grid(axis='y', color='0.85', lw=0.5)
  image_set = _common(s.dataset for s in summaries)
  fig.suptitle(f'criticality by category{f" on {image_set}" if image_set else ""}: mean over '
               'the category\'s models, 95% band (Student t over models); right: per-stage means',
               fontsize=10)
  fig.tight_layout()
  return fig


def plot_profiles(summaries: Sequence[LayerSummary], path: str, category_of: Mapping[str, str],
                  order: Sequence[str]) -> None:
  """One line per category (`category_of`: model label -> category; `order`: the categories'
  order): the mean criticality per layer over the category's models, forward order, stages
  shaded and named, with a 95% Student t band over the models (none for one model); beside
  it, the per-stage means (each model's mean over a stage's layers) with their 95% intervals."""
  _save(profiles_figure(summaries, category_of, order), path)


def diff_figure(d):
  """The figure of `plot_diff`, not saved."""
  plt = _pyplot()
  n = len(d.layers)
  fig, ax = plt.subplots(figsize=(max(8.0, ROW_INCHES * n + 3.0), 4.4))
  _shade_stages(ax, [l.stage for l in d.layers])
  x = np.arange(n)
  value = np.array([100 * l.difference for l in d.layers])
  low = np.array([100 * l.low for l in d.layers])
  high = np.array([100 * l.high for l in d.layers])
  marked = np.array([l.marked for l in d.layers], dtype=bool)
  finite = np.isfinite(low) & np.isfinite(high)
  ax.axhline(0, color='0.3', lw=0.8)
  ax.errorbar(x[finite], value[finite], yerr=[value[finite] - low[finite],
                                              high[finite] - value[finite]],
              fmt='none', ecolor='0.4', elinewidth=0.8, capsize=1.5)
  ax.plot(x[~marked], value[~marked], 'o', color='#4C72B0', markersize=3.5,
          label='interval contains 0')
  ax.plot(x[marked], value[marked], 'o', color='#C44E52', markersize=4.5,
          label='interval excludes 0')
  ax.set_xlim(-0.5, n - 0.5)
  ax.set_xticks(x)
  ax.set_xticklabels([l.layer for l in d.layers], rotation=90, fontsize=LABEL_PT)
  ax.tick_params(axis='y', labelsize=LABEL_PT)
  ax.set_ylabel('criticality B - A, percentage points', fontsize=9)
  ax.grid(axis='y', color='0.85', lw=0.5)
  ax.legend(fontsize=LABEL_PT, frameon=False, loc='upper left', bbox_to_anchor=(1.005, 1.0))
  _title_above(fig, ax, f'B - A per layer; A = {d.a}, B = {d.b}\n95% intervals: {d.over}',
               fontsize=9)
  return fig


def plot_diff(d, path: str) -> None:
  """The difference profile of a report.diff.Diff: B - A per layer (forward order, stages
  shaded) with its 95% interval; layers whose interval excludes 0 (LayerDiff.marked, beyond
  float32 rounding) in red."""
  _save(diff_figure(d), path)


def _top1_interval(top1: float, images: float) -> tuple[float, float]:
  """The 95% Wilson interval (lower, upper, in %) of a top-1 of `top1` % over `images` images;
  NaNs when the count is unknown. At a top-1 of 0 or 100 % one end is the top-1 itself, held
  there against rounding (centre - half comes out a hair above 0), as errorbar takes no
  negative length."""
  if not (np.isfinite(top1) and np.isfinite(images) and images > 0):
    return math.nan, math.nan
  p, n, z = top1 / 100, images, 1.959964
  centre = (p + z * z / (2 * n)) / (1 + z * z / n)
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
  return (min(max(100 * (centre - half), 0.0), top1),
          max(min(100 * (centre + half), 100.0), top1))


# A scatter names every model up to this many; with more, only the SCATTER_NAMED farthest from
# the median (on both axes scaled to their range), each apart from those already named, so that
# names do not cover one another.
SCATTER_ALL_NAMED = 12
SCATTER_NAMED = 8


def scatter_figure(summaries: Sequence[LayerSummary],
                   category_of: Mapping[str, str] | None = None, order: Sequence[str] = ()):
  """The figure of `plot_scatter`, not saved, and the models left out for lack of labels:
  (matplotlib Figure or None when no model has labels, [model, ...])."""
  grouped = by_model(summaries)
  points = []
  skipped = []
  for model, layers in grouped.items():
    mean, half = model_interval(layers)
    top1 = layers[0].original_top1
    if np.isfinite(mean) and np.isfinite(top1):
      points.append((model, mean, half, top1,
                     _top1_interval(top1, _common_float(s.num_images for s in layers))))
    else:
      skipped.append(model)
  if not points:
    return None, skipped
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  x = np.array([p[1] for p in points])
  y = np.array([p[3] for p in points])
  xerr = np.array([p[2] for p in points])
  low = np.array([p[4][0] for p in points])
  high = np.array([p[4][1] for p in points])
  xerr = np.where(np.isfinite(xerr), xerr, 0.0)
  yerr = np.array([np.where(np.isfinite(low), y - low, 0.0),
                   np.where(np.isfinite(high), high - y, 0.0)])
  rho = spearman(x, y)
  if len(points) < 3:
    summary = f"Spearman's rho: needs 3 models, {len(points)} here"
  elif np.isfinite(rho):
    summary = f"Spearman's rho = {rho:.2f} ({len(points)} models)"
  else:  # a constant has no ranks to correlate
    same = 'top-1' if np.all(y == y[0]) else 'mean criticality'
    summary = f"Spearman's rho: undefined, the {len(points)} models' {same} is the same"
  # One series per category (in `order`) when the models have categories, else one.
  category = [(category_of or {}).get(p[0], OTHER) for p in points]
  groups = ([c for c in order if c in category] + sorted(set(category) - set(order))
            if category_of and any(c != OTHER for c in category) else [None])
  colours = plt.get_cmap('tab10')
  for k, group in enumerate(groups):
    chosen = np.array([group is None or c == group for c in category])
    ax.errorbar(x[chosen], y[chosen], xerr=xerr[chosen], yerr=yerr[:, chosen], fmt='o',
                markersize=5, color='#4C72B0' if group is None else colours(k % 10),
                ecolor='0.45', elinewidth=0.8, capsize=2, zorder=2,
                label=summary if group is None else f'{group} ({int(chosen.sum())})')
  named = list(range(len(points)))
  if len(points) > SCATTER_ALL_NAMED:  # the farthest from the median first, apart from others
    unit = [(v - np.median(v)) / max(np.ptp(v), 1e-12) for v in (x, y)]
    named = []
    for i in np.argsort(-np.hypot(*unit)):
      if all(np.hypot(unit[0][i] - unit[0][j], unit[1][i] - unit[1][j]) > 0.12 for j in named):
        named.append(i)
      if len(named) == SCATTER_NAMED:
        break
  for i in named:
    ax.annotate(points[i][0], (x[i], y[i]), xytext=(4, 4), textcoords='offset points',
                fontsize=LABEL_PT)
  ax.set_xlabel('mean criticality over layers, %', fontsize=9)
  ax.set_ylabel('top-1 accuracy of the original model, %', fontsize=9)
  ax.tick_params(labelsize=LABEL_PT)
  image_set = _common(s.dataset for s in summaries)
  ax.set_title(f'accuracy vs. mean criticality{f" on {image_set}" if image_set else ""}; bars: '
               '95% intervals\n(criticality over trials, top-1 over images, Wilson)'
               + ('' if groups == [None] else f'; {summary}'), fontsize=10)
  ax.grid(color='0.85', lw=0.5, zorder=0)
  ax.margins(0.15)
  # Below the axes: it never hides a point.
  ax.legend(loc='upper center', bbox_to_anchor=(0.5, -0.14), fontsize=LABEL_PT, frameon=False,
            ncol=1 if groups == [None] else 3)
  return fig, skipped


def _common_float(values) -> float:
  common = _common(values)
  return math.nan if common is None else float(common)


def plot_scatter(summaries: Sequence[LayerSummary], path: str,
                 category_of: Mapping[str, str] | None = None, order: Sequence[str] = ()
                 ) -> list[str]:
  """Original top-1 against mean criticality over layers, a point per model (the paper's
  Figure 2), with 95% intervals on both axes (criticality over trials, top-1 over the images)
  and Spearman's rho; coloured by category (`category_of`, in `order`) when the models have
  one. Every model is named up to SCATTER_ALL_NAMED of them, else the SCATTER_NAMED most
  extreme. Returns the models left out for lack of labels; writes nothing when no model has
  labels."""
  fig, skipped = scatter_figure(summaries, category_of, order)
  if fig is not None:
    _save(fig, path)
  return skipped


def _models_on_several_sets(summaries: Sequence[LayerSummary]) -> list[list[str]]:
  """The model labels of each model (model_id and reset mode) measured on two image sets or
  more, a list per model, models and labels in order of first appearance."""
  of_model: dict[tuple[str, str], dict[str, str]] = {}  # -> {label: dataset}
  for s in summaries:
    of_model.setdefault((s.model_id, s.mode), {})[s.model] = s.dataset
  return [list(labels) for labels in of_model.values() if len(set(labels.values())) > 1]


DATASETS_STACKED = 3  # datasets.png stacks up to this many panels; more go in two columns


def datasets_figure(summaries: Sequence[LayerSummary]):
  """The figure of `plot_datasets`, not saved: a matplotlib Figure with an axes labelled 'panel'
  per model measured on two image sets or more, row by row; None when there is no such model."""
  panels = _models_on_several_sets(summaries)
  if not panels:
    return None
  plt = _pyplot()
  sets = list(dict.fromkeys(s.dataset for s in summaries))
  colours = plt.get_cmap('tab10').colors
  grouped = by_model(summaries)
  width = max(len(layer_union([[s.layer for s in grouped[m]] for m in p])) for p in panels)
  columns = 1 if len(panels) <= DATASETS_STACKED else 2
  rows = -(-len(panels) // columns)
  fig, axes = plt.subplots(rows, columns, squeeze=False,
                           figsize=(columns * max(8.0, ROW_INCHES * width + 3.0), 4.2 * rows))
  for ax in axes.flat[len(panels):]:
    ax.remove()
  for ax, models in zip(axes.flat, panels):
    ax.set_label('panel')
    layers_of = [grouped[m] for m in models]
    _, layers, stages, matrix = _matrix([s for ls in layers_of for s in ls])
    _layer_axes(ax, layers, stages)
    column = {layer: j for j, layer in enumerate(layers)}
    x = np.arange(len(layers))
    named = [ls[0].dataset or UNKNOWN_SET for ls in layers_of]
    for values, model, model_layers, name in zip(matrix, models, layers_of, named):
      colour = colours[sets.index(model_layers[0].dataset) % len(colours)]
      # Two runs of one model on one set (two folders) keep their labels apart.
      ax.plot(x, values, color=colour, lw=1.4, marker='o', markersize=2.5,
              label=name if named.count(name) == 1 else model)
      if max(s.trials for s in model_layers) >= 2:
        half = np.full(len(layers), np.nan)
        for s in model_layers:
          half[column[s.layer]] = 100 * s.ci_trials
        ax.fill_between(x, values - half, values + half, color=colour, alpha=0.18, lw=0)
    ax.legend(fontsize=LABEL_PT, frameon=False, loc='upper left', bbox_to_anchor=(1.005, 1.0),
              title='image set', title_fontsize=LABEL_PT)
    every = [s for ls in layers_of for s in ls]
    ax.set_title(f'{every[0].model_id}: {", ".join(_protocol(every))}', fontsize=9, pad=14)
  fig.suptitle('layer criticality per image set, a panel per model measured on several: mean '
               'over trials, 95% band over trials (Student t, with 2 trials or more)',
               fontsize=10)
  fig.tight_layout()
  return fig


def plot_datasets(summaries: Sequence[LayerSummary], path: str) -> bool:
  """A model's criticality per image set side by side: a panel per model (model_id and reset
  mode) measured on two image sets or more (stacked, or in two columns for more than
  DATASETS_STACKED), its layers in forward order (stages shaded and
  named), a line per image set (the mean criticality over trials, %) with its 95% Student t
  band over trials where there are two trials or more, the legend naming the sets. Returns
  whether it drew: nothing is written when no model was measured on two sets."""
  fig = datasets_figure(summaries)
  if fig is not None:
    _save(fig, path)
  return fig is not None


@dataclasses.dataclass(frozen=True)
class Drawn:
  """A figure of `plot_study`: its path, or None when it was not drawn, and a note: why it was
  not drawn, or which models it leaves out."""

  path: str | None
  note: str = ''


def _study(summaries: Sequence[LayerSummary], folder: str, image_set: str | None,
           category_of: Mapping[str, str], order: Sequence[str]) -> list[Drawn]:
  """heatmap, profiles (when a model has a category) and scatter of `summaries`; the file
  names end in '_' and the image set's `file_part` unless `image_set` is None."""
  suffix = '' if image_set is None else f'_{file_part(image_set or UNKNOWN_SET)}'
  labels = by_model(summaries)
  category_of = {m: c for m, c in category_of.items() if m in labels}
  drawn = [Drawn(os.path.join(folder, f'heatmap{suffix}.png'))]
  plot_heatmap(summaries, drawn[-1].path, category_of, order)
  if any(c != OTHER for c in category_of.values()):
    drawn.append(Drawn(os.path.join(folder, f'profiles{suffix}.png')))
    plot_profiles(summaries, drawn[-1].path, category_of, order)
  scatter = os.path.join(folder, f'scatter{suffix}.png')
  skipped = plot_scatter(summaries, scatter, category_of, order)
  if len(skipped) == len(labels):
    of = f' of image set {image_set or UNKNOWN_SET}' if image_set is not None else ''
    drawn.append(Drawn(None, f'no scatter plot{of}: no model has labelled images (original '
                             'top-1 unknown)'))
  else:
    drawn.append(Drawn(scatter, f'left out for lack of labels: {", ".join(skipped)}'
                       if skipped else ''))
  return drawn


def plot_study(summaries: Sequence[LayerSummary], folder: str,
               category_of: Mapping[str, str] | None = None, order: Sequence[str] = ()
               ) -> list[Drawn]:
  """The paper's figures over every model of `summaries` into `folder`: heatmap.png,
  profiles.png when a model has a category (`plot_profiles`), and scatter.png when a model has
  labels. Categories: `category_of` (model label -> category) in `order`; by default the zoo's
  (categories.of_summaries).

  When the summaries name two image sets or more (stats.image_sets), each image set gets those
  figures of its own models, named heatmap_SET.png and so on (SET: the set's `file_part`;
  UNKNOWN_SET for rows that name none), and datasets.png (`plot_datasets`) draws each model
  measured on several sets. Returns every figure, in drawing order, and those not drawn."""
  if category_of is None:
    from lc_jax.report import categories  # pylint: disable=g-import-not-at-top
    category_of, order = categories.of_summaries(summaries)
  if len(image_sets(s.dataset for s in summaries)) < 2:
    return _study(summaries, folder, None, category_of, order)
  drawn = []
  path = os.path.join(folder, 'datasets.png')
  if plot_datasets(summaries, path):
    drawn.append(Drawn(path))
  else:
    drawn.append(Drawn(None, 'no datasets.png: no model was measured on two image sets'))
  for image_set in dict.fromkeys(s.dataset for s in summaries):
    drawn += _study([s for s in summaries if s.dataset == image_set], folder, image_set,
                    category_of, order)
  return drawn
