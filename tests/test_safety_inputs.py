"""Inputs that must never give a silently wrong run or a screen of tracebacks: non-finite
weights and logits, a checkpoint's own normaliser, orbax failing to save or load, empty or
malformed flags, the zoo's own opt-ins, and runs refused before they compute.

Everything runs in this process. The runs use a ResNet-18 of random weights at 64 px on
scikit-image's photos; the conversions, small trees of random variables.
"""

import errno
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import converters
from converters import mapping
from lc_jax import config as lc_config
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax.constants import IMAGENET_MEAN, IMAGENET_STD
from lc_jax.errors import UserError
from lc_jax.models import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = (IMAGENET_MEAN, IMAGENET_STD)


@pytest.fixture(scope='module')
def resnet18_state():
  """A ResNet-18 state_dict (numpy, torch names and layouts) of random weights whose logits are
  finite: He-scaled kernels, unit BatchNorm statistics."""
  module = models.get('resnet18').create()
  shapes = models.variable_shapes(module, 64)
  rng = np.random.RandomState(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.randn(*leaf.shape) * np.sqrt(2 / fan_in)).astype(np.float32)
    if name in ('scale', 'var'):
      return np.ones(leaf.shape, np.float32)
    return np.zeros(leaf.shape, np.float32)
  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return mapping.to_state_dict(variables)


def _save(state, path):
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
  return str(path)


def _run_config(checkpoint, *overrides):
  """A small run of `checkpoint` (ResNet-18): 64 px photos, the first two convs, one trial."""
  config = lc_config.default()
  config.model.checkpoint = checkpoint
  config.model.arch = 'resnet18'
  config.data.source = 'photos'
  config.data.num_images = 0
  config.data.order = 'sorted'
  config.data.resize_size = 72
  config.data.crop_size = 64
  config.data.batch_size = 8
  config.reset.layers = 'first:2'
  config.trials = 1
  config.progress = False
  for key, value in overrides:
    holder = config
    *parents, leaf = key.split('.')
    for parent in parents:
      holder = holder[parent]
    holder[leaf] = value
  return config


# ------------------------------------------------------------------------- non-finite ---------


def test_nonfinite_weights_refused(resnet18_state, tmp_path):
  state = dict(resnet18_state)
  state['layer2.0.conv1.weight'] = state['layer2.0.conv1.weight'].copy()
  state['layer2.0.conv1.weight'][0, 0, 0, :2] = [np.nan, np.inf]
  path = _save(state, tmp_path / 'nan.safetensors')
  with pytest.raises(converters.ConversionError) as raised:
    converters.convert(path)
  message = str(raised.value)
  assert '\n' not in message
  assert 'layer2.0.conv1.weight (2 of 73728 values)' in message and 'NaN or inf' in message
  assert '--allow_nonfinite' in message and '--config.model.allow_nonfinite=true' in message
  _, variables, _ = converters.convert(path, allow_nonfinite=True)  # kept when asked for
  assert np.isnan(variables['params']['layer2']['0']['conv1']['kernel']).any()
  # The run's opt-in is a config key of its own, which changes nothing a run measures.
  config = _run_config(path, ('model.allow_nonfinite', True))
  assert lc_config.check(config).model.allow_nonfinite
  assert 'allow_nonfinite' not in lc_config.check(config).measured()['model']


def test_nonfinite_logits_stop(resnet18_state, tmp_path):
  # Finite weights whose logits overflow to inf: the run stops before it writes a row.
  state = dict(resnet18_state, **{'fc.weight': np.full_like(resnet18_state['fc.weight'], 3e38)})
  path = _save(state, tmp_path / 'huge.safetensors')
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  with pytest.raises(UserError, match="the model's own logits are not finite") as raised:
    experiment.run(_run_config(path, ('compilation_cache_dir', 'none')), str(tmp_path / 'run'))
  assert '\n' not in str(raised.value)
  assert not (tmp_path / 'run').exists(), os.listdir(tmp_path / 'run')  # nothing left behind


