"""python -m lc_jax.crossval: lc-jax against the paper's loop in PyTorch, in one command."""

import csv
import dataclasses
import os
import subprocess
import sys

import flax.linen as nn
import jax
import PIL.Image
import pytest
import skimage.data

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')

from lc_jax import config as lc_config  # pylint: disable=g-import-not-at-top
from lc_jax import crossval
from lc_jax import data
from lc_jax import init
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import schema
from lc_jax import torch_reference
from lc_jax.errors import UserError
from lc_jax.models import registry
from lc_jax.models import resnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = 'conv1,layer2.0.downsample.0,layer3.1.bn1,fc'
TRIALS = 2
WRONG_EPS_LAYER = ('layer3', '0', 'bn2')  # the BatchNorm the test-only variant gets wrong


@pytest.fixture(scope='module')
def resnet_config(tmp_path_factory):
  """A calibrated random ResNet-18 saved as .pth, and a config of 8 labelled photos at 64 px."""
  root = tmp_path_factory.mktemp('crossval')
  names = ['astronaut', 'chelsea', 'coffee', 'rocket']
  for index, name in enumerate(names):
    folder = root / 'val' / f'n{index:08d}'
    folder.mkdir(parents=True)
    image = PIL.Image.fromarray(getattr(skimage.data, name)()).convert('RGB')
    image.save(folder / f'{name}.png')
    image.transpose(PIL.Image.FLIP_LEFT_RIGHT).save(folder / f'{name}_flip.png')
  torch.manual_seed(0)
  calibration = torch.rand(4, 64, 64, 3).numpy()
  model = torch_reference.calibrated(timm.create_model('resnet18', num_classes=len(names)),
                                     calibration)
  torch.save(model.state_dict(), root / 'resnet18.pth')

  config = lc_config.default()
  config.model.checkpoint = str(root / 'resnet18.pth')
  config.data = data.default_config(source='imagefolder', path=str(root / 'val'), num_images=0,
                                    batch_size=4, resize_size=72, crop_size=64, order='sorted')
  config.reset.layer_types = 'conv,linear,batchnorm'
  config.reset.layers = LAYERS
  config.trials = TRIALS
  config.progress = False
  config.cache_dir = str(root / 'cache')
  return config


def _rows(path):
  with open(path, newline='', encoding='utf-8') as f:
    return list(csv.DictReader(f))


