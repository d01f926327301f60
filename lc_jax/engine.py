"""The criticality loop, one for both faces: run.py (`lc_jax.experiment.run`) and the API
(`lc_jax.criticality`).

    plan = engine.Plan(model_id, targets, mode, trials)
    walk = engine.Walk(plan, forward, variables, store, has_labels=True, num_batches=B)
    resets = {t: reset.make(mode, layers, source=...) for t in walk.pending_trials}
    walk.run(batches, resets)        # rows land in `store`: results.Store, or engine.Memory

The plan: the targets (lc_jax.reset.targets), the trials a mode runs, the resets grouped by the
segment they start from, the original's row. The walk: batch by batch, chunk by chunk, the
original model runs once for the reference logits and once segment by segment (the walk); a
reset of a layer in segment k runs the network from k on that segment's input, so no work
before it is repeated (prefix reuse; a model without segments is one segment, and every reset
runs it whole). Per-image metrics are added up on the host in float64 (lc_jax.metrics).

Durability comes from the store: after every batch but the last the running sums of every
unfinished row, the original's included, are saved (`save_partial`), and after the last batch
the rows are appended, the original's first. A store that already holds rows, or partial sums of
the first batches, resumes: the same rows, the same numbers.

The host keeps the device fed: the next batch is put on the devices while the current one
computes, and each step's values are read only once the next step is dispatched, so the device
has work queued while the host adds up, writes and reports (progress shows the device's busy
share, lc_jax.timing.Busy).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np

from lc_jax import evaluate
from lc_jax import layers as layers_lib
from lc_jax import metrics
from lc_jax import progress
from lc_jax import reset as reset_lib
from lc_jax import schema
from lc_jax import sharding
from lc_jax import timing
from lc_jax.errors import UserError

# A host chunk: (images, labels, mask), padded to a multiple of the devices; padding rows have
# label -1 and mask False. A batch is a list of chunks of one shape.
Chunk = tuple[np.ndarray, np.ndarray, np.ndarray]
_ORIGINAL_KEY = schema.ORIGINAL  # the original's sums in the partial state; resets are 'T/NAME'


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run measures: the original, then every (trial, target), rows labelled `model_id`
  and `dataset` (the image set's name; '' when it has none)."""

  model_id: str
  targets: Sequence[layers_lib.Target]
  mode: str
  trials: int  # asked for; a deterministic mode runs one (lc_jax.reset.trials)
  alpha: float = 0.0
  dataset: str = ''

  @property
  def num_trials(self) -> int:
    return reset_lib.trials(self.mode, self.trials)


class Memory:
  """A store that keeps rows in memory (the API without a workdir): nothing is resumed."""

  def __init__(self, run_id: str = 'api'):
    self.run_id = run_id
    self.rows: list[dict[str, Any]] = []

  def done(self, trial: int, layer: str) -> bool:
    del trial, layer
    return False

  def append(self, row: Mapping[str, Any]) -> None:
    self.rows.append({**row, 'run_id': self.run_id})

  def load_partial(self, keys, num_batches, fields) -> tuple[int, dict]:
    del keys, num_batches, fields
    return 0, {}

  def save_partial(self, batches_done: int, sums) -> None:
    del batches_done, sums

  def clear_partial(self) -> None:
    pass

  def save_per_image(self, batch: int, values) -> None:
    del batch, values

  def load_per_image(self, batches: int, keys) -> dict:
    del batches, keys
    return {}

  def write_per_image(self, values) -> None:
    del values

  def kept_per_image(self) -> set[str]:
    return set()

  def clear_per_image(self) -> None:
    pass


