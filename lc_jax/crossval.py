r"""Cross-framework validation: one checkpoint, the same reset weights and the same images through
the paper's loop in PyTorch (`lc_jax.torch_reference`) and through lc-jax, compared.

    python -m lc_jax.crossval --out=out/crossval        # the demo's config, configs/demo.py
    python -m lc_jax.crossval --config=configs/paper.py --out=out/crossval \
      --config.model.checkpoint=/ckpt/resnet50.pth --config.data.path=/data/imagenet/val \
      --layers='layer1.*' --tolerance=metrics=1e-5

The checkpoint, images, layers, trials and seed come from the run config, as for run.py
(`--layers` stands for `--config.reset.layers`). Each trial's fresh model is drawn in torch by
the architecture's counterpart (`Architecture.timm_name`) and saved as
OUT/fresh/trialT.safetensors; the torch loop loads those tensors and lc-jax converts them (a run
of reset mode 'checkpoint' in OUT/jax/trialT), so both frameworks reset from the same numbers.
Checked (docs/crossval.md):

- parity: the original model's logits and every module output (stages, blocks, layers) on every
  image, lc-jax against torch on the same weights (`converters.parity.compare`);
- metric: every metric column of every (trial, layer) row, lc-jax's results.csv against the
  torch loop's rows;
- init: per layer kind and variable, lc-jax's own fresh draws (`lc_jax.init`, the
  architecture's scheme) against the torch initialiser's: two-sample KS test, std ratio, bounds.

Writes OUT/crossval.md (the verdict, then the worst lines first) and OUT/crossval.csv (every
check); exits with status 2 when a tolerance is broken, 1 on bad input. Needs the torch extra.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import sys
import time
from typing import Any, Mapping, Sequence

from lc_jax import launch

if __name__ == '__main__':  # python -m lc_jax.crossval: before JAX starts its threads
  launch.one_malloc_arena()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from converters import mapping
from converters import parity
from lc_jax import config as lc_config
from lc_jax import data
from lc_jax import errors
from lc_jax import experiment
from lc_jax import init
from lc_jax import layers as layers_lib
from lc_jax import schema
from lc_jax import workdir
from lc_jax.errors import UserError

DISAGREE = 2  # exit status when a tolerance is broken (bad input: 1)
# The layers checked when neither --layers nor the config names any: the first ones, whose resets
# reach every later module: a minute or two, where all of the demo's 99 take about ten.
QUICK_LAYERS = 'first:6'

# What each check's difference is held to (docs/crossval.md says how they were chosen).
TOLERANCES = {
    # largest |difference| of the original's logits / max(1, largest |torch logit|)
    'logits': 1e-4,
    # the same for every module output (stages, blocks, layers)
    'activations': 1e-4,
    # |difference| / max(1, |torch value|) of a continuous metric column
    'metrics': 1e-4,
    # the share of the images by which a counted column (COUNTED) differs: a near tie of the
    # top two classes can flip one image's top-1 between the frameworks
    'images': 1e-3,
    # the lowest p-value allowed of the KS test of a fresh draw, lc-jax's against torch's
    'ks_p': 1e-4,
    # |std(lc-jax) / std(torch) - 1| of a fresh draw
    'std': 0.1,
    # |difference of the 1% or of the 99% quantile| / the larger |torch quantile| of a draw
    'bounds': 0.1,
}
# Metric columns that count images, and the share of the images one unit of each is.
COUNTED = {'top1_acc': 0.01, 'top5_acc': 0.01, 'pred_agreement': 1.0, 'recovered_acc': None}
# Metric columns that are empty in both frameworks without labels (lc_jax.metrics.finalize;
# recovered_acc also when the original's top-1 is 0); any other column empty is a failure.
LABELLED = ('top1_acc', 'top5_acc', 'loss', 'recovered_acc')
# Parity quantities of what cannot be compared: a side not finite, or zeros on both sides.
NOT_FINITE = 'not finite in {}'
ALL_ZEROS = 'all zeros in both'
PARITY_BATCH = 8  # images per parity batch: every module output of the batch is kept
KS_SAMPLE = 100_000  # values per side of a KS test (drawn without replacement from more)
BOUNDS = (0.01, 0.99)  # the quantiles of a fresh draw held to the 'bounds' tolerance
# Values a pooled draw needs for its std and bounds to be judged: from N(0, s^2), the std of
# 10,000 values is s within 1% (one standard deviation), the 1% quantile within 1.6%.
MIN_JUDGED = 10_000
CSV_COLUMNS = ('check', 'name', 'trial', 'quantity', 'torch', 'lc_jax', 'difference',
               'tolerance', 'share', 'passed')


# ------------------------------------------------------------------------ checks and report ----


@dataclasses.dataclass(frozen=True)
class Check:
  """One compared quantity. `difference` is what is held to `tolerance` (NaN: shown, not
  judged) and `share` the difference as a share of the tolerance (> 1 breaks it). A NaN
  difference with a tolerance had nothing to compare (a side not finite, or zeros on both): its
  share is inf."""

  check: str  # 'parity', 'metric' or 'init'
  name: str  # a module, a layer ('original' included) or 'kind/variable'
  trial: int | None
  quantity: str
  torch: float
  lc_jax: float
  difference: float
  tolerance: float = math.nan
  share: float = math.nan

  @property
  def passed(self) -> bool:
    return math.isnan(self.tolerance) or self.share <= 1

  def cells(self) -> dict[str, str]:
    """The check's CSV cells (floats exactly, NaN and None empty)."""
    values = {**dataclasses.asdict(self), 'passed': self.passed}
    return {k: '' if v is None or (isinstance(v, float) and math.isnan(v))
            else repr(v) if isinstance(v, float) else str(v) for k, v in values.items()}


