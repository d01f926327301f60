"""The checks of a cross-validation and its report: `Check`, one compared quantity held to its
tolerance; `Report`, every check of a run, its verdict and where the first disagreement lies,
written as OUT/crossval.md (for a reader) and OUT/crossval.csv (every check, CSV_COLUMNS)."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Sequence

CSV_COLUMNS = ('check', 'name', 'trial', 'quantity', 'torch', 'lc_jax', 'difference',
               'tolerance', 'share', 'passed')


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


def judged(check: str, name: str, trial: int | None, quantity: str, torch: float,
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
    worst = ', '.join(describe(self.worst(1, kind)[0]) for kind in ('parity', 'metric', 'init')
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
                f'frameworks), the first: {describe(blind[0])}')
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


def describe(c: Check) -> str:
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
