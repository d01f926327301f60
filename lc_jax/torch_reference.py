"""The paper's layer-criticality loop in plain PyTorch: the reference the JAX code is checked against.

Small on purpose and independent of the JAX code (it imports only torch, numpy and the shared
input constants), so that a disagreement between the two points at one of them rather than at
shared code. It follows the protocol of Gavrikov et al. 2024 (see the README) without the
reference code's defects:

- the trained weights are backed up once as real copies (clones), not the shallow CPU copy that
  let resets pile up from layer to layer, and restored before every reset and at the end;
- KL(p || q) and top-1 agreement replace the reference code's negative "pred_ce_loss";
- the images are preprocessed once by the caller (uint8 NHWC) and reused for every evaluation.

    rows = run_protocol(model, fresh_state_dicts, images, labels, ['conv1', 'fc'],
                        mean=IMAGENET_MEAN, std=IMAGENET_STD)  # from lc_jax.constants

`calibrated(model, images)` gives a randomly drawn torch model BatchNorm statistics and affine
parameters that matter, for parity checks and benchmarks without trained weights.

Metric names and meanings are those of `lc_jax.metrics`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from lc_jax.constants import NO_MEAN
from lc_jax.constants import NO_STD
from lc_jax.constants import PIXEL_MAX

MODES = ('fresh', 'zero')


def _model_device(model: torch.nn.Module) -> torch.device:
  for tensor in model.parameters():
    return tensor.device
  return torch.device('cpu')


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, mean: Sequence[float] | None,
             std: Sequence[float] | None, batch_size: int) -> torch.Tensor:
  """The model's logits (N, C), float32 on the CPU, for uint8 NHWC `images`.

  Each batch is scaled to [0, 1], normalised with the model's `mean`/`std` (None: no
  normalisation, as for models that take raw [0, 1] input) and laid out NCHW. The model runs in
  eval mode; its previous train/eval mode is put back afterwards.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  device = _model_device(model)
  # Per-channel constants shaped for NCHW broadcasting.
  mean_t = torch.tensor(mean if mean is not None else NO_MEAN, dtype=torch.float32,
                        device=device).view(1, 3, 1, 1)
  std_t = torch.tensor(std if std is not None else NO_STD, dtype=torch.float32,
                       device=device).view(1, 3, 1, 1)
  was_training = model.training
  model.eval()
  try:
    outputs = []
    for start in range(0, len(images), batch_size):
      # A copy: the images may be read-only (a memory-mapped cache), which torch warns about.
      batch = torch.from_numpy(np.array(images[start:start + batch_size]))
      x = batch.to(device).permute(0, 3, 1, 2).to(torch.float32) / PIXEL_MAX
      x = (x - mean_t) / std_t
      outputs.append(model(x).to(torch.float32).cpu())
  finally:
    model.train(was_training)
  if not outputs:
    raise ValueError('no image to evaluate')
  return torch.cat(outputs)


