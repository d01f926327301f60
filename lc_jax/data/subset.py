"""Which images, in which order, and which of them each host reads.

    select(50000, 10000, seed=0, order='torch')   # the paper's 10,000 ImageNet val images

`order='torch'` is the order in which `DataLoader(dataset, shuffle=True,
generator=torch.Generator().manual_seed(seed))` yields the dataset: creating its iterator draws
one int64 from the generator (the base seed for worker processes, drawn even with no workers)
before the RandomSampler's `randperm(N)` on the same generator. The order for N = 50,000 and seed 0
(ImageNet val, the paper's setting) ships with the package, so torch is needed only for others.
`order='numpy'` is `np.random.default_rng(seed).permutation(N)`; `order='sorted'` is source order.
"""

from __future__ import annotations

import os

import numpy as np

from lc_jax.errors import UserError

_SHIPPED_TORCH_ORDERS = {(50000, 0): 'torch_order_n50000_seed0.npz'}


def _shipped_path(num_total: int, seed: int) -> str | None:
  """The file holding the shipped torch order for (num_total, seed), if one ships."""
  name = _SHIPPED_TORCH_ORDERS.get((num_total, seed))
  return None if name is None else os.path.join(os.path.dirname(__file__), name)


def torch_order(num_total: int, seed: int, use_shipped: bool = True) -> np.ndarray:
  """The reference DataLoader's shuffled order of `num_total` images (int64 indices)."""
  path = _shipped_path(num_total, seed) if use_shipped else None
  if path is not None:
    with np.load(path) as shipped:
      return shipped['order'].astype(np.int64)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f'data.order=torch for {num_total} images and seed {seed} needs PyTorch '
                    '(only 50000 images, seed 0 ship precomputed): pip install "lc-jax[torch]", '
                    'or set data.order=numpy or data.order=sorted') from None
  generator = torch.Generator().manual_seed(seed)
  # The DataLoader iterator's _base_seed, drawn before the sampler runs.
  torch.empty((), dtype=torch.int64).random_(generator=generator)
  return torch.randperm(num_total, generator=generator).numpy()


def order(num_total: int, seed: int, kind: str) -> np.ndarray:
  """All `num_total` source indices in the order `kind` ('torch', 'numpy' or 'sorted') gives."""
  if kind == 'torch':
    return torch_order(num_total, seed)
  if kind == 'numpy':
    return np.random.default_rng(seed).permutation(num_total)
  if kind == 'sorted':
    return np.arange(num_total)
  raise UserError(f"unknown image order {kind!r}; use 'torch', 'numpy' or 'sorted'")


def subset_size(num_total: int, num_images: int, where: str) -> int:
  """How many images a subset of `num_images` (0: all) out of `num_total` holds.

  Asking for more images than the source has is an error, not a silent clamp: the results would
  not be comparable with a run that got them all.
  """
  if num_images > num_total:
    raise UserError(f'asked for {num_images} images (data.num_images) but {where} holds only '
                    f'{num_total}; set data.num_images={num_total} or 0 to use them all')
  return num_images or num_total


def select(num_total: int, num_images: int, seed: int, kind: str) -> np.ndarray:
  """Source indices of the subset, in subset order: the first `num_images` (0: all) of `order`."""
  return order(num_total, seed, kind)[:subset_size(num_total, num_images, 'the source')]


def num_batches(num_images: int, batch_size: int) -> int:
  """Global batches needed for `num_images`; the last one may be partial."""
  return -(-num_images // batch_size)


def host_positions(num_images: int, batch_size: int, process_index: int,
                   process_count: int) -> np.ndarray:
  """Subset positions that host `process_index` of `process_count` reads, in order.

  Global batch k holds subset positions [k * batch_size, (k + 1) * batch_size), the reference's
  batch k; each host reads its own contiguous part of batch_size / process_count positions of every
  batch, so the hosts together read every image once. Hosts whose part of the last batch is
  short or empty get fewer positions; `batches` pads them so every host runs the same steps.
  """
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f'process_index {process_index} is not in [0, process_count={process_count})')
  if batch_size % process_count:
    raise UserError(f'data.batch_size={batch_size} does not split evenly over {process_count} '
                    'hosts; make it a multiple of the host count')
  local = batch_size // process_count
  starts = np.arange(num_batches(num_images, batch_size)) * batch_size + process_index * local
  positions = (starts[:, None] + np.arange(local)[None, :]).ravel()
  return positions[positions < num_images]
