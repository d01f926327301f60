"""The forward by segments: where a reset starts, bfloat16, and any device count (the chain's
equality with the whole forward, for every architecture, is in test_contract.py)."""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lc_jax import evaluate
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import sharding
from lc_jax import timing
from lc_jax.errors import UserError
from tests import devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(arch, size=32):
  """(module, variables, layers, 4 uint8 images of `size` px). The variables are drawn with
  numpy as Flax's init draws them (kernels of variance 1/fan-in, BatchNorm the identity, biases
  0), from the traced shapes: jitting module.init compiled a program as large as the model."""
  spec = models.get(arch)
  module = spec.create()
  rng = np.random.RandomState(0)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
    return (np.ones if name in ('scale', 'var') else np.zeros)(leaf.shape, np.float32)
  variables = jax.tree_util.tree_map_with_path(draw, models.variable_shapes(module, size))
  images = (np.random.RandomState(0).rand(4, size, size, 3) * 255).astype(np.uint8)
  return module, variables, layers_lib.inventory(module, spec.block_depth), images


def test_resnet50_segments_their_inputs_and_where_a_reset_starts():
  # That segments chain to the whole forward and own every variable once is checked for every
  # architecture in test_contract.py.
  spec = models.get('resnet50')
  module = spec.create()
  layers = layers_lib.inventory(module, spec.block_depth)
  variables = models.variable_shapes(module, 64)  # inputs only traces: shapes suffice
  forward = evaluate.Forward(module, layers)
  assert forward.names[:3] == ('stem', 'layer1.0', 'layer1.1') and forward.names[-1] == 'head'
  inputs = forward.inputs(variables, jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.uint8))
  kept = [x.size * x.dtype.itemsize for x in inputs]
  assert kept[0] == 2 * 64 * 64 * 3  # the images, uint8
  assert kept[1] == 2 * 16 * 16 * 64 * 4  # the stem's output, float32
  assert kept[-1] == 2 * 2 * 2 * 2048 * 4  # layer4's output, before the head
  # 18 segments, 10 programs: each stage's first block, one for the rest of it, stem and head.
  assert len(forward.names) == 18 and forward.programs(inputs) == 10
  target = layers_lib.select(layers, ['conv'], 'layer2.1.conv2')[0]
  assert forward.names[forward.start(target)] == 'layer2.1'
  block = layers_lib.select(layers, ['conv'], 'layer3', granularity='stage')[0]
  assert forward.names[forward.start(block)] == 'layer3.0'


