"""Layer inventory, initialisation schemes against torch's, and pure, exact, compile-free resets."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
torchvision = pytest.importorskip('torchvision')
stats = pytest.importorskip('scipy.stats')

import converters  # pylint: disable=g-import-not-at-top
from lc_jax import init
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import reset
from lc_jax.errors import UserError
from lc_jax import torch_reference as torch_models
from lc_jax import timing


def _inventory(arch):
  spec = models.get(arch)
  return layers_lib.inventory(spec.create(), spec.block_depth)


@pytest.fixture(scope='module')
def resnet50_layers():
  return _inventory('resnet50')


# ----------------------------------------------------------------------------------- inventory


def test_resnet50_inventory_is_the_papers(resnet50_layers):
  default = layers_lib.select(resnet50_layers)
  assert len(default) == 54  # every Conv2d and Linear, as in the released results
  assert len(layers_lib.select(resnet50_layers, ['conv', 'linear', 'batchnorm'])) == 107
  names = [t.name for t in default]
  assert names[:4] == ['conv1', 'layer1.0.conv1', 'layer1.0.conv2', 'layer1.0.conv3']
  assert names[4] == 'layer1.0.downsample.0' and names[-1] == 'fc'
  torch_names = [n for n, m in torchvision.models.resnet50().named_modules()
                 if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
  assert names == torch_names, 'forward order is torch module order'
  by_name = {layer.name: layer for layer in resnet50_layers}
  assert by_name['layer2.0.downsample.0'].block == 'layer2.0'
  assert by_name['layer2.0.downsample.0'].stage == 'layer2'
  assert by_name['conv1'].stage == 'stem' and by_name['fc'].stage == 'head'
  assert by_name['fc'].num_params == 2048 * 1000 + 1000
  assert by_name['layer1.0.bn1'].num_params == 128


def test_selection_by_pattern_range_and_granularity(resnet50_layers):
  names = lambda **kw: [t.name for t in layers_lib.select(resnet50_layers, **kw)]
  assert names(pattern='layer1.*.conv1') == ['layer1.0.conv1', 'layer1.1.conv1', 'layer1.2.conv1']
  assert names(pattern=r'layer\d\.0\.downsample\.0') == [
      f'layer{i}.0.downsample.0' for i in range(1, 5)]
  assert names(pattern='fc,conv1') == ['conv1', 'fc']
  assert names(pattern='first:2') == ['conv1', 'layer1.0.conv1']
  assert names(pattern='last:1') == ['fc']
  assert names(pattern='1:3') == ['layer1.0.conv1', 'layer1.0.conv2']
  assert names(pattern='layer4.2') == ['layer4.2.conv1', 'layer4.2.conv2', 'layer4.2.conv3']
  assert names(pattern='*.downsample.*') == [f'layer{i}.0.downsample.0' for i in range(1, 5)]
  assert names(pattern=r'layer[1-2]\.\d{1,2}\.conv1') == [
      'layer1.0.conv1', 'layer1.1.conv1', 'layer1.2.conv1', 'layer2.0.conv1', 'layer2.1.conv1',
      'layer2.2.conv1', 'layer2.3.conv1']
  assert names(pattern='layer4.2.*,fc') == ['layer4.2.conv1', 'layer4.2.conv2', 'layer4.2.conv3', 'fc']
  assert names(pattern='layer1.0.downsample') == ['layer1.0.downsample.0']  # a torch Sequential
  assert names(granularity='stage') == ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
  blocks = layers_lib.select(resnet50_layers, ['conv', 'batchnorm'], granularity='block')
  assert len(blocks) == 1 + 16 and blocks[1].name == 'layer1.0'  # stem + blocks; no head conv
  assert [l.name for l in blocks[1].layers][-2:] == ['layer1.0.downsample.0', 'layer1.0.downsample.1']


def test_unknown_names_fail_with_the_closest(resnet50_layers):
  with pytest.raises(UserError, match=r"unknown layer 'layer1.0.conv9' \(did you mean layer1.0.conv3"):
    layers_lib.select(resnet50_layers, pattern='layer1.0.conv9')
  with pytest.raises(UserError, match='is a batchnorm layer, which the selected types leave out'):
    layers_lib.select(resnet50_layers, pattern='layer1.0.bn1')
  with pytest.raises(UserError, match='selects no layer'):
    layers_lib.select(resnet50_layers, pattern='layer9.*')
  with pytest.raises(UserError, match='unknown layer type'):
    layers_lib.select(resnet50_layers, types=['attention'])


def test_a_name_selects_its_module_not_one_whose_name_it_begins():
  # ViT's blocks.1 is no prefix of blocks.10 or blocks.11: timm's Linears under 'blocks.1.'.
  layers = _inventory('vit_tiny_patch16_224')
  vit = timm.create_model('vit_tiny_patch16_224', pretrained=False)
  linears = [n for n, m in vit.named_modules() if isinstance(m, torch.nn.Linear)]
  for item in ('blocks.1', 'blocks.1.attn'):
    want = [n for n in linears if n.startswith(item + '.')]
    assert len(want) == (4 if item == 'blocks.1' else 2)
    assert [t.name for t in layers_lib.select(layers, ['linear'], item)] == want


def test_a_regex_matches_whole_names_and_last_0_selects_none(resnet50_layers):
  names = lambda pattern: [t.name for t in layers_lib.select(resnet50_layers, pattern=pattern)]
  assert names(r'layer1\.0\.conv\d') == ['layer1.0.conv1', 'layer1.0.conv2', 'layer1.0.conv3']
  with pytest.raises(UserError, match='selects no layer'):  # a prefix of each name, no whole one
    names(r'layer1\.0\.conv')
  with pytest.raises(UserError, match='selects no layer'):
    names('last:0')


# ------------------------------------------------------------------- initialisation schemes


def _torch_weights(model):
  """{module name: {tensor name: values}}; a free-standing parameter (a ViT's cls_token, a
  ConvNeXt's gamma) is a module of its own name holding 'value', as in Flax."""
  weights = {n: {k: v.detach().numpy() for k, v in m.named_parameters(recurse=False)} |
             {k: v.numpy() for k, v in m.named_buffers(recurse=False) if 'running' in k}
             for n, m in model.named_modules()}
  for name, value in model.named_parameters():
    if name.rsplit('.', 1)[-1] in ('cls_token', 'pos_embed', 'gamma'):
      weights[name] = {'value': value.detach().numpy()}
  return weights


def _leaf_name(layer, torch_leaf):
  """The 'collection/leaf' of a layer's variable that torch calls `torch_leaf`."""
  collection, leaf = {'weight': ('params', 'kernel'), 'bias': ('params', 'bias'),
                      'running_mean': ('batch_stats', 'mean'), 'value': ('params', 'value'),
                      'running_var': ('batch_stats', 'var')}[torch_leaf]
  if layer.kind in ('batchnorm', 'layernorm') and torch_leaf == 'weight':
    leaf = 'scale'
  return f'{collection}/{leaf}'


def _flax_leaf(fresh, layer, torch_leaf):
  collection, leaf = _leaf_name(layer, torch_leaf).split('/')
  node = fresh[collection]
  for part in layer.path:
    node = node[part]
  return np.asarray(node[leaf])


# A tensor of fewer values than this is also judged on the shape of its distribution.
SMALL = 1000


# (scheme, torch model factory, layers to check)
SCHEME_CASES = [
    ('timm_resnet', 'resnet50', lambda: timm.create_model('resnet50'),
     ['conv1', 'layer1.0.conv2', 'layer3.0.downsample.0', 'fc', 'layer2.1.bn3', 'layer2.1.bn1']),
    ('torchvision_resnet', 'resnet50', lambda: torchvision.models.resnet50(),
     ['conv1', 'layer4.1.conv2', 'fc', 'layer2.1.bn3']),
    ('goog', 'efficientnet_lite0', lambda: timm.create_model('tf_efficientnet_lite0'),
     ['conv_stem', 'blocks.1.0.conv_pw', 'blocks.1.0.conv_dw', 'blocks.6.0.conv_pwl',
      'conv_head', 'classifier', 'blocks.2.1.bn2']),
    ('timm_vit', 'vit_small_patch16_224', lambda: timm.create_model('vit_small_patch16_224'),
     ['patch_embed.proj', 'cls_token', 'pos_embed', 'blocks.0.norm1', 'blocks.0.attn.qkv',
      'blocks.5.attn.proj', 'blocks.11.mlp.fc1', 'blocks.11.mlp.fc2', 'norm', 'head']),
    ('timm_convnext', 'convnext_tiny', lambda: timm.create_model('convnext_tiny'),
     ['stem.0', 'stem.1', 'stages.1.downsample.0', 'stages.1.downsample.1',
      'stages.2.blocks.4.conv_dw', 'stages.2.blocks.4.norm', 'stages.2.blocks.4.mlp.fc1',
      'stages.3.blocks.2.mlp.fc2', 'stages.3.blocks.2.gamma', 'head.norm', 'head.fc']),
    ('timm_convnext', 'convnext_atto', lambda: timm.create_model('convnext_atto'),
     ['stages.0.blocks.1.mlp.fc1', 'stages.0.blocks.1.gamma']),  # 1x1-conv MLPs
]


@pytest.mark.parametrize('scheme,arch,factory,names', SCHEME_CASES, ids=[c[0] for c in SCHEME_CASES])
def test_scheme_draws_match_torch(scheme, arch, factory, names):
  torch.manual_seed(0)
  reference = _torch_weights(factory())
  inventory = {layer.name: layer for layer in _inventory(arch)}
  fresh = init.fresh_variables(list(inventory.values()), scheme, jax.random.key(0))
  for name in names:
    layer = inventory[name]
    for torch_leaf, want in reference[name].items():
      got = _flax_leaf(fresh, layer, torch_leaf).ravel()
      want = want.ravel()
      label = f'{scheme} {name}.{torch_leaf}'
      assert got.size == want.size, label
      if np.all(want == want[0]):  # constants: norms 1/0, zero bias, zero_init_last, gamma
        np.testing.assert_array_equal(got, want, err_msg=label)
        continue
      ks = stats.ks_2samp(got, want)
      print(f'{label}: std {got.std():.4g} vs {want.std():.4g}, max {np.abs(got).max():.4g} vs '
            f'{np.abs(want).max():.4g}, KS p={ks.pvalue:.3g}')
      assert ks.pvalue > 1e-3, label
      assert got.std() == pytest.approx(want.std(), rel=0.1 if got.size < SMALL else 0.03), label
      assert abs(got.mean()) < 4 * want.std() / np.sqrt(got.size) + 1e-7, label
      if got.size < SMALL:
        # On a few hundred values KS passes a uniform of the right std where torch draws a
        # normal. The layer's draws under 24 more keys (about 10^4 values) against torch's: KS
        # again, and the excess kurtosis, 0 for a normal and -1.2 for a uniform (its standard
        # error on torch's sample is sqrt(24 / n), 0.25 at n = 384).
        pooled = np.concatenate([got] + [
            np.asarray(init.scheme(scheme)(layer, jax.random.key(k))[_leaf_name(layer, torch_leaf)]
                       ).ravel() for k in range(1, 25)])
        gap = stats.kurtosis(pooled) - stats.kurtosis(want)
        pooled_ks = stats.ks_2samp(pooled, want)
        print(f'{label}: {pooled.size} pooled values: KS p={pooled_ks.pvalue:.3g}, excess '
              f'kurtosis {stats.kurtosis(pooled):.3g} vs {stats.kurtosis(want):.3g}')
        assert pooled_ks.pvalue > 1e-3, label
        assert abs(gap) < 3 * np.sqrt(24 / want.size), label


def test_trunc_normal_matches_timm_where_the_bounds_bite():
  # timm's bounds are absolute (at std .02, the default +-2 never bites): drawn at bounds of
  # one standard deviation, the two samplers must agree on the truncated distribution.
  from timm.layers import trunc_normal_  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  want = trunc_normal_(torch.empty(20000), std=0.5, a=-0.5, b=0.5).numpy()
  got = np.asarray(init.trunc_normal(jax.random.key(0), (20000,), 0.5, bound=0.5))
  assert np.abs(got).max() <= 0.5 and np.abs(got).max() > 0.499
  assert got.std() == pytest.approx(want.std(), rel=0.02)  # 0.5 * 0.54: not the untruncated 0.5
  assert stats.ks_2samp(got, want).pvalue > 1e-3


def test_pytorch_default_scheme_matches_torch_modules():
  torch.manual_seed(0)
  conv, linear = torch.nn.Conv2d(64, 128, 3, bias=True), torch.nn.Linear(512, 300)
  for module, layer in [
      (conv, layers_lib.Layer('c', ('c',), 'conv', {'params/kernel': (3, 3, 64, 128),
                                                     'params/bias': (128,)}, 'stem', 'stem', 0)),
      (linear, layers_lib.Layer('l', ('l',), 'linear', {'params/kernel': (512, 300),
                                                         'params/bias': (300,)}, 'head', 'head', 1))]:
    leaves = init.scheme('pytorch_default')(layer, jax.random.key(1))
    for torch_leaf, leaf in (('weight', 'params/kernel'), ('bias', 'params/bias')):
      want = getattr(module, torch_leaf).detach().numpy().ravel()
      got = np.asarray(leaves[leaf]).ravel()
      bound = 1 / np.sqrt(module.weight[0].numel())
      assert np.abs(got).max() <= bound and np.abs(got).max() > 0.95 * bound
      assert stats.ks_2samp(got, want).pvalue > 1e-3, (type(module).__name__, torch_leaf)


def test_fresh_draws_do_not_depend_on_the_selection(resnet50_layers):
  key = jax.random.key(3)
  full = init.fresh_variables(resnet50_layers, 'timm_resnet', key)
  again = init.fresh_variables(resnet50_layers, 'timm_resnet', key)
  other_trial = init.fresh_variables(resnet50_layers, 'timm_resnet', jax.random.key(4))
  kernel = lambda v: np.asarray(v['params']['layer2']['0']['conv2']['kernel'])
  np.testing.assert_array_equal(kernel(full), kernel(again))
  # Drawn for a few layers only (a reset of a subset), each layer's weights are the same.
  names = ('layer1.0.conv1', 'layer2.0.conv2', 'fc')
  subset = init.fresh_variables([l for l in resnet50_layers if l.name in names],
                                'timm_resnet', key)
  for name in names:
    path = ['params', *name.split('.'), 'kernel']
    np.testing.assert_array_equal(functools.reduce(dict.get, path, subset),
                                  functools.reduce(dict.get, path, full))
  assert not np.array_equal(kernel(full), kernel(other_trial))
  assert jax.tree.structure(full) == jax.tree.structure(
      models.variable_shapes(models.create('resnet50')))


# ------------------------------------------------------------------------- exact resets


@pytest.fixture(scope='module')
def trained_and_fresh(tmp_path_factory):
  """A 'trained' ResNet-50 (calibrated random weights) and a fresh timm ResNet-50, in torch and
  converted to Flax."""
  images = np.random.RandomState(0).rand(4, 64, 64, 3).astype(np.float32)
  torch.manual_seed(1)
  trained = torch_models.calibrated(timm.create_model('resnet50'), images)
  torch.manual_seed(2)
  fresh = timm.create_model('resnet50').eval()
  folder = tmp_path_factory.mktemp('reset')
  torch.save(trained.state_dict(), folder / 'trained.pth')
  torch.save(fresh.state_dict(), folder / 'fresh.pth')
  _, trained_vars, _ = converters.convert(str(folder / 'trained.pth'))
  _, fresh_vars, _ = converters.convert(str(folder / 'fresh.pth'))
  return trained, fresh, trained_vars, fresh_vars, images


@pytest.mark.parametrize('name', ['conv1', 'layer2.0.downsample.0', 'layer3.1.bn3', 'layer1.0.bn1',
                                  'layer1.2.conv2', 'fc'])
def test_fresh_reset_equals_torch_with_the_module_loaded(trained_and_fresh, resnet50_layers,
                                                          name):
  trained, fresh, trained_vars, fresh_vars, images = trained_and_fresh
  layer = next(l for l in resnet50_layers if l.name == name)
  reset_fn = reset.make('fresh', resnet50_layers, source=fresh_vars)
  flax_logits = models.create('resnet50').apply(
      reset_fn(trained_vars, layers_lib.Target(name, (layer,))), images)

  torch_model = timm.create_model('resnet50').eval()
  torch_model.load_state_dict(trained.state_dict())
  torch_model.get_submodule(name).load_state_dict(fresh.get_submodule(name).state_dict())
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch_logits = torch_model(x).numpy()
    if name == 'layer3.1.bn3':  # timm's zero_init_last: the reset branch outputs exactly zero
      out = torch_model.get_submodule(name)(torch.randn(2, 1024, 4, 4))
      assert torch.count_nonzero(out) == 0
  diff = np.abs(np.asarray(flax_logits) - torch_logits).max()
  original = models.create('resnet50').apply(trained_vars, images)
  print(f'{name}: max abs diff vs torch {diff:.3g}; logits moved by '
        f'{np.abs(np.asarray(original) - torch_logits).max():.3g}')
  assert diff <= 1e-4
  assert np.abs(np.asarray(original) - torch_logits).max() > 1e-3, 'the reset changed the output'


def test_resets_keep_the_original_bit_identical(trained_and_fresh, resnet50_layers):
  _, _, trained_vars, fresh_vars, _ = trained_and_fresh
  before = jax.tree.map(np.array, trained_vars)
  blocks = layers_lib.select(resnet50_layers, ['conv', 'batchnorm'], granularity='block')
  for mode in reset.MODES:
    fn = reset.make(mode, resnet50_layers, source=fresh_vars, alpha=0.5)
    targets = blocks[1:] if mode == 'skip' else layers_lib.select(  # blocks[0] is the stem
        resnet50_layers, ['conv', 'linear', 'batchnorm'])
    for target in targets:
      after = fn(trained_vars, target)
      assert jax.tree.structure(after) == jax.tree.structure(trained_vars)
  jax.tree.map(np.testing.assert_array_equal, trained_vars, before)


def test_modes_change_what_they_should(trained_and_fresh, resnet50_layers):
  _, _, trained, fresh, images = trained_and_fresh
  by_name = {l.name: l for l in resnet50_layers}
  bn = layers_lib.Target('layer1.0.bn1', (by_name['layer1.0.bn1'],))
  node = lambda v, c: {k: np.asarray(x) for k, x in v[c]['layer1']['0']['bn1'].items()}

  zeroed = reset.make('zero', resnet50_layers)(trained, bn)
  assert all((x == 0).all() for x in node(zeroed, 'params').values())
  for k, x in node(zeroed, 'batch_stats').items():  # running statistics kept
    np.testing.assert_array_equal(x, node(trained, 'batch_stats')[k])

  halfway = reset.make('interpolate', resnet50_layers, source=fresh, alpha=0.25)(trained, bn)
  for c in ('params', 'batch_stats'):
    for k, x in node(halfway, c).items():
      np.testing.assert_allclose(x, 0.75 * node(fresh, c)[k] + 0.25 * node(trained, c)[k],
                                 rtol=1e-6)

  module = models.create('resnet50')
  block = layers_lib.select(resnet50_layers, ['conv', 'batchnorm'], 'layer2.1', 'block')[0]
  skipped = reset.make('skip', resnet50_layers)(trained, block)
  _, before = module.apply(trained, images, capture_intermediates=True, mutable=['intermediates'])
  _, after = module.apply(skipped, images, capture_intermediates=True, mutable=['intermediates'])
  block_in = before['intermediates']['layer2']['0']['__call__'][0]
  block_out = after['intermediates']['layer2']['1']['__call__'][0]
  np.testing.assert_array_equal(block_out, block_in)  # the block returns its shortcut
  # A block with a projection shortcut loses its branch only: it returns relu(projection).
  projected = layers_lib.select(resnet50_layers, ['conv', 'batchnorm'], 'layer2.0', 'block')[0]
  _, after = module.apply(reset.make('skip', resnet50_layers)(trained, projected), images,
                          capture_intermediates=True, mutable=['intermediates'])
  shortcut = before['intermediates']['layer2']['0']['downsample']['__call__'][0]
  np.testing.assert_array_equal(after['intermediates']['layer2']['0']['__call__'][0],
                                np.maximum(shortcut, 0))
  with pytest.raises(UserError, match='has no residual branch among its selected layers'):
    reset.make('skip', resnet50_layers)(trained, layers_lib.Target('fc', (by_name['fc'],)))
  with pytest.raises(UserError, match='alpha must lie in'):
    reset.make('interpolate', resnet50_layers, source=fresh, alpha=2.0)(trained, bn)


def test_twenty_resets_compile_the_forward_once(trained_and_fresh, resnet50_layers):
  _, _, trained, fresh, images = trained_and_fresh
  module = models.create('resnet50')
  forward = jax.jit(module.apply)
  reset_fn = reset.make('fresh', resnet50_layers, source=fresh)
  targets = layers_lib.select(resnet50_layers, ['conv', 'linear', 'batchnorm'])[:20]
  trained = jax.tree.map(jnp.asarray, trained)
  forward(trained, images).block_until_ready()
  # Counted as XLA compiles: a reset's new leaves are host arrays where the trained ones sit on
  # the device, which jit's dispatch cache keys apart, but the program is the same one.
  with timing.Compiles() as compiles:
    for target in targets:
      forward(reset_fn(trained, target), images).block_until_ready()
  assert compiles.count == 0
