"""What the benchmarks share: the calibrated random checkpoint they measure, the generated JPEGs,
and the count of the model FLOPs a criticality run executes against the protocol's minimum.

Imports neither jax nor torch at module level (a benchmark's parent process may need neither).
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import tempfile
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_workdir(benchmark: Callable[[str], None], workdir: str) -> None:
  """Runs `benchmark(folder)` in `workdir` (made if needed, and kept), or without one in a
  temporary folder removed afterwards."""
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    benchmark(os.path.abspath(workdir))
  else:
    with tempfile.TemporaryDirectory() as tmp:
      benchmark(tmp)


def make_checkpoint(path: str, arch: str, seed: int = 0, image_size: int = 224) -> None:
  """The timm `arch` drawn with `seed`, BatchNorm calibrated on smooth random images of
  `image_size`, the head scaled to a trained model's logit spread; its state_dict saved."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  from lc_jax import torch_reference  # pylint: disable=g-import-not-at-top

  torch.manual_seed(seed)
  model = timm.create_model(arch, pretrained=False)
  # Low-frequency noise upsampled (closer to photos than white noise), normalised as the
  # model's input is, so the calibrated statistics fit normalised photos.
  noise = F.interpolate(torch.rand(16, 3, 14, 14), size=image_size, mode='bicubic',
                        align_corners=False)
  mean = torch.tensor(model.pretrained_cfg['mean']).view(1, 3, 1, 1)
  std = torch.tensor(model.pretrained_cfg['std']).view(1, 3, 1, 1)
  images = ((noise.clamp(0, 1) - mean) / std).permute(0, 2, 3, 1)
  torch_reference.calibrated(model, images, seed=seed)
  # timm's random head gives logits of std ~0.3 (softmax ~uniform, every reset looks harmless);
  # scale it to a trained ResNet-50's logit spread (std ~3 over the classes).
  with torch.no_grad():
    logits = model(images.permute(0, 3, 1, 2))
    head = model.get_classifier()
    head.weight.mul_(3.0 / logits.std(-1).mean())
    head.bias.zero_()
  torch.save(model.state_dict(), path)


def make_images(root: str, count: int) -> int:
  """Writes benchmarks/decode.py's `count` JPEGs into `root`; returns their total bytes.

  A child process writes them: importing decode here would define its absl flags (--num_images)
  a second time.
  """
  out = subprocess.run(
      [sys.executable, '-c', 'import sys; from benchmarks import decode; '
       'print(decode.make_images(sys.argv[1], int(sys.argv[2])))', root, str(count)],
      cwd=ROOT, capture_output=True, text=True, check=False)
  if out.returncode:
    lines = out.stderr.strip().splitlines()
    raise RuntimeError(f'writing the images failed: {lines[-1] if lines else out.returncode}')
  return int(out.stdout.split()[-1])


def layer_flops(arch: str, image_size: int = 224) -> list[tuple[str, int]]:
  """(torch module name, FLOPs per image of `image_size`) of every Conv2d and Linear of the timm
  `arch`, in forward order: 2 * MACs, counted with forward hooks."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  model = timm.create_model(arch, pretrained=False).eval()
  found = []

  def hook(name):
    def count(module, unused_inputs, output):
      if isinstance(module, torch.nn.Conv2d):
        kh, kw = module.kernel_size
        macs = output.numel() * module.in_channels // module.groups * kh * kw
      else:
        macs = output.numel() * module.in_features
      found.append((name, 2 * macs))
    return count

  for name, module in model.named_modules():
    if type(module) in (torch.nn.Conv2d, torch.nn.Linear):
      module.register_forward_hook(hook(name))
  with torch.no_grad():
    model(torch.zeros(1, 3, image_size, image_size))
  return found


def segments_of(arch: str) -> dict[str, str]:
  """{layer name: the segment (block) lc-jax runs it in} of a registered architecture; torch
  module names are the layer names."""
  from lc_jax import layers, models  # pylint: disable=g-import-not-at-top
  spec = models.get(arch)
  return {layer.name: layer.block for layer in layers.inventory(spec.create(), spec.block_depth)}


def run_flops(flops: list[tuple[str, int]], trials: int, selected: list[str] | None = None,
              arch: str = 'resnet50') -> dict[str, int]:
  """Model FLOPs per image of a run that resets each `selected` layer (default: every layer of
  `flops`, the Conv2d and Linear layers of `arch` in forward order) in each of `trials`:

  - 'full': one forward;
  - 'ours': ours with prefix reuse: the original, the walk up to the last reset layer's block,
    and per reset the forward from the reset layer's block on;
  - 'whole': one forward for the original and one per reset (no prefix reuse; the paper's);
  - 'minimum': what the protocol needs: the original, and per reset the forward from the reset
    layer itself on.
  """
  names = [n for n, _ in flops]
  selected = names if selected is None else selected
  segment = segments_of(arch)
  block_of = lambda name: segment.get(name, 'head')
  full = sum(f for _, f in flops)
  blocks = []  # blocks in forward order with their FLOPs
  for name, f in flops:
    if not blocks or blocks[-1][0] != block_of(name):
      blocks.append([block_of(name), 0])
    blocks[-1][1] += f
  first = {b: i for i, (b, _) in enumerate(blocks)}
  from_block = [sum(f for _, f in blocks[i:]) for i in range(len(blocks))]
  from_layer = [sum(f for _, f in flops[i:]) for i in range(len(flops))]
  last = max(first[block_of(n)] for n in selected)
  walk = sum(f for _, f in blocks[:last])
  resets = sum(from_block[first[block_of(n)]] for n in selected)
  return {'full': full, 'ours': full + walk + trials * resets,
          'whole': (1 + trials * len(selected)) * full,
          'minimum': full + trials * sum(from_layer[names.index(n)] for n in selected)}


def version(package: str) -> str:
  """The installed version of `package`, or 'not installed'."""
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'
