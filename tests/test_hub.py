"""Checkpoints on the Hugging Face Hub by name (hf:REPO[/FILE][@REVISION]), from a fake Hub.

A local HTTP server answers as the Hub does (the file at resolve/REVISION/FILE with its commit
in X-Repo-Commit; a missing repository, revision or file named in X-Error-Code), and the Hub
client is pointed at it with HF_ENDPOINT: the zoo's own Hub download path runs, and no test
touches the network. The repositories hold what timm publishes: model.safetensors and the
config.json timm writes (`save_config_for_hf`), of a small ResNet and a small ViT whose
normalisation is not ImageNet's, so the config's has to reach the converted model.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
pytest.importorskip('huggingface_hub')

from lc_jax import checkpoints  # pylint: disable=g-import-not-at-top,g-bad-import-order
from lc_jax import experiment
from lc_jax import models
from lc_jax import schema
from lc_jax import sweep
from lc_jax.errors import UserError
from lc_jax.zoo import cache
from lc_jax.zoo import cli
from lc_jax.zoo import hub
from tests import run_config
from local_server import LocalServer  # pylint: disable=g-bad-import-order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGIT_TOLERANCE = 1e-4  # max abs difference of the logits against timm's, float32
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)  # not ImageNet's: the config's must be used
COMMIT = 'c0ffee' * 6 + 'c0de'  # the fake repositories' one commit (40 hex digits)
# The two repositories: the timm model and the keyword arguments it is built with.
REPOS = {
    'timm/resnet18.fake_in1k': ('resnet18', {}),
    'timm/vit_tiny_patch16_224.fake_in1k': ('vit_tiny_patch16_224', {'img_size': 32}),
}
SIZES = {'timm/resnet18.fake_in1k': 32, 'timm/vit_tiny_patch16_224.fake_in1k': 32}


class FakeHub:
  """Answers HEAD and GET of /OWNER/NAME/resolve/REVISION/FILE as the Hub does, for `repos`
  ({repo: {file: bytes}}) at revision main or COMMIT; records each request's path."""

  def __init__(self):
    self.repos, self.requests = {}, []
    outer = self

    class Handler(http.server.BaseHTTPRequestHandler):
      timeout = 20

      def _answer(self, body: bool):
        outer.requests.append(self.path)
        parts = urllib.parse.unquote(self.path.split('?')[0]).strip('/').split('/')
        if len(parts) != 5 or parts[2] != 'resolve':
          return self._error(404, 'RepoNotFound')
        repo, revision, name = '/'.join(parts[:2]), parts[3], parts[4]
        if repo not in outer.repos:
          return self._error(401, 'RepoNotFound')
        if revision not in ('main', COMMIT):
          return self._error(404, 'RevisionNotFound')
        data = outer.repos[repo].get(name)
        if data is None:
          return self._error(404, 'EntryNotFound')
        self.send_response(200)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('ETag', f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header('Content-Length', str(len(data)))
        self.end_headers()
        if body:
          self.wfile.write(data)

      def _error(self, status, code):
        self.send_response(status)
        self.send_header('X-Error-Code', code)
        self.send_header('X-Repo-Commit', COMMIT)
        self.send_header('Content-Length', '0')
        self.end_headers()

      def do_HEAD(self):  # pylint: disable=invalid-name
        self._answer(body=False)

      def do_GET(self):  # pylint: disable=invalid-name
        self._answer(body=True)

      def log_message(self, *args):
        pass

    self.local = LocalServer(Handler)
    self.endpoint = self.local.url

  def close(self):
    self.local.close()


def _randomised(model):
  """`model` in eval mode with BatchNorm statistics, norms and tokens away from their initial
  values, so that a mix-up of any of them shows in the logits."""
  generator = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, value in model.state_dict().items():
      if value.dtype.is_floating_point and (
          'running' in name or 'bn' in name or 'norm' in name or 'token' in name
          or 'pos_embed' in name):
        low = 0.5 if name.endswith(('running_var', 'weight')) else -0.3
        value.copy_(low + 0.6 * torch.rand(value.shape, generator=generator))
  return model.eval()


@pytest.fixture(scope='module')
def published(tmp_path_factory):
  """{repo: (the timm model, {file: bytes})}: each repository's files as timm publishes them."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  from timm.models._hub import save_config_for_hf  # pylint: disable=g-import-not-at-top
  folder = tmp_path_factory.mktemp('published')
  found = {}
  for repo, (name, kwargs) in REPOS.items():
    torch.manual_seed(0)
    model = _randomised(timm.create_model(
        name, pretrained_cfg_overlay={'mean': MEAN, 'std': STD}, **kwargs))
    weights, config = folder / f'{name}.safetensors', folder / f'{name}.json'
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    save_config_for_hf(model, str(config))
    found[repo] = (model, {hub.WEIGHTS: weights.read_bytes(), hub.CONFIG: config.read_bytes()})
  return found


@pytest.fixture
def fake_hub(published, tmp_path, monkeypatch):
  """The fake Hub serving the published repositories, a fresh zoo cache, online."""
  server = FakeHub()
  server.repos = {repo: dict(files) for repo, (_, files) in published.items()}
  monkeypatch.setenv('HF_ENDPOINT', server.endpoint)
  monkeypatch.setenv('LC_JAX_ZOO_DIR', str(tmp_path / 'zoo'))
  for name in ('LC_JAX_ZOO_MIRRORS', 'LC_JAX_OFFLINE', 'HF_HUB_OFFLINE'):
    monkeypatch.delenv(name, raising=False)
  yield server
  server.close()


def _timm_logits(model, images):
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return model(x).numpy()


# --- Conversion --------------------------------------------------------------------------------


@pytest.mark.parametrize('repo', list(REPOS))
def test_a_hub_checkpoint_converts_as_its_config_says_and_matches_timm(fake_hub, published,
                                                                       repo):
  source = f'hf:{repo}'
  arch, variables, card = checkpoints.convert(source)
  assert arch == REPOS[repo][0]
  assert (card['mean'], card['std']) == (list(MEAN), list(STD))  # config.json's, not ImageNet's
  assert card['source'] == f'{source}@main'
  assert card['hub_config']['architecture'] == REPOS[repo][0]
  assert card['sha256'] == checkpoints.sha256(source)  # weights and config.json, as recorded
  images = np.random.RandomState(1).rand(2, SIZES[repo], SIZES[repo], 3).astype(np.float32)
  logits = np.asarray(models.create_from_card(card).apply(variables, images))
  diff = np.abs(logits - _timm_logits(published[repo][0], images)).max()
  print(f'{source}: logits max abs diff vs timm {diff:.2g}')
  assert diff <= LOGIT_TOLERANCE
  folder = cache.folder(hub.parse(source).key)
  assert sorted(os.listdir(folder)) == ['config.json', 'config.json.sha256', 'model.safetensors',
                                        'model.safetensors.sha256']
  assert folder.endswith(os.path.join('files', 'hf', *repo.split('/')) + '@main')


def test_without_config_json_the_keys_tell_the_architecture(fake_hub):
  del fake_hub.repos['timm/resnet18.fake_in1k'][hub.CONFIG]
  arch, _, card = checkpoints.convert('hf:timm/resnet18.fake_in1k')
  assert arch == 'resnet18' and 'hub_config' not in card
  assert card['mean'] == list(models.get('resnet18').mean)  # the architecture's own
  assert card['sha256'] == checkpoints.sha256('hf:timm/resnet18.fake_in1k')


def test_the_sha256_record_and_the_revision_name_the_files(fake_hub, published):
  source = f'hf:timm/resnet18.fake_in1k@{COMMIT}'
  first = checkpoints.sha256(source)
  weights, config = published['timm/resnet18.fake_in1k'][1].values()
  assert first == hashlib.sha256((hashlib.sha256(weights).hexdigest()
                                  + hashlib.sha256(config).hexdigest()).encode()).hexdigest()
  count = len(fake_hub.requests)
  assert checkpoints.sha256(source) == first and len(fake_hub.requests) == count  # cached
  # The repository changes at the same revision: the recorded sha256 refuses it.
  main = 'hf:timm/resnet18.fake_in1k'
  checkpoints.sha256(main)
  os.remove(cache.path(hub.parse(main).key, hub.parse(main).weights))
  fake_hub.repos['timm/resnet18.fake_in1k'][hub.WEIGHTS] = b'other weights'
  with pytest.raises(UserError, match=r'has sha256 [0-9a-f]{64}, but the sha256 recorded'):
    checkpoints.sha256(main)


def test_the_mirror_map_serves_hub_ids_too(fake_hub, monkeypatch):
  monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')  # the Hub client would fail
  monkeypatch.setenv('LC_JAX_ZOO_MIRRORS', json.dumps(
      {'https://huggingface.co/': fake_hub.endpoint + '/'}))
  del fake_hub.repos['timm/resnet18.fake_in1k'][hub.CONFIG]  # a 404 through the mirror
  source = 'hf:timm/resnet18.fake_in1k'
  weights, config = hub.fetch(source, progress=False)
  assert config is None and fake_hub.requests[-2:] == [
      '/timm/resnet18.fake_in1k/resolve/main/model.safetensors',
      '/timm/resnet18.fake_in1k/resolve/main/config.json']
  info = cli.info_text(source)
  assert f'mirror:      {fake_hub.endpoint}/timm/resnet18.fake_in1k/resolve/main/' in info
  assert f'cache:       {weights} (present)' in info


# --- Errors: one line each ---------------------------------------------------------------------


def test_what_the_hub_has_not_is_one_error(fake_hub):
  cases = {
      'hf:timm/resnet18.fake_in1k@v9': 'has no revision v9: give a branch, a tag or a full',
      'hf:timm/resnet18.fake_in1k/weights.pth': '@main has no file weights.pth$',
      'hf:timm/no_such_model': 'the Hub has no repository timm/no_such_model',
  }
  for source, message in cases.items():
    with pytest.raises(UserError, match=message) as error:
      checkpoints.sha256(source)
    assert '\n' not in str(error.value), str(error.value)
  del fake_hub.repos['timm/resnet18.fake_in1k'][hub.WEIGHTS]
  with pytest.raises(UserError, match='has no file model.safetensors; timm repositories hold '
                     'model.safetensors, others name theirs: hf:timm/resnet18.fake_in1k/FILE'):
    checkpoints.convert('hf:timm/resnet18.fake_in1k')
  for bad in ('hf:timm', 'hf:timm/a/b/c.pth', 'hf:../x', 'hf:timm/x@../main'):
    with pytest.raises(UserError, match=r'give hf:OWNER/REPO\[/FILE\]\[@REVISION\]'):
      checkpoints.check(bad, 'model.checkpoint')
  assert fake_hub.requests[-1].endswith('/model.safetensors')  # the checks asked nothing


def test_run_py_says_a_wrong_revision_in_one_line(fake_hub, tmp_path):
  # Before any model is built: the checkpoint is fetched first.
  result = subprocess.run(
      [sys.executable, 'run.py', '--config=configs/demo.py', f'--workdir={tmp_path / "w"}',
       '--config.model.checkpoint=hf:timm/resnet18.fake_in1k@v9', '--config.model.arch=',
       '--config.progress=false', f'--config.cache_dir={tmp_path / "cache"}'],
      cwd=ROOT, capture_output=True, text=True, env=dict(os.environ), check=False, timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr
  assert lines[-1].startswith('error: ') and 'has no revision v9' in lines[-1], result.stderr
  assert not (tmp_path / 'w' / schema.RESULTS).exists()


def test_a_model_arg_lc_jax_does_not_model_is_refused(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text(json.dumps({'architecture': 'resnet50', 'model_args': {
      'global_pool': 'max', 'drop_rate': 0.1, 'in_chans': 3},
      'pretrained_cfg': {'mean': list(MEAN), 'std': list(STD)}}))
  with pytest.raises(UserError, match=r"builds resnet50 with global_pool='max', which lc-jax"):
    checkpoints.hub_config(str(path), 'hf:a/b@main')
  path.write_text(json.dumps({'architecture': 'tf_efficientnet_lite0',
                              'pretrained_cfg': {'mean': [0.5] * 3, 'std': [0.5] * 3}}))
  told = checkpoints.hub_config(str(path), 'hf:a/b@main')
  assert (told['arch'], told['mean']) == ('efficientnet_lite0', [0.5] * 3)  # by timm's name


# --- Offline, the command line, files added by hand, the sweep --------------------------------


@pytest.mark.parametrize('repo', list(REPOS))
def test_fetched_once_then_converted_and_run_offline(fake_hub, tmp_path, repo):
  source = f'hf:{repo}'
  fetched = subprocess.run([sys.executable, '-m', 'lc_jax.zoo', 'fetch', '--noprogress', source],
                           cwd=ROOT, capture_output=True, text=True, env=dict(os.environ),
                           check=False, timeout=300)
  assert fetched.returncode == 0, fetched.stderr
  key = hub.parse(source).key
  assert fetched.stdout.startswith(f'ok {source}: ') and 'config.json' in fetched.stdout
  fake_hub.close()  # from here on, no Hub at all
  size = SIZES[repo]
  config, _ = run_config.of([
      f'--config.model.checkpoint={source}', '--config.model.arch=', '--config.model.offline=true',
      '--config.data.num_images=2', f'--config.data.crop_size={size}',
      f'--config.data.resize_size={size + 4}', '--config.trials=1', '--config.progress=false',
      '--config.reset.layer_types=conv,linear', '--config.reset.layers=first:2',
      f'--config.cache_dir={tmp_path / "cache"}'])
  workdir = tmp_path / 'w'
  experiment.run(config, str(workdir))
  with open(workdir / schema.MODEL / 'model.json', encoding='utf-8') as f:
    card = json.load(f)
  assert (card['arch'], card['source'], card['mean']) == (REPOS[repo][0], key, list(MEAN))
  rows = (workdir / schema.RESULTS).read_text().splitlines()
  assert len(rows) > 2 and repo.split('/')[1] in rows[1]  # labelled with the repository's name
  # Offline, what the cache lacks is one error naming the command that fetches it.
  with pytest.raises(UserError, match=r'offline, and not in the zoo cache .*python -m lc_jax.zoo '
                     r'fetch hf:timm/other@main'):
    checkpoints.sha256('hf:timm/other', offline=True)


def test_add_registers_files_for_machines_without_network(published, tmp_path, monkeypatch):
  monkeypatch.setenv('LC_JAX_ZOO_DIR', str(tmp_path / 'zoo'))
  monkeypatch.setenv('LC_JAX_OFFLINE', '1')
  folder = tmp_path / 'downloads'
  folder.mkdir()
  files = published['timm/resnet18.fake_in1k'][1]
  (folder / 'resnet18.safetensors').write_bytes(files[hub.WEIGHTS])
  (folder / hub.CONFIG).write_bytes(files[hub.CONFIG])
  source = 'hf:someone/resnet18-local'
  added = checkpoints.add(source, [str(folder / 'resnet18.safetensors')])  # config.json beside
  assert [os.path.basename(p) for p in added] == [hub.WEIGHTS, hub.CONFIG]
  arch, _, card = checkpoints.convert(source)
  assert (arch, card['mean']) == ('resnet18', list(MEAN))
  (folder / 'broken.safetensors').write_bytes(b'not a checkpoint')
  with pytest.raises(UserError, match='does not convert as hf:someone/broken: .*; nothing was '
                     'added'):
    checkpoints.add('hf:someone/broken', [str(folder / 'broken.safetensors')])
  assert not os.path.exists(cache.folder(hub.parse('hf:someone/broken').key))


def test_the_sweep_takes_hub_ids_next_to_the_papers():
  models_ = sweep.select('tv_resnet50, hf:timm/convnext_tiny.fb_in1k, hf:a/b/w.pth@v1')
  assert models_ == ['tv_resnet50', 'hf:timm/convnext_tiny.fb_in1k', 'hf:a/b/w.pth@v1']
  assert [sweep.label(m) for m in models_] == ['tv_resnet50', 'convnext_tiny.fb_in1k', 'b-w@v1']
  config = sweep.model_config(run_config.of([])[0], 'hf:timm/convnext_tiny.fb_in1k')
  assert (config.model.checkpoint, config.model.id, config.reset.init_scheme) == (
      'hf:timm/convnext_tiny.fb_in1k', 'convnext_tiny.fb_in1k', '')
  with pytest.raises(UserError, match='resnet50.a1_in1k and hf:timm/resnet50.a1_in1k would both'):
    sweep.select('resnet50.a1_in1k,hf:timm/resnet50.a1_in1k')
  with pytest.raises(UserError, match='give hf:OWNER/REPO'):
    sweep.select('hf:timm')
