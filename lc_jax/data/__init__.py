"""Images for criticality runs: sources, torchvision-exact preprocessing, the paper's subset, a
decode-once cache, and per-host batches.

    images, labels, info = lc_jax.data.load(config.data, cache_dir=DIR,
                                            process_index=0, process_count=1)
    for batch, batch_labels, mask in lc_jax.data.batches(images, labels, info):
      ...  # uint8 NHWC; lc_jax.batches.to_unit scales it, the model normalises

Sources: 'imagefolder' (a directory in torchvision's ImageFolder layout, like ImageNet val),
'tfds' (imagenet2012 validation, or any tfds image classification dataset; needs the tfds
extra) and 'photos' (scikit-image's real photos, no labels). The defaults of DataConfig are the
paper's protocol: 10,000 images in the order of a DataLoader shuffled with seed 0, Resize(256),
CenterCrop(224).
"""

from lc_jax.batches import chunk_rows
from lc_jax.data.cache import default_dir as default_cache_dir
from lc_jax.data.config import DataConfig
from lc_jax.data.config import default_config
from lc_jax.data.loader import batches
from lc_jax.data.loader import chunks
from lc_jax.data.loader import DataInfo
from lc_jax.data.loader import load
from lc_jax.data.preprocess import load_rgb
from lc_jax.data.preprocess import Transform
from lc_jax.data.sources import IMG_EXTENSIONS
from lc_jax.data.sources import ImageFolder
from lc_jax.data.sources import Listing
from lc_jax.data.sources import open_source
from lc_jax.data.sources import Photos
from lc_jax.data.sources import PHOTOS
from lc_jax.data.sources import Source
from lc_jax.data.sources import Tfds
from lc_jax.data.subset import host_positions
from lc_jax.data.subset import select
from lc_jax.data.subset import torch_order