def metrics(ref_logits: torch.Tensor | np.ndarray, logits: torch.Tensor | np.ndarray,
            labels: torch.Tensor | np.ndarray | None = None,
            original_top1: float | None = None) -> dict[str, float]:
  """The metrics of one evaluation: `logits` (reset model) against `ref_logits` (original).

  Per image everything is computed in float32, with log_softmax wherever a log is taken (as
  `lc_jax.metrics.per_image` does); the means over the images are taken in float64 (as its
  host-side accumulation does), so that at 10,000 images the two differ by float32 rounding of
  single images only. Label metrics (top1_acc, top5_acc, loss, recovered_acc) are NaN without
  `labels`; recovered_acc also needs `original_top1` (the original's top1_acc).
  """
  ref_logits = torch.as_tensor(ref_logits).detach().to('cpu', torch.float32)
  logits = torch.as_tensor(logits).detach().to('cpu', torch.float32)
  if ref_logits.shape != logits.shape or logits.ndim != 2:
    raise ValueError(f'logits must both be (N, C), got {tuple(ref_logits.shape)} and '
                     f'{tuple(logits.shape)}')
  n, num_classes = logits.shape
  if n == 0:
    raise ValueError('no image was evaluated')

  log_p = F.log_softmax(ref_logits, dim=-1)
  log_q = F.log_softmax(logits, dim=-1)
  p, q = log_p.exp(), log_q.exp()
  cos = F.cosine_similarity(p, q, dim=-1)
  per_image = {
      'pred_cos_sim': cos,
      'pred_l1_err': (p - q).abs().sum(-1),
      'pred_l2_err': torch.linalg.vector_norm(p - q, dim=-1),
      'pred_kl_div': (p * (log_p - log_q)).sum(-1),
      'pred_agreement': (ref_logits.argmax(-1) == logits.argmax(-1)).to(torch.float32),
  }
  out = {k: v.to(torch.float64).mean().item() for k, v in per_image.items()}

  nan = float('nan')
  if labels is None:
    out.update(top1_acc=nan, top5_acc=nan, loss=nan)
  else:
    labels = torch.as_tensor(labels).to('cpu', torch.long)
    if labels.shape != (n,):
      raise ValueError(f'expected {n} labels, got shape {tuple(labels.shape)}')
    # Fewer than 5 classes (toy tests): every class is in the top 5.
    top5 = torch.topk(logits, min(5, num_classes), dim=-1).indices
    hits = top5 == labels[:, None]
    out['top1_acc'] = 100 * hits[:, 0].to(torch.float64).mean().item()
    out['top5_acc'] = 100 * hits.any(-1).to(torch.float64).mean().item()
    out['loss'] = F.cross_entropy(logits, labels, reduction='none').to(torch.float64).mean().item()
  out['recovered_acc'] = (out['top1_acc'] / original_top1
                          if labels is not None and original_top1 else nan)
  out['criticality'] = 1 - out['pred_cos_sim']
  # Sample standard deviation, as `lc_jax.metrics.finalize` computes it (0 for a single image).
  std = cos.to(torch.float64).std().item() if n > 1 else 0.0
  out['criticality_ci_images'] = 1.96 * std / math.sqrt(n)
  return out


def _clone_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
  """A backup of the model's state_dict that shares no memory with the model."""
  backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
  # The reference code's backup aliased the live weights on CPU, so every reset stayed in the
  # model; refuse to go on if any backup tensor shares storage with a live one.
  live = {t.untyped_storage().data_ptr() for t in model.state_dict().values() if t.numel()}
  shared = [k for k, v in backup.items() if v.numel() and v.untyped_storage().data_ptr() in live]
  if shared:
    raise RuntimeError(f'the weight backup aliases the model: {shared[:4]}')
  return backup


def _restore(model: torch.nn.Module, backup: Mapping[str, torch.Tensor]) -> None:
  # load_state_dict copies into the live tensors, so the backup itself is never modified and
  # can serve every restore.
  model.load_state_dict(backup, strict=True)


def _tensors(model: torch.nn.Module, layer_name: str) -> dict[str, torch.Tensor]:
  """The parameters and buffers of layer `layer_name` by state_dict key: a module's, or a
  free-standing parameter's (a ViT's ``cls_token``, a ConvNeXt block's ``gamma``). A name that
  is neither raises AttributeError."""
  try:
    module = model.get_submodule(layer_name)
  except AttributeError:
    return {layer_name: model.get_parameter(layer_name)}
  return {f'{layer_name}.{name}': tensor
          for name, tensor in module.state_dict(keep_vars=True).items()}


@torch.no_grad()
def _load_fresh(model: torch.nn.Module, layer_name: str, fresh: Mapping[str, Any]) -> None:
  """Overwrites the parameters and buffers of layer `layer_name` with those in `fresh`."""
  missing, wrong = [], []
  for key, tensor in _tensors(model, layer_name).items():
    if key not in fresh:
      # num_batches_tracked only steers momentum in training; fresh trees converted from Flax
      # do not have it and it cannot change an eval-mode forward.
      if not key.endswith('num_batches_tracked'):
        missing.append(key)
      continue
    value = fresh[key]
    # np.array copies: arrays handed over from JAX are read-only, which torch warns about.
    value = value if torch.is_tensor(value) else torch.from_numpy(np.array(value))
    if tuple(value.shape) != tuple(tensor.shape):
      wrong.append(f'{key} {tuple(value.shape)} != {tuple(tensor.shape)}')
      continue
    tensor.copy_(value.to(tensor.device, tensor.dtype))
  if missing or wrong:
    raise KeyError(f'fresh state_dict does not fit {layer_name!r}: missing {missing}, '
                   f'wrong shapes {wrong}')


