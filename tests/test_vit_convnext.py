"""ViT/DeiT and ConvNeXt: parity with timm for every registered variant, block by block; a reset of
each new layer kind equals timm with that module loaded from a fresh model; skip removes exactly
the selected branches; prefix reuse, chunks and spread resets give the results of whole runs;
and the converters' rules.

Models are timm's with random weights whose norms, layer scales and tokens are moved away from
their initial values, so a mix-up of any of them would show.
"""

import csv
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

import converters  # pylint: disable=g-import-not-at-top,g-bad-import-order
from converters import mapping
from converters import parity
from lc_jax import config as lc_config
from lc_jax import experiment
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import reset
from lc_jax import schema
from lc_jax.errors import UserError
from tests import devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGIT_TOLERANCE = 1e-4  # max abs difference of the logits, float32, matmul precision highest
BLOCK_TOLERANCE = 1e-5  # max abs difference of a block's output, relative to its largest value
# The input sizes tested: a ViT's position embedding fixes 224; ConvNeXt takes any.
SIZES = {'vit': 224, 'convnext': 64}
SMALL = ('vit_tiny_patch16_224', 'convnext_atto')


def _randomised(model, seed=0):
  """`model` (timm) with its norms' weights and biases, layer scales and tokens drawn far from
  their initial 1, 0, 1e-6 and ~0, in eval mode."""
  generator = torch.Generator().manual_seed(seed)

  def draw(shape, low, high):
    return low + (high - low) * torch.rand(shape, generator=generator)
  with torch.no_grad():
    for name, value in model.named_parameters():
      leaf = name.rsplit('.', 1)[-1]
      if 'norm' in name or name.startswith('stem.1') or '.downsample.0.' in name:
        value.copy_(draw(value.shape, 0.5, 1.5) if leaf == 'weight'
                    else draw(value.shape, -0.2, 0.2))
      elif leaf == 'gamma':
        value.copy_(draw(value.shape, 0.1, 1.0))
      elif leaf in ('cls_token', 'pos_embed'):
        value.copy_(draw(value.shape, -0.5, 0.5))
  return model.eval()


