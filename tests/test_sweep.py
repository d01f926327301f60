"""The whole study as one command: a sweep of zoo models, served from a local HTTP server through
the mirror map, killed with SIGKILL in its second model and resumed to the same files; a model
whose download fails is recorded and skipped, and the sweep exits 1."""

import functools
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from converters import mapping
from lc_jax import models
from lc_jax import schema
import run_config
from local_server import LocalServer
from tests import devices

torch = pytest.importorskip('torch')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Three models whose files are plain URLs in the 'state_dict' layout (state_dict, 'module.'),
# and one that the server does not have.
MODELS = ('resnet50_trained_on_SIN', 'resnet50_trained_on_SIN_and_IN',
          'resnet50_trained_on_SIN_and_IN_then_finetuned_on_IN')
MISSING = 'resnet50_moco_v3_100ep'


@pytest.fixture(scope='module')
def served(tmp_path_factory):
  """(environment for the sweep, server root): each model's checkpoint, a random ResNet-50 of
  its own seed, served where the mirror map sends its URL."""
  from lc_jax import zoo  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('server')
  spec = models.get('resnet50')
  module = spec.create()
  mirrors = {}
  shapes = models.variable_shapes(module, 64)
  for seed, model_id in enumerate(MODELS):
    rng = np.random.RandomState(seed)  # weights of fan-in scale; BN statistics near 1
    variables = jax.tree.map(
        lambda leaf, rng=rng: (rng.normal(0, 1 / np.sqrt(np.prod(leaf.shape[:-1])), leaf.shape)
                               if len(leaf.shape) > 1 else rng.uniform(0.5, 1.5, leaf.shape)
                               ).astype(np.float32), shapes)
    state = mapping.to_state_dict(variables)
    (source,) = zoo.get(model_id).sources
    name = f'{model_id}.pth.tar'
    torch.save({'state_dict': {f'module.{k}': torch.tensor(v) for k, v in state.items()},
                'epoch': 60}, root / name)
    mirrors[source.canonical_url] = f'SERVER/{name}'
  (missing,) = zoo.get(MISSING).sources
  mirrors[missing.canonical_url] = 'SERVER/not-there.pth.tar'
  handler = functools.partial(_QuietHandler, directory=str(root))
  server = LocalServer(handler, quiet_errors=True)  # a killed sweep's download breaks off
  mirrors = {k: v.replace('SERVER', server.url) for k, v in mirrors.items()}
  env = dict(os.environ, LC_JAX_ZOO_MIRRORS=json.dumps(mirrors))
  env.pop('LC_JAX_OFFLINE', None)
  yield env
  server.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
  def log_message(self, *args):
    pass


def _sweep(root, env, zoo_dir):
  return [sys.executable, '-m', 'lc_jax.sweep', '--config=configs/paper.py',
          f'--models={",".join(MODELS + (MISSING,))}', f'--workdir={root}',
          '--config.data.source=photos', '--config.data.num_images=0',
          '--config.data.order=sorted', '--config.data.batch_size=4',
          '--config.data.resize_size=72', '--config.data.crop_size=64',
          '--config.reset.layers=first:3', '--config.trials=1',
          f'--config.cache_dir={root.parent / "images"}'], dict(env, LC_JAX_ZOO_DIR=str(zoo_dir))


def _files(root):
  return {name: (root / name / schema.RESULTS).read_bytes() for name in MODELS}


