"""Decode once: preprocessed uint8 images on disk as memory-mapped .npy files, written atomically.

An entry is NAME.npy (the images, N x H x W x 3 uint8) and NAME.json (what they are: keys,
labels, positions, skipped images, and the sha256 of the pixels, which `damage` checks on every
use, so an edited or damaged .npy is decoded again rather than used). NAME carries a hash of the source's fingerprint, the subset
and the transform, so the same images at the same size are decoded once, whichever model or run
asks. Both files are written under temporary names and renamed, the .npy last: an entry whose
.npy exists is complete, and a killed run leaves at most a hidden '.NAME*.tmp' file behind, which
is safe to delete.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import os
import socket
import uuid
from typing import Any, Iterator, Mapping

import numpy as np

from lc_jax.errors import UserError

# Bump when the layout of an entry changes, so old entries are not misread.
FORMAT = 2  # 2: entries record the sha256 of every image's bytes


def default_dir() -> str:
  """$LC_JAX_CACHE_DIR, or ~/.cache/lc_jax/images."""
  return os.environ.get('LC_JAX_CACHE_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'lc_jax', 'images')


def digest(parts: Mapping[str, Any]) -> str:
  """A hex key for `parts` (JSON-able): equal parts give equal keys, on any machine."""
  text = json.dumps({'format': FORMAT, **parts}, sort_keys=True, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def exists(cache_dir: str, name: str) -> bool:
  """Whether a complete entry NAME is in `cache_dir`."""
  return os.path.exists(os.path.join(cache_dir, name + '.npy'))


def read(cache_dir: str, name: str) -> tuple[np.ndarray, dict[str, Any]]:
  """The entry's images (memory-mapped, read-only) and its metadata."""
  base = os.path.join(cache_dir, name)
  try:
    with open(base + '.json', encoding='utf-8') as f:
      meta = json.load(f)
    images = np.load(base + '.npy', mmap_mode='r')
  except (OSError, ValueError) as e:
    raise UserError(f'image cache entry {base}.npy is unreadable ({e}); delete it (and its .json) '
                    'to decode the images again') from None
  if images.shape[0] != len(meta['keys']):
    raise UserError(f'image cache entry {base}.npy holds {images.shape[0]} images, its .json '
                    f'{len(meta["keys"])}; delete both to decode the images again')
  return images, meta


def damage(images: np.ndarray, meta: Mapping[str, Any], name: str) -> str | None:
  """What is wrong with the pixels of entry `name` (`images`, `meta` as `read` gave them), or
  None when they match the sha256 recorded when the entry was written."""
  recorded = meta.get('pixels_sha256')
  if recorded is None:
    return f'image cache entry {name}.npy has no digest of its pixels'
  if pixels_sha256(images) != recorded:
    return f'image cache entry {name}.npy does not match the digest of its pixels'
  return None


def pixels_sha256(images: np.ndarray) -> str:
  """The sha256 of the images' shape and of the sha256s of their bytes in blocks of about 32 MiB
  (hashed in threads: hashlib lets go of the GIL)."""
  rows = max(1, (32 << 20) // max(1, images[0].nbytes if len(images) else 1))
  blocks = [images[i:i + rows] for i in range(0, len(images), rows)]
  digest = hashlib.sha256(repr(images.shape).encode())
  with concurrent.futures.ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
    for block in pool.map(lambda b: hashlib.sha256(np.ascontiguousarray(b)).digest(), blocks):
      digest.update(block)
  return digest.hexdigest()


@contextlib.contextmanager
def write(cache_dir: str, name: str, shape: tuple[int, ...]
          ) -> Iterator[tuple[np.ndarray, dict[str, Any]]]:
  """Yields a zeroed uint8 array of `shape` on disk, and a metadata dict, to fill in.

  On leaving the block normally, both become the entry NAME, atomically; on an exception, the
  temporary files are removed and nothing changes.
  """
  try:
    os.makedirs(cache_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create the image cache folder {cache_dir}: {e.strerror}; set '
                    'cache_dir (or LC_JAX_CACHE_DIR) to a folder you can write') from None
  base = os.path.join(cache_dir, name)
  # Unique per writer: hosts sharing a file system may write the same entry at once; each rename
  # installs a complete, identical file.
  tmp = os.path.join(cache_dir, f'.{name}.{socket.gethostname()}.{os.getpid()}.'
                                f'{uuid.uuid4().hex[:8]}')
  meta: dict[str, Any] = {}
  try:
    try:
      images = np.lib.format.open_memmap(tmp + '.npy.tmp', mode='w+', dtype=np.uint8,
                                         shape=shape)
    except OSError as e:
      raise UserError(f'cannot write to the image cache folder {cache_dir}: {e.strerror}; set '
                      'cache_dir (or LC_JAX_CACHE_DIR) to a folder you can write') from None
    _reserve(tmp + '.npy.tmp', cache_dir)
    yield images, meta
    images.flush()
    meta['pixels_sha256'] = pixels_sha256(images)
    _fsync(tmp + '.npy.tmp')
    del images
    with open(tmp + '.json.tmp', 'w', encoding='utf-8') as f:
      json.dump(meta, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp + '.json.tmp', base + '.json')
    os.replace(tmp + '.npy.tmp', base + '.npy')
  finally:
    for leftover in (tmp + '.npy.tmp', tmp + '.json.tmp'):
      with contextlib.suppress(FileNotFoundError):
        os.remove(leftover)


def _reserve(path: str, cache_dir: str) -> None:
  # The memory map starts as a sparse file; a disk that fills up while pages are written kills
  # the process with SIGBUS. Claiming the blocks now turns that into an error up front.
  size = os.path.getsize(path)
  fd = os.open(path, os.O_RDWR)
  try:
    os.posix_fallocate(fd, 0, size)
  except OSError as e:
    raise UserError(f'cannot reserve {size / 2**30:.2f} GiB for the image cache in {cache_dir}: '
                    f'{e.strerror}; free space or set another cache folder') from None
  finally:
    os.close(fd)


def _fsync(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)
