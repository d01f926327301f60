"""The report's figures read at a glance: checked by what they draw, read back from the matplotlib
Figure before it is saved (tick label sizes, titles, markers, panels, error bars, the legend)
and, for the saved size, from the text's extent in pixels at the PNG's resolution."""

import dataclasses
import math
import os
import sys

import numpy as np
import pytest

from lc_jax import report
from lc_jax.report import figures
from lc_jax.report.stats import LayerSummary

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pixels  # pylint: disable=g-import-not-at-top


def _model(name, layers, values, top1=math.nan, images=7, spread=0.05, seed=0):
  """A model's LayerSummary list; `layers` are (name, kind, stage, num_params), `values` each
  layer's criticality: three trials at `values` +- `spread`, clipped to [0, 1]."""
  rng = np.random.default_rng(seed)
  out = []
  for (layer, kind, stage, params), value in zip(layers, values):
    trials = np.clip(value + rng.uniform(-spread, spread, 3), 0, 1)
    mean, half = report.interval(trials)
    out.append(LayerSummary(
        model=name, model_id=name, layer=layer, kind=kind, stage=stage, mode='fresh',
        num_params=params, trials=3, criticality=mean, ci_trials=half, ci_images=0.01,
        top1_acc=math.nan, recovered_acc=math.nan, pred_kl_div=math.nan,
        pred_agreement=math.nan, original_top1=top1, source=name, num_images=images,
        per_trial=tuple(enumerate(trials.tolist()))))
  return out


def _resnet(depth):
  """(name, kind, stage, num_params) of a ResNet's convs and fc, as timm names them."""
  bottleneck = depth == 50
  out = [('conv1', 'conv', 'stem', 9408)]
  for stage, blocks in enumerate([3, 4, 6, 3] if bottleneck else [2, 2, 2, 2], 1):
    width = 64 * 2 ** (stage - 1)
    for block in range(blocks):
      for conv in range(1, 4 if bottleneck else 3):
        size = width * width * (9 if conv == 2 or not bottleneck else 1)
        out.append((f'layer{stage}.{block}.conv{conv}', 'conv', f'layer{stage}', size))
      if block == 0 and (stage > 1 or bottleneck):
        out.append((f'layer{stage}.{block}.downsample.0', 'conv', f'layer{stage}',
                    width * width * (4 if bottleneck else 2)))
  out.append(('fc', 'linear', 'head', (2048 if bottleneck else 512) * 1000))
  return out


def _deep(n):
  return [(f'blocks.{i // 10}.{i % 10}.conv_pw', 'conv', f'blocks.{i // 10}', 100) for i in range(n)]


def _texts(fig):
  """Every piece of text the figure shows: tick labels, titles, legends, annotations."""
  from matplotlib.text import Text  # pylint: disable=g-import-not-at-top
  return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _check_legible(fig):
  """Every tick label is at least 8 pt and, once drawn at the saved dpi, at least 8 pt tall."""
  fig.canvas.draw()
  renderer = fig.canvas.get_renderer()
  ticks = [label for ax in fig.axes for label in ax.get_xticklabels() + ax.get_yticklabels()
           if label.get_visible() and label.get_text()]
  assert ticks
  sizes = {label.get_fontsize() for label in ticks}
  assert min(sizes) >= 8, sizes
  # The extent across the text's baseline, in pixels at the PNG's dpi (rotated labels: across).
  scale = figures.DPI / fig.dpi
  for label in ticks:
    box = label.get_window_extent(renderer)
    across = box.width if label.get_rotation() == 90 else box.height
    assert across * scale >= 0.99 * 8 / 72 * figures.DPI, (label.get_text(), across * scale)


