"""run.py's face of the criticality engine: a config and a workdir in, durable rows out.

    rows = lc_jax.experiment.run(config, workdir)

Steps: check every setting; lock the workdir; convert the checkpoint into WORKDIR/model or reuse
an earlier conversion (lc_jax.checkpoints), or make the model of `model.factory`
(lc_jax.factory); load the images (decoded once, cached); open WORKDIR/results.csv and run.json
(lc_jax.results); then the loop of lc_jax.engine measures the original and every (trial,
target) not yet stored, batch by batch, saving partial sums between batches. A killed run
resumes where it stopped and writes the same file. With several processes (hosts) the first
writes and every step that may fail is agreed on by all (lc_jax.sharding.agreed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import sys
import time
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
import ml_collections
import numpy as np

from lc_jax import adapters
from lc_jax import checkpoints
from lc_jax import config as lc_config
from lc_jax import data
from lc_jax import engine
from lc_jax import evaluate
from lc_jax import factory
from lc_jax import init
from lc_jax import layers as layers_lib
from lc_jax import models
from lc_jax import progress
from lc_jax import reset
from lc_jax import results
from lc_jax import schema
from lc_jax import sharding
from lc_jax import timing
from lc_jax import workdir as workdir_lib
from lc_jax.config import RunConfig
from lc_jax.errors import UserError


@dataclasses.dataclass
class Model:
  """A model ready to evaluate: a converted checkpoint (a registered `module` with segments and
  its `spec`), or a factory's (lc_jax.factory: `module` None for a model without segments, run
  whole through `apply`). `fresh(key)` draws a fresh model's variables for a trial."""

  module: Any
  variables: dict
  card: dict  # arch, num_classes, and sha256 (of the checkpoint, or of a factory's variables)
  spec: models.Architecture | None
  layers: list[layers_lib.Layer]
  model_id: str
  fresh: Callable[[jax.Array], dict]  # a trial's key -> a fresh model's variables
  apply: Callable[[dict, jax.Array], jax.Array] | None = None


@dataclasses.dataclass
class Converted:
  """A run's checkpoint converted ahead of the run (`preconvert`): the source's sha256 and
  (module, variables, card) as `models.load` gives them."""

  sha256: str
  loaded: tuple


def preconvert(config: RunConfig | ml_collections.ConfigDict, workdir: str) -> Converted | None:
  """The conversion phase of `run(config, workdir)` done ahead, by this process alone: hashes the
  checkpoint (downloading a zoo:ID not yet cached), refuses a workdir that holds another run,
  converts the checkpoint into WORKDIR/model or finds an earlier conversion. `run(config,
  workdir, converted=...)` then starts from it. A sweep does this for the next model while the
  current one computes. It writes outside the workdir's lock: the caller keeps other runs out
  (a sweep holds its folder's lock). Returns None on every process but the first (the others
  read the conversion in `run`, as always)."""
  if jax.process_index() != 0:
    return None
  workdir = _workdir(workdir)
  settings = lc_config.check(config)
  sha256 = _source_sha256(settings)
  results.refuse_other_run(workdir, _identity(settings, sha256))
  return Converted(sha256, _convert(settings.model, os.path.join(workdir, schema.MODEL), sha256))


def prepare_model(config: RunConfig | ml_collections.ConfigDict, workdir: str,
                  source_sha256: str | None = None, converted: Converted | None = None) -> Model:
  """Converts `config.model.checkpoint` into WORKDIR/model, or reuses an earlier conversion of
  the same file (same sha256, computed here unless given; same lc-jax version; variables that
  match their recorded digest), or what `preconvert` gave (`converted`), and returns the model
  with its layer inventory. A damaged conversion is made again. With several processes the
  first converts and the others wait, then read it."""
  settings = lc_config.check(config)
  model_dir = os.path.join(workdir, schema.MODEL)
  wanted = settings.model

  loaded = None
  with sharding.agreed('converting the checkpoint'):
    if jax.process_index() == 0:
      loaded = converted.loaded if converted is not None else _convert(
          wanted, model_dir, source_sha256 or _source_sha256(settings))
  with sharding.agreed('reading the converted model'):
    module, variables, card = loaded or models.load(model_dir)
  spec = models.get(card['arch'])
  model_id = wanted.id or checkpoints.default_id(wanted.checkpoint)
  layers = layers_lib.inventory(module, spec.block_depth)
  scheme = settings.reset.init_scheme or spec.init_scheme
  # Host arrays: the run places them on its mesh in one transfer (`Forward.replicate`);
  # `jnp.asarray` would compile a copy program per distinct shape.
  return Model(module, jax.tree.map(np.asarray, variables), card, spec, layers, model_id,
               fresh=lambda key: init.fresh_variables(layers, scheme, key))


