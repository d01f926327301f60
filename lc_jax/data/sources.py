"""Where images come from: an ImageFolder directory, a tfds dataset, or scikit-image's photos.

A source lists its images once, in a fixed order, and opens any of them for decoding:

    source = open_source(DataConfig(path='/data/imagenet/val'))
    source.listing.keys[:1]          # ['n01440764/ILSVRC2012_val_00000293.JPEG']
    for row, name, file in source.read([3, 0]):
      pixels = transform(load_rgb(file))

The order is torchvision's ImageFolder order (class folders sorted, then files sorted), and a tfds
dataset with file names (ImageNet's has them) is put in the same order by (class name, file name),
so both select the same images for the same indices. An ImageFolder's labels are ImageNet-1k
indices where its folders say them (`folder_labels`). `name` is the image set in a word, for the
results' dataset column. `fingerprint()` identifies the images for
cache keys without reading any image, and for tfds without a pass over the data; `digests()`
hashes the images' bytes, so that a cache entry notices changed content without a decode.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import os
from typing import Any, BinaryIO, Iterator, Sequence

from absl import logging
import numpy as np

from lc_jax.data import classes as classes_lib
from lc_jax.data import shifts
from lc_jax.data.config import DataConfig
from lc_jax.digest import file_sha256
from lc_jax.errors import UserError

# torchvision.datasets.folder.IMG_EXTENSIONS; other files in class folders are left out, as there.
IMG_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')

# Real colour photographs shipped inside scikit-image (no download), for the demo and tests.
PHOTOS = ('astronaut', 'chelsea', 'coffee', 'hubble_deep_field', 'motorcycle_left', 'retina',
          'rocket')


@dataclasses.dataclass(frozen=True)
class Listing:
  """A source's images in its fixed order: an id for each, and labels where the source has them."""

  keys: list[str]
  labels: np.ndarray | None
  class_names: list[str] | None
  # Files left out for their extension (ImageFolder only).
  ignored: list[str] = dataclasses.field(default_factory=list)
  # Links to a folder above them, left out rather than walked round forever (ImageFolder only).
  loops: list[str] = dataclasses.field(default_factory=list)


class Source(abc.ABC):
  """A set of images in a fixed order; subclasses list them, fingerprint them and open them."""

  kind = ''
  name = ''  # the image set in a word: data.name ('imagenet2012', 'imagenet_r', ...), 'photos'

  @functools.cached_property
  def listing(self) -> Listing:
    """All images of the source in its order (listed once, on first use)."""
    return self._list()

  def size(self) -> int:
    """The number of images."""
    return len(self.listing.keys)

  @abc.abstractmethod
  def fingerprint(self) -> dict[str, Any]:
    """What identifies these images, for cache keys."""

  @property
  def classes(self) -> tuple[int, ...] | None:
    """The labels that predictions are restricted to (lc_jax.data.shifts), in label order, as
    indices into the model's logits; None: every class."""
    return None

  def identity(self) -> dict[str, Any] | None:
    """The image set in words, for run.json (a tfds dataset's name, version and split); None
    where the fingerprint says it all."""
    return None

  def digests(self, indices: Sequence[int], workers: int = 0) -> list[str] | None:
    """The sha256 of each image's stored bytes (hex), in the order of `indices`: what tells a
    cache entry that its images changed, without decoding them. None for a source versioned
    as a whole (tfds)."""
    files: list[Any] = [None] * len(indices)
    for j, _, file in self.read(indices):
      files[j] = file
    with concurrent.futures.ThreadPoolExecutor(workers or len(os.sched_getaffinity(0))) as pool:
      return list(pool.map(_file_sha256, files))

  @abc.abstractmethod
  def read(self, indices: Sequence[int]) -> Iterator[tuple[int, str, str | BinaryIO]]:
    """Yields (j, name, file) for each `indices[j]`, in any order.

    `file` is what `load_rgb` opens; `name` says where it came from, for error messages.
    """

  @abc.abstractmethod
  def describe(self) -> str:
    """The source in a few words, for messages."""

  @abc.abstractmethod
  def _list(self) -> Listing:
    """Lists every image; called once."""