def test_criticality_chart_title_ticks_and_names(tmp_path):
  layers = _resnet(18)
  summaries = _model('resnet18', layers, np.linspace(0.1, 0.9, len(layers)), images=7)
  fig = figures.criticality_figure(summaries)
  _check_legible(fig)
  title = fig._suptitle.get_text()  # pylint: disable=protected-access
  mean = 100 * np.mean([s.criticality for s in summaries])
  for part in ('resnet18', 'fresh reset', '7 images', '3 trials', f'{mean:.1f}%'):
    assert part in title, (part, title)
  # Full names, stage and all: 'layer1.0.conv1', not '0.conv1'.
  names = [t.get_text() for t in fig.axes[0].get_xticklabels()]
  assert names == [l[0] for l in layers]
  path = str(tmp_path / 'criticality.png')
  report.plot_criticality(summaries, path)
  pixels.check_bars(path, summaries)


def test_a_deep_model_gets_a_row_per_layer():
  layers = _deep(99)
  summaries = _model('deep', layers, np.linspace(0.05, 0.95, 99))
  fig = figures.criticality_figure(summaries)
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_yticklabels()] == [l[0] for l in layers]
  assert fig.get_figheight() > fig.get_figwidth()
  _check_legible(fig)
  # Read back: each bar's length is its layer's criticality, top to bottom in forward order.
  widths = [p.get_width() for p in ax.patches if p.get_height() == 0.75]
  np.testing.assert_allclose(widths, [100 * s.criticality for s in summaries])


@pytest.mark.parametrize('deep', [False, True])
def test_a_clipped_interval_ends_in_a_mark(deep):
  layers = _deep(99 if deep else 6)
  values = np.full(len(layers), 0.5)
  values[1], values[3] = 0.97, 0.02  # +-0.05 over 3 trials: the intervals pass 100 % and 0
  summaries = _model('m', layers, values, spread=0.05, seed=3)
  fig = figures.criticality_figure(summaries)
  ax = fig.axes[0]
  marks = {}
  for line in ax.get_lines():
    if line.get_marker() in ('^', 'v', '>', '<') and len(line.get_xdata()):
      x, y = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
      position, bound = (y, x) if deep else (x, y)
      marks.update({int(p): float(b) for p, b in zip(position, bound)})
  assert marks == {1: 100.0, 3: 0.0}
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert any('clipped' in t for t in legend), legend


def test_no_clip_mark_where_none_is_clipped():
  summaries = _model('m', _deep(5), np.full(5, 0.5))
  ax = figures.criticality_figure(summaries).axes[0]
  assert not any(len(l.get_xdata()) for l in ax.get_lines() if l.get_marker() in ('^', 'v'))
  assert not any('clipped' in t.get_text() for t in ax.get_legend().get_texts())


def _row_labels(fig):
  colorbars = {im.colorbar.ax for ax in fig.axes for im in ax.get_images() if im.colorbar}
  return [t.get_text() for ax in fig.axes if ax not in colorbars for t in ax.get_yticklabels()]


def test_a_single_model_heatmap_has_no_mean_row():
  fig = figures.heatmap_figure(_model('resnet50', _resnet(50), np.linspace(0, 1, 54)))
  assert _row_labels(fig) == ['resnet50']
  assert not [t for t in _texts(fig) if t.get_text().startswith(('mean of', 'mean over models'))]
  _check_legible(fig)
  title = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert '1 model' in title and '7 images' in title and '3 trials' in title


