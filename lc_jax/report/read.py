"""Reading results CSVs: the runner's results.csv (lc_jax.schema) and the paper's released CSV,
whose column spellings, wrapped layer names and missing kind/stage columns are mapped onto ours."""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
import sys
from typing import Any, Sequence

from lc_jax import schema
from lc_jax.errors import UserError

# Other spellings of the same quantities. The paper's 'pred_ce_loss' is deliberately not mapped:
# it is a cross-entropy with raw logits as soft targets (negative, no relation to pred_kl_div).
ALIASES = {'model': 'model_id', 'module': 'layer', 'layer_name': 'layer',
           'cos_sim': 'pred_cos_sim', 'kl_div': 'pred_kl_div', 'agreement': 'pred_agreement'}
# Wrappers around the network whose prefix the paper's layer names carry ('model.conv1').
WRAPPER_PREFIXES = ('model.', 'module.')
STAGE_PATTERN = re.compile(r'^(layer\d+|blocks\.\d+|stages\.\d+|features\.\d+)(\.|$)')
# Read as float (NaN when empty or missing: the paper's file has no num_params); 'trial' is int.
NUMERIC = tuple(c for c in schema.INTEGER if c != 'trial') + schema.METRICS
_SNIFF_BYTES = 1 << 16  # the start of a file checked for binary content before parsing


def resolve(path: str) -> str:
  """The results CSV that `path` names: the file itself, or results.csv in a workdir."""
  if os.path.isdir(path):
    found = os.path.join(path, schema.RESULTS)
    if not os.path.isfile(found):
      raise UserError(f'{path} has no {schema.RESULTS}; give a workdir that run.py wrote to, or '
                      'a results CSV')
    return found
  if not os.path.isfile(path):
    raise UserError(f'{path}: no such file or folder')
  return path


def results_of(path: str) -> list[str]:
  """The results CSVs that `path` names: a results CSV, a run's workdir, a sweep's folder (each
  finished model's results, in the sweep's order), or the folder of a sweep over image sets
  (each set's sweep folder below it, WORKDIR/<set>/, in the order of their paths)."""
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, schema.RESULTS)) and (
      not os.path.exists(os.path.join(path, schema.SWEEP))):
    sets = sweeps_below(path)
    found = []
    for folder in sets:
      try:
        found += results_of(folder)
      except UserError as e:  # a set whose models all failed: the others are reported
        print(f'left out: {e}', file=sys.stderr)
    if sets and not found:
      raise UserError(f'no image set below {path} has a finished model yet')
    if found:
      return found
  sweep = os.path.join(path, schema.SWEEP)
  if os.path.isdir(path) and not os.path.exists(os.path.join(path, schema.RESULTS)) and (
      os.path.isfile(sweep)):
    try:
      with open(sweep, encoding='utf-8') as f:
        done = [str(model_id) for model_id in json.load(f)['done']]
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise UserError(f'cannot read {sweep} ({e})') from None
    if not done:
      raise UserError(f'the sweep in {path} has no finished model yet')
    return [resolve(os.path.join(path, model_id)) for model_id in done]
  return [resolve(path)]


def sweeps_below(folder: str, depth: int = 2) -> list[str]:
  """The sweep folders (holding schema.SWEEP) within `depth` levels below `folder`, sorted by
  path: the image sets of a sweep over several (a set named 'imagenet_v2/topimages' nests one
  level deeper). A sweep's own model folders are not searched."""
  found = []
  try:
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
  except OSError as e:
    raise UserError(f'cannot read {folder}: {e.strerror}') from None
  for entry in entries:
    if entry.is_dir() and not entry.is_symlink():
      if os.path.isfile(os.path.join(entry.path, schema.SWEEP)):
        found.append(entry.path)
      elif depth > 1 and not os.path.exists(os.path.join(entry.path, schema.RESULTS)):
        found += sweeps_below(entry.path, depth - 1)
  return found


def clean_layer_name(name: str) -> str:
  """A torch module name without the wrappers the paper's code put around the network."""
  name = name.strip()
  stripped = True
  while stripped:
    stripped = False
    for prefix in WRAPPER_PREFIXES:
      if name.startswith(prefix) and len(name) > len(prefix):
        name, stripped = name[len(prefix):], True
  return name


def guess_kind(layer: str) -> str:
  """A layer's kind from its name alone, for files without a kind column (the paper's)."""
  last = layer.rsplit('.', 1)[-1]
  if last in ('fc', 'classifier') or layer.endswith('head.fc'):
    return 'linear'
  if last.startswith('bn') or layer.endswith('downsample.1'):
    return 'batchnorm'
  if last == 'conv_dw':
    return 'depthwise_conv'
  return 'conv'


