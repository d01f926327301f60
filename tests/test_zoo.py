"""The zoo: the registry against the paper's facts, and downloads (verified, atomic, offline,
mirrored, added by hand) from a local HTTP server that the mirror map points every source at.

No test touches the network: every source's canonical URL https://HOST/PATH is rewritten to
http://127.0.0.1:PORT/HOST/PATH, and the files served are small synthetic ones (the checkpoint
layouts are tested with the converters).
"""

import collections
import dataclasses
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from lc_jax import checkpoints
from lc_jax import zoo
from lc_jax.errors import UserError
from lc_jax.zoo import cache
from lc_jax.zoo import registry
from lc_jax.zoo import transport
from local_server import LocalServer  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The paper's code/r50_categories.json (paulgavrikov/layer_criticality), copied.
R50_CATEGORIES = {
    'baseline': ['tv_resnet50'],
    'training_recipes': ['tv2_resnet50', 'resnet50.d_in1k', 'resnet50.c1_in1k',
                         'resnet50.b1k_in1k', 'resnet50.c2_in1k', 'resnet50.b2k_in1k',
                         'resnet50.a3_in1k', 'resnet50.a2_in1k', 'resnet50.a1h_in1k',
                         'resnet50.a1_in1k'],
    'augmentation': ['resnet50_diffusionnoise_fixed_nonoise', 'resnet50_prime',
                     'resnet50_deepaugment', 'resnet50_noisymix', 'resnet50_deepaugment_augmix',
                     'resnet50_pixmix_90ep', 'resnet50_pixmix_180ep', 'resnet50_augmix_180ep',
                     'resnet50_tsbias_tbias', 'resnet50_tsbias_sbias', 'resnet50_tsbias_debiased',
                     'resnet50_opticsaugment', 'resnet50.autoaugment_270ep',
                     'resnet50.fastautoaugment_270ep', 'resnet50.randaugment_270ep',
                     'resnet50_trained_on_SIN',
                     'resnet50_trained_on_SIN_and_IN_then_finetuned_on_IN',
                     'resnet50_trained_on_SIN_and_IN'],
    'freezing': ['resnet50_frozen_random'],
    'adversarial_training': ['robust_resnet50_l2_eps0.01', 'robust_resnet50_l2_eps0.03',
                             'robust_resnet50_l2_eps0.05', 'robust_resnet50_l2_eps0.1',
                             'robust_resnet50_l2_eps0.25', 'robust_resnet50_l2_eps0.5',
                             'robust_resnet50_l2_eps1', 'robust_resnet50_linf_eps8.0',
                             'robust_resnet50_l2_eps5', 'robust_resnet50_linf_eps0.5',
                             'robust_resnet50_linf_eps1.0', 'robust_resnet50_linf_eps2.0',
                             'robust_resnet50_linf_eps4.0', 'robust_resnet50_l2_eps0',
                             'robust_resnet50_l2_eps3'],
    'contrastive': ['resnet50_moco_v3_100ep', 'resnet50_moco_v3_300ep',
                    'resnet50_moco_v3_1000ep', 'resnet50_dino', 'resnet50_swav',
                    'resnet50_simclrv2'],
}

