"""The benchmark scripts run end to end in tiny configurations and print complete tables of
finite numbers: benchmarks/precision.py on a random ResNet-18 (3 layers, 2 trials, 2 photos at
32 px), benchmarks/sweep_speed.py on two random ResNet-50s (2 layers, 4 images at 32 px),
benchmarks/criticality_speed.py on a random ResNet-18 (its 21 layers, 2 JPEGs, both legs).
Nothing is downloaded: the photos are scikit-image's, the models are drawn with timm here."""

import math
import os
import re
import subprocess
import sys

import jax
import pytest

pytest.importorskip('timm')  # the benchmarks draw their models with timm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r'-?(?:\d+\.\d+|nan|inf)'


def _run(script, *args):
  out = subprocess.run([sys.executable, os.path.join('benchmarks', script), *args], cwd=ROOT,
                       capture_output=True, text=True, check=False, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.splitlines()


def _numbers(line, count):
  """The last `count` numbers of a table row, each finite."""
  found = [float(v) for v in re.findall(NUMBER, line)][-count:]
  assert len(found) == count and all(math.isfinite(v) for v in found), line
  return found


def test_precision_benchmark_prints_every_setting(tmp_path):
  lines = _run('precision.py', f'--workdir={tmp_path}', '--config=configs/paper.py',
               '--random_arch=resnet18', '--config.data.source=photos',
               '--config.data.order=sorted', '--config.data.num_images=2',
               '--config.data.batch_size=2', '--config.data.crop_size=32',
               '--config.data.resize_size=37', '--config.reset.layers=first:3',
               '--config.trials=2', f'--config.cache_dir={tmp_path / "cache"}')
  print('\n'.join(lines))
  assert lines[0].startswith('resnet18: fresh resets of 3 layers, 2 trials, 2 images')
  assert lines[1].split() == ['setting', 'mean', 'crit', '%', 'max|d|', 'pp', 'mean|d|', 'pp',
                              'max|d|/sp', 'mean|d|/sp', 'spearman', 'wall', 's', 'compile',
                              's', 'compute', 's']
  rows = {}
  for line, name in zip(lines[2:5], ('float32, matmul highest (reference)',
                                     'tf32 (TensorFloat-32 matmuls)', 'bfloat16')):
    assert line.strip().startswith(name), line
    rows[name] = _numbers(line, 9)
  reference = rows['float32, matmul highest (reference)']
  assert reference[1:5] == [0, 0, 0, 0] and reference[5] == 1
  if jax.default_backend() == 'cpu':  # where tf32 is float32 arithmetic
    assert rows['tf32 (TensorFloat-32 matmuls)'][:6] == reference[:6]
  assert rows['bfloat16'][1] > 0
  assert lines[5].strip().startswith('pp: percentage points')
  assert lines[6].strip().startswith('yardsticks, of the reference:') and len(lines) == 7
  _numbers(lines[6], 3)  # a layer's median spread, the mean's spread, the trials' correlation


def test_sweep_benchmark_splits_each_models_time(tmp_path):
  lines = _run('sweep_speed.py', f'--workdir={tmp_path}', '--num_models=2', '--num_images=4',
               '--batch_size=4', '--image_size=32', '--layers=first:2', '--quiet')
  print('\n'.join(lines))
  assert lines[0].startswith('sweep of 2 resnet50s (random weights, seeds 0-1): 2 layers, '
                             '1 trial(s), 4 images at 32 px, batch 4')
  assert lines[1].split() == ['model', 'wall', 's', 'conversion', 's', 'compile', 's', 'images',
                              's', 'compute', 's', 'rest', 's', 'ahead', 's', 'busy', '%',
                              'GFLOP', 'x', 'min', 'GFLOP/s']
  models = []
  for line, name in zip(lines[2:5], ('1 resnet50_', '2 resnet50_', 'all models')):
    assert line.strip().startswith(name), line
    models.append(_numbers(line, 11))
  for wall, conversion, compiled, images, compute, rest, _, busy, gflop, ratio, rate in models:
    # rest is what the wall time leaves after the phases: a phase counted twice, or timed over
    # another's seconds, makes it negative (each number printed to 0.1 s).
    assert min(conversion, compiled, images, compute) >= 0 and rest >= -0.05
    assert conversion + compiled + images + compute <= wall + 0.2
    assert 0 <= busy <= 100 and gflop > 0 and ratio >= 1 and rate > 0
  # The first model converts in front, the second in the background (test_sweep checks that it
  # does; its seconds, printed to 0.1, may round to 0 on a fast machine).
  assert models[0][6] == 0 and models[1][6] >= 0
  assert [sum(m[k] for m in models[:2]) for k in (0, 6, 8)] == pytest.approx(
      [models[2][0], models[2][6], models[2][8]], abs=0.2)
  # The models' wall times against the sweep's, timed apart around the whole sweep: they fit
  # inside it.
  assert lines[5].strip().startswith('sweep wall time')
  sweep_wall = float(re.search(NUMBER, lines[5]).group())
  assert models[2][0] <= sweep_wall + 0.1
  overhead = _numbers(lines[6], 2)
  assert lines[6].strip().startswith('overhead of model 2 (conversion + compile + images):')
  # Both printed rounded: seconds to 0.01, the first wall time to 0.1, the percentage to 0.01.
  first = models[0][0]
  assert overhead[1] == pytest.approx(100 * overhead[0] / first,
                                      abs=(0.5 + 0.05 * overhead[1]) / first + 0.01)
  assert lines[7].startswith("the paper's study: 51 resnet50s x 3 trials x 54 layers x 10000 "
                             'images at 224 px:')
  assert lines[8].strip().startswith('on H100 SXM, float32 at 67 TFLOP/s:')
  assert lines[9].strip().startswith('on this machine at its measured rate') and len(lines) == 10


def test_speed_benchmark_compares_the_legs_and_splits_ours(tmp_path):
  lines = _run('criticality_speed.py', f'--workdir={tmp_path}', '--arch=resnet18',
               '--num_images=2', '--batch_size=2', '--legs=a,b')
  print('\n'.join(lines))
  legs = {line.split(':')[0].strip(): line for line in lines
          if line.startswith(('a ours:', 'b paper procedure'))}
  assert set(legs) == {'a ours', 'b paper procedure, PyTorch'}
  walls = {}
  for name, line in legs.items():
    head = line.split('(')[0]  # leg b notes its decoding and forward seconds after the figures
    wall, rate, rss, crit = [float(v) for v in re.findall(r'\d+(?:\.\d+)?', head)][-4:]
    assert wall > 0 and rss > 0 and 0 < crit <= 100
    # images * layers / s, from the wall time before it was printed to 0.1 s (and itself to 0.1)
    assert 2 * 21 / (wall + 0.05) - 0.05 <= rate <= 2 * 21 / (wall - 0.05) + 0.05
    walls[name] = wall
  # Leg a's own split: a first run (fresh compilation cache) compiles its programs, and its
  # phases fit in the run's wall time, which fits in the process's.
  split = lines[lines.index(legs['a ours']) + 1].strip()
  compiled = re.fullmatch(
      r'compiled (\d+) programs in (\S+) s \((\S+) s of compile work\); took (\S+) s: '
      r'conversion (\S+) s, images (\S+) s, compile (\S+) s, compute (\S+) s, other (\S+) s; '
      r'start-up and exit (\S+) s', split)
  assert compiled, split
  programs, *seconds = [float(v) for v in compiled.groups()]
  took, phases, start = seconds[2], seconds[3:8], seconds[8]
  assert programs > 0 and seconds[0] > 0 and min(phases) >= 0
  assert sum(phases) == pytest.approx(took, abs=0.3)
  assert start > 0 and took + start == pytest.approx(walls['a ours'], abs=0.15)
  # b/a from the unrounded wall times, to 0.01: within what the printed walls (to 0.1 s) allow
  # (7.2 s / 8.2 s printed 0.89, the walls 7.24 s and 8.15 s)
  ratio = float(re.search(NUMBER, next(line for line in lines
                                       if line.strip().startswith('b/a:'))).group())
  b, a = walls['b paper procedure, PyTorch'], walls['a ours']
  assert (b - 0.05) / (a + 0.05) - 0.005 <= ratio <= (b + 0.05) / (a - 0.05) + 0.005
