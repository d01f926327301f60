"""Report: reading results CSVs (ours and the paper's), summaries with intervals, tables, figures
and the command line, on small hand-made CSVs with known values."""

import csv
import math
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lc_jax import report
from lc_jax import schema
from lc_jax.report import figures

import pixels  # pylint: disable=g-import-not-at-top

COLUMNS = schema.COLUMNS  # the runner's results.csv
RUN_ID = '0123456789abcdef'
# The header of the paper's raw-results/results.csv (github.com/paulgavrikov/layer_criticality).
PAPER_COLUMNS = ('top1_acc', 'top5_acc', 'loss', 'batch_acc', 'layer', 'pred_cos_sim',
                 'pred_l1_err', 'pred_l2_err', 'pred_ce_loss', 'trial', 'recovered_acc',
                 'model_id')
# Forward order, which is not alphabetical: 'fc' sorts before 'layer1...'.
LAYERS = (('conv1', 'conv', 'stem'), ('layer1.0.conv1', 'conv', 'layer1'),
          ('layer1.0.downsample.0', 'conv', 'layer1'), ('layer2.0.conv1', 'conv', 'layer2'),
          ('fc', 'linear', 'head'))
T_975_2 = 4.302653  # Student t, 0.975 quantile, 2 degrees of freedom


def resnet50_layers():
  """The 54 Conv2d and Linear layers of ResNet-50, forward order, with kind and stage."""
  layers = [('conv1', 'conv', 'stem')]
  for stage, blocks in zip(range(1, 5), (3, 4, 6, 3)):
    for block in range(blocks):
      for conv in ('conv1', 'conv2', 'conv3'):
        layers.append((f'layer{stage}.{block}.{conv}', 'conv', f'layer{stage}'))
      if block == 0:
        layers.append((f'layer{stage}.{block}.downsample.0', 'conv', f'layer{stage}'))
  return layers + [('fc', 'linear', 'head')]


def write_results(workdir, model_id, criticality, layers=LAYERS, original_top1=80.0,
                  ci_images=0.01, dataset='imagenet2012'):
  """A runner-format workdir measured on the image set `dataset`: criticality[trial][layer
  index]; original_top1 None: no labels."""
  os.makedirs(workdir, exist_ok=True)
  labelled = original_top1 is not None

  def label(value):
    return value if labelled else ''

  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    writer.writerow([model_id, dataset, 'original', 0, 'none', '', '', 0, 100,
                     label(original_top1), label(95.0), label(1.0), 1.0, 0, 0, 0, 1.0, label(1.0),
                     0.0, 0.0, RUN_ID])
    for trial, values in enumerate(criticality):
      for (layer, kind, stage), c in zip(layers, values):
        top1 = original_top1 * (1 - c) if labelled else None
        writer.writerow([model_id, dataset, layer, trial, 'fresh', kind, stage, 1000, 100,
                         label(top1), label(top1), label(2.0), 1 - c, c, c / 2, 2 * c, 1 - c,
                         label(1 - c), c, ci_images, RUN_ID])
  return str(workdir)


def test_interval_is_student_t():
  # Half-width t_{0.975, n-1} * sd / sqrt(n); the t quantile against a printed table's value.
  values = [0.1, 0.2, 0.3]
  mean, half = report.interval(values)
  assert mean == pytest.approx(0.2)
  assert half == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), rel=1e-6)
  rng = np.random.default_rng(0)
  # t_{0.975, n-1} from printed tables (n - 1 = 999: nearly the normal's 1.959964).
  for n, t in ((2, 12.706205), (5, 2.776445), (31, 2.042272), (45, 2.015368), (1000, 1.962341)):
    values = rng.normal(size=n)
    mean, half = report.interval(list(values) + [math.nan])  # non-finite values are left out
    assert mean == pytest.approx(values.mean())
    assert half == pytest.approx(t * values.std(ddof=1) / math.sqrt(n), rel=1e-6)
  assert math.isnan(report.interval([0.4])[1]) and report.interval([0.4])[0] == 0.4
  assert all(math.isnan(v) for v in report.interval([]))


def test_spearman_averages_ties():
  # Average ranks: x -> 1, 2.5, 2.5, 4; y -> 1, 2, 3, 4.
  rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 2, 3, 4])
  expected = np.corrcoef(rx, ry)[0, 1]
  assert report.spearman([0.1, 0.5, 0.5, 0.9], [10, 20, 30, 40]) == pytest.approx(expected)
  assert report.spearman([3, 1, 2], [30, 10, 20]) == pytest.approx(1.0)
  assert report.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
  assert math.isnan(report.spearman([1, 1, 1], [1, 2, 3]))  # constant: no correlation
  # Ranks, not values: monotone but far from linear gives 1 (Pearson's r: 0.71); y's ranks
  # 2, 1, 4, 3, 5 against 1..5 give 1 - 6 * 4 / (5 * 24) = 0.8 (Pearson's r on the values: 0.72).
  assert report.spearman([1, 2, 3, 4, 5], [1, 2, 3, 4, 1000]) == pytest.approx(1.0)
  assert report.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 100]) == pytest.approx(0.8)