# ../shared/zoo/PAPER_MODELS.md, the acc column: top-1 on the 10k subset [full validation set].
TOP1 = {
    'tv_resnet50': (76.29, 76.15), 'tv2_resnet50': (80.89, 80.34),
    'resnet50.a1_in1k': (80.63, 80.10), 'resnet50.a1h_in1k': (80.33, 80.10),
    'resnet50.a2_in1k': (80.06, 79.80), 'resnet50.a3_in1k': (78.07, 77.55),
    'resnet50.b1k_in1k': (79.39, 79.16), 'resnet50.b2k_in1k': (79.72, 79.27),
    'resnet50.c1_in1k': (80.06, 79.76), 'resnet50.c2_in1k': (80.45, 79.92),
    'resnet50.d_in1k': (79.91, 79.89), 'resnet50_augmix_180ep': (77.85, 77.53),
    'resnet50_deepaugment': (77.25, 77.65), 'resnet50_deepaugment_augmix': (76.11, 75.80),
    'resnet50_pixmix_90ep': (77.62, 77.36), 'resnet50_pixmix_180ep': (78.57, 78.09),
    'resnet50_noisymix': (77.61, 77.05), 'resnet50_tsbias_tbias': (75.33, 75.27),
    'resnet50_tsbias_sbias': (76.76, 76.21), 'resnet50_tsbias_debiased': (77.23, 76.89),
    'resnet50_opticsaugment': (74.47, 74.22), 'resnet50_prime': (77.03, 76.91),
    'resnet50.autoaugment_270ep': (78.06, 77.50), 'resnet50.fastautoaugment_270ep': (78.18, 77.65),
    'resnet50.randaugment_270ep': (77.69, 77.64),
    'resnet50_diffusionnoise_fixed_nonoise': (67.47, 67.22),
    'resnet50_trained_on_SIN': (60.66, 60.18), 'resnet50_trained_on_SIN_and_IN': (74.72, 74.59),
    'resnet50_trained_on_SIN_and_IN_then_finetuned_on_IN': (77.11, 76.72),
    'resnet50_frozen_random': (75.04, 74.76),
    'robust_resnet50_l2_eps0': (76.07, 75.81), 'robust_resnet50_l2_eps0.01': (75.85, 75.67),
    'robust_resnet50_l2_eps0.03': (76.08, 75.77), 'robust_resnet50_l2_eps0.05': (76.16, 75.58),
    'robust_resnet50_l2_eps0.1': (74.81, 74.79), 'robust_resnet50_l2_eps0.25': (74.11, 74.14),
    'robust_resnet50_l2_eps0.5': (73.57, 73.17), 'robust_resnet50_l2_eps1': (70.77, 70.42),
    'robust_resnet50_l2_eps3': (62.89, 62.83), 'robust_resnet50_l2_eps5': (56.49, 56.14),
    'robust_resnet50_linf_eps0.5': (74.11, 73.74), 'robust_resnet50_linf_eps1.0': (72.22, 72.04),
    'robust_resnet50_linf_eps2.0': (69.37, 69.09), 'robust_resnet50_linf_eps4.0': (64.21, 63.87),
    'robust_resnet50_linf_eps8.0': (54.68, 54.53), 'resnet50_moco_v3_100ep': (69.43, 68.91),
    'resnet50_moco_v3_300ep': (73.20, 72.80), 'resnet50_moco_v3_1000ep': (74.72, 74.60),
    'resnet50_dino': (75.28, 75.28), 'resnet50_swav': (75.49, 75.31),
    'resnet50_simclrv2': (75.16, 74.90),
}

GDRIVE = ('resnet50_augmix_180ep', 'resnet50_deepaugment', 'resnet50_deepaugment_augmix',
          'resnet50_pixmix_90ep', 'resnet50_pixmix_180ep', 'resnet50_noisymix',
          'resnet50_tsbias_tbias', 'resnet50_tsbias_sbias', 'resnet50_tsbias_debiased',
          'resnet50_frozen_random', 'resnet50_opticsaugment', 'resnet50_simclrv2')
TIMM_TAGS = ('a1_in1k', 'a1h_in1k', 'a2_in1k', 'a3_in1k', 'b1k_in1k', 'b2k_in1k', 'c1_in1k',
             'c2_in1k', 'd_in1k')
MADRY_SHA_L2_EPS3 = '380b14e6f9750bffa1447cf7017f65da4dc5ce71a3dd112f107515dcf7b14d9d'
DIFFUSION_SHA = 'e7ef27d05c41612f4b9a730beedfd8ce22f971fdab6b7202482d41c47765c2ca'
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


# --- The registry against the paper's facts ---------------------------------------------------


def test_file_sha256_hashes_every_byte(tmp_path):
  # 3 MiB and 7 bytes, read in chunks of 1 MiB: a change in the last byte changes the digest.
  from lc_jax.digest import file_sha256  # pylint: disable=g-import-not-at-top
  data = bytes(range(256)) * (3 * 4096) + b'1234567'
  path = tmp_path / 'big.bin'
  for content in (data, data[:-1] + b'!'):
    path.write_bytes(content)
    assert file_sha256(str(path)) == hashlib.sha256(content).hexdigest()


def test_ids_and_categories_are_the_papers():
  assert len(zoo.ids()) == 51 == len(set(zoo.ids()))
  assert zoo.CATEGORIES == tuple(R50_CATEGORIES)
  for category, model_ids in R50_CATEGORIES.items():
    assert sorted(zoo.ids(category)) == sorted(model_ids)
    assert all(zoo.get(i).category == category for i in model_ids)