class ImageFolder(Source):
  """A directory with one folder of images per class, read as torchvision's ImageFolder reads it.

  Classes are the sorted sub-folder names; each class folder is walked recursively (following
  links) in sorted order; files whose names do not end in one of IMG_EXTENSIONS (any case) are
  left out and counted. A link to a folder that holds it (`class0/up -> ..`) is left out and
  named in one warning: torchvision walks such a loop until the OS stops it, listing the same
  images dozens of times. Labels are `folder_labels`': ImageNet-1k indices for folders named by
  wnid or by class number, else torchvision's (the position among the sorted names).

  `name` (data.name) names the set the folder holds. ImageNet-R and ImageNet-A restrict
  predictions to their classes, as their tfds versions do (lc_jax.data.shifts). A folder of
  exactly their classes left at the default name is refused: it may be ImageNet-R or the
  same classes of ImageNet val, measured 200-way or 1000-way, and only the user knows which.
  """

  kind = 'imagefolder'

  def __init__(self, root: str, name: str = DataConfig.name):
    if not root:
      copy = (f' (data.name={name} reads an ImageFolder copy of {shifts.family(name).title} '
              'there; for its tfds version add --config.data.source=tfds)'
              if shifts.family(name) and name != DataConfig.name else '')
      raise UserError('data.path is empty: set it to an ImageFolder directory, one folder of '
                      f'images per class (as ImageNet val: DIR/n01440764/*.JPEG){copy}')
    self._asked = name
    self.root = os.path.abspath(os.path.expanduser(root))
    if not os.path.exists(self.root):
      raise UserError(f'image folder not found: {self.root}')
    if not os.path.isdir(self.root):
      raise UserError(f'image folder is not a directory: {self.root}')

  def describe(self) -> str:
    return f'ImageFolder {self.root}'

  @functools.cached_property
  def _folders(self) -> list[str]:
    """The class folders' names, sorted."""
    classes = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
    if not classes:
      raise UserError(f'{self.root} has no class folders: an ImageFolder holds one folder of '
                      f'images per class ({self.root}/<class>/<image>.JPEG)')
    return classes

  @functools.cached_property
  def _labelling(self) -> tuple[list[int], list[str], str]:
    return folder_labels(self._folders, self.root)

  @property
  def _renumbered(self) -> bool:
    """Whether the labels differ from torchvision's ImageFolder's."""
    return self._labelling[0] != list(range(len(self._folders)))

  def _list(self) -> Listing:
    folder_label, class_names, _ = self._labelling
    keys, labels, ignored, empty, loops = [], [], [], [], []
    for label, name in zip(folder_label, self._folders):
      count = len(keys)
      for folder, files in _walk(self.root, name, loops):
        for file in sorted(files):
          key = os.path.relpath(os.path.join(folder, file), self.root)
          if file.lower().endswith(IMG_EXTENSIONS):
            keys.append(key)
            labels.append(label)
          else:
            ignored.append(key)
      if len(keys) == count:
        empty.append(name)
    if not keys:
      raise UserError(f'no images in {self.root} ({len(ignored)} other files); images end in '
                      f'{", ".join(IMG_EXTENSIONS)}')
    if empty:
      # torchvision's ImageFolder refuses these too; accepting them would hide a partial copy.
      raise UserError(f'{len(empty)} class folder(s) in {self.root} hold no image: '
                      f'{", ".join(empty[:5])}{", ..." if len(empty) > 5 else ""}; add their '
                      'images or remove the folders')
    if loops:
      logging.warning('left out %d link(s) in %s that lead back to a folder holding them (a '
                      'loop), e.g. %s', len(loops), self.root, loops[0])
    return Listing(keys, np.asarray(labels, np.int32), class_names, ignored, loops)

  def fingerprint(self) -> dict[str, Any]:
    # Names and byte sizes, not modification times: a copy of the data set to local disk keeps
    # its cache, a re-encoded image does not.
    digest = hashlib.sha256()
    for key in self.listing.keys:
      size = os.stat(os.path.join(self.root, key)).st_size
      digest.update(f'{key}\0{size}\n'.encode())
    found = {'kind': self.kind, 'images': self.size(), 'files': digest.hexdigest()}
    if self._renumbered:  # labels that torchvision's ImageFolder would not give
      found['labels'] = self._labelling[2]
    return found

  @property
  def name(self) -> str:
    return self._set[0]

  @property
  def classes(self):
    return self._set[1]

  def identity(self):
    if self.name == DataConfig.name and not self._renumbered:
      return None  # ImageNet val as torchvision reads it: the fingerprint says it all
    found = {'imagefolder': self.name, 'labels': self._labelling[2]}
    if self.classes is not None:
      found['classes'] = len(self.classes)
    return found

  @functools.cached_property
  def _set(self) -> tuple[str, tuple[int, ...] | None]:
    """The set's name (data.name) and the classes predictions are restricted to (None: all)."""
    folders = set(self._folders)
    if self._asked == DataConfig.name and self._labelling[2] == 'wnid':
      for family in shifts.FAMILIES.values():
        if family.classes is None:
          continue
        if folders == set(family.classes):
          raise UserError(
              f'{self.root} holds the {len(folders)} classes of {family.title}: add '
              f'--config.data.name={family.name} to measure it as {family.title} (predictions '
              f'restricted to those classes), or give it a name of your own (e.g. '
              f'--config.data.name=imagenet{len(folders)}) to measure it 1000-way')
        if folders < set(family.classes) and 2 * len(folders) > len(family.classes):
          logging.warning('the %d class folders of %s are all among the %d classes of %s: it is '
                          'measured 1000-way as %s; if it is a copy of %s, set data.name=%s',
                          len(folders), self.root, len(family.classes), family.title,
                          DataConfig.name, family.title, family.name)
    family = shifts.family(self._asked)
    if family is None or family.classes is None:
      return self._asked, None
    others = sorted(folders - set(family.classes))
    if others:
      raise UserError(f'{self.root} is no ImageFolder copy of {family.title}: its class '
                      f'folders should be among {family.title}\'s {len(family.classes)} wnids, '
                      f'but {len(others)} are not (first: {others[0]})')
    return self._asked, shifts.class_indices(family.name, classes_lib.IMAGENET_1K)

  def read(self, indices):
    for j, i in enumerate(indices):
      path = os.path.join(self.root, self.listing.keys[i])
      yield j, path, path


