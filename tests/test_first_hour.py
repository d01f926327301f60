"""What a new user meets first: every entry point's --help, and a batch that fits the images."""

import csv
import json
import math
import os
import subprocess
import sys

import jax
import pytest

from lc_jax import schema
from lc_jax.report import cli as report_cli
import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Each entry point, and flags and words its --help must name (its own flags, its verbs).
ENTRY_POINTS = {
    'run.py': (['run.py'], ['--config', '--workdir', '--[no]quiet', '--config.FIELD=VALUE']),
    'converters': (['-m', 'converters'], ['--arch', '--out', '--[no]trust_pickle', '--mean']),
    'zoo': (['-m', 'lc_jax.zoo'], ['list', 'info', 'fetch', 'add', '--category', '--[no]all',
                                   '--[no]offline']),
    'sweep': (['-m', 'lc_jax.sweep'], ['--models', '--workdir', '--config']),
    'report': (['-m', 'lc_jax.report'], ['--out', '--compare', '--top', 'report/']),
    'crossval': (['-m', 'lc_jax.crossval'], ['--out', '--layers', '--tolerance', '--config']),
}
# absl's global flags, listed only by --helpfull.
GLOBAL_FLAGS = ('logtostderr', '--verbosity', 'pdb_post_mortem', 'only_check_args')


@pytest.fixture(scope='module')
def helps():
  """Every entry point's --help, the programs started together (most of their time is imports)."""
  running = {name: subprocess.Popen([sys.executable, *args, '--help'], cwd=ROOT, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (args, _) in ENTRY_POINTS.items()}
  return {name: (p.wait(timeout=300), p.stdout.read(), p.stderr.read())
          for name, p in running.items()}


@pytest.mark.parametrize('name', sorted(ENTRY_POINTS))
def test_help_names_the_entry_points_own_flags_and_exits_0(helps, name):
  status, out, err = helps[name]
  assert status == 0, err
  for word in ENTRY_POINTS[name][1]:
    assert word in out, f'{name} --help does not name {word}:\n{out}'
  for flag in GLOBAL_FLAGS:
    assert flag not in out, f'{name} --help lists absl\'s {flag}'
  assert '--helpfull' in out and 'Try --helpfull' not in out
  # The usage comes first: the entry point's docstring, not the one line of a thin __main__.py.
  assert not out.startswith('Entry point')


def test_crossval_help_leaves_out_the_flags_of_the_modules_it_imports(helps):
  # converters.parity is a program too; imported as a library it defines no flags.
  assert '--photos' not in helps['crossval'][1] and '--arch' not in helps['crossval'][1]


def test_helpfull_lists_absls_flags_and_exits_0():
  result = subprocess.run([sys.executable, '-m', 'lc_jax.report', '--helpfull'], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert '--out' in result.stdout and '--[no]logtostderr' in result.stdout


def test_the_reports_figures_go_to_a_named_folder_by_default(tmp_path):
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'results.csv').write_text('')
  assert report_cli.default_out(str(tmp_path / 'run')) == str(tmp_path / 'run' / 'report')
  assert (report_cli.default_out(str(tmp_path / 'run' / 'results.csv'))
          == str(tmp_path / 'run' / 'report'))
  assert report_cli.default_out('results.csv') == os.path.join('.', 'report')


# ------------------------------------------------------------------------ batches that fit ---


def _paper_run(workdir, cache, batch_size, monkeypatch, capfd):
  """configs/paper.py on the 7 bundled photos at 32 px, two layers: (rows of results.csv, the
  global batches of the chunks that ran, stderr)."""
  from lc_jax import data  # pylint: disable=g-import-not-at-top
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  from lc_jax.data import loader  # pylint: disable=g-import-not-at-top
  args = ['--config=configs/paper.py', f'--workdir={workdir}', '--config.data.source=photos',
          '--config.data.num_images=0', '--config.data.order=sorted',
          '--config.data.resize_size=37', '--config.data.crop_size=32',
          '--config.model.checkpoint=bundled:efficientnet_lite0', '--config.reset.layers=first:2',
          f'--config.data.batch_size={batch_size}', f'--config.cache_dir={cache}']
  used = []
  chunks = loader.chunks  # what data.chunks is, unpatched

  def recorded(images, labels, info, rows):
    for pieces in chunks(images, labels, info, rows):
      used.append(sum(len(x) for x, _, _ in pieces))
      yield pieces
  monkeypatch.setattr(data, 'chunks', recorded)
  capfd.readouterr()
  experiment.run(*run_config.of(args))
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  return rows, used, capfd.readouterr().err


def test_fewer_images_than_the_batch_run_as_one_batch_of_them_with_the_same_rows(
    tmp_path, monkeypatch, capfd):
  fitted = -(-7 // jax.local_device_count()) * jax.local_device_count()  # 7 images, on devices
  runs = {}
  for batch_size in (500, 8, 4):
    runs[batch_size] = _paper_run(tmp_path / f'b{batch_size}', tmp_path / 'cache', batch_size,
                                  monkeypatch, capfd)
  for batch_size in (500, 8):  # every pass over the images: one batch of the 7, not 500 rows
    rows, used, err = runs[batch_size]
    assert set(used) == {fitted}, used
    assert f'7 images: one batch of {fitted}, not {batch_size} (data.batch_size)' in err
  # Batches of 4 (the second padded) as the reference: a batch's size changes no number.
  assert set(runs[4][1]) == {4} and 'one batch of' not in runs[4][2]
  reference = runs[4][0]
  assert len(reference) == 1 + 3 * 2  # the original, then 3 trials of 2 layers
  for batch_size in (500, 8):
    rows = runs[batch_size][0]
    assert len(rows) == len(reference)
    largest = 0.0
    for a, b in zip(rows, reference):
      assert (a['layer'], a['trial'], a['num_images']) == (b['layer'], b['trial'], '7')
      for column in schema.METRICS:
        x, y = float(a[column] or 'nan'), float(b[column] or 'nan')
        assert (math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6)
                or (math.isnan(x) and math.isnan(y))), (batch_size, a['layer'], column, x, y)
        largest = max(largest, abs(x - y) / max(1.0, abs(y)) if x == x else 0.0)
    print(f'batch_size={batch_size} vs batches of 4: largest metric difference {largest:.2g}; '
          f"criticality {[round(float(r['criticality']), 4) for r in rows]}")
  # The run's identity keeps the batch asked for: resuming the batch-500 run is the same run.
  with open(tmp_path / 'b500' / 'run.json') as f:
    assert json.load(f)['config']['data']['batch_size'] == 500


@pytest.mark.parametrize('num_images,batch_size,hosts,fitted', [
    (7, 500, 1, 7), (7, 8, 1, 7), (7, 7, 1, 7), (7, 4, 1, 4), (10000, 500, 1, 500),
    (7, 500, 2, 8), (7, 500, 4, 8), (1, 500, 2, 2), (500, 500, 4, 500)])
def test_fitted_batch_size(num_images, batch_size, hosts, fitted):
  from lc_jax.data import loader  # pylint: disable=g-import-not-at-top
  assert loader.fitted_batch_size(num_images, batch_size, hosts) == fitted
