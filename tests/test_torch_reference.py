"""The PyTorch reference loop: its metrics, exact restores, no piling up of resets, trials, modes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
skimage_data = pytest.importorskip('skimage.data')
skimage_transform = pytest.importorskip('skimage.transform')

from converters import mapping  # pylint: disable=g-import-not-at-top
from lc_jax import init
from lc_jax import layers as layers_lib
from lc_jax import metrics as jax_metrics
from lc_jax import models
from lc_jax import schema
from lc_jax.constants import IMAGENET_MEAN, IMAGENET_STD
from lc_jax import torch_reference as ref
import numpy_metrics

MEAN, STD = IMAGENET_MEAN, IMAGENET_STD
SIZE = 64
BATCH = 8
# Stem, a conv inside a block, a BatchNorm (running statistics), a downsample path and the head.
LAYERS = ['conv1', 'layer1.0.conv1', 'layer2.0.bn1', 'layer3.0.downsample.0', 'fc']


@pytest.fixture(scope='module')
def images():
  """Eight real photos as uint8 NHWC, 64x64 (six photos and two mirrored ones)."""
  photos = [skimage_data.astronaut(), skimage_data.chelsea(), skimage_data.coffee(),
            skimage_data.rocket(), skimage_data.hubble_deep_field(),
            skimage_data.immunohistochemistry()]
  small = [(skimage_transform.resize(p, (SIZE, SIZE), anti_aliasing=True) * 255).round()
           .astype(np.uint8) for p in photos]
  small += [small[0][:, ::-1], small[1][:, ::-1]]
  return np.ascontiguousarray(np.stack(small))


@pytest.fixture(scope='module')
def trained_state(images):
  """A 'trained' resnet18: random weights, BatchNorm calibrated on the normalised images."""
  torch.manual_seed(0)
  model = timm.create_model('resnet18')
  normalised = (images / 255.0 - np.array(MEAN)) / np.array(STD)
  ref.calibrated(model, normalised.astype(np.float32))
  return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def model(trained_state):
  """A new resnet18 module holding the trained weights, so that no test sees another's."""
  net = timm.create_model('resnet18')
  net.load_state_dict(trained_state)
  return net.eval()


@pytest.fixture(scope='module')
def labels(images, trained_state):
  """The original's own top-1 for six images and a wrong class for two: top-1 75%."""
  net = timm.create_model('resnet18')
  net.load_state_dict(trained_state)
  predicted = ref.evaluate(net, images, MEAN, STD, BATCH).argmax(-1).numpy()
  out = predicted.copy()
  out[-2:] = (predicted[-2:] + 1) % 1000
  return out


def _fresh(seed):
  """A freshly initialised resnet18's state_dict as numpy arrays, as `to_state_dict` gives."""
  torch.manual_seed(seed)
  state = timm.create_model('resnet18').state_dict()
  return {k: v.numpy().copy() for k, v in state.items() if not k.endswith('num_batches_tracked')}


@pytest.fixture(scope='module')
def fresh_dicts():
  """Two trials' fresh models."""
  return [_fresh(100), _fresh(101)]


def _rows_by(rows):
  return {(row['layer'], row['trial']): row for row in rows}


def _metric_values(row):
  return {k: v for k, v in row.items() if k not in ('layer', 'trial')}


def _assert_state_equal(model, state):
  now = model.state_dict()
  assert now.keys() == state.keys()
  for key, value in state.items():
    assert torch.equal(now[key], value), key


# -------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize('num_classes', [10, 1000])
def test_metrics_match_numpy_reference(num_classes):
  rng = np.random.default_rng(num_classes)
  ref_logits = (rng.normal(size=(64, num_classes)) * 3).astype(np.float32)
  logits = (ref_logits + rng.normal(size=ref_logits.shape) * 2).astype(np.float32)
  labels = rng.integers(0, num_classes, size=64)
  labels[:20] = ref_logits[:20].argmax(-1)  # some hits, so that accuracies are not all 0
  got = ref.metrics(torch.from_numpy(ref_logits), torch.from_numpy(logits), labels,
                    original_top1=50.0)
  want = numpy_metrics.numpy_reference(ref_logits, logits, labels)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-5, rel=1e-5), key
  assert got['recovered_acc'] == pytest.approx(want['top1_acc'] / 50.0)
  assert 0 < got['pred_agreement'] < 1 and 0 < got['top1_acc'] < 100  # a non-trivial case