def _judged(check: str, name: str, trial: int | None, quantity: str, torch: float,
            lc_jax: float, difference: float, tolerance: float) -> Check:
  """A check whose `difference` (>= 0; NaN when only one side has a value) must not exceed
  `tolerance` (NaN: shown, not judged)."""
  if math.isnan(tolerance):
    share = math.nan
  elif math.isnan(difference):
    share = math.inf
  elif tolerance > 0:
    share = difference / tolerance
  else:
    share = 0.0 if difference == 0 else math.inf
  return Check(check, name, trial, quantity, torch, lc_jax, difference, tolerance, share)


@dataclasses.dataclass
class Report:
  """The checks of one cross-validation and where the first disagreement lies."""

  arch: str
  checks: list[Check]
  tolerances: dict[str, float]
  stages: list[str]  # the inventory's stage names, in forward order
  # The first module output, in torch's forward order, over the activations tolerance; its
  # stage; the first inventory layer over it. None when every output is within it.
  first_module: str | None
  first_stage: str | None
  first_layer: str | None
  # The first row (the original, then the reset layers in forward order) with a metric over
  # its tolerance, or None.
  first_row: str | None
  context: list[str]  # what was compared, for the report's header

  @property
  def passed(self) -> bool:
    return all(c.passed for c in self.checks)

  def worst(self, n: int | None = None, check: str | None = None) -> list[Check]:
    """The judged checks (of one kind, or all), the largest share of its tolerance first."""
    judged = [c for c in self.checks
              if not math.isnan(c.tolerance) and check in (None, c.check)]
    return sorted(judged, key=lambda c: -c.share)[:n]

  def verdict(self) -> str:
    """One line: PASS or FAIL, where the disagreement starts, and the worst check of each kind."""
    judged = self.worst()
    broken = sum(not c.passed for c in judged)
    worst = ', '.join(_describe(self.worst(1, kind)[0]) for kind in ('parity', 'metric', 'init')
                      if self.worst(1, kind))
    if not broken:
      return f'PASS: {self.arch}, all {len(judged)} checks within tolerance; worst: {worst}'
    where = ''
    # Values that cannot be compared (not finite, or zeros on both sides), in forward order;
    # the logits last, as every broken module before them is where it starts.
    blind = sorted((c for c in self.checks if not c.passed and math.isnan(c.difference)),
                   key=lambda c: c.name == 'logits')
    if blind:
      where += (f'; {len(blind)} cannot be compared (not finite, or all zeros in both '
                f'frameworks), the first: {_describe(blind[0])}')
    if self.first_module:
      where += (f'; the first module that disagrees is {self.first_module} in stage '
                f'{self.first_stage}, the first layer {self.first_layer or "none"}')
    if self.first_row:
      where += f'; the first metric row that disagrees is {self.first_row}'
    return (f'FAIL: {self.arch}, {broken} of {len(judged)} checks break their tolerance{where}; '
            f'worst: {worst}')

  def markdown(self) -> str:
    """The human-readable report: the verdict, the worst lines, then each kind of check."""
    lines = [f'# Cross-framework validation: {self.arch}', '', f'**{self.verdict()}**', '']
    lines += [f'- {line}' for line in self.context]
    lines += ['', '## Worst lines', ''] + _table(self.worst(15))

    parity_checks = [c for c in self.checks if c.check == 'parity']
    shown = [c for c in parity_checks
             if c.name == 'logits' or '.' not in c.name or c.name in self.stages]
    lines += ['', '## Parity of the original model', '',
              'Largest |difference| / max(1, largest |torch value|) over every image, of the '
              'logits and of the outputs of the stages and top-level modules (the torch column '
              'holds the largest |torch value|):', ''] + _table(shown)
    lines += ['', f'Of all {len(parity_checks)} compared outputs (every module both frameworks '
              'name alike), the worst:', ''] + _table(self.worst(5, 'parity'))
    if self.first_module:
      lines += ['', f'The first output over its tolerance is **{self.first_module}** (stage '
                f'**{self.first_stage}**); the first layer is **{self.first_layer or "none"}**.']

    metric = self.worst(check='metric')
    per_column: dict[str, Check] = {}
    for c in metric:
      per_column.setdefault(c.quantity, c)
    lines += ['', '## Metrics per layer', '',
              f'{len({(c.name, c.trial) for c in metric})} rows (the original and each trial '
              'and layer), every metric column; the worst row of each column:', '']
    lines += _table(list(per_column.values()))
    lines += ['', 'The worst rows:', ''] + _table(metric[:10])

    lines += ['', '## Fresh initialisation per layer kind', '',
              "lc-jax's own draws (lc_jax.init, the architecture's scheme, trial 0's key) "
              "against the torch initialiser's (trial 0's fresh torch model), each variable "
              'pooled over the layers of its kind:', '']
    lines += _table([c for c in self.checks if c.check == 'init'])
    lines += ['', '## Tolerances', '']
    lines += [f'- {name}: {value:g}' for name, value in self.tolerances.items()]
    return '\n'.join(lines) + '\n'

  def write(self, out: str) -> tuple[str, str]:
    """Writes OUT/crossval.md and OUT/crossval.csv (every check); returns their paths."""
    md, table = os.path.join(out, 'crossval.md'), os.path.join(out, 'crossval.csv')
    with open(md, 'w', encoding='utf-8') as f:
      f.write(self.markdown())
    with open(table, 'w', newline='', encoding='utf-8') as f:
      writer = csv.DictWriter(f, CSV_COLUMNS, lineterminator='\n')
      writer.writeheader()
      writer.writerows(c.cells() for c in self.checks)
    return md, table