def test_architectures_are_panels_with_their_own_columns(tmp_path):
  r18, r50 = _resnet(18), _resnet(50)
  rng = np.random.default_rng(0)
  summaries = (_model('resnet50_a', r50, rng.uniform(0, 1, 54))
               + _model('resnet18', r18, rng.uniform(0, 1, len(r18)))
               + _model('resnet50_b', r50, rng.uniform(0, 1, 54)))
  assert figures.architecture_groups(summaries) == [['resnet50_a', 'resnet50_b'], ['resnet18']]
  fig = figures.heatmap_figure(summaries)
  panels = [ax for ax in fig.axes if ax.get_label() == 'panel']
  assert len(panels) == 2
  columns = [[t.get_text() for t in ax.get_xticklabels()] for ax in panels]
  assert columns == [[l[0] for l in r50], [l[0] for l in r18]]  # conv1 in each, apart
  assert [[t.get_text() for t in ax.get_yticklabels()] for ax in panels] == [
      ['resnet50_a', 'resnet50_b'], ['resnet18']]
  # The drawn cells are each panel's own models' values; one mean row, of the two ResNet-50s.
  cells = [ax.get_images()[0].get_array() for ax in panels]
  want = [[100 * s.criticality for s in summaries if s.model == m] for m in
          ('resnet50_a', 'resnet50_b', 'resnet18')]
  np.testing.assert_allclose(cells[0], want[:2])
  np.testing.assert_allclose(cells[1], want[2:])
  means = [label for label in _row_labels(fig) if label.startswith('mean')]
  assert means == ['mean of 2 models']
  _check_legible(fig)
  report.plot_heatmap(summaries, str(tmp_path / 'heatmap.png'))


def test_one_architecture_with_and_without_batchnorm_shares_a_panel():
  convs = _resnet(18)
  with_bn = []
  for layer in convs:
    with_bn.append(layer)
    if layer[1] == 'conv':
      bn = (layer[0][:-1] + '1' if layer[0].endswith('downsample.0') else
            layer[0].replace('conv', 'bn'))
      with_bn.append((bn, 'batchnorm', layer[2], 128))
  summaries = (_model('convs', convs, np.full(len(convs), 0.5))
               + _model('all', with_bn, np.full(len(with_bn), 0.5)))
  assert figures.architecture_groups(summaries) == [['convs', 'all']]



def test_a_band_mean_is_over_the_models_that_have_the_layer():
  # One band of a ResNet-18 with its BatchNorms (convs 50 %, BatchNorms 20 %) and one without
  # (convs 70 %): the band's mean row is 60 % under a conv and 20 % under a BatchNorm, the mean
  # of the one model that has it, as the overall mean row takes it; not blank.
  convs = _resnet(18)
  with_bn, values = [], []
  for layer in convs:
    with_bn.append(layer)
    values.append(0.5)
    if layer[1] == 'conv':
      bn = (layer[0][:-1] + '1' if layer[0].endswith('downsample.0') else
            layer[0].replace('conv', 'bn'))
      with_bn.append((bn, 'batchnorm', layer[2], 128))
      values.append(0.2)
  summaries = (_model('all', with_bn, values, spread=0)
               + _model('convs', convs, np.full(len(convs), 0.7), spread=0))
  fig = figures.heatmap_figure(summaries, {'all': 'mine', 'convs': 'mine'}, ['mine'])
  (panel,) = [ax for ax in fig.axes if ax.get_label() == 'panel']
  rows = [t.get_text() for t in panel.get_yticklabels()]
  assert rows == ['convs', 'all', 'mean of mine (1-2)']  # the BatchNorms: 'all' only
  columns = [t.get_text() for t in panel.get_xticklabels()]
  band_mean = np.ma.filled(panel.get_images()[0].get_array()[2].astype(float), np.nan)
  kinds = {name: kind for name, kind, _, _ in with_bn}
  want = np.array([20.0 if kinds[c] == 'batchnorm' else 60.0 for c in columns])
  assert columns == [name for name, _, _, _ in with_bn]
  np.testing.assert_allclose(band_mean, want)

def _two_resnet18s(trials_of_two=2):
  """A ResNet-18 of 3 trials over every layer (50 %) and one of `trials_of_two` trials over
  layer1 and the head only (30 %)."""
  r18 = _resnet(18)
  some = [l for l in r18 if l[2] in ('layer1', 'head')]
  two = [dataclasses.replace(s, trials=trials_of_two, per_trial=s.per_trial[:trials_of_two])
         for s in _model('two', some, np.full(len(some), 0.3), spread=0)]
  return _model('three', r18, np.full(len(r18), 0.5), spread=0) + two