def test_resnet18_passes_and_checks_every_column(resnet_config, tmp_path):
  report = crossval.run(resnet_config, str(tmp_path))
  print(f'\n{report.verdict()}')
  assert report.passed, report.verdict()
  assert report.first_module is None and report.first_layer is None

  rows = _rows(tmp_path / 'crossval.csv')
  assert list(rows[0]) == list(crossval.CSV_COLUMNS)
  assert len(rows) == len(report.checks) and all(r['passed'] == 'True' for r in rows)
  parity = {r['name'] for r in rows if r['check'] == 'parity'}
  assert {'logits', 'conv1', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4', 'fc'} <= parity
  assert 'layer3.1.bn1' in parity, 'every layer is compared, not only the stages'
  # The original and every (trial, layer), each of the 11 metric columns (labelled images).
  metric = [(r['name'], r['trial'], r['quantity']) for r in rows if r['check'] == 'metric']
  keys = [(schema.ORIGINAL, '0')] + [(name, str(t)) for t in range(TRIALS)
                                     for name in LAYERS.split(',')]
  assert sorted(metric) == sorted((n, t, c) for n, t in keys for c in schema.METRICS)
  init_names = {r['name'] for r in rows if r['check'] == 'init'}
  assert init_names == {'conv/weight', 'linear/weight', 'linear/bias', 'batchnorm/weight',
                        'batchnorm/bias', 'batchnorm/running_mean', 'batchnorm/running_var'}

  # Measured (relative, tolerance 1e-4): logits 8.0e-7, worst module output 1.7e-6
  # (layer4.0.conv1), worst metric 5.2e-7 (fc trial 1 loss); the resets moved the predictions,
  # so the comparison is not between zeros.
  worst = report.worst(1, 'metric')[0]
  print(f'worst metric difference: {worst.name} trial {worst.trial} {worst.quantity} '
        f'{worst.difference:.3g}; logits '
        f'{next(c for c in report.checks if c.name == "logits").difference:.3g}; '
        f'{len(parity)} module outputs compared')
  moved = [c.lc_jax for c in report.checks
           if c.quantity == 'criticality' and c.name != schema.ORIGINAL]
  assert max(moved) > 0.01
  markdown = (tmp_path / 'crossval.md').read_text()
  assert markdown.startswith('# Cross-framework validation: resnet18\n\n**PASS')
  assert os.path.isfile(tmp_path / 'fresh' / 'trial1.safetensors')
  assert os.path.isfile(tmp_path / 'jax' / 'trial1' / 'results.csv')


class _WrongEpsResNet(resnet.ResNet):
  """timm's ResNet, but one BatchNorm (WRONG_EPS_LAYER) uses TensorFlow's eps 1e-3, not 1e-5."""

  @nn.nowrap
  def apply(self, *args, **kwargs):
    with nn.intercept_methods(_wrong_eps):
      return super().apply(*args, **kwargs)


def _wrong_eps(next_fun, args, kwargs, context):
  module = context.module
  if context.method_name != '__call__' or tuple(module.scope.path) != WRONG_EPS_LAYER:
    return next_fun(*args, **kwargs)
  return module.clone(parent=None, epsilon=1e-3).apply(module.variables, *args, **kwargs)


def test_a_wrong_batchnorm_epsilon_fails_and_is_found(resnet_config, tmp_path, monkeypatch):
  spec = models.get('resnet18')
  monkeypatch.setitem(registry._ARCHITECTURES, 'resnet18',  # pylint: disable=protected-access
                      dataclasses.replace(spec, build=_WrongEpsResNet))
  config = resnet_config.copy_and_resolve_references()
  config.trials = 1
  config.reset.layers = 'layer1.0.conv1,fc'
  report = crossval.run(config, str(tmp_path))
  print(f'\n{report.verdict()}')
  assert not report.passed
  assert (report.first_module, report.first_stage, report.first_layer) == (
      'layer3.0.bn2', 'layer3', 'layer3.0.bn2')
  assert 'the first module that disagrees is layer3.0.bn2 in stage layer3' in report.verdict()
  # Everything before it agrees. Measured (relative): layer3.0.bn2 2.9e-3, 29 times the
  # tolerance; the outputs before it within 1.0e-6.
  before = [c for c in report.checks if c.check == 'parity' and c.name.startswith(
      ('conv1', 'bn1', 'maxpool', 'layer1', 'layer2', 'layer3.0.conv1', 'layer3.0.bn1'))]
  assert before and all(c.passed for c in before)
  print(f'{report.first_module}: {report.worst(1, "parity")[0].difference:.3g}; before it at '
        f'most {max(c.difference for c in before):.3g}')
  assert '**FAIL' in (tmp_path / 'crossval.md').read_text()


def test_the_init_check_tells_a_wrong_scheme():
  spec = models.get('resnet18')
  layers = layers_lib.inventory(spec.create(), spec.block_depth)
  torch.manual_seed(1)
  theirs = {k: v.numpy() for k, v in timm.create_model('resnet18').state_dict().items()}
  right = crossval.init_checks(layers, init.fresh_variables(layers, 'timm_resnet',
                                                            jax.random.key(1)),
                               theirs, crossval.TOLERANCES)
  assert all(c.passed for c in right), [c for c in right if not c.passed]
  # PyTorch's default draws conv weights U(+-1/sqrt(fan_in)), not N(0, 2 / fan_out), and keeps
  # the last BatchNorm of each block at 1 where timm zeroes it.
  wrong = crossval.init_checks(layers, init.fresh_variables(layers, 'pytorch_default',
                                                            jax.random.key(1)),
                               theirs, crossval.TOLERANCES)
  broken = {(c.name, c.quantity) for c in wrong if not c.passed}
  assert {('conv/weight', 'ks_pvalue'), ('conv/weight', 'std'),
          ('batchnorm/weight', 'ks_pvalue')} <= broken


def test_bad_input_is_refused_by_name(resnet_config, tmp_path, monkeypatch):
  zero = resnet_config.copy_and_resolve_references()
  zero.reset.mode = 'zero'
  with pytest.raises(UserError, match='reset.mode=zero'):
    crossval.run(zero, str(tmp_path))
  block = resnet_config.copy_and_resolve_references()
  block.reset.granularity = 'block'
  with pytest.raises(UserError, match='granularity'):
    crossval.run(block, str(tmp_path))

  spec = models.get('resnet18')
  monkeypatch.setitem(registry._ARCHITECTURES, 'resnet18',  # pylint: disable=protected-access
                      dataclasses.replace(spec, timm_name=None))
  named = resnet_config.copy_and_resolve_references()
  named.model.arch = 'resnet18'
  with pytest.raises(UserError, match='resnet18 has no timm counterpart'):
    crossval.run(named, str(tmp_path))
  assert not os.listdir(tmp_path), 'refused before anything was written'

  assert crossval.parse_tolerances('metrics=1e-5, ks_p=0') == {'metrics': 1e-5, 'ks_p': 0.0}
  for text, message in [('metric=1', 'did you mean metrics'), ('std=x', 'needs a number'),
                        ('std=-1', '>= 0')]:
    with pytest.raises(UserError, match=message):
      crossval.parse_tolerances(text)
  with pytest.raises(UserError, match="unknown tolerance 'logit'; did you mean logits"):
    crossval.run(resnet_config, str(tmp_path), {'logit': 1e-3})


class _Scaled(torch.nn.Module):
  """A free-standing parameter (as a ViT's pos_embed or a ConvNeXt block's gamma) before a head."""

  def __init__(self):
    super().__init__()
    self.scale = torch.nn.Parameter(torch.linspace(0.5, 2.0, 3))
    self.fc = torch.nn.Linear(3, 5)

  def forward(self, x):
    return self.fc(x.mean((2, 3)) * self.scale)


def test_the_torch_loop_resets_a_free_standing_parameter():
  torch.manual_seed(0)
  model, fresh = _Scaled(), {k: v.numpy() for k, v in _Scaled().state_dict().items()}
  trained = {k: v.clone() for k, v in model.state_dict().items()}
  images = torch.randint(0, 256, (4, 6, 6, 3), dtype=torch.uint8).numpy()
  rows = torch_reference.run_protocol(model, [fresh], images, None, ['scale', 'fc'], None, None, 2)
  assert [r['layer'] for r in rows] == [schema.ORIGINAL, 'scale', 'fc']
  assert rows[1]['criticality'] > 0, 'the fresh scale moved the predictions'
  zero = torch_reference.run_protocol(model, None, images, None, ['scale'], None, None, 2, 'zero')
  assert zero[1]['pred_kl_div'] > 0  # a zero scale: every image gets the head's bias alone
  assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
  with pytest.raises(AttributeError):
    torch_reference.run_protocol(model, [fresh], images, None, ['shift'], None, None, 2)


def _command(*args):
  return subprocess.run([sys.executable, '-m', 'lc_jax.crossval', *args], cwd=ROOT,
                        capture_output=True, text=True, check=False)


def test_the_demo_passes_as_a_command(tmp_path):
  # The demo's config (bundled Lite0 weights, real photos), on fewer layers, pixels and trials.
  result = _command(f'--out={tmp_path}', '--quiet', '--config.trials=1',
                    '--layers=conv_stem,blocks.1.0.conv_dw,blocks.3.1.bn2,conv_head,classifier',
                    '--config.data.resize_size=128', '--config.data.crop_size=112',
                    f'--config.cache_dir={tmp_path / "cache"}')
  print(result.stdout)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('PASS: efficientnet_lite0')
  rows = _rows(tmp_path / 'crossval.csv')
  assert {r['name'] for r in rows if r['check'] == 'init'} >= {'conv/weight',
                                                                'depthwise_conv/weight'}
  # Measured (relative, tolerance 1e-4): worst module output 1.9e-5 (blocks.2.0.bn1), worst
  # metric 1.1e-6 (blocks.3.1.bn2 pred_l1_err).


def test_a_broken_tolerance_exits_2(resnet_config, tmp_path):
  """A comparison that fails is exit status 2 (bad input is 1): tolerances of 0 that float32
  rounding between the frameworks breaks, on the ResNet-18 of 8 photos and one layer."""
  config = resnet_config
  result = _command(f'--out={tmp_path / "out"}', '--quiet', '--config.trials=1', '--layers=fc',
                    '--tolerance=logits=0,activations=0',
                    f'--config.model.checkpoint={config.model.checkpoint}',
                    '--config.model.arch=resnet18', '--config.data.source=imagefolder', f'--config.data.path={config.data.path}',
                    '--config.data.num_images=0', '--config.data.order=sorted',
                    '--config.data.resize_size=36', '--config.data.crop_size=32',
                    f'--config.cache_dir={config.cache_dir}')
  print(result.stdout)
  assert result.returncode == crossval.DISAGREE == 2, result.stderr[-2000:]
  assert result.stdout.startswith('FAIL: resnet18') and 'Traceback' not in result.stderr
  assert '**FAIL' in (tmp_path / 'out' / 'crossval.md').read_text()


def test_the_command_refuses_a_bad_tolerance_in_one_line(tmp_path):
  result = _command(f'--out={tmp_path}', '--tolerance=metric=1e-5')
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [
      "error: unknown tolerance 'metric'; did you mean metrics? (known: "
      f"{', '.join(crossval.TOLERANCES)})"]
