"""Torch reference models for tests: random weights with non-default BatchNorm, made here."""

from __future__ import annotations

import torch


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
