"""Files a run reads are checked, never trusted as they stand: image folders with link loops,
16-bit images, the decoded-image cache, partial.json, results.csv's rows, and workdir files that
are symbolic links. Each test builds its few files by hand and runs in a second or two, without a
model, except the last, which runs run.py up to its refusal."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from lc_jax import data
from lc_jax import results
from lc_jax import schema
from lc_jax import workdir as workdir_lib
from lc_jax.data import cache
from lc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(path, seed, size=32):
  pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), np.uint8)
  Image.fromarray(pixels).save(path)


def _folder(root, images=2):
  for label in range(2):
    (root / f'class{label}').mkdir(parents=True)
    for i in range(images):
      _image(root / f'class{label}' / f'{i}.png', seed=10 * label + i)
  return root


def _config(root, **changes):
  return data.DataConfig(**{'path': str(root), 'num_images': 0, 'order': 'sorted',
                            'batch_size': 4, 'resize_size': 32, 'crop_size': 32, **changes})


# ------------------------------------------------------------------------- images ---------------


def test_imagefolder_symlink_loop(tmp_path, caplog):
  root = _folder(tmp_path / 'images', images=1)
  os.symlink('..', root / 'class0' / 'up')  # back to the root: class0 and class1 again, forever
  os.symlink('.', root / 'class1' / 'here')
  (tmp_path / 'elsewhere').mkdir()
  _image(tmp_path / 'elsewhere' / 'x.png', seed=5)
  os.symlink(tmp_path / 'elsewhere', root / 'class1' / 'more')  # a link, not a loop
  with caplog.at_level(logging.WARNING):
    listing = data.ImageFolder(str(root)).listing
  assert listing.keys == ['class0/0.png', 'class1/0.png', 'class1/more/x.png']
  assert listing.labels.tolist() == [0, 1, 1]
  assert listing.loops == ['class0/up', 'class1/here']
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 1 and len(warnings[0]) < 300, warnings
  assert 'left out 2 link(s)' in warnings[0] and 'class0/up' in warnings[0]


def test_16bit_png(tmp_path):
  root = _folder(tmp_path / 'images', images=1)
  ramp = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
  Image.fromarray(ramp).save(root / 'class0' / 'deep.png')
  assert Image.open(root / 'class0' / 'deep.png').mode == 'I;16'
  images, _, info = data.load(_config(root), cache_dir=str(tmp_path / 'cache'), progress=False)
  row = info.keys.index('class0/deep.png')
  want = np.round(ramp / 257).astype(np.uint8)
  for channel in range(3):
    np.testing.assert_array_equal(images[row][..., channel], want)

  # Integers or floats of an unknown range are refused (a decode failure), not clipped.
  Image.fromarray(ramp.astype(np.float32)).save(root / 'class1' / 'float.tif')
  with pytest.raises(UserError, match=r'cannot decode .*float\.tif .*PIL mode F'):
    data.load(_config(root), cache_dir=str(tmp_path / 'cache'), progress=False)


def test_image_cache_edited_is_rebuilt(tmp_path, capsys):
  root = _folder(tmp_path / 'images')
  cache_dir = str(tmp_path / 'cache')
  first, _, info = data.load(_config(root), cache_dir=cache_dir, progress=False)
  first = np.array(first)
  edited = np.load(info.cache_path, mmap_mode='r+')
  edited[:, :16] = 0  # half of every image
  edited.flush()
  del edited
  capsys.readouterr()
  again, _, info = data.load(_config(root), cache_dir=cache_dir, progress=False)
  assert not info.cache_hit
  np.testing.assert_array_equal(again, first)
  lines = capsys.readouterr().err.strip().splitlines()
  assert lines == [f'image cache entry {info.cache_path} does not match the digest of its '
                   'pixels; decoding the images again'], lines
  # The entry made again is trusted again.
  _, _, third = data.load(_config(root), cache_dir=cache_dir, progress=False)
  assert third.cache_hit

  # An entry without a digest of its pixels is decoded again too.
  with open(info.cache_path[:-len('.npy')] + '.json') as f:
    meta = json.load(f)
  del meta['pixels_sha256']
  with open(info.cache_path[:-len('.npy')] + '.json', 'w') as f:
    json.dump(meta, f)
  assert cache.damage(np.load(info.cache_path, mmap_mode='r'), meta, 'x') is not None
  _, _, fourth = data.load(_config(root), cache_dir=cache_dir, progress=False)
  assert not fourth.cache_hit


# ------------------------------------------------------------------------- partial.json ---------

_RUN = {'config': {'seed': 0}, 'checkpoint_sha256': 'ab', 'images': {'content': 'cd'},
        'targets': ['conv_stem']}
_FIELDS = ('count', 'crit')
_SUMS = {'0/conv_stem': {'count': 4.0, 'crit': 3.6695999999999995}}


def _saved(workdir):
  store = results.Store(str(workdir), _RUN)
  store.save_partial(1, _SUMS)
  store.close()
  assert results.Store(str(workdir), _RUN).load_partial(list(_SUMS), 3, _FIELDS) == (1, _SUMS)
  with open(workdir / schema.PARTIAL) as f:
    return json.load(f)


def _edit(workdir, state):
  with open(workdir / schema.PARTIAL, 'w') as f:
    json.dump(state, f)
  return results.Store(str(workdir), _RUN).load_partial(list(_SUMS), 3, _FIELDS)


def test_partial_json_edited_sums_not_adopted(tmp_path, caplog):
  state = _saved(tmp_path)
  state['sums']['0/conv_stem']['crit'] = 3.1056
  with caplog.at_level(logging.WARNING):
    assert _edit(tmp_path, state) == (0, {})  # the rows start over from the first batch
  assert any('does not match the digest it was saved with' in r.getMessage()
             for r in caplog.records)


def test_partial_batches_done_edited(tmp_path):
  state = _saved(tmp_path)
  state['batches_done'] = 2
  assert _edit(tmp_path, state) == (0, {})
  del state['sha256']  # a file without its digest is not adopted either
  state['batches_done'] = 1
  assert _edit(tmp_path, state) == (0, {})


def test_partial_sums_of_another_run_are_not_adopted(tmp_path):
  # A run killed before its first row leaves partial.json alone to say whose sums they are
  # (run.json gone, no rows): another run's sums, of the very keys, start over.
  _saved(tmp_path)
  os.remove(tmp_path / schema.RUN)
  other = {**_RUN, 'config': {'seed': 1}}
  assert results.Store(str(tmp_path), other).load_partial(list(_SUMS), 3, _FIELDS) == (0, {})


# ------------------------------------------------------------------------- results.csv ----------


def _row(criticality, layer='bn1'):
  return {**{c: 0 for c in schema.COLUMNS}, 'model_id': 'm', 'layer': layer, 'trial': 0,
          'mode': 'reinit', 'kind': 'norm', 'stage': 'stem', 'num_params': 128, 'num_images': 7,
          **{m: 0.5 for m in schema.METRICS}, 'criticality': criticality}


def test_conflicting_duplicate_rows_refused(tmp_path):
  store = results.Store(str(tmp_path), _RUN)
  store.append(_row(0.522))
  store.append(_row(0.7, layer='conv1'))
  store.close()
  path = tmp_path / schema.RESULTS
  with open(path, 'a') as f:
    f.write(schema.format_row({**_row(-2.1), 'run_id': schema.run_id(_RUN)}))
  with pytest.raises(UserError) as refused:
    results.Store(str(tmp_path), _RUN)
  assert str(refused.value) == (
      f'{path}, lines 2 and 4: trial 0 of layer bn1 twice, with different values; the file was '
      'edited or damaged: remove the wrong line (or both: the run redoes it), or use a new '
      '--workdir')


def test_results_without_the_dataset_column_resume_with_it(tmp_path):
  # A workdir of a version without the dataset column: its rows are kept, and the first row
  # this run appends gives them its dataset, in one rewrite of the file.
  store = results.Store(str(tmp_path), _RUN)
  store.append({**_row(0.522), 'dataset': 'imagenet_r'})
  store.append({**_row(0.7, layer='conv1'), 'dataset': 'imagenet_r'})
  store.close()
  path = tmp_path / schema.RESULTS
  new = path.read_text()
  old = ''.join(','.join(cells[:1] + cells[2:]) + '\n' for cells in
                (line.split(',') for line in new.splitlines()))
  assert old.startswith(','.join(schema.WITHOUT_DATASET) + '\n') and 'imagenet_r' not in old
  path.write_text(''.join(old.splitlines(keepends=True)[:2]))  # header and bn1
  store = results.Store(str(tmp_path), _RUN)
  assert store.done(0, 'bn1') and not store.done(0, 'conv1')
  assert store.rows[0]['dataset'] == ''
  store.append({**_row(0.7, layer='conv1'), 'dataset': 'imagenet_r'})
  store.close()
  assert path.read_text() == new  # as an uninterrupted run of this version writes it
  assert results.Store(str(tmp_path), _RUN).rows == store.rows


def test_a_row_is_written_and_fsynced_before_append_returns(tmp_path, monkeypatch):
  # What the file holds at each fsync, read through a file of its own (not the store's buffer).
  store = results.Store(str(tmp_path), _RUN)
  path = tmp_path / schema.RESULTS
  seen = []
  fsync = os.fsync
  monkeypatch.setattr(os, 'fsync', lambda fd: (fsync(fd), seen.append(path.read_text()))[0])
  store.append(_row(0.522))
  line = schema.format_row({**_row(0.522), 'run_id': schema.run_id(_RUN)})
  assert path.read_text() == schema.header() + line  # store still open
  assert seen and seen[-1].endswith(line), 'no fsync after the row was written'
  store.close()


def test_a_half_written_last_row_is_cut_off_and_the_next_row_starts_a_line(tmp_path):
  store = results.Store(str(tmp_path), _RUN)
  store.append(_row(0.522))
  store.close()
  path = tmp_path / schema.RESULTS
  whole = path.read_text()
  half = schema.format_row({**_row(0.7, layer='conv1'), 'run_id': schema.run_id(_RUN)})[:40]
  with open(path, 'a') as f:
    f.write(half)  # as a kill in the middle of a write leaves it
  store = results.Store(str(tmp_path), _RUN)
  assert path.read_text() == whole  # cut off in place, before anything is appended
  assert [r['layer'] for r in store.rows] == ['bn1'] and not store.done(0, 'conv1')
  store.append(_row(0.7, layer='conv1'))
  store.close()
  line = schema.format_row({**_row(0.7, layer='conv1'), 'run_id': schema.run_id(_RUN)})
  assert path.read_text() == whole + line
  assert [r['layer'] for r in results.Store(str(tmp_path), _RUN).rows] == ['bn1', 'conv1']


_OTHER = {'config': {'seed': 1}, 'checkpoint_sha256': 'ef', 'images': {'content': '01'},
          'targets': ['conv_head']}


@pytest.mark.parametrize('entry', schema.RUN_IDENTITY)
def test_a_workdir_of_another_run_is_refused_for_each_identity_entry(tmp_path, entry):
  store = results.Store(str(tmp_path), _RUN)
  store.append(_row(0.522))
  store.close()
  rows = (tmp_path / schema.RESULTS).read_bytes()
  other = {**_RUN, entry: _OTHER[entry]}
  # run.json names the entry that differs ...
  with pytest.raises(UserError, match=rf'holds a run of another configuration \({entry}'):
    results.Store(str(tmp_path), other)
  # ... and without run.json, the rows' run_id tells them apart.
  os.remove(tmp_path / schema.RUN)
  with pytest.raises(UserError, match='holds rows of another run'):
    results.Store(str(tmp_path), other)
  assert (tmp_path / schema.RESULTS).read_bytes() == rows
  assert not (tmp_path / schema.RUN).exists()


# ------------------------------------------------------------------------- the workdir ----------


def test_a_held_workdir_is_refused_to_a_second_lock(tmp_path):
  # flock locks of two open files exclude each other within one process too.
  with workdir_lib.Lock(str(tmp_path)):
    with pytest.raises(UserError, match=r'is in use by another run \(pid '):
      with workdir_lib.Lock(str(tmp_path)):
        pass
  with workdir_lib.Lock(str(tmp_path)):  # given up at the end of the block
    pass


@pytest.mark.parametrize('dangling', [False, True], ids=['to-a-file', 'dangling'])
def test_open_own_refuses_a_link_itself(tmp_path, dangling):
  elsewhere = tmp_path / 'elsewhere.txt'
  if not dangling:
    elsewhere.write_text('not yours\n')
  os.symlink(elsewhere, tmp_path / schema.RESULTS)
  for mode in ('r', 'a', 'r+b'):
    if dangling and mode != 'a':
      continue  # nothing to read
    with pytest.raises(UserError, match='is a symbolic link'):
      workdir_lib.open_own(str(tmp_path / schema.RESULTS), mode)
  assert elsewhere.read_text() == 'not yours\n' if not dangling else not elsewhere.exists()


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
  path = tmp_path / schema.RUN
  path.write_text('old\n')

  def refuse(*args):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(os, 'replace', refuse)
  with pytest.raises(UserError, match='No space left on device'):
    workdir_lib.write_atomically(str(path), 'new\n')
  assert os.listdir(tmp_path) == [schema.RUN] and path.read_text() == 'old\n'


def test_a_refused_run_leaves_the_workdir_as_it_found_it(tmp_path):
  # An empty folder given as the workdir stays, emptied of what the run made; folders the run
  # created are removed up to the first that was there; a folder holding anything is kept.
  empty = tmp_path / 'empty'
  empty.mkdir()
  found = workdir_lib.untouched(str(empty))
  (empty / schema.LOCK).write_text('')
  (empty / schema.MODEL).mkdir()
  (empty / schema.MODEL / 'model.json').write_text('{}')
  workdir_lib.take_back(found)
  assert empty.is_dir() and os.listdir(empty) == []
  new = tmp_path / 'a' / 'b' / 'run'
  found = workdir_lib.untouched(str(new))
  new.mkdir(parents=True)
  (new / schema.LOCK).write_text('')
  workdir_lib.take_back(found)
  assert os.listdir(tmp_path) == ['empty']
  (empty / 'mine.txt').write_text('x')
  assert workdir_lib.untouched(str(empty)) is None


# ------------------------------------------------------------------------- links ----------------


@pytest.mark.parametrize('name', [schema.RESULTS, schema.PARTIAL, schema.RUN, schema.LOCK])
def test_workdir_symlink_refused(tmp_path, name):
  elsewhere = tmp_path / 'elsewhere.txt'
  elsewhere.write_text('not yours\n')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  os.symlink(elsewhere, workdir / name)
  want = (f'{workdir / name} is a symbolic link (to {elsewhere}); a run writes only its '
          "workdir's own files: put the file itself there, or use a new --workdir")
  with pytest.raises(UserError) as refused:
    with workdir_lib.Lock(str(workdir)):
      pass
  assert str(refused.value) == want
  with pytest.raises(UserError) as refused:
    results.Store(str(workdir), _RUN)
  assert str(refused.value) == want
  assert elsewhere.read_text() == 'not yours\n'


def test_workdir_symlink_refused_by_run_py(tmp_path):
  elsewhere = tmp_path / 'elsewhere.csv'
  elsewhere.write_text('not yours\n')
  workdir = tmp_path / 'run'
  workdir.mkdir()
  os.symlink(elsewhere, workdir / schema.RESULTS)
  result = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'run.py'), f'--workdir={workdir}',
       f'--config.cache_dir={tmp_path / "cache"}'], cwd=ROOT, capture_output=True, text=True,
      check=False)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  assert lines[-1] == f'error: {workdir / schema.RESULTS} is a symbolic link (to {elsewhere}); ' \
      "a run writes only its workdir's own files: put the file itself there, or use a new " \
      '--workdir'
  assert sum(line.startswith('error: ') for line in lines) == 1
  assert elsewhere.read_text() == 'not yours\n'
  assert sorted(os.listdir(workdir)) == [schema.RESULTS]
