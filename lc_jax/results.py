"""The results store of a run: OUT/results.csv, appended durably row by row, and OUT/run.json.

A row is written, flushed and fsynced as soon as its (trial, layer) is measured over all images.
A run goes batch by batch; until the last batch, the running sums of every unfinished row are
saved atomically after each batch (OUT/partial.json, with the sha256 of its own content: an
edited or damaged one is set aside, and those rows start over), so a killed run loses at most the
batch it was computing. Re-opening a workdir resumes it: finished rows are kept and skipped; a
workdir made with a different configuration, checkpoint or image set is refused with the
differences listed, and a results.csv with two rows of one (trial, layer) is refused. A
results.csv without the dataset column (schema.WITHOUT_DATASET, an older version's) is resumed:
its rows are given the dataset of the first row this run appends, in one atomic rewrite. The
workdir's files are opened without following links (lc_jax.workdir.open_own).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import shutil
from typing import Any, Iterable, Mapping

from absl import logging
import numpy as np

from lc_jax import schema
from lc_jax import workdir as workdir_lib
from lc_jax.errors import UserError

class Store:
  """Rows of one workdir; `append` makes a row durable before it returns.

  With `writer=False` (every process of a run over several but the first) the store reads the
  workdir the writer opened and keeps appended rows in memory only: one process writes.
  """

  def __init__(self, workdir: str, run_info: Mapping[str, Any], writer: bool = True):
    """Opens (or starts) the workdir; refuses one whose run.json or rows differ in what they
    measured. Nothing is written before both are checked."""
    self.workdir = os.path.abspath(workdir)
    self.writer = writer
    run_info = json.loads(json.dumps(run_info, default=str))  # as it will read back
    self.run_id = schema.run_id(run_info)
    self.path = os.path.join(self.workdir, schema.RESULTS)
    refuse_other_run(self.workdir, run_info)
    self._file = None
    self.rows = self._read()
    if writer:
      workdir_lib.write_atomically(
          os.path.join(self.workdir, schema.RUN),
          json.dumps({**run_info, 'run_id': self.run_id}, indent=2, sort_keys=True) + '\n')
      try:
        self._file = workdir_lib.open_own(self.path, 'a', newline='', encoding='utf-8')
      except OSError as e:
        raise UserError(f'cannot write {self.path}: {e.strerror}') from None
      if self._file.tell() == 0:
        self._file.write(schema.header())
        self._sync()
        workdir_lib.sync_folder(self.workdir)  # the new file's entry too

  def done(self, trial: int, layer: str) -> bool:
    """Whether the row of (trial, layer) is already stored."""
    return (trial, layer) in self._keys

  def append(self, row: Mapping[str, Any]) -> None:
    """Writes one row (tagged with this run's run_id) and makes it durable (flush + fsync)."""
    text = schema.cells({**row, 'run_id': self.run_id})  # formatted once: written and kept
    if self._without_dataset:
      self._add_dataset(text['dataset'])
    if self.writer:
      try:
        self._file.write(schema.line(text))
        self._sync()
      except OSError as e:  # a full disk: the rows written before this one stay
        raise UserError(f'cannot write {self.path}: {e.strerror}; the rows written so far are '
                        'kept: make room and run again to resume') from None
    self.rows.append(schema.parse_row(text))
    self._keys.add((int(row['trial']), str(row['layer'])))

  def save_partial(self, batches_done: int, sums: Mapping[str, Mapping[str, float]]) -> None:
    """Makes the running sums of unfinished rows durable: `sums[key]` are the float64 metric
    sums of row `key` over the first `batches_done` batches. Written atomically, so a kill
    leaves the previous state or this one."""
    if not self.writer:
      return
    state = {'run_id': self.run_id, 'batches_done': batches_done, 'sums': sums}
    workdir_lib.write_atomically(os.path.join(self.workdir, schema.PARTIAL),
                                 json.dumps({**state, 'sha256': _sha256(state)}) + '\n')

  def load_partial(self, keys: Iterable[str], num_batches: int, fields: Iterable[str]
                   ) -> tuple[int, dict[str, dict[str, float]]]:
    """(batches done, sums per key) saved for every one of `keys`, or (0, {}) to start over.

    Floats are written with repr and read back exactly, so a resumed run adds up the very
    numbers the interrupted one had. A state that does not match the sha256 it was saved with,
    or does not fit this run (another run_id or batch count, missing keys or sums, an unreadable
    file), is ignored: the unfinished rows start over."""
    path = os.path.join(self.workdir, schema.PARTIAL)
    if not os.path.lexists(path):
      return 0, {}
    try:
      with workdir_lib.open_own(path, encoding='utf-8') as f:
        state = json.load(f)
      if state.pop('sha256', None) != _sha256(state):
        logging.warning('%s does not match the digest it was saved with (edited or damaged): '
                        'its unfinished rows start over from the first batch', path)
        return 0, {}
      done, saved = int(state['batches_done']), state['sums']
      keys = list(keys)
      if (state.get('run_id') == self.run_id and 0 < done < num_batches
          and all(key in saved for key in keys)
          and all(field in saved[key] for key in keys for field in fields)):
        return done, {key: {f: float(saved[key][f]) for f in fields} for key in keys}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
      pass
    logging.warning('%s does not fit this run (another run, batch count or set of resets, or '
                    'sums of an older version): its unfinished rows start over from the first '
                    'batch', path)
    return 0, {}

  def clear_partial(self) -> None:
    """Drops the partial sums once every row they fed is written."""
    if not self.writer:
      return
    partial = os.path.join(self.workdir, schema.PARTIAL)
    try:
      os.remove(partial)
    except FileNotFoundError:
      pass
    except OSError as e:
      raise UserError(f'cannot remove {partial}: {e.strerror} (every row is written; delete '
                      'it by hand)') from None

  def save_per_image(self, batch: int, values: Mapping[str, np.ndarray]) -> None:
    """Makes batch `batch`'s per-image values of every unfinished row durable
    (PER_IMAGE_PARTIAL/BATCH.npz, written atomically), for a resumed run."""
    if not self.writer:
      return
    folder = os.path.join(self.workdir, schema.PER_IMAGE_PARTIAL)
    os.makedirs(folder, exist_ok=True)
    workdir_lib.write_atomically(os.path.join(folder, f'{batch:06d}.npz'), _npz(values))

  def load_per_image(self, batches: int, keys: Iterable[str]) -> dict[str, np.ndarray] | None:
    """The per-image values of `keys` over the first `batches` batches, as saved by
    `save_per_image`; None when a batch's file or a key in it is missing or unreadable."""
    found: dict[str, list[np.ndarray]] = {key: [] for key in keys}
    for batch in range(batches):
      path = os.path.join(self.workdir, schema.PER_IMAGE_PARTIAL, f'{batch:06d}.npz')
      try:
        with np.load(path) as saved:
          for key, parts in found.items():
            parts.append(saved[key])
      except (OSError, KeyError, ValueError):
        return None
    return {key: np.concatenate(parts) if parts else np.zeros(0) for key, parts in found.items()}

  def write_per_image(self, values: Mapping[str, np.ndarray]) -> None:
    """Writes every row's per-image values to PER_IMAGE (atomically), with those of rows an
    earlier run of this workdir measured."""
    if not self.writer:
      return
    path = os.path.join(self.workdir, schema.PER_IMAGE)
    merged = {}
    if os.path.exists(path):
      with np.load(path) as saved:
        merged = {key: saved[key] for key in saved.files}
    merged.update(values)
    workdir_lib.write_atomically(path, _npz(merged))

  def kept_per_image(self) -> set[str]:
    """The rows (trial/target keys) whose per-image values PER_IMAGE holds."""
    try:
      with np.load(os.path.join(self.workdir, schema.PER_IMAGE)) as saved:
        return set(saved.files)
    except (OSError, ValueError):
      return set()

  def clear_per_image(self) -> None:
    """Drops the per-batch values once PER_IMAGE and every row are written."""
    if self.writer:
      shutil.rmtree(os.path.join(self.workdir, schema.PER_IMAGE_PARTIAL), ignore_errors=True)

  def close(self) -> None:
    if self._file is not None:
      file, self._file = self._file, None
      try:
        file.close()
      except OSError:  # what a failed append left buffered; the reader cuts a half row off
        pass

  def _sync(self) -> None:
    self._file.flush()
    os.fsync(self._file.fileno())

  def _add_dataset(self, dataset: str) -> None:
    """Gives the rows read from a results.csv without the dataset column `dataset` (the run
    that resumes it measures the same images: its run_id is theirs) and rewrites the file with
    the column, atomically: a kill leaves the old file or the new one."""
    self._without_dataset = False
    for row in self.rows:
      row['dataset'] = dataset
    if not self.writer:
      return
    self._file.close()
    workdir_lib.write_atomically(self.path, schema.header() + ''.join(
        schema.format_row(row) for row in self.rows))
    self._file = workdir_lib.open_own(self.path, 'a', newline='', encoding='utf-8')

  def _read(self) -> list[dict[str, Any]]:
    self._keys: set[tuple[int, str]] = set()
    self._without_dataset = False
    if not os.path.lexists(self.path):
      return []
    try:
      with workdir_lib.open_own(self.path, newline='', encoding='utf-8') as f:
        text = f.read()
    except (OSError, UnicodeDecodeError) as e:
      raise UserError(f'cannot read {self.path} ({e}); move it away to start the run over'
                      ) from None
    # A run killed mid-write can leave a partial last line: cut it off in place (never rewrite
    # the file, so the whole rows are not at risk), keep every whole row.
    complete = text[:text.rfind('\n') + 1]
    rows = _parse(io.StringIO(complete), self.path)
    self._without_dataset = complete.split('\n', 1)[0] == ','.join(schema.WITHOUT_DATASET)
    for row in rows:
      row.setdefault('dataset', '')
    others = sorted({r['run_id'] for r in rows} - {self.run_id})
    if others:
      raise UserError(f'{self.path} holds rows of another run (run_id {others[0]}, this run '
                      f'{self.run_id}): another configuration, checkpoint or image set; use a '
                      'new workdir, or the same settings to resume it')
    if complete != text and self.writer:
      with workdir_lib.open_own(self.path, 'r+b') as f:
        f.truncate(len(complete.encode('utf-8')))
        os.fsync(f.fileno())
    self._keys = {(r['trial'], r['layer']) for r in rows}
    return rows


def _npz(values: Mapping[str, np.ndarray]) -> bytes:
  """`values` as the bytes of an .npz file (float64 arrays)."""
  buffer = io.BytesIO()
  np.savez(buffer, **{key: np.asarray(value, np.float64) for key, value in values.items()})
  return buffer.getvalue()


def _sha256(state: Mapping[str, Any]) -> str:
  """The hex sha256 of `state` as canonical JSON (floats as repr: exact once read back)."""
  text = json.dumps(state, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()


def _parse(lines: io.StringIO, path: str) -> list[dict[str, Any]]:
  """The typed rows of a results.csv's text; one line names a header or row that does not fit,
  or two rows of one (trial, layer)."""
  reader = csv.DictReader(lines)
  if reader.fieldnames is not None and tuple(reader.fieldnames) not in (
      schema.COLUMNS, schema.WITHOUT_DATASET):
    raise UserError(f'{path} has columns {",".join(reader.fieldnames)}, not those of this '
                    f'version ({",".join(schema.COLUMNS)}); use a new --workdir')
  rows = []
  seen: dict[tuple[str, str], tuple[int, dict[str, str]]] = {}
  for row in reader:
    if None in row or None in row.values():
      raise UserError(f'{path}, line {reader.line_num}: not the {len(reader.fieldnames)} cells '
                      'of a row; the file was edited or damaged: repair or remove that line '
                      '(the run redoes it), or use a new --workdir')
    try:
      rows.append(schema.parse_row(row))
    except ValueError as e:
      raise UserError(f'{path}, line {reader.line_num}: {e}; the file was edited or damaged: '
                      'repair or remove that line (the run redoes it), or use a new --workdir'
                      ) from None
    key = (row['trial'], row['layer'])
    if key in seen:
      line, first = seen[key]
      how = 'twice' if first == row else 'twice, with different values'
      raise UserError(f'{path}, lines {line} and {reader.line_num}: trial {key[0]} of layer '
                      f'{key[1]} {how}; the file was edited or damaged: remove the wrong line '
                      '(or both: the run redoes it), or use a new --workdir')
    seen[key] = reader.line_num, row
  return rows


def refuse_other_run(workdir: str, run_info: Mapping[str, Any]) -> None:
  """Raises if `workdir` holds a run that differs in one of the entries of `run_info` given.

  Called before anything is written to the workdir (the model conversion included), with what
  is known at that point; `Store` checks every identity entry again once all are known, and the
  rows' run_id too (which holds when run.json is gone).
  """
  workdir_lib.refuse_links(os.path.abspath(workdir))
  path = os.path.join(os.path.abspath(workdir), schema.RUN)
  if not os.path.exists(path):
    return
  try:
    with workdir_lib.open_own(path, encoding='utf-8') as f:
      previous = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path} ({e}); if it was damaged, delete it: the rows of '
                    'results.csv still tell which run they belong to') from None
  run_info = json.loads(json.dumps(run_info, default=str))
  differences = [line for key in schema.RUN_IDENTITY if key in run_info
                 for line in _differences(previous.get(key), run_info[key], key)]
  if differences:
    shown = '; '.join(differences[:6]) + ('; ...' if len(differences) > 6 else '')
    raise UserError(f'{os.path.abspath(workdir)} holds a run of another configuration ({shown}); '
                    'use a new workdir, or the same settings to resume it')


def _differences(old: Any, new: Any, prefix: str) -> Iterable[str]:
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    for key in sorted(set(old) | set(new)):
      yield from _differences(old.get(key), new.get(key), f'{prefix}.{key}')
  elif old != new:
    yield f'{prefix}: {_short(old)} -> {_short(new)}'


def _short(value: Any) -> str:
  """`value` as JSON in at most 60 characters; a long string keeps its quotes and both ends
  (digests that differ in their last characters still differ)."""
  text = json.dumps(value, default=str)
  if len(text) <= 60:
    return text
  if isinstance(value, str):
    return (json.dumps(value[:40], ensure_ascii=False)[:-1] + '...'
            + json.dumps(value[-12:], ensure_ascii=False)[1:])
  cut = text[:56].rstrip('\\')
  inside = len(re.findall(r'(?<!\\)"', cut)) % 2  # cut inside a string: close it
  return cut + ('..."' if inside else '...')
