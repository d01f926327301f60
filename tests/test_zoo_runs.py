"""model.offline and model.mirrors through a run and a sweep, not only through lc_jax.zoo: a zoo
checkpoint fetched through a mirror (a local server standing in for its HTTPS source), then
run offline from the zoo's cache with the server gone, giving the same rows; offline with an
empty cache is one error naming the command that fetches it."""

import json

import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')
safetensors_torch = pytest.importorskip('safetensors.torch')

from lc_jax import config as lc_config  # pylint: disable=g-import-not-at-top,g-bad-import-order
from lc_jax import experiment
from lc_jax import sweep
from lc_jax.errors import UserError
from lc_jax.zoo import registry

from test_zoo import Server, pin  # pylint: disable=g-import-not-at-top

MODEL = 'tv_resnet50'  # a plain HTTPS source (a Hub resolve URL): mirrors rewrite it


@pytest.fixture
def served(tmp_path, monkeypatch):
  """A torchvision ResNet-50 (random weights) served as `MODEL`'s file by a local server, its
  sha256 pinned; an empty zoo cache, no mirrors or offline mode from the environment."""
  path = tmp_path / 'model.safetensors'
  torch.manual_seed(0)
  state = torchvision.models.resnet50().state_dict()
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
  data = path.read_bytes()
  server = Server()
  server.serve(MODEL, [data])
  pin(monkeypatch, MODEL, [data])
  monkeypatch.setenv('LC_JAX_ZOO_DIR', str(tmp_path / 'zoo'))
  monkeypatch.delenv('LC_JAX_ZOO_MIRRORS', raising=False)
  monkeypatch.delenv('LC_JAX_OFFLINE', raising=False)
  yield server
  server.close()


def _config(tmp_path, **model):
  config = lc_config.default()
  config.model.update(checkpoint='zoo:' + MODEL, **model)
  config.data.update(source='photos', num_images=3, order='sorted', batch_size=3,
                     resize_size=36, crop_size=32)
  config.reset.layers = 'fc'
  config.trials, config.progress, config.cache_dir = 1, False, str(tmp_path / 'cache')
  config.compilation_cache_dir = 'none'
  return config


def _values(rows):
  return [(r['layer'], r['trial'], r['criticality']) for r in rows]


def test_a_run_fetches_through_mirrors_then_runs_offline(served, tmp_path, monkeypatch):
  mirrors = json.dumps({'https://': served.base})
  online = experiment.run(_config(tmp_path, mirrors=mirrors), str(tmp_path / 'online'))
  assert served.requests == [served.key(registry.get(MODEL).sources[0])]
  served.close()  # nothing to fetch from any more
  offline = experiment.run(_config(tmp_path, offline=True), str(tmp_path / 'offline'))
  assert _values(offline) == _values(online) and len(online) == 2
  assert np.isfinite(online[1]['criticality']) and online[1]['criticality'] > 0

  monkeypatch.setenv('LC_JAX_ZOO_DIR', str(tmp_path / 'empty'))
  with pytest.raises(UserError, match=f'python -m lc_jax.zoo fetch {MODEL}') as raised:
    experiment.run(_config(tmp_path, offline=True), str(tmp_path / 'nothing'))
  assert '\n' not in str(raised.value)
  assert not (tmp_path / 'nothing' / 'results.csv').exists()


def test_a_sweep_takes_the_mirrors_and_offline_mode_of_its_config(served, tmp_path):
  config = _config(tmp_path, mirrors=json.dumps({'https://': served.base}))
  state = sweep.run(ml_collections.ConfigDict(config.to_dict()), str(tmp_path / 'sweep'), [MODEL])
  assert state['done'] == [MODEL] and not state['failed']
  served.close()
  offline = _config(tmp_path, offline=True)
  state = sweep.run(offline, str(tmp_path / 'sweep_offline'), [MODEL])
  assert state['done'] == [MODEL], state['failed']
