"""Checkpoint layouts of the paper's models: each written in its exact form, converted strictly,
and run: the Flax logits equal those of the torch model the file was written from."""

import argparse
import collections
import functools
import hashlib

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import converters  # pylint: disable=g-import-not-at-top
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import reset
from lc_jax import torch_reference

RELATIVE_TOLERANCE = 1e-4  # max abs logit difference / largest |logit|, float32
IDENTITY = {'mean': (0.0, 0.0, 0.0), 'std': (1.0, 1.0, 1.0)}  # `calibrated` feeds raw [0, 1]


@pytest.fixture(scope='module')
def reference():
  """(images, state_dict, logits) of a full-size timm ResNet-50 whose random weights matter."""
  images = np.random.RandomState(0).rand(2, 64, 64, 3).astype(np.float32)
  torch.manual_seed(0)
  model = torch_reference.calibrated(timm.create_model('resnet50'), images)
  with torch.no_grad():
    logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  return images, model.state_dict(), logits


def _nbt(keys, prefix=''):
  return [prefix + k for k in keys if k.endswith('num_batches_tracked')]


def _optimizer(state):
  """An SGD optimizer.state_dict() (one momentum buffer: the entry is ignored, not read)."""
  return {'state': {0: {'momentum_buffer': torch.zeros_like(state['conv1.weight'])}},
          'param_groups': [{'lr': 0.1, 'momentum': 0.9, 'weight_decay': 1e-4, 'nesterov': False,
                            'params': list(range(161))}]}


# ------------------------------------------------------------- each layout in its exact form
# A writer takes (state_dict, folder) and returns (files, layout, {rule: dropped keys}).


def _timm(state, folder):
  # timm's Hub weights: model.safetensors, a plain state_dict.
  save_file({k: v.numpy() for k, v in state.items()}, str(folder / 'model.safetensors'))
  return [folder / 'model.safetensors'], 'timm', {'num_batches_tracked': _nbt(state)}


def _torchvision(state, folder):
  torch.save(state, folder / 'resnet50-11ad3fa6.pth')
  return [folder / 'resnet50-11ad3fa6.pth'], 'torchvision', {'num_batches_tracked': _nbt(state)}


def _augmix(state, folder):
  # google-research/augmix imagenet.py: a DataParallel state_dict next to the arch's *name*
  # under 'model' (a string: 'state_dict' is taken first).
  torch.save({'epoch': 180, 'model': 'resnet50', 'best_acc1': 77.5, 'optimizer': _optimizer(state),
              'state_dict': {'module.' + k: v for k, v in state.items()}},
             folder / 'checkpoint.pth.tar')
  return ([folder / 'checkpoint.pth.tar'], 'state_dict',
          {'num_batches_tracked': _nbt(state, 'module.')})


def _optics(state, folder):
  # PatMue/classification_robustness train_dnn.py.
  torch.save({'epoch': 90, 'best_epoch': 88, 'model_state_dict': state, 'loss': 1.2, 'acc': 74.2,
              'optimizer_state_dict': _optimizer(state)}, folder / 'opticsaugment.pth')
  return [folder / 'opticsaugment.pth'], 'state_dict', {'num_batches_tracked': _nbt(state)}


def _robustness(legacy):
  def write(state, folder):
    dill = pytest.importorskip('dill')
    # robustness.attacker.AttackerModel under DataParallel: the model, the attacker's copy of
    # it, and the normalisers of both.
    norm = {'new_mean': torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1),
            'new_std': torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)}
    model = {**{'module.normalizer.' + k: v for k, v in norm.items()},
             **{'module.model.' + k: v for k, v in state.items()},
             **{'module.attacker.normalize.' + k: v for k, v in norm.items()},
             **{'module.attacker.model.' + k: v for k, v in state.items()}}
    schedule = {'step_size': 30, 'gamma': 0.1, 'base_lrs': [0.1], 'last_epoch': 90,
                '_step_count': 91, '_last_lr': [1e-4]}
    path = folder / 'resnet50_l2_eps3.ckpt'
    # robustness/train.py save_checkpoint: torch.save(..., pickle_module=dill).
    torch.save({'model': model, 'optimizer': _optimizer(state), 'schedule': schedule,
                'epoch': 91, 'amp': None}, path, pickle_module=dill,
               _use_new_zipfile_serialization=not legacy)
    attacker = [k for k in model if k.startswith('module.attacker.')]
    return [path], 'robustness', {'robustness_attacker': attacker,
                                  'robustness_normalizer': ['module.normalizer.new_mean',
                                                            'module.normalizer.new_std'],
                                  'num_batches_tracked': _nbt(state, 'module.model.')}
  return write