# ------------------------------------------------------------------------- normaliser ---------


def test_robustness_normalizer_used(resnet18_state, tmp_path, capsys):
  torch = pytest.importorskip('torch')
  # robustness.attacker.AttackerModel: the model's normaliser is the identity here.
  norm = {'new_mean': torch.zeros(3, 1, 1), 'new_std': torch.ones(3, 1, 1)}
  model = {**{'module.normalizer.' + k: v for k, v in norm.items()},
           **{'module.model.' + k: torch.from_numpy(v) for k, v in resnet18_state.items()},
           **{'module.attacker.normalize.' + k: v for k, v in norm.items()}}
  path = tmp_path / 'robust.ckpt'
  torch.save({'model': model, 'epoch': 90}, path)
  for how in ('layout', 'plain'):
    if how == 'layout':
      _, _, metadata = converters.convert_layout([str(path)], 'robustness', 'resnet18')
    else:
      _, _, metadata = converters.convert(str(path), 'resnet18')
    assert metadata['mean'] == [0.0, 0.0, 0.0] and metadata['std'] == [1.0, 1.0, 1.0], how
    assert metadata['checkpoint_normalization'] == {'mean': [0.0] * 3, 'std': [1.0] * 3}
    assert models.create_from_card(metadata).mean == (0.0, 0.0, 0.0)
  assert capsys.readouterr().err == ''  # nothing given: nothing to state
  # Another normalisation, given: used, and the difference is stated in one line.
  _, _, metadata = converters.convert_layout([str(path)], 'robustness', 'resnet18',
                                             mean=IMAGENET[0], std=IMAGENET[1])
  assert metadata['mean'] == list(IMAGENET[0]) and metadata['std'] == list(IMAGENET[1])
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  assert 'its own mean (0.0, 0.0, 0.0), std (1.0, 1.0, 1.0)' in err[0]
  assert 'using mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) as given' in err[0]
  # ImageNet's own normaliser, at float32 precision, is ImageNet's: nothing to state.
  norm = {'new_mean': torch.tensor(IMAGENET[0]).view(3, 1, 1),
          'new_std': torch.tensor(IMAGENET[1]).view(3, 1, 1)}
  model.update({'module.normalizer.' + k: v for k, v in norm.items()})
  torch.save({'model': model}, path)
  _, _, metadata = converters.convert_layout([str(path)], 'robustness', 'resnet18',
                                             mean=IMAGENET[0], std=IMAGENET[1])
  assert metadata['mean'] == list(IMAGENET[0]) and capsys.readouterr().err == ''


# ------------------------------------------------------------------------- orbax --------------


def _tree(leaves=150):
  rng = np.random.RandomState(0)
  return {'params': {f'l{i}': {'kernel': rng.rand(64, 256).astype(np.float32)}
                     for i in range(leaves)}, 'batch_stats': {}}


def _orbax_records(caplog):
  return [r for r in caplog.records if f'{os.sep}orbax{os.sep}' in (r.pathname or '')
          and r.levelname in ('ERROR', 'CRITICAL')]


def test_orbax_save_disk_full_one_line(tmp_path, monkeypatch, caplog):
  from etils import epath  # pylint: disable=g-import-not-at-top

  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  with monkeypatch.context() as patch:  # orbax's metadata writes, in its own threads
    patch.setattr(epath.Path, 'write_text', full)
    patch.setattr(epath.Path, 'write_bytes', full)
    with pytest.raises(UserError) as raised:
      store.save(str(tmp_path / 'model'), 'resnet18', _tree(20), {})
  assert str(raised.value) == f'cannot write the model to {tmp_path / "model"}: ' \
                              'No space left on device'
  assert _orbax_records(caplog) == []
  assert sorted(os.listdir(tmp_path / 'model')) == ['.saving']  # no half-written variables
  # A full disk under tensorstore (the arrays' writer) is its ValueError, with the OS's code.
  def exhausted(self, *args, **kwargs):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "params.l0.kernel/0.0" in OCDBT '
                     "database: Failed to write: No space left on device [os_error_code='28']")
  monkeypatch.setattr(store.ocp.StandardCheckpointer, 'save', exhausted)
  with pytest.raises(UserError, match=r'cannot write the model to .*: No space left on device$'):
    store.save(str(tmp_path / 'model'), 'resnet18', _tree(2), {})