def _describe(c: Check) -> str:
  trial = '' if c.trial is None else f' trial {c.trial}'
  if math.isnan(c.difference) and not c.passed:  # nothing to compare
    what = c.quantity if c.check == 'parity' else f'{c.quantity} not finite'
    return f'{c.check} {c.name}{trial} {what}'
  return (f'{c.check} {c.name}{trial} {c.quantity} {_number(c.difference)} '
          f'({_share(c.share)} of its tolerance)')


def _share(share: float) -> str:
  return f'{100 * share:.3g}%'


def _number(value: float | None) -> str:
  return '' if value is None or math.isnan(value) else f'{value:.4g}'


def _table(checks: Sequence[Check]) -> list[str]:
  lines = ['| check | name | trial | quantity | torch | lc-jax | difference | tolerance '
           '| of tolerance |', '|---|---|---|---|---:|---:|---:|---:|---:|']
  for c in checks:
    share = '' if math.isnan(c.tolerance) else _share(c.share) + ('' if c.passed else ' **x**')
    lines.append(f'| {c.check} | {c.name} | {"" if c.trial is None else c.trial} | '
                 f'{c.quantity} | {_number(c.torch)} | {_number(c.lc_jax)} | '
                 f'{_number(c.difference)} | {_number(c.tolerance)} | {share} |')
  return lines