def _equations(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs inside it (jit, custom_jvp), in order."""
  for equation in jaxpr.eqns:
    yield equation
    for param in equation.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          yield from _equations(inner)


def test_same_leaves_means_every_leaf_shared():
  # Forward.many runs a segment once for every reset only when their trees hold the very same
  # leaf objects; a leaf equal in value but a reset's own is not shared.
  kernel, bias = np.zeros(2), np.zeros(2)
  tree = {'bias': bias, 'kernel': kernel}
  assert evaluate._same_leaves([tree, {'bias': bias, 'kernel': kernel}])
  assert not evaluate._same_leaves([tree, {'bias': bias, 'kernel': np.zeros(2)}])
  assert not evaluate._same_leaves([tree, tree, {'bias': bias, 'kernel': np.zeros(2)}])
  assert not evaluate._same_leaves([tree, {'bias': bias}])


def test_bfloat16_runs_every_conv_and_dense_in_bfloat16():
  module, variables, layers, images = _model('resnet18')
  exact = evaluate.Forward(module, layers)
  fast = evaluate.Forward(evaluate.with_precision(module, 'bfloat16'), layers)
  # Every convolution and matmul of the forward takes bfloat16 operands: ResNet-18's 20 convs
  # and its fc.
  jaxpr = jax.make_jaxpr(fast.module.apply)(variables, images.astype(np.float32) / 255).jaxpr
  ops = [(e.primitive.name, {str(v.aval.dtype) for v in e.invars})
         for e in _equations(jaxpr) if e.primitive.name in ('conv_general_dilated', 'dot_general')]
  assert len(ops) == 21 and all(dtypes == {'bfloat16'} for _, dtypes in ops), ops
  # ... and the activations between blocks (the residual sums) are bfloat16.
  inputs = fast.inputs(variables, jax.ShapeDtypeStruct(images.shape, jnp.uint8))
  assert [str(x.dtype) for x in inputs] == ['uint8'] + ['bfloat16'] * (len(inputs) - 1)
  want = np.asarray(exact(variables, exact.put(images)))
  got = np.asarray(fast(variables, fast.put(images)))
  assert got.dtype == np.float32
  error = np.abs(got - want).max() / np.abs(want).max()
  print(f'bfloat16 vs float32 logits: max abs diff {error:.2g} of the largest logit')
  # Measured on these images: 0.0080 with everything in bfloat16. With one op alone in
  # bfloat16 it is at most 0.0031 (the input's cast 0.0011, the stem conv 0.0021, the worst
  # single conv 0.0031, the worst single BatchNorm 0.0015): a switch that converts one op stays
  # below 0.005. (Every conv but no BatchNorm, 0.0058, leaves float32 between the blocks.)
  assert 0.005 < error < 0.02
  with pytest.raises(UserError, match='unknown precision'):
    evaluate.with_precision(module, 'float16')


# Both eight-device checks run in one fresh interpreter (the device count is fixed when jax
# starts): one start, one set of imports, and the plain 8-device segment programs compiled once.
# Each check runs on its own and reports its own result or traceback, so that one failing does
# not hide the other.
_EIGHT_DEVICES = f"""
import sys, traceback
import numpy as np, jax
sys.path.insert(0, {ROOT!r})
sys.path.insert(0, {os.path.join(ROOT, 'tests')!r})
jax.config.update('jax_default_matmul_precision', 'highest')
import test_evaluate


def sharded():
  from lc_jax import batches, evaluate
  module, variables, layers, images = test_evaluate._model('resnet18')
  forward = evaluate.Forward(module, layers)
  x = forward.put(batches.pad(images[:3], forward.rows_multiple))
  assert len(x.sharding.device_set) == 8 and x.shape[0] == 8, x.shape  # padded to the devices
  np.save('logits.npy', np.asarray(forward(forward.replicate(variables), x))[:3])


def spread():
  from lc_jax import evaluate, init, layers as layers_lib, reset, sharding
  from lc_jax.batches import pad
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
                                             spread(variables, spread.put(images), 0, start),
                                             start)]
  lines = [repr(sorted(kind for _, kind in spread._spread))]
  for name, w, g in zip([t.name for t in targets], want, got):  # the 4 images, not the padding
    lines.append(f'{{name}} {{float(np.abs(g[:4] - w[:4]).max() / np.abs(w[:4]).max())}}')
  with open('spread.txt', 'w') as f:
    f.write('\\n'.join(lines))


failed = False
for check in (sharded, spread):
  try:
    check()
  except BaseException:  # pylint: disable=broad-except
    failed = True
    with open(check.__name__ + '.error', 'w') as f:
      f.write(traceback.format_exc())
