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
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lc_jax import adapters
from lc_jax import config as lc_config
from lc_jax import evaluate
from lc_jax import layers as layers_lib
from lc_jax import metrics
from lc_jax import report
from lc_jax import reset as reset_lib
from lc_jax import schema
from lc_jax.data.loader import pad
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
                model_id: str = 'model') -> Result:
  """How far each selected layer's reset moves the predictions on `images`.

  `images`: an array (N, H, W, C), uint8 (scaled by 1/255) or float (as the model takes it), or
  an iterable of such batches, or of (images, labels) pairs. `labels`: integer classes (N,), for
  the accuracy columns. `layers` are the layer types and `pattern`, `granularity` the selection
  of lc_jax.layers.select. `mode` is a reset mode of lc_jax.reset: fresh and interpolate draw
  trial t's fresh model from fold_in(key, t) (key 0 by default), as run.py does with its seed;
  checkpoint takes its weights from `source`; interpolate keeps `alpha` of the trained weights.
  `scheme` draws fresh layers with an lc_jax.init scheme instead of the model's own initialisers;
  `fresh(key)` makes a fresh NNX model. `keep_per_image` keeps every image's criticality.
  """
  key = jax.random.key(0) if key is None else key
  batches = _batches(images, labels, batch_size)
  first = next(batches, None)
  if first is None:
    raise UserError('the image set is empty')
  adapted = adapters.adapt(model, variables, jnp.asarray(first[0][:1]), scheme=scheme,
                           fresh=fresh)
  types = [t.strip() for t in layers.split(',')] if isinstance(layers, str) else list(layers)
  if mode == 'skip':
    types += [t for t in ('batchnorm', 'layer_scale') if t not in types]
  targets = layers_lib.select(adapted.layers, types, pattern, granularity)
  if mode == 'skip':
    targets = [t for t in targets if any(layer.residual for layer in t.layers)]
  reset_lib.check_mode(mode)
  if mode == 'checkpoint' and source is None:
    raise UserError("mode 'checkpoint' needs the other checkpoint's variables as source=")
  num_trials = trials if mode in lc_config.RANDOM_MODES else 1
  resets = {t: reset_lib.make(mode, adapted.layers, alpha=alpha, source=(
      adapted.fresh(jax.random.fold_in(key, t)) if mode in lc_config.RANDOM_MODES else source))
            for t in range(num_trials)}
  run = _Runner(adapted)
  # Resets grouped by the segment they start from (0 for every one without segments).
  todo: dict[int, list[tuple[int, layers_lib.Target]]] = {}
  for target in targets:
    todo.setdefault(run.start(target), []).extend((t, target) for t in range(num_trials))
  todo = dict(sorted(todo.items()))
  starts = list(todo)

  total, sums, kept, has_labels = None, {}, {}, False
  for batch_images, batch_labels in _chain(first, batches):
    has_labels |= batch_labels is not None
    x, y, mask, count = run.put(batch_images, batch_labels)
    reference = run(adapted.variables, x, 0, None)
    total = metrics.accumulate(total, metrics.per_image(reference, None, y, mask))
    h = run(adapted.variables, x, 0, starts[0])
    for k, next_k in zip(starts, starts[1:] + [None]):
      for trial, target in todo[k]:
        logits = run(resets[trial](adapted.variables, target), h, k, None)
        values = metrics.per_image(reference, logits, y, mask)
        sums[(trial, target.name)] = metrics.accumulate(sums.get((trial, target.name)), values)
        if keep_per_image:
          kept.setdefault((trial, target.name), []).append(np.asarray(values['crit'])[:count])
      if next_k is not None:
        h = run(adapted.variables, h, k, next_k)

  original = metrics.finalize(total, has_labels)
  original['recovered_acc'] = 1.0 if has_labels else float('nan')
  num_images = int(total['count'])
  rows = [schema.row(model_id, num_images, schema.ORIGINAL, 0, 'none', (), original)]
  for target in targets:
    for trial in range(num_trials):
      measured = metrics.finalize(sums[(trial, target.name)], has_labels, original['top1_acc'])
      rows.append(schema.row(model_id, num_images, target.name, trial, mode, target.layers,
                             measured))
  rows = [{**row, 'run_id': 'api'} for row in rows]
  return Result(rows, {k: np.concatenate(v) for k, v in kept.items()})


class _Runner:
  """Runs an adapted model: by segments on the device mesh (prefix reuse) when it has them, else
  its whole jitted apply (segment 0 is then the only one)."""

  def __init__(self, adapted: adapters.Adapted):
    self.forward = (evaluate.Forward(adapted.module, adapted.layers)
                    if adapted.module is not None else None)
    self._apply = jax.jit(adapted.apply)

  def start(self, target: layers_lib.Target) -> int:
    return self.forward.start(target) if self.forward else 0

  def put(self, images: np.ndarray, labels: np.ndarray | None):
    """(images, labels, mask, count) of a batch padded to a multiple of the devices."""
    count = len(images)
    rows = self.forward.rows_multiple if self.forward else 1
    labels = np.full(count, -1, np.int32) if labels is None else np.asarray(labels, np.int32)
    mask = np.ones(count, bool)
    parts = (pad(np.asarray(images), rows), pad(labels, rows, -1), pad(mask, rows, False))
    if self.forward:
      return (*(self.forward.put(p) for p in parts), count)
    return (*(jnp.asarray(p) for p in parts), count)

  def __call__(self, variables: dict, x: jax.Array, start: int, stop: int | None) -> jax.Array:
    if self.forward:
      return self.forward(variables, x, start, stop)
    if start == 0 and stop == 0:
      return x  # the input of segment 0
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) / 255.0
    return self._apply(variables, x)


def _batches(images, labels, batch_size: int) -> Iterable[tuple[np.ndarray, np.ndarray | None]]:
  """(images, labels) batches of an array (cut into batch_size) or of an iterable of batches."""
  if batch_size < 1:
    raise UserError(f'batch_size must be positive, got {batch_size}')
  if isinstance(images, (np.ndarray, jax.Array)):
    images = np.asarray(images)
    if labels is not None and len(labels) != len(images):
      raise UserError(f'{len(labels)} labels for {len(images)} images')
    for start in range(0, len(images), batch_size):
      yield (images[start:start + batch_size],
             None if labels is None else np.asarray(labels)[start:start + batch_size])
    return
  for batch in images:
    if isinstance(batch, tuple):
      yield np.asarray(batch[0]), None if batch[1] is None else np.asarray(batch[1])
    else:
      yield np.asarray(batch), None


def _chain(first, rest):
  yield first
  yield from rest