def parse_tolerances(text: str) -> dict[str, float]:
  """The tolerance overrides of `text`, 'name=value,...' (empty: none)."""
  overrides = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, _, value = (part.strip() for part in item.partition('='))
    _check_tolerance_name(name)
    try:
      overrides[name] = float(value)
    except ValueError:
      raise UserError(f'tolerance {name} needs a number, got {value!r} '
                      f'(e.g. --tolerance={name}={TOLERANCES[name]:g})') from None
    if not overrides[name] >= 0:
      raise UserError(f'tolerance {name}={value} must be a number >= 0')
  return overrides


def _check_tolerance_name(name: str) -> None:
  if name not in TOLERANCES:
    raise UserError(f'unknown tolerance {name!r}{errors.did_you_mean(name, TOLERANCES)} '
                    f'(known: {", ".join(TOLERANCES)})')


# ------------------------------------------------------------------------ the comparisons ------


def parity_checks(module, variables: dict, model, images: np.ndarray,
                  tolerances: Mapping[str, float]) -> list[Check]:
  """The original's logits and module outputs, lc-jax against the torch `model` holding the
  same weights, over uint8 `images` in batches (`converters.parity.compare`); in torch's
  forward order, the logits first.

  An output that is not finite on either side fails (quantity NOT_FINITE), and so does one that
  is all zeros on both sides while the logits are not (ALL_ZEROS): neither compares anything.
  """
  diffs: dict[str, float] = {}
  scales: dict[str, float] = {}
  for start in range(0, len(images), PARITY_BATCH):
    batch = np.asarray(images[start:start + PARITY_BATCH], np.float32) / 255
    found = parity.compare(module, variables, model, batch)
    for name, diff in found['diffs'].items():
      diffs[name] = _largest(diffs.get(name, 0.0), diff)
      scales[name] = _largest(scales.get(name, 0.0), found['scales'][name])
  checks = []
  for name, diff in diffs.items():
    scale, tolerance = scales[name], tolerances['logits' if name == 'logits' else 'activations']
    # |lc-jax - torch| is finite exactly when both sides are; the largest |torch value| tells
    # which side is not.
    if not math.isfinite(diff):
      side = 'torch' if not math.isfinite(scale) else 'lc-jax'
      checks.append(Check('parity', name, None, NOT_FINITE.format(side), scale, math.nan,
                          math.nan, tolerance, math.inf))
    elif diff == 0 and scale == 0 and name != 'logits' and scales['logits'] > 0:
      checks.append(Check('parity', name, None, ALL_ZEROS, 0.0, 0.0, math.nan, tolerance,
                          math.inf))
    else:
      checks.append(_judged('parity', name, None, 'relative max diff', scale, math.nan,
                            diff / max(1.0, scale), tolerance))
  return checks


def _largest(a: float, b: float) -> float:
  """max(a, b), but NaN when either is (Python's max keeps a NaN only in first place)."""
  return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


