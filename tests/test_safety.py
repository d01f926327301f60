"""Safety of a run: one writer per workdir, caches that never serve stale pixels or a damaged
model, rows tied to their run, checks before anything is written, one line for bad input.

The runs use the bundled EfficientNet-Lite0 (real weights) on scikit-image's photos, at 64 px
and two layers, so that each takes seconds; its weights are written once as a .safetensors file,
which a run reads without torch (the bundled file is a legacy torch pickle: torch.load, and
seconds of importing torch, in every run that converts it). A run whose command line is not what
is tested (a set-up, a run whose results are checked) runs in the test's own process.
"""

import contextlib
import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from lc_jax import data
from lc_jax import metrics
from lc_jax import schema
import processes
import run_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ('--config.data.resize_size=72', '--config.data.crop_size=64',
         '--config.reset.layer_types=conv,linear', '--config.reset.layers=first:2',
         '--config.trials=1')
_WEIGHTS = []  # the checkpoint flag of every run, set once by the `weights` fixture


@pytest.fixture(scope='module', autouse=True)
def weights(tmp_path_factory):
  """The bundled EfficientNet-Lite0's tensors as efficientnet_lite0.safetensors (the same model
  id); without torch, the runs take the bundled file itself."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  except ImportError:
    checkpoint = 'bundled:efficientnet_lite0'
  else:
    from converters import reader  # pylint: disable=g-import-not-at-top
    state = torch.load(reader.resolve('bundled:efficientnet_lite0'), map_location='cpu',
                       weights_only=True)
    checkpoint = str(tmp_path_factory.mktemp('weights') / 'efficientnet_lite0.safetensors')
    save_file({k: v.numpy() for k, v in state.items()}, checkpoint)
  _WEIGHTS[:] = [f'--config.model.checkpoint={checkpoint}']
  yield checkpoint
  _WEIGHTS.clear()


def _args(workdir, cache, *extra):
  files = [e for e in extra if e.startswith('--config=')]  # before any --config.a.b override
  return [sys.executable, os.path.join(ROOT, 'run.py'), *files, f'--workdir={workdir}',
          f'--config.cache_dir={cache}', *_WEIGHTS, *SMALL,
          *[e for e in extra if e not in files]]


def _run(*args, cwd=ROOT):
  return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, check=False)


def _run_here(*args):
  """The run of `python run.py *args` in this process (tests/run_config.py), for a run whose
  results a test needs rather than its command line; returns its rows."""
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  return experiment.run(*run_config.of(args))


@contextlib.contextmanager
def _sigint_not_ignored():
  """Children started inside do not inherit an ignored SIGINT. A test process started in the
  background of a shell without job control ignores SIGINT, and a child Python keeps that (no
  KeyboardInterrupt), which failed the Ctrl-C test whatever run.py does; a handled signal is
  the default again after exec."""
  previous = signal.getsignal(signal.SIGINT)
  if previous == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    yield
  finally:
    if previous == signal.SIG_IGN:
      signal.signal(signal.SIGINT, previous)


def _one_error_line(result):
  lines = result.stderr.strip().splitlines()
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert lines and lines[-1].startswith('error: '), result.stderr[-3000:]
  assert sum(line.startswith('error: ') for line in lines) == 1
  return lines[-1]


def _rows(workdir):
  with open(os.path.join(workdir, schema.RESULTS), newline='') as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def finished(tmp_path_factory, weights):
  """A finished small run: (workdir, cache, results.csv bytes). It compiles its programs into
  an empty compilation cache of its own, programs/ next to the workdir (its stderr, saying so,
  is in stderr.txt there): the first process of test_a_second_process_reads_its_programs_..."""
  del weights  # in every run's arguments
  root = tmp_path_factory.mktemp('finished')
  result = _run(*_args(root / 'run', root / 'cache',
                       f'--config.compilation_cache_dir={root / "programs"}'))
  assert result.returncode == 0, result.stderr
  (root / 'stderr.txt').write_text(result.stderr)
  return root / 'run', root / 'cache', (root / 'run' / schema.RESULTS).read_bytes()


# ------------------------------------------------------------------------- one writer ---------


def test_second_run_on_a_busy_workdir_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
  workdir, cache = tmp_path / 'run', tmp_path / 'cache'
  slow = ('--config.data.batch_size=1', '--config.trials=3', '--config.reset.layers=first:8',
          '--quiet')
  first = subprocess.Popen(_args(workdir, cache, *slow), cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    # Frozen once it has written rows: it holds the lock, unfinished, while the second starts.
    assert processes.freeze_when(lambda: (workdir / schema.RESULTS).exists(), first)
    second = _run(*_args(workdir, cache, *slow))
    line = _one_error_line(second)
    print(line)
    assert second.returncode == 1
    assert f'is in use by another run (pid {first.pid} on ' in line and 'started 20' in line
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  # The kernel dropped the lock with the process: the same command resumes, and every row is
  # there once.
  resumed = _run(*_args(workdir, cache, *slow))
  assert resumed.returncode == 0, resumed.stderr
  keys = [(r['layer'], r['trial']) for r in _rows(workdir)]
  assert len(keys) == len(set(keys)) == 1 + 3 * 8


@pytest.fixture(scope='module')
def raced(tmp_path_factory, weights):
  """Two runs at batch size 1 started at once on one empty workdir: (workdir, [exit status],
  [(stdout, stderr)]). The winner's run is also the uninterrupted run of the Ctrl-C test."""
  del weights  # in every run's arguments
  workdir, cache = tmp_path_factory.mktemp('raced') / 'run', tmp_path_factory.mktemp('cache')
  processes = [subprocess.Popen(_args(workdir, cache, '--config.data.batch_size=1', '--quiet'),
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  return workdir, [p.returncode for p in processes], outputs


def test_two_runs_started_at_once_on_an_empty_workdir_give_one_run(raced):
  workdir, returncodes, outputs = raced
  codes = sorted(returncodes)
  assert codes == [0, 1], outputs
  loser = outputs[returncodes.index(1)][1]
  assert 'Traceback' not in loser and loser.strip().splitlines()[-1].startswith(
      f'error: {workdir} is in use by another run (pid ')
  keys = [(r['layer'], r['trial']) for r in _rows(workdir)]
  assert len(keys) == len(set(keys)) == 1 + 2
  assert not [n for n in os.listdir(workdir) if n.endswith('.partial')]


# ------------------------------------------------------------------------- caches -------------


def _photo(path, seed, size=(40, 30)):
  pixels = np.random.RandomState(seed).randint(0, 256, (*size[::-1], 3), np.uint8)
  Image.fromarray(pixels).save(path, format='PPM')  # uncompressed: the size is the same


def test_a_changed_image_of_the_same_byte_size_is_decoded_again(tmp_path, monkeypatch):
  root = tmp_path / 'images'
  for label in ('a', 'b'):
    (root / label).mkdir(parents=True)
    for i in range(2):
      _photo(root / label / f'{i}.ppm', seed=ord(label) * 10 + i)
  config = data.DataConfig(path=str(root), num_images=0, order='sorted', batch_size=4,
                           resize_size=32, crop_size=32)
  cache = str(tmp_path / 'cache')
  before, _, first = data.load(config, cache_dir=cache, progress=False)
  before = np.array(before)
  assert not first.cache_hit

  # Checking an unchanged entry reads bytes, never decodes.
  from lc_jax.data import loader  # pylint: disable=g-import-not-at-top
  decode = loader._decode
  monkeypatch.setattr(loader, '_decode', lambda *a, **k: pytest.fail('decoded a cache hit'))
  _, _, again = data.load(config, cache_dir=cache, progress=False)
  assert again.cache_hit and again.content == first.content

  size = os.path.getsize(root / 'b' / '1.ppm')
  _photo(root / 'b' / '1.ppm', seed=999)
  assert os.path.getsize(root / 'b' / '1.ppm') == size
  monkeypatch.setattr(loader, '_decode', decode)
  images, _, changed = data.load(config, cache_dir=cache, progress=False)
  assert not changed.cache_hit and changed.content != first.content
  assert changed.fingerprint == first.fingerprint  # same names and sizes: only bytes tell
  np.testing.assert_array_equal(images[:3], before[:3])
  assert not np.array_equal(images[3], before[3])
  want = data.Transform(32, 32)(data.load_rgb(str(root / 'b' / '1.ppm')))
  np.testing.assert_array_equal(images[3], want)


def test_a_run_on_changed_images_refuses_the_workdir_of_the_old_ones(tmp_path):
  root = tmp_path / 'images'
  for label in ('a', 'b'):
    (root / label).mkdir(parents=True)
    _photo(root / label / '0.ppm', seed=ord(label), size=(80, 80))
  args = ('--config.data.source=imagefolder', f'--config.data.path={root}',
          '--config.data.num_images=0', '--config.data.order=sorted', '--quiet')
  _run_here(*_args(tmp_path / 'run', tmp_path / 'cache', *args))  # the first run, in-process
  _photo(root / 'b' / '0.ppm', seed=7, size=(80, 80))
  again = _run(*_args(tmp_path / 'run', tmp_path / 'cache', *args))
  assert again.returncode == 1
  assert 'holds a run of another configuration (images.content:' in _one_error_line(again)


def _damage(model_dir):
  files = [os.path.join(d, f) for d, _, fs in os.walk(model_dir / 'variables') for f in fs]
  largest = max(files, key=os.path.getsize)
  with open(largest, 'r+b') as f:
    f.seek(os.path.getsize(largest) // 2)
    f.write(b'\xff' * 64)
  return largest


def test_a_damaged_converted_model_is_converted_again(finished, tmp_path, capsys):
  workdir, cache, before = finished
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  os.remove(copy / schema.RESULTS)  # the rows are redone from the model
  _damage(copy / 'model')
  _run_here(*_args(copy, cache))
  assert 'was damaged; converting the checkpoint again' in capsys.readouterr().err
  assert (copy / schema.RESULTS).read_bytes() == before


# ------------------------------------------------------------------------- identity -----------


def test_rows_of_another_run_are_refused_when_run_json_is_gone(finished, tmp_path):
  workdir, cache, before = finished
  copy = tmp_path / 'run'
  shutil.copytree(workdir, copy)
  os.remove(copy / schema.RUN)
  other = _run(*_args(copy, cache, '--config.seed=1'))
  assert other.returncode == 1
  assert 'holds rows of another run (run_id ' in _one_error_line(other)
  assert not (copy / schema.RUN).exists() and (copy / schema.RESULTS).read_bytes() == before
  _run_here(*_args(copy, cache))  # the same run (in-process)
  assert (copy / schema.RESULTS).read_bytes() == before  # adopted, nothing recomputed
  with open(copy / schema.RUN) as f:
    assert json.load(f)['run_id'] == _rows(copy)[0]['run_id']


def test_a_changed_checkpoint_at_the_same_path_refuses_the_workdir(weights, tmp_path):
  if not weights.endswith('.safetensors'):
    pytest.skip('needs torch to write the weights as .safetensors')
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from lc_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  checkpoint = tmp_path / 'weights.safetensors'
  shutil.copyfile(weights, checkpoint)
  args = [f'--config.model.checkpoint={checkpoint}' if a.startswith('--config.model.checkpoint=')
          else a for a in _args(tmp_path / 'run', tmp_path / 'cache', '--quiet')]
  _run_here(*args)
  before = (tmp_path / 'run' / schema.RESULTS).read_bytes()
  # One tensor changed, the file's size and modification time kept: only its bytes tell.
  stat = os.stat(checkpoint)
  tensors = load_file(checkpoint)
  name = next(k for k in sorted(tensors) if k.endswith('.weight'))
  tensors[name] = (tensors[name] * 1.01).astype(tensors[name].dtype)
  save_file(tensors, str(checkpoint))
  os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
  assert os.path.getsize(checkpoint) == stat.st_size
  with pytest.raises(UserError,
                     match=r'holds a run of another configuration \(checkpoint_sha256: '):
    _run_here(*args)
  assert (tmp_path / 'run' / schema.RESULTS).read_bytes() == before


# ------------------------------------------------------------------------- bad input ----------


def _bad_workdir(kind, tmp_path, finished):
  """A workdir for each case, and whether it holds the finished run's rows."""
  (tmp_path / 'afile').write_text('x')
  if kind == 'file':
    return tmp_path / 'afile', False
  if kind == 'under_a_file':
    return tmp_path / 'afile' / 'run', False
  if kind == 'new':
    return tmp_path / 'new', False
  copy = tmp_path / 'run'
  shutil.copytree(finished[0], copy)
  if kind == 'malformed_row':
    lines = (copy / schema.RESULTS).read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace(',1.0,', ',one,', 1)
    (copy / schema.RESULTS).write_text(''.join(lines))
  return copy, True


BAD_INPUT = [
    # name, workdir, extra flags, expected fragment
    ('misspelt config key', 'new', ['--config.reset.mdoe=zero'],
     "unknown config key 'reset.mdoe' (did you mean reset.mode?)"),
    ('misspelt nested key', 'new', ['--config.data.batchsize=2'],
     "unknown config key 'data.batchsize' (did you mean data.batch_size?)"),
    ('workdir is a file', 'file', [], 'is a file, not a folder'),
    ('workdir under a file', 'under_a_file', [], 'cannot create the --workdir folder'),
    ('cache folder under a file', 'new', ['--config.cache_dir={tmp}/afile/cache'],
     'afile is a file, not a folder'),
    ('malformed middle row', 'malformed_row', [], 'line 2: could not convert'),
    ('missing config file', 'new', ['--config=configs/nope.py'],
     'config file not found: configs/nope.py'),
    ('bad matmul_precision', 'new', ['--config.matmul_precision=bogus'],
     "unknown matmul_precision 'bogus'"),
    ('no trials', 'finished', ['--config.trials=0'], 'trials=0: give a positive number'),
    ('alpha outside [0, 1]', 'finished', ['--config.reset.mode=interpolate',
                                          '--config.reset.alpha=1.5'], 'must lie in [0, 1]'),
    ('alpha in a mode that does not interpolate', 'finished', ['--config.reset.alpha=0.5'],
     'reset.alpha=0.5 applies to mode interpolate only'),
    ('init_checkpoint in a mode that does not read it', 'finished',
     ['--config.reset.init_checkpoint=other.pth'],
     'reset.init_checkpoint applies to reset.mode=checkpoint only'),
    ('a folder with the bundled photos', 'finished', ['--config.data.path={tmp}'],
     'is not read: data.source=photos'),
    ('empty layer types', 'finished', ['--config.reset.layer_types='],
     'reset.layer_types is empty'),
    ('no checkpoint set', 'new', ['--config.model.checkpoint='], 'no checkpoint is set'),
    ('checkpoint is a folder', 'new', ['--config.model.checkpoint={tmp}'], 'is a folder'),
    ('batch size zero', 'finished', ['--config.data.batch_size=0'],
     'data.batch_size must be a positive integer'),
    ('unknown architecture', 'new', ['--config.model.arch=resnet5'], 'did you mean resnet50'),
    ('a layer-list item matching nothing', 'new', ['--config.reset.layers=conv_stem,blocks.9.*'],
     "item 'blocks.9.*'"),
]


@pytest.mark.parametrize('name,kind,extra,fragment', BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_ends_in_one_line_and_touches_nothing(finished, tmp_path, name, kind, extra,
                                                        fragment):
  workdir, holds_rows = _bad_workdir(kind, tmp_path, finished)
  before = (workdir / schema.RESULTS).read_bytes() if holds_rows else None
  listing = sorted(os.listdir(workdir)) if holds_rows else None
  extra = [e.replace('{tmp}', str(tmp_path)) for e in extra]
  # SMALL's layer pattern comes first: a case's own pattern overrides it.
  result = _run(*_args(workdir, finished[1], *extra))
  line = _one_error_line(result)
  print(f'{name}: {line}')
  assert result.returncode == 1 and fragment in line, line
  if holds_rows:
    assert (workdir / schema.RESULTS).read_bytes() == before
    assert sorted(os.listdir(workdir)) == listing
  elif kind == 'new':
    assert not workdir.exists() or not (workdir / schema.RESULTS).exists()


def test_settings_are_checked_before_the_workdir_exists(finished, tmp_path):
  for extra in (['--config.trials=0'], ['--config.reset.alpha=-1'],
                ['--config.matmul_precision=bogus'], ['--config.spread_resets=3']):
    result = _run(*_args(tmp_path / 'new', finished[1], *extra))
    assert result.returncode == 1, extra
    assert not (tmp_path / 'new').exists(), extra
  # The corrected command is never refused because a wrong one ran first.
  good = _run(*_args(tmp_path / 'new', finished[1], '--quiet'))
  assert good.returncode == 0, good.stderr
  assert (tmp_path / 'new' / schema.RESULTS).read_bytes() == finished[2]


def test_run_py_finds_its_default_config_from_another_folder(finished, tmp_path):
  # The finished run's workdir without its rows: run.json holds the demo config (another config
  # would be refused) and the converted model is reused, so the rows are computed again and
  # nothing is converted.
  shutil.copytree(finished[0], tmp_path / 'run')
  os.remove(tmp_path / 'run' / schema.RESULTS)
  result = _run(*_args(tmp_path / 'run', finished[1], '--quiet'), cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert (tmp_path / 'run' / schema.RESULTS).read_bytes() == finished[2]


def test_ctrl_c_ends_in_one_line_and_the_run_resumes_to_the_same_file(finished, raced,
                                                                     tmp_path):
  workdir = tmp_path / 'run'
  with _sigint_not_ignored():
    process = subprocess.Popen(_args(workdir, finished[1], '--config.data.batch_size=1'),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
  # Frozen while partial.json is there (it goes when the run ends): the run is unfinished when
  # Ctrl-C arrives.
  assert processes.freeze_when(lambda: (workdir / schema.PARTIAL).exists(), process)
  processes.signal_frozen(process, signal.SIGINT)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 130, stderr[-2000:]
  assert stderr.strip().splitlines()[-1] == (
      'error: interrupted; run the same command to resume')
  assert 'Traceback' not in stderr
  resumed = _run(*_args(workdir, finished[1], '--config.data.batch_size=1'))
  assert resumed.returncode == 0, resumed.stderr
  # Batch size is measured (it sets the reference's batches): compare with a whole run of it,
  # the run that won the race of two (the same command; --quiet and the cache folder change
  # nothing measured).
  whole, returncodes, outputs = raced
  assert 0 in returncodes, outputs
  assert (workdir / schema.RESULTS).read_bytes() == (whole / schema.RESULTS).read_bytes()


def test_folders_that_cannot_be_written_end_in_one_line(tmp_path, monkeypatch):
  # Root writes anywhere, so permissions are simulated: what the OS says is turned into one line.
  from lc_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from lc_jax.data import cache  # pylint: disable=g-import-not-at-top
  from lc_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  denied = PermissionError(13, 'Permission denied')

  def refuse(*args, **kwargs):
    raise denied
  monkeypatch.setattr(np.lib.format, 'open_memmap', refuse)
  with pytest.raises(UserError, match='cannot write to the image cache folder .*: Permission '
                                      'denied; set cache_dir'):
    with cache.write(str(tmp_path / 'cache'), 'entry', (1, 2, 2, 3)):
      pass
  assert not [n for n in os.listdir(tmp_path / 'cache')]
  monkeypatch.setattr(os, 'access', lambda *a: False)
  with pytest.raises(UserError, match='cannot write to the --workdir folder .*permission denied'):
    workdir_lib.Lock(str(tmp_path / 'run'))


# ------------------------------------------------------------------------- counts -------------


def test_skipped_images_are_not_counted_and_are_listed(tmp_path):
  root = tmp_path / 'images'
  for label in ('a', 'b'):
    (root / label).mkdir(parents=True)
    for i in range(2):
      _photo(root / label / f'{i}.ppm', seed=ord(label) + i, size=(80, 80))
  (root / 'b' / '2.jpg').write_bytes(b'not a jpeg')
  args = ('--config.data.source=imagefolder', f'--config.data.path={root}',
          '--config.data.num_images=0', '--config.data.order=sorted',
          '--config.data.on_error=skip', '--quiet')
  _run_here(*_args(tmp_path / 'run', tmp_path / 'cache', *args))
  assert {r['num_images'] for r in _rows(tmp_path / 'run')} == {'4'}
  with open(tmp_path / 'run' / schema.RUN) as f:
    run = json.load(f)
  assert run['num_images'] == 5 and len(run['skipped_images']) == 1
  assert 'b/2.jpg' in run['skipped_images'][0]


@pytest.mark.parametrize('batch', [1, 2, 3])
def test_the_original_row_is_exactly_zero_at_any_batch_size(batch):
  rng = np.random.RandomState(batch)
  logits = rng.randn(batch, 1000).astype(np.float32) * 4
  values = metrics.per_image(logits, None, np.full(batch, -1, np.int32), np.ones(batch, bool))
  total = metrics.finalize(metrics.accumulate(None, values), False)
  assert total['criticality'] == 0.0 and total['pred_cos_sim'] == 1.0
  assert total['pred_kl_div'] == 0.0 and total['pred_l2_err'] == 0.0
  assert total['pred_agreement'] == 1.0 and total['criticality_ci_images'] == 0.0


def test_a_second_process_reads_its_programs_from_the_compilation_cache(finished, tmp_path):
  # The first process is `finished`'s run, on an empty compilation cache of its own.
  first = (finished[0].parent / 'stderr.txt').read_text()
  second = _run(*_args(tmp_path / 'second', finished[1],
                       f'--config.compilation_cache_dir={finished[0].parent / "programs"}'))
  assert second.returncode == 0, second.stderr
  counts = []
  for name, stderr in (('first', first), ('second', second.stderr)):
    # Off a terminal progress lines come through absl logging (a prefix before the text).
    line = [l[l.index('compiled '):] for l in stderr.splitlines()
            if re.search(r'(^|\] )compiled \d+ programs', l)][-1]
    print(f'{name}: {line}')
    counts.append(line)
  assert not counts[0].startswith('compiled 0 ')
  assert counts[1].startswith('compiled 0 programs') and 'read from the compilation cache' in counts[1]
  assert (tmp_path / 'second' / schema.RESULTS).read_bytes() == finished[2]


def test_a_pickled_checkpoint_names_run_pys_own_opt_in(tmp_path):
  torch = pytest.importorskip('torch')
  import argparse  # pylint: disable=g-import-not-at-top
  state = {'conv.weight': torch.zeros(2, 3, 1, 1)}
  torch.save({'state_dict': state, 'args': argparse.Namespace(lr=0.1)}, tmp_path / 'old.pth')
  result = _run(*_args(tmp_path / 'run', tmp_path / 'cache',
                       f'--config.model.checkpoint={tmp_path / "old.pth"}'))
  line = _one_error_line(result)
  assert result.returncode == 1 and '--config.model.trust_pickle=true for run.py' in line, line
