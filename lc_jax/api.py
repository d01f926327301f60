"""Layer criticality as one call, for research code: any Flax model, arrays in, a Result out.

    import lc_jax
    result = lc_jax.criticality(model, variables, images, labels=None, layers='conv,linear',
                                mode='fresh', trials=3, key=jax.random.key(0), batch_size=256)
    print(result.table())          # per layer: criticality with its 95% intervals, and more
    result.to_csv('results.csv'); result.plot('criticality.png')

`model` is a registered architecture (its name, or its module), any `flax.linen.Module` whose
`apply(variables, x)` gives logits, or a `flax.nnx.Module` (then `variables` is None); see
lc_jax.adapters for how layers are found and fresh models drawn. Registered models run a reset
from the segment that holds it on (prefix reuse); others run the whole forward per reset. The
numbers are run.py's: for a registered model, the same images, seed and settings give its
results.csv rows. Nothing is written unless asked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import flax.errors
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lc_jax import adapters
from lc_jax import batches as batches_lib
from lc_jax import engine
from lc_jax import evaluate
from lc_jax import models
from lc_jax import report
from lc_jax import reset as reset_lib
from lc_jax import results
from lc_jax import schema
from lc_jax import workdir as workdir_lib
from lc_jax.errors import UserError


@dataclasses.dataclass
class Result:
  """The rows of a criticality run (as results.csv's: the original, then each (trial, layer)),
  and, when kept, each image's criticality per (trial, layer)."""

  rows: list[dict[str, Any]]
  per_image: dict[tuple[int, str], np.ndarray] = dataclasses.field(default_factory=dict)

  def summaries(self) -> list[report.stats.LayerSummary]:
    """One summary per layer: the mean over trials, intervals over trials and images."""
    return report.stats.summarize([{**row, 'source': ''} for row in self.rows])

  def criticality(self) -> dict[str, float]:
    """{layer: mean criticality over trials}, in forward order."""
    return {s.layer: s.criticality for s in self.summaries()}

  def table(self, top: int = 10) -> str:
    """The most and least critical layers with their intervals, as text."""
    return report.text.table(self.summaries(), top)

  def to_csv(self, path: str) -> None:
    """Writes the rows as a results.csv (lc_jax.report reads it)."""
    with open(path, 'w', newline='') as f:
      f.write(schema.header())
      f.writelines(schema.format_row(row) for row in self.rows)

  def plot(self, path: str) -> None:
    """The per-layer criticality bar chart with its intervals (PNG, or PDF/SVG by suffix)."""
    report.figures.plot_criticality(self.summaries(), path)


def criticality(model: Any, variables: dict | None, images, labels=None, *,
                layers: str | Sequence[str] = 'conv,linear', pattern: str = '',
                granularity: str = 'layer', mode: str = 'fresh', trials: int = 3,
                key: jax.Array | None = None, batch_size: int = 256, alpha: float = 0.0,
                source: dict | None = None, scheme: str | None = None,
                fresh: Callable[[jax.Array], Any] | None = None, keep_per_image: bool = False,
                model_id: str | None = None, dataset: str = '', workdir: str | None = None,
                progress: bool = False, mesh: jax.sharding.Mesh | None = None) -> Result:
  """How far each selected layer's reset moves the predictions on `images`.

  `images`: an array (N, H, W, C), uint8 (scaled by 1/255) or float (a registered model takes
  [0, 1] and normalises itself; any other model takes them as they are), or an iterable of such
  batches, or of (images, labels) pairs. Other dtypes (int32 0..255 included) are refused: cast
  to uint8. `labels`: integer classes (N,) in [0, the logits' width), for the accuracy columns.
  `layers` are the layer types and `pattern`, `granularity` the selection of
  lc_jax.layers.select. `mode` is a reset mode of lc_jax.reset: fresh and interpolate draw trial
  t's fresh model from fold_in(key, t) (key 0 by default), as run.py does with its seed;
  checkpoint takes its weights from `source`; interpolate keeps `alpha` of the trained weights.
  `scheme` draws fresh layers with an lc_jax.init scheme instead of the model's own initialisers;
  `fresh(key)` makes a fresh NNX model. `keep_per_image` keeps every image's criticality.
  `model_id` labels the rows: by default the architecture's name when `model` is one, else
  'model'; `dataset` names the image set in the rows' dataset column (e.g. 'imagenet_r').

  The loop is run.py's (lc_jax.engine). `workdir=DIR` makes it durable as run.py's: rows are
  appended to DIR/results.csv as they are measured, partial sums saved between batches, the
  folder locked while it runs and DIR/run.json written; a call on the same DIR after an
  interrupt resumes and returns the same rows. It needs the images as one array (their digest
  is part of the run's identity, with the variables' and the settings). `progress=True` shows
  progress on stderr; `mesh` (lc_jax.sharding.make_mesh) places the batches and variables over
  several devices.

  Bad input is one UserError before any work: images that are not (N, H, W, C), of another
  dtype, not finite, or that the model does not run on (channels first, a channel count its
  first layer does not take); labels that are not integer classes of the model, one per image;
  trials or batch_size that are not positive integers; variables without params or with NaN or
  inf; an `apply` that does not give (N, classes) logits. A batch of an iterable is checked as
  it comes, against the first.
  """
  key = jax.random.key(0) if key is None else key
  if not isinstance(dataset, str):
    raise UserError(f"dataset= names the image set for the rows' dataset column: a string such "
                    f"as 'imagenet_r', not {dataset!r}")
  _check_count('trials', trials)
  _check_count('batch_size', batch_size)
  _check_model(model, variables)
  reset_lib.check_mode(mode)
  reset_lib.check_alpha(mode, alpha)
  if mode == 'checkpoint' and source is None:
    raise UserError("mode 'checkpoint' needs the other checkpoint's variables as source=")
  if mode != 'checkpoint' and source is not None:
    raise UserError(f"source= applies to mode 'checkpoint' only, and this call resets in mode "
                    f"{mode!r}: leave it out, or give mode='checkpoint'")
  if workdir is not None and not isinstance(images, (np.ndarray, jax.Array)):
    raise UserError('workdir= needs the images as one array (N, H, W, C): their digest is part '
                    "of the run's identity; an iterable of batches runs without a workdir")
  if model_id is None:
    model_id = model if isinstance(model, str) else 'model'
  batches = _batches(images, labels, batch_size)
  first = next(batches, None)
  if first is None:
    raise UserError('the image set is empty')
  adapted, takes = _adapt(model, variables, first, scheme=scheme, fresh=fresh)
  takes.check(first)
  types = layers.split(',') if isinstance(layers, str) else list(layers)
  targets = reset_lib.targets(adapted.layers, mode, types, pattern, granularity)
  plan = engine.Plan(model_id, targets, mode, trials, alpha, dataset)
  forward = evaluate.Forward(adapted.module, adapted.layers, mesh, apply=adapted.apply)
  placed = forward.replicate(adapted.variables)  # one copy on the devices
  has_labels = first.labels is not None
  num_batches = -(-len(images) // batch_size) if workdir is not None else None

  def host_batches():  # each batch checked as it comes, padded to the devices: one chunk
    for batch in _chain(first, batches):
      if batch is not first:
        takes.check(batch)
        if (batch.labels is not None) != has_labels:
          raise UserError(f'{batch.where} has '
                          f'{"labels" if batch.labels is not None else "no labels"} and batch 0 '
                          f'{"has them" if has_labels else "has none"}: give labels with every '
                          'batch or with none')
      mask = np.ones(len(batch.images), bool)
      yield [batches_lib.pad_batch(batch.images, batch.labels, mask, forward.rows_multiple)]

  def run(store) -> Result:
    walk = engine.Walk(plan, forward, placed, store, has_labels=has_labels,
                       num_batches=num_batches, num_images=len(images) if num_batches else None,
                       show=progress, keep_per_image=keep_per_image)
    # A trial's reset weights go to the devices once (fresh draws are host arrays), not at
    # every reset of every batch.
    resets = {t: reset_lib.make(mode, adapted.layers, alpha=alpha, source=forward.replicate(
        adapted.fresh(jax.random.fold_in(key, t)) if mode in reset_lib.RANDOM_MODES else source))
              for t in walk.pending_trials}
    if walk.needed:
      walk.compile(batches_lib.pad_batch(first.images, first.labels,
                                         np.ones(len(first.images), bool), forward.rows_multiple))
    walk.run(host_batches(), resets)
    return Result(list(store.rows), walk.per_image)

  if workdir is None:
    return run(engine.Memory())
  run_info = {
      'config': {'layers': types, 'pattern': pattern, 'granularity': granularity, 'mode': mode,
                 'trials': plan.num_trials, 'alpha': alpha, 'scheme': scheme,
                 'batch_size': batch_size, 'key': np.asarray(jax.random.key_data(key)).tolist(),
                 'model_id': model_id,
                 # Only when given: a workdir of a call without one keeps its identity.
                 **({'dataset': dataset} if dataset else {})},
      'checkpoint_sha256': models.store.digest(jax.device_get(adapted.variables)),
      'source_sha256': (models.store.digest(jax.device_get(source)) if source is not None
                        else None),
      'images': {'content': _content_digest(images, labels)},
      'targets': [t.name for t in targets], 'model_id': model_id, 'num_images': len(images)}
  with workdir_lib.Lock(workdir):
    store = results.Store(workdir, run_info)
    try:
      return run(store)
    finally:
      store.close()


def _content_digest(images: np.ndarray, labels) -> str:
  """sha256 of the images' shape, dtype and bytes, and of the labels'."""
  hasher = hashlib.sha256()
  for array in (images, labels):
    if array is None:
      hasher.update(b'none')
      continue
    array = np.ascontiguousarray(np.asarray(array))
    hasher.update(f'{array.shape}{array.dtype}'.encode())
    for start in range(0, len(array), _CHUNK):
      hasher.update(array[start:start + _CHUNK].tobytes())
  return hasher.hexdigest()


@dataclasses.dataclass
class _Batch:
  """A batch of images (and labels) with what the checks against the model need. `shape`, `low`,
  `high` and `top_label` are the whole array's when the images came as one (its first batch;
  the later ones are then `checked`), the batch's own when they came as an iterable."""

  images: np.ndarray
  labels: np.ndarray | None
  where: str  # '' for an array, 'batch K' for an iterable's K-th batch
  shape: tuple[int, ...] = ()
  low: float = 0.0  # the smallest and largest value (0 and 255 for uint8)
  high: float = 255.0
  top_label: int | None = None  # the largest label; None without labels
  checked: bool = False

  @property
  def prefix(self) -> str:
    return f'{self.where}: ' if self.where else ''


@dataclasses.dataclass(frozen=True)
class _Takes:
  """What the model takes: images of `channels` channels (`fixed` by the model, or else by the
  first batch), floats in [0, 1] only when `unit` (a registered model normalises them itself),
  and labels below `classes`, the width of its logits."""

  channels: int
  classes: int
  unit: bool
  fixed: bool

  def check(self, batch: _Batch) -> None:
    """Refuses a batch that does not fit the model."""
    if batch.checked:
      return
    _check_channels(batch, self.channels,
                    'the model takes' if self.fixed else 'the first batch has')
    if self.unit and batch.images.dtype != np.uint8 and (batch.low < 0 or batch.high > 1):
      raise UserError(f'{batch.prefix}float images must lie in [0, 1] (the model normalises them '
                      f'itself); these span {batch.low:g}..{batch.high:g}: divide them by 255, or '
                      'give uint8')
    if batch.top_label is not None and batch.top_label >= self.classes:
      raise UserError(f'{batch.prefix}label {batch.top_label} is out of range: the model gives '
                      f'{self.classes} classes (labels 0..{self.classes - 1})')


_CHUNK = 256  # images checked for NaN and inf at a time: the check never copies a whole array
# What tracing a model on images it does not take raises (flax's shape errors, lax's TypeErrors).
_SHAPE_ERRORS = (TypeError, ValueError, IndexError, KeyError, flax.errors.FlaxError)


def _check_count(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise UserError(f'{name} must be a positive integer, got {value!r}')


def _check_model(model: Any, variables: Any) -> None:
  """Refuses what is no model, and a linen model without params."""
  if isinstance(model, nnx.Module):
    return
  if not isinstance(model, (str, nn.Module)):
    raise UserError(f'model must be a registered architecture name, a flax.linen.Module or a '
                    f'flax.nnx.Module, not {type(model).__name__}')
  if not isinstance(variables, Mapping) or not jax.tree.leaves(variables.get('params', {})):
    got = type(variables).__name__ if not isinstance(variables, Mapping) else 'no params'
    raise UserError("a linen model needs its variables, {'params': ...} as module.init or a "
                    f'checkpoint gives them; got {got}')


def _check_finite(variables: dict) -> None:
  """Refuses variables holding NaN or inf, naming the first such leaf."""
  leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
  finite = jax.device_get([jnp.isfinite(v).all() if jnp.issubdtype(jnp.result_type(v),
                                                                      jnp.inexact) else True
                           for _, v in leaves])
  for (path, _), ok in zip(leaves, finite):
    if not ok:
      name = '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)
      raise UserError(f'the variables hold NaN or inf in {name}: the model cannot be measured '
                      'with them')


def _adapt(model: Any, variables: dict | None, first: _Batch, *, scheme: str | None,
           fresh: Callable[[jax.Array], Any] | None) -> tuple[adapters.Adapted, _Takes]:
  """`model` adapted, and what it takes, from tracing it on the first batch (shapes only)."""
  images = first.images
  try:
    adapted = adapters.adapt(model, variables, jnp.asarray(images[:1]), scheme=scheme,
                             fresh=fresh)
    registered = adapted.module is not None
    # A registered model normalises by its per-channel mean: other channel counts would
    # broadcast against it rather than fail.
    channels = len(adapted.module.mean) if registered else images.shape[-1]
    _check_channels(first, channels, 'the model takes')
    example = jax.ShapeDtypeStruct((min(2, len(images)),) + images.shape[1:],
                                   jnp.float32 if images.dtype == np.uint8 else images.dtype)
    logits = jax.eval_shape(adapted.apply, adapted.variables, example)
  except UserError:
    raise
  except _SHAPE_ERRORS as e:
    message = re.sub(r'\s*\(https?://\S+\)', '', str(e).strip()).split('\n')[0]
    raise UserError(f'the model does not run on {first.prefix}images of shape {first.shape} '
                    f'({images.dtype}): {message or type(e).__name__}'
                    f'{_layout_hint(first.shape)}') from e
  if not isinstance(logits, jax.ShapeDtypeStruct):
    raise UserError("the model's apply must give the logits, one (N, classes) array; it returned "
                    f'a {type(logits).__name__}')
  if len(logits.shape) != 2 or logits.shape[0] != example.shape[0] or logits.shape[1] < 2:
    raise UserError("the model's apply must give the logits as (N, classes), N images by at "
                    f'least 2 classes; on images of shape {example.shape} it gave shape '
                    f'{logits.shape}')
  _check_finite(adapted.variables)
  return adapted, _Takes(channels, logits.shape[1], registered, registered)


def _check_channels(batch: _Batch, channels: int, whose: str) -> None:
  found = batch.images.shape[-1]
  if found != channels:
    raise UserError(f'{batch.prefix}images have {found} channel{"s" * (found != 1)}; {whose} '
                    f'{channels}{_layout_hint(batch.shape)}')


def _layout_hint(shape: tuple[int, ...]) -> str:
  if len(shape) == 4 and shape[1] in (1, 3) and shape[3] not in (1, 3):
    return (f' (shape {shape} looks channels first, NCHW: lc_jax takes NHWC, '
            'images.transpose(0, 2, 3, 1))')
  return ''


def _inspect(images, labels, where: str = '') -> _Batch:
  """`images` and `labels` as a _Batch, checked on their own: (N, H, W, C), uint8 or float,
  finite; labels integer classes >= 0, one per image."""
  batch = _Batch(np.asarray(images), None, where)
  images, prefix = batch.images, batch.prefix
  batch.shape = images.shape
  if images.ndim != 4:
    raise UserError(f'{prefix}images have shape {images.shape}; give them as (N, H, W, C), '
                    'channels last')
  if images.dtype != np.uint8:
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise UserError(f'{prefix}images are {images.dtype}: give uint8 (0..255, scaled by 1/255) '
                      'or floats; for values 0..255, images.astype(np.uint8)')
    batch.low, batch.high = math.inf, -math.inf
    for start in range(0, len(images), _CHUNK):
      part = images[start:start + _CHUNK]
      bad = ~np.isfinite(part).reshape(len(part), -1).all(1)
      if bad.any():
        raise UserError(f'{prefix}images hold NaN or inf (image {start + int(np.argmax(bad))} '
                        'first); every value must be finite')
      if part.size:
        batch.low = min(batch.low, float(part.min()))
        batch.high = max(batch.high, float(part.max()))
  if labels is not None:
    labels = np.asarray(labels)
    if labels.ndim != 1:
      raise UserError(f'{prefix}labels must be one class per image, shape ({len(images)},); got '
                      f'shape {labels.shape}')
    if len(labels) != len(images):
      raise UserError(f'{prefix}{len(labels)} labels for {len(images)} images')
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
      raise UserError(f'{prefix}labels must be integer classes, got {labels.dtype}')
    if len(labels):
      if labels.min() < 0:
        raise UserError(f'{prefix}labels must be classes >= 0, got {labels.min()}')
      batch.top_label = int(labels.max())
    batch.labels = labels
  return batch


def _batches(images, labels, batch_size: int) -> Iterator[_Batch]:
  """The batches of an array (checked whole, then cut into batch_size), or of an iterable of
  batches or (images, labels) pairs (each checked as it comes)."""
  if isinstance(images, (np.ndarray, jax.Array)):
    whole = _inspect(images, labels)
    for start in range(0, len(whole.images), batch_size):
      part = slice(start, start + batch_size)
      yield dataclasses.replace(whole, images=whole.images[part], checked=start > 0,
                                labels=None if whole.labels is None else whole.labels[part])
    return
  if labels is not None:
    raise UserError('labels= goes with an array of images; an iterable gives (images, labels) '
                    'pairs')
  for index, batch in enumerate(images):
    if isinstance(batch, tuple):
      if len(batch) != 2:
        raise UserError(f'batch {index} is a tuple of {len(batch)}; give an array of images or '
                        'an (images, labels) pair')
      yield _inspect(batch[0], batch[1], f'batch {index}')
    else:
      yield _inspect(batch, None, f'batch {index}')


def _chain(first, rest):
  yield first
  yield from rest