def test_recipes_and_source_kinds_as_in_the_table():
  entries = [zoo.get(i) for i in zoo.ids()]
  recipes = collections.Counter(e.recipe for e in entries)
  assert recipes == {'timm': 10, 'torchvision': 1, 'robustness': 15, 'state_dict': 18,
                     'aux_bn': 3, 'split': 2, 'simclrv2': 1, 'diffusionnoise': 1}
  state_dict_kinds = collections.Counter(e.sources[0].kind for e in entries
                                         if e.recipe == 'state_dict')
  assert state_dict_kinds == {'url': 10, 'gdrive': 8}  # T-URL and T-GD
  assert sorted(e.id for e in entries if e.sources[0].kind == 'gdrive') == sorted(GDRIVE)
  assert [len(e.sources) for e in entries].count(2) == 2
  assert all(len(e.sources) == 1 for e in entries if e.recipe != 'split')


def test_sources_as_in_the_table():
  for tag in TIMM_TAGS:
    (source,) = zoo.get(f'resnet50.{tag}').sources
    assert (source.kind, source.repo, source.filename) == (
        'hf', f'timm/resnet50.{tag}', 'model.safetensors')
  assert zoo.get('tv_resnet50').sources[0].repo == 'timm/resnet50.tv_in1k'
  assert zoo.get('tv2_resnet50').sources[0].url == (
      'https://download.pytorch.org/models/resnet50-11ad3fa6.pth')
  robust = zoo.get('robust_resnet50_l2_eps3').sources[0]
  assert (robust.kind, robust.repo, robust.filename, robust.sha256) == (
      'hf', 'madrylab/robust-imagenet-models', 'resnet50_l2_eps3.ckpt', MADRY_SHA_L2_EPS3)
  diffusion = zoo.get('resnet50_diffusionnoise_fixed_nonoise').sources[0]
  assert (diffusion.repo, diffusion.filename, diffusion.sha256) == (
      'paulgavrikov/resnet50.in1k_diffusionnoise_90ep', 'resnet50_diffusionnoise_nonorm_last.pth',
      DIFFUSION_SHA)
  dino = zoo.get('resnet50_dino').sources
  assert [s.filename for s in dino] == ['dino_resnet50_pretrain.pth',
                                        'dino_resnet50_linearweights.pth']
  assert zoo.get('resnet50_noisymix').sources[0].gdrive_id == '1Na79fzPZ0Azg01h6kGn1Xu5NoWOElSuG'
  assert zoo.get('resnet50_prime').sources[0].filename == 'ResNet50_ImageNet_PRIME_noJSD.ckpt'
  known = [i for i in zoo.ids() if zoo.get(i).sources[0].sha256]
  assert len(known) == 14  # 13 madrylab files with a Git-LFS digest + the diffusionnoise file
  assert zoo.get('robust_resnet50_l2_eps0.25').sources[0].sha256 is None
  assert zoo.get('robust_resnet50_linf_eps1.0').sources[0].sha256 is None
  for model_id in zoo.ids():
    entry = zoo.get(model_id)
    for source in entry.sources:
      assert source.canonical_url.startswith('https://')
      if source.kind == 'hf':
        assert source.revision
        if source.revision == 'main':  # pinned only where a commit is known; else said so
          assert "revision 'main'" in entry.notes
      assert source.sha256 is None or len(source.sha256) == 64


def test_normalisation_init_and_accuracy_as_in_the_table():
  for model_id in zoo.ids():
    entry = zoo.get(model_id)
    if model_id in ('resnet50_simclrv2', 'resnet50_diffusionnoise_fixed_nonoise'):
      assert (entry.mean, entry.std) == ((0, 0, 0), (1, 1, 1))
    else:
      assert (entry.mean, entry.std) == IMAGENET
    assert entry.init_scheme == ('torchvision_resnet' if model_id == 'tv2_resnet50'
                                 else 'timm_resnet')
    assert (entry.expected_top1, entry.full_val_top1) == TOP1[model_id]
    assert entry.method
  assert 'unconfirmed' in zoo.get('resnet50_deepaugment').notes
  with pytest.raises(dataclasses.FrozenInstanceError):
    zoo.get('resnet50_dino').recipe = 'timm'


