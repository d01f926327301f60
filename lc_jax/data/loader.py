"""This host's images, decoded once and cached, and batches of them with a mask.

    images, labels, info = load(config.data, cache_dir=DIR, process_index=jax.process_index(),
                                process_count=jax.process_count())
    for batch, batch_labels, mask in batches(images, labels, info):
      ...  # batch: uint8 (info.local_batch_size, crop, crop, 3); mask: False on padding rows

`images` is uint8 NHWC (memory-mapped from the cache), `labels` int32 or None for a source without
labels. Global batch k is the reference's batch k (subset positions [k*B, (k+1)*B)); each host
holds its own B / process_count of every batch, and every host runs `info.num_batches` batches of
the same shape, the last one padded, so no image is dropped or counted twice.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import sys
import time
from typing import Any, Iterator, Mapping

from absl import logging
import numpy as np
from PIL import Image

from lc_jax import progress as progress_lib
from lc_jax.batches import split
from lc_jax.data import cache
from lc_jax.data import subset
from lc_jax.data.config import DataConfig
from lc_jax.data.preprocess import load_rgb
from lc_jax.data.preprocess import Transform
from lc_jax.data.sources import IMG_EXTENSIONS
from lc_jax.data.sources import open_source
from lc_jax.data.sources import Source
from lc_jax.errors import UserError

# What PIL raises for a file that is not a readable image (truncated, corrupt, not an image).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What `load` gave this host, and how.

  Row i of the images is subset image `positions[i]`, `keys[i]` in the source. `fingerprint`
  names the images (source listing, subset, transform) and `content` their bytes: runs with
  equal fingerprints and contents saw identical inputs. For a set of fewer classes than the
  model's (ImageNet-R, ImageNet-A), `classes` holds their indices into the logits and a label is
  a position in it (`class_names` are those classes').
  """

  source: str
  fingerprint: str
  num_images: int
  positions: np.ndarray
  keys: list[str]
  # False for rows whose image did not decode (with on_error='skip'); those rows are zeros.
  valid: np.ndarray
  skipped: list[str]
  ignored_files: int
  class_names: list[str] | None
  # The global batch used (fitted_batch_size): data.batch_size, or one batch of all the images.
  batch_size: int
  local_batch_size: int
  num_batches: int
  cache_path: str
  cache_hit: bool
  # Decoding time on a miss, opening (and checking) time on a hit.
  seconds: float
  # The images' bytes, in one digest (loader.content_digest); '' for a versioned source (tfds).
  content: str = ''
  # The logits predictions are restricted to (lc_jax.data.shifts), in 1k order; None: all.
  classes: tuple[int, ...] | None = None
  # The image set in words for run.json (Source.identity: a tfds name, version, split), or None.
  dataset: dict[str, Any] | None = None
  # The image set in a word, the results' dataset column (Source.name: data.name, 'photos').
  name: str = ''