def _aux_bn(state, folder):
  # LiYingwei/ShapeTextureDebiasedTraining: every BatchNorm is a MixBatchNorm2d, a BatchNorm2d
  # with a child BatchNorm2d `aux_bn`.
  bns = sorted({k.rsplit('.', 1)[0] for k in state if k.endswith('running_var')})
  aux = {f'{bn}.aux_bn.{leaf}': state[f'{bn}.{leaf}'].clone()
         for bn in bns for leaf in ('weight', 'bias', 'running_mean', 'running_var',
                                    'num_batches_tracked')}
  torch.save({'epoch': 90, 'arch': 'resnet50', 'best_acc1': 76.9,
              'state_dict': {'module.' + k: v for k, v in {**state, **aux}.items()}},
             folder / 'debiased.pth.tar')
  return [folder / 'debiased.pth.tar'], 'aux_bn', {
      'aux_bn': ['module.' + k for k in aux], 'num_batches_tracked': _nbt(state, 'module.')}


def _probe(state, folder, name):
  """The linear-probe head file of DINO's and SwAV's eval_linear.py."""
  linear = {'module.linear.weight': state['fc.weight'], 'module.linear.bias': state['fc.bias']}
  torch.save({'epoch': 100, 'state_dict': linear, 'optimizer': {'state': {}, 'param_groups': []},
              'scheduler': {'T_max': 100, 'eta_min': 0, 'base_lrs': [0.03], 'last_epoch': 100},
              'best_acc': 75.3}, folder / name)
  return folder / name


def _dino(state, folder):
  backbone = {k: v for k, v in state.items() if not k.startswith('fc.')}
  torch.save(backbone, folder / 'dino_resnet50_pretrain.pth')
  head = _probe(state, folder, 'dino_resnet50_linearweights.pth')
  return ([folder / 'dino_resnet50_pretrain.pth', head], 'split',
          {'num_batches_tracked': _nbt(state)})


def _swav(state, folder):
  # facebookresearch/swav src/resnet50.py: projection_head = Linear, BatchNorm1d, ReLU, Linear;
  # prototypes = Linear without bias; DataParallel keys.
  norm = torch.nn.BatchNorm1d(2048).state_dict()
  extra = {'projection_head.0.weight': torch.randn(2048, 2048),
           'projection_head.0.bias': torch.randn(2048),
           **{f'projection_head.1.{k}': v for k, v in norm.items()},
           'projection_head.3.weight': torch.randn(128, 2048),
           'projection_head.3.bias': torch.randn(128),
           'prototypes.weight': torch.randn(3000, 128)}
  backbone = {'module.' + k: v for k, v in {**state, **extra}.items() if not k.startswith('fc.')}
  torch.save(backbone, folder / 'swav_800ep_pretrain.pth.tar')
  head = _probe(state, folder, 'swav_800ep_eval_linear.pth.tar')
  return [folder / 'swav_800ep_pretrain.pth.tar', head], 'split', {
      'swav_projection_head': ['module.' + k for k in extra if k.startswith('projection_head.')],
      'swav_prototypes': ['module.prototypes.weight'],
      'num_batches_tracked': _nbt(state, 'module.')}