def test_every_recipe_is_a_converter_layout():
  converters = pytest.importorskip('converters')
  if not hasattr(converters, 'LAYOUTS'):
    pytest.skip('converters.LAYOUTS (converters/layouts.py) does not exist yet')
  assert {zoo.get(i).recipe for i in zoo.ids()} <= set(converters.LAYOUTS)


def test_unknown_id_names_the_closest():
  with pytest.raises(UserError, match=r"unknown model id 'resnet50_dinoo'.*resnet50_dino"):
    zoo.get('resnet50_dinoo')
  with pytest.raises(UserError, match='unknown category'):
    zoo.ids('supervised')


# --- A local server for the mirrored sources ----------------------------------------------------


class Server:
  """Serves `files` (URL path with query -> bytes) on 127.0.0.1; counts requests. A path in
  `truncate` gets half its bytes and a closed connection; one in `stall` gets half and then
  waits (bounded) for `release`."""

  def __init__(self):
    self.files, self.requests = {}, []
    self.truncate, self.stall = set(), set()
    self.half_sent, self.release = threading.Event(), threading.Event()
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      timeout = 20  # a stuck client cannot hold a server thread for ever

      def do_GET(self):  # pylint: disable=invalid-name
        outer.requests.append(self.path)
        data = outer.files.get(self.path)
        if data is None:
          self.send_error(404)
          return
        self.send_response(200)
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if self.path in outer.truncate or self.path in outer.stall:
          self.wfile.write(data[:len(data) // 2])
          self.wfile.flush()
          if self.path in outer.stall:
            outer.half_sent.set()
            outer.release.wait(30)
          self.close_connection = True
          return
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self.local = LocalServer(Handler)
    self.base = self.local.url + '/'

  def key(self, source) -> str:
    return '/' + source.canonical_url[len('https://'):]

  def serve(self, model_id, contents=None):
    """Serves synthetic files for `model_id`'s sources; returns their bytes."""
    sources = registry.get(model_id).sources
    contents = contents or [f'{model_id}/{s.filename} '.encode() * 50 for s in sources]
    for source, data in zip(sources, contents):
      self.files[self.key(source)] = data
    return contents

  def close(self):
    self.release.set()
    self.local.close()


@pytest.fixture
def server():
  s = Server()
  yield s
  s.close()


@pytest.fixture
def env(tmp_path, monkeypatch, server):
  """A fresh cache, every source mirrored to `server`, online."""
  monkeypatch.setenv('LC_JAX_ZOO_DIR', str(tmp_path / 'zoo'))
  monkeypatch.setenv('LC_JAX_ZOO_MIRRORS', json.dumps({'https://': server.base}))
  monkeypatch.delenv('LC_JAX_OFFLINE', raising=False)
  return tmp_path / 'zoo'


def pin(monkeypatch, model_id, contents):
  """Gives `model_id`'s sources the sha256 of `contents` (for entries with a known one)."""
  entry = registry.get(model_id)
  sources = tuple(dataclasses.replace(s, sha256=sha(d)) for s, d in zip(entry.sources, contents))
  by_id = registry._BY_ID  # pylint: disable=protected-access
  monkeypatch.setitem(by_id, model_id, dataclasses.replace(entry, sources=sources))


def leftovers(model_id):
  """Everything in the model's cache folder but complete files and their records."""
  folder = cache.folder(model_id)
  names = os.listdir(folder) if os.path.isdir(folder) else []
  filenames = {s.filename for s in registry.get(model_id).sources}
  return [n for n in names if n not in filenames and n[:-len('.sha256')] not in filenames]


# --- Downloads --------------------------------------------------------------------------------


def test_every_entry_downloads_verifies_and_records(env, server, monkeypatch):
  for model_id in zoo.ids():
    contents = server.serve(model_id)
    if any(s.sha256 for s in registry.get(model_id).sources):
      # The synthetic file is not the real one: its known sha256 refuses it.
      with pytest.raises(UserError, match=r'has sha256 [0-9a-f]{64}, but the known sha256 is'):
        zoo.fetch(model_id, progress=False)
      assert zoo.missing(model_id) == list(registry.get(model_id).sources)
      pin(monkeypatch, model_id, contents)
    paths = zoo.fetch(model_id, progress=False)
    entry = registry.get(model_id)
    assert paths == [cache.path(model_id, s) for s in entry.sources]
    for path, source, data in zip(paths, entry.sources, contents):
      assert os.path.basename(path) == source.filename
      assert open(path, 'rb').read() == data
      assert cache.recorded(model_id, source) == sha(data)
    assert leftovers(model_id) == []
  count = len(server.requests)
  assert count >= 51
  assert len(zoo.fetch('resnet50_swav', progress=False)) == 2  # cached: verified, not fetched
  assert len(server.requests) == count


def test_corrupt_download_is_refused_naming_the_file_and_both_digests(env, server, monkeypatch):
  model_id = 'robust_resnet50_l2_eps3'
  good = b'the real checkpoint' * 100
  pin(monkeypatch, model_id, [good])
  bad = good[:-1] + b'X'
  server.serve(model_id, [bad])
  with pytest.raises(UserError) as error:
    zoo.fetch(model_id, progress=False)
  message = str(error.value)
  assert 'resnet50_l2_eps3.ckpt' in message and sha(good) in message and sha(bad) in message
  assert '\n' not in message
  assert not os.path.exists(cache.path(model_id, registry.get(model_id).sources[0]))
  assert leftovers(model_id) == []
  server.serve(model_id, [good])
  assert open(zoo.fetch(model_id, progress=False)[0], 'rb').read() == good


def test_a_changed_source_is_refused_against_the_first_download(env, server):
  model_id = 'resnet50_noisymix'
  (first,) = server.serve(model_id)
  (path,) = zoo.fetch(model_id, progress=False)
  os.remove(path)  # the record stays
  server.serve(model_id, [b'another file'])
  with pytest.raises(UserError) as error:
    zoo.fetch(model_id, progress=False)
  assert sha(first) in str(error.value) and sha(b'another file') in str(error.value)
  assert 'resnet50_noisymix.pth' in str(error.value)
  assert not os.path.exists(path) and leftovers(model_id) == []


def test_download_cut_midway_leaves_nothing_and_the_next_call_completes(env, server):
  model_id = 'resnet50_moco_v3_100ep'
  (data,) = server.serve(model_id)
  key = server.key(registry.get(model_id).sources[0])
  server.truncate.add(key)
  with pytest.raises(UserError, match='failed .*run the same command'):
    zoo.fetch(model_id, progress=False)
  assert zoo.missing(model_id) and leftovers(model_id) == []
  assert cache.recorded(model_id, registry.get(model_id).sources[0]) is None
  server.truncate.clear()
  assert open(zoo.fetch(model_id, progress=False)[0], 'rb').read() == data


def test_download_killed_midway_leaves_nothing_and_the_next_call_completes(env, server):
  model_id = 'resnet50_prime'
  (data,) = server.serve(model_id, [os.urandom(1 << 20)])
  source = registry.get(model_id).sources[0]
  server.stall.add(server.key(source))
  child = subprocess.Popen(
      [sys.executable, '-c', f'from lc_jax import zoo; zoo.fetch({model_id!r}, progress=False)'],
      cwd=ROOT, env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    assert server.half_sent.wait(60), 'the child never started its download'
    time.sleep(0.2)  # let it write what it received
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait(30)
  server.release.set()
  final = cache.path(model_id, source)
  assert not os.path.exists(final)
  assert cache.recorded(model_id, source) is None
  abandoned = leftovers(model_id)
  assert len(abandoned) == 1 and abandoned[0].startswith('.staging-')  # the dead child's
  server.stall.clear()
  assert open(zoo.fetch(model_id, progress=False)[0], 'rb').read() == data
  assert leftovers(model_id) == []  # the abandoned folder of a dead process is cleaned up


def test_a_cached_file_changed_afterwards_is_refused(env, server):
  model_id = 'resnet50_trained_on_SIN'
  (data,) = server.serve(model_id)
  (path,) = zoo.fetch(model_id, progress=False)
  with open(path, 'ab') as f:
    f.write(b'!')
  with pytest.raises(UserError) as error:
    zoo.fetch(model_id, progress=False)
  assert path in str(error.value) and sha(data) in str(error.value)
  assert sha(data + b'!') in str(error.value)
  os.remove(cache.record_path(model_id, registry.get(model_id).sources[0]))
  with pytest.raises(UserError, match='no recorded sha256'):
    zoo.fetch(model_id, progress=False)


def test_offline_lists_the_missing_files_and_uses_the_cache_without_requests(env, server,
                                                                             monkeypatch):
  server.serve('resnet50_dino')
  with pytest.raises(UserError) as error:
    zoo.fetch('resnet50_dino', offline=True)
  message = str(error.value)
  assert ('resnet50_dino/dino_resnet50_pretrain.pth, resnet50_dino/'
          'dino_resnet50_linearweights.pth;') in message
  assert 'python -m lc_jax.zoo fetch resnet50_dino' in message
  monkeypatch.setenv('LC_JAX_OFFLINE', '1')
  with pytest.raises(UserError, match='offline'):
    zoo.fetch('resnet50_dino')
  assert server.requests == []
  online = zoo.fetch('resnet50_dino', offline=False, progress=False)
  count = len(server.requests)
  assert zoo.fetch('resnet50_dino') == online
  assert len(server.requests) == count
  os.remove(online[1])
  with pytest.raises(UserError) as error:
    zoo.fetch('resnet50_dino')
  assert 'resnet50_dino/dino_resnet50_linearweights.pth;' in str(error.value)
  assert 'pretrain' not in str(error.value)


def test_mirror_map_forms(tmp_path, monkeypatch):
  source = registry.get('robust_resnet50_l2_eps3').sources[0]
  table = {'https://': 'http://a/', 'https://huggingface.co/madrylab/': 'http://b/'}
  assert transport.mirrored(source, table) == (
      'http://b/robust-imagenet-models/resolve/main/resnet50_l2_eps3.ckpt')  # longest prefix
  assert transport.mirrored(source, {'https://zenodo.org/': 'x'}) is None
  path = tmp_path / 'mirrors.json'
  path.write_text(json.dumps(table))
  assert transport.mirror_map(str(path)) == table
  monkeypatch.setenv('LC_JAX_ZOO_MIRRORS', json.dumps(table))
  assert transport.mirror_map() == table
  assert transport.mirror_map({}) == {}  # the argument wins over the environment
  for bad in ('{"https://": 3}', '{not json', str(tmp_path / 'absent.json'), '["a"]'):
    with pytest.raises(UserError, match='mirror'):
      transport.mirror_map(bad)


def test_unmirrored_sources_use_the_hub_and_gdown(tmp_path, monkeypatch):
  monkeypatch.setenv('LC_JAX_ZOO_DIR', str(tmp_path / 'zoo'))
  monkeypatch.delenv('LC_JAX_ZOO_MIRRORS', raising=False)
  monkeypatch.delenv('LC_JAX_OFFLINE', raising=False)
  hub = pytest.importorskip('huggingface_hub')
  gdown = pytest.importorskip('gdown')
  calls = []

  def hf_hub_download(repo, filename, *, revision, local_dir, **kwargs):
    calls.append((repo, filename, revision))
    os.makedirs(local_dir, exist_ok=True)
    with open(os.path.join(local_dir, filename), 'wb') as f:
      f.write(b'hub file')
    return os.path.join(local_dir, filename)

  monkeypatch.setattr(hub, 'hf_hub_download', hf_hub_download)
  (path,) = zoo.fetch('resnet50.a1_in1k', progress=False)
  assert calls == [('timm/resnet50.a1_in1k', 'model.safetensors', 'main')]
  assert open(path, 'rb').read() == b'hub file' and leftovers('resnet50.a1_in1k') == []

  def download(id, output, quiet):  # pylint: disable=redefined-builtin
    calls.append(id)
    with open(output, 'wb') as f:
      f.write(b'drive file')
    return output

  monkeypatch.setattr(gdown, 'download', download)
  (path,) = zoo.fetch('resnet50_noisymix', progress=False)
  assert calls[-1] == '1Na79fzPZ0Azg01h6kGn1Xu5NoWOElSuG'
  assert open(path, 'rb').read() == b'drive file'
  monkeypatch.setattr(gdown, 'download', lambda **kwargs: None)  # old gdown: None on failure
  with pytest.raises(UserError, match='python -m lc_jax.zoo add resnet50_augmix_180ep FILE'):
    zoo.fetch('resnet50_augmix_180ep', progress=False)
  monkeypatch.setitem(sys.modules, 'gdown', None)  # not installed
  with pytest.raises(UserError, match=r'pip install "lc-jax\[zoo\]"'):
    zoo.fetch('resnet50_augmix_180ep', progress=False)


# --- add ---------------------------------------------------------------------------------------


@pytest.fixture
def fake_convert(monkeypatch):
  """converters.convert_layout replaced by one that records its calls and refuses b'bad'."""
  converters = pytest.importorskip('converters')
  calls = []

  def convert_layout(files, layout, arch='resnet50', *, mean=None, std=None, trust_pickle=False):
    calls.append((list(files), layout, arch, mean, std, trust_pickle))
    if any(open(f, 'rb').read().startswith(b'bad') for f in files):
      raise converters.ConversionError(f'{files[0]}: the keys fit no ResNet-50\n(more lines)')
    return arch, {}, {}

  monkeypatch.setattr(converters, 'convert_layout', convert_layout, raising=False)
  return calls


def test_add_accepts_good_files(env, tmp_path, fake_convert):
  backbone, head = tmp_path / 'b.pth', tmp_path / 'h.pth'
  backbone.write_bytes(b'backbone')
  head.write_bytes(b'head')
  paths = checkpoints.add('resnet50_swav', [str(backbone), str(head)])
  entry = registry.get('resnet50_swav')
  assert paths == [cache.path(entry.id, s) for s in entry.sources]
  assert fake_convert == [([str(backbone), str(head)], 'split', 'resnet50', *IMAGENET, False)]
  assert cache.recorded(entry.id, entry.sources[1]) == sha(b'head')
  assert zoo.fetch('resnet50_swav', offline=True) == paths
  assert leftovers('resnet50_swav') == []


def test_add_refuses_a_wrong_digest_or_a_file_that_does_not_convert(env, tmp_path, fake_convert):
  wrong = tmp_path / 'robust.ckpt'
  wrong.write_bytes(b'not the madrylab file')
  with pytest.raises(UserError) as error:
    checkpoints.add('robust_resnet50_l2_eps3', [str(wrong)])
  assert MADRY_SHA_L2_EPS3 in str(error.value) and sha(wrong.read_bytes()) in str(error.value)
  assert fake_convert == []  # refused before the conversion check
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'bad checkpoint')
  with pytest.raises(UserError) as error:
    checkpoints.add('resnet50_noisymix', [str(bad)])
  assert 'does not convert as resnet50_noisymix' in str(error.value)
  assert 'fit no ResNet-50' in str(error.value) and '\n' not in str(error.value)
  for model_id in ('robust_resnet50_l2_eps3', 'resnet50_noisymix'):
    assert zoo.missing(model_id) and leftovers(model_id) == []
    assert cache.recorded(model_id, registry.get(model_id).sources[0]) is None
  with pytest.raises(UserError, match=r'takes 2 file\(s\)'):
    checkpoints.add('resnet50_dino', [str(bad)])
  with pytest.raises(UserError, match='no such file'):
    checkpoints.add('resnet50_noisymix', [str(tmp_path / 'absent.pth')])


def test_register_keeps_files_without_converting_them(env, tmp_path, fake_convert):
  """lc_jax.zoo converts nothing: `register` checks the digest, copies and records; the check
  that the files convert is the caller's (lc_jax.checkpoints.add passes it)."""
  bad = tmp_path / 'bad.pth'
  bad.write_bytes(b'bad checkpoint')
  (path,) = zoo.register('resnet50_noisymix', [str(bad)])
  assert fake_convert == [] and open(path, 'rb').read() == b'bad checkpoint'
  checked = []
  zoo.register('resnet50_swav', [str(bad), str(bad)],
               check=lambda entry, paths: checked.append((entry.id, paths)))
  assert checked == [('resnet50_swav', [str(bad), str(bad)])]
  wrong = tmp_path / 'robust.ckpt'
  wrong.write_bytes(b'not the madrylab file')
  with pytest.raises(UserError, match=MADRY_SHA_L2_EPS3):  # the digest, before `check`
    zoo.register('robust_resnet50_l2_eps3', [str(wrong)], check=lambda *a: checked.append(a))
  assert len(checked) == 1 and zoo.missing('robust_resnet50_l2_eps3')
  assert not hasattr(zoo, 'add')  # lc_jax.checkpoints.add: the one add that checks


def test_add_with_the_real_converter(env, tmp_path):
  timm = pytest.importorskip('timm')
  safetensors_torch = pytest.importorskip('safetensors.torch')
  good = tmp_path / 'model.safetensors'
  state = timm.create_model('resnet50', pretrained=False).state_dict()
  safetensors_torch.save_file({k: v.contiguous() for k, v in state.items()}, str(good))
  (path,) = checkpoints.add('resnet50.a1_in1k', [str(good)])
  assert open(path, 'rb').read() == good.read_bytes()
  garbage = tmp_path / 'garbage.safetensors'
  garbage.write_bytes(b'\0' * 64)
  with pytest.raises(UserError, match='does not convert as resnet50.a2_in1k'):
    checkpoints.add('resnet50.a2_in1k', [str(garbage)])
  assert zoo.missing('resnet50.a2_in1k')


# --- The command line ---------------------------------------------------------------------------


def cli(*args, **env):
  return subprocess.run([sys.executable, '-m', 'lc_jax.zoo', *args], cwd=ROOT, timeout=120,
                        capture_output=True, text=True, env={**os.environ, **env})


def test_cli_list_info_fetch(env, server):
  server.serve('resnet50_moco_v3_300ep')
  fetched = cli('fetch', 'resnet50_moco_v3_300ep', '--noprogress')
  assert fetched.returncode == 0, fetched.stderr
  assert fetched.stdout.startswith('ok resnet50_moco_v3_300ep: ')
  listed = cli('list')
  assert listed.returncode == 0, listed.stderr
  rows = listed.stdout.splitlines()
  assert rows[0].split() == ['id', 'category', 'recipe', 'norm', 'top-1', 'cached']
  assert len(rows) == 1 + 51 + 1
  assert rows[1].split() == ['tv_resnet50', 'baseline', 'timm', 'imagenet', '76.29', 'no']
  assert 'resnet50_moco_v3_300ep contrastive state_dict imagenet 73.20 yes' in [
      ' '.join(r.split()) for r in rows]
  assert 'resnet50_simclrv2 contrastive simclrv2 none 75.16 no' in [
      ' '.join(r.split()) for r in rows]
  contrastive = cli('list', '--category', 'contrastive').stdout.splitlines()
  assert len(contrastive) == 1 + 6 + 1
  info = cli('info', 'robust_resnet50_l2_eps3')
  assert info.returncode == 0
  assert f'{MADRY_SHA_L2_EPS3} (known)' in info.stdout
  assert 'madrylab/robust-imagenet-models @ main' in info.stdout
  assert 'robustness' in info.stdout and 'notes:' in info.stdout
  info = cli('info', 'resnet50_moco_v3_300ep').stdout
  assert '(recorded at first download)' in info and '(present)' in info


def test_cli_fetch_reports_each_failure_and_exits_1(env, server):
  server.serve('resnet50_moco_v3_1000ep')  # resnet50_moco_v3_100ep is not served: 404
  result = cli('fetch', 'resnet50_moco_v3_100ep', 'resnet50_moco_v3_1000ep', '--noprogress')
  assert result.returncode == 1
  assert 'ok resnet50_moco_v3_1000ep: ' in result.stdout
  lines = result.stderr.strip().splitlines()
  assert lines[0].startswith('failed resnet50_moco_v3_100ep: ')
  assert lines[-1] == 'error: 1 of 2 models failed: resnet50_moco_v3_100ep'
  offline = cli('fetch', '--category', 'freezing', '--offline')
  assert offline.returncode == 1
  assert 'resnet50_frozen_random/resnet50_frozen_random.pth' in offline.stderr


@pytest.mark.parametrize('args, message', [
    (('info', 'resnet50_dinoo'), "unknown model id 'resnet50_dinoo' (did you mean resnet50_dino"),
    (('fetch',), 'fetch takes model ids, or --all, or --category C'),
    (('fetch', '--all', 'resnet50_dino'), 'fetch takes model ids, or --all, or --category C'),
    (('fetch', 'resnet50_dino', 'nope'), "unknown model id 'nope'"),
    (('list', '--category', 'ssl'), "unknown category 'ssl'"),
    (('frobnicate',), "unknown command 'frobnicate'"),
    ((), 'give a command'),
    (('add', 'resnet50_noisymix', '/nonexistent/file.pth'), 'no such file'),
    (('list', '--nosuchflag'), 'Unknown command line flag'),
])
def test_cli_bad_input_is_one_error_line(env, server, args, message):
  result = cli(*args)
  assert result.returncode == 1
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert result.stderr.startswith('error: ') and message in result.stderr
  assert server.requests == []