def test_heatmap_title_gives_the_range_of_trials():
  fig = figures.heatmap_figure(_two_resnet18s())
  title = fig._suptitle.get_text()  # pylint: disable=protected-access
  assert '2-3 trials' in title and '3 trials' not in title.replace('2-3 trials', ''), title
  fig = figures.heatmap_figure(_two_resnet18s(trials_of_two=3))
  assert '3 trials' in fig._suptitle.get_text()  # pylint: disable=protected-access


def test_heatmap_mean_row_says_how_many_models_a_layer_is_over():
  # layer2 onwards only in one model: its cells hold that model's value, as a band's mean row
  # does, and the row's label says the means are over 1 or 2 models, not '2 models'.
  fig = figures.heatmap_figure(_two_resnet18s(trials_of_two=3))
  mean_rows = [t.get_text() for t in _texts(fig) if t.get_text().startswith('mean of')]
  assert mean_rows == ['mean of 1-2 models'], mean_rows
  r18 = _resnet(18)
  fig = figures.heatmap_figure(_model('a', r18, np.full(len(r18), 0.5))
                               + _model('b', r18, np.full(len(r18), 0.3)))
  assert [t.get_text() for t in _texts(fig) if t.get_text().startswith('mean of')] == [
      'mean of 2 models']


def test_scatter_of_equal_top1s_says_rho_is_undefined():
  summaries = []
  for i in range(3):
    summaries += _model(f'm{i}', _resnet(18), np.full(21, 0.2 + 0.1 * i), top1=80.0, seed=i)
  fig, _ = figures.scatter_figure(summaries)
  legend = ' '.join(t.get_text() for t in fig.axes[0].get_legend().get_texts())
  assert 'nan' not in legend and 'undefined' in legend and 'top-1' in legend, legend


def test_scatter_has_intervals_on_both_axes_and_rho_in_its_legend(tmp_path):
  from matplotlib.container import ErrorbarContainer  # pylint: disable=g-import-not-at-top
  from scipy import stats  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  top1s = [76.0, 80.0, 72.0, 78.0]
  summaries = []
  for i, top1 in enumerate(top1s):
    summaries += _model(f'm{i}', _resnet(50), rng.uniform(0, 1, 54), top1=top1, images=10000,
                        spread=0.1, seed=i)
  summaries += _model('unlabelled', _resnet(50), rng.uniform(0, 1, 54))
  fig, skipped = figures.scatter_figure(summaries)
  assert skipped == ['unlabelled']
  ax = fig.axes[0]
  bars, = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
  assert bars.has_xerr and bars.has_yerr
  # x: each trial's mean over the layers, then a Student t interval over the 3 trials.
  x_half, y_half = [], []
  for i, top1 in enumerate(top1s):
    layers = [s for s in summaries if s.model == f'm{i}']
    per_trial = np.mean([[v for _, v in s.per_trial] for s in layers], axis=0)
    x_half.append(100 * stats.t.ppf(0.975, 2) * per_trial.std(ddof=1) / np.sqrt(3))
    y_half.append(100 * 1.96 * np.sqrt(top1 / 100 * (1 - top1 / 100) / 10000))
  x_segments = bars.lines[2][0].get_segments()
  y_segments = bars.lines[2][1].get_segments()
  np.testing.assert_allclose([(s[1][0] - s[0][0]) / 2 for s in x_segments], x_half, rtol=1e-6)
  np.testing.assert_allclose([(s[1][1] - s[0][1]) / 2 for s in y_segments], y_half, rtol=0.02)
  legend = ' '.join(t.get_text() for t in ax.get_legend().get_texts())
  means = [100 * np.mean([s.criticality for s in summaries if s.model == f'm{i}'])
           for i in range(4)]
  rho = stats.spearmanr(means, top1s)[0]
  assert 'rho' in legend and f'{rho:.2f}' in legend and '4 models' in legend, legend
  _check_legible(fig)
  assert report.plot_scatter(summaries, str(tmp_path / 'scatter.png')) == ['unlabelled']


