"""The criticality run: for each trial and each selected layer, reset it and measure the shift.

    rows = lc_jax.experiment.run(config, workdir)

Steps: convert the checkpoint into WORKDIR/model (or reuse it), load the images (decoded once,
cached), run the original model once and keep its logits on the device. Then, batch by batch
(each in chunks of at most `config.chunk_size` images when that is set), the original model runs
segment by segment (stem, block after block, head; `lc_jax.evaluate`),
and every (trial, target) not yet in WORKDIR/results.csv is evaluated from the segment that
holds the target: reset the variables (a pure function), run the compiled segments from there
on the original's activations, add the batch's metric sums. After each batch the running sums
are saved (after every batch but the last); on the last batch each finished row is appended
durably. A killed run resumes where it stopped and writes the same file.

The host keeps the device fed: the next batch is put on the devices while the current one
computes, and each step's values are read only once the next step is dispatched, so the device
has work queued while the host adds up, writes and reports (progress shows the device's busy
share, evaluate.Busy).

Work done per batch, for T targets in a model of S segments: one forward for the reference,
one for the walk, and for each target only the segments from its own on; the paper's procedure
runs T + 1 full forwards and decodes the images T + 1 times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import os
import sys
import time
from typing import Any, Iterable, Iterator

import jax
from jax.experimental import multihost_utils
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import ml_collections
import numpy as np

from lc_jax import checkpoints
from lc_jax import config as lc_config
from lc_jax import data
from lc_jax import evaluate
from lc_jax import init
from lc_jax import layers as layers_lib
from lc_jax import metrics
from lc_jax import models
from lc_jax import progress
from lc_jax import reset
from lc_jax import results
from lc_jax import schema
from lc_jax import sharding
from lc_jax import workdir as workdir_lib
from lc_jax.config import RunConfig
from lc_jax.errors import UserError


@dataclasses.dataclass
class Model:
  """A converted model ready to evaluate."""

  module: Any
  variables: dict
  card: dict
  spec: models.Architecture
  layers: list[layers_lib.Layer]
  model_id: str


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

  def convert():
    if jax.process_index() != 0:
      return None
    if converted is not None:
      return converted.loaded
    return _convert(wanted, model_dir, source_sha256 or _source_sha256(settings))
  loaded = sharding.agreed('converting the checkpoint', convert)
  module, variables, card = sharding.agreed('reading the converted model',
                                            lambda: loaded or models.load(model_dir))
  spec = models.get(card['arch'])
  model_id = wanted.id or checkpoints.default_id(wanted.checkpoint)
  # Host arrays: the run places them on its mesh in one transfer (`Forward.replicate`);
  # `jnp.asarray` would compile a copy program per distinct shape.
  return Model(module, jax.tree.map(np.asarray, variables), card, spec,
               layers_lib.inventory(module, spec.block_depth), model_id)


def _workdir(workdir: str) -> str:
  """`workdir` as an absolute path; an empty one (which would be the current folder) is
  refused."""
  if not str(workdir).strip():
    raise UserError('the workdir is empty; name the folder the run writes into (--workdir=DIR)')
  return os.path.abspath(os.path.expanduser(workdir))


def _checkpoint_sha256(settings: RunConfig, converted: Converted | None) -> str:
  """The checkpoint's sha256, hashed by the first process alone (a zoo:ID is downloaded there
  when not cached) and sent to the others: they read its conversion, never the checkpoint."""
  def first():
    if jax.process_index() != 0:
      return None
    return converted.sha256 if converted else _source_sha256(settings)
  return sharding.first_process_digest(sharding.agreed('hashing the checkpoint', first))


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


def reset_source(settings: RunConfig, model: Model, trial: int) -> dict | None:
  """The weights a reset of trial `trial` draws from: a fresh model, a checkpoint, or none."""
  mode = settings.reset.mode
  if mode in lc_config.RANDOM_MODES:
    scheme = settings.reset.init_scheme or model.spec.init_scheme
    return init.fresh_variables(model.layers, scheme, init.trial_key(settings.seed, trial))
  if mode == 'checkpoint':
    _, variables, _ = checkpoints.convert(
        settings.reset.init_checkpoint, model.card['arch'],
        trust_pickle=settings.model.trust_pickle, offline=settings.model.offline or None,
        mirrors=settings.model.mirrors)
    return variables
  return None


def select_targets(settings: RunConfig, model: Model) -> list[layers_lib.Target]:
  """The reset targets of the run, in forward order."""
  targets = layers_lib.select(model.layers, settings.reset.types, settings.reset.layers,
                              settings.reset.granularity)
  if settings.reset.mode == 'skip':  # the stem and head have no shortcut to return
    targets = [t for t in targets if any(layer.residual for layer in t.layers)]
  return targets


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
        converted: Converted | None = None) -> list[dict[str, Any]]:
  """Runs (or resumes) the experiment of `config` in `workdir`; returns all result rows.

  Every setting is checked before the workdir is touched; the first process then holds the
  workdir's lock for the whole run (a second run on it is refused at once). `timings`, when
  given, is filled with the run's wall time in seconds, its phases (see `Phases`) and
  'device_busy': the seconds in which the device was busy with the original and the resets
  (evaluate.Busy).
  `converted`: the checkpoint's conversion, done ahead by `preconvert`."""
  workdir = _workdir(workdir)
  settings = check(config)
  primary = jax.process_index() == 0  # with several processes (hosts), the one that writes
  use_compilation_cache(settings.compilation_cache_dir)
  untouched = workdir_lib.untouched(workdir) if primary else None  # before the lock makes it
  lock = workdir_lib.Lock(workdir) if primary else contextlib.nullcontext()
  start = time.perf_counter()
  matmul = evaluate.matmul_precision(settings.precision, settings.matmul_precision)
  with lock, jax.default_matmul_precision(matmul):
    store = None
    try:
      with evaluate.Compiles() as compiles:
        phases = Phases(compiles)
        store, model, images, labels, info, targets = _open(settings, workdir, primary, phases,
                                                            converted)
        with phases('compute'):
          busy = _evaluate(settings, store, model, images, labels, info, targets, primary)
      progress.say(f'compiled {compiles.count} programs in {compiles.seconds:.1f} s '
                   f'({compiles.work:.1f} s of compile work)'
                   + (f', {compiles.from_cache} more read from the compilation cache'
                      if compiles.from_cache else ''), settings.progress and primary)
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