def _workdir(workdir: str) -> str:
  """`workdir` as an absolute path; an empty one (which would be the current folder) is
  refused."""
  if not str(workdir).strip():
    raise UserError('the workdir is empty; name the folder the run writes into (--workdir=DIR)')
  return os.path.abspath(os.path.expanduser(workdir))


def _checkpoint_sha256(settings: RunConfig, converted: Converted | None) -> str:
  """The checkpoint's sha256, hashed by the first process alone (a zoo:ID is downloaded there
  when not cached) and sent to the others: they read its conversion, never the checkpoint."""
  digest = None
  with sharding.agreed('hashing the checkpoint'):
    if jax.process_index() == 0:
      digest = converted.sha256 if converted else _source_sha256(settings)
  return sharding.first_process_digest(digest)


def _source_sha256(settings: RunConfig) -> str:
  """The checkpoint's sha256 (checkpoints.sha256: a zoo:ID is downloaded first if missing)."""
  wanted = settings.model
  return checkpoints.sha256(wanted.checkpoint, offline=wanted.offline or None,
                            mirrors=wanted.mirrors)


def _identity(settings: RunConfig, sha256: str) -> dict:
  """What a workdir's earlier run must share with this one to be resumed by it."""
  return {'config': settings.measured(), 'checkpoint_sha256': sha256}


def _convert(wanted: lc_config.ModelConfig, model_dir: str, sha256: str) -> tuple:
  """(module, variables, card) of the run's checkpoint converted into `model_dir`, or an
  earlier conversion reused (checkpoints.convert_into)."""
  return checkpoints.convert_into(
      wanted.checkpoint, model_dir, sha256, arch=wanted.arch, trust_pickle=wanted.trust_pickle,
      offline=wanted.offline or None, mirrors=wanted.mirrors,
      allow_nonfinite=wanted.allow_nonfinite)


def _content(info: data.DataInfo) -> str:
  """The digest of every host's images' bytes (each host hashed its own part)."""
  if jax.process_count() == 1 or not info.content:
    return info.content
  parts = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(info.content), np.uint8))
  return data.loader.combine_content(parts)


def factory_model(settings: RunConfig) -> Model:
  """The model of `settings.model.factory` (lc_jax.factory), made by every process alike."""
  made = factory.make(settings.model.factory, settings.data.crop_size,
                      settings.reset.init_scheme)
  adapted = made.adapted
  spec = adapters.registered_spec(adapted.module) if adapted.module is not None else None
  card = {'arch': spec.name if spec else factory.PREFIX + settings.model.factory,
          'num_classes': made.num_classes, 'sha256': made.sha256}
  return Model(adapted.module, adapted.variables, card, spec, adapted.layers,
               settings.model.id or made.name, fresh=adapted.fresh, apply=adapted.apply)


def reset_source(settings: RunConfig, model: Model, trial: int) -> dict | None:
  """The weights a reset of trial `trial` draws from: a fresh model, a checkpoint, or none."""
  mode = settings.reset.mode
  if mode in reset.RANDOM_MODES:
    return model.fresh(init.trial_key(settings.seed, trial))
  if mode == 'checkpoint':
    _, variables, _ = checkpoints.convert(
        settings.reset.init_checkpoint, model.card['arch'],
        trust_pickle=settings.model.trust_pickle, offline=settings.model.offline or None,
        mirrors=settings.model.mirrors, of_model='reset.init_checkpoint')
    return variables
  return None


def select_targets(settings: RunConfig, model: Model) -> list[layers_lib.Target]:
  """The reset targets of the run, in forward order (lc_jax.reset.targets)."""
  return reset.targets(model.layers, settings.reset.mode, settings.reset.types,
                       settings.reset.layers, settings.reset.granularity)


def check(config: ml_collections.ConfigDict | RunConfig) -> RunConfig:
  """The checked settings of `config` (lc_jax.config.check), and a device layout that fits."""
  settings = lc_config.check(config)
  sharding.make_mesh(settings.spread_resets)  # the groups must divide the devices
  return settings