class Walk:
  """One run of a plan over a model's batches into a store (see the module docstring).

  `forward` is the model's lc_jax.evaluate.Forward (segments, or the whole model as one),
  `variables` the trained ones placed by `forward.replicate`. `num_batches` is the batch count
  when it is known (partial sums are saved between batches only then). `show` prints progress,
  `verbose` a line per finished row; `keep_per_image` keeps every image's criticality per
  (trial, target) in `per_image`; `classes` restricts the metrics to those logits
  (lc_jax.metrics.per_image; DataInfo.classes)."""

  def __init__(self, plan: Plan, forward: evaluate.Forward, variables: dict, store, *,
               has_labels: bool, num_batches: int | None = None, num_images: int | None = None,
               show: bool = False, verbose: bool = False, keep_per_image: bool = False,
               reuse_prefix: bool = True, classes: Sequence[int] | None = None):
    self.plan, self.forward, self.variables, self.store = plan, forward, variables, store
    self.classes = classes
    self.has_labels, self.num_batches, self.num_images = has_labels, num_batches, num_images
    self.show, self.verbose, self.keep_per_image = show, verbose, keep_per_image
    self.reuse_prefix = reuse_prefix
    # (trial, target name): per-image criticality, over the images measured, in image order
    self.per_image: dict[tuple[int, str], np.ndarray] = {}
    self._kept: dict[str, list[np.ndarray]] = {}  # key: this run's values, batch by batch
    self.busy: timing.Busy | None = None  # the device's busy clock, started by `run`
    # Resets grouped by the segment they start from, in segment order; rows in the order of
    # the targets, trials within a target, as they are written.
    todo: dict[int, list[tuple[int, layers_lib.Target]]] = {}
    for target in plan.targets:
      start = forward.start(target) if reuse_prefix else 0
      todo.setdefault(start, []).extend(
          (trial, target) for trial in range(plan.num_trials) if not store.done(trial, target.name))
    self.todo = {k: items for k, items in sorted(todo.items()) if items}
    self.pending = [_key(t, target) for items in self.todo.values() for t, target in items]
    self.original_done = store.done(0, schema.ORIGINAL)
    if self.pending and num_batches:
      self.first_batch, self.sums = store.load_partial(
          self.pending + [_ORIGINAL_KEY], num_batches, metrics.SUMS)
    else:
      self.first_batch, self.sums = 0, {}
    if keep_per_image:  # rows measured without it cannot be given their values afterwards
      done = [_key(t, target) for target in plan.targets for t in range(plan.num_trials)
              if store.done(t, target.name)]
      kept = store.kept_per_image() if done else set()
      lacking = [key for key in done if key not in kept]
      if lacking:
        raise UserError(f'keep_per_image: {len(lacking)} of the {len(done)} rows in '
                        'results.csv were measured without their per-image values (per_image.npz '
                        f'lacks {lacking[0]}), and a finished row is not measured again: measure '
                        'into a new workdir to keep every row\'s values')
    # The per-image values of the batches done, when kept: without them the rows start over.
    self._earlier: dict[str, np.ndarray] = {}
    if keep_per_image and self.first_batch:
      earlier = store.load_per_image(self.first_batch, self.pending)
      if earlier is None:
        progress.say('the per-image values of the batches done are missing: the unfinished '
                     'rows start over from the first batch', show)
        self.first_batch, self.sums = 0, {}
      else:
        self._earlier = earlier
    sharding.same_everywhere([self.pending, self.first_batch],
                             'states of results.csv and partial.json')

  @property
  def pending_trials(self) -> list[int]:
    """The trials with a reset still to measure: their reset weights are needed."""
    return sorted({t for items in self.todo.values() for t, _ in items})

  @property
  def needed(self) -> bool:
    """Whether anything is left to measure."""
    return bool(self.pending) or not self.original_done

  def compile(self, first: Chunk) -> None:
    """Every program the walk calls, lowered on the shape of `first` (a host chunk) and compiled
    together before any work (timing.compile_all): each segment program once per distinct
    block, and the metrics of the original and of a reset."""
    x, y, mask = first
    lowered, logits = self.forward.lower(self.variables, self.forward.placed(x))
    y, mask = self.forward.placed(y), self.forward.placed(mask)
    lowered.append(metrics.per_image.lower(logits, None, y, mask, classes=self.classes))
    if self.plan.targets:
      lowered.append(metrics.per_image.lower(logits, logits, y, mask, classes=self.classes))
    with progress.Phase('compile', len(lowered), 'programs', self.show) as phase:
      self.forward.compile([_Counted(program, phase) for program in lowered])

  def describe(self, first: Chunk, chunks_per_batch: int, batch_rows: int) -> None:
    """Says how the walk runs (segments, programs, the activation it keeps) and what a resumed
    run takes over."""
    if not self.show:
      return
    forward, total = self.forward, self.plan.num_trials * len(self.plan.targets)
    if self.todo:
      shape = (len(first[0]), *first[0].shape[1:])
      inputs = forward.inputs(self.variables, jax.ShapeDtypeStruct(shape, first[0].dtype))
      kept = max(x.size * x.dtype.itemsize for x in inputs)
      what = (f'a batch of {shape[0]}' if chunks_per_batch == 1 else
              f'a chunk of {shape[0]} ({chunks_per_batch} per batch of {batch_rows})')
      progress.say((f'prefix reuse: {len(forward.names)} segments in '
                    f'{forward.programs(inputs)} programs; the walk keeps one activation, '
                    if self.reuse_prefix and len(forward.names) > 1 else
                    'no prefix reuse: every reset runs from the images; the largest segment '
                    'input is ') + f'at most {kept / 2**20:.0f} MiB for {what}')
    if len(self.pending) < total or self.first_batch:
      progress.say(f'resuming: {total - len(self.pending)} of {total} resets already in results.csv'
                   + (f', {self.first_batch} of {self.num_batches} batches of the others done'
                      if self.first_batch else ''))

  def run(self, batches: Iterable[Sequence[Chunk]], resets: Mapping[int, reset_lib.Reset]
          ) -> None:
    """Measures what is pending over `batches` (every batch from the first: those the store's
    partial sums already cover are skipped) with `resets[trial]`, and appends the rows."""
    if not self.needed:
      return
    forward, variables, todo = self.forward, self.variables, self.todo
    starts = list(todo)  # segments with resets, in order
    # The time left is weighed by each segment's cost (Forward.cost, one unit each without an
    # estimate): a reset from segment k runs the segments from k on.
    weight = (forward.cost if len(forward.cost) == len(forward.names) and all(forward.cost)
              else [1.0] * len(forward.names))
    cost = {k: len(items) * sum(weight[k:]) for k, items in todo.items()}
    chunk_cost = sum(weight) + sum(cost.values())  # the reference (with the walk), the resets
    sums = dict(self.sums)
    original = sums.pop(_ORIGINAL_KEY, None)
    per_batch = (self.num_images / self.num_batches) if self.num_batches else None
    left = (self.num_batches - self.first_batch) if self.num_batches else None
    self.busy = busy = timing.Busy()
    forward.on_dispatch = busy.segment
    phase = progress.Phase(
        'resets', len(self.pending) * left * per_batch if left else 0, 'image-resets',
        self.show and bool(left), status=lambda: (f'device busy {100 * busy.fraction:3.0f}%'
                                                  if busy.seconds > 0 else ''),
        work=left * chunk_cost if left else None)

    def placed(host_batches):  # each batch put on the devices while the one before computes
      for pieces in host_batches:
        yield [(tuple(forward.put(part) for part in piece), piece[2]) for piece in pieces]

    def dispatched():
      """The work in order, each step dispatched when asked for: (batch, chunk, number of
      chunks, segment or None for the reference, the step's per-image values, host mask)."""
      host = itertools.islice(batches, self.first_batch, None)
      for b, pieces in enumerate(_one_ahead(placed(host)), self.first_batch):
        for c, ((x, y, mask), host_mask) in enumerate(pieces):
          # The reference and the walk share the segments before the first one with resets.
          h = forward(variables, x, 0, starts[0]) if starts else x
          reference = forward(variables, h, starts[0] if starts else 0)
          values = metrics.per_image(reference, None, y, mask, classes=self.classes)
          busy.dispatched(values['count'])
          yield b, c, len(pieces), None, [values], host_mask
          for k, next_k in zip(starts, starts[1:] + [None]):
            logits = forward.many([resets[t](variables, target) for t, target in todo[k]], h, k)
            values = [metrics.per_image(reference, z, y, mask, classes=self.classes)
                      for z in logits]
            if next_k is not None:
              h = forward(variables, h, k, next_k)
            busy.dispatched(*(v['count'] for v in values))
            yield b, c, len(pieces), k, values, host_mask

    batches_seen = self.first_batch
    with phase:
      for b, c, chunks, k, values, host_mask in _one_ahead(dispatched()):
        busy.wait(*(v['count'] for v in values))
        if k is None:
          original = metrics.accumulate(original, values[0])
          if not all(np.isfinite(list(original.values()))):  # sums of finite logits are finite
            raise UserError("the model's own logits are not finite (NaN or inf) on some of the "
                            'images, so no criticality can be measured against them; check '
                            "the model's weights")
        else:
          for (trial, target), new in zip(todo[k], values):
            key = _key(trial, target)
            sums[key] = metrics.accumulate(sums.get(key), new)
            if self.keep_per_image:
              self._kept.setdefault(key, []).append(
                  np.asarray(new['crit'], np.float64)[host_mask])
          if per_batch:
            phase.advance(len(todo[k]) * per_batch / chunks, cost[k] / chunks)
        if k is None and per_batch:
          phase.advance(0, sum(weight) / chunks)
        busy.poll()
        last_step = c == chunks - 1 and k == (starts[-1] if starts else None)
        if last_step:
          batches_seen = b + 1
          if self.num_batches and batches_seen < self.num_batches and self.pending:
            with sharding.agreed('saving the partial sums'):
              if self.keep_per_image:  # this batch's values, before the sums that count it
                self.store.save_per_image(b, self._batch_values(chunks))
              self.store.save_partial(batches_seen, {**sums, _ORIGINAL_KEY: original})
    if original is None:
      raise UserError('the image set is empty')
    if self.num_batches is not None and batches_seen != self.num_batches:
      raise RuntimeError(f'{batches_seen} of {self.num_batches} batches were evaluated')
    self._write(original, sums)

  def _batch_values(self, chunks: int) -> dict[str, np.ndarray]:
    """The per-image values of the batch just finished (its `chunks` chunks), per pending key."""
    return {key: np.concatenate(parts[-chunks:]) for key, parts in self._kept.items()}

  def _write(self, original_sums: dict, sums: dict) -> None:
    """The per-image values when kept, the original's row (unless stored), then every pending
    row, in the order of `todo`."""
    plan = self.plan
    if self.keep_per_image:
      values = {key: np.concatenate(([self._earlier[key]] if key in self._earlier else [])
                                    + parts) for key, parts in self._kept.items()}
      self.store.write_per_image(values)
      self.per_image = {_unkey(key): value for key, value in values.items()}
    original = metrics.finalize(original_sums, self.has_labels)
    original['recovered_acc'] = 1.0 if self.has_labels else float('nan')
    num_images = int(original_sums['count'])  # the images that decoded
    if not self.original_done:
      self.store.append(schema.row(plan.model_id, num_images, schema.ORIGINAL, 0, 'none', (),
                                   original, plan.dataset))
    finished = len(plan.targets) * plan.num_trials - len(self.pending)
    for items in self.todo.values():
      for trial, target in items:
        measured = metrics.finalize(sums[_key(trial, target)], self.has_labels,
                                    original['top1_acc'])
        self.store.append(schema.row(plan.model_id, num_images, target.name, trial, plan.mode,
                                     target.layers, measured, plan.dataset))
        finished += 1
        progress.say(f'[{finished:4d}/{len(plan.targets) * plan.num_trials}] '
                     f'{f"trial {trial} {target.name}":32s} criticality '
                     f'{100 * measured["criticality"]:7.3f}%', self.show and self.verbose)
    with sharding.agreed('clearing the partial sums'):
      self.store.clear_partial()
      self.store.clear_per_image()


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
  """A lowered program whose compile advances the compile phase (timing.compile_all calls
  `compile()` on its worker threads)."""

  def __init__(self, lowered: jax.stages.Lowered, phase: progress.Phase):
    self.lowered, self.phase = lowered, phase

  def compile(self) -> jax.stages.Compiled:
    compiled = self.lowered.compile()
    self.phase.advance()
    return compiled