def first_disagreement(checks: Sequence[Check], layers: Sequence[layers_lib.Layer]
                       ) -> tuple[str | None, str | None, str | None]:
  """(module, stage, layer): the first module output over its tolerance in forward order, the
  stage it lies in, and the first inventory layer over it (None where all are within)."""
  by_name = {layer.name: layer for layer in layers}
  blocks = {layer.block: layer.stage for layer in layers if layer.block not in ('stem', 'head')}
  module = stage = layer = None
  seen_block = False
  for c in checks:
    if c.check != 'parity' or c.name == 'logits':
      continue
    if c.name in by_name:
      where = by_name[c.name].stage
    else:
      # A block, a stage, or a module inside one; outside them, the stem or the head.
      where = next((s for b, s in blocks.items() if c.name in (b, s)
                    or c.name.startswith(b + '.')), None)
      where = where or ('head' if seen_block else 'stem')
    seen_block |= where not in ('stem', 'head')
    if not c.passed:
      if module is None:
        module, stage = c.name, where
      if layer is None and c.name in by_name:
        layer = c.name
  return module, stage, layer


def metric_checks(theirs: Sequence[Mapping[str, Any]], ours: Mapping[tuple[str, int], Mapping],
                  tolerances: Mapping[str, float]) -> list[Check]:
  """Every metric column of every row of the torch loop (`theirs`) against lc-jax's row of the
  same (layer, trial) in `ours`; LABELLED columns both leave empty (no labels) are left out,
  any other column empty or not finite on either side fails."""
  original_top1 = theirs[0]['top1_acc']
  checks = []
  for row in theirs:
    mine = ours.get((row['layer'], row['trial']))
    if mine is None:
      raise RuntimeError(f'lc-jax has no row of {row["layer"]} trial {row["trial"]}')
    for column in schema.METRICS:
      torch_value, value = float(row[column]), float(mine[column])
      if math.isnan(torch_value) and math.isnan(value) and column in LABELLED:
        continue
      if column in COUNTED:
        # recovered_acc is top1_acc / the original's: one image is original_top1 / 100 / N.
        unit = COUNTED[column] or original_top1 / 100
        difference, tolerance = abs(value - torch_value) * unit, tolerances['images']
      else:
        difference = abs(value - torch_value) / max(1.0, abs(torch_value))
        tolerance = tolerances['metrics']
      if not math.isfinite(difference):  # NaN or inf on a side: nothing compared
        difference = math.nan
      checks.append(_judged('metric', row['layer'], row['trial'], column, torch_value, value,
                            difference, tolerance))
  return checks


def init_checks(layers: Sequence[layers_lib.Layer], ours: dict,
                theirs: Mapping[str, np.ndarray], tolerances: Mapping[str, float],
                seed: int = 0) -> list[Check]:
  """lc-jax's fresh variables `ours` (a tree of `lc_jax.init.fresh_variables`) against a fresh
  torch state_dict `theirs`, each variable pooled over the layers of a kind ('conv/weight'):
  two-sample KS test (on at most KS_SAMPLE values a side), std ratio, the BOUNDS quantiles, and
  (shown only) the smallest and largest values."""
  import scipy.stats  # pylint: disable=g-import-not-at-top
  pools: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
  for layer in layers:
    for leaf_path in layer.shapes:
      collection, leaf = leaf_path.split('/')
      node = ours[collection]
      for part in layer.path:
        node = node[part]
      key = mapping.torch_key(collection, layer.path + (leaf,))
      pool = pools.setdefault(f'{layer.kind}/{key.rsplit(".", 1)[-1]}', ([], []))
      pool[0].append(np.ravel(np.asarray(node[leaf], np.float64)))
      pool[1].append(np.ravel(np.asarray(theirs[key], np.float64)))

  rng = np.random.default_rng(seed)

  def sample(values: np.ndarray) -> np.ndarray:
    return values if values.size <= KS_SAMPLE else rng.choice(values, KS_SAMPLE, replace=False)

  checks = []
  for name, (mine, torch_values) in pools.items():
    mine, torch_values = np.concatenate(mine), np.concatenate(torch_values)
    ks = scipy.stats.ks_2samp(sample(mine), sample(torch_values))
    p = float(ks.pvalue)
    checks.append(Check('init', name, None, 'ks_statistic', math.nan, math.nan,
                        float(ks.statistic)))
    checks.append(Check('init', name, None, 'ks_pvalue', math.nan, math.nan, p,
                        tolerances['ks_p'], tolerances['ks_p'] / p if p > 0 else math.inf))
    # The spread and the bounds of a small pool (a classifier's bias, a class token) are shown,
    # not judged: KS's p-value accounts for the size of its samples, they do not.
    def judge(tolerance: str) -> float:
      return tolerances[tolerance] if mine.size >= MIN_JUDGED else math.nan

    std, torch_std = float(mine.std()), float(torch_values.std())
    checks.append(_judged('init', name, None, 'std', torch_std, std,
                          _relative(std, torch_std, torch_std), judge('std')))
    # Bounds: the extreme quantiles are held to the tolerance. The smallest and largest values
    # are shown only: over 8 seeds, those of ResNet-18's conv weights differed between the
    # frameworks by up to 31%, the 1% and 99% quantiles by at most 0.3%.
    quantiles = np.quantile(mine, BOUNDS), np.quantile(torch_values, BOUNDS)
    scale = float(np.max(np.abs(quantiles[1])))
    for q, value, torch_value in zip(BOUNDS, *quantiles):
      checks.append(_judged('init', name, None, f'quantile {q:g}', float(torch_value),
                            float(value), _relative(float(value), float(torch_value), scale),
                            judge('bounds')))
    for quantity, fn in (('min', np.min), ('max', np.max)):
      value, torch_value = float(fn(mine)), float(fn(torch_values))
      checks.append(Check('init', name, None, quantity, torch_value, value, math.nan))
  return checks