def test_metrics_match_the_jax_metrics_column_for_column():
  rng = np.random.default_rng(1)
  ref_logits = (rng.normal(size=(48, 100)) * 4).astype(np.float32)
  logits = (ref_logits + rng.normal(size=ref_logits.shape) * 3).astype(np.float32)
  labels = rng.integers(0, 100, size=48)
  labels[:16] = logits[:16].argmax(-1)
  sums = jax_metrics.per_image(jnp.asarray(ref_logits), jnp.asarray(logits),
                                jnp.asarray(labels, jnp.int32), jnp.ones(48, bool))
  want = jax_metrics.finalize(jax_metrics.accumulate(None, sums), True, original_top1=40.0)
  got = ref.metrics(ref_logits, logits, labels, original_top1=40.0)
  assert set(got) == set(schema.METRICS)
  for key in schema.METRICS:
    assert got[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), key


def test_metrics_by_hand_on_three_classes():
  # Image 0: p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4); image 1: p = q = (0.2, 0.3, 0.5).
  ref_logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]))
  logits = torch.log(torch.tensor([[0.25, 0.5, 0.25], [0.2, 0.3, 0.5]]))
  labels = np.array([1, 0])
  got = ref.metrics(ref_logits, logits, labels, original_top1=80.0)
  # p.q = 1/8 + 1/8 + 1/16 = 5/16, |p|^2 = |q|^2 = 3/8: cos = 5/6 for image 0, 1 for image 1.
  assert got['pred_cos_sim'] == pytest.approx((5 / 6 + 1) / 2, abs=1e-6)
  assert got['criticality'] == pytest.approx(1 / 12, abs=1e-6)
  # p - q = (1/4, -1/4, 0): L1 1/2, L2 sqrt(1/8); image 1 adds 0.
  assert got['pred_l1_err'] == pytest.approx(0.25, abs=1e-6)
  assert got['pred_l2_err'] == pytest.approx(math.sqrt(1 / 8) / 2, abs=1e-6)
  # KL = 1/2 ln 2 + 1/4 ln(1/2) + 1/4 ln 1 = ln(2) / 4 for image 0.
  assert got['pred_kl_div'] == pytest.approx(math.log(2) / 8, abs=1e-6)
  assert got['pred_agreement'] == 0.5  # argmax 0 -> 1 on image 0, 2 -> 2 on image 1
  # Image 0: label 1 is q's top-1; image 1: label 0 is third of three, in the top 5.
  assert got['top1_acc'] == 50.0 and got['top5_acc'] == 100.0
  assert got['loss'] == pytest.approx((-math.log(0.5) - math.log(0.2)) / 2, abs=1e-6)
  assert got['recovered_acc'] == pytest.approx(50 / 80)
  # Per-image cos (5/6, 1): sample std (1/6) / sqrt(2), half-width 1.96 * std / sqrt(2).
  assert got['criticality_ci_images'] == pytest.approx(1.96 / 12, abs=1e-6)

  unlabelled = ref.metrics(ref_logits, logits)
  for key in ('top1_acc', 'top5_acc', 'loss', 'recovered_acc'):
    assert math.isnan(unlabelled[key]), key
  assert unlabelled['pred_kl_div'] == got['pred_kl_div']


def test_kl_is_finite_where_q_underflows():
  # q = softmax(0, -200) has exp(-200) = 0 in float32: log(softmax) would give an infinite KL,
  # log_softmax gives the exact 1/2 (ln 1/2 - 0) + 1/2 (ln 1/2 + 200) = 100 - ln 2.
  got = ref.metrics(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, -200.0]]))
  assert got['pred_kl_div'] == pytest.approx(100 - math.log(2), rel=1e-6)


# ------------------------------------------------------------------------------------- evaluate


def test_evaluate_normalises_batches_and_keeps_the_mode(model, images):
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
  x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
  with torch.no_grad():
    want = model.eval()(x)
  model.train()
  got = ref.evaluate(model, images, MEAN, STD, batch_size=3)  # batches of 3, 3 and 2
  assert model.training, 'evaluate puts the previous mode back'
  assert got.dtype == torch.float32 and got.shape == (BATCH, 1000) and not got.requires_grad
  torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
  with pytest.raises(ValueError, match='uint8'):
    ref.evaluate(model, images.astype(np.float32), MEAN, STD, 4)


# --------------------------------------------------------------------------------- run_protocol


def test_backup_is_a_real_copy(model):
  backup = ref._clone_state(model)  # pylint: disable=protected-access
  before = model.conv1.weight.detach().clone()
  with torch.no_grad():
    model.conv1.weight.zero_()
    model.bn1.running_mean.fill_(7.0)
  assert torch.equal(backup['conv1.weight'], before)
  assert not torch.equal(backup['bn1.running_mean'], model.bn1.running_mean)