def load(config: DataConfig | Mapping[str, Any], cache_dir: str | None = None,
         process_index: int = 0, process_count: int = 1, progress: bool = True
         ) -> tuple[np.ndarray, np.ndarray | None, DataInfo]:
  """This host's preprocessed images, their labels (or None) and a DataInfo.

  Images come from the cache in `cache_dir` (default: `cache.default_dir()`) when the same
  source, subset and transform were decoded before; otherwise they are decoded in parallel,
  showing progress on stderr when `progress`, and cached. A host of several decodes only its
  own images, unless a single-host run already cached them all.
  """
  config = DataConfig.from_config(config)
  transform = Transform(config.resize_size, config.crop_size)
  source = open_source(config)
  start = time.perf_counter()
  num_images = subset.subset_size(source.size(), config.num_images, source.describe())
  fingerprint = cache.digest({
      'source': source.fingerprint(),
      # The seed does not change a sorted subset, so it does not split the cache either.
      'subset': {'num_images': num_images, 'order': config.order,
                 'seed': 0 if config.order == 'sorted' else config.seed},
      'transform': transform.spec()})
  batch_size = fitted_batch_size(num_images, config.batch_size, process_count)
  positions = subset.host_positions(num_images, batch_size, process_index, process_count)
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir or cache.default_dir()))
  whole = f'{source.kind}-{num_images}x{transform.crop_size}-{fingerprint}'
  name = whole if process_count == 1 else (
      f'{whole}-host{process_index}of{process_count}-batch{batch_size}')

  indices = subset.select(source.size(), config.num_images, config.seed, config.order)[positions]
  digests = source.digests(indices.tolist(), config.workers)
  hit = True
  images = meta = None
  if cache.exists(cache_dir, name):
    images, meta = cache.read(cache_dir, name)
  elif process_count > 1 and cache.exists(cache_dir, whole):
    name = whole
    images, meta = cache.read(cache_dir, whole)
  if meta is not None:
    changed = (cache.damage(images, meta, os.path.join(cache_dir, name))
               or _changed(meta, positions, digests))
    if changed:
      print(f'{changed}; decoding the images again', file=sys.stderr)
      images = meta = None
      name = whole if process_count == 1 else (
          f'{whole}-host{process_index}of{process_count}-batch{batch_size}')
    elif name == whole and process_count > 1:
      images = np.asarray(images[positions])
  if meta is None:
    hit = False
    _build(source, transform, config, positions, indices, digests, cache_dir, name,
           fingerprint, progress)
    images, meta = cache.read(cache_dir, name)
  seconds = time.perf_counter() - start if hit else meta['decode_seconds']

  rows = np.searchsorted(meta['positions'], positions)
  skipped = dict(zip(meta['skipped_positions'], meta['skipped_errors']))
  if skipped and config.on_error == 'raise':
    first = skipped[min(skipped)]
    raise UserError(f'{len(skipped)} image(s) did not decode when the cache entry '
                    f'{os.path.join(cache_dir, name)}.npy was made with data.on_error=skip '
                    f'(first: {first}); replace them and delete the entry, or set '
                    'data.on_error=skip')
  labels = None if meta['labels'] is None else np.asarray(meta['labels'], np.int32)[rows]
  keys = [meta['keys'][r] for r in rows]
  class_names, classes = meta['class_names'], source.classes
  if classes is not None and labels is not None:
    labels = _positions(labels, classes, keys, class_names, source.describe())
    class_names = None if class_names is None else [class_names[c] for c in classes]
  info = DataInfo(
      source=meta['source'], fingerprint=fingerprint, num_images=num_images,
      positions=positions, keys=keys,
      valid=~np.isin(positions, list(skipped)),
      skipped=[skipped[p] for p in positions.tolist() if p in skipped],
      ignored_files=meta['ignored_files'], class_names=class_names,
      batch_size=batch_size, local_batch_size=batch_size // process_count,
      num_batches=subset.num_batches(num_images, batch_size),
      cache_path=os.path.join(cache_dir, name + '.npy'), cache_hit=hit, seconds=seconds,
      content=content_digest(positions, digests), classes=classes, dataset=source.identity(),
      name=source.name)
  if hit:
    progress_lib.say(f'loaded {len(positions)} images from {info.cache_path} in {seconds:.2f} s'
                     + (' (their bytes and the pixels checked)' if digests is not None
                        else ' (the pixels checked)'), progress)
  return images, labels, info


def _positions(labels: np.ndarray, classes: tuple[int, ...], keys: list[str],
               class_names: list[str] | None, where: str) -> np.ndarray:
  """`labels` (indices into the full label list) as positions in `classes`; a label outside
  them is refused: its image could never be predicted right."""
  lookup = np.full(max(max(classes), int(labels.max(initial=0))) + 1, -1, np.int32)
  lookup[list(classes)] = np.arange(len(classes), dtype=np.int32)
  mapped = lookup[labels]
  outside = np.flatnonzero(mapped < 0)
  if outside.size:
    first = int(outside[0])
    name = class_names[labels[first]] if class_names else str(labels[first])
    raise UserError(f'{outside.size} image(s) of {where} have a label outside its '
                    f'{len(classes)} classes (first: {keys[first]}, label {labels[first]} '
                    f'{name}); predictions are restricted to those classes '
                    '(lc_jax.data.shifts), so such an image cannot be measured')
  return mapped


