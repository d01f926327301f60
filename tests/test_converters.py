"""Checkpoint reading: containers, prefixes, named drops, strictness and clear errors."""

import argparse
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import converters  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def resnet50_state():
  """A timm ResNet-50 state_dict with random weights."""
  torch.manual_seed(0)
  return timm.create_model('resnet50').state_dict()


@pytest.fixture(scope='module')
def resnet18_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('r18') / 'resnet18.pth'
  torch.save(timm.create_model('resnet18').state_dict(), path)
  return str(path)


def _assert_same_variables(a, b):
  flat_a = dict(jax.tree_util.tree_flatten_with_path(a)[0])
  flat_b = dict(jax.tree_util.tree_flatten_with_path(b)[0])
  assert flat_a.keys() == flat_b.keys()
  for key, value in flat_a.items():
    np.testing.assert_array_equal(flat_b[key], value, err_msg=jax.tree_util.keystr(key))


def test_four_layouts_convert_to_identical_variables(resnet50_state, tmp_path):
  state = resnet50_state
  torch.save(state, tmp_path / 'plain.pth')
  torch.save({'state_dict': {'module.' + k: v for k, v in state.items()}, 'epoch': 90},
             tmp_path / 'ddp.pth.tar')
  robust = {'module.model.' + k: v for k, v in state.items()}
  robust.update({'module.attacker.model.' + k: v for k, v in state.items()})
  robust.update({'module.normalizer.new_mean': torch.zeros(3, 1, 1),
                 'module.normalizer.new_std': torch.ones(3, 1, 1),
                 'module.attacker.normalize.new_mean': torch.zeros(3, 1, 1),
                 'module.attacker.normalize.new_std': torch.ones(3, 1, 1)})
  torch.save({'model': robust, 'epoch': 120}, tmp_path / 'robust.ckpt')
  save_file({k: v.numpy() for k, v in state.items()}, str(tmp_path / 'plain.safetensors'))

  arch, reference, _ = converters.convert(str(tmp_path / 'plain.pth'))
  assert arch == 'resnet50'
  for name in ('ddp.pth.tar', 'robust.ckpt', 'plain.safetensors'):
    arch, variables, metadata = converters.convert(str(tmp_path / name))
    assert arch == 'resnet50', name
    _assert_same_variables(reference, variables)

  _, _, metadata = converters.convert(str(tmp_path / 'robust.ckpt'))
  assert metadata['container'] == ['model']
  assert metadata['stripped_prefix'] == 'module.model.'
  assert len(metadata['dropped']['robustness_attacker']) == len(state) + 2
  assert sorted(metadata['dropped']['robustness_normalizer']) == [
      'module.normalizer.new_mean', 'module.normalizer.new_std']
  _, _, metadata = converters.convert(str(tmp_path / 'ddp.pth.tar'))
  assert metadata['container'] == ['state_dict'] and metadata['stripped_prefix'] == 'module.'
  _, _, metadata = converters.convert(str(tmp_path / 'plain.safetensors'))
  assert metadata['format'] == 'safetensors'


def test_auxiliary_batchnorm_is_dropped_by_name(tmp_path):
  state = timm.create_model('resnet18').state_dict()
  aux = {k.replace('.bn1.', '.bn1.aux_bn.'): v for k, v in state.items() if '.bn1.' in k}
  torch.save({'state_dict': {**state, **aux}}, tmp_path / 'debiased.pth')
  _, _, metadata = converters.convert(str(tmp_path / 'debiased.pth'))
  assert sorted(metadata['dropped']['aux_bn']) == sorted(aux)


def test_plain_zip_checkpoints_are_read_without_torch(tmp_path):
  from converters import reader  # pylint: disable=g-import-not-at-top
  state = timm.create_model('resnet18').state_dict()
  extra = {'bf16': torch.randn(3, 4).bfloat16(), 'half': torch.randn(5).half(),
           'double': torch.randn(2, 2).double(), 'transposed': torch.randn(4, 6).t(),
           'view': torch.randn(10)[3:7], 'ints': torch.arange(7), 'flags': torch.rand(3) > 0.5,
           'param': torch.nn.Parameter(torch.randn(2))}
  torch.save({'state_dict': {**state, **extra}, 'epoch': 3, 'arch': 'r18'}, tmp_path / 'a.pth')
  fast = reader._read_torch_zip(str(tmp_path / 'a.pth'))  # pylint: disable=protected-access
  slow = torch.load(tmp_path / 'a.pth', weights_only=True)
  assert fast['epoch'] == 3 and fast['arch'] == 'r18'
  for key, tensor in slow['state_dict'].items():
    want = reader._to_numpy(tensor)  # pylint: disable=protected-access
    got = fast['state_dict'][key]
    assert got.dtype == want.dtype and np.array_equal(got, want), key
  # Converting it never imports torch (a fresh interpreter; the ResNet keys only).
  torch.save(state, tmp_path / 'b.pth')
  code = ('import sys, converters; converters.convert(sys.argv[1]); '
          "assert 'torch' not in sys.modules, 'torch was imported'")
  result = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'b.pth')], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  # Anything besides tensors and plain containers goes to torch.load, which decides.
  torch.save({'state_dict': state, 'args': argparse.Namespace(lr=0.1)}, tmp_path / 'c.pth')
  assert reader._read_torch_zip(str(tmp_path / 'c.pth')) is None  # pylint: disable=protected-access