@pytest.mark.parametrize('mode', ['fresh', 'zero'])
def test_trained_weights_are_bit_identical_after_the_run(model, trained_state, images, labels,
                                                         fresh_dicts, mode):
  original_logits = ref.evaluate(model, images, MEAN, STD, BATCH)
  rows = ref.run_protocol(model, fresh_dicts, images, labels, LAYERS, MEAN, STD, BATCH, mode)
  _assert_state_equal(model, trained_state)
  assert torch.equal(ref.evaluate(model, images, MEAN, STD, BATCH), original_logits)

  assert len(rows) == 1 + len(fresh_dicts) * len(LAYERS)
  first = rows[0]
  assert (first['layer'], first['trial']) == ('original', 0)
  assert first['top1_acc'] == 75.0 and first['recovered_acc'] == 1.0
  assert first['pred_cos_sim'] == pytest.approx(1.0) and first['pred_agreement'] == 1.0
  assert [(r['layer'], r['trial']) for r in rows[1:]] == [
      (name, t) for t in range(len(fresh_dicts)) for name in LAYERS]
  for row in rows[1:]:
    assert set(row) == {'layer', 'trial', *schema.METRICS}
    assert row['recovered_acc'] == pytest.approx(row['top1_acc'] / 75.0)
    assert row['criticality'] > 1e-4, f'resetting {row["layer"]} moved nothing'


def test_model_is_restored_when_the_loop_fails(model, trained_state, images, fresh_dicts):
  broken = dict(fresh_dicts[1])
  del broken['fc.bias']
  # Trial 0 resets 'conv1' and 'fc'; trial 1 fails at 'fc' with 'conv1' of trial 1 in place.
  with pytest.raises(KeyError, match='fc.bias'):
    ref.run_protocol(model, [fresh_dicts[0], broken], images, None, ['conv1', 'fc'], MEAN, STD,
                     BATCH)
  _assert_state_equal(model, trained_state)


def test_resets_do_not_pile_up_across_layers(model, trained_state, images, labels, fresh_dicts):
  first, second = 'layer1.0.conv1', 'layer3.0.downsample.0'
  together = _rows_by(ref.run_protocol(model, fresh_dicts[:1], images, labels,
                                       [first, second, first], MEAN, STD, BATCH))
  alone_model = timm.create_model('resnet18')
  alone_model.load_state_dict(trained_state)
  alone = _rows_by(ref.run_protocol(alone_model, fresh_dicts[:1], images, labels, [second],
                                    MEAN, STD, BATCH))
  assert _metric_values(together[(second, 0)]) == _metric_values(alone[(second, 0)])

  # The same layer twice in one run: the same numbers (the rows keyed by layer keep the last).
  rows = ref.run_protocol(model, fresh_dicts[:1], images, labels, [first, second, first], MEAN,
                          STD, BATCH)
  assert _metric_values(rows[1]) == _metric_values(rows[3])

  # The check above can fail: with the first reset left in place, the second's numbers move.
  piled = timm.create_model('resnet18')
  piled.load_state_dict(trained_state)
  ref._load_fresh(piled, first, fresh_dicts[0])  # pylint: disable=protected-access
  ref._load_fresh(piled, second, fresh_dicts[0])  # pylint: disable=protected-access
  reference_logits = ref.evaluate(model, images, MEAN, STD, BATCH)
  piled_metrics = ref.metrics(reference_logits, ref.evaluate(piled, images, MEAN, STD, BATCH),
                              labels)
  assert abs(piled_metrics['pred_cos_sim'] - alone[(second, 0)]['pred_cos_sim']) > 1e-4


def test_trials_use_their_own_fresh_weights(model, images, labels, fresh_dicts):
  for name in ('conv1', 'fc'):
    assert not np.array_equal(fresh_dicts[0][f'{name}.weight'], fresh_dicts[1][f'{name}.weight'])
  rows = _rows_by(ref.run_protocol(model, fresh_dicts, images, labels, ['conv1', 'fc'], MEAN,
                                   STD, BATCH))
  for name in ('conv1', 'fc'):
    zero, one = rows[(name, 0)], rows[(name, 1)]
    assert zero['pred_cos_sim'] != one['pred_cos_sim'], name
    assert zero['pred_kl_div'] != one['pred_kl_div'], name
  # The same fresh model in both trials: the same numbers.
  same = _rows_by(ref.run_protocol(model, [fresh_dicts[0]] * 2, images, labels, ['conv1'], MEAN,
                                   STD, BATCH))
  assert _metric_values(same[('conv1', 0)]) == _metric_values(same[('conv1', 1)])


