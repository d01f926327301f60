"""The results store of a run: OUT/results.csv, appended durably row by row, and OUT/run.json.

A row is written, flushed and fsynced as soon as its (trial, layer) is measured over all images.
A run goes batch by batch; until the last batch, the running sums of every unfinished row are
saved atomically after each batch (OUT/partial.json), so a killed run loses at most the batch it
was computing. Re-opening a workdir resumes it: finished rows are kept
and skipped; a workdir made with a different configuration, checkpoint or image set is refused
with the differences listed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable, Mapping

from absl import logging

from lc_jax import metrics
from lc_jax.errors import UserError

RESULTS = 'results.csv'
RUN = 'run.json'
# Metric sums of the rows not yet finished, over the batches done so far (see `save_partial`).
PARTIAL = 'partial.json'
# No timings: a resumed run must end with the very file an uninterrupted run writes.
COLUMNS = ('model_id', 'layer', 'trial', 'mode', 'kind', 'stage', 'num_params', 'num_images'
          ) + metrics.COLUMNS
ORIGINAL = 'original'  # the layer name of the row holding the original model's own metrics
# run.json entries that must match for a workdir to be resumed.
IDENTITY = ('config', 'checkpoint_sha256', 'images', 'targets')


class Store:
  """Rows of one workdir; `append` makes a row durable before it returns.

  With `writer=False` (every process of a run over several but the first) the store reads the
  workdir the writer opened and keeps appended rows in memory only: one process writes.
  """

  def __init__(self, workdir: str, run_info: Mapping[str, Any], writer: bool = True):
    """Opens (or starts) the workdir; refuses one whose run.json differs in what it measured."""
    self.workdir = os.path.abspath(workdir)
    self.writer = writer
    run_info = json.loads(json.dumps(run_info, default=str))  # as it will read back
    self.path = os.path.join(self.workdir, RESULTS)
    refuse_other_run(self.workdir, run_info)
    self._file = None
    if writer:
      os.makedirs(self.workdir, exist_ok=True)
      _write_atomically(os.path.join(self.workdir, RUN),
                        json.dumps(run_info, indent=2, sort_keys=True) + '\n')
    self.rows = self._read()
    if writer:
      self._file = open(self.path, 'a', newline='', encoding='utf-8')
      if self._file.tell() == 0:
        self._file.write(','.join(COLUMNS) + '\n')
        self._sync()

  def done(self, trial: int, layer: str) -> bool:
    """Whether the row of (trial, layer) is already stored."""
    return (trial, layer) in self._keys

  def append(self, row: Mapping[str, Any]) -> None:
    """Writes one row and makes it durable (flush + fsync)."""
    missing = [c for c in COLUMNS if c not in row]
    if missing:
      raise ValueError(f'result row lacks {missing}')
    if self.writer:
      buffer = io.StringIO()
      csv.writer(buffer, lineterminator='\n').writerow([_format(row[c]) for c in COLUMNS])
      self._file.write(buffer.getvalue())
      self._sync()
    self.rows.append(_parse({c: _format(row[c]) for c in COLUMNS}))
    self._keys.add((int(row['trial']), str(row['layer'])))

  def save_partial(self, batches_done: int, sums: Mapping[str, Mapping[str, float]]) -> None:
    """Makes the running sums of unfinished rows durable: `sums[key]` are the float64 metric
    sums of row `key` over the first `batches_done` batches. Written atomically, so a kill
    leaves the previous state or this one."""
    if not self.writer:
      return
    _write_atomically(os.path.join(self.workdir, PARTIAL),
                      json.dumps({'batches_done': batches_done, 'sums': sums}) + '\n')

  def load_partial(self, keys: Iterable[str], num_batches: int, fields: Iterable[str]
                   ) -> tuple[int, dict[str, dict[str, float]]]:
    """(batches done, sums per key) saved for every one of `keys`, or (0, {}) to start over.

    Floats are written with repr and read back exactly, so a resumed run adds up the very
    numbers the interrupted one had. A state that does not fit this run (another batch count,
    missing keys or sums, an unreadable file) is ignored: the unfinished rows start over."""
    path = os.path.join(self.workdir, PARTIAL)
    if not os.path.exists(path):
      return 0, {}
    try:
      with open(path) as f:
        state = json.load(f)
      done, saved = int(state['batches_done']), state['sums']
      keys = list(keys)
      if (0 < done < num_batches and all(key in saved for key in keys)
          and all(field in saved[key] for key in keys for field in fields)):
        return done, {key: {f: float(saved[key][f]) for f in fields} for key in keys}
    except (ValueError, KeyError, TypeError, AttributeError):
      pass
    logging.warning('%s does not fit this run (another batch count, other resets, or sums of an '
                    'older version): its unfinished rows start over from the first batch', path)
    return 0, {}

  def clear_partial(self) -> None:
    """Drops the partial sums once every row they fed is written."""
    if not self.writer:
      return
    partial = os.path.join(self.workdir, PARTIAL)
    if os.path.exists(partial):
      os.remove(partial)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()

  def _sync(self) -> None:
    self._file.flush()
    os.fsync(self._file.fileno())

  def _read(self) -> list[dict[str, Any]]:
    self._keys: set[tuple[int, str]] = set()
    if not os.path.exists(self.path):
      return []
    with open(self.path, newline='', encoding='utf-8') as f:
      text = f.read()
    # A run killed mid-write can leave a partial last line: cut it off in place (never rewrite
    # the file, so the whole rows are not at risk), keep every whole row.
    complete = text[:text.rfind('\n') + 1]
    if complete != text and self.writer:
      with open(self.path, 'r+b') as f:
        f.truncate(len(complete.encode('utf-8')))
        os.fsync(f.fileno())
    reader = csv.DictReader(io.StringIO(complete))
    if complete and tuple(reader.fieldnames or ()) != COLUMNS:
      raise UserError(f'{self.path} has columns {reader.fieldnames}, not those of this version '
                      f'({", ".join(COLUMNS)}); use a new --workdir')
    rows = [_parse(r) for r in reader]
    self._keys = {(r['trial'], r['layer']) for r in rows}
    return rows


def refuse_other_run(workdir: str, run_info: Mapping[str, Any]) -> None:
  """Raises if `workdir` holds a run that differs in one of the entries of `run_info` given.

  Called before anything is written to the workdir (the model conversion included), with what
  is known at that point; `Store` checks every identity entry again once all are known.
  """
  path = os.path.join(os.path.abspath(workdir), RUN)
  if not os.path.exists(path):
    return
  with open(path) as f:
    previous = json.load(f)
  run_info = json.loads(json.dumps(run_info, default=str))
  differences = [line for key in IDENTITY if key in run_info
                 for line in _differences(previous.get(key), run_info[key], key)]
  if differences:
    shown = '; '.join(differences[:6]) + ('; ...' if len(differences) > 6 else '')
    raise UserError(f'{os.path.abspath(workdir)} holds a run of another configuration ({shown}); '
                    'use a new --workdir, or the same settings to resume it')


def read(workdir: str) -> list[dict[str, Any]]:
  """The rows of OUT/results.csv, numbers parsed, in file order."""
  path = os.path.join(workdir, RESULTS)
  if not os.path.isfile(path):
    raise UserError(f'no {RESULTS} in {workdir}')
  with open(path, newline='') as f:
    return [_parse(r) for r in csv.DictReader(f)]


def _format(value: Any) -> str:
  if isinstance(value, float):
    return '' if math.isnan(value) else repr(value)
  return str(value)


def _parse(row: Mapping[str, str]) -> dict[str, Any]:
  parsed: dict[str, Any] = {}
  for key, value in row.items():
    if key in ('model_id', 'layer', 'mode', 'kind', 'stage'):
      parsed[key] = value
    elif key in ('trial', 'num_params', 'num_images'):
      parsed[key] = int(value)
    else:
      parsed[key] = float(value) if value != '' else float('nan')
  return parsed


def _differences(old: Any, new: Any, prefix: str) -> Iterable[str]:
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    for key in sorted(set(old) | set(new)):
      yield from _differences(old.get(key), new.get(key), f'{prefix}.{key}')
  elif old != new:
    yield f'{prefix}: {_short(old)} -> {_short(new)}'


def _short(value: Any) -> str:
  text = json.dumps(value, default=str)
  return text if len(text) <= 60 else text[:57] + '...'


def _write_atomically(path: str, text: str) -> None:
  partial = path + '.partial'
  with open(partial, 'w') as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(partial, path)
