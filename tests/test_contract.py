"""The contract every registered architecture keeps, checked for each of `models.names()`.

A new family is a model file and a converter file; this test covers it without being edited:
its segments chain to the whole forward (equal blocks sharing one compiled program), every
variable belongs to exactly one segment, the inventory's layers cover every variable and count
the parameters of their timm modules, a checkpoint of its torch names converts back to the same
variables (and is recognised as this architecture), those names and shapes are its timm
counterpart's, a checkpoint that timm wrote gives timm's logits, and a fresh reset keeps shapes
and dtypes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import converters
from converters import mapping
from converters import recipes
from lc_jax import evaluate
from lc_jax import init
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import reset
from lc_jax import torch_reference
from lc_jax import timing

SIZE = 64  # small inputs: the contract does not depend on the resolution


def _leaves(tree):
  return {jax.tree_util.keystr(path): leaf for path, leaf in
          jax.tree_util.tree_leaves_with_path(tree)}


def _build(arch: str):
  """(arch, spec, module, random variables, inventory) of a registered architecture at SIZE."""
  spec = models.get(arch)
  # An architecture whose variables fix the input size (a ViT's position embedding) is built
  # for SIZE; a checkpoint keeps that size on its card (module_settings).
  module = spec.create(**({'img_size': SIZE} if 'img_size' in spec.kwargs else {}))
  # Random values of the right shapes, drawn by numpy (compiling `init` costs up to a minute for
  # the deep variants): weights of fan-in scale, BatchNorm statistics away from 0/1, so a
  # mix-up of mean and var would show.
  rng = np.random.RandomState(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "'var'" in name or "'scale'" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
    return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), leaf.dtype)
  variables = jax.tree_util.tree_map_with_path(draw, models.variable_shapes(module, SIZE))
  return arch, spec, module, variables, layers_lib.inventory(module, spec.block_depth)


@pytest.fixture(scope='module', params=models.names())
def built(request):
  return _build(request.param)


def _smallest_of_each_family() -> list[str]:
  """One architecture per family, its smallest: variants of a family differ in depth and width
  only, and compiling every segment of a deep variant costs up to a minute and a half."""
  smallest = {}
  for name in models.names():
    spec = models.get(name)
    size = sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(
        models.variable_shapes(spec.create(), SIZE)))
    if spec.family not in smallest or size < smallest[spec.family][0]:
      smallest[spec.family] = (size, name)
  return sorted(name for _, name in smallest.values())


@pytest.fixture(scope='module', params=_smallest_of_each_family())
def smallest(request):
  return _build(request.param)


def test_segments_chain_to_the_whole_forward(smallest):
  arch, _, module, variables, layers = smallest
  forward = evaluate.Forward(module, layers)
  images = (np.random.RandomState(1).rand(2, SIZE, SIZE, 3) * 255).astype(np.uint8)
  whole = np.asarray(jax.jit(module.apply)(variables, images.astype(np.float32) / 255))
  x = forward.put(images)
  # Programs an earlier test compiled in this process would not be compiled again: count from
  # empty in-memory caches (a program JAX's persistent cache holds counts as read from it).
  jax.clear_caches()
  with timing.Compiles() as compiles:
    chained = np.asarray(forward(variables, x))
  difference = np.abs(chained - whole).max()
  programs = forward.programs(
      forward.inputs(variables, jax.ShapeDtypeStruct(images.shape, images.dtype)))
  print(f'{arch}: {len(forward.names)} segments in {programs} programs; chained vs one '
        f'program: max abs diff {difference:.2g} (largest logit {np.abs(whole).max():.3g})')
  assert difference <= 1e-5 * max(1.0, np.abs(whole).max())
  # Equal blocks (a stage's blocks after its first, all of a ViT's) are one program, its own
  # module on its variables re-rooted: every family has some, and the chain compiles each once.
  assert compiles.count + compiles.from_cache == programs < len(forward.names)
  # From a segment on, given the original's activation there: the chain's logits bit for bit.
  starts = sorted({1, len(forward.names) // 2, len(forward.names) - 1})
  for k in starts:
    h = forward(variables, x, 0, k)
    assert np.array_equal(np.asarray(forward(variables, h, k)), chained), forward.names[k]


def test_every_variable_belongs_to_exactly_one_segment(built):
  _, _, module, variables, layers = built
  forward = evaluate.Forward(module, layers)
  seen = []
  for k in range(len(forward.names)):
    seen += list(_leaves(forward._variables_of(variables, k)))  # pylint: disable=protected-access
  assert sorted(seen) == sorted(_leaves(variables))


def test_the_inventory_covers_every_variable(built):
  _, _, _, variables, layers = built
  covered = [''.join(f"['{part}']" for part in (name.split('/')[0], *layer.path,
                                                 name.split('/')[1]))
             for layer in layers for name in layer.shapes]
  assert sorted(covered) == sorted(_leaves(variables))
  assert [layer.index for layer in layers] == list(range(len(layers)))
  assert {layer.kind for layer in layers} <= set(layers_lib.KINDS)


def test_a_checkpoint_of_its_torch_names_converts_back(built, tmp_path):
  arch, _, _, variables, _ = built
  path = str(tmp_path / f'{arch}.safetensors')
  save_file(mapping.to_state_dict(jax.tree.map(np.asarray, variables)), path)
  # Recognised by its family's recipe; variants that differ only in what no key holds (a ViT's
  # and a DeiT's normalisation) are all named, and the architecture is then passed.
  _, fits = recipes.detect(mapping.to_state_dict(jax.tree.map(np.asarray, variables)))
  assert arch in fits
  found, converted, _ = converters.convert(path, None if len(fits) == 1 else arch)
  assert found == arch
  want, got = _leaves(variables), _leaves(converted)
  assert want.keys() == got.keys()
  for key, value in want.items():
    assert np.array_equal(np.asarray(value), got[key]), key


def _timm(arch: str, device: str = 'cpu'):
  """The timm counterpart of `arch` at SIZE (random weights), or a skip for one without."""
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  spec = models.get(arch)
  if spec.timm_name is None:
    pytest.skip(f'{arch} has no timm counterpart')
  with torch.device(device):
    return timm.create_model(spec.timm_name, pretrained=False,
                             **({'img_size': SIZE} if 'img_size' in spec.kwargs else {}))


def test_its_torch_names_and_shapes_are_timms(built):
  """The checkpoint `mapping.to_state_dict` writes has timm's own keys and shapes (a model on
  torch's meta device: shapes without values), not only keys that convert back."""
  arch, _, _, variables, _ = built
  theirs = {k: tuple(v.shape) for k, v in _timm(arch, 'meta').state_dict().items()
            if not k.endswith('num_batches_tracked')}
  ours = {k: v.shape for k, v in mapping.to_state_dict(jax.tree.map(np.asarray, variables)).items()}
  assert sorted(ours) == sorted(theirs)
  assert ours == theirs