def test_legacy_pickle_needs_an_explicit_opt_in(tmp_path):
  state = timm.create_model('resnet18').state_dict()
  torch.save({'state_dict': state, 'args': argparse.Namespace(lr=0.1)}, tmp_path / 'old.pth')
  with pytest.raises(converters.ConversionError, match='trust_pickle'):
    converters.convert(str(tmp_path / 'old.pth'))
  arch, _, _ = converters.convert(str(tmp_path / 'old.pth'), trust_pickle=True)
  assert arch == 'resnet18'


def test_mismatch_lists_every_misfit(resnet50_state, tmp_path):
  state = dict(resnet50_state)
  del state['layer4.2.conv3.weight']
  state['fc.weight'] = torch.zeros(1000, 1024)
  state['head.extra.weight'] = torch.zeros(3)
  torch.save(state, tmp_path / 'bad.pth')
  with pytest.raises(converters.MismatchError) as raised:
    converters.convert(str(tmp_path / 'bad.pth'), 'resnet50')
  mismatch = raised.value.mismatch
  assert mismatch.missing == [('layer4.2.conv3.weight', (2048, 512, 1, 1))]
  assert mismatch.unexpected == [('head.extra.weight', (3,))]
  assert mismatch.shapes == [('fc.weight', (1000, 2048), (1000, 1024))]
  message = str(raised.value)
  assert '\n' not in message
  for part in ('1 missing (layer4.2.conv3.weight', '1 unexpected (head.extra.weight',
               'fc.weight: expected (1000, 2048), found (1000, 1024)'):
    assert part in message


def test_writes_orbax_checkpoint_and_card(resnet18_file, tmp_path):
  out = tmp_path / 'out'
  result = _cli(resnet18_file, '--out', str(out))
  assert result.returncode == 0, result.stderr
  assert 'architecture  resnet18 (inferred from the checkpoint)' in result.stdout
  assert 'num_batches_tracked: 20 keys' in result.stdout
  card = json.loads((out / 'model.json').read_text())
  assert card['arch'] == 'resnet18'
  assert card['source'] == resnet18_file
  assert card['sha256'] == converters.reader.sha256(resnet18_file)
  assert card['mean'] == [0.485, 0.456, 0.406] and card['std'] == [0.229, 0.224, 0.225]
  assert len(card['dropped']['num_batches_tracked']) == 20
  assert os.path.isdir(out / 'variables')

  refused = _cli(resnet18_file, '--out', str(out))
  assert refused.returncode == 1 and 'already holds a converted model' in refused.stderr


def test_a_kept_conversion_is_reused_only_for_its_source_arch_and_version(tmp_path):
  # checkpoints.convert_into reuses what its folder holds only when it is a conversion of the
  # same file (sha256), as the same architecture, by this version; else it converts again.
  import hashlib  # pylint: disable=g-import-not-at-top
  from lc_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from lc_jax import models  # pylint: disable=g-import-not-at-top
  from lc_jax.version import __version__  # pylint: disable=g-import-not-at-top
  paths, digests = [], []
  for seed in (0, 1):
    torch.manual_seed(seed)
    paths.append(str(tmp_path / f'resnet18_{seed}.pth'))
    torch.save(timm.create_model('resnet18').state_dict(), paths[-1])
    with open(paths[-1], 'rb') as f:
      digests.append(hashlib.sha256(f.read()).hexdigest())
  model_dir = str(tmp_path / 'model')
  for path, digest in zip(paths, digests):  # the second file into the first one's folder
    _, variables, card = checkpoints.convert_into(path, model_dir, digest)
    assert card['sha256'] == digest
    _assert_same_variables(variables, converters.convert(path)[1])
  card_path = os.path.join(model_dir, models.store.CARD)
  with open(card_path) as f:
    card = json.load(f)
  with open(card_path, 'w') as f:
    json.dump({**card, 'lc_jax_version': '0.0.1'}, f)  # a conversion by another version
  _, _, card = checkpoints.convert_into(paths[1], model_dir, digests[1])
  assert card['lc_jax_version'] == __version__
  assert models.store.read_card(model_dir)['lc_jax_version'] == __version__
  with pytest.raises(Exception, match='resnet34'):  # not the kept resnet18 under another name
    checkpoints.convert_into(paths[1], model_dir, digests[1], arch='resnet34')


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'converters', *args], capture_output=True,
                        text=True, cwd=os.path.dirname(os.path.dirname(__file__)), check=False)