def folder_labels(folders: Sequence[str], where: str = 'the ImageFolder'
                  ) -> tuple[list[int], list[str], str]:
  """(the label of each of the sorted class `folders`, the names the labels index, how).

  - 'wnid': every folder is an ImageNet-1k wnid (classes.IMAGENET_1K): its ImageNet-1k index.
    ImageNet val's 1000 folders get torchvision's labels; a copy of some classes (ImageNet-R's
    200, a subset of val) keeps each class's index, where torchvision numbers the folders 0..N-1.
  - 'number': every folder is a class number below 1000, as in ImageNetV2's release (0..999):
    that number, where torchvision's sorted names give folder '10' label 2.
  - 'sorted': otherwise, torchvision's: the position among the sorted names.

  Folders that are more than half wnids (or class numbers) but not all, or two folders of one
  class number ('7', '007'), are refused (`where` names the folder): a stray or misspelt folder
  would otherwise renumber every class, silently."""
  imagenet = {wnid: i for i, wnid in enumerate(classes_lib.IMAGENET_1K)}
  numbers = [int(name) if name.isascii() and name.isdigit() else -1 for name in folders]
  for how, fits in (('wnid', [name in imagenet for name in folders]),
                    ('number', [0 <= n < len(imagenet) for n in numbers])):
    if all(fits):
      break
    if 2 * sum(fits) > len(folders):
      odd = [name for name, fit in zip(folders, fits) if not fit]
      kind = 'ImageNet wnids' if how == 'wnid' else f'class numbers below {len(imagenet)}'
      raise UserError(f'{sum(fits)} of the {len(folders)} class folders in {where} are {kind}, '
                      f'but {len(odd)} are not (first: {odd[0]}): rename or remove them, so '
                      'that every class keeps its ImageNet label')
  else:
    return list(range(len(folders))), list(folders), 'sorted'
  if how == 'wnid':
    return [imagenet[name] for name in folders], list(classes_lib.IMAGENET_1K), 'wnid'
  twice = sorted({name for name, n in zip(folders, numbers) if numbers.count(n) > 1})
  if twice:
    raise UserError(f'class folders {", ".join(twice)} in {where} name one class number twice: '
                    'keep one folder per class')
  return numbers, [str(n) for n in range(len(imagenet))], 'number'


