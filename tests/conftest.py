"""Shared test set-up: float32 at matmul precision 'highest' wherever parity is asserted."""

import atexit
import os
import shutil
import sys
import tempfile

# torch's OpenMP threads sleep when idle instead of spinning (set before torch is imported, and
# inherited by the runs the tests start): on a loaded CPU, or next to XLA's own threads in the
# same process, spinning threads made a torch forward several times slower. It changes when
# idle threads give up the CPU, not what they compute.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

# The caches a run keeps under ~/.cache/lc_jax (compiled programs, decoded images, zoo files) live
# in a folder of this session's, inherited by the runs the tests start: a test never reads what an
# earlier session left (on a developer's machine as on a fresh CI one) nor writes to the user's.
_CACHES = tempfile.mkdtemp(prefix='lc_jax_test_caches_')
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
for _name, _folder in (('LC_JAX_COMPILATION_CACHE', 'compilation'), ('LC_JAX_CACHE_DIR', 'images'),
                       ('LC_JAX_ZOO_DIR', 'zoo')):
  os.environ[_name] = os.path.join(_CACHES, _folder)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture(scope='session')
def repo_root():
  """The repository's top folder (where run.py lives)."""
  return ROOT


_CACHE_SETTINGS = ('jax_enable_compilation_cache', 'jax_compilation_cache_dir',
                   'jax_persistent_cache_min_compile_time_secs',
                   'jax_persistent_cache_min_entry_size_bytes')


@pytest.fixture(autouse=True)
def _restore_compilation_cache():
  """JAX's persistent compilation cache as it was before the test, when the test pointed it at a
  folder of its own (a run's compilation_cache_dir in tmp_path): no later test writes into a
  deleted folder. The session's folder (LC_JAX_COMPILATION_CACHE), which any run turns on, stays."""
  before = {name: getattr(jax.config, name) for name in _CACHE_SETTINGS}
  yield
  folder = jax.config.jax_compilation_cache_dir
  if folder not in (before['jax_compilation_cache_dir'], os.environ['LC_JAX_COMPILATION_CACHE']):
    from jax.experimental import compilation_cache  # pylint: disable=g-import-not-at-top
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.compilation_cache.reset_cache()