class Phases:
  """Wall time of a run's phases in seconds, `seconds`: 'conversion' (hashing the checkpoint,
  converting it or reading an earlier conversion), 'images' (loading the images), 'compute'
  (evaluating the original and the resets) and 'compile' (tracing, lowering and compiling
  programs, or reading them from the persistent cache, in whichever phase it happened, and
  taken out of that phase, as `compiles` counted it). `with phases('images'): ...` around
  each phase, while `compiles` is open."""

  def __init__(self, compiles: evaluate.Compiles):
    self.seconds = {'conversion': 0.0, 'images': 0.0, 'compile': 0.0, 'compute': 0.0}
    self._compiles = compiles

  @contextlib.contextmanager
  def __call__(self, name: str):
    start, made = time.perf_counter(), self._compiles.making
    try:
      yield
    finally:
      making = self._compiles.making - made
      self.seconds['compile'] += making
      self.seconds[name] += time.perf_counter() - start - making


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


def _open(settings: RunConfig, workdir: str, primary: bool, phases: Phases,
          converted: Converted | None):
  """The run's store, model, images and targets; refuses another run's workdir before its
  model is converted into it (`converted`: what `preconvert` did of this already)."""
  show = settings.progress and primary
  with phases('conversion'):
    sha256 = _checkpoint_sha256(settings, converted)
    sharding.agreed('reading the workdir', lambda: results.refuse_other_run(
        workdir, _identity(settings, sha256)))
    model = prepare_model(settings, workdir, sha256, converted)
  size = getattr(model.module, 'img_size', None)  # a ViT's position embedding fixes its input
  if size is not None and size != settings.data.crop_size:
    raise UserError(f'this {model.card["arch"]} takes {size}x{size} images (its position '
                    f'embedding is learned for that size), but data.crop_size is '
                    f'{settings.data.crop_size}; set --config.data.crop_size={size} (and '
                    'data.resize_size to match)')
  targets = select_targets(settings, model)

  def load_images():  # each host its own part of every batch
    images, labels, info = data.load(
        settings.data, cache_dir=settings.cache_dir or None,
        process_index=jax.process_index(), process_count=jax.process_count(), progress=show)
    if info.num_images == 0:
      raise UserError('the image set is empty')
    num_classes = int(model.card['num_classes'])
    if labels is not None and labels.size and int(labels.max()) >= num_classes:
      raise UserError(f'the images have labels up to {int(labels.max())} but the model has '
                      f'{num_classes} classes; point data.path at a matching image set')
    return images, labels, info
  with phases('images'):
    images, labels, info = sharding.agreed('loading the images', load_images)
  run_info = {
      'config': settings.measured(), 'checkpoint_sha256': model.card['sha256'],
      'images': {'fingerprint': info.fingerprint, 'content': _content(info)},
      'targets': [t.name for t in targets],
      'arch': model.card['arch'], 'model_id': model.model_id, 'num_images': info.num_images,
      'skipped_images': info.skipped, 'image_cache': info.cache_path, 'versions': _versions()}
  if jax.process_count() > 1:
    run_info['processes'] = jax.process_count()
  # The writer opens the workdir (and cuts a line a kill left half-written) before the others
  # read it.
  writer = sharding.agreed('opening the workdir',
                  lambda: results.Store(workdir, run_info) if primary else None)
  reader = sharding.agreed('reading the workdir',
                  lambda: None if primary else results.Store(workdir, run_info, writer=False))
  return writer or reader, model, images, labels, info, targets