def _walk(root: str, name: str, loops: list[str]) -> list[tuple[str, list[str]]]:
  """(folder, file names) of every folder under ROOT/NAME, following links, sorted as
  torchvision sorts `os.walk`; a folder that is one of its own ancestors (through a link) is not
  entered, and its path relative to ROOT goes to `loops`."""
  def identity(path: str) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_dev, status.st_ino
  top = os.path.join(root, name)
  real = os.path.realpath(root)
  above = [identity(real)]
  while os.path.dirname(real) != real:  # the root's own ancestors: a link there loops too
    real = os.path.dirname(real)
    above.append(identity(real))
  if identity(top) in above:
    loops.append(name)
    return []
  ancestors = {top: tuple(above) + (identity(top),)}
  walked = []
  for folder, subfolders, files in os.walk(top, followlinks=True):
    kept = []
    for sub in subfolders:
      path = os.path.join(folder, sub)
      try:
        here = identity(path)
      except OSError:  # a dangling link; os.walk would not enter it either
        continue
      if here in ancestors[folder]:
        loops.append(os.path.relpath(path, root))
      else:
        ancestors[path] = ancestors[folder] + (here,)
        kept.append(sub)
    subfolders[:] = kept
    walked.append((folder, files))
  return sorted(walked)


class Tfds(Source):
  """A tfds image classification dataset (default: imagenet2012 validation), decoded with PIL.

  Images are read as their stored bytes and decoded by PIL like files on disk, not by TensorFlow
  (whose JPEG decoder rounds differently); tfds keeps ImageNet's validation files byte for byte
  (it re-encodes only 23 training images), so the pixels equal those of an ImageFolder copy. With a 'file_name' feature the examples are put in
  ImageFolder order, by (class name, file name); otherwise they keep the split's own order.
  """

  kind = 'tfds'

  def __init__(self, name: str, split: str, data_dir: str = ''):
    self._tfds = _import_tfds()
    self.dataset, self.split = name, split
    # The results' name: the set, and the split where it is not the set's own evaluation split.
    self.name = name if split == shifts.split(name) else f'{name}:{split}'
    try:
      self._builder = self._tfds.builder(name, data_dir=data_dir or None)
    except (ValueError, KeyError) as e:  # DatasetNotFoundError is a ValueError
      raise UserError(f'unknown tfds dataset {name!r}: {str(e).splitlines()[0]}') from None
    features = self._builder.info.features
    self._image_key = self._find_key(features, self._tfds.features.Image)
    if self._image_key is None:
      raise UserError(f'tfds dataset {name!r} has no image feature (features: '
                      f'{", ".join(features)})')
    self._label_key = self._find_key(features, self._tfds.features.ClassLabel)
    self._file_key = 'file_name' if 'file_name' in features else None
    self._classes = shifts.class_indices(
        name, None if self._label_key is None else features[self._label_key].names)

  def describe(self) -> str:
    return f'tfds {self.dataset} {self.split}'

  def _find_key(self, features, feature_type) -> str | None:
    # Prefer the dataset's own (image, label) pair; fall back to the first feature of the type.
    supervised = self._builder.info.supervised_keys or ()
    candidates = [k for k in supervised if isinstance(k, str)] + list(features)
    return next((k for k in candidates if isinstance(features[k], feature_type)), None)

  def _num_examples(self) -> int | None:
    try:
      return self._builder.info.splits[self.split].num_examples
    except (KeyError, ValueError):  # not prepared yet (or mocked): only a pass over it tells
      return None

  def size(self) -> int:
    known = self._num_examples()
    return known if known is not None else super().size()

  def fingerprint(self) -> dict[str, Any]:
    return {'kind': self.kind, 'dataset': self._builder.info.full_name, 'split': self.split,
            'images': self._num_examples()}

  @property
  def classes(self):
    return self._classes

  def identity(self):
    info = self._builder.info
    found = {'tfds': info.full_name.rsplit('/', 1)[0], 'version': str(info.version),
             'split': self.split}
    if self._classes is not None:
      found['classes'] = len(self._classes)
    return found

  def digests(self, indices, workers=0):
    # A prepared tfds dataset is immutable and versioned (full_name carries the version);
    # hashing its examples would mean a pass over the records.
    return None

  def _examples(self, keys: Sequence[str]) -> Iterator[dict[str, Any]]:
    decoders = {self._image_key: self._tfds.decode.SkipDecoding()}
    try:
      # One file at a time, unshuffled: both passes see the examples in the same order.
      dataset = self._builder.as_dataset(
          split=self.split, decoders=decoders, shuffle_files=False,
          read_config=self._tfds.ReadConfig(interleave_cycle_length=1))
    except (AssertionError, ValueError, KeyError, OSError) as e:
      # Only some sets (imagenet2012) are downloaded by hand before tfds prepares them.
      manual = getattr(self._builder, 'MANUAL_DOWNLOAD_INSTRUCTIONS', None)
      how = (f'{self.dataset} needs its manual download first' if manual
             else f'e.g. tfds build {self.dataset}')
      raise UserError(f'cannot read {self.describe()}: {str(e).splitlines()[0]} (prepare it with '
                      f'tfds first: {how}; or set data.path to the tfds data_dir that holds '
                      'it)') from None
    for example in self._tfds.as_numpy(dataset):
      yield {k: example[k] for k in keys}

  def _list(self) -> Listing:
    return self._indexed[0]

  @functools.cached_property
  def _indexed(self) -> tuple[Listing, np.ndarray]:
    # The listing, and where each of its images sits in the split's own order.
    wanted = [k for k in (self._label_key, self._file_key) if k is not None]
    examples = list(self._examples(wanted))
    files = ([e[self._file_key].decode('utf-8') for e in examples] if self._file_key
             else [f'{self.split}[{s}]' for s in range(len(examples))])
    if self._label_key is None:
      class_names, names, labels = None, [''] * len(examples), None
    else:
      class_names = list(self._builder.info.features[self._label_key].names)
      labels = np.asarray([e[self._label_key] for e in examples], np.int32)
      names = [class_names[label] for label in labels]
    stream = list(range(len(examples)))
    if self._file_key:
      stream.sort(key=lambda s: (names[s], files[s]))
    keys = [f'{names[s]}/{files[s]}' if names[s] and not files[s].startswith(f'{names[s]}/')
            else files[s] for s in stream]
    listing = Listing(keys, None if labels is None else labels[stream], class_names)
    return listing, np.asarray(stream, np.int64)

  def read(self, indices):
    listing, stream = self._indexed
    wanted = {int(stream[i]): j for j, i in enumerate(indices)}
    for position, example in enumerate(self._examples([self._image_key])):
      j = wanted.pop(position, None)
      if j is not None:
        yield j, f'{self.describe()} {listing.keys[indices[j]]}', io.BytesIO(
            example[self._image_key])
      if not wanted:
        return