def _versions() -> dict[str, str]:
  found = {'python': sys.version.split()[0]}
  for package in ('lc-jax', 'jax', 'jaxlib', 'flax', 'numpy', 'orbax-checkpoint', 'pillow'):
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def run(config: ml_collections.ConfigDict | RunConfig, workdir: str,
        timings: dict[str, float] | None = None,
        converted: Converted | None = None, converting: float = 0.0) -> list[dict[str, Any]]:
  """Runs (or resumes) the experiment of `config` in `workdir`; returns all result rows.

  Every setting is checked before the workdir is touched; the first process then holds the
  workdir's lock for the whole run (a second run on it is refused at once). `timings`, when
  given, is filled with the run's wall time in seconds, its phases (see `timing.Phases`) and
  'device_busy': the seconds in which the device was busy with the original and the resets
  (timing.Busy).
  `converted`: the checkpoint's conversion, done ahead by `preconvert`; `converting`: the
  seconds the caller spent on it (converting, or waiting for it), counted in the conversion
  phase and the wall time."""
  workdir = _workdir(workdir)
  settings = check(config)
  primary = jax.process_index() == 0  # with several processes (hosts), the one that writes
  use_compilation_cache(settings.compilation_cache_dir)
  untouched = workdir_lib.untouched(workdir) if primary else None  # before the lock makes it
  lock = workdir_lib.Lock(workdir) if primary else contextlib.nullcontext()
  start = time.perf_counter() - converting
  matmul = evaluate.matmul_precision(settings.precision, settings.matmul_precision)
  with lock, jax.default_matmul_precision(matmul):
    store = None
    try:
      with timing.Compiles() as compiles:
        phases = timing.Phases(compiles)
        phases.seconds['conversion'] += converting
        store, model, images, labels, info, targets = _open(settings, workdir, primary, phases,
                                                            converted)
        with phases('compute'):
          busy = _evaluate(settings, store, model, images, labels, info, targets, primary)
      show = settings.progress and primary
      progress.say(f'compiled {compiles.count} programs in {compiles.seconds:.1f} s '
                   f'({compiles.work:.1f} s of compile work)'
                   + (f', {compiles.from_cache} more read from the compilation cache'
                      if compiles.from_cache else ''), show)
      progress.say(phases.summary(time.perf_counter() - start), show)
    except UserError:
      # Refused before it kept a row (an unknown layer, NaN logits): a workdir that held
      # nothing is left as it was, without the lock file and converted model.
      if untouched and (store is None or not store.rows):
        workdir_lib.take_back(untouched)
      raise
    finally:
      if store is not None:
        store.close()
  if timings is not None:
    timings.update(phases.seconds, wall=time.perf_counter() - start, device_busy=busy)
  return store.rows


