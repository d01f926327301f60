"""Shared test set-up: float32 at matmul precision 'highest' wherever parity is asserted."""

import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def repo_root():
  """The repository's top folder (where run.py lives)."""
  return ROOT