class Photos(Source):
  """scikit-image's real colour photos (PHOTOS, in that order), read from its files; no labels."""

  kind = 'photos'
  name = 'photos'

  def __init__(self):
    folder = photo_dir()
    files = {os.path.splitext(f)[0]: f for f in os.listdir(folder)}
    self._paths = [os.path.join(folder, files[name]) for name in PHOTOS]

  def describe(self) -> str:
    return "scikit-image's photos"

  def _list(self) -> Listing:
    return Listing(list(PHOTOS), None, None)

  def fingerprint(self) -> dict[str, Any]:
    return {'kind': self.kind, 'files': [[os.path.basename(p), os.path.getsize(p)]
                                         for p in self._paths]}

  def read(self, indices):
    for j, i in enumerate(indices):
      yield j, self._paths[i], self._paths[i]


def photo_dir() -> str:
  """The folder of the photos scikit-image ships. Not `skimage.data.data_dir`: with pooch
  installed that is a download cache, which holds a photo only after its first use."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  return os.path.dirname(os.path.abspath(skimage.data.__file__))


def _file_sha256(path: str) -> str:
  try:
    return file_sha256(path)
  except OSError as e:
    raise UserError(f'cannot read {path}: {e.strerror}') from None


def open_source(config: DataConfig) -> Source:
  """The source that `config.source` names."""
  config = DataConfig.from_config(config)  # an empty split filled in
  if config.source == 'imagefolder':
    return ImageFolder(config.path, config.name)
  if config.source == 'tfds':
    return Tfds(config.name, config.split, config.path)
  return Photos()


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError('data.source=tfds needs TensorFlow Datasets: pip install "lc-jax[tfds]"'
                    ) from None
  return tfds