_DAMAGED = r"""
import os, sys
import numpy as np
from lc_jax.errors import UserError
from lc_jax.models import store
rng = np.random.RandomState(0)
variables = {'params': {f'l{i}': {'kernel': rng.rand(64, 256).astype(np.float32)}
                        for i in range(150)}, 'batch_stats': {}}
folder = sys.argv[1]
store.save(folder, 'resnet18', variables, {'num_classes': 1000})
files = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(folder, 'variables')) for f in fs]
os.remove(max(files, key=os.path.getsize))
try:
  store.load(folder)
except UserError as e:
  print(f'{folder} was damaged; converting the checkpoint again ({e})', file=sys.stderr)
store.save(folder, 'resnet18', variables, {'num_classes': 1000}, overwrite=True)
assert store.digest(store.load(folder)[1]) == store.digest(variables)
"""


def test_damaged_model_no_tracebacks(tmp_path):
  # The reads still in flight when the restore of a damaged model fails post to an event loop
  # that orbax has closed by then: each an unraisable RuntimeError, printed as a traceback
  # (in a fresh process: one whose thread already has an event loop prints none).
  result = subprocess.run([sys.executable, '-c', _DAMAGED, str(tmp_path / 'model')],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr[-3000:]
  assert 'was damaged; converting the checkpoint again' in lines[0]
  assert 'holds a damaged model: its variables do not load' in lines[0]


# ------------------------------------------------------------------------- messages -----------


def test_empty_workdir_refused():
  from lc_jax import launch  # pylint: disable=g-import-not-at-top

  def flag(value):
    return types.SimpleNamespace(value=value)
  flags = launch.Flags(config=flag(lc_config.default()), workdir=flag(''), quiet=flag(False),
                       distributed=flag(False), coordinator=flag(''), num_processes=flag(0),
                       process_id=flag(-1))
  for empty in ('', '  '):
    flags = flags.__class__(**{**flags.__dict__, 'workdir': flag(empty)})
    with pytest.raises(UserError, match='--workdir is empty: give a folder for the results'):
      launch.config_of(flags)
  flags = flags.__class__(**{**flags.__dict__, 'workdir': flag('out/run')})
  assert launch.config_of(flags) is flags.config.value


def test_empty_workdir_refused_by_the_library(tmp_path, monkeypatch):
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  for empty in ('', '  '):
    with pytest.raises(UserError, match='the workdir is empty'):
      experiment.run(lc_config.default(), empty)
  assert not os.listdir(tmp_path)  # nothing written into the current folder


@pytest.fixture(scope='module')
def resnet18_layers():
  module = models.get('resnet18').create()
  return layers_lib.inventory(module, models.get('resnet18').block_depth)


def test_invalid_layer_pattern(resnet18_layers):
  for pattern in ('[[[', 'conv1,[[['):
    with pytest.raises(UserError) as raised:
      layers_lib.select(resnet18_layers, pattern=pattern)
    assert str(raised.value) == ("invalid layer pattern '[[[': it is no regex (unterminated "
                                 'character set at position 0), and as a glob it matches no layer')
  # A glob that matches layers is no regex either, and is fine.
  assert [t.name for t in layers_lib.select(resnet18_layers, pattern='*.conv1')][:2] == [
      'layer1.0.conv1', 'layer1.1.conv1']


def test_first_needs_integer(resnet18_layers):
  for pattern, which in (('first:abc', 'first'), ('last:-1', 'last'), ('first:', 'first')):
    message = f"layer pattern '{pattern}': {which}: needs a whole number of layers, e.g. {which}:2"
    with pytest.raises(UserError) as raised:
      layers_lib.select(resnet18_layers, pattern=pattern)
    assert str(raised.value) == message
    config = lc_config.default()  # refused at the door, before any model or workdir
    config.model.checkpoint = 'bundled:efficientnet_lite0'
    config.reset.layers = pattern
    with pytest.raises(UserError) as raised:
      lc_config.check(config)
    assert str(raised.value) == message
  assert len(layers_lib.select(resnet18_layers, pattern='first:3')) == 3


class _Run:
  """Something a training script pickled beside its weights (no tensor, no plain data)."""


def test_zoo_add_pickle_names_trust_pickle(tmp_path, monkeypatch, resnet18_state):
  torch = pytest.importorskip('torch')
  from lc_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from lc_jax import zoo  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('LC_JAX_ZOO_DIR', str(tmp_path / 'zoo'))
  path = tmp_path / 'noisymix.pth'
  torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in resnet18_state.items()},
              'run': _Run()}, path)
  with pytest.raises(UserError) as raised:
    checkpoints.add('resnet50_noisymix', [str(path)])
  message = str(raised.value)
  assert '\n' not in message
  assert ('if you trust it, add it with --trust_pickle: python -m lc_jax.zoo add --trust_pickle '
          f'resnet50_noisymix {path}; nothing was added') in message
  assert 'config.model.trust_pickle' not in message and 'python -m converters' not in message
  assert zoo.missing('resnet50_noisymix')


