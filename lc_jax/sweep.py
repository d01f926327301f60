r"""The paper's whole study as one command: zoo models, one after the other, into one folder.

    python -m lc_jax.sweep --config=configs/paper.py --models=all --workdir=out/paper \
      --config.data.path=/data/imagenet/val
    python -m lc_jax.sweep ... --models=category:adversarial_training
    python -m lc_jax.sweep ... --config.data.source=tfds --config.data.name=imagenet_r,imagenet_a
    python -m lc_jax.sweep ... --models=tv_resnet50,resnet50_dino
    python -m lc_jax.sweep ... --models=resnet50.a1_in1k,hf:timm/convnext_tiny.fb_in1k

Each model runs as `run.py` would with `--config.model.checkpoint=zoo:ID --config.model.id=ID`
and the zoo's init scheme for its fresh resets (unless the config names one), into
WORKDIR/<id>/; a checkpoint on the Hub, hf:REPO[/FILE][@REVISION], runs with that checkpoint,
its architecture's init scheme, and the id (and folder) of its label (the repository's name:
lc_jax.zoo.hub.HubId.label). All share the decoded-image cache. WORKDIR/sweep.json records the
models done and those that failed (a failing download is recorded with its reason and
skipped; the sweep then exits 1). A killed sweep resumes: finished models are skipped, the
current one resumes where it stopped. At the end, WORKDIR/heatmap.png and WORKDIR/scatter.png
(the paper's Figure 1) are drawn over every finished model. Several image sets by name run one
after the other, each into WORKDIR/<set>/ as a sweep of its own, and WORKDIR/datasets.png draws
each model's criticality on every set side by side. Over several processes, as run.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Sequence

from lc_jax import launch

if __name__ == '__main__':  # python -m lc_jax.sweep: before JAX starts its threads
  launch.one_malloc_arena()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import ml_collections

from lc_jax import checkpoints
from lc_jax import errors
from lc_jax import experiment
from lc_jax import progress
from lc_jax import report
from lc_jax import results
from lc_jax import schema
from lc_jax import sharding
from lc_jax import workdir as workdir_lib
from lc_jax import zoo
from lc_jax.errors import UserError


def select(models: str) -> list[str]:
  """The zoo ids that `--models` names: 'all', 'category:C', or ids separated by commas (a
  paper model's, or an hf: id); two that would share a label (and a folder) are refused."""
  models = models.strip()
  if models == 'all':
    return zoo.ids()
  if models.startswith('category:'):
    category = models[len('category:'):]
    return zoo.ids(category)  # an unknown category fails there, naming the known ones
  ids = [m.strip() for m in models.split(',') if m.strip()]
  if not ids:
    raise UserError('--models is empty: give all, category:C or model ids separated by commas')
  for model_id in ids:
    if model_id.startswith(checkpoints.HF):
      checkpoints.check(model_id, '--models')  # a malformed hf: id fails here
    else:
      zoo.get(model_id)  # an unknown id fails here, naming the closest ones
  ids = list(dict.fromkeys(ids))
  by_label = {}
  for model_id in ids:
    other = by_label.setdefault(label(model_id), model_id)
    if other != model_id:
      raise UserError(f'--models: {other} and {model_id} would both be labelled '
                      f'{label(model_id)} (and write WORKDIR/{label(model_id)}); sweep them '
                      'into separate workdirs')
  return ids


def label(model_id: str) -> str:
  """The model's row label and folder name: a paper model's id, an hf: id's label."""
  return checkpoints.default_id(_checkpoint(model_id))


def _checkpoint(model_id: str) -> str:
  return model_id if model_id.startswith(checkpoints.HF) else checkpoints.ZOO + model_id


def model_config(config: ml_collections.ConfigDict, model_id: str) -> ml_collections.ConfigDict:
  """`config` for one zoo model (or hf: id): its checkpoint, its label, its init scheme (an hf:
  id's: its architecture's, unless the config names one)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.checkpoint = _checkpoint(model_id)
  config.model.id = label(model_id)
  if not config.reset.init_scheme and not model_id.startswith(checkpoints.HF):
    config.reset.init_scheme = zoo.get(model_id).init_scheme
  return config


def run(config: ml_collections.ConfigDict, workdir: str, models: Sequence[str],
        timings: dict[str, dict[str, float]] | None = None) -> dict:
  """Runs (or resumes) every model of `models` into WORKDIR/<label> (a paper model's id, an
  hf: id's label); returns the sweep's state {'models', 'done', 'failed': {label: reason}}.
  The root lock keeps a second sweep out.
  `timings`, when given, gets the phases of each model finished here: {id: the timings of
  experiment.run, with 'conversion' counting the wait for its conversion in the background and
  'converted_ahead' the seconds that conversion took while the model before it computed}.

  While a model computes, the next one is downloaded and converted in a background thread
  (`experiment.preconvert`), so a model's own conversion is mostly a wait that has ended."""
  workdir = os.path.abspath(os.path.expanduser(workdir))
  # Every setting checked before anything is written or downloaded.
  settings = {label(m): experiment.check(model_config(config, m)) for m in models}
  primary = jax.process_index() == 0
  show = config.progress and primary
  lock = workdir_lib.Lock(workdir) if primary else contextlib.nullcontext()
  with lock:
    state = _read_state(workdir)
    sharding.same_everywhere(state, schema.SWEEP)
    for model_id in state['done']:  # kept only when this sweep would measure it the same way
      if model_id in settings:
        results.refuse_other_run(os.path.join(workdir, model_id),
                                 {'config': settings[model_id].measured()})
    state['models'] = [label(m) for m in models]
    state['failed'] = {}  # failures are tried again
    start, finished_here = time.perf_counter(), 0
    ahead = None  # the next model's conversion, under way in the background
    try:
      for k, model_id in enumerate(models):
        name = label(model_id)
        if name in state['done']:
          continue
        progress.say(f'=== model {k + 1}/{len(models)}: {model_id}', show)
        path = os.path.join(workdir, name)
        spent = {}
        try:
          began = time.perf_counter()
          mine = ahead if ahead is not None and ahead.model_id == model_id else None
          ready = mine.result() if mine else None  # None: it failed; done again here
          # Every process passes here together, failing together if the first one's conversion
          # failed (the others would otherwise wait for it inside the model's run).
          with sharding.agreed('converting the checkpoint'):
            converted = ready or experiment.preconvert(model_config(config, model_id), path)
          here = time.perf_counter() - began  # waiting for the background, or converting here
          if ready:
            spent['converted_ahead'] = mine.seconds
          following = next((m for m in models[k + 1:] if label(m) not in state['done']),
                           None)
          ahead = _Ahead(config, workdir, following) if following and primary else None
          experiment.run(model_config(config, model_id), path, spent, converted, here)
        except UserError as e:
          if jax.process_count() > 1 and not e.shared:  # the other processes went on: all stop
            raise
          state['failed'][name] = str(e)
          progress.say(f'{model_id}: skipped: {e}', show)
        else:
          if primary:  # its folder as run.py leaves it
            _criticality_figure(path)
          state['done'].append(name)
          finished_here += 1
          if timings is not None:
            timings[name] = spent
        if primary:
          _write_state(workdir, state)
        if show:
          left = [m for m in models[k + 1:] if label(m) not in state['done']]
          per_model = (time.perf_counter() - start) / max(finished_here, 1)
          progress.say(f'=== {len(state["done"])}/{len(models)} models done, '
                       f'{len(state["failed"])} failed; about '
                       f'{progress.duration(per_model * len(left))} left')
    except (KeyboardInterrupt, SystemExit):
      ahead = None  # stopping does not wait for the conversion in the background (saves atomically)
      raise
    except Exception:  # pylint: disable=broad-except  # reported once the lock can be given up
      if ahead is not None:
        progress.say(f'stopping once the background conversion of {ahead.model_id} is saved',
                     show)
      raise
    finally:  # otherwise the lock is not given up while that conversion writes
      if ahead is not None:
        ahead.result()
    if primary and state['done']:
      _figures(workdir, [label(m) for m in models if label(m) in state['done']])
  return state


def sets(config: ml_collections.ConfigDict) -> list[str]:
  """The image sets that `config.data.name` names: one, or several separated by commas."""
  names = list(dict.fromkeys(n.strip() for n in config.data.name.split(',') if n.strip()))
  if not names:
    raise UserError('data.name is empty: name an image set (a tfds dataset), or several '
                    'separated by commas')
  if len(names) > 1:  # each set's folder is WORKDIR/<set>/
    for name in names:
      if any(part in ('', '.', '..') for part in name.split('/')):
        raise UserError(f'data.name: {name!r} is no image set name (a set runs into '
                        'WORKDIR/<set>/: no empty part, ".", ".." or leading "/")')
    for name in names:
      inside = [other for other in names if other.startswith(name + '/')]
      if inside:
        raise UserError(f'data.name lists {name} and {inside[0]}, whose folder would lie inside '
                        f"{name}'s: sweep them into separate workdirs")
  return names


def run_sets(config: ml_collections.ConfigDict, workdir: str, models: Sequence[str]
             ) -> dict[str, dict]:
  """`run` over every image set that `config.data.name` names (lc_jax.data.shifts): one set
  runs into WORKDIR; several (`imagenet_r,imagenet_sketch`) run one after the other, each into
  WORKDIR/<set>/ as a sweep of its own (its sweep.json, model folders and figures), so a model's
  criticality on each set sits side by side. Every set's settings are checked before the first
  runs. Returns {folder: the state `run` gave}."""
  names = sets(config)
  if len(names) == 1:
    return {workdir: run(config, workdir, models)}
  if config.data.source != 'tfds':
    raise UserError(f'data.name={config.data.name} lists {len(names)} image sets, which only '
                    f'data.source=tfds reads by name (data.source={config.data.source} reads '
                    'one set); add --config.data.source=tfds, or sweep each folder into a '
                    'workdir of its own')
  configs = {}
  for name in names:
    configs[name] = ml_collections.ConfigDict(config.to_dict())
    configs[name].data.name = name
    for model_id in models:
      experiment.check(model_config(configs[name], model_id))
  states = {}
  for k, name in enumerate(names):
    progress.say(f'=== image set {k + 1}/{len(names)}: {name}',
                 config.progress and jax.process_index() == 0)
    folder = os.path.join(workdir, name)
    states[folder] = run(configs[name], folder, models)
  if jax.process_index() == 0:
    _draw_datasets(workdir, states, [label(m) for m in models])
  return states


def _draw_datasets(workdir: str, states: dict[str, dict], labels: Sequence[str]) -> None:
  """WORKDIR/datasets.png: the criticality of each of the models `labels` on every set it
  finished, side by side (report.plot_datasets), as each set's figures take this sweep's models;
  nothing when no model finished on two sets."""
  rows = []
  for folder, state in states.items():
    for model_id in labels:
      if model_id in state['done']:
        rows += report.load(os.path.join(folder, model_id))
  report.plot_datasets(report.summarize(rows), os.path.join(workdir, 'datasets.png'))


class _Ahead:
  """The conversion of the next model (experiment.preconvert: download, hash, convert, save)
  in a background thread while the current model computes. `result()` waits for it and gives
  its experiment.Converted, or None when it failed: the model's own turn then does the work
  again in the foreground and reports what fails. `seconds`: how long it took."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, model_id: str):
    self.model_id, self.seconds, self._converted = model_id, 0.0, None
    self._thread = threading.Thread(
        target=self._convert, args=(model_config(config, model_id),
                                    os.path.join(workdir, label(model_id))),
        name=f'converting {model_id}', daemon=True)  # a killed sweep does not wait for it
    self._thread.start()

  def _convert(self, config: ml_collections.ConfigDict, path: str) -> None:
    start = time.perf_counter()
    try:
      self._converted = experiment.preconvert(config, path)
    except Exception:  # pylint: disable=broad-except  # reported by the model's own turn
      pass
    finally:
      self.seconds = time.perf_counter() - start

  def result(self) -> experiment.Converted | None:
    self._thread.join()
    return self._converted


def _read_state(workdir: str) -> dict:
  path = os.path.join(workdir, schema.SWEEP)
  if not os.path.exists(path):
    return {'models': [], 'done': [], 'failed': {}}
  try:
    with open(path, encoding='utf-8') as f:
      state = json.load(f)
    return {'models': list(state['models']), 'done': list(state['done']),
            'failed': dict(state['failed'])}
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f'cannot read {path} ({e}); delete it: finished models are kept in their '
                    'folders and resume from there') from None


def _write_state(workdir: str, state: dict) -> None:
  workdir_lib.write_atomically(os.path.join(workdir, schema.SWEEP),
                               json.dumps(state, indent=2) + '\n')


def _criticality_figure(path: str) -> None:
  """WORKDIR/<id>/criticality.png, as run.py draws it (none when no layer was reset)."""
  with contextlib.suppress(UserError):
    report.write_workdir_report(path)


def _figures(workdir: str, done: Sequence[str]) -> None:
  rows = []
  for model_id in done:
    rows += report.load(os.path.join(workdir, model_id))
  report.plot_study(report.summarize(rows), workdir)


_FLAGS = None
_MODELS = None


@errors.exits_cleanly
def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = launch.config_of(_FLAGS)
  models = select(_MODELS.value)
  states = run_sets(config, _FLAGS.workdir.value, models)
  for folder, state in states.items():
    if jax.process_index() == 0:
      print(f'{len(state["done"])} of {len(models)} models done in {folder}')
      for model_id, reason in state['failed'].items():
        print(f'  failed: {model_id}: {reason}')
  if any(state['failed'] for state in states.values()):
    sys.exit(1)


def _run() -> None:
  global _FLAGS, _MODELS  # pylint: disable=global-statement
  _FLAGS = launch.define_flags(default_workdir='out/paper')
  _MODELS = flags.DEFINE_string('models', 'all', "Zoo models: 'all', 'category:C', or ids "
                                'separated by commas (python -m lc_jax.zoo list), each a paper '
                                "model's or a Hub checkpoint's, hf:REPO[/FILE][@REVISION].")
  app.run(main, flags_parser=launch.parse_flags)


if __name__ == '__main__':
  _run()