def test_summary_mean_and_intervals_by_hand(tmp_path):
  values = [[0.1, 0.5, 0.0, 0.9, 0.2], [0.2, 0.5, 0.0, 0.7, 0.4], [0.3, 0.5, 0.0, 0.8, 0.6]]
  summaries = report.summarize(report.load(write_results(tmp_path / 'a', 'm', values)))
  first = summaries[0]
  assert first.layer == 'conv1' and first.trials == 3
  assert first.criticality == pytest.approx(0.2)
  assert first.ci_trials == pytest.approx(T_975_2 * 0.1 / math.sqrt(3), rel=1e-6)
  assert first.ci_images == pytest.approx(0.01)
  assert first.top1_acc == pytest.approx(80.0 * 0.8)
  assert first.recovered_acc == pytest.approx(0.8)
  assert first.pred_agreement == pytest.approx(0.8)
  assert first.pred_kl_div == pytest.approx(0.4)
  assert first.original_top1 == pytest.approx(80.0)
  # Equal values over trials: an interval of zero width, not NaN.
  assert summaries[1].criticality == pytest.approx(0.5) and summaries[1].ci_trials == 0.0
  # fc: 0.2, 0.4, 0.6 -> sd 0.2
  assert summaries[4].ci_trials == pytest.approx(T_975_2 * 0.2 / math.sqrt(3), rel=1e-6)


def test_model_points_leave_out_a_layer_that_is_not_finite(tmp_path):
  import dataclasses  # pylint: disable=g-import-not-at-top
  values = [[0.1, 0.2, 0.3, 0.4, 0.5]] * 2
  summaries = report.summarize(report.load(write_results(tmp_path / 'a', 'm', values)))
  summaries[2] = dataclasses.replace(summaries[2], criticality=math.nan)
  (model, mean, top1), = report.model_points(summaries)
  assert model == 'm' and top1 == pytest.approx(80.0)
  assert mean == pytest.approx(100 * (0.1 + 0.2 + 0.4 + 0.5) / 4)

def test_layer_order_kept_and_original_is_no_layer(tmp_path):
  values = [[0.1, 0.2, 0.3, 0.4, 0.5]] * 2
  rows = report.load(write_results(tmp_path / 'a', 'm', values))
  assert rows[0]['layer'] == 'original'  # load keeps it; summarize sets it apart
  summaries = report.summarize(rows)
  assert [s.layer for s in summaries] == [name for name, _, _ in LAYERS]
  assert [s.stage for s in summaries] == ['stem', 'layer1', 'layer1', 'layer2', 'head']
  assert [s.kind for s in summaries] == ['conv', 'conv', 'conv', 'conv', 'linear']
  assert {s.model for s in summaries} == {'m'}


def test_one_trial_has_no_trial_interval(tmp_path):
  summaries = report.summarize(report.load(
      write_results(tmp_path / 'a', 'm', [[0.1, 0.2, 0.3, 0.4, 0.5]])))
  assert all(math.isnan(s.ci_trials) for s in summaries)
  assert summaries[0].criticality == pytest.approx(0.1)
  assert 'none with one trial' in report.table(summaries)


def test_without_labels_accuracies_are_nan(tmp_path):
  workdir = write_results(tmp_path / 'a', 'm', [[0.1, 0.2, 0.3, 0.4, 0.5]] * 3,
                          original_top1=None)
  rows = report.load(workdir)
  assert math.isnan(rows[1]['top1_acc']) and math.isnan(rows[1]['recovered_acc'])
  summaries = report.summarize(rows)
  assert all(math.isnan(s.original_top1) and math.isnan(s.recovered_acc) for s in summaries)
  assert summaries[0].criticality == pytest.approx(0.1)
  assert summaries[0].pred_agreement == pytest.approx(0.9)
  text = report.table(summaries)
  assert 'no labels' in text and 'nan' not in text.lower()
  scatter = tmp_path / 'scatter.png'
  assert report.plot_scatter(summaries, str(scatter)) == ['m']
  assert not scatter.exists()