def _bad_inputs(tmp_path, resnet18_file, resnet50_state):
  """(name, argv, expected message fragment) for every kind of bad input."""
  truncated = tmp_path / 'truncated.pth'
  truncated.write_bytes(open(resnet18_file, 'rb').read()[:100_000])
  text = tmp_path / 'notes.pth'
  text.write_text('not a checkpoint\n')
  missing_layer = dict(resnet50_state)
  del missing_layer['layer3.1.conv2.weight']
  torch.save(missing_layer, tmp_path / 'missing_layer.pth')
  extra = dict(resnet50_state, **{'projector.0.weight': torch.zeros(4, 4)})
  torch.save(extra, tmp_path / 'extra.pth')
  safetensors_cut = tmp_path / 'cut.safetensors'
  save_file({'conv1.weight': np.zeros((64, 3, 7, 7), np.float32)}, str(safetensors_cut))
  safetensors_cut.write_bytes(safetensors_cut.read_bytes()[:200])
  return [
      ('missing file', [str(tmp_path / 'nope.pth')], 'checkpoint not found'),
      ('truncated', [str(truncated)], 'truncated or not a PyTorch checkpoint'),
      ('truncated safetensors', [str(safetensors_cut)], 'truncated or not a safetensors'),
      ('not a checkpoint', [str(text)], 'is not a checkpoint'),
      ('resnet18 as resnet50', [resnet18_file, '--arch', 'resnet50'],
       'holds resnet18 weights, not resnet50'),
      ('missing layer', [str(tmp_path / 'missing_layer.pth')],
       'does not fit resnet50: 1 missing (layer3.1.conv2.weight (256, 256, 3, 3))'),
      ('unknown extra key', [str(tmp_path / 'extra.pth')],
       '1 unexpected (projector.0.weight (4, 4))'),
      ('unknown architecture', [resnet18_file, '--arch', 'resnet05'], 'unknown architecture'),
  ]


def test_bad_input_ends_in_one_line(tmp_path, resnet18_file, resnet50_state):
  # Each case in this process, through what `python -m converters` calls (converters.convert
  # with --arch): one error of one line, the line the command prints as `error: ...` with exit
  # status 1. The command itself is run on two cases: its exit status, its one line, and
  # nothing written to --out.
  for name, argv, fragment in _bad_inputs(tmp_path, resnet18_file, resnet50_state):
    arch = argv[argv.index('--arch') + 1] if '--arch' in argv else None
    with pytest.raises(converters.ConversionError.__mro__[1]) as raised:  # UserError
      converters.convert(argv[0], arch)
    message = str(raised.value)
    print(f'{name}: {message}')
    assert '\n' not in message and fragment in message, (name, message)
  for name, argv, fragment in [c for c in _bad_inputs(tmp_path, resnet18_file, resnet50_state)
                               if c[0] in ('truncated', 'resnet18 as resnet50')]:
    result = _cli(*argv, '--out', str(tmp_path / 'out'))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, name
    assert len(lines) == 1 and lines[0].startswith('error: '), (name, result.stderr)
    assert fragment in lines[0], (name, lines[0])
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'out').exists(), f'{name}: nothing is written on failure'


def test_arguments_besides_one_checkpoint_end_in_one_line(tmp_path, resnet18_file):
  # `python -m converters SRC DIR` (--out forgotten), no checkpoint, or two: one `error:` line
  # with the usage, exit status 1, nothing written; not the whole --help.
  out = tmp_path / 'out'
  cases = [
      ([resnet18_file, str(out)], f'python -m converters {resnet18_file} --out {out}'),
      ([], 'give one checkpoint: python -m converters SRC'),
      ([resnet18_file, resnet18_file, '--out', str(out)], 'unexpected arguments after'),
  ]
  for argv, fragment in cases:
    result = _cli(*argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (argv, result.stderr)
    assert len(lines) == 1 and lines[0].startswith('error: '), (argv, result.stderr)
    assert fragment in lines[0], (argv, lines[0])
    assert result.stdout == '' and not out.exists()
