"""The report's statistics against answers known by construction: --claims on synthetic CSVs
(a set effect covered by its interval, a null case covering 0 in about 95% of seeds), the early
and deep defaults, the permutation test by hand, and --diff on synthetic workdirs with per-image
values (two seeds mark few layers; a perturbed layer marks itself and the layers after it)."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lc_jax import report
from lc_jax import schema
from lc_jax.report import categories
from lc_jax.report import claims
from lc_jax.report import diff
from lc_jax.report import stats

RUN_ID = '0123456789abcdef'
# (layer, stage): a small ResNet-like forward order; early = stem + layer1, deep = layer3 + 4.
LAYERS = ([('conv1', 'stem')] + [(f'layer{s}.{b}.conv1', f'layer{s}') for s in range(1, 5)
                                 for b in range(2)] + [('fc', 'head')])
EARLY = [i for i, (_, stage) in enumerate(LAYERS) if stage in ('stem', 'layer1')]
DEEP = [i for i, (_, stage) in enumerate(LAYERS) if stage in ('layer3', 'layer4')]


def write_run(workdir, model_id, values, per_image=None, images='the same 100', arch=None):
  """A runner-format workdir: values[trial][layer] criticality; per_image[trial][layer] an
  array over images (its mean must be the trial's value), written to per_image.npz; `arch`
  the run.json's architecture (None: a run.json without one)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, schema.RESULTS), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(schema.COLUMNS)
    for trial, row in enumerate(values):
      for (layer, stage), c in zip(LAYERS, row):
        writer.writerow([model_id, 'imagenet2012', layer, trial, 'fresh', 'conv', stage, 100, 100,
                         '', '', '', 1 - c, '', '', '', '', '', c, 0.01, RUN_ID])
  with open(os.path.join(workdir, schema.RUN), 'w') as f:
    json.dump({'images': images, **({} if arch is None else {'arch': arch})}, f)
  if per_image is not None:
    np.savez(os.path.join(workdir, schema.PER_IMAGE), **{
        f'{t}/{layer}': per_image[t][l] for t in range(len(per_image))
        for l, (layer, _) in enumerate(LAYERS)})
  return str(workdir)


def study(tmp_path, deep_shift, models=6, trials=3, seed=0, model_sd=0.03, trial_sd=0.01):
  """Two categories of `models` models; training_recipes' deep layers lower by `deep_shift`."""
  rng = np.random.default_rng(seed)
  paths, given = [], {}
  for category, shift in (('baseline', 0.0), ('training_recipes', deep_shift)):
    for m in range(models):
      base = np.full(len(LAYERS), 0.6) + rng.normal(0, model_sd)
      base[DEEP] -= shift
      values = base + rng.normal(0, trial_sd, (trials, len(LAYERS)))
      model_id = f'{category}_{m}'
      paths.append(write_run(tmp_path / model_id, model_id, values))
      given[model_id] = category
  return paths, given


def measure(paths, given, **kwargs):
  rows = [row for p in paths for row in report.load(p)]
  summaries = report.summarize(rows)
  of, order = categories.assign(list(dict.fromkeys(s.model_id for s in summaries)), given)
  return claims.claims(summaries, of, order, **kwargs)


def _change(c, a, b, quantity):
  return next(e for e in c.estimates if e.kind == 'change' and (e.a, e.b, e.quantity) == (
      a, b, quantity))


def test_regions_default_per_architecture_and_overrides():
  resnet = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head')
  assert claims.regions(resnet) == (('stem', 'layer1'), ('layer3', 'layer4'))
  efficientnet = ('stem',) + tuple(f'blocks.{i}' for i in range(7)) + ('head',)
  assert claims.regions(efficientnet) == (('stem', 'blocks.0', 'blocks.1'),
                                          ('blocks.4', 'blocks.5', 'blocks.6'))
  assert claims.regions(resnet, early=['stem'], deep=['layer4']) == (('stem',), ('layer4',))


def test_permutation_p_by_hand():
  # 4 values, 6 relabellings: |diff| = 2, 1, 0, 0, 1, 2; two reach the observed 2.
  assert stats.permutation_p([1, 2], [3, 4]) == pytest.approx(2 / 6)
  assert np.isnan(stats.permutation_p([1], [3, 4]))
  # Random relabellings when there are more than asked for: (1 + k) / (1 + n), within (0, 1].
  p = stats.permutation_p(np.arange(20.0), np.arange(20.0) + 100, permutations=200)
  assert p == pytest.approx(1 / 201)


def test_a_set_deep_effect_is_covered_and_the_statement_holds(tmp_path):
  paths, given = study(tmp_path, deep_shift=0.2)
  c = measure(paths, given, resamples=2000)
  deep = _change(c, 'training_recipes', 'baseline', 'deep')
  assert deep.low < -0.2 < deep.high and deep.high < 0
  early = _change(c, 'training_recipes', 'baseline', 'early')
  assert early.low < 0 < early.high  # early layers unchanged by construction
  shift = _change(c, 'training_recipes', 'baseline', 'deep - early')
  assert shift.low < -0.2 < shift.high
  assert deep.p_value < 0.01 and early.p_value > 0.01
  first = c.verdicts[0]
  assert first.statement.category == 'training_recipes' and first.verdict == 'holds'
  assert first.parts == 'early not resolved, deep holds'
  # Categories absent from the CSV leave their statements unresolved, saying why.
  assert [v.verdict for v in c.verdicts[1:]] == ['not resolved'] * 2
  assert 'no model of category contrastive' in c.verdicts[1].reason



def test_a_statement_reads_the_same_with_the_categories_in_either_order(tmp_path):
  # With the baseline after the category in `order`, the change is computed the other way round
  # and turned: the effect, its interval and the verdict are those of the usual order (the
  # intervals from other bootstrap draws: within 0.02 here), each interval low <= effect <= high.
  paths, given = study(tmp_path, deep_shift=0.2)
  usual = measure(paths, given, resamples=2000)
  rows = [row for p in paths for row in report.load(p)]
  summaries = report.summarize(rows)
  turned = claims.claims(summaries, given, ['training_recipes', 'baseline'], resamples=2000)
  for a, b in zip((usual.verdicts[0].effect, usual.verdicts[0].early, usual.verdicts[0].deep),
                  (turned.verdicts[0].effect, turned.verdicts[0].early,
                   turned.verdicts[0].deep)):
    assert (b.a, b.b, b.quantity) == (a.a, a.b, a.quantity) == (
        'training_recipes', 'baseline', b.quantity)
    assert b.effect == pytest.approx(a.effect, abs=1e-12)
    assert b.low <= b.effect <= b.high, b
    assert b.low == pytest.approx(a.low, abs=0.02) and b.high == pytest.approx(a.high, abs=0.02)
  assert turned.verdicts[0].verdict == usual.verdicts[0].verdict == 'holds'
  assert turned.verdicts[0].parts == usual.verdicts[0].parts

def test_null_intervals_cover_zero_in_about_95_percent_of_seeds():
  # Two categories of 8 models (model sd 0.05, trial sd 0.02, 3 trials) from one distribution;
  # 300 seeds, 400 replicates each. Expected coverage 0.95 less the percentile bootstrap's
  # known narrowness with few models (about 1 to 2 points with 8); the binomial sd over 300
  # seeds is 1.3 points. Tolerance: 0.90 to 0.99.
  covered = []
  for seed in range(300):
    rng = np.random.default_rng(seed)
    sides = [[(0.5 + rng.normal(0, 0.05) + rng.normal(0, 0.02, 3))[None, :, None]
              for _ in range(8)] for _ in range(2)]
    a = stats.hierarchical_bootstrap(sides[0], 400, seed, salt=0)
    b = stats.hierarchical_bootstrap(sides[1], 400, seed, salt=1)
    low, high = stats.percentile_interval(a - b)
    covered.append(low[0] <= 0 <= high[0])
  print(f'coverage of 0 over {len(covered)} null cases: {100 * np.mean(covered):.1f}%')
  assert 0.90 <= np.mean(covered) <= 0.99, np.mean(covered)



def test_bootstrap_resamples_models_trials_and_images():
  # Each level alone varies; the replicates' sd is then the bootstrap's of a mean at that level,
  # sd (ddof 0) / sqrt(n), within 6 % (4000 replicates: the sd of an sd estimate is about 1 %).
  rng = np.random.default_rng(7)
  trials = rng.normal(0.5, 0.1, 20)  # one model, 20 trials, one value each
  images = rng.normal(0.5, 0.1, 300)  # one model, one trial, 300 images
  models = rng.normal(0.5, 0.1, 12)  # 12 models of one trial and one value
  cases = (([trials[None, :, None]], trials), ([images[None, None, :]], images),
           ([np.full((1, 1, 1), m) for m in models], models))
  for units, values in cases:
    replicates = stats.hierarchical_bootstrap(units, 4000, seed=0)[:, 0]
    want = values.std() / np.sqrt(values.size)
    assert replicates.mean() == pytest.approx(values.mean(), abs=want / 5)
    assert replicates.std() == pytest.approx(want, rel=0.06), (values.size, replicates.std(), want)

def test_bootstrap_is_seeded_and_uses_per_image_values(tmp_path):
  rng = np.random.default_rng(1)
  paths, given = [], {}
  for m in range(3):
    images = np.clip(0.5 + rng.normal(0, 0.2, (3, len(LAYERS), 50)), 0, 1)
    paths.append(write_run(tmp_path / f'm{m}', f'm{m}', images.mean(axis=2), images))
    given[f'm{m}'] = 'baseline'
  once = measure(paths, given, resamples=500)
  again = measure(paths, given, resamples=500)
  assert once.estimates == again.estimates
  assert {e.over for e in once.estimates} == {'models, trials, images'}
  os.remove(os.path.join(paths[0], schema.PER_IMAGE))
  assert {e.over for e in measure(paths, given, resamples=500).estimates} == {'models, trials'}


def _cli(args, cwd):
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return subprocess.run([sys.executable, '-m', 'lc_jax.report', *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_claims_writes_md_and_csv_with_a_category_map(tmp_path):
  paths, given = study(tmp_path / 'runs', deep_shift=0.2, models=3)
  (tmp_path / 'map.json').write_text(json.dumps(
      {'baseline': [m for m, c in given.items() if c == 'baseline']}))
  extra = [f'--category={m}={c}' for m, c in given.items() if c != 'baseline']
  out = tmp_path / 'out'
  result = _cli(['--claims', *paths, f'--category={tmp_path / "map.json"}', *extra,
                 '--resamples=500', '--early=stem,layer1', '--deep=layer4', f'--out={out}'],
                cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert 'improved training regimes' in result.stdout and 'Rule: holds' in result.stdout
  assert 'early = stem + layer1 (3 layers), deep = layer4 (2 layers)' in result.stdout
  with open(out / 'claims.csv', newline='') as f:
    rows = list(csv.DictReader(f))
  assert rows[0]['kind'] == 'statement' and rows[0]['verdict'] == 'holds'
  assert (out / 'claims.md').read_text().startswith("# The paper's claims")
  bad = _cli(['--claims', *paths, '--deep=layer9', f'--out={out}'], cwd=tmp_path)
  assert bad.returncode != 0 and "unknown --deep stage 'layer9'" in bad.stderr
  assert 'Traceback' not in bad.stderr


# ---------------------------------------------------------------------------------------------
# --diff: synthetic runs of one model on the same 200 images.

IMAGE_EFFECT = np.random.default_rng(100).normal(0, 0.15, (len(LAYERS), 200))


def diff_run(workdir, seed, perturbed_from=None, trials=3):
  """A run's per-image criticality: a layer's level, the images' own effect (the same in
  every run), the draw of the trial (per run seed) and noise; layers from `perturbed_from`
  on are 0.1 more critical."""
  rng = np.random.default_rng(seed)
  level = np.linspace(0.2, 0.7, len(LAYERS))
  if perturbed_from is not None:
    level[perturbed_from:] += 0.1
  images = (level[None, :, None] + IMAGE_EFFECT[None] +
            rng.normal(0, 0.005, (trials, len(LAYERS), 1)) +
            rng.normal(0, 0.05, (trials, len(LAYERS), 200)))
  return write_run(workdir, 'demo', images.mean(axis=2), images)


def _diff(a, b, **kwargs):
  rows_a, rows_b = report.load(a), report.load(b)
  return diff.diff(rows_a, rows_b, report.read.per_image_of(rows_a[0]['source']),
                   report.read.per_image_of(rows_b[0]['source']), resamples=1000, **kwargs)


def test_diff_of_two_seeds_marks_few_layers(tmp_path):
  marked = []
  for seed in range(5):
    a = diff_run(tmp_path / f'a{seed}', 2 * seed)
    b = diff_run(tmp_path / f'b{seed}', 2 * seed + 1)
    d = _diff(a, b)
    assert d.over.startswith('paired bootstrap over 200 images')
    marked.append(sum(l.marked for l in d.layers))
  # 5 pairs x 10 layers, each marked with chance about 5%: expected 2.5; allow up to 8.
  assert sum(marked) <= 8, marked


def test_diff_marks_the_perturbed_layer_and_those_after_it(tmp_path):
  a = diff_run(tmp_path / 'a', 0)
  b = diff_run(tmp_path / 'b', 1, perturbed_from=5)
  d = _diff(a, b)
  assert [l.marked for l in d.layers[5:]] == [True] * (len(LAYERS) - 5)
  assert sum(l.marked for l in d.layers[:5]) <= 1
  for l in d.layers[5:]:
    assert l.low < 0.1 < l.high
  # Without per-image values on one side: a paired t over trials, said so.
  os.remove(os.path.join(b, schema.PER_IMAGE))
  d = _diff(a, b)
  assert d.over.startswith('Student t') and 'only one side' in d.notes[0]


def test_cli_diff_prints_marks_and_draws(tmp_path):
  a = diff_run(tmp_path / 'a', 0)
  b = diff_run(tmp_path / 'b', 1, perturbed_from=7)  # layer4.0.conv1
  result = _cli(['--diff', a, b, '--resamples=500', f'--out={tmp_path / "out"}'], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  lines = [l for l in result.stdout.splitlines() if l.startswith(('layer4', 'fc'))]
  assert lines and all(l.endswith(' *') for l in lines)
  assert (tmp_path / 'out' / 'diff.png').stat().st_size > 1000
  with open(tmp_path / 'out' / 'diff.csv', newline='') as f:
    assert [r['marked'] for r in csv.DictReader(f)][7:] == ['1', '1', '1']
  # Different images: no pairing over images.
  c = write_run(tmp_path / 'c', 'demo', np.full((3, len(LAYERS)), 0.5),
                np.full((3, len(LAYERS), 200), 0.5), images='other images')
  result = _cli(['--diff', a, c, '--resamples=500', f'--out={tmp_path / "out"}'], cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert 'the runs measured different images' in result.stdout
  bad = _cli(['--diff', a], cwd=tmp_path)
  assert bad.returncode != 0 and 'compares two runs' in bad.stderr


def test_diff_of_float_rounding_marks_nothing(tmp_path):
  # Two runs of one model that differ only in float32 rounding (as other batch sizes give):
  # per trial a difference of 1e-8 with no spread, whose interval excludes 0 by 1e-8 only.
  # Nothing is marked; a real effect of 0.01 still is.
  values = np.linspace(0.2, 0.7, len(LAYERS)) + np.array([[0.0], [0.001], [0.002]])
  a = write_run(tmp_path / 'a', 'demo', values)
  b = write_run(tmp_path / 'b', 'demo', values + 1e-8 + 1e-10 * np.arange(3)[:, None])
  d = _diff(a, b)
  assert d.over.startswith('Student t')
  assert all(0 < l.low and l.high < 1e-6 for l in d.layers)
  assert not any(l.marked for l in d.layers)
  assert '(0 of 10 layers)' in diff.table(d) and '0.0001 pp of 0' in diff.table(d)
  shifted = values.copy()
  shifted[:, 5] += 0.01 + 1e-4 * np.arange(3)
  c = write_run(tmp_path / 'c', 'demo', shifted)
  assert [l.layer for l in _diff(a, c).layers if l.marked] == [LAYERS[5][0]]


def test_diff_of_two_architectures_is_refused(tmp_path):
  values = np.full((3, len(LAYERS)), 0.5)
  a = write_run(tmp_path / 'a', 'r18', values, arch='resnet18')
  b = write_run(tmp_path / 'b', 'r50', values + 0.1, arch='resnet50')
  result = _cli(['--diff', a, b, f'--out={tmp_path / "out"}'], cwd=tmp_path)
  assert result.returncode != 0
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
  assert 'resnet18' in lines[0] and 'resnet50' in lines[0]
  assert not (tmp_path / 'out' / 'diff.csv').exists()
  # One architecture, or a side whose run.json does not name one: compared.
  same = write_run(tmp_path / 'same', 'r18b', values + 0.1, arch='resnet18')
  unnamed = write_run(tmp_path / 'unnamed', 'r50', values + 0.1)
  for other in (same, unnamed):
    assert all(l.marked for l in _diff(a, other).layers)


def test_diff_of_real_runs_marks_the_perturbed_layer_and_not_the_seed(tmp_path, monkeypatch):
  # Real runs through run.py's engine with per-image values kept (a small linen CNN of
  # tests/factory_models.py on the 7 photos at 32 px, conv, BatchNorm and linear, 3 trials):
  # two seeds differ by their fresh draws only, and no layer is marked; the model with its
  # second BatchNorm's scale perturbed marks that layer, and no layer before it.
  import csv  # pylint: disable=g-import-not-at-top
  import run_config  # pylint: disable=g-import-not-at-top
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  from lc_jax.report import cli  # pylint: disable=g-import-not-at-top
  monkeypatch.syspath_prepend(os.path.dirname(os.path.abspath(__file__)))
  base = ['--config=configs/demo.py', '--config.model.checkpoint=', '--config.model.arch=',
          '--config.data.resize_size=36', '--config.data.crop_size=32',
          '--config.data.batch_size=8', '--config.reset.layer_types=conv,linear,batchnorm',
          '--config.trials=3', '--config.keep_per_image=true', '--quiet',
          f'--config.cache_dir={tmp_path / "cache"}']
  for name, extra in (('seed0', ['--config.model.factory=factory_models:linen_cnn']),
                      ('seed1', ['--config.model.factory=factory_models:linen_cnn',
                                 '--config.seed=1']),
                      ('perturbed', ['--config.model.factory=factory_models:perturbed_cnn'])):
    config, _ = run_config.of(base + extra)
    experiment.run(config, str(tmp_path / name))

  def marked(other):
    cli._diff([str(tmp_path / 'seed0'), str(tmp_path / other)], str(tmp_path / f'diff_{other}'),
              resamples=2000, seed=0)
    with open(tmp_path / f'diff_{other}' / 'diff.csv', newline='') as f:
      rows = list(csv.DictReader(f))
    assert [r['layer'] for r in rows] == ['conv1', 'bn1', 'conv2', 'bn2', 'head']
    for r in rows:  # the figures docs/statistics.md quotes
      print(f'seed0 -> {other}: {r["layer"]:5} {100 * float(r["difference"]):+.2f} pp '
            f'[{100 * float(r["low"]):+.2f}, {100 * float(r["high"]):+.2f}]'
            + (' marked' if r['marked'] == '1' else ''))
    return [r['layer'] for r in rows if r['marked'] == '1']
  assert marked('seed1') == []
  perturbed = marked('perturbed')
  assert 'bn2' in perturbed and not {'conv1', 'bn1', 'conv2'} & set(perturbed), perturbed
