"""Which images, in which order, and which of them each host reads.

    select(50000, 10000, seed=0, order='torch')   # the paper's 10,000 ImageNet val images

`order='torch'` is the order in which `DataLoader(dataset, shuffle=True,
generator=torch.Generator().manual_seed(seed))` yields the dataset, computed without torch:
creating its iterator draws one int64 from the generator (the base seed for worker processes,
drawn even with no workers) before the RandomSampler's `randperm(N)` on the same generator.
torch's CPU generator is MT19937 seeded as numpy's legacy `RandomState(seed)` is (a stream numpy
keeps stable), and its `randperm` is a Fisher-Yates pass that swaps position i with
i + (draw mod (N - i)) (for N below 2^32 / 20, where torch switches to 64-bit draws); the tests
check the result against torch's DataLoader.
`order='numpy'` is `np.random.default_rng(seed).permutation(N)`; `order='sorted'` is source order.
"""

from __future__ import annotations

import numpy as np

from lc_jax import errors
from lc_jax.data.config import ORDERS
from lc_jax.errors import UserError


def torch_order(num_total: int, seed: int) -> np.ndarray:
  """The reference DataLoader's shuffled order of `num_total` images (int64 indices)."""
  # 32-bit MT19937 outputs: randint over the whole uint32 range returns them unchanged.
  if num_total >= 2**32 // 20:
    raise UserError(f'order=torch is reproduced for fewer than {2**32 // 20} images, not '
                    f'{num_total}; use order=numpy or order=sorted')
  draws = np.random.RandomState(int(seed) % 2**32).randint(
      0, 2**32, size=2 + max(num_total - 1, 0), dtype=np.uint32).astype(np.int64)
  # The first two make the iterator's int64 base seed; randperm(N) uses one per step.
  offsets = draws[2:] % np.arange(num_total, 1, -1)
  order = list(range(num_total))
  for i, offset in enumerate(offsets.tolist()):
    j = i + offset
    order[i], order[j] = order[j], order[i]
  return np.array(order, np.int64)


def order(num_total: int, seed: int, kind: str) -> np.ndarray:
  """All `num_total` source indices in the order `kind` ('torch', 'numpy' or 'sorted') gives."""
  if kind == 'torch':
    return torch_order(num_total, seed)
  if kind == 'numpy':
    return np.random.default_rng(seed).permutation(num_total)
  if kind == 'sorted':
    return np.arange(num_total)
  raise errors.unknown('image order', kind, ORDERS)


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