def _evaluate(settings: RunConfig, store: results.Store, model: Model, images, labels, info,
              targets: list[layers_lib.Target], primary: bool) -> float:
  """The original's row, then every (trial, target) row not yet in the store; returns the
  seconds the device was busy with the original and the resets (evaluate.Busy)."""
  show = settings.progress and primary
  module = evaluate.with_precision(model.module, settings.precision)
  forward = evaluate.Forward(module, model.layers, sharding.make_mesh(settings.spread_resets))
  model.variables = variables = forward.replicate(model.variables)  # one copy, not two
  has_labels = labels is not None
  trials = settings.num_trials

  # A batch runs through the model in chunks of at most settings.chunk_size images, each a
  # multiple of this process's devices (padded and masked once, by the data layer). A batch is
  # put on the devices when the one before it is taken: its transfer runs during that one's
  # compute.
  chunk = data.chunk_rows(info.local_batch_size, settings.chunk_size, forward.rows_multiple)
  if show and info.batch_size < settings.data.batch_size:  # data.loader.fitted_batch_size
    rows = -(-info.local_batch_size // chunk) * chunk * jax.process_count()
    progress.say(f'{info.num_images} images: one batch of {rows}, not '
                 f'{settings.data.batch_size} (data.batch_size)')

  def batches(first: int = 0):
    host = (pieces for b, pieces in enumerate(data.chunks(images, labels, info, chunk))
            if b >= first)
    return _one_ahead([tuple(forward.put(part) for part in piece) for piece in pieces]
                      for pieces in host)

  # Every program the run calls, lowered and then compiled together (evaluate.compile_all)
  # before any work: each segment program once per distinct block, and the metrics of the
  # original and of a reset. The busy clock starts after them.
  x, y, mask = next(data.chunks(images, labels, info, chunk))[0]
  lowered, logits = forward.lower(variables, forward.placed(x))
  y, mask = forward.placed(y), forward.placed(mask)
  lowered.append(metrics.per_image.lower(logits, None, y, mask))
  if targets:
    lowered.append(metrics.per_image.lower(logits, logits, y, mask))
  with progress.Phase('compile', len(lowered), 'programs', show) as phase:
    forward.compile([_Counted(program, phase) for program in lowered])

  # ---------------------------------------------------------------- the original --------------
  # Its logits on every chunk are the reference of every reset (kept on the device); a chunk's
  # values are read once the next chunk is dispatched. The busy clock sees every segment.
  busy = evaluate.Busy()
  forward.on_dispatch = busy.segment
  reference = []

  def originals():
    for pieces in batches():
      reference.append([])
      for x, y, mask in pieces:
        reference[-1].append(forward(variables, x))
        values = metrics.per_image(reference[-1][-1], None, y, mask)
        busy.dispatched(values['count'])
        yield values
  total = None
  for values in _one_ahead(originals()):
    busy.wait(values['count'])
    total = metrics.accumulate(total, values)
  if not all(np.isfinite(list(total.values()))):  # the sums of finite logits are finite
    raise UserError('the model outputs NaN or inf on these images (its logits are not finite), '
                    "so no criticality can be measured; check the checkpoint's weights")
  original = metrics.finalize(total, has_labels)
  original['recovered_acc'] = 1.0 if has_labels else float('nan')
  evaluated = int(total['count'])  # the images that decoded
  if not store.done(0, schema.ORIGINAL):
    store.append(schema.row(model.model_id, evaluated, schema.ORIGINAL, 0, 'none', (), original))

  # ---------------------------------------------------------------- resets --------------------
  # Batch by batch, the original model runs segment by segment; a reset of a layer in segment
  # k re-runs the network from k on that segment's input (or from the images without prefix
  # reuse). Rows are in the order of the targets, trials within a target.
  todo: dict[int, list[tuple[int, layers_lib.Target]]] = {}
  for target in targets:
    start = forward.start(target) if settings.reuse_prefix else 0
    todo.setdefault(start, []).extend(
        (trial, target) for trial in range(trials) if not store.done(trial, target.name))
  todo = {k: items for k, items in sorted(todo.items()) if items}
  pending = [_key(t, target) for items in todo.values() for t, target in items]
  first_batch, sums = (store.load_partial(pending, info.num_batches, metrics.SUMS)
                       if pending else (0, {}))
  sharding.same_everywhere([pending, first_batch], 'states of results.csv and partial.json')
  def source(trial):  # placed on the mesh once, not at every use
    tree = sharding.agreed('reading the reset weights',
                           lambda: reset_source(settings, model, trial))
    return None if tree is None else forward.replicate(tree)
  resets = {trial: reset.make(settings.reset.mode, model.layers, source=source(trial),
                              alpha=settings.reset.alpha)
            for trial in sorted({t for items in todo.values() for t, _ in items})}
  num_chunks = len(reference[0])
  if show and todo:
    shape = (chunk, *images.shape[1:])
    inputs = forward.inputs(variables, jax.ShapeDtypeStruct(shape, jnp.uint8))
    kept = max(x.size * x.dtype.itemsize for x in inputs)
    what = (f'a batch of {shape[0]}' if num_chunks == 1 else
            f'a chunk of {shape[0]} ({num_chunks} per batch of {info.local_batch_size})')
    progress.say((f'prefix reuse: {len(forward.names)} segments in {forward.programs(inputs)} '
                  'programs; the walk keeps one activation, ' if settings.reuse_prefix else
                  'no prefix reuse: every reset runs from the images; the largest segment input '
                  'is ') + f'at most {kept / 2**20:.0f} MiB for {what}')
  total = trials * len(targets)
  if show and (len(pending) < total or first_batch):
    progress.say(f'resuming: {total - len(pending)} of {total} resets already in results.csv'
                 + (f', {first_batch} of {info.num_batches} batches of the others done'
                    if first_batch else ''))
  # The resets phase counts image-resets (images times resets evaluated on them): a step
  # evaluates its resets on a chunk's share of a batch. Its cost, for the time left, is in
  # segments run: a reset from segment k runs the segments from k on. The busy share is shown
  # once the clock has seen work unfinished on the device (tiny batches may always finish
  # before the look).
  per_batch = info.num_images / info.num_batches
  cost = {k: len(items) * (len(forward.names) - k) for k, items in todo.items()}
  finished = total - len(pending)
  phase = progress.Phase(
      'resets', len(pending) * (info.num_batches - first_batch) * per_batch, 'image-resets',
      show, status=lambda: (f'device busy {100 * busy.fraction:3.0f}%' if busy.seconds > 0
                            else ''), work=(info.num_batches - first_batch) * sum(cost.values()))
  starts = list(todo)  # segments with resets, in order

  def dispatched():
    """The work of the run in order, one step per segment with resets, each dispatched when
    asked for: (batch, chunk, segment, its (trial, target)s, their per-image values)."""
    for b, pieces in enumerate(batches(first_batch) if todo else (), first_batch):
      for c, (x, y, mask) in enumerate(pieces):
        h = forward(variables, x, 0, starts[0])  # the input of the first segment with a target
        for k, next_k in zip(starts, starts[1:] + [None]):
          logits = forward.many([resets[t](variables, target) for t, target in todo[k]], h, k)
          values = [metrics.per_image(reference[b][c], z, y, mask) for z in logits]
          if next_k is not None:
            h = forward(variables, h, k, next_k)
          busy.dispatched(*(v['count'] for v in values))
          yield b, c, k, values

  # Each step's values are read once the step after it is dispatched (the next batch's first
  # step at the end of a batch), so the device always has work queued while the host adds up,
  # writes and reports.
  with phase:
    for b, c, k, values in _one_ahead(dispatched()):
      final = b == info.num_batches - 1 and c == num_chunks - 1  # rows are complete after it
      busy.wait(*(v['count'] for v in values))
      for (trial, target), new in zip(todo[k], values):
        key = _key(trial, target)
        sums[key] = metrics.accumulate(sums.get(key), new)
        if final:
          measured = metrics.finalize(sums[key], has_labels, original['top1_acc'])
          store.append(schema.row(model.model_id, evaluated, target.name, trial,
                                  settings.reset.mode, target.layers, measured))
          finished += 1
          progress.say(f'[{finished:4d}/{total}] {f"trial {trial} {target.name}":32s} '
                       f'criticality {100 * measured["criticality"]:7.3f}%',
                       show and settings.verbose)
      busy.poll()
      phase.advance(len(todo[k]) * per_batch / num_chunks, cost[k] / num_chunks)
      if b < info.num_batches - 1 and c == num_chunks - 1 and k == starts[-1]:
        sharding.agreed('saving the partial sums', lambda: store.save_partial(b + 1, sums))
  missing = [key for key in pending if not store.done(*_unkey(key))]
  if missing:
    raise RuntimeError(f'{len(missing)} resets were not written, e.g. {missing[0]}')
  store.clear_partial()
  return busy.seconds


def _one_ahead(items: Iterable[Any]) -> Iterator[Any]:
  """`items`, each yielded once the item after it has been made: whatever making an item starts
  (a transfer, dispatched work) is under way while the one before it is used."""
  items = iter(items)
  current = next(items, _END)
  while current is not _END:
    following = next(items, _END)
    yield current
    current = following


_END = object()


def _key(trial: int, target: layers_lib.Target) -> str:
  return f'{trial}/{target.name}'


def _unkey(key: str) -> tuple[int, str]:
  trial, name = key.split('/', 1)
  return int(trial), name


class _Counted:
  """A lowered program whose compile advances the compile phase (evaluate.compile_all calls
  `compile()` on its worker threads)."""

  def __init__(self, lowered: jax.stages.Lowered, phase: progress.Phase):
    self.lowered, self.phase = lowered, phase

  def compile(self) -> jax.stages.Compiled:
    compiled = self.lowered.compile()
    self.phase.advance()
    return compiled
