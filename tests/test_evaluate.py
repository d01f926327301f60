"""The forward by segments: where a reset starts, bfloat16, and any device count (the chain's
equality with the whole forward, for every architecture, is in test_contract.py)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lc_jax import evaluate
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import sharding
from lc_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(arch, size=64):
  spec = models.get(arch)
  module = spec.create()
  variables = jax.jit(module.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))
  variables = {k: variables[k] for k in ('params', 'batch_stats')}
  images = (np.random.RandomState(0).rand(4, size, size, 3) * 255).astype(np.uint8)
  return module, variables, layers_lib.inventory(module, spec.block_depth), images


def test_resnet50_segments_their_inputs_and_where_a_reset_starts():
  # That segments chain to the whole forward and own every variable once is checked for every
  # architecture in test_contract.py.
  module, variables, layers, _ = _model('resnet50')
  forward = evaluate.Forward(module, layers)
  assert forward.names[:3] == ('stem', 'layer1.0', 'layer1.1') and forward.names[-1] == 'head'
  kept = forward.input_bytes(variables, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8))
  assert kept[0] == 2 * 64 * 64 * 3  # the images, uint8
  assert kept[1] == 2 * 16 * 16 * 64 * 4  # the stem's output, float32
  assert kept[-1] == 2 * 2 * 2 * 2048 * 4  # layer4's output, before the head
  target = layers_lib.select(layers, ['conv'], 'layer2.1.conv2')[0]
  assert forward.names[forward.start(target)] == 'layer2.1'
  block = layers_lib.select(layers, ['conv'], 'layer3', granularity='stage')[0]
  assert forward.names[forward.start(block)] == 'layer3.0'


def test_bfloat16_stays_close_to_float32():
  module, variables, layers, images = _model('resnet18')
  exact = evaluate.Forward(module, layers)
  fast = evaluate.Forward(evaluate.with_precision(module, 'bfloat16'), layers)
  want = np.asarray(exact(variables, exact.put(images)))
  got = np.asarray(fast(variables, fast.put(images)))
  assert got.dtype == np.float32
  error = np.abs(got - want).max() / np.abs(want).max()
  print(f'bfloat16 vs float32 logits: max abs diff {error:.2g} of the largest logit')
  assert 0 < error < 0.05
  with pytest.raises(UserError, match='unknown precision'):
    evaluate.with_precision(module, 'float16')


def test_eight_devices_give_the_single_device_logits(tmp_path):
  # A fresh interpreter: the device count is fixed when jax starts.
  code = f"""
import numpy as np, jax, sys
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
jax.config.update('jax_default_matmul_precision', 'highest')
import test_evaluate
from lc_jax import data, evaluate
module, variables, layers, images = test_evaluate._model('resnet18')
forward = evaluate.Forward(module, layers)
x = forward.put(data.loader.pad(images[:3], forward.rows_multiple))
assert len(x.sharding.device_set) == 8 and x.shape[0] == 8, x.shape  # padded to the devices
np.save('logits.npy', np.asarray(forward(forward.replicate(variables), x))[:3])
"""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          check=False, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  module, variables, layers, images = _model('resnet18')
  forward = evaluate.Forward(module, layers)
  want = np.asarray(forward(variables, forward.put(images[:3])))
  got = np.load(tmp_path / 'logits.npy')
  print(f'8 devices vs 1: logits max abs diff {np.abs(got - want).max():.2g} '
        f'(largest logit {np.abs(want).max():.3g})')
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_resets_groups_must_divide_the_devices():
  with pytest.raises(UserError, match='cannot be split into 3 groups'):
    sharding.make_mesh(3, jax.local_devices() * 2)
  assert sharding.make_mesh(2, jax.local_devices() * 2).shape == {'resets': 2, 'batch': 1}


def test_spread_resets_give_each_resets_own_logits(tmp_path):
  """Resets spread over 4 device groups of 2: each equals its own plain forward. Layer targets
  stack only their own segment; a stage target stacks each of its blocks; the segments after
  them run once per group on one copy of the variables."""
  code = f"""
import numpy as np, jax, sys
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
jax.config.update('jax_default_matmul_precision', 'highest')
import test_evaluate
from lc_jax import evaluate, init, layers as layers_lib, reset, sharding
from lc_jax.data.loader import pad
module, variables, layers, images = test_evaluate._model('resnet18')
plain = evaluate.Forward(module, layers, sharding.make_mesh(1))
spread = evaluate.Forward(module, layers, sharding.make_mesh(4))
variables = spread.replicate(variables)
fresh = spread.replicate(init.fresh_variables(layers, 'timm_resnet', jax.random.key(1)))
make = reset.make('fresh', layers, source=fresh)
targets = (layers_lib.select(layers, ['conv'], 'layer3.0.*')  # its 3 convs, and the stage
           + layers_lib.select(layers, ['conv'], 'layer3', granularity='stage'))
assert len(targets) == 4
start = spread.start(targets[0])
assert all(spread.start(t) == start for t in targets), [spread.start(t) for t in targets]
trees = [make(variables, t) for t in targets]
images = pad(images, plain.rows_multiple)
x = plain.put(images)
h = plain(variables, x, 0, start)
want = [np.asarray(plain(tree, h, start)) for tree in trees]
got = [np.asarray(z) for z in spread.many(trees, spread.put(images) if start == 0 else
                                           spread(variables, spread.put(images), 0, start), start)]
print(sorted(kind for _, kind in spread._spread), flush=True)
for name, w, g in zip([t.name for t in targets], want, got):  # the 4 images, not the padding
  print(name, float(np.abs(g[:4] - w[:4]).max() / np.abs(w[:4]).max()), flush=True)
"""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                          check=False, cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  print('\n'.join(lines))
  # Segment layer3.0 stacked from the walk's input, layer3.1 stacked on the stacked activations
  # (the stage target changes it), layer4.* and the head once per group with one copy.
  assert eval(lines[0]) == ['one input', 'one variables', 'one variables', 'one variables',
                            'stacked']  # pylint: disable=eval-used
  assert len(lines) == 5
  for line in lines[1:]:
    assert float(line.split()[-1]) <= 1e-5, line
