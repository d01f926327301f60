"""Shared test set-up: float32 at matmul precision 'highest' wherever parity is asserted."""

import os
import sys

# torch's OpenMP threads sleep when idle instead of spinning (set before torch is imported, and
# inherited by the runs the tests start): on a loaded CPU, or next to XLA's own threads in the
# same process, spinning threads made a torch forward several times slower. It changes when
# idle threads give up the CPU, not what they compute.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def repo_root():
  """The repository's top folder (where run.py lives)."""
  return ROOT