def test_paper_format_reads_to_the_same_layers(tmp_path):
  # Two models in one file, as the paper releases them: 'model.' prefixes, trials as 0.0,
  # no original row, no criticality column; recovered_acc = top1 / original top-1.
  values = [[0.1, 0.2, 0.3, 0.4, 0.5], [0.3, 0.2, 0.1, 0.6, 0.7]]
  path = tmp_path / 'paper.csv'
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(PAPER_COLUMNS)
    for model_id, top1 in (('resnet50_augmix_180ep', 77.5), ('tv_resnet50', 76.0)):
      for trial, trial_values in enumerate(values):
        for (layer, _, _), c in zip(LAYERS, trial_values):
          acc = top1 * (1 - c)
          writer.writerow([acc, acc + 10, 3.0, '', f'model.{layer}', 1 - c, c, c / 2,
                           -1000.0, float(trial), acc / top1, model_id])
  paper = report.summarize(report.load(str(path)))
  ours = report.summarize(report.load(write_results(tmp_path / 'ours', 'tv_resnet50', values)))

  grouped = report.by_model(paper)
  assert list(grouped) == ['resnet50_augmix_180ep', 'tv_resnet50']
  tv = grouped['tv_resnet50']
  assert [s.layer for s in tv] == [s.layer for s in ours]
  assert [s.kind for s in tv] == [s.kind for s in ours]  # guessed from the names
  assert [s.stage for s in tv] == [s.stage for s in ours]
  np.testing.assert_allclose([s.criticality for s in tv], [s.criticality for s in ours])
  np.testing.assert_allclose([s.ci_trials for s in tv], [s.ci_trials for s in ours])
  assert all(math.isnan(s.ci_images) for s in tv)  # the paper has no image interval
  assert tv[0].original_top1 == pytest.approx(76.0)
  assert grouped['resnet50_augmix_180ep'][0].original_top1 == pytest.approx(77.5)
  assert tv[0].trials == 2


def test_paper_format_guesses_each_models_stem_and_head_on_its_own(tmp_path):
  # A ResNet, then an EfficientNet, in one file of the paper's: the EfficientNet's conv_stem
  # precedes its own first stage (the stem), though the ResNet's stages came before it.
  layers = {'tv_resnet50': ['conv1', 'layer1.0.conv1', 'fc'],
            'efficientnet_b0': ['conv_stem', 'blocks.0.0.conv_dw', 'conv_head', 'classifier']}
  path = tmp_path / 'paper.csv'
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(PAPER_COLUMNS)
    for model_id, names in layers.items():
      for name in names:
        writer.writerow([70.0, 90.0, 1.0, '', f'model.{name}', 0.9, 0.1, 0.05, -1000.0, 0.0,
                         0.9, model_id])
  stages = {(r['model_id'], r['layer']): r['stage'] for r in report.load(str(path))}
  assert [stages['efficientnet_b0', n] for n in layers['efficientnet_b0']] == [
      'stem', 'blocks.0', 'head', 'head']
  assert [stages['tv_resnet50', n] for n in layers['tv_resnet50']] == ['stem', 'layer1', 'head']


def test_run_id_column_is_optional(tmp_path):
  # results.csv ends in run_id; a file without it (an older run, or the paper's) reads the same.
  workdir = write_results(tmp_path / 'a', 'm', [[0.1, 0.2, 0.3, 0.4, 0.5]] * 2)
  rows = report.load(workdir)
  assert {r['run_id'] for r in rows} == {RUN_ID}
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    records = list(csv.reader(f))
  assert records[0][-1] == 'run_id'
  older = tmp_path / 'older.csv'
  with open(older, 'w', newline='') as f:
    csv.writer(f).writerows(r[:-1] for r in records)
  older_rows = report.load(str(older))
  assert {r['run_id'] for r in older_rows} == {''}
  assert 'seconds' not in older_rows[0]
  for a, b in zip(report.summarize(rows), report.summarize(older_rows)):
    assert (a.layer, a.criticality, a.ci_trials) == (b.layer, b.criticality, b.ci_trials)


def test_layer_name_prefixes_are_stripped():
  assert report.clean_layer_name('model.layer1.0.conv1') == 'layer1.0.conv1'
  assert report.clean_layer_name('module.model.fc') == 'fc'
  assert report.clean_layer_name('blocks.1.0.conv_dw') == 'blocks.1.0.conv_dw'
  assert report.clean_layer_name('model') == 'model'