def test_a_killed_sweep_resumes_to_the_same_files(served, tmp_path, monkeypatch, capsys):
  from lc_jax import sweep  # pylint: disable=g-import-not-at-top
  # The uninterrupted sweep, in this process: the command's config and models, its environment.
  args, env = _sweep(tmp_path / 'full' / 'out', served, tmp_path / 'zoo')
  for name in ('LC_JAX_ZOO_MIRRORS', 'LC_JAX_ZOO_DIR'):
    monkeypatch.setenv(name, env[name])
  monkeypatch.delenv('LC_JAX_OFFLINE', raising=False)
  (models_flag,) = [a for a in args if a.startswith('--models=')]
  config, workdir = run_config.of([a for a in args if a != models_flag])
  capsys.readouterr()
  # Which thread converts each model, and when, against the runs of the models.
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  events = []

  def logged(what, function):
    def call(config, *args, **kwargs):
      events.append((what, config.model.id, 'start', threading.current_thread().name))
      try:
        return function(config, *args, **kwargs)
      finally:
        events.append((what, config.model.id, 'end', threading.current_thread().name))
    return call
  monkeypatch.setattr(experiment, 'preconvert', logged('convert', experiment.preconvert))
  monkeypatch.setattr(experiment, 'run', logged('run', experiment.run))
  timings = {}
  sweep.run(config, workdir, sweep.select(models_flag.split('=', 1)[1]), timings)
  full_stderr = capsys.readouterr().err
  monkeypatch.undo()
  out = tmp_path / 'full' / 'out'
  with open(out / 'sweep.json') as f:
    state = json.load(f)
  assert state['done'] == list(MODELS) and list(state['failed']) == [MISSING]
  assert 'not-there' in state['failed'][MISSING] or '404' in state['failed'][MISSING]
  assert (out / 'heatmap.png').exists()  # no scatter: the photos have no labels, so no top-1
  # One process, one architecture: the second and third models compile nothing, not even from
  # the persistent cache (the first may read its programs from there).
  compiled = re.findall(r'compiled (\d+) programs in [\d.]+ s(, \d+ more read)?', full_stderr)
  print(compiled)
  assert len(compiled) == 3 and compiled[1:] == [('0', ''), ('0', '')]
  # The second and third models were converted once, in the background, begun while the one
  # before computed.
  print({m: {k: round(v, 2) for k, v in t.items()} for m, t in timings.items()})
  assert 'converted_ahead' not in timings[MODELS[0]]
  main = threading.current_thread().name
  assert [e for e in events if e[1] == MODELS[0] and e[0] == 'convert'] == [
      ('convert', MODELS[0], 'start', main), ('convert', MODELS[0], 'end', main)]
  for before, model_id in zip(MODELS, MODELS[1:]):
    converted = [e for e in events if e[1] == model_id and e[0] == 'convert']
    assert [e[2:] for e in converted] == [('start', f'converting {model_id}'),
                                          ('end', f'converting {model_id}')]
    # Begun before the model before it ended its run, ended after that run began.
    assert events.index(converted[0]) < events.index(('run', before, 'end', main))
    assert events.index(('run', before, 'start', main)) < events.index(converted[1])
    assert timings[model_id]['converted_ahead'] > 0
  # Each model's closing line counts the conversion the sweep did (or waited for) before its
  # run: the first model's, done in front, is not 0.
  took = [float(c) for c in re.findall(r'took [\d.]+ s: conversion ([\d.]+) s', full_stderr)]
  assert took == [round(timings[m]['conversion'], 1) for m in MODELS]
  assert took[0] > 0
  for t in timings.values():  # a lower bound of the time the device had work (a small program
    # that XLA's CPU client runs inline, during its dispatch, is not seen)
    assert 0 <= t['device_busy'] <= t['compute'] + t['compile']
  for model_id in MODELS:
    rows = (out / model_id / schema.RESULTS).read_text().splitlines()
    assert len(rows) == 1 + 1 + 3 and rows[1].startswith(f'{model_id},photos,original,')
    assert (out / model_id / 'criticality.png').exists()  # as run.py leaves its workdir

  # Killed in its second model, then run again with a fresh zoo cache of its own.
  args, env = _sweep(tmp_path / 'killed' / 'out', served, tmp_path / 'zoo_killed')
  killed = tmp_path / 'killed' / 'out'
  process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  second = killed / MODELS[1] / schema.RESULTS
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None:
    if second.exists() and second.read_text().count('\n') >= 2:  # its original row is written
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  # The third model had not begun (its conversion in the background may have).
  assert not (killed / MODELS[2] / schema.RESULTS).exists()
  resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert resumed.returncode == 1, resumed.stderr[-3000:]  # the missing model
  assert '3 of 4 models done' in resumed.stdout and f'failed: {MISSING}' in resumed.stdout
  assert _files(killed) == _files(out)
  with open(killed / 'sweep.json') as f:
    assert json.load(f) == state

  # Run again with other settings, a finished sweep is refused, not reported done.
  from lc_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  config.trials = 2
  with pytest.raises(UserError, match=r'holds a run of another configuration \(config\.trials: 1 '
                                      r'-> 2\); use a new workdir'):
    sweep.run(config, workdir, list(MODELS))
  assert _files(out) == _files(killed)


def test_models_are_selected_by_all_category_or_ids():
  from lc_jax import sweep  # pylint: disable=g-import-not-at-top
  from lc_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  assert len(sweep.select('all')) == 51
  assert len(sweep.select('category:adversarial_training')) == 15
  assert sweep.select('tv_resnet50, resnet50_dino,tv_resnet50') == ['tv_resnet50', 'resnet50_dino']
  with pytest.raises(UserError, match='unknown category'):
    sweep.select('category:adversarial')
  with pytest.raises(UserError, match='tv_resnet50'):
    sweep.select('tv_resnet5')
  config = sweep.model_config(__import__('lc_jax.config').config.default(), 'tv2_resnet50')
  assert config.model.checkpoint == 'zoo:tv2_resnet50' and config.model.id == 'tv2_resnet50'
  assert config.reset.init_scheme == 'torchvision_resnet'