def _guess_stages(layers: Sequence[str]) -> dict[str, str]:
  # By position: what precedes the first stage is the stem, what follows one is the head.
  stages, seen_stage = {}, False
  for layer in layers:
    match = STAGE_PATTERN.match(layer)
    if match:
      stages[layer], seen_stage = match.group(1), True
    else:
      stages[layer] = schema.outside_blocks(seen_stage)
  return stages


def _number(text: str, column: str, where: str) -> float:
  text = text.strip()
  if not text or text.lower() in ('nan', 'none', 'null'):
    return math.nan
  try:
    return float(text)
  except ValueError:
    raise UserError(f'{where}: {column} is {text!r}, not a number') from None


def _not_results(csv_path: str, why: str) -> UserError:
  return UserError(f'{csv_path} is not a CSV results file: {why}; give a workdir that run.py '
                   'wrote to, or a results CSV')


def _shown(columns: Sequence[str], most: int = 12) -> str:
  # A header for a one-line message: odd characters escaped, long names and lists cut short.
  def one(c):
    c = c if c.isprintable() else repr(c)
    return c if len(c) <= 40 else c[:37] + '...'
  shown = ', '.join(one(c) for c in columns[:most])
  return shown + (f', ... ({len(columns)} columns)' if len(columns) > most else '')


def _check_text(csv_path: str) -> None:
  """Refuses a file whose start is not UTF-8 text (an image, an array, a checkpoint)."""
  with open(csv_path, 'rb') as f:
    start = f.read(_SNIFF_BYTES)
  if b'\x00' in start:
    raise _not_results(csv_path, 'it holds binary data')
  try:  # not final: a character cut at the end of the sample is no error
    codecs.getincrementaldecoder('utf-8')().decode(start, final=False)
  except UnicodeDecodeError:
    raise _not_results(csv_path, 'it is not UTF-8 text') from None


def _cut_short(header: Sequence[str], last: Sequence[str]) -> bool:
  """Whether the last record of a file that does not end in a newline was cut short: always in
  the runner's format, with or without the dataset column (it ends every row with one), else
  when it has fewer cells than the header."""
  runner = tuple(c.strip() for c in header) in (schema.COLUMNS, schema.WITHOUT_DATASET)
  return runner or len(last) < len(header)


def load(path: str) -> list[dict[str, Any]]:
  """The rows of a results CSV (or of a workdir's results.csv), in file order.

  Each row is a dict with every column of the runner's format: text columns as str ('' when the file
  lacks them; kind and stage are then guessed from the layer name, the dataset taken from the
  run.json beside the file (`run_dataset`), else unknown, as in the paper's file), numeric ones as
  float (NaN when empty or missing), 'trial' as int, and 'source' (the CSV's path). Layer names lose
  a leading 'model.' / 'module.'; criticality is derived as 1 - pred_cos_sim when missing. The
  'original' row is kept; `summarize` sets it apart. A last line cut short, as a run killed while
  writing it leaves it (`_cut_short`), is left out with a note on stderr.
  """
  csv_path = resolve(path)
  try:
    _check_text(csv_path)
    with open(csv_path, newline='', encoding='utf-8-sig') as f:
      text = f.read()
    reader = csv.reader(io.StringIO(text, newline=''))
    header = next(reader, None)
    records = [(i, r) for i, r in enumerate(reader, start=2) if any(c.strip() for c in r)]
  except UnicodeDecodeError:
    raise _not_results(csv_path, 'it is not UTF-8 text') from None
  except csv.Error as e:
    raise _not_results(csv_path, str(e)) from None
  except OSError as e:
    raise UserError(f'cannot read {csv_path}: {e.strerror}') from None
  if records and not text.endswith(('\n', '\r')) and _cut_short(header, records[-1][1]):
    print(f'{csv_path}: line {records[-1][0]} is cut short (as a run killed while writing it '
          'leaves it); left out', file=sys.stderr)
    records.pop()
  if not header or not records:
    raise UserError(f'{csv_path} is empty: no results rows')
  columns = [ALIASES.get(c.strip(), c.strip()) for c in header]
  if 'layer' not in columns:
    raise _not_results(csv_path, f'no layer column (its header reads {_shown(columns)})')
  if 'criticality' not in columns and 'pred_cos_sim' not in columns:
    raise _not_results(csv_path, 'neither a criticality nor a pred_cos_sim column (its header '
                       f'reads {_shown(columns)})')

  default_model = os.path.basename(os.path.dirname(os.path.abspath(csv_path))) or 'model'
  default_dataset = '' if 'dataset' in columns else run_dataset(csv_path)
  rows = []
  for line, record in records:
    raw = dict(zip(columns, record))
    where = f'{csv_path}, line {line}'
    row: dict[str, Any] = {c: raw.get(c, '').strip() for c in schema.TEXT}
    row['layer'] = clean_layer_name(row['layer'])
    if not row['layer']:
      raise UserError(f'{where}: the layer is empty')
    row['model_id'] = row['model_id'] or default_model
    row['dataset'] = row['dataset'] or default_dataset
    for column in NUMERIC:
      row[column] = _number(raw.get(column, ''), column, where)
    if math.isnan(row['criticality']):
      row['criticality'] = 1 - row['pred_cos_sim']
    trial = _number(raw.get('trial', ''), 'trial', where)
    if math.isinf(trial):
      raise UserError(f'{where}: trial is {trial}, not a whole number')
    row['trial'] = 0 if math.isnan(trial) else int(trial)  # the paper writes 0.0
    row['source'] = csv_path
    rows.append(row)

  # Guessed per model, so that each model's own first stage marks the end of its stem.
  layers_of: dict[str, list[str]] = {}
  for row in rows:
    if row['layer'] != schema.ORIGINAL:
      layers_of.setdefault(row['model_id'], []).append(row['layer'])
  guessed = {m: _guess_stages(list(dict.fromkeys(ls))) for m, ls in layers_of.items()}
  for row in rows:
    if row['layer'] != schema.ORIGINAL:
      row['kind'] = row['kind'] or guess_kind(row['layer'])
      row['stage'] = row['stage'] or guessed[row['model_id']][row['layer']]
  return rows