def test_zoo_file_of_another_digest_given_by_hand_is_no_corrupt_download(tmp_path, monkeypatch):
  from lc_jax import zoo  # pylint: disable=g-import-not-at-top
  from lc_jax.zoo import cache  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('LC_JAX_ZOO_DIR', str(tmp_path / 'zoo'))
  model_id = 'robust_resnet50_l2_eps3'  # its sha256 is known
  source = zoo.get(model_id).sources[0]
  wrong = tmp_path / 'resnet50_l2_eps3.ckpt'
  wrong.write_bytes(b'another release')
  with pytest.raises(UserError) as raised:  # zoo add
    zoo.register(model_id, [str(wrong)])
  assert 'download' not in str(raised.value)
  assert 'it is not the file the zoo names: another release of the weights, or a damaged copy; '\
         f'the right one is resnet50_l2_eps3.ckpt from {source.canonical_url}' in str(raised.value)
  # Copied into the cache by hand: not "changed after it was downloaded".
  os.makedirs(cache.folder(model_id))
  os.link(wrong, cache.path(model_id, source))
  with pytest.raises(UserError) as raised:
    zoo.fetch(model_id, offline=True)
  assert 'download' not in str(raised.value).split(';')[0]
  assert 'it is not the file the zoo names, and lc_jax.zoo did not put it there' in str(
      raised.value)


# ------------------------------------------------------------------------- refused runs -------


def test_refused_run_leaves_no_files(resnet18_state, tmp_path):
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  path = _save(resnet18_state, tmp_path / 'resnet18.safetensors')
  config = _run_config(path, ('reset.layers', 'layer1.0.conv9'))
  (tmp_path / 'empty').mkdir()
  for workdir in (tmp_path / 'new' / 'run', tmp_path / 'empty'):
    with pytest.raises(UserError, match=r"unknown layer 'layer1.0.conv9' \(did you mean"):
      experiment.run(config, str(workdir))  # converted into workdir/model, then refused
    assert not (tmp_path / 'new').exists()
    assert os.listdir(tmp_path / 'empty') == []
  # A workdir that holds anything is left as it is (its model stays for the next run).
  (tmp_path / 'kept').mkdir()
  (tmp_path / 'kept' / 'notes.txt').write_text('mine')
  with pytest.raises(UserError, match='unknown layer'):
    experiment.run(config, str(tmp_path / 'kept'))
  assert (tmp_path / 'kept' / 'notes.txt').read_text() == 'mine'
  assert (tmp_path / 'kept' / 'model' / store.CARD).exists()