def test_a_resumed_sweep_runs_exactly_the_models_not_done(tmp_path, monkeypatch):
  """sweep.json of a sweep killed in its second model (all three listed, the first done): the
  sweep runs the second and third only; a model that fails is recorded as failed, not done; a
  done model measured with other settings is refused, not taken as done. The models' own runs
  are stood in for: what is checked is which models the sweep hands to them."""
  from lc_jax import experiment  # pylint: disable=g-import-not-at-top
  from lc_jax import sweep  # pylint: disable=g-import-not-at-top
  from lc_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  args, _ = _sweep(tmp_path / 'out', {}, tmp_path / 'zoo')
  config, workdir = run_config.of([a for a in args if not a.startswith('--models=')])
  config.progress = False
  os.makedirs(workdir)
  with open(os.path.join(workdir, schema.SWEEP), 'w') as f:
    json.dump({'models': list(MODELS), 'done': [MODELS[0]], 'failed': {}}, f)
  ran = []

  def run(config, path, *args):
    del args
    ran.append((config.model.id, os.path.basename(path)))
    if config.model.id == MODELS[2]:
      raise UserError('its download failed')
  monkeypatch.setattr(experiment, 'preconvert', lambda config, path: None)
  monkeypatch.setattr(experiment, 'run', run)
  monkeypatch.setattr(sweep, '_criticality_figure', lambda path: None)
  monkeypatch.setattr(sweep, '_figures', lambda workdir, done: None)
  state = sweep.run(config, workdir, list(MODELS))
  assert ran == [(MODELS[1], MODELS[1]), (MODELS[2], MODELS[2])]
  want = {'models': list(MODELS), 'done': list(MODELS[:2]),
          'failed': {MODELS[2]: 'its download failed'}}
  assert state == want
  with open(os.path.join(workdir, schema.SWEEP)) as f:
    assert json.load(f) == want

  # The first model's folder says it was measured with one trial; this sweep asks for two.
  other = sweep.model_config(config, MODELS[0])
  other.trials = 1
  os.makedirs(os.path.join(workdir, MODELS[0]), exist_ok=True)
  with open(os.path.join(workdir, MODELS[0], schema.RUN), 'w') as f:
    json.dump({'config': experiment.check(other).measured()}, f, default=str)
  config.trials = 2
  ran.clear()
  with pytest.raises(UserError, match=rf'{MODELS[0]} holds a run of another configuration '
                                      r'\(config\.trials: 1 -> 2\)'):
    sweep.run(config, workdir, list(MODELS))
  assert ran == []


def test_a_sweep_over_two_processes_gives_one_process_results(served, tmp_path, monkeypatch):
  """Two processes of two CPU devices each (as two hosts) sweep two models: the first converts
  and writes, both compute; sweep.json and every results.csv as one process's."""
  import socket  # pylint: disable=g-import-not-at-top
  from lc_jax import sweep  # pylint: disable=g-import-not-at-top
  chosen = ','.join(MODELS[:2])
  args, env = _sweep(tmp_path / 'one', served, tmp_path / 'zoo')
  args = [a if not a.startswith('--models=') else f'--models={chosen}' for a in args]
  args = [a if not a.startswith('--config.reset.layers=') else '--config.reset.layers=first:1'
          for a in args]
  for name in ('LC_JAX_ZOO_MIRRORS', 'LC_JAX_ZOO_DIR'):
    monkeypatch.setenv(name, env[name])
  monkeypatch.delenv('LC_JAX_OFFLINE', raising=False)
  config, _ = run_config.of([a for a in args if not a.startswith('--models=')])
  config.progress = False
  sweep.run(config, str(tmp_path / 'one'), list(MODELS[:2]))

  with socket.socket() as probe:
    probe.bind(('localhost', 0))
    port = probe.getsockname()[1]
  two = [a if not a.startswith('--workdir=') else f'--workdir={tmp_path / "two"}' for a in args]
  env = devices.cpu_devices(2, env)
  processes = [subprocess.Popen(
      [*two, '--num_processes=2', f'--coordinator_address=localhost:{port}',
       f'--process_id={index}'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for index in range(2)]
  outputs = [process.communicate(timeout=600) for process in processes]
  assert [process.returncode for process in processes] == [0, 0], [o[1][-2000:] for o in outputs]
  for name in ('sweep.json', *(f'{m}/{schema.RESULTS}' for m in MODELS[:2])):
    one = (tmp_path / 'one' / name).read_text().splitlines()
    got = (tmp_path / 'two' / name).read_text().splitlines()
    if name == 'sweep.json':
      assert json.loads('\n'.join(got)) == json.loads('\n'.join(one))
      continue
    assert len(got) == len(one) == 1 + 1 + 1
    for a, b in zip(one[1:], got[1:]):  # the same rows within float32 rounding of the split
      a, b = a.split(','), b.split(',')
      assert a[:8] == b[:8]
      for x, y in zip(a[8:-1], b[8:-1]):
        assert (x == y == '') or abs(float(x) - float(y)) <= 1e-6 * max(1, abs(float(x)))