def test_each_layers_parameter_count_is_its_timm_modules(built):
  """A layer's num_params (the results' column) is the count of its timm module's own
  parameters, biases included (a free-standing tensor: that tensor's), and the layers add up to
  the model's."""
  arch, _, _, _, layers = built
  model = _timm(arch, 'meta')
  modules, tensors = dict(model.named_modules()), dict(model.named_parameters())
  for layer in layers:
    own = ([tensors[layer.name]] if layer.name in tensors else
           list(modules[layer.name].parameters(recurse=False)))
    assert layer.num_params == sum(p.numel() for p in own), layer.name
  assert sum(layer.num_params for layer in layers) == sum(p.numel() for p in model.parameters())


def test_a_checkpoint_timm_wrote_gives_timms_logits(smallest, tmp_path):
  """timm's own state_dict, with every tensor redrawn (so no value sits at an initialiser's 0 or
  1 and a swap of mean and var, scale and bias, or a kernel's axes shows), converted and run:
  the logits of timm holding those tensors. A name or layout that is wrong the same way in both
  directions of the mapping passes the round trip above; here it fails."""
  torch = pytest.importorskip('torch')
  arch, _, module, _, _ = smallest
  model = _timm(arch).eval()
  rng = np.random.RandomState(2)
  state = {}
  for key, value in model.state_dict().items():
    if key.endswith('num_batches_tracked'):
      continue
    shape = tuple(value.shape)
    if len(shape) == 1 and key.endswith(('weight', 'running_var')):
      state[key] = rng.uniform(0.5, 1.5, shape)
    elif len(shape) == 1:
      state[key] = rng.normal(0, 0.1, shape)
    else:
      state[key] = rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape)
    state[key] = state[key].astype(np.float32)
  missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                                              strict=False)
  assert not unexpected and all(k.endswith('num_batches_tracked') for k in missing)
  path = str(tmp_path / f'{arch}.safetensors')
  save_file(state, path)
  found, converted, _ = converters.convert(path, arch)
  assert found == arch
  images = (np.random.RandomState(3).rand(2, SIZE, SIZE, 3) * 255).astype(np.uint8)
  ours = np.asarray(jax.jit(module.apply)(converted, images.astype(np.float32) / 255))
  theirs = torch_reference.evaluate(model, images, module.mean, module.std, 2).numpy()
  scale = np.abs(theirs).max()
  difference = np.abs(ours - theirs).max()
  print(f'{arch}: a checkpoint of timm: max abs logit diff {difference:.2g} (largest logit '
        f'{scale:.3g}, spread {theirs.std():.3g})')
  assert theirs.std() > 1e-3 * scale, 'the logits depend on the weights'
  assert difference <= 1e-5 * max(1.0, scale)


def test_a_fresh_reset_keeps_shapes_and_dtypes(built):
  _, spec, _, variables, layers = built
  fresh = init.fresh_variables(layers, spec.init_scheme, jax.random.key(0))
  originals = _leaves(variables)
  for key, value in _leaves(fresh).items():
    assert value.shape == originals[key].shape and value.dtype == originals[key].dtype, key
  reset_fn = reset.make('fresh', layers, source=fresh)
  for target in layers_lib.select(layers, ['conv', 'linear', 'batchnorm'], granularity='block'):
    after = reset_fn(variables, target)
    assert jax.tree.structure(after) == jax.tree.structure(variables), target.name
    for key, value in _leaves(after).items():
      assert value.shape == originals[key].shape and value.dtype == originals[key].dtype, key