def _record(module):
  """Copies of `module`'s tensors at every forward through it."""
  seen = []

  def hook(mod, inputs):
    del inputs
    seen.append({k: v.detach().clone() for k, v in mod.state_dict().items()})

  return seen, module.register_forward_pre_hook(hook)


def test_zero_mode_keeps_running_statistics(model, trained_state, images):
  name = 'layer2.0.bn1'
  seen, handle = _record(model.get_submodule(name))
  try:
    ref.run_protocol(model, None, images, None, [name], MEAN, STD, BATCH, mode='zero')
  finally:
    handle.remove()
  assert len(seen) == 2  # the original forward, then the one with the layer zeroed
  during = seen[1]
  assert torch.count_nonzero(during['weight']) == 0 and torch.count_nonzero(during['bias']) == 0
  for buffer in ('running_mean', 'running_var', 'num_batches_tracked'):
    assert torch.equal(during[buffer], trained_state[f'{name}.{buffer}']), buffer
  assert not torch.equal(trained_state[f'{name}.running_var'], torch.ones(128)), 'calibrated'


def test_fresh_mode_takes_parameters_and_running_statistics(model, images, fresh_dicts):
  name = 'layer2.0.bn1'
  seen, handle = _record(model.get_submodule(name))
  try:
    ref.run_protocol(model, fresh_dicts, images, None, [name], MEAN, STD, BATCH)
  finally:
    handle.remove()
  assert len(seen) == 1 + len(fresh_dicts)
  for trial, fresh in enumerate(fresh_dicts):
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      np.testing.assert_array_equal(seen[1 + trial][leaf].numpy(), fresh[f'{name}.{leaf}'],
                                    err_msg=f'trial {trial} {leaf}')


def test_zero_mode_without_labels_and_bad_input(model, images, fresh_dicts):
  rows = ref.run_protocol(model, None, images, None, ['fc'], MEAN, STD, BATCH, mode='zero')
  assert len(rows) == 2 and math.isnan(rows[1]['top1_acc'])
  # A zeroed head gives uniform predictions: q = 1/C, so KL(p || q) = ln C - H(p).
  assert rows[1]['pred_agreement'] < 1 and rows[1]['pred_kl_div'] > 0
  with pytest.raises(ValueError, match='mode'):
    ref.run_protocol(model, fresh_dicts, images, None, ['fc'], MEAN, STD, BATCH, mode='skip')
  with pytest.raises(ValueError, match='fresh'):
    ref.run_protocol(model, None, images, None, ['fc'], MEAN, STD, BATCH)
  with pytest.raises(AttributeError):
    ref.run_protocol(model, fresh_dicts, images, None, ['layer9.conv1'], MEAN, STD, BATCH)
  wrong = dict(fresh_dicts[0], **{'fc.weight': np.zeros((10, 512), np.float32)})
  with pytest.raises(KeyError, match='wrong shapes'):
    ref.run_protocol(model, [wrong], images, None, ['fc'], MEAN, STD, BATCH)


def test_fresh_state_dicts_converted_from_the_jax_initialisation_fit(model, images):
  spec = models.get('resnet18')
  inventory = layers_lib.inventory(spec.create(), spec.block_depth)
  # One layer of each kind and place (drawing all 41 costs JAX seconds per layer on CPU; a
  # layer's draw depends on its own index only, so a subset draws what the full tree would).
  some = ['conv1', 'bn1', 'layer1.0.conv1', 'layer1.0.bn2', 'layer2.0.downsample.0',
          'layer2.0.downsample.1', 'fc']
  chosen = [layer for layer in inventory if layer.name in some]
  assert [layer.name for layer in chosen] == some
  fresh = mapping.to_state_dict(init.fresh_variables(chosen, spec.init_scheme,
                                                     jax.random.key(0)))
  # Keys and shapes fit: loaded into a torch model, they become its tensors exactly.
  net = timm.create_model('resnet18')
  for name in some:
    ref._load_fresh(net, name, fresh)  # pylint: disable=protected-access
  for key, value in fresh.items():
    np.testing.assert_array_equal(net.state_dict()[key].numpy(), value, err_msg=key)
  assert not np.any(fresh['layer1.0.bn2.weight']), 'timm zero-initialises the last BN'
  rows = ref.run_protocol(model, [fresh], images, None, ['conv1', 'layer1.0.bn2', 'fc'], MEAN,
                          STD, BATCH)
  assert [row['layer'] for row in rows] == ['original', 'conv1', 'layer1.0.bn2', 'fc']