def _state(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _images(size, count=2, seed=1):
  return np.random.RandomState(seed).rand(count, size, size, 3).astype(np.float32)


def _convert(model, arch):
  """(module, variables) of a timm model's weights, converted strictly."""
  build = sys.modules['converters.convert'].build
  _, variables, card = build(_state(model), arch, None, None, 'timm')
  return models.create_from_card(card), variables


@pytest.mark.parametrize('arch', models.names('vit') + models.names('convnext'))
def test_logits_and_every_block_match_timm(arch):
  spec = models.get(arch)
  torch.manual_seed(0)
  model = _randomised(timm.create_model(spec.timm_name))
  module, variables = _convert(model, arch)
  report = parity.compare(module, variables, model, _images(SIZES[spec.family]))
  diffs, scales = report['diffs'], report['scales']
  blocks = [name for name in diffs if name.count('.') == (1 if spec.family == 'vit' else 3)
            and '.blocks.' in '.' + name]
  assert len(blocks) == len(module.segments()) - 2  # every block's output was compared
  worst = max(blocks, key=lambda n: diffs[n] / scales[n])
  print(f'{arch}: logits max abs diff {diffs["logits"]:.2g} (largest {scales["logits"]:.3g}); '
        f'{len(diffs)} modules compared, worst block {worst} {diffs[worst]:.2g} of '
        f'{scales[worst]:.3g}')
  assert diffs['logits'] <= LOGIT_TOLERANCE
  for name in diffs:
    assert diffs[name] <= BLOCK_TOLERANCE * max(1.0, scales[name]), name


# ------------------------------------------------------------------------------- resets -------

@pytest.fixture(scope='module', params=SMALL)
def trained_and_fresh(request):
  """(arch, module, layers, trained and fresh timm models, their Flax variables, images)."""
  arch = request.param
  spec = models.get(arch)
  torch.manual_seed(1)
  trained = _randomised(timm.create_model(spec.timm_name))
  torch.manual_seed(2)
  fresh = timm.create_model(spec.timm_name).eval()
  module, trained_vars = _convert(trained, arch)
  _, fresh_vars = _convert(fresh, arch)
  layers = layers_lib.inventory(module, spec.block_depth)
  return arch, module, layers, trained, fresh, trained_vars, fresh_vars, _images(
      SIZES[spec.family])


def _torch_logits(model, module, images):
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = (x - torch.tensor(module.mean).view(1, 3, 1, 1)) / torch.tensor(module.std).view(1, 3, 1, 1)
    return model(x).numpy()


def _copy(arch, model):
  """A timm model of `arch` holding a copy of `model`'s weights."""
  copy = timm.create_model(models.get(arch).timm_name).eval()
  copy.load_state_dict(model.state_dict())
  return copy


# One layer of every kind of each family, by its torch name.
RESET_LAYERS = {
    'vit_tiny_patch16_224': ['patch_embed.proj', 'cls_token', 'pos_embed', 'blocks.3.norm1',
                             'blocks.3.attn.qkv', 'blocks.5.attn.proj', 'blocks.7.mlp.fc1',
                             'blocks.7.mlp.fc2', 'norm', 'head'],
    'convnext_atto': ['stem.0', 'stem.1', 'stages.1.downsample.0', 'stages.1.downsample.1',
                      'stages.2.blocks.3.conv_dw', 'stages.2.blocks.3.norm',
                      'stages.2.blocks.3.mlp.fc1', 'stages.2.blocks.3.gamma', 'head.norm',
                      'head.fc'],
}


def test_fresh_reset_of_each_kind_equals_timm_with_the_module_loaded(trained_and_fresh):
  arch, module, layers, trained, fresh, trained_vars, fresh_vars, images = trained_and_fresh
  by_name = {layer.name: layer for layer in layers}
  apply = jax.jit(module.apply)
  original = np.asarray(apply(trained_vars, images))
  reset_fn = reset.make('fresh', layers, source=fresh_vars)
  kinds = set()
  for name in RESET_LAYERS[arch]:
    layer = by_name[name]
    kinds.add(layer.kind)
    flax_logits = np.asarray(apply(reset_fn(trained_vars, layers_lib.Target(name, (layer,))),
                                   images))
    model = _copy(arch, trained)
    if layer.kind in ('embedding', 'layer_scale'):  # a parameter, not a module
      with torch.no_grad():
        model.get_parameter(name).copy_(fresh.get_parameter(name))
    else:
      model.get_submodule(name).load_state_dict(fresh.get_submodule(name).state_dict())
    torch_logits = _torch_logits(model, module, images)
    diff = np.abs(flax_logits - torch_logits).max()
    moved = np.abs(original - torch_logits).max()
    print(f'{arch} {name} ({layer.kind}): max abs diff vs timm {diff:.2g}; '
          f'logits moved {moved:.3g}')
    assert diff <= LOGIT_TOLERANCE, name
    assert moved > 1e-3, f'the reset of {name} changed nothing'
  assert kinds >= {'layernorm', 'linear'} | ({'embedding', 'attn_qkv', 'attn_proj', 'mlp'}
                                             if 'vit' in arch else {'layer_scale', 'mlp',
                                                                    'depthwise_conv'})


class _Zero(torch.nn.Module):
  """A residual branch that is gone: outputs zeros of its input's shape."""

  def forward(self, x, *args, **kwargs):
    del args, kwargs
    return torch.zeros_like(x)


@pytest.mark.parametrize('trained_and_fresh', ['vit_tiny_patch16_224'], indirect=True)
@pytest.mark.parametrize('types,removed', [
    ('attn_proj', ('attn',)), ('mlp', ('mlp',)), ('conv,linear', ('attn', 'mlp'))])
def test_skip_removes_the_selected_vit_branches(trained_and_fresh, types, removed):
  arch, module, layers, trained, _, trained_vars, _, images = trained_and_fresh
  settings_types = lc_config.ResetConfig(mode='skip', layer_types=types).types
  [target] = layers_lib.select(layers, settings_types, 'blocks.4', granularity='block')
  flax_logits = np.asarray(module.apply(reset.make('skip', layers)(trained_vars, target), images))
  model = _copy(arch, trained)
  for branch in removed:
    setattr(model.blocks[4], branch, _Zero())
  diff = np.abs(flax_logits - _torch_logits(model, module, images)).max()
  print(f'skip blocks.4 with types {types}: max abs diff vs timm without {removed}: {diff:.2g}')
  assert diff <= LOGIT_TOLERANCE


@pytest.mark.parametrize('trained_and_fresh', ['convnext_atto'], indirect=True)
def test_skip_makes_a_convnext_block_its_identity(trained_and_fresh):
  arch, module, layers, trained, _, trained_vars, _, images = trained_and_fresh
  types = lc_config.ResetConfig(mode='skip').types  # brings in layer_scale
  [target] = layers_lib.select(layers, types, 'stages.2.blocks.1', granularity='block')
  flax_logits = np.asarray(module.apply(reset.make('skip', layers)(trained_vars, target), images))
  model = _copy(arch, trained)
  model.stages[2].blocks[1] = torch.nn.Identity()
  diff = np.abs(flax_logits - _torch_logits(model, module, images)).max()
  print(f'skip stages.2.blocks.1: max abs diff vs timm with the block removed: {diff:.2g}')
  assert diff <= LOGIT_TOLERANCE


# ------------------------------------------------------------------------------- runs ---------

@pytest.fixture(scope='module', params=SMALL)
def checkpoint(request, tmp_path_factory):
  """(arch, a .safetensors checkpoint of randomised timm weights)."""
  arch = request.param
  torch.manual_seed(3)
  model = _randomised(timm.create_model(models.get(arch).timm_name))
  path = tmp_path_factory.mktemp('ckpt') / f'{arch}.safetensors'
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  return arch, str(path)


# Layers of every kind in the first, a middle and the last block, the stem and the head.
RUN_LAYERS = {
    'vit_tiny_patch16_224': 'patch_embed.proj,cls_token,pos_embed,blocks.0.*,blocks.6.*,'
                            'blocks.11.*,norm,head',
    'convnext_atto': 'stem.*,stages.1.downsample.*,stages.1.blocks.0.*,stages.3.blocks.1.*,head.*'}


def _settings(arch, path, workdir, tmp_path, **extra):
  """A small run's settings as {dotted config key: value}."""
  size = SIZES[models.get(arch).family]
  return {'model.checkpoint': path, 'model.arch': arch, 'data.source': 'photos',
          'data.num_images': 4, 'data.order': 'sorted', 'data.resize_size': size + size // 8,
          'data.crop_size': size, 'data.batch_size': 4, 'trials': 1, 'progress': False,
          'reset.layer_types': 'conv,linear,layernorm,embedding,layer_scale',
          'reset.layers': RUN_LAYERS[arch], 'cache_dir': str(tmp_path / 'cache'),
          'compilation_cache_dir': str(tmp_path / 'compiled'), **extra}


def _config(settings):
  """The run config of `settings`, in process."""
  config = lc_config.default()
  for key, value in settings.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def _flags(settings):
  """`settings` as run.py's command-line flags."""
  return [f'--config.{key}={str(value).lower() if isinstance(value, bool) else value}'
          for key, value in settings.items()]


def _numbers(workdir):
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    return {(r['layer'], r['trial']): np.array([float(r[c] or 'nan') for c in schema.METRICS])
            for r in csv.DictReader(f)}


def test_prefix_reuse_chunks_and_spread_resets_give_the_whole_runs_results(checkpoint, tmp_path):
  arch, path = checkpoint
  runs = {}
  for name, extra in (('reused', {}), ('whole', {'reuse_prefix': False}),
                      ('chunked', {'chunk_size': 3})):
    runs[name] = tmp_path / name
    experiment.run(_config(_settings(arch, path, runs[name], tmp_path, **extra)), str(runs[name]))
  # Without prefix reuse every reset runs the whole network through the same compiled
  # segments: the very same file.
  assert ((runs['whole'] / 'results.csv').read_bytes()
          == (runs['reused'] / 'results.csv').read_bytes())
  # Resets spread over 2 groups of 2 of 4 devices (a process of its own; more host devices
  # starve XLA's CPU collectives on a loaded 2-core machine), and batches of 4 in chunks of 2:
  # equal within float32 rounding.
  runs['spread'] = tmp_path / 'spread'
  spread = subprocess.run(
      [sys.executable, 'run.py', '--config=configs/demo.py', f'--workdir={runs["spread"]}',
       *_flags(_settings(arch, path, runs['spread'], tmp_path, spread_resets=2))],
      cwd=ROOT, env=devices.cpu_devices(4),
      capture_output=True, text=True, check=False)
  assert spread.returncode == 0, spread.stderr
  want = _numbers(runs['whole'])
  assert len(want) > 15  # the original and every selected layer
  for name in ('chunked', 'spread'):
    got = _numbers(runs[name])
    assert got.keys() == want.keys()
    difference = max(np.nanmax(np.abs(got[k] - want[k]) / np.maximum(1, np.abs(want[k])))
                     for k in want)
    print(f'{arch} {name} vs whole runs: {len(want)} rows, largest difference {difference:.2g}')
    assert difference <= 1e-6


@pytest.mark.parametrize('checkpoint', ['vit_tiny_patch16_224'], indirect=True)
def test_a_vit_refuses_images_of_another_size_before_running(checkpoint, tmp_path):
  arch, path = checkpoint
  config = _config(_settings(arch, path, tmp_path / 'w', tmp_path, **{
      'data.crop_size': 64, 'data.resize_size': 72}))
  with pytest.raises(UserError, match='takes 224x224 images.*data.crop_size=224'):
    experiment.run(config, str(tmp_path / 'w'))
  assert not (tmp_path / 'w' / 'results.csv').exists()


# --------------------------------------------------------------------------- converters -------

def test_pth_and_safetensors_of_any_class_count_convert(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  for arch in SMALL:
    model = timm.create_model(models.get(arch).timm_name, num_classes=10)
    torch.save(model.state_dict(), tmp_path / f'{arch}.pth')
    save_file(dict(model.state_dict()), str(tmp_path / f'{arch}.safetensors'))
    for suffix in ('pth', 'safetensors'):
      found, variables, card = converters.convert(str(tmp_path / f'{arch}.{suffix}'))
      assert (found, card['num_classes']) == (arch, 10)
      state = mapping.to_state_dict(variables)
      assert state.keys() == {k for k in model.state_dict()}
      for key, value in model.state_dict().items():
        assert np.array_equal(state[key], value.numpy()), key


def test_vit_and_deit_of_one_size_need_the_architecture_named(tmp_path):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / 'small.safetensors')
  save_file(dict(timm.create_model('deit_small_patch16_224').state_dict()), path)
  with pytest.raises(converters.ConversionError,
                     match='fits deit_small_patch16_224 and vit_small_patch16_224.*pass the arch'):
    converters.convert(path)
  _, _, card = converters.convert(path, 'deit_small_patch16_224')
  assert card['mean'] == list(models.get('deit_small_patch16_224').mean)


def test_distilled_deit_is_refused(tmp_path):
  state = dict(timm.create_model('vit_tiny_patch16_224').state_dict())
  state['dist_token'] = torch.zeros(1, 1, 192)
  state['head_dist.weight'], state['head_dist.bias'] = torch.zeros(1000, 192), torch.zeros(1000)
  torch.save(state, tmp_path / 'distilled.pth')
  with pytest.raises(converters.ConversionError, match='distilled DeiT'):
    converters.convert(str(tmp_path / 'distilled.pth'))


def test_a_vit_of_another_input_size_keeps_it_on_its_card(tmp_path):
  torch.manual_seed(4)
  model = _randomised(timm.create_model('vit_tiny_patch16_224', img_size=64))
  torch.save(model.state_dict(), tmp_path / 'vit64.pth')
  arch, variables, card = converters.convert(str(tmp_path / 'vit64.pth'))
  assert arch == 'vit_tiny_patch16_224' and card['module_settings'] == {'img_size': 64}
  converters.save(str(tmp_path / 'model'), arch, variables, card)
  module, variables, _ = models.load(str(tmp_path / 'model'))
  assert module.img_size == 64
  report = parity.compare(module, variables, model, _images(64))
  assert report['diffs']['logits'] <= LOGIT_TOLERANCE


def test_a_convnext_of_unregistered_widths_is_refused_by_name(tmp_path):
  model = timm.create_model('convnext_atto', dims=(48, 96, 192, 384))
  torch.save(model.state_dict(), tmp_path / 'odd.pth')
  with pytest.raises(converters.ConversionError,
                     match='ConvNeXt with depths 2-2-6-2, widths 48-96-192-384 and conv MLPs'):
    converters.convert(str(tmp_path / 'odd.pth'))
