"""The metrics of lc_jax.metrics computed plainly in float64 numpy, image by image: the tests' yardstick."""

import numpy as np


def numpy_reference(ref_logits: np.ndarray, logits: np.ndarray,
                    labels: np.ndarray | None) -> dict[str, float]:
  """The same metrics computed plainly in float64 numpy, image by image (for tests)."""
  def softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  p, q = softmax(ref_logits), softmax(logits)
  cos = (p * q).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(q, axis=-1))
  out = {'pred_cos_sim': cos.mean(), 'pred_l1_err': np.abs(p - q).sum(-1).mean(),
         'pred_l2_err': np.linalg.norm(p - q, axis=-1).mean(),
         'pred_kl_div': (p * (np.log(p) - np.log(q))).sum(-1).mean(),
         'pred_agreement': (p.argmax(-1) == q.argmax(-1)).mean(),
         'criticality': (1 - cos).mean()}
  if labels is not None:
    top5 = np.argsort(-logits, -1)[:, :5]
    out['top1_acc'] = 100 * (logits.argmax(-1) == labels).mean()
    out['top5_acc'] = 100 * (top5 == labels[:, None]).any(-1).mean()
    out['loss'] = -np.log(q[np.arange(len(labels)), labels]).mean()
  return {k: float(v) for k, v in out.items()}