def _relative(value: float, reference: float, scale: float) -> float:
  """|value - reference| / scale; equal values are 0 apart even at scale 0."""
  if value == reference:
    return 0.0
  return abs(value - reference) / scale if scale else math.inf


# ------------------------------------------------------------------------ the run --------------


def run(config: ml_collections.ConfigDict | lc_config.RunConfig, out: str,
        tolerances: Mapping[str, float] | None = None) -> Report:
  """Cross-validates the run of `config` into the folder `out` (see the module docstring);
  returns the report, also written to OUT/crossval.md and OUT/crossval.csv.

  `tolerances` overrides entries of TOLERANCES. The config must reset fresh, layer by layer,
  with an architecture that has a torch counterpart; anything else is one UserError before work
  starts.
  """
  for name in tolerances or {}:
    _check_tolerance_name(name)
  tolerances = {**TOLERANCES, **(tolerances or {})}
  settings = experiment.check(config)
  if settings.reset.mode != 'fresh':
    raise UserError(f'crossval checks fresh resets, drawn once in torch for both frameworks; '
                    f'reset.mode={settings.reset.mode} is not supported (leave it at fresh)')
  if settings.reset.granularity != 'layer':
    raise UserError('crossval compares with the torch loop, which resets one layer at a time: '
                    f'reset.granularity={settings.reset.granularity} is not supported (use layer)')
  if settings.model.arch:
    parity.timm_name(settings.model.arch)  # one without a torch counterpart is refused now
  torch, timm, torch_reference = _torch()
  out = workdir.ensure_folder(out, '--out', 'the cross-validation report')
  show = settings.progress

  def say(message: str) -> None:
    if show:
      print(f'crossval: {message}', file=sys.stderr, flush=True)

  # ---------------------------------------------------------------- model, images, layers ----
  # Converted into OUT/model: the lc-jax runs' workdirs are theirs to check before they write.
  model = experiment.prepare_model(settings, out)
  arch = model.spec.name
  timm_model = parity.timm_name(arch)
  num_classes = int(model.card['num_classes'])
  images, labels, info = data.load(settings.data, cache_dir=settings.cache_dir or None,
                                   progress=show)
  if not info.valid.all():  # rows that did not decode are zeros: left out
    images = images[info.valid]
    labels = None if labels is None else labels[info.valid]
  if not len(images):
    raise UserError('the image set is empty')
  names = [target.name for target in experiment.select_targets(settings, model)]
  trials = settings.num_trials

  # ---------------------------------------------------------------- fresh models, in torch ---
  fresh_dir = workdir.ensure_folder(os.path.join(out, 'fresh'), '--out', 'the fresh models')
  fresh, fresh_paths = [], []
  for trial in range(trials):
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(int(np.random.SeedSequence([settings.seed, trial]).generate_state(1)[0]))
      state = timm.create_model(timm_model, pretrained=False, num_classes=num_classes).state_dict()
    tensors = {k: v.numpy() for k, v in state.items() if not k.endswith('num_batches_tracked')}
    path = os.path.join(fresh_dir, f'trial{trial}.safetensors')
    _save_safetensors(tensors, path)
    fresh.append(tensors)
    fresh_paths.append(path)

  # ---------------------------------------------------------------- the torch loop ----------
  trained = parity.torch_model(arch, model.variables, num_classes)
  if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = False  # float32, as lc-jax's 'highest'
    torch.backends.cudnn.allow_tf32 = False
    trained.to('cuda')
  device = next(trained.parameters()).device
  # The torch loop's full forwards take most of the time: one, timed, tells the user how long.
  start = time.perf_counter()
  torch_reference.evaluate(trained, images, model.module.mean, model.module.std,
                           settings.data.batch_size)
  forward = time.perf_counter() - start
  forwards = 1 + trials * len(names)
  # The lc-jax runs compile, then reuse prefixes: about a quarter of the torch loop, and some
  # seconds a trial (the demo on the 2-core CPU: 20 s against 34 s for 6 layers, 93 against
  # 531 for 99), and the parity check some seconds more.
  expected = 1.25 * forwards * forward + 10 * trials + 10
  print(f'crossval: expected about {_minutes(expected)}: the torch loop runs '
        f'{forwards} full forwards of {len(images)} images at {forward:.1f} s each (measured), '
        f'then {trials} lc-jax run{"s" * (trials != 1)} and the parity check; fewer layers '
        '(--layers) or trials (--config.trials) take less', file=sys.stderr, flush=True)
  say(f'torch ({timm_model} on {device}): the original and {trials} x {len(names)} resets '
      f'on {len(images)} images')
  seconds: dict[str, float] = {}
  with _timed(seconds, 'torch loop'):
    theirs = torch_reference.run_protocol(trained, fresh, images, labels, names,
                                          model.module.mean, model.module.std,
                                          settings.data.batch_size)

  # ---------------------------------------------------------------- lc-jax -------------------
  ours: dict[tuple[str, int], Mapping] = {}
  with _timed(seconds, 'lc-jax runs'):
    for trial, path in enumerate(fresh_paths):
      say(f'lc-jax trial {trial}: resets from {path}')
      reset = dataclasses.replace(settings.reset, mode='checkpoint', init_checkpoint=path)
      try:
        rows = experiment.run(dataclasses.replace(settings, reset=reset),
                              os.path.join(out, 'jax', f'trial{trial}'))
      except UserError as e:  # e.g. a run of other settings there: its workdir is crossval's
        raise UserError(f'lc-jax run of trial {trial}: {e} (crossval: give a new --out)'
                        ) from None
      for row in rows:
        if row['layer'] != schema.ORIGINAL:
          ours[(row['layer'], trial)] = row
        elif trial == 0:
          ours[(row['layer'], 0)] = row

  # ---------------------------------------------------------------- compare -----------------
  say('parity of the original model, module by module')
  with _timed(seconds, 'parity'):
    checks = parity_checks(model.module, model.variables, trained, images, tolerances)
  module, stage, layer = first_disagreement(checks, model.layers)
  metric = metric_checks(theirs, ours, tolerances)
  broken = {c.name for c in metric if not c.passed}
  first_row = next((name for name in [schema.ORIGINAL] + names if name in broken), None)
  checks += metric
  scheme = settings.reset.init_scheme or model.spec.init_scheme
  drawn = init.fresh_variables(model.layers, scheme,
                               jax.random.fold_in(jax.random.key(settings.seed), 0))
  checks += init_checks(model.layers, drawn, fresh[0], tolerances, settings.seed)

  context = [
      f'checkpoint {settings.model.checkpoint} (sha256 {model.card["sha256"][:12]}), '
      f'{arch}; torch counterpart timm {timm_model} on {device} (torch {torch.__version__}, '
      f'timm {timm.__version__}); lc-jax on {jax.default_backend()} (jax {jax.__version__}), '
      f'precision {settings.precision}, matmul precision {settings.matmul_precision}',
      f'{len(images)} images ({info.source}, {images.shape[1]}x{images.shape[2]}), '
      f'{"labelled" if labels is not None else "no labels"}; {len(names)} layers '
      f'({", ".join(settings.reset.types)}), trials: {trials}, seed {settings.seed}',
      f'fresh models: {os.path.relpath(fresh_dir, out)}/trialT.safetensors (torch, drawn with '
      f'seed {settings.seed}); lc-jax runs: jax/trialT/results.csv',
      'seconds: ' + ', '.join(f'{name} {value:.0f}' for name, value in seconds.items()),
  ]
  stages = list(dict.fromkeys(layer.stage for layer in model.layers))
  report = Report(arch, checks, tolerances, stages, module, stage, layer, first_row, context)
  report.write(out)
  return report


