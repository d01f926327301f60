"""What a new user meets first: every entry point's --help, and a batch that fits the images."""

import os
import subprocess
import sys

import pytest

from lc_jax.report import cli as report_cli

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
