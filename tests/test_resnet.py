"""Flax ResNets compute what timm's and torchvision's ResNets compute, stage by stage."""

import functools
import os
import threading

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
torchvision = pytest.importorskip('torchvision')

import converters  # pylint: disable=g-import-not-at-top
from converters import parity
from lc_jax import models
from lc_jax import torch_reference as torch_models

LOGIT_TOLERANCE = 1e-4  # max abs difference of the logits, float32
# Activations of random nets grow to ~1e2 in deep stages; they are held to a relative bound.
ACTIVATION_TOLERANCE = 1e-5


@pytest.fixture(scope='module')
def photos():
  """Real photos, preprocessed as the paper does but smaller to keep the tests quick."""
  return parity.photos(('chelsea', 'coffee', 'rocket'), resize=144, crop=128)


def _torch_model(library, arch):
  if library == 'timm':
    return timm.create_model(arch, pretrained=False)
  return getattr(torchvision.models, arch)(weights=None)


@pytest.mark.parametrize('library', ['timm', 'torchvision'])
@pytest.mark.parametrize('arch', ['resnet18', 'resnet50'])
def test_logits_and_stages_match_torch(library, arch, photos, tmp_path):
  model = torch_models.calibrated(_torch_model(library, arch), photos)
  torch.save(model.state_dict(), tmp_path / 'model.pth')

  converted_arch, variables, metadata = converters.convert(str(tmp_path / 'model.pth'))
  assert converted_arch == arch
  module = models.create_from_card(metadata)
  report = parity.compare(module, variables, model, photos)

  stages = ('conv1', 'bn1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4', 'fc')
  diffs, scales = report['diffs'], report['scales']
  print(f'\n{library} {arch}: max abs diff of logits {diffs["logits"]:.3g} (largest logit '
        f'{scales["logits"]:.3g}); per stage (diff/largest value): '
        + ', '.join(f'{k} {diffs[k]:.2g}/{scales[k]:.2g}' for k in stages))
  assert set(stages) <= set(diffs), 'every stage is compared'
  assert len(diffs) > 30, 'blocks and layers are compared, not only stages'
  assert diffs['logits'] <= LOGIT_TOLERANCE
  assert scales['logits'] > 0.1, 'the comparison is not between zeros'
  for name in diffs:
    assert diffs[name] <= ACTIVATION_TOLERANCE * max(scales[name], 1.0), name


def test_converted_variables_mirror_torch_names():
  shapes = models.variable_shapes(models.create('resnet50'))
  assert shapes['params']['layer1']['0']['conv1']['kernel'].shape == (1, 1, 64, 64)
  assert shapes['params']['layer2']['0']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert shapes['params']['layer1']['0']['downsample']['0']['kernel'].shape == (1, 1, 64, 256)
  assert shapes['batch_stats']['layer1']['0']['bn1']['mean'].shape == (64,)
  assert shapes['params']['fc']['kernel'].shape == (2048, 1000)
  assert 'downsample' not in shapes['params']['layer1']['1']


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, images):
  """The Flax logits as one compiled program (op by op, every primitive compiled on its own)."""
  return module.apply(variables, images)


@pytest.mark.parametrize('arch', ['resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'])
def test_architecture_is_inferred(arch, tmp_path):
  model = getattr(torchvision.models, arch)(weights=None)  # one model: its file and its count
  torch.save(model.state_dict(), tmp_path / 'm.pth')
  found, variables, metadata = converters.convert(str(tmp_path / 'm.pth'))
  assert found == arch
  assert metadata['num_parameters'] == sum(p.numel() for p in model.parameters())


def test_classifier_size_comes_from_the_checkpoint(tmp_path):
  model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
  torch.save(model.state_dict(), tmp_path / 'm.pth')
  _, variables, metadata = converters.convert(str(tmp_path / 'm.pth'))
  assert metadata['num_classes'] == 10
  logits = _apply(models.create_from_card(metadata), variables,
                  np.zeros((1, 64, 64, 3), np.float32))
  assert logits.shape == (1, 10)


def test_saved_model_restores_exactly(tmp_path):
  images = np.random.RandomState(0).rand(2, 64, 64, 3).astype(np.float32)
  model = torch_models.calibrated(timm.create_model('resnet18'), images)
  torch.save(model.state_dict(), tmp_path / 'm.pth')
  arch, variables, metadata = converters.convert(str(tmp_path / 'm.pth'))
  converters.save(str(tmp_path / 'out'), arch, variables, metadata)
  module, restored, card = models.load(str(tmp_path / 'out'))

  assert card['arch'] == 'resnet18' and card['sha256'] == metadata['sha256']
  original, loaded = _flat(variables), _flat(restored)
  assert original.keys() == loaded.keys()
  for key, value in original.items():
    np.testing.assert_array_equal(loaded[key], value, err_msg=key)
  np.testing.assert_array_equal(_apply(module, restored, images),
                                _apply(models.create_from_card(metadata), variables, images))


def test_two_writers_of_one_model_folder_take_turns(tmp_path):
  # Two runs converting the same zoo model into its shared cache at once: before the writers took
  # turns, saves failed (a move onto the other's variables/, a card already gone), and after such
  # a failure orbax's next saves timed out.
  shapes = models.variable_shapes(models.create('resnet18'), 32)
  errors = []

  def save(value):
    variables = jax.tree.map(lambda s: np.full(s.shape, value, np.float32), shapes)
    try:
      models.save(str(tmp_path / 'm'), 'resnet18', variables, {'num_classes': 1000},
                  overwrite=True)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  for _ in range(4):
    writers = [threading.Thread(target=save, args=(value,)) for value in (1.0, 2.0)]
    for writer in writers:
      writer.start()
    for writer in writers:
      writer.join()
    assert not errors, errors
    _, variables, _ = models.load(str(tmp_path / 'm'))  # one writer's model, whole (digest checked)
    assert len({float(np.asarray(leaf).flat[0]) for leaf in jax.tree.leaves(variables)}) == 1
  assert sorted(os.listdir(tmp_path / 'm')) == ['.saving', 'model.json', 'variables']


def _flat(tree):
  return {jax.tree_util.keystr(path): value
          for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_normalisation_is_part_of_the_model():
  module = models.create('resnet18', mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
  assert module.mean == (0.0, 0.0, 0.0)
  assert models.create('resnet18').mean == (0.485, 0.456, 0.406)
