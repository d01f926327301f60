"""The `config.data` settings: which images, how many, in which order, at which size.

    config.data = lc_jax.data.default_config(source='photos', num_images=0, order='sorted')

Fields (DataConfig): source ('imagefolder', 'tfds' or 'photos'); path (the ImageFolder root, or the
tfds data_dir, empty for tfds's default); name and split (the tfds dataset, any image classification
dataset, ImageNet's shifted sets among them (lc_jax.data.shifts); an empty split is the set's
evaluation split, filled in by `from_config`; for an ImageFolder, name says which set it holds: the
results' dataset column, and imagenet_r or imagenet_a restrict to their classes); num_images (0:
all); batch_size (global, over all hosts); seed and order ('torch': the reference DataLoader's
shuffle, 'numpy': a numpy permutation, 'sorted': source order); resize_size and crop_size; on_error
('raise', or 'skip' to mask out images that do not decode); workers (decoding threads, 0: one per
CPU core).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import ml_collections

from lc_jax import errors
from lc_jax import schema
from lc_jax.data import shifts
from lc_jax.errors import UserError

SOURCES = ('imagefolder', 'tfds', 'photos')
ORDERS = ('torch', 'numpy', 'sorted')
ON_ERROR = ('raise', 'skip')


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Settings of the image pipeline; the defaults are the paper's protocol."""

  source: str = 'imagefolder'
  path: str = ''
  name: str = schema.IMAGENET_VAL
  split: str = ''  # the set's evaluation split (shifts.split): validation for imagenet2012
  num_images: int = 10000
  batch_size: int = 500
  seed: int = 0
  order: str = 'torch'
  resize_size: int = 256
  crop_size: int = 224
  on_error: str = 'raise'
  workers: int = 0

  def __post_init__(self):
    for field, choices in (('source', SOURCES), ('order', ORDERS), ('on_error', ON_ERROR)):
      if getattr(self, field) not in choices:
        raise errors.unknown(f'data.{field}', getattr(self, field), choices)
    for field in ('num_images', 'batch_size', 'seed', 'workers', 'resize_size', 'crop_size'):
      value = getattr(self, field)
      positive = field in ('batch_size', 'resize_size', 'crop_size')
      if (isinstance(value, bool) or not isinstance(value, int) or value < 0
          or (positive and value == 0)):
        raise UserError(f'data.{field} must be a {"positive" if positive else "non-negative"} '
                        f'integer, got {value!r}')
    if ',' in self.name:
      raise UserError(f'data.name={self.name} lists several image sets; a run measures one: '
                      'python -m lc_jax.sweep with the same --config.data.name runs each into '
                      'a folder of its own')
    if self.source == 'photos' and self.name != DataConfig.name:
      raise UserError(f'data.name={self.name} names an image set, but data.source=photos reads '
                      "scikit-image's photos; add --config.data.source=tfds (or imagefolder "
                      'with data.path)')

  @classmethod
  def from_config(cls, config: DataConfig | Mapping[str, Any] | ml_collections.ConfigDict
                  ) -> DataConfig:
    """A DataConfig from a ConfigDict or mapping; a field it does not know is an error (a typo).
    An empty split becomes the set's own (shifts.split), so a run's recorded settings name it."""
    if not isinstance(config, cls):
      if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
      known = {f.name for f in dataclasses.fields(cls)}
      unknown = sorted(set(config) - known)
      if unknown:
        raise errors.unknown('data setting', unknown[0], sorted(known))
      config = cls(**config)
    if not config.split:
      config = dataclasses.replace(config, split=shifts.split(config.name))
    return config


def default_config(**overrides) -> ml_collections.ConfigDict:
  """`config.data` for a config file: the paper's protocol, with `overrides` applied."""
  return ml_collections.ConfigDict(dataclasses.asdict(DataConfig(**overrides)))