@torch.no_grad()
def _zero(model: torch.nn.Module, layer_name: str) -> None:
  """Sets the learnable parameters of layer `layer_name` to zero; buffers are kept."""
  for tensor in _tensors(model, layer_name).values():
    if isinstance(tensor, torch.nn.Parameter):
      tensor.zero_()


def run_protocol(model: torch.nn.Module, fresh_state_dicts: Sequence[Mapping[str, Any]] | None,
                 images: np.ndarray, labels: np.ndarray | None, layer_names: Sequence[str],
                 mean: Sequence[float] | None, std: Sequence[float] | None,
                 batch_size: int = 500, mode: str = 'fresh') -> list[dict[str, Any]]:
  """The paper's loop: every layer of `layer_names` reset in turn, trial by trial.

  A layer is a torch module name, or the name of a free-standing parameter (a ViT's
  ``pos_embed``). For trial t and each layer: the trained weights are restored, the layer is reset (mode
  'fresh': its parameters and buffers, BatchNorm running statistics included, are taken from
  `fresh_state_dicts[t]`, a full state_dict of torch tensors or numpy arrays such as
  `converters.mapping.to_state_dict` returns; mode 'zero': its parameters are zeroed and its
  buffers kept), the full forward runs over all `images` and the metrics are taken against the
  original logits, computed once at the start. In mode 'zero' `fresh_state_dicts` only sets the
  number of trials (None: one trial).

  Returns the rows {'layer', 'trial', **metrics}, the original's own row first
  ({'layer': 'original', 'trial': 0}). The model is left with its trained weights, also when
  an error interrupts the loop.
  """
  if mode not in MODES:
    raise ValueError(f'unknown mode {mode!r}; choose from {", ".join(MODES)}')
  if mode == 'fresh' and not fresh_state_dicts:
    raise ValueError("mode 'fresh' needs one fresh state_dict per trial")
  trials = list(fresh_state_dicts) if fresh_state_dicts else [None]
  for name in layer_names:
    _tensors(model, name)  # fail before any work on a name that does not exist

  backup = _clone_state(model)
  ref_logits = evaluate(model, images, mean, std, batch_size)
  original = metrics(ref_logits, ref_logits, labels)
  original['recovered_acc'] = 1.0 if labels is not None and original['top1_acc'] else math.nan
  rows = [{'layer': 'original', 'trial': 0, **original}]
  try:
    for trial, fresh in enumerate(trials):
      for name in layer_names:
        _restore(model, backup)
        if mode == 'fresh':
          _load_fresh(model, name, fresh)
        else:
          _zero(model, name)
        logits = evaluate(model, images, mean, std, batch_size)
        rows.append({'layer': name, 'trial': trial,
                     **metrics(ref_logits, logits, labels, original['top1_acc'])})
  finally:
    _restore(model, backup)
  return rows


def calibrated(model: torch.nn.Module, images, seed: int = 0) -> torch.nn.Module:
  """`model` in eval mode with BatchNorm affine parameters and running statistics that matter.

  Affine parameters are drawn away from their defaults (timm's zero-initialised last BN of
  each block included), then running statistics are calibrated on `images` (NHWC in [0, 1],
  the images the test will use, so activations keep a trained network's scale), so a mapping
  that mixed up mean, var, scale or bias would show.
  """
  generator = torch.Generator().manual_seed(seed)
  # As in trained ResNets, the last BN of a residual branch scales it down, which keeps the
  # residual stream (and the logits) at a trained network's scale.
  last_of_branch = {id(getattr(m, 'bn3', None) or m.bn2) for m in model.modules()
                    if hasattr(m, 'conv2') and hasattr(m, 'bn2')}
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        low, high = (0.05, 0.25) if id(module) in last_of_branch else (0.2, 1.0)
        module.weight.copy_(low + (high - low) * torch.rand(module.weight.shape,
                                                            generator=generator))
        module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.1)
        module.reset_running_stats()
        module.momentum = None  # running statistics = the calibration batch's statistics
    model.train()
    batch = torch.as_tensor(images).permute(0, 3, 1, 2)
    model(torch.cat([batch, batch.flip(3)]))
  return model.eval()