sys.exit(1 if failed else 0)
"""


@pytest.fixture(scope='module')
def eight_devices(tmp_path_factory):
  """The folder the eight-device interpreter wrote its results (or tracebacks) to."""
  folder = tmp_path_factory.mktemp('eight_devices')
  env = dict(devices.cpu_devices(8), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _EIGHT_DEVICES], env=env, capture_output=True,
                          text=True, check=False, cwd=folder)
  (folder / 'stderr.txt').write_text(result.stderr)
  return folder


def _check_ran(folder, name):
  error = folder / f'{name}.error'
  assert not error.exists(), error.read_text()
  assert (folder / {'sharded': 'logits.npy', 'spread': 'spread.txt'}[name]).exists(), (
      folder / 'stderr.txt').read_text()


def test_eight_devices_give_the_single_device_logits(eight_devices):
  # A fresh interpreter (the eight_devices fixture): the device count is fixed when jax starts.
  _check_ran(eight_devices, 'sharded')
  module, variables, layers, images = _model('resnet18')
  forward = evaluate.Forward(module, layers)
  # The first 3 of the 4 images (the batch test_bfloat16 compiles for too; rows are independent).
  want = np.asarray(forward(variables, forward.put(images)))[:3]
  got = np.load(eight_devices / 'logits.npy')
  print(f'8 devices vs 1: logits max abs diff {np.abs(got - want).max():.2g} '
        f'(largest logit {np.abs(want).max():.3g})')
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_resets_groups_must_divide_the_devices():
  with pytest.raises(UserError, match='cannot be split into 3 groups'):
    sharding.make_mesh(3, jax.local_devices() * 2)
  assert sharding.make_mesh(2, jax.local_devices() * 2).shape == {'resets': 2, 'batch': 1}


def test_spread_resets_give_each_resets_own_logits(eight_devices):
  """Resets spread over 4 device groups of 2: each equals its own plain forward. Layer targets
  stack only their own segment; a stage target stacks each of its blocks; the segments after
  them run once per group on one copy of the variables."""
  _check_ran(eight_devices, 'spread')
  lines = (eight_devices / 'spread.txt').read_text().strip().splitlines()
  print('\n'.join(lines))
  # Segment layer3.0 stacked from the walk's input, layer3.1 stacked on the stacked activations
  # (the stage target changes it), layer4.* and the head once per group with one copy.
  assert eval(lines[0]) == ['one input', 'one variables', 'one variables', 'one variables',
                            'stacked']  # pylint: disable=eval-used
  assert len(lines) == 5
  for line in lines[1:]:
    assert float(line.split()[-1]) <= 1e-5, line


class _Result:
  """A result that is ready when the test says so; waiting for it moves the clock to `ready_at`."""

  def __init__(self, clock, ready_at):
    self.clock, self.ready_at = clock, ready_at

  def is_ready(self):
    return self.clock.now >= self.ready_at

  def block_until_ready(self):
    self.clock.now = max(self.clock.now, self.ready_at)
    return self


def test_busy_counts_the_time_dispatched_work_was_unfinished(monkeypatch):
  """timing.Busy, the progress line's device busy share: from a dispatch until the host sees
  its result ready counts, idle time does not. On a clock the test sets and results it makes
  ready, the seconds are exact."""
  clock = type('Clock', (), {'now': 100.0})()
  monkeypatch.setattr(timing, 'time', type('Time', (), {'perf_counter': lambda: clock.now}))
  busy = timing.Busy()
  clock.now = 103.0
  busy.poll()
  assert busy.seconds == 0  # idle: nothing dispatched
  first = _Result(clock, ready_at=108.0)
  busy.dispatched(first)  # at 103
  clock.now = 105.0
  busy.poll()
  assert busy.seconds == 2  # unfinished at the look: 103 to 105
  clock.now = 110.0
  busy.poll()  # ready by now: 105 to 110 is not known to have been busy, and is not counted
  assert busy.seconds == 2
  clock.now = 112.0
  busy.poll()
  assert busy.seconds == 2  # idle again
  # Two results: busy from the older one's dispatch until the last is seen ready.
  second, third = _Result(clock, ready_at=115.0), _Result(clock, ready_at=118.0)
  busy.dispatched(second)  # at 112
  clock.now = 113.0
  busy.dispatched(third)
  clock.now = 116.0
  busy.poll()  # second ready, third not: 112 to 116
  assert busy.seconds == 6
  # Waiting counts up to the moment the result is ready, with no look in between.
  busy.wait(third)
  assert clock.now == 118.0 and busy.seconds == 8
  busy.wait(third)  # ready: nothing more
  assert busy.seconds == 8
  # A segment's output: only the newest is held; the one before it, unfinished, still counts.
  segments = [_Result(clock, ready_at=125.0), _Result(clock, ready_at=126.0)]
  clock.now = 120.0
  busy.segment(segments[0])
  clock.now = 121.0
  busy.segment(segments[1])  # the look at 121 sees the first unfinished: 120 to 121
  clock.now = 124.0
  busy.poll()  # 121 to 124
  assert busy.seconds == 12
  clock.now = 130.0
  busy.poll()
  assert busy.seconds == 12 and busy.fraction == 12 / 30
  monkeypatch.undo()

  # Real device work: counted, and never more than the wall time it took.
  x = jnp.full((256, 256), 1 / 256, jnp.float32)

  @jax.jit
  def work(x):
    return jax.lax.fori_loop(0, 100, lambda _, a: jnp.tanh(a @ x), x)
  work(x).block_until_ready()  # compiled
  busy = timing.Busy()
  start = time.perf_counter()
  y = work(x)
  busy.dispatched(y)
  busy.wait(y)
  waited = time.perf_counter() - start
  print(f'busy {busy.seconds:.4f} s of {waited:.4f} s of work')
  assert 0 <= busy.seconds <= waited and busy.fraction <= 1


def test_compiles_counts_this_threads_programs_and_a_new_cache_folder_takes_effect(tmp_path):
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  first, second = tmp_path / 'first', tmp_path / 'second'
  experiment.use_compilation_cache(str(first))
  with timing.Compiles() as compiles:
    jax.jit(lambda x: x * 2 + 1)(np.arange(3.0, dtype=np.float32)).block_until_ready()
    # A program made on another thread (a sweep converting the next model) is not this run's.
    other = threading.Thread(
        target=lambda: jax.jit(lambda x: x * 7 - 1)(np.arange(5.0, dtype=np.float32)).block_until_ready())
    other.start()
    other.join()
  assert (compiles.count, compiles.from_cache) == (1, 0)
  assert compiles.making >= compiles.seconds > 0
  written = set(os.listdir(first))
  assert written
  # JAX opens its persistent cache once per process: a second folder must take over all the same.
  experiment.use_compilation_cache(str(second))
  jax.jit(lambda x: x * 3 + 1)(np.arange(3.0, dtype=np.float32)).block_until_ready()
  assert os.listdir(second) and set(os.listdir(first)) == written
  experiment.use_compilation_cache('none')
  jax.jit(lambda x: x * 5 + 1)(np.arange(3.0, dtype=np.float32)).block_until_ready()
  assert len(os.listdir(second)) == 1 and set(os.listdir(first)) == written
  experiment.use_compilation_cache(str(first))
  with timing.Compiles() as compiles:  # the first program again, from the first folder
    jax.jit(lambda x: x * 2 + 1)(np.arange(3.0, dtype=np.float32)).block_until_ready()
  assert (compiles.count, compiles.from_cache) == (0, 1)
  experiment.use_compilation_cache('')  # back to the session's folder


@pytest.mark.parametrize('here, there, raised, shared', [
    (None, 0, None, None),
    (None, 1, UserError, True),  # the other process's UserError: all of them skip it together
    (None, 2, RuntimeError, None),  # its crash: none goes on
    (UserError, 0, UserError, True),
    (UserError, 2, UserError, False),  # a crash elsewhere: not to be skipped
    (KeyError, 1, KeyError, None)])
def test_agreed_fails_every_process_and_shares_only_user_errors(monkeypatch, here, there,
                                                                raised, shared):
  # Process 0 of two; process 1's outcome is `there` (0 done, 1 UserError, 2 another error).
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  monkeypatch.setattr(sharding.multihost_utils, 'process_allgather',
                      lambda kind: np.array([kind, there], np.int32))

  def work():
    with sharding.agreed('reading'):
      if here is not None:
        raise here('bad input here')
    return 'result'
  if raised is None:
    assert work() == 'result'
    return
  with pytest.raises(raised) as error:
    work()
  if here is None:
    assert str(error.value) == 'process 1 failed while reading; its output says why'
  else:
    assert 'bad input here' in str(error.value)
  if shared is not None:
    assert error.value.shared is shared