def _separius_resnet50():
  """The modules of Separius/SimCLRv2-Pytorch resnet.py `get_resnet(50, 1, 0)`, with its
  attribute names and Sequential indices (forward left out): its state_dict has the file's
  keys. Returns (resnet, contrastive head)."""
  nn = torch.nn

  def conv(cin, cout, k=3, stride=1):
    return nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, bias=False)

  def bn_relu(c, relu=True):  # BatchNormRelu: a Sequential with the BatchNorm at .0
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU() if relu else nn.Identity())

  class Projection(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.shortcut, self.bn = conv(cin, cout, 1, stride), bn_relu(cout, relu=False)

  class BottleneckBlock(nn.Module):
    def __init__(self, cin, width, stride, use_projection):
      super().__init__()
      self.projection = Projection(cin, width * 4, stride) if use_projection else nn.Identity()
      self.net = nn.Sequential(conv(cin, width, 1), bn_relu(width), conv(width, width, 3, stride),
                               bn_relu(width), conv(width, width * 4, 1),
                               bn_relu(width * 4, relu=False))

  class Blocks(nn.Module):
    def __init__(self, depth, cin, width, stride):
      super().__init__()
      self.blocks = nn.ModuleList([BottleneckBlock(cin, width, stride, True)] + [
          BottleneckBlock(width * 4, width, 1, False) for _ in range(depth - 1)])

  class ResNet(nn.Module):
    def __init__(self):
      super().__init__()
      ops, cin = [nn.Sequential(conv(3, 64, 7, 2), bn_relu(64), nn.MaxPool2d(3, 2, 1))], 64
      for depth, width, stride in ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2)):
        ops.append(Blocks(depth, cin, width, stride))
        cin = width * 4
      self.net, self.fc = nn.Sequential(*ops), nn.Linear(2048, 1000)

  head = nn.ModuleDict({'layers': nn.ModuleList([
      nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
      nn.Linear(2048, 2048, bias=False), nn.BatchNorm1d(2048), nn.ReLU(),
      nn.Linear(2048, 128, bias=False), nn.BatchNorm1d(128)])})  # ContrastiveHead
  return ResNet(), head


_TO_SEPARIUS = {'conv1': 'net.0', 'bn1': 'net.1.0', 'conv2': 'net.2', 'bn2': 'net.3.0',
                'conv3': 'net.4', 'bn3': 'net.5.0', 'downsample.0': 'projection.shortcut',
                'downsample.1': 'projection.bn.0'}


def _separius_key(key):
  """A torchvision ResNet-50 key -> Separius's (written here independently of the converter)."""
  parts = key.split('.')
  if parts[0] in ('conv1', 'bn1'):
    return {'conv1': 'net.0.0', 'bn1': 'net.0.1.0'}[parts[0]] + '.' + parts[1]
  if parts[0] == 'fc':
    return key
  stage, block, module, leaf = parts[0][5:], parts[1], '.'.join(parts[2:-1]), parts[-1]
  return f'net.{stage}.blocks.{block}.{_TO_SEPARIUS[module]}.{leaf}'


def _simclrv2(state, folder):
  resnet, head = _separius_resnet50()
  # strict: the renamed keys are exactly Separius's, with the same shapes
  resnet.load_state_dict({_separius_key(k): v for k, v in state.items()}, strict=True)
  # convert.py: torch.save({'resnet': model.state_dict(), 'head': head.state_dict()}, ...)
  torch.save({'resnet': resnet.state_dict(), 'head': head.state_dict()}, folder / 'r50_1x_sk0.pth')
  return [folder / 'r50_1x_sk0.pth'], 'simclrv2', {
      'num_batches_tracked': _nbt(resnet.state_dict()),
      'simclrv2_head': ['head.' + k for k in head.state_dict()]}


