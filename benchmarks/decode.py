r"""Decode throughput and cache load time of the image pipeline, on generated ImageNet-like JPEGs.

    python benchmarks/decode.py --num_images=300

Writes NUM_IMAGES JPEGs (crops of scikit-image's photos at ImageNet's common sizes, 500x375,
375x500, 500x333, ..., quality 95) into an ImageFolder in a temporary directory, then prints:
images/s decoding and preprocessing (Resize(256), CenterCrop(224)) with one thread and with
--workers threads, the time to open the cache of the same images and to read it all into memory,
and, when torchvision is installed, its ImageFolder pipeline on one core, which the reference
code repeats for every evaluation.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lc_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from lc_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position

_NUM_IMAGES = flags.DEFINE_integer('num_images', 300, 'JPEGs to generate and decode.')
_WORKERS = flags.DEFINE_integer('workers', 0, 'Decoding threads; 0: one per CPU core.')

# ImageNet's most common (width, height), roughly by frequency, and a few large ones.
SIZES = ((500, 375), (500, 375), (500, 375), (375, 500), (500, 333), (333, 500), (500, 500),
         (500, 400), (640, 480), (1024, 768))


def make_images(root: str, count: int) -> int:
  """Writes `count` JPEGs into 10 class folders under `root`; returns their total bytes."""
  photos = [np.asarray(data.load_rgb(os.path.join(data.sources.photo_dir(), f)))
            for f in ('astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg',
                      'motorcycle_left.png', 'hubble_deep_field.jpg', 'retina.jpg')]
  rng = np.random.default_rng(0)
  total = 0
  for i in range(count):
    photo = photos[i % len(photos)]
    width, height = SIZES[rng.integers(len(SIZES))]
    # A random crop of about the target's aspect ratio, scaled to the target size.
    scale = rng.uniform(0.6, 1.0)
    crop_h = int(min(photo.shape[0], photo.shape[1] * height / width) * scale)
    crop_w = int(crop_h * width / height)
    top = rng.integers(photo.shape[0] - crop_h + 1)
    left = rng.integers(photo.shape[1] - crop_w + 1)
    image = Image.fromarray(photo[top:top + crop_h, left:left + crop_w]).resize((width, height))
    path = os.path.join(root, f'n{i % 10:08d}', f'ILSVRC2012_val_{i + 1:08d}.JPEG')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, quality=95)
    total += os.path.getsize(path)
  return total


def torchvision_rate(root: str) -> float | None:
  """Images/s of torchvision's ImageFolder + Resize + CenterCrop + ToTensor on one core."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torchvision import datasets  # pylint: disable=g-import-not-at-top
    from torchvision import transforms  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.set_num_threads(1)  # as in a DataLoader worker
  dataset = datasets.ImageFolder(root, transform=transforms.Compose(
      [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]))
  start = time.perf_counter()
  for i in range(len(dataset)):
    dataset[i]  # pylint: disable=pointless-statement
  return len(dataset) / (time.perf_counter() - start)


@errors.exits_cleanly
def main(argv):
  del argv
  count = _NUM_IMAGES.value
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(tmp, 'val')
    size = make_images(root, count)
    print(f'{count} JPEGs, {size / count / 1024:.0f} KiB each on average, in {root}')
    config = data.default_config(source='imagefolder', path=root, num_images=0, batch_size=100)
    workers = _WORKERS.value or len(os.sched_getaffinity(0))
    for threads in sorted({1, workers}):
      config.workers = threads
      _, _, info = data.load(config, cache_dir=os.path.join(tmp, f'cache{threads}'),
                             progress=False)
      print(f'decode + preprocess, {threads} thread(s): {count / info.seconds:.0f} images/s '
            f'({info.seconds:.2f} s)')
    start = time.perf_counter()
    images, _, info = data.load(config, cache_dir=os.path.join(tmp, f'cache{workers}'),
                                progress=False)
    opened = time.perf_counter() - start
    in_memory = np.array(images)
    read = time.perf_counter() - start
    assert info.cache_hit
    print(f'cache hit: opened in {opened * 1000:.1f} ms (listing and fingerprinting the folder '
          f'included), all {in_memory.nbytes / 2**20:.0f} MiB read in {read * 1000:.1f} ms '
          f'({count / read:.0f} images/s)')
    rate = torchvision_rate(root)
    if rate is not None:
      print(f'torchvision ImageFolder + Resize + CenterCrop + ToTensor, 1 core: '
            f'{rate:.0f} images/s (the reference decodes again for each of ~108 evaluations)')


if __name__ == '__main__':
  app.run(main)