@pytest.mark.parametrize('images', [7, 500, 1000])
def test_a_top1_of_0_or_100_percent_has_an_interval_from_its_own_value(images, tmp_path):
  # Wilson's lower end at 0% comes out of the arithmetic a hair above 0 for some counts (500,
  # 1000: 4e-17) and below for others (7), the upper end at 100% a hair above 100: the bar's
  # length came out negative and matplotlib refused to draw the scatter (a random-weight model
  # on labelled images has top-1 0%).
  assert figures._top1_interval(0.0, images)[0] == 0.0
  assert figures._top1_interval(100.0, images)[1] == 100.0
  rng = np.random.default_rng(0)
  summaries = []
  for i, top1 in enumerate([0.0, 100.0, 0.0]):
    summaries += _model(f'm{i}', _resnet(18), rng.uniform(0, 1, 21), top1=top1, images=images)
  assert report.plot_scatter(summaries, str(tmp_path / 'scatter.png')) == []
  assert (tmp_path / 'scatter.png').stat().st_size > 0


def test_top1_bars_are_wilson_intervals():
  # scipy's Wilson score interval; at 7 of 7 and 0 of 50 the normal approximation would give
  # bars of zero length.
  from scipy import stats  # pylint: disable=g-import-not-at-top
  for hits, images in ((7, 7), (0, 50), (6, 11), (36, 40), (7600, 10000)):
    want = stats.binomtest(hits, images).proportion_ci(method='wilson')
    low, high = figures._top1_interval(100 * hits / images, images)  # pylint: disable=protected-access
    assert low == pytest.approx(100 * want.low, abs=1e-5), (hits, images)
    assert high == pytest.approx(100 * want.high, abs=1e-5), (hits, images)
  assert all(math.isnan(v) for v in figures._top1_interval(76.0, math.nan))  # pylint: disable=protected-access

def test_tables_state_their_units():
  text = report.table(_model('m', _deep(5), np.linspace(0.1, 0.5, 5)))
  header = next(line for line in text.splitlines() if 'crit %' in line)
  assert '±trials %' in header and '±images %' in header and 'recov %' in header
  assert '100 x the fractions criticality, recovered_acc' in text
  assert 'top1_acc and top5_acc are in % already' in text


def test_heatmap_rows_in_category_bands_with_their_means():
  r50 = _resnet(50)
  rng = np.random.default_rng(1)
  names = ['tv_resnet50', 'resnet50_dino', 'resnet50_swav', 'robust_resnet50_l2_eps3',
           'my_run']
  levels = {'tv_resnet50': 0.5, 'resnet50_dino': 0.3, 'resnet50_swav': 0.6,
            'robust_resnet50_l2_eps3': 0.8, 'my_run': 0.4}
  summaries = [s for n in names for s in _model(n, r50, np.clip(
      levels[n] + rng.uniform(-0.05, 0.05, 54), 0, 1), seed=len(n))]
  category_of, order = report.categories.of_summaries(summaries)
  assert category_of['my_run'] == 'other' and order == [
      'baseline', 'adversarial_training', 'contrastive', 'other']
  fig = figures.heatmap_figure(summaries, category_of, order)
  (panel,) = [ax for ax in fig.axes if ax.get_label() == 'panel']
  # Zoo order of the bands; within a band, most critical first; a mean row under every band.
  assert [t.get_text() for t in panel.get_yticklabels()] == [
      'tv_resnet50', 'mean of baseline (1)', 'robust_resnet50_l2_eps3',
      'mean of adversarial_training (1)', 'resnet50_swav', 'resnet50_dino',
      'mean of contrastive (2)', 'my_run', 'mean of other (1)']
  cells = panel.get_images()[0].get_array()
  np.testing.assert_allclose(cells[6], (cells[4] + cells[5]) / 2)
  np.testing.assert_allclose(cells[1], cells[0])
  texts = [t.get_text() for t in _texts(fig)]
  for category in order:
    assert category in texts
  assert len([l for l in panel.get_lines() if l.get_color() == 'black']) == 3  # rules
  assert 'mean of 5 models' in _row_labels(fig)  # the overall mean row stays
  _check_legible(fig)
  # --category wins over the zoo.
  category_of, order = report.categories.of_summaries(summaries, {'my_run': 'contrastive'})
  assert category_of['my_run'] == 'contrastive' and 'other' not in order


