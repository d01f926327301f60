"""Matplotlib figures of LayerSummary lists: one model's criticality per layer, the paper's
models-by-layers heatmap (Figure 1) and its accuracy-vs-criticality scatter (Figure 2)."""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import numpy as np

from lc_jax.report.stats import LayerSummary, by_model, model_points, spearman

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


def plot_study(summaries: Sequence[LayerSummary], folder: str) -> tuple[str, str | None, list[str]]:
  """The paper's figures over every model of `summaries` into `folder`: heatmap.png and
  scatter.png. Returns (the heatmap's path, the scatter's path or None when no model has labels,
  the models left out of the scatter for lack of labels)."""
  heatmap, scatter = os.path.join(folder, 'heatmap.png'), os.path.join(folder, 'scatter.png')
  plot_heatmap(summaries, heatmap)
  skipped = plot_scatter(summaries, scatter)
  labelled = len(skipped) < len(by_model(summaries))
  return heatmap, scatter if labelled else None, skipped
