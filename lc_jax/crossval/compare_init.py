"""The init check: per layer kind and variable, lc-jax's own fresh draws (`lc_jax.init`, the
architecture's scheme) against the torch initialiser's: two-sample KS test, std ratio, bounds."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from converters import mapping
from lc_jax import layers as layers_lib
from lc_jax.crossval.report import Check
from lc_jax.crossval.report import judged

KS_SAMPLE = 100_000  # values per side of a KS test (drawn without replacement from more)
BOUNDS = (0.01, 0.99)  # the quantiles of a fresh draw held to the 'bounds' tolerance
# Values a pooled draw needs for its std and bounds to be judged: from N(0, s^2), the std of
# 10,000 values is s within 1% (one standard deviation), the 1% quantile within 1.6%.
MIN_JUDGED = 10_000


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
    checks.append(judged('init', name, None, 'std', torch_std, std,
                          _relative(std, torch_std, torch_std), judge('std')))
    # Bounds: the extreme quantiles are held to the tolerance. The smallest and largest values
    # are shown only: over 8 seeds, those of ResNet-18's conv weights differed between the
    # frameworks by up to 31%, the 1% and 99% quantiles by at most 0.3%.
    quantiles = np.quantile(mine, BOUNDS), np.quantile(torch_values, BOUNDS)
    scale = float(np.max(np.abs(quantiles[1])))
    for q, value, torch_value in zip(BOUNDS, *quantiles):
      checks.append(judged('init', name, None, f'quantile {q:g}', float(torch_value),
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