def _diffusionnoise(legacy):
  def write(state, folder):
    # diffusion-noise-cls-pytorch train.py (torchvision's reference script): DiffusionNoiseModel
    # keeps the network as `self.module`; the noise front-end has no weights.
    args = argparse.Namespace(model='resnet50', diffusion_noise=True, no_normalization=True,
                              lr=0.5, epochs=90, weights=None, output_dir='out')
    path = folder / 'resnet50_diffusionnoise_nonorm_last.pth'
    torch.save({'model': {'module.' + k: v for k, v in state.items()},
                'optimizer': _optimizer(state), 'lr_scheduler': {'last_epoch': 90},
                'epoch': 89, 'args': args}, path, _use_new_zipfile_serialization=not legacy)
    return [path], 'diffusionnoise', {'num_batches_tracked': _nbt(state, 'module.')}
  return write


WRITERS = {
    'timm': _timm, 'torchvision': _torchvision, 'state_dict-augmix': _augmix,
    'state_dict-opticsaugment': _optics, 'robustness-dill-zip': _robustness(legacy=False),
    'robustness-dill-legacy': _robustness(legacy=True), 'aux_bn': _aux_bn,
    'split-dino': _dino, 'split-swav': _swav, 'simclrv2': _simclrv2,
    'diffusionnoise-zip': _diffusionnoise(legacy=False),
    'diffusionnoise-legacy': _diffusionnoise(legacy=True),
}


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, images):
  """The Flax logits, compiled once for every case (equal modules are one static argument);
  op by op, each primitive of each shape was compiled on its own."""
  return module.apply(variables, images)


def _logits_diff(metadata, variables, images, logits):
  flax_logits = np.asarray(_apply(models.create_from_card(metadata), variables, images))
  return float(np.max(np.abs(flax_logits - logits))), float(np.max(np.abs(logits)))


@pytest.mark.parametrize('case', list(WRITERS))
def test_layout_converts_strictly_and_runs_as_torch(case, reference, tmp_path):
  images, state, logits = reference
  files, layout, dropped = WRITERS[case](state, tmp_path)
  arch, variables, metadata = converters.convert_layout([str(f) for f in files], layout,
                                                        **IDENTITY)
  diff, scale = _logits_diff(metadata, variables, images, logits)
  print(f'\n{case}: max |logit difference| {diff:.3g}, largest |logit| {scale:.3g}')
  assert arch == 'resnet50' and metadata['layout'] == layout
  assert scale > 0.1, 'the comparison is not between zeros'
  assert diff <= RELATIVE_TOLERANCE * scale
  assert {rule: sorted(keys) for rule, keys in metadata['dropped'].items()} == {
      rule: sorted(keys) for rule, keys in dropped.items()}
  assert [s['path'] for s in metadata['sources']] == [str(f) for f in files]
  assert [s['sha256'] for s in metadata['sources']] == [
      converters.reader.sha256(str(f)) for f in files]
  digests = ''.join(s['sha256'] for s in metadata['sources'])
  assert metadata['sha256'] == (digests if len(files) == 1 else
                                hashlib.sha256(digests.encode()).hexdigest())
  assert metadata['mean'] == [0.0, 0.0, 0.0] and metadata['std'] == [1.0, 1.0, 1.0]


def test_a_reset_runs_on_a_converted_layout(reference, tmp_path):
  images, state, logits = reference
  files, layout, _ = _dino(state, tmp_path)
  _, variables, metadata = converters.convert_layout([str(f) for f in files], layout,
                                                     **IDENTITY)
  module = models.create_from_card(metadata)
  inventory = layers_lib.inventory(module, models.get('resnet50').block_depth)
  layer = next(layer for layer in inventory if layer.name == 'layer1.0.conv1')
  zeroed = reset.make('zero', inventory)(variables, layers_lib.Target(layer.name, (layer,)))
  moved = np.max(np.abs(np.asarray(_apply(module, zeroed, images)) - logits))
  assert moved > 1e-2 * np.max(np.abs(logits)), 'zeroing a conv moves the logits'
  assert not np.any(jax.tree.leaves(zeroed['params']['layer1']['0']['conv1']))


def test_default_normalisation_is_the_architectures(reference, tmp_path):
  _, state, _ = reference
  files, layout, _ = _torchvision(state, tmp_path)
  _, _, metadata = converters.convert_layout(str(files[0]), layout)  # a lone path: one file
  assert metadata['mean'] == [0.485, 0.456, 0.406] and metadata['std'] == [0.229, 0.224, 0.225]
  assert metadata['source'] == str(files[0])