def test_category_profiles_have_a_line_and_band_per_category(tmp_path):
  r50 = _resnet(50)
  summaries = []
  for i, name in enumerate(['resnet50_dino', 'resnet50_swav', 'tv_resnet50']):
    summaries += _model(name, r50, np.full(54, 0.2 + 0.3 * i), seed=i)
  category_of, order = report.categories.of_summaries(summaries)
  fig = figures.profiles_figure(summaries, category_of, order)
  layers_ax = next(ax for ax in fig.axes if ax.get_label() == 'layers')
  stages_ax = next(ax for ax in fig.axes if ax.get_label() == 'stages')
  lines = {l.get_label(): l.get_ydata() for l in layers_ax.get_lines()}
  assert set(lines) == {'baseline (1)', 'contrastive (2)'}
  np.testing.assert_allclose(lines['contrastive (2)'], [
      100 * (a.criticality + b.criticality) / 2 for a, b in zip(summaries[:54],
                                                                 summaries[54:108])])
  assert len(layers_ax.collections) == 1  # a band for two models, none for one
  assert [t.get_text() for t in stages_ax.get_xticklabels()] == [
      'stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
  report.figures.plot_profiles(summaries, str(tmp_path / 'p.png'), category_of, order)
  assert (tmp_path / 'p.png').stat().st_size > 1000



def test_stage_points_are_the_mean_of_each_models_stage_means():
  # Per category and stage: each model's mean over the stage's layers, then the mean over the
  # models with its Student t half-width; criticality rising through the layers, so a stage
  # mean that took in the next stage's first layer would be off.
  from matplotlib.container import ErrorbarContainer  # pylint: disable=g-import-not-at-top
  r50 = _resnet(50)
  rising = np.linspace(0.05, 0.95, 54)
  summaries = []
  for name, offset in (('tv_resnet50', 0.0), ('resnet50_dino', 0.02), ('resnet50_swav', -0.03)):
    summaries += _model(name, r50, rising + offset, spread=0)
  category_of, order = report.categories.of_summaries(summaries)
  fig = figures.profiles_figure(summaries, category_of, order)
  stages_ax = next(ax for ax in fig.axes if ax.get_label() == 'stages')
  bars = [c for c in stages_ax.containers if isinstance(c, ErrorbarContainer)]
  stage_of = np.array([stage for _, _, stage, _ in r50])
  names = list(dict.fromkeys(stage_of))
  for container, members in zip(bars, ([0.0], [0.02, -0.03])):  # baseline, then contrastive
    per_model = np.array([[100 * np.mean((rising + m)[stage_of == stage]) for stage in names]
                          for m in members])
    np.testing.assert_allclose(container.lines[0].get_ydata(), per_model.mean(axis=0))
    if len(members) == 2:
      half = [report.interval(column)[1] for column in per_model.T]
      tops = [segment[1][1] - y for segment, y in zip(
          container.lines[2][0].get_segments(), per_model.mean(axis=0))]
      np.testing.assert_allclose(tops, half)
  assert len(bars) == 2

def test_a_scatter_of_many_models_is_coloured_by_category_and_names_a_few():
  # 20 models in two categories: a series per category in the legend, and at most
  # SCATTER_NAMED names, none two on top of each other.
  rng = np.random.default_rng(3)
  summaries, category_of = [], {}
  for i in range(20):
    name = f'model_{i:02d}'
    category_of[name] = 'adversarial_training' if i % 2 else 'augmentation'
    summaries += _model(name, _resnet(50), rng.uniform(0, 1, 54), top1=70 + i / 2, images=1000,
                        seed=i)
  fig, skipped = figures.scatter_figure(summaries, category_of,
                                        ['augmentation', 'adversarial_training'])
  assert skipped == []
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_legend().get_texts()] == [
      'augmentation (10)', 'adversarial_training (10)']
  names = [t for t in ax.texts if t.get_text().startswith('model_')]
  assert 0 < len(names) <= figures.SCATTER_NAMED
  _check_legible(fig)


