"""The results format, in one place: file names, columns, and how a row is written and read.

Imports nothing heavy (no JAX), so readers of results (`lc_jax.report`, scripts, tests) share it
with the runner that writes them.

    WORKDIR/results.csv   one row per (trial, layer), plus the `original` row; COLUMNS in order
    WORKDIR/run.json      what the run measured (config, checkpoint, images, targets)
    WORKDIR/partial.json  running sums of the unfinished rows (removed when the run ends)
    WORKDIR/model/        the converted checkpoint

Every row carries `run_id`, a digest of the run's identity (RUN_IDENTITY entries of run.json),
so rows of another configuration are told apart even when run.json is gone.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from typing import Any, Mapping, Sequence

RESULTS = 'results.csv'
RUN = 'run.json'
PARTIAL = 'partial.json'
SWEEP = 'sweep.json'  # a sweep's folder: its models, those done, those that failed
LOCK = '.lock'  # held by the run that writes the workdir (lc_jax.workdir)
MODEL = 'model'  # the converted checkpoint, a folder
# Each (trial, layer)'s criticality per image (keep_per_image): keys 'TRIAL/LAYER', float64
# arrays over the decoded images in image order; while a run goes, each finished batch's values
# of its unfinished rows wait in PER_IMAGE_PARTIAL/BATCH.npz.
PER_IMAGE = 'per_image.npz'
PER_IMAGE_PARTIAL = 'per_image.partial'
# What a run writes in a workdir (or a sweep in its folder): never followed through a link.
OWN = (RESULTS, RUN, PARTIAL, SWEEP, LOCK, MODEL, PER_IMAGE, PER_IMAGE_PARTIAL)
ORIGINAL = 'original'  # the layer of the row holding the original model's own metrics
# The stage (and block) of a layer outside every block, in a row's `stage` column and the
# inventory (lc_jax.layers), and the names of a model's first and last segments: the stem
# precedes the first block, the head follows the last.
STEM = 'stem'
HEAD = 'head'

# The metrics of a row (see lc_jax.metrics), in column order.
METRICS = ('top1_acc', 'top5_acc', 'loss', 'pred_cos_sim', 'pred_l1_err', 'pred_l2_err',
           'pred_kl_div', 'pred_agreement', 'recovered_acc', 'criticality',
           'criticality_ci_images')
TEXT = ('model_id', 'dataset', 'layer', 'mode', 'kind', 'stage', 'run_id')
INTEGER = ('trial', 'num_params', 'num_images')
# No timings: a resumed run must end with the very file an uninterrupted run writes.
# The dataset of ImageNet val, the set the paper measured (data.name's default, tfds's name).
IMAGENET_VAL = 'imagenet2012'
# `dataset` names the image set (lc_jax.data.DataInfo.name: 'imagenet2012', 'imagenet_r',
# 'photos', ...; '' where the API was given arrays without a name).
COLUMNS = ('model_id', 'dataset', 'layer', 'trial', 'mode', 'kind', 'stage', 'num_params',
           'num_images') + METRICS + ('run_id',)
# The columns of a results.csv without `dataset`: a workdir holding one is resumed, its rows
# given the run's dataset (lc_jax.results.Store); the report takes its dataset from the run.json
# beside it, else leaves it empty (lc_jax.report.read.run_dataset).
WITHOUT_DATASET = tuple(c for c in COLUMNS if c != 'dataset')
# run.json entries that make a run what it is: a workdir is resumed only with all of them equal.
RUN_IDENTITY = ('config', 'checkpoint_sha256', 'images', 'targets')


def run_id(run_info: Mapping[str, Any]) -> str:
  """A short digest of the RUN_IDENTITY entries of `run_info` (as JSON reads them back)."""
  identity = {key: run_info.get(key) for key in RUN_IDENTITY}
  text = json.dumps(identity, sort_keys=True, separators=(',', ':'), default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def outside_blocks(seen_block: bool) -> str:
  """The stage (and block) of a layer outside every block: HEAD once a block has been seen in
  forward order, STEM before."""
  return HEAD if seen_block else STEM


def in_block(stage: str) -> bool:
  """Whether `stage` (a layer's block or stage) lies in the blocks, not in the stem or head."""
  return stage not in (STEM, HEAD)


def row(model_id: str, num_images: int, layer: str, trial: int, mode: str,
        members: Sequence[Any], measured: Mapping[str, float], dataset: str = ''
        ) -> dict[str, Any]:
  """A row of `layer` (a reset target, or ORIGINAL) from the metrics `measured`
  (lc_jax.metrics.finalize), measured on the image set `dataset`; `members` are the target's
  layers (lc_jax.layers.Layer, none for the original), which give its kind, stage and parameter
  count. run_id is the writer's."""
  kinds = sorted({l.kind for l in members})
  stages = sorted({l.stage for l in members})
  return {'model_id': model_id, 'dataset': dataset, 'layer': layer, 'trial': trial, 'mode': mode,
          'kind': '+'.join(kinds) if kinds else 'none',
          'stage': stages[0] if len(stages) == 1 else ('+'.join(stages) or 'none'),
          'num_params': sum(l.num_params for l in members), 'num_images': num_images,
          **measured}


def cells(row: Mapping[str, Any]) -> dict[str, str]:
  """`row`'s COLUMNS as the text written to the file; floats round-trip exactly (repr), so
  `parse_row(cells(row))` is the row as it reads back."""
  missing = [c for c in COLUMNS if c not in row]
  if missing:
    raise ValueError(f'result row lacks {missing}')
  return {c: _format(row[c]) for c in COLUMNS}


def format_row(row: Mapping[str, Any]) -> str:
  """One CSV line (with its newline) of `row`'s COLUMNS."""
  return line(cells(row))


def line(text: Mapping[str, str]) -> str:
  """One CSV line (with its newline) of a row's `cells`."""
  buffer = io.StringIO()
  csv.writer(buffer, lineterminator='\n').writerow(text.values())
  return buffer.getvalue()


def header() -> str:
  """The first line of a results.csv."""
  return ','.join(COLUMNS) + '\n'


def parse_row(row: Mapping[str, str]) -> dict[str, Any]:
  """A row as read by csv.DictReader, typed: text, int, or float (NaN for an empty cell).

  Raises ValueError for a cell that is not a number where one is due."""
  parsed: dict[str, Any] = {}
  for key, value in row.items():
    if key in TEXT:
      parsed[key] = value
    elif key in INTEGER:
      parsed[key] = int(value)
    else:
      parsed[key] = float(value) if value != '' else float('nan')
  return parsed


def _format(value: Any) -> str:
  if isinstance(value, float):
    return '' if math.isnan(value) else repr(value)
  return str(value)