def _minutes(seconds: float) -> str:
  return f'{seconds:.0f} s' if seconds < 90 else f'{seconds / 60:.0f} min'


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str):
  """Records the seconds the `with` block took as `seconds[name]`."""
  start = time.perf_counter()
  yield
  seconds[name] = time.perf_counter() - start


def _torch():
  """torch, timm and lc_jax.torch_reference (which needs torch), or a UserError saying how to
  install them."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from lc_jax import torch_reference  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'crossval needs the torch extra (torch, timm): pip install '
                    f'"lc-jax[torch]" ({e})') from None
  return torch, timm, torch_reference


def _save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(dict(tensors), path)


# ------------------------------------------------------------------------ command line --------


_FLAGS: dict[str, Any] = {}


@errors.exits_cleanly
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _FLAGS['config'].value
  tolerances = parse_tolerances(_FLAGS['tolerance'].value)
  if _FLAGS['layers'].value is not None:
    config.reset.layers = _FLAGS['layers'].value
  elif not config.reset.layers:  # the config's all layers: the torch loop would take long
    config.reset.layers = QUICK_LAYERS
  if _FLAGS['quiet'].value:
    config.progress = False
  report = run(config, _FLAGS['out'].value, tolerances)
  print(report.verdict())
  print('worst lines:')
  for c in report.worst(5):
    print(f'  {_describe(c)}')
  out = os.path.abspath(_FLAGS['out'].value)
  print(f'report: {os.path.join(out, "crossval.md")}, every check: '
        f'{os.path.join(out, "crossval.csv")}')
  if not report.passed:
    sys.exit(DISAGREE)


def _run() -> None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  _FLAGS.update(
      config=errors.define_config_file('config', os.path.join(root, 'configs', 'demo.py'),
                                       'Run config file (checkpoint, images, layers, trials).'),
      out=flags.DEFINE_string('out', 'out/crossval', 'Folder for crossval.md, crossval.csv, '
                              'the fresh models and the lc-jax runs.'),
      layers=flags.DEFINE_string(
          'layers', None, 'Layers to reset (as --config.reset.layers); by default the '
          f"config's, or {QUICK_LAYERS} when it names none (all); --layers= for all."),
      tolerance=flags.DEFINE_string(
          'tolerance', '', 'Tolerance overrides, name=value,... with names '
          f'{", ".join(TOLERANCES)}.'),
      quiet=flags.DEFINE_bool('quiet', False, 'No progress lines.'))
  app.run(main, flags_parser=errors.parse_flags)


if __name__ == '__main__':
  _run()