def _on(summaries, dataset):
  """`summaries` of one model as measured on the image set `dataset` (labelled as summarize
  labels a model measured on several: 'ID [SET]')."""
  return [dataclasses.replace(s, model=f'{s.model_id} [{dataset}]', dataset=dataset)
          for s in summaries]


def test_datasets_figure_has_a_panel_per_model_on_several_sets(tmp_path):
  r18 = _resnet(18)
  sets = ['imagenet_r', 'imagenet2012_corrupted/fog_3']
  summaries = []
  for i, name in enumerate(['resnet18_a', 'resnet18_b']):
    for k, dataset in enumerate(sets):
      summaries += _on(_model(name, r18, np.full(len(r18), 0.2 + 0.5 * k), top1=70.0 + i,
                              seed=i), dataset)
  only = _model('resnet18_c', r18, np.full(len(r18), 0.4), top1=60.0)  # one set: no panel
  summaries += [dataclasses.replace(s, dataset='imagenet_r') for s in only]
  fig = figures.datasets_figure(summaries)
  panels = [ax for ax in fig.axes if ax.get_label() == 'panel']
  assert len(panels) == 2
  for ax, name in zip(panels, ['resnet18_a', 'resnet18_b']):
    assert ax.get_title().startswith(f'{name}: fresh reset')
    assert [t.get_text() for t in ax.get_legend().get_texts()] == sets
    lines = ax.get_lines()
    assert len(lines) == 2  # a line per set, each set's own values
    np.testing.assert_allclose([np.mean(l.get_ydata()) for l in lines], [20, 70], atol=5)
    assert len(ax.collections) == 2  # a band over the 3 trials per set
    assert [t.get_text() for t in ax.get_xticklabels()] == [l[0] for l in r18]
  assert 'per image set' in fig._suptitle.get_text()  # pylint: disable=protected-access
  _check_legible(fig)

  drawn = report.plot_study(summaries, str(tmp_path))
  paths = [d.path for d in drawn if d.path]
  names = [os.path.basename(p) for p in paths]
  assert names == ['datasets.png', 'heatmap_imagenet_r.png', 'scatter_imagenet_r.png',
                   'heatmap_imagenet2012_corrupted_fog_3.png',
                   'scatter_imagenet2012_corrupted_fog_3.png']
  assert sorted(os.listdir(tmp_path)) == sorted(names)
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  for path in paths:
    assert matplotlib.image.imread(path).shape[0] > 100
  # A set's heatmap holds its own models only, and names the set in its title.
  fog = [s for s in summaries if s.dataset == sets[1]]
  heatmap = figures.heatmap_figure(fog)
  title = heatmap._suptitle.get_text()  # pylint: disable=protected-access
  assert 'images of imagenet2012_corrupted/fog_3' in title and '2 models' in title


def test_without_several_sets_no_datasets_figure(tmp_path):
  r18 = _resnet(18)
  one = [dataclasses.replace(s, dataset='imagenet_r')
         for s in _model('resnet18_a', r18, np.full(len(r18), 0.3), top1=70.0)]
  assert figures.datasets_figure(one) is None
  drawn = report.plot_study(one, str(tmp_path))
  assert [os.path.basename(d.path) for d in drawn] == ['heatmap.png', 'scatter.png']
  assert sorted(os.listdir(tmp_path)) == ['heatmap.png', 'scatter.png']