def fitted_batch_size(num_images: int, batch_size: int, process_count: int = 1) -> int:
  """The global batch a run uses: `batch_size` (data.batch_size), or with fewer images one batch
  of all of them, rounded up to a multiple of the hosts (each host's share is then rounded up to
  its devices, `lc_jax.batches.chunk_rows`), so that a batch never holds more rows than the
  images it can still get. A batch's size does not enter the metrics (sums over images); with one
  batch there is no saved progress between batches, so a resumed run is the same either way."""
  if num_images >= batch_size:
    return batch_size
  return max(1, -(-num_images // process_count)) * process_count


def batches(images: np.ndarray, labels: np.ndarray | None, info: DataInfo
            ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
  """Yields `info.num_batches` (images, labels or None, mask) of `info.local_batch_size` rows.

  Padding rows are zeros with label -1 and mask False; skipped (undecodable) images, zeros too,
  keep their label and have mask False.
  """
  size = info.local_batch_size
  for k in range(info.num_batches):
    rows = slice(k * size, (k + 1) * size)
    batch = np.zeros((size,) + images.shape[1:], np.uint8)
    count = len(images[rows])
    batch[:count] = images[rows]
    mask = np.zeros(size, bool)
    mask[:count] = info.valid[rows]
    batch_labels = None
    if labels is not None:
      batch_labels = np.full(size, -1, np.int32)
      batch_labels[:count] = labels[rows]
    yield batch, batch_labels, mask


def chunks(images: np.ndarray, labels: np.ndarray | None, info: DataInfo, rows: int
           ) -> Iterator[list[tuple[np.ndarray, np.ndarray, np.ndarray]]]:
  """For each batch of `batches`, its chunks of `rows` rows (see `lc_jax.batches.chunk_rows`):
  (images, labels, mask), every chunk the same shape (one compiled program). This is where a
  batch is padded, once (`lc_jax.batches.split`): padding rows are zeros with label -1 (also for
  a source without labels) and mask False."""
  for batch in batches(images, labels, info):
    yield split(batch, rows)


def _changed(meta: Mapping[str, Any], positions: np.ndarray, digests: list[str] | None
             ) -> str | None:
  """What changed in the images of a cache entry since it was made (None: nothing)."""
  if digests is None:
    return None
  stored = meta.get('digests')
  rows = np.searchsorted(meta['positions'], positions)
  for row, digest in zip(rows.tolist(), digests):
    if stored is None or stored[row] != digest:
      return f'{meta["keys"][row]} changed since the image cache entry was made'
  return None


def content_digest(positions: np.ndarray, digests: list[str] | None) -> str:
  """One digest of the images' bytes at their subset positions ('' without digests): the XOR of
  sha256(position, digest) over the images, so the hosts' digests of their parts combine
  (`combine_content`) into the digest of the whole, however the images are split."""
  if digests is None:
    return ''
  total = np.zeros(32, np.uint8)
  for position, digest in zip(positions.tolist(), digests):
    total ^= np.frombuffer(hashlib.sha256(f'{position}:{digest}'.encode()).digest(), np.uint8)
  return total.tobytes().hex()


def combine_content(parts: np.ndarray) -> str:
  """The content digest of the whole from the hosts' digests (rows of 32 uint8)."""
  return np.bitwise_xor.reduce(np.asarray(parts, np.uint8).reshape(-1, 32), axis=0).tobytes().hex()


def _build(source: Source, transform: Transform, config: DataConfig, positions: np.ndarray,
           indices: np.ndarray, digests: list[str] | None, cache_dir: str, name: str,
           fingerprint: str, progress: bool) -> None:
  listing = source.listing
  if listing.ignored:
    logging.warning('left out %d file(s) of %s that are not images (extensions %s), e.g. %s',
                    len(listing.ignored), source.describe(), ' '.join(IMG_EXTENSIONS),
                    listing.ignored[0])
  size = transform.crop_size
  with cache.write(cache_dir, name, (len(positions), size, size, 3)) as (images, meta):
    start = time.perf_counter()
    failures = _decode(source, indices, images, transform, config.workers,
                       stop_on_error=config.on_error == 'raise', progress=progress)
    if failures and config.on_error == 'raise':
      raise UserError(f'cannot decode {failures[0][1]}; replace or remove the file, or set '
                      'data.on_error=skip to leave such images out (masked)')
    for _, error in failures:
      logging.warning('skipped an image that does not decode: %s', error)
    meta.update(
        source=source.describe(), fingerprint=fingerprint, positions=positions.tolist(),
        keys=[listing.keys[i] for i in indices],
        labels=None if listing.labels is None else listing.labels[indices].tolist(),
        class_names=listing.class_names, ignored_files=len(listing.ignored),
        skipped_positions=[int(positions[row]) for row, _ in failures],
        skipped_errors=[error for _, error in failures], digests=digests,
        decode_seconds=time.perf_counter() - start)


def _decode(source: Source, indices: np.ndarray, out: np.ndarray, transform: Transform,
            workers: int, stop_on_error: bool, progress: bool) -> list[tuple[int, str]]:
  """Decodes `indices` of `source` into `out` in threads; returns (row, error) of failures, by row.

  PIL releases the GIL while it decodes and resamples, so threads scale with cores without the
  start-up and pickling cost of processes.
  """
  workers = workers or len(os.sched_getaffinity(0))
  progress_lib.say(f'decoding {len(indices)} images of {source.describe()}', progress)
  meter = progress_lib.Phase('images', len(indices), 'images', progress)
  failures: list[tuple[int, str]] = []

  def work(row: int, name: str, file) -> tuple[int, str] | None:
    try:
      out[row] = transform(load_rgb(file))
    except DECODE_ERRORS as e:
      # PIL's message for a non-image repeats the file object's repr; the name says it better.
      reason = ('not an image PIL can identify' if isinstance(e, Image.UnidentifiedImageError)
                else f'{type(e).__name__}: {e}')
      return row, f'{name} ({reason})'
    return None

  def settle(done) -> None:
    for future in done:
      failure = future.result()
      if failure is not None:
        failures.append(failure)
    meter.advance(len(done))

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = set()
    # A bounded window keeps a streaming source (tfds) from reading ahead of the decoders.
    for row, name, file in source.read(indices.tolist()):
      if len(pending) >= 4 * workers:
        done, pending = concurrent.futures.wait(
            pending, return_when=concurrent.futures.FIRST_COMPLETED)
        settle(done)
        if failures and stop_on_error:
          break
      pending.add(pool.submit(work, row, name, file))
    if failures and stop_on_error:
      for future in pending:
        future.cancel()
    else:
      settle(concurrent.futures.wait(pending).done)
  meter.close()
  return sorted(failures)