def test_repeated_rows_count_once(tmp_path):
  # A resumed run may write a (trial, layer) again: the last row wins.
  workdir = write_results(tmp_path / 'a', 'm', [[0.1, 0.2, 0.3, 0.4, 0.5]])
  with open(os.path.join(workdir, 'results.csv'), 'a', newline='') as f:
    csv.writer(f).writerow(['m', 'imagenet2012', 'conv1', 0, 'fresh', 'conv', 'stem', 1000, 100,
                            1, 1, 1, 0.7, 0, 0, 0, 0.7, 0.7, 0.3, 0.01, RUN_ID])
  summaries = report.summarize(report.load(workdir))
  assert len(summaries) == 5 and summaries[0].trials == 1
  assert summaries[0].criticality == pytest.approx(0.3)


def test_table_lists_extremes_and_warns_about_trials(tmp_path):
  layers = resnet50_layers()
  rng = np.random.default_rng(0)
  base = np.linspace(0.01, 0.99, len(layers))
  values = [np.clip(base + rng.normal(0, 0.05, len(layers)), 0, 1) for _ in range(3)]
  summaries = report.summarize(report.load(
      write_results(tmp_path / 'a', 'm', values, layers=layers, ci_images=0.005)))
  text = report.table(summaries, top=3)
  lines = text.splitlines()
  assert 'original top-1 80.00%' in lines[0]
  most = lines[lines.index(' most critical 3:') + 2]
  least = lines[lines.index(' least critical 3:') + 4]
  assert most.split()[0] == max(summaries, key=lambda s: s.criticality).layer
  assert least.split()[0] == min(summaries, key=lambda s: s.criticality).layer
  assert '3 trials may not be enough' in text
  # Image intervals wider than the spread over trials: no note.
  calm = report.summarize(report.load(
      write_results(tmp_path / 'b', 'm', [base] * 3, layers=layers, ci_images=0.05)))
  assert 'may not be enough' not in report.table(calm)


def test_layer_union_interleaves_new_layers():
  union = report.layer_union([['conv1', 'layer1.0.conv1', 'fc'],
                              ['conv1', 'bn1', 'layer1.0.conv1', 'layer1.0.bn1', 'fc'],
                              ['stem.conv', 'conv1']])
  assert union == ['stem.conv', 'conv1', 'bn1', 'layer1.0.conv1', 'layer1.0.bn1', 'fc']


def _png_size(path):
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  image = matplotlib.image.imread(path)
  return image.shape[1], image.shape[0]


def test_figures_are_readable_pngs(tmp_path):
  layers = resnet50_layers()
  rng = np.random.default_rng(1)
  summaries = []
  for name, top1 in (('a', 76.0), ('b', 80.0), ('c', None)):
    values = rng.uniform(0, 1, (3, len(layers)))
    summaries += report.summarize(report.load(
        write_results(tmp_path / name, f'model_{name}', values, layers=layers,
                      original_top1=top1)))

  path = str(tmp_path / 'criticality.png')
  model_a = [s for s in summaries if s.model == 'model_a']
  report.plot_criticality(model_a, path)
  width, height = _png_size(path)
  assert 1000 < width < 3000 and 400 < height < 1500 and width > height  # 54 bars side by side
  pixels.check_bars(path, model_a)

  path = str(tmp_path / 'heatmap.png')
  report.plot_heatmap(summaries, path)
  width, height = _png_size(path)
  assert 1000 < width < 4000 and 200 < height < 1500
  # Every cell's colour, decoded, is its model's criticality of that layer (viridis_r over
  # 0-100 % in 256 colours: 0.4 % a step).
  models, layers, _, _ = figures._matrix(summaries)  # pylint: disable=protected-access
  assert models == ['model_a', 'model_b', 'model_c'] and len(layers) == 54
  cells = pixels.heatmap_cells(path, (3, 54))
  want = np.array([[100 * s.criticality for s in summaries if s.model == m] for m in models])
  print(f'heatmap: 162 cells read back within {np.abs(cells - want).max():.2g} %')
  assert not np.isnan(cells).any() and np.abs(cells - want).max() <= 1.0

  path = str(tmp_path / 'scatter.png')
  assert report.plot_scatter(summaries, path) == ['model_c']
  width, height = _png_size(path)
  assert 500 < width < 2000 and 300 < height < 1500
  # A point per labelled model: model_b (80 %, lower mean criticality) left of and above
  # model_a (76 %). The legend's marker, below the axes, comes last from the top.
  (bx, by), (ax, ay) = sorted(sorted(pixels.blobs(path, '#4C72B0'), key=lambda b: b[1])[:2])
  means = {m: np.mean([s.criticality for s in summaries if s.model == m]) for m in models}
  assert means['model_b'] < means['model_a'] and bx < ax and by < ay

  with pytest.raises(ValueError, match='one model'):
    report.plot_criticality(summaries, str(tmp_path / 'x.png'))