# ------------------------------------------------------------------------------- bad input


def _one_line(error):
  assert '\n' not in str(error.value), str(error.value)
  return str(error.value)


def test_unknown_layout_names_the_known_ones(tmp_path):
  with pytest.raises(converters.ConversionError) as raised:
    converters.convert_layout([str(tmp_path / 'x.pth')], 'madry')
  message = _one_line(raised)
  assert "unknown checkpoint layout 'madry'" in message
  assert all(name in message for name in converters.LAYOUTS)


def test_split_takes_two_files_and_needs_them(reference, tmp_path):
  _, state, _ = reference
  (backbone, head), _, _ = _dino(state, tmp_path)
  with pytest.raises(converters.ConversionError) as raised:
    converters.convert_layout([str(backbone)], 'split')
  assert "layout 'split' takes 2 files (backbone, then linear-probe head), got 1" in _one_line(
      raised)
  with pytest.raises(converters.ConversionError) as raised:
    converters.convert_layout([str(backbone), str(head)], 'timm')
  assert "layout 'timm' takes 1 file (checkpoint), got 2" in _one_line(raised)
  with pytest.raises(converters.ConversionError) as raised:
    converters.convert_layout([str(backbone), str(tmp_path / 'missing_head.pth')], 'split')
  assert 'checkpoint not found' in _one_line(raised) and 'missing_head.pth' in str(raised.value)


def test_head_of_the_wrong_shape_is_named_with_both_shapes(reference, tmp_path):
  _, state, _ = reference
  (backbone, _), _, _ = _dino(state, tmp_path)
  torch.save({'epoch': 100, 'state_dict': {'module.linear.weight': torch.zeros(1000, 1024),
                                           'module.linear.bias': torch.zeros(1000)}},
             tmp_path / 'head.pth')
  with pytest.raises(converters.MismatchError) as raised:
    converters.convert_layout([str(backbone), str(tmp_path / 'head.pth')], 'split')
  message = _one_line(raised)
  print(f'\n{message}')
  assert ('fc.weight (module.linear.weight in head.pth): expected (1000, 2048), found '
          '(1000, 1024)') in message
  assert raised.value.mismatch.shapes == [('fc.weight', (1000, 2048), (1000, 1024))]


def test_layouts_drop_only_what_they_name(reference, tmp_path):
  _, state, _ = reference
  # auxiliary BatchNorms are not part of a plain state_dict: strict, they are unexpected
  files, _, _ = _aux_bn(state, tmp_path)
  with pytest.raises(converters.MismatchError, match='unexpected'):
    converters.convert_layout([str(f) for f in files], 'state_dict')
  # a robustness checkpoint's state_dict lies under 'model' and nowhere else
  torch.save({'state_dict': state}, tmp_path / 'not_robustness.pth')
  with pytest.raises(converters.ConversionError, match="no state_dict under 'model'"):
    converters.convert_layout([str(tmp_path / 'not_robustness.pth')], 'robustness')


def test_only_plain_data_is_unpickled_besides_tensors(reference, tmp_path):
  _, state, _ = reference
  small = {k: v for k, v in list(state.items())[:3]}
  for legacy in (False, True):
    path = tmp_path / f'hook{int(legacy)}.pth'
    torch.save({'model': small, 'args': argparse.Namespace(lr=0.1), 'hook': print}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(converters.ConversionError, match='trust_pickle'):
      converters.convert_layout([str(path)], 'diffusionnoise')
  # the generic `convert` keeps refusing even a Namespace unless told to trust the file
  torch.save({'state_dict': collections.OrderedDict(small), 'args': argparse.Namespace()},
             tmp_path / 'args.pth', _use_new_zipfile_serialization=False)
  with pytest.raises(converters.ConversionError, match='trust_pickle'):
    converters.convert(str(tmp_path / 'args.pth'))