def use_compilation_cache(folder: str) -> None:
  """Points JAX's persistent compilation cache at `folder` ('' : $LC_JAX_COMPILATION_CACHE, or
  ~/.cache/lc_jax/compilation; 'none': off), caching every program however quickly it compiled,
  so a second process running the same architecture reads its programs instead of compiling."""
  folder = folder or os.environ.get('LC_JAX_COMPILATION_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'lc_jax', 'compilation')
  enabled = folder != 'none'
  folder = os.path.abspath(os.path.expanduser(folder)) if enabled else None
  if jax.config.jax_enable_compilation_cache == enabled and (
      not enabled or jax.config.jax_compilation_cache_dir == folder):
    return
  jax.config.update('jax_enable_compilation_cache', enabled)
  if enabled:
    jax.config.update('jax_compilation_cache_dir', folder)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  # JAX opens its cache once per process, at the first compile: another folder (a second run in
  # this process, a test's own) takes effect only once the opened one is let go.
  compilation_cache.reset_cache()


def _open(settings: RunConfig, workdir: str, primary: bool, phases: timing.Phases,
          converted: Converted | None):
  """The run's store, model, images and targets; refuses another run's workdir before its
  model is converted into it (`converted`: what `preconvert` did of this already)."""
  show = settings.progress and primary
  with phases('conversion'):
    if settings.model.factory:
      model = factory_model(settings)
      sha256 = model.card['sha256']
    else:
      sha256 = _checkpoint_sha256(settings, converted)
    with sharding.agreed('reading the workdir'):
      results.refuse_other_run(workdir, _identity(settings, sha256))
    if not settings.model.factory:
      model = prepare_model(settings, workdir, sha256, converted)
  size = getattr(model.module, 'img_size', None)  # a ViT's position embedding fixes its input
  if size is not None and size != settings.data.crop_size:
    raise UserError(f'this {model.card["arch"]} takes {size}x{size} images (its position '
                    f'embedding is learned for that size), but data.crop_size is '
                    f'{settings.data.crop_size}; set --config.data.crop_size={size} (and '
                    'data.resize_size to match)')
  targets = select_targets(settings, model)

  with phases('images'), sharding.agreed('loading the images'):
    images, labels, info = data.load(  # each host its own part of every batch
        settings.data, cache_dir=settings.cache_dir or None,
        process_index=jax.process_index(), process_count=jax.process_count(), progress=show)
    if info.num_images == 0:
      raise UserError('the image set is empty')
    num_classes = int(model.card['num_classes'])
    if labels is not None and labels.size and int(labels.max()) >= num_classes:
      raise UserError(f'the images have labels up to {int(labels.max())} but the model has '
                      f'{num_classes} classes; point data.path at a matching image set')
  run_info = {
      'config': settings.measured(), 'checkpoint_sha256': model.card['sha256'],
      'images': {'fingerprint': info.fingerprint, 'content': _content(info)},
      'targets': [t.name for t in targets],
      'arch': model.card['arch'], 'model_id': model.model_id, 'num_images': info.num_images,
      'skipped_images': info.skipped, 'image_cache': info.cache_path, 'versions': _versions()}
  if info.dataset is not None:  # the set in words (its fingerprint is in 'images')
    run_info['dataset'] = info.dataset
  if jax.process_count() > 1:
    run_info['processes'] = jax.process_count()
  # The writer opens the workdir (and cuts a line a kill left half-written) before the others
  # read it.
  store = None
  with sharding.agreed('opening the workdir'):
    if primary:
      store = results.Store(workdir, run_info)
  with sharding.agreed('reading the workdir'):
    if not primary:
      store = results.Store(workdir, run_info, writer=False)
  return store, model, images, labels, info, targets


def _evaluate(settings: RunConfig, store: results.Store, model: Model, images, labels, info,
              targets: list[layers_lib.Target], primary: bool) -> float:
  """The original's row, then every (trial, target) row not yet in the store (lc_jax.engine);
  returns the seconds the device was busy with the original and the resets (timing.Busy)."""
  show = settings.progress and primary
  module = model.module
  if module is not None:
    module = evaluate.with_precision(module, settings.precision)
  elif settings.precision == 'bfloat16':
    raise UserError(f'precision=bfloat16 needs a registered architecture (its layers compute in '
                    f'the dtype asked); {model.card["arch"]} computes as its own code says: use '
                    'float32 or tf32')
  forward = evaluate.Forward(module, model.layers, sharding.make_mesh(settings.spread_resets),
                             apply=model.apply)
  model.variables = variables = forward.replicate(model.variables)  # one copy, not two

  # A batch runs through the model in chunks of at most settings.chunk_size images, each a
  # multiple of this process's devices (padded and masked once, by the data layer).
  chunk = data.chunk_rows(info.local_batch_size, settings.chunk_size, forward.rows_multiple)
  if show and info.batch_size < settings.data.batch_size:  # data.loader.fitted_batch_size
    rows = -(-info.local_batch_size // chunk) * chunk * jax.process_count()
    progress.say(f'{info.num_images} images: one batch of {rows}, not '
                 f'{settings.data.batch_size} (data.batch_size)')
  plan = engine.Plan(model.model_id, targets, settings.reset.mode, settings.trials,
                     settings.reset.alpha, info.name)
  if settings.keep_per_image and jax.process_count() > 1:
    raise UserError('keep_per_image works within one process; with several processes (hosts) '
                    'leave it off')
  walk = engine.Walk(plan, forward, variables, store, has_labels=labels is not None,
                     num_batches=info.num_batches, num_images=info.num_images, show=show,
                     verbose=settings.verbose, reuse_prefix=settings.reuse_prefix,
                     keep_per_image=settings.keep_per_image, classes=info.classes)
  if not walk.needed:
    return 0.0
  first = next(data.chunks(images, labels, info, chunk))
  walk.compile(first[0])
  walk.describe(first[0], len(first), info.local_batch_size)
  resets = {}
  for trial in walk.pending_trials:  # placed on the mesh once, not at every use
    with sharding.agreed('reading the reset weights'):
      tree = reset_source(settings, model, trial)
    resets[trial] = reset.make(settings.reset.mode, model.layers, alpha=settings.reset.alpha,
                               source=None if tree is None else forward.replicate(tree))
  walk.run(data.chunks(images, labels, info, chunk), resets)
  return walk.busy.seconds