def test_write_workdir_report(tmp_path):
  workdir = write_results(tmp_path / 'a', 'm', [[0.1, 0.2, 0.3, 0.4, 0.5]] * 3)
  text = report.write_workdir_report(workdir)
  assert text.startswith('m: fresh, 5 layers, 3 trials')
  _png_size(os.path.join(workdir, 'criticality.png'))
  pixels.check_bars(os.path.join(workdir, 'criticality.png'), report.summarize(report.load(workdir)))


def _cli(args, cwd):
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return subprocess.run([sys.executable, '-m', 'lc_jax.report', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_writes_heatmap_and_scatter(tmp_path):
  a = write_results(tmp_path / 'runs' / 'a', 'resnet50.a1_in1k', [[0.1, 0.2, 0.3, 0.4, 0.5]] * 3)
  b = write_results(tmp_path / 'runs' / 'b', 'tv_resnet50', [[0.5, 0.4, 0.3, 0.2, 0.1]] * 3,
                    original_top1=76.0)
  out = tmp_path / 'figures'
  result = _cli([a, b, '--out', str(out)], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert 'resnet50.a1_in1k' in result.stdout and 'tv_resnet50' in result.stdout
  for name in ('heatmap.png', 'scatter.png'):
    _png_size(out / name)
  # One image set: the study's figures under their own names, none per set, no datasets.png.
  assert sorted(os.listdir(out)) == ['heatmap.png', 'profiles.png', 'scatter.png']
  assert [line for line in result.stdout.splitlines() if line.startswith('wrote ')] == [
      f'wrote {out / name}' for name in ('heatmap.png', 'profiles.png', 'scatter.png')]
  # --out defaults to report/ in the first OUT folder, never the current one.
  result = _cli([a, b, '--top', '0'], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert os.path.exists(os.path.join(a, 'report', 'heatmap.png'))
  assert os.path.exists(os.path.join(a, 'report', 'scatter.png'))
  assert not (tmp_path / 'heatmap.png').exists()


def test_cli_reads_a_sweeps_folder_in_its_order(tmp_path):
  sweep = tmp_path / 'sweep'
  write_results(sweep / 'tv_resnet50', 'tv_resnet50', [[0.5, 0.4, 0.3, 0.2, 0.1]] * 3)
  write_results(sweep / 'resnet50_dino', 'resnet50_dino', [[0.1, 0.2, 0.3, 0.4, 0.5]] * 3)
  (sweep / 'resnet50_moco_v3_100ep').mkdir()  # failed: no results
  (sweep / 'heatmap.png').write_bytes(b'\x89PNG')  # what a sweep draws beside its models
  (sweep / 'sweep.json').write_text(json.dumps({
      'models': ['tv_resnet50', 'resnet50_moco_v3_100ep', 'resnet50_dino'],
      'done': ['tv_resnet50', 'resnet50_dino'], 'failed': {'resnet50_moco_v3_100ep': '404'}}))
  assert report.results_of(str(sweep)) == [str(sweep / m / 'results.csv')
                                           for m in ('tv_resnet50', 'resnet50_dino')]
  result = _cli([str(sweep), '--out', str(tmp_path / 'figures')], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.index('tv_resnet50') < result.stdout.index('resnet50_dino')
  (sweep / 'sweep.json').write_text(json.dumps({'models': ['a'], 'done': [], 'failed': {}}))
  _assert_one_error_line(_cli([str(sweep)], cwd=tmp_path), 'has no finished model yet')


def _bad_inputs(tmp_path):
  (tmp_path / 'no_results').mkdir()
  (tmp_path / 'empty.csv').write_text('')
  (tmp_path / 'header_only.csv').write_text(','.join(COLUMNS) + '\n')
  (tmp_path / 'no_criticality.csv').write_text('model_id,layer,trial,top1_acc\nm,conv1,0,5\n')
  return {'missing': str(tmp_path / 'nowhere'), 'no_results': str(tmp_path / 'no_results'),
          'empty': str(tmp_path / 'empty.csv'), 'header_only': str(tmp_path / 'header_only.csv'),
          'no_criticality': str(tmp_path / 'no_criticality.csv')}


@pytest.mark.parametrize('case', ['missing', 'no_results', 'empty', 'header_only',
                                  'no_criticality'])
def test_cli_bad_input_is_one_line(tmp_path, case):
  path = _bad_inputs(tmp_path)[case]
  with pytest.raises(report.UserError):
    report.load(path)
  result = _cli([path, '--out', str(tmp_path)], cwd=tmp_path)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert not (tmp_path / 'heatmap.png').exists()


def _assert_one_error_line(result, *words):
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert 'Traceback' not in result.stderr
  for word in words:
    assert word in lines[0], lines[0]


def test_cli_out_that_is_a_file_is_one_line(tmp_path):
  workdir = write_results(tmp_path / 'a', 'm', [[0.1, 0.2, 0.3, 0.4, 0.5]] * 3)
  taken = tmp_path / 'taken'
  taken.write_text('keep me')
  result = _cli([workdir, '--out', str(taken)], cwd=tmp_path)
  _assert_one_error_line(result, 'is a file, not a folder')
  assert result.stdout == ''  # refused before any table is printed
  assert taken.read_text() == 'keep me'
  # A folder that cannot be created: its parent is that file.
  result = _cli([workdir, '--out', str(taken / 'figures')], cwd=tmp_path)
  _assert_one_error_line(result, 'cannot create')
  assert result.stdout == '' and taken.read_text() == 'keep me'
  assert not list(tmp_path.rglob('*.png'))


@pytest.mark.parametrize('case', ['png', 'binary', 'nul', 'text', 'quoted_newline'])
def test_cli_input_that_is_not_a_csv_is_one_line(tmp_path, case):
  path = tmp_path / f'input.{case}'
  if case == 'png':
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4)
  elif case == 'binary':
    path.write_bytes(np.random.default_rng(0).bytes(5000))
  elif case == 'nul':
    path.write_bytes(b'layer,criticality\nconv1,\x00\x00\n')
  elif case == 'text':
    path.write_text('Some notes about the run.\nNothing tabular here.\n')
  else:  # a column name with a line break must not break the one-line message
    path.write_text('"a\nb",c\n1,2\n')
  with pytest.raises(report.UserError, match='not a CSV results file'):
    report.load(str(path))
  out = tmp_path / 'figures'
  result = _cli([str(path), '--out', str(out)], cwd=tmp_path)
  _assert_one_error_line(result, 'not a CSV results file')
  assert result.stdout == ''
  assert not out.exists() and not list(tmp_path.rglob('heatmap.png'))


def _paper_csv(path, models, perturb=None, shift=0.0):
  """A results CSV in the paper's released format: 54 ResNet-50 layers x 3 trials per model,
  criticalities drawn per (model, layer) with a small trial spread; `perturb`'s are shifted."""
  rng = np.random.RandomState(0)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(PAPER_COLUMNS)
    for model, top1 in models:
      for name, _, _ in resnet50_layers():
        level = rng.uniform(0.05, 0.95)
        for trial in range(3):
          crit = level + rng.normal(0, 0.01) + (shift if model == perturb else 0.0)
          reset_top1 = top1 * (1 - crit)
          writer.writerow([reset_top1, reset_top1 + 10, 5.0, '', f'model.{name}', 1 - crit,
                           0.5, 0.3, -100.0, float(trial), reset_top1 / top1, model])
  return str(path)


def test_compare_with_the_paper_finds_exactly_the_perturbed_model(tmp_path):
  models = [('tv_resnet50', 76.29), ('robust_resnet50_l2_eps3', 62.89), ('resnet50_dino', 75.28)]
  paper = _paper_csv(tmp_path / 'paper.csv', models)
  same = _cli(['--compare', paper, paper], cwd=tmp_path)
  assert same.returncode == 0, same.stderr
  print(same.stdout)
  lines = same.stdout.strip().splitlines()
  assert lines[-1] == '3 models compared; all agree within the trial noise'
  for line in lines[1:-1]:
    assert ' 1.000 ' in line and 'DISAGREES' not in line  # rank correlation 1, z 0
  # The expected top-1 comes from the zoo's registry, and agrees.
  assert '76.29  76.29     76.29' in same.stdout

  # One model's criticalities moved by 5 points in every layer (5 standard errors of ~0.8 pt):
  # that model, and only it, is flagged.
  moved = _paper_csv(tmp_path / 'moved.csv', models, perturb='robust_resnet50_l2_eps3',
                     shift=0.05)
  result = _cli(['--compare', paper, moved], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  flagged = [line.split()[0] for line in result.stdout.splitlines() if 'DISAGREES' in line]
  assert flagged == ['robust_resnet50_l2_eps3']
  assert result.stdout.strip().splitlines()[-1] == (
      '3 models compared; 1 disagree beyond the trial noise: robust_resnet50_l2_eps3')

  nothing = _cli(['--compare', paper, write_results(tmp_path / 'x', 'other', [[0.1] * 5] * 3)],
                 cwd=tmp_path)
  _assert_one_error_line(nothing, 'no model of')


SETS = ('imagenet_r', 'imagenet2012_corrupted/fog_3')


def _sweep_over_sets(root):
  """A sweep over two image sets as lc_jax.sweep writes it (ROOT/SET/MODEL/results.csv, a
  sweep.json per set): model m on both sets, with very different criticality and top-1; model
  n on the first set only."""
  for dataset, level, top1 in ((SETS[0], 0.1, 40.0), (SETS[1], 0.8, 20.0)):
    models = ['m', 'n'] if dataset == SETS[0] else ['m']
    for model_id in models:
      write_results(root / dataset / model_id, model_id, [[level] * 5, [level + 0.02] * 5],
                    original_top1=top1, dataset=dataset)
    (root / dataset / 'sweep.json').write_text(json.dumps(
        {'models': models, 'done': models, 'failed': {}}))
  return [str(root / dataset) for dataset in SETS]


def test_image_sets_are_summarized_apart(tmp_path):
  rows = []
  for folder in _sweep_over_sets(tmp_path):
    for csv_path in report.results_of(folder):
      rows += report.load(csv_path)
  assert {r['dataset'] for r in rows} == set(SETS)
  summaries = report.summarize(rows)
  assert list(report.by_model(summaries)) == [f'm [{SETS[0]}]', 'n', f'm [{SETS[1]}]']
  for label, level, top1 in ((f'm [{SETS[0]}]', 0.11, 40.0), (f'm [{SETS[1]}]', 0.81, 20.0)):
    layers = report.by_model(summaries)[label]
    assert {s.dataset for s in layers} == {label[3:-1]}
    assert all(s.criticality == pytest.approx(level) for s in layers)  # never averaged across
    assert layers[0].original_top1 == pytest.approx(top1)
  # One file holding both sets: the summaries and the original's top-1 stay per set.
  together = [{**r, 'source': 'one.csv'} for r in rows if r['model_id'] == 'm']
  by_label = report.by_model(report.summarize(together))
  assert [layers[0].original_top1 for layers in by_label.values()] == [40.0, 20.0]
  lines = report.model_table(summaries).splitlines()
  assert lines[0].endswith('image set') and lines[2].split()[0] == 'n'
  assert lines[2].endswith(SETS[0]) and lines[3].startswith(f'm [{SETS[1]}]')
  assert f'n: fresh, on {SETS[0]}, 5 layers' in report.table(summaries)


def test_a_file_without_the_dataset_column_reads_with_an_empty_dataset(tmp_path, capsys):
  workdir = write_results(tmp_path / 'a', 'm', [[0.1, 0.2, 0.3, 0.4, 0.5]] * 2)
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    records = list(csv.reader(f))
  assert tuple(records[0]) == schema.COLUMNS
  column = schema.COLUMNS.index('dataset')
  older = tmp_path / 'older.csv'
  text = ''.join(schema.line(dict(zip(schema.WITHOUT_DATASET, r[:column] + r[column + 1:])))
                 for r in records)
  older.write_text(text)
  older_rows = report.load(str(older))
  assert {r['dataset'] for r in older_rows} == {''}
  for a, b in zip(report.summarize(report.load(workdir)), report.summarize(older_rows)):
    assert (a.layer, a.criticality, a.ci_trials, b.dataset) == (
        b.layer, b.criticality, b.ci_trials, '')
  # The runner's format without the column still ends every row in a newline: a last line
  # without one was cut short, even with all its cells.
  older.write_text(text.rstrip('\n'))
  assert len(report.load(str(older))) == len(older_rows) - 1
  assert 'cut short' in capsys.readouterr().err


def test_results_without_the_column_take_their_set_from_run_json(tmp_path):
  # A sweep over sets by a version without the dataset column: each model folder's run.json
  # names the set, so the sets stay apart (not pooled into one figure).
  root = tmp_path / 'shift'
  folders = _sweep_over_sets(root)
  column = schema.COLUMNS.index('dataset')
  for folder, dataset in zip(folders, SETS):
    for csv_path in report.results_of(folder):
      with open(csv_path, newline='') as f:
        records = list(csv.reader(f))
      with open(csv_path, 'w', newline='') as f:
        csv.writer(f, lineterminator='\n').writerows(r[:column] + r[column + 1:] for r in records)
      with open(os.path.join(os.path.dirname(csv_path), 'run.json'), 'w') as f:
        json.dump({'config': {'data': {'source': 'tfds', 'name': dataset}}}, f)
  rows = [r for f in folders for p in report.results_of(f) for r in report.load(p)]
  assert sorted({r['dataset'] for r in rows}) == sorted(SETS)
  assert list(report.by_model(report.summarize(rows))) == [
      f'm [{SETS[0]}]', 'n', f'm [{SETS[1]}]']
  # The photos, and an ImageFolder recognised as a set, as run.json records them.
  for model_id, run in (
      ('m', {'config': {'data': {'source': 'photos', 'name': 'imagenet2012'}}}),
      ('n', {'config': {'data': {'source': 'imagefolder', 'name': 'imagenet2012'}},
             'dataset': {'imagefolder': 'imagenet_a'}})):
    with open(os.path.join(folders[0], model_id, 'run.json'), 'w') as f:
      json.dump(run, f)
  assert [report.load(os.path.join(folders[0], m))[0]['dataset'] for m in 'mn'] == [
      'photos', 'imagenet_a']


def test_cli_draws_each_image_set_and_a_model_across_sets(tmp_path):
  out = tmp_path / 'figures'
  result = _cli([*_sweep_over_sets(tmp_path / 'shift'), '--out', str(out)], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert f'm [{SETS[0]}]' in result.stdout and f'm [{SETS[1]}]' in result.stdout
  written = [line.split(' ', 1)[1] for line in result.stdout.splitlines()
             if line.startswith('wrote ')]
  assert sorted(os.path.basename(p) for p in written) == sorted(os.listdir(out)) == sorted([
      'datasets.png', 'heatmap_imagenet_r.png', 'scatter_imagenet_r.png',
      'heatmap_imagenet2012_corrupted_fog_3.png', 'scatter_imagenet2012_corrupted_fog_3.png'])
  for path in written:
    _png_size(path)
  assert 'also holds figures' not in result.stdout
  # One set into the same folder: the other figures stay, and are named as not this report's.
  one = _cli([_sweep_over_sets(tmp_path / 'shift')[0], '--out', str(out)], cwd=tmp_path)
  assert one.returncode == 0, one.stderr
  assert one.stdout.splitlines()[-1] == (
      f'note: {out} also holds figures this report did not draw, from an earlier one: '
      'datasets.png, heatmap_imagenet2012_corrupted_fog_3.png, heatmap_imagenet_r.png, '
      'scatter_imagenet2012_corrupted_fog_3.png, scatter_imagenet_r.png')


def test_the_folder_of_a_sweep_over_sets_is_read_whole(tmp_path):
  from lc_jax import sweep  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'shift'
  folders = _sweep_over_sets(root)
  # Every set's sweep folder below it, by path (a set with '/' one level deeper).
  assert report.results_of(str(root)) == [
      str(root / dataset / model_id / 'results.csv')
      for dataset, models in sorted(zip(SETS, (['m', 'n'], ['m']))) for model_id in models]
  result = _cli([str(root), '--out', str(tmp_path / 'figures')], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert 'wrote ' + str(tmp_path / 'figures' / 'datasets.png') in result.stdout
  # What the sweep over sets draws at its top: the datasets figure, a panel for model m.
  states = {folder: json.loads((tmp_path / folder / 'sweep.json').read_text())
            for folder in folders}
  sweep._draw_datasets(str(root), states, ['m', 'n'])  # pylint: disable=protected-access
  _png_size(str(root / 'datasets.png'))
  panels = [ax for ax in report.figures.datasets_figure(report.summarize(
      [r for f in folders for p in report.results_of(f) for r in report.load(p)])).axes
            if ax.get_label() == 'panel']
  assert len(panels) == 1 and panels[0].get_title().startswith('m: ')
  # A set whose models all failed is left out with a note; the others are reported.
  (root / SETS[1] / 'sweep.json').write_text(json.dumps({'models': ['m'], 'done': [],
                                                         'failed': {'m': 'no data'}}))
  assert report.results_of(str(root)) == [str(root / SETS[0] / m / 'results.csv') for m in 'mn']
  # Nothing below: the folder's own message.
  (tmp_path / 'empty').mkdir()
  _assert_one_error_line(_cli([str(tmp_path / 'empty')], cwd=tmp_path), 'has no results.csv')


@pytest.mark.parametrize('flag', ['--claims', '--compare'])
def test_claims_and_compare_refuse_several_image_sets(tmp_path, flag):
  folders = _sweep_over_sets(tmp_path / 'shift')
  args = [flag] if flag == '--claims' else [flag, os.path.join(folders[0], 'm', 'results.csv')]
  result = _cli([*folders, *args, '--out', str(tmp_path / 'out')], cwd=tmp_path)
  _assert_one_error_line(result, f'{flag} takes the results of one image set', ', '.join(SETS),
                         f'python -m lc_jax.report OUT/{SETS[0]} {flag}')
  assert result.stdout == ''
  # One set other than ImageNet val: a note, then the comparison.
  if flag == '--compare':
    result = _cli([folders[0], *args], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ('note: these results are of imagenet_r; the paper measured ImageNet val '
                        '(imagenet2012)')
    assert lines[-1].endswith('all agree within the trial noise')
