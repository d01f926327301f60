"""How far a reset model's predictions moved from the original's, over the same images.

Per batch, `per_image` (jitted) turns the logits of the original model (p = softmax) and of the
reset model (q = softmax) into per-image values; `accumulate` adds them up in float64 on the
host (squares too, so the spread over the images suffers no float32 cancellation) and
`finalize` turns the totals into the paper's metrics:

- top1_acc, top5_acc (%), loss (mean cross-entropy): against the labels, NaN without labels;
- pred_cos_sim: mean cosine similarity of p and q; criticality = 1 - pred_cos_sim, computed
  per image as 0.5 * |p/|p| - q/|q||^2 (equal to 1 - cos, without float32's cancellation near
  cos = 1: exactly 0 for the original, full precision for layers that barely matter);
- pred_l1_err, pred_l2_err: mean L1 and L2 norm of p - q;
- pred_kl_div: mean KL(p || q), from log-softmax (the reference code's "pred_ce_loss" fed raw
  logits as soft targets and came out negative; this replaces it);
- pred_agreement: fraction of images whose top-1 class is unchanged;
- recovered_acc: top1_acc / the original's top1_acc;
- criticality_ci_images: half-width of the 95% normal interval of the mean criticality over
  the images (from the sum of squares: 1.96 * std / sqrt(n)).

With `classes` (ImageNet-R and ImageNet-A: lc_jax.data.shifts) both models' logits are cut to
those classes before the softmax, and labels are positions among them: every metric is then
over the same 200-way distribution, as the sets' authors evaluate them.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from lc_jax.errors import UserError

SUMS = ('count', 'top1', 'top5', 'loss', 'crit', 'crit_sq', 'l1', 'l2', 'kl', 'agree')


@functools.partial(jax.jit, static_argnames='classes')
def per_image(ref_logits: jax.Array, logits: jax.Array | None, labels: jax.Array,
              mask: jax.Array, classes: Sequence[int] | None = None) -> dict[str, jax.Array]:
  """Each image's values ('count' 1) where `mask` is true, 0 elsewhere; labels < 0: no label.

  `logits` None is the original model against itself: every distance is exactly 0 (computing
  q apart from p, XLA may round the two differently, by ~1e-16). `classes` (a tuple of indices
  into the logits, static: one program per list) restricts both models to those classes before
  the softmax; labels are then positions in it."""
  if classes is not None:
    ref_logits = restrict(ref_logits, classes)
    logits = None if logits is None else restrict(logits, classes)
  ref_logits = ref_logits.astype(jnp.float32)
  log_p = jax.nn.log_softmax(ref_logits, axis=-1)
  p = jnp.exp(log_p)
  unit_p = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
  if logits is None:
    logits, log_q, q, unit_q = ref_logits, log_p, p, unit_p
  else:
    logits = logits.astype(jnp.float32)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    q = jnp.exp(log_q)
    unit_q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
  crit = 0.5 * jnp.sum(jnp.square(unit_p - unit_q), -1)  # 1 - cos(p, q)
  kl = jnp.sum(p * (log_p - log_q), -1)

  safe_labels = jnp.maximum(labels, 0)
  label_logit = jnp.take_along_axis(logits, safe_labels[:, None], axis=-1)[:, 0]
  # Classes ranked above the label; ties go to the lower index, as argmax and top-k break them,
  # so an all-equal output (a zeroed classifier) is not counted as correct.
  classes = jnp.arange(logits.shape[-1])
  above = (logits > label_logit[:, None]) | (
      (logits == label_logit[:, None]) & (classes < safe_labels[:, None]))
  rank = jnp.sum(above, axis=-1)
  nll = -jnp.take_along_axis(log_q, safe_labels[:, None], axis=-1)[:, 0]

  values = {
      'count': jnp.ones_like(crit),
      'top1': (rank < 1).astype(jnp.float32),
      'top5': (rank < 5).astype(jnp.float32),
      'loss': nll,
      'crit': crit,
      'l1': jnp.sum(jnp.abs(p - q), -1),
      'l2': jnp.linalg.norm(p - q, axis=-1),
      'kl': kl,
      'agree': (jnp.argmax(logits, -1) == jnp.argmax(ref_logits, -1)).astype(jnp.float32),
  }
  return {k: jnp.where(mask, v, 0.0) for k, v in values.items()}


def restrict(logits: jax.Array, classes: Sequence[int]) -> jax.Array:
  """The logits of `classes` only (indices into the last axis, kept in their order)."""
  if max(classes) >= logits.shape[-1]:
    raise UserError(f'the image set covers classes up to index {max(classes)} of ImageNet-1k, '
                    f'but the model has {logits.shape[-1]} classes; measure it on a set of its '
                    'own classes')
  return jnp.take(logits, jnp.asarray(classes, jnp.int32), axis=-1)


def accumulate(total: dict[str, float] | None, values: dict[str, jax.Array]) -> dict[str, float]:
  """Adds a batch's per-image values to the running totals, in float64 on the host. With several
  processes every process gathers all images' values (a collective: all must call it alike)."""
  if any(not v.is_fully_addressable for v in values.values()):
    values = multihost_utils.process_allgather(values, tiled=True)
  values = {k: np.asarray(v, np.float64) for k, v in jax.device_get(values).items()}
  values['crit_sq'] = values['crit'] ** 2
  sums = {k: float(np.sum(values[k])) for k in SUMS}
  if total is None:
    return sums
  return {k: total[k] + sums[k] for k in SUMS}


def finalize(total: dict[str, float], has_labels: bool,
             original_top1: float | None = None) -> dict[str, float]:
  """The metrics of one evaluation from its totals; `original_top1` gives recovered_acc."""
  n = total['count']
  if n == 0:
    raise ValueError('no image was evaluated')
  nan = float('nan')
  crit = total['crit'] / n
  variance = max(total['crit_sq'] / n - crit * crit, 0.0) * n / max(n - 1, 1)
  top1 = 100 * total['top1'] / n if has_labels else nan
  return {
      'top1_acc': top1,
      'top5_acc': 100 * total['top5'] / n if has_labels else nan,
      'loss': total['loss'] / n if has_labels else nan,
      'pred_cos_sim': 1 - crit,
      'pred_l1_err': total['l1'] / n,
      'pred_l2_err': total['l2'] / n,
      'pred_kl_div': total['kl'] / n,
      'pred_agreement': total['agree'] / n,
      'recovered_acc': (top1 / original_top1 if has_labels and original_top1 else nan),
      'criticality': crit,
      'criticality_ci_images': 1.96 * math.sqrt(variance / n),
  }