def test_another_run_is_refused_in_words_for_python_and_the_command_line(tmp_path):
  # Shortened digests keep their quotes and both ends; the advice names no command-line flag,
  # as the Python API (lc_jax.api, through results.Store) gives it too.
  from lc_jax import results  # pylint: disable=g-import-not-at-top
  old, new = 'bdddd1de' * 7 + '56071aaa', 'bdddd1de' * 7 + '86095bbb'
  run = {'config': {'seed': 0}, 'checkpoint_sha256': 'ab', 'images': {'content': old},
         'targets': ['fc']}
  from lc_jax import schema  # pylint: disable=g-import-not-at-top
  store = results.Store(str(tmp_path), run)
  store.append({**{c: 0 for c in schema.COLUMNS}, 'model_id': 'm', 'layer': 'fc', 'trial': 0,
                'mode': 'reinit', 'kind': 'linear', 'stage': 'head', 'num_params': 10,
                'num_images': 7, **{m: 0.5 for m in schema.METRICS}, 'criticality': 0.1})
  store.close()
  with pytest.raises(UserError) as refused:
    results.Store(str(tmp_path), {**run, 'images': {'content': new}})
  message = str(refused.value)
  assert (f'(images.content: "{old[:40]}...{old[-12:]}" -> "{new[:40]}...{new[-12:]}"); '
          'use a new workdir, or the same settings to resume it') in message, message
  assert '--workdir' not in message
  # The rows alone (run.json gone) tell the same.
  os.remove(tmp_path / 'run.json')
  with pytest.raises(UserError, match='image set; use a new workdir, or the same settings'):
    results.Store(str(tmp_path), {**run, 'images': {'content': new}})
  # A long value of another kind: cut inside a string, the string is closed.
  shown = results._short({'path': 'x' * 80})  # pylint: disable=protected-access
  assert shown.count('"') % 2 == 0 and shown.endswith('..."') and len(shown) <= 60


def test_an_unprepared_tfds_set_is_named_with_its_own_advice(tmp_path):
  # The set asked for is the one named; only a set downloaded by hand is said to need that.
  from lc_jax import data  # pylint: disable=g-import-not-at-top
  import optional  # pylint: disable=g-import-not-at-top
  optional.tensorflow_datasets()
  messages = {}
  for name in ('imagenet_r', 'imagenet2012'):
    with pytest.raises(UserError) as raised:
      data.load(dict(source='tfds', name=name, path=str(tmp_path / 'no_data'), num_images=0),
                cache_dir=str(tmp_path / 'cache'))
    messages[name] = str(raised.value)
  assert messages['imagenet_r'].startswith('cannot read tfds imagenet_r ')
  assert 'tfds build imagenet_r' in messages['imagenet_r']
  assert 'imagenet2012' not in messages['imagenet_r'] and 'manual' not in messages['imagenet_r']
  assert 'imagenet2012 needs its manual download' in messages['imagenet2012']


def test_an_init_checkpoint_of_another_architecture_is_refused_with_its_own_advice(
    resnet18_state, tmp_path):
  # The reset weights must be of the model's architecture: converting them as what they hold,
  # or without an architecture, does not help (run.py: experiment.reset_source).
  from lc_jax import checkpoints  # pylint: disable=g-import-not-at-top
  path = _save(resnet18_state, tmp_path / 'resnet18.safetensors')
  with pytest.raises(UserError) as refused:
    checkpoints.convert(path, 'resnet34', of_model='reset.init_checkpoint')
  assert str(refused.value) == (
      f"reset.init_checkpoint: {path} holds resnet18 weights, not resnet34; it must hold weights "
      "of the model's architecture (resnet34)")
  # A checkpoint whose architecture is free to choose keeps its advice.
  with pytest.raises(converters.ArchitectureMismatch, match='convert it as resnet18 or leave '):
    checkpoints.convert(path, 'resnet34')
