"""A tiny image dataset for the examples: 16x16 noisy stripes in four orientations (the class).

    images, labels = stripes.dataset(256, seed=0)    # float32 (N, 16, 16, 3) in [0, 1], int32
"""

import numpy as np

SIZE = 16
CLASSES = 4  # horizontal, vertical, diagonal, anti-diagonal stripes


def dataset(count: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`count` images with random phase, period, colour and noise, and their classes."""
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:SIZE, :SIZE]
  labels = rng.integers(0, CLASSES, count).astype(np.int32)
  images = np.empty((count, SIZE, SIZE, 3), np.float32)
  for i, label in enumerate(labels):
    coordinate = (rows, cols, rows + cols, rows - cols)[label]
    period = rng.uniform(3, 6)
    wave = 0.5 + 0.5 * np.sin(2 * np.pi * coordinate / period + rng.uniform(0, 2 * np.pi))
    colour = rng.uniform(0.3, 1.0, 3)
    images[i] = np.clip(wave[..., None] * colour + rng.normal(0, 0.15, (SIZE, SIZE, 3)), 0, 1)
  return images, labels
