"""Cross-framework validation: one checkpoint, the same reset weights and the same images through
the paper's loop in PyTorch (`lc_jax.torch_reference`) and through lc-jax, compared.

    python -m lc_jax.crossval --out=out/crossval    # the command: lc_jax.crossval.cli, --help

    from lc_jax import crossval
    report = crossval.run(config, 'out/crossval')   # a Report, also written to OUT/crossval.md
    print(report.verdict())                         # and OUT/crossval.csv

Modules: report (Check, Report: the checks, the verdict, crossval.md and crossval.csv),
tolerances (TOLERANCES and their overrides), compare_parity, compare_metrics and compare_init
(the three comparisons), validate (`run`: the whole cross-validation), cli (the command).

Importing the package imports none of them: each name below is read from its module on first
use, so that `python -m lc_jax.crossval` sets malloc up (lc_jax.launch) before JAX is imported.
"""

import importlib

# Each public name, and the module that defines it.
_HOMES = {
    'CSV_COLUMNS': 'report',
    'Check': 'report',
    'Report': 'report',
    'TOLERANCES': 'tolerances',
    'parse_tolerances': 'tolerances',
    'ALL_ZEROS': 'compare_parity',
    'NOT_FINITE': 'compare_parity',
    'PARITY_BATCH': 'compare_parity',
    'first_disagreement': 'compare_parity',
    'parity_checks': 'compare_parity',
    'COUNTED': 'compare_metrics',
    'LABELLED': 'compare_metrics',
    'metric_checks': 'compare_metrics',
    'BOUNDS': 'compare_init',
    'KS_SAMPLE': 'compare_init',
    'MIN_JUDGED': 'compare_init',
    'init_checks': 'compare_init',
    'run': 'validate',
    'DISAGREE': 'cli',
    'QUICK_LAYERS': 'cli',
    'main': 'cli',
}
__all__ = list(_HOMES)


def __getattr__(name: str):
  if name not in _HOMES:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  value = getattr(importlib.import_module(f'{__name__}.{_HOMES[name]}'), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_HOMES))