def per_image_of(csv_path: str) -> dict[tuple[int, str], 'np.ndarray'] | None:
  """The per-image criticality kept beside a results CSV (schema.PER_IMAGE, written by a run
  with keep_per_image): {(trial, layer): float64 array over the run's decoded images, in image
  order}; None when there is no such file. A file that does not read is a UserError."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.abspath(csv_path)), schema.PER_IMAGE)
  if not os.path.isfile(path):
    return None
  out = {}
  try:
    with np.load(path, allow_pickle=False) as saved:
      for key in saved.files:
        trial, sep, layer = key.partition('/')
        if not sep or not trial.lstrip('-').isdigit():
          raise UserError(f"{path}: key {key!r} is not 'TRIAL/LAYER'")
        out[(int(trial), clean_layer_name(layer))] = np.asarray(saved[key], np.float64)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {path} ({e}); remove it to report without per-image '
                    'values') from None
  return out


def _run_info(csv_path: str) -> dict[str, Any]:
  """The run.json beside a results CSV; {} without one (or when it does not read)."""
  path = os.path.join(os.path.dirname(os.path.abspath(csv_path)), schema.RUN)
  try:
    with open(path, encoding='utf-8') as f:
      found = json.load(f)
  except (OSError, ValueError):
    return {}
  return found if isinstance(found, dict) else {}


def run_images(csv_path: str) -> Any:
  """The 'images' entry of the run.json beside a results CSV (which images the run measured),
  or None without one."""
  return _run_info(csv_path).get('images')


def run_arch(csv_path: str) -> str:
  """The registered architecture of the run whose results CSV this is (run.json's 'arch':
  'resnet50', ...), '' when it names none: a results CSV of the paper's, of the API without a
  workdir, or a model.factory run ('factory:module:function' names the function that built the
  model, not its architecture: two functions may build one)."""
  arch = _run_info(csv_path).get('arch')
  return arch if isinstance(arch, str) and not arch.startswith('factory:') else ''


def run_dataset(csv_path: str) -> str:
  """The image set of a run whose results CSV has no dataset column (a version before it), from
  the run.json beside it: 'photos', the ImageFolder's set, or config.data.name; '' without one
  (a results CSV of the paper's, or of the API without a workdir)."""
  info = _run_info(csv_path)
  data = (info.get('config') or {}).get('data') if isinstance(info.get('config'), dict) else None
  if not isinstance(data, dict):
    return ''
  if data.get('source') == 'photos':
    return 'photos'
  found = info.get('dataset') if isinstance(info.get('dataset'), dict) else {}
  return str(found.get('imagefolder') or data.get('name') or '')
