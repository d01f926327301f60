"""`fetch`: a model's verified local files, downloading what the cache lacks; `register`:
files downloaded by hand.

    paths = zoo.fetch('resnet50_dino')          # [backbone, head], each hashed and checked
    zoo.register('resnet50_noisymix', ['~/Downloads/noisymix.pth'])   # Drive over its quota

The zoo keeps files and converts none: lc_jax.checkpoints.add registers files after checking
that they convert (`python -m lc_jax.zoo add`).
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Mapping, Sequence

from lc_jax.errors import UserError
from lc_jax.zoo import cache
from lc_jax.zoo import registry
from lc_jax.zoo import transport
from lc_jax.zoo.entries import Entry, Source


def is_offline(offline: bool | None = None) -> bool:
  """`offline` if given, else whether $LC_JAX_OFFLINE is set to 1 (or true/yes)."""
  if offline is not None:
    return offline
  return os.environ.get('LC_JAX_OFFLINE', '').strip().lower() in ('1', 'true', 'yes')


def missing(model_id: str) -> list[Source]:
  """The sources of `model_id` that are not in the cache."""
  return [s for s in registry.get(model_id).sources if not cache.is_cached(model_id, s)]


def fetch(model_id: str, *, offline: bool | None = None,
          mirrors: str | Mapping[str, str] | None = None, progress: bool = True) -> list[str]:
  """The local paths of `model_id`'s files (backbone, then head), downloading what is missing.

  Every file is hashed and checked against its known sha256, or the one recorded at its first
  download. Offline (`offline=True` or LC_JAX_OFFLINE=1), only the cache is used, and missing
  files are one UserError that lists them.
  """
  entry = registry.get(model_id)
  return fetch_sources(entry.id, entry.sources, offline=offline, mirrors=mirrors,
                       progress=progress)


def fetch_sources(model_id: str, sources: Sequence[Source], *, offline: bool | None = None,
                  mirrors: str | Mapping[str, str] | None = None, progress: bool = True
                  ) -> list[str]:
  """`fetch` of the files `sources`, kept in the cache under `model_id` (a paper model's id, or
  an hf: id of lc_jax.zoo.hub)."""
  absent = [s for s in sources if not cache.is_cached(model_id, s)]
  if absent and is_offline(offline):
    listed = ', '.join(f'{model_id}/{s.filename}' for s in absent)
    raise UserError(f'offline, and not in the zoo cache {cache.cache_dir()}: {listed}; where '
                    f'there is network, run python -m lc_jax.zoo fetch {model_id} and copy the '
                    'cache here (or point LC_JAX_ZOO_DIR at it)')
  table = transport.mirror_map(mirrors) if absent else {}
  paths = []
  for source in sources:
    # A cached file is hashed on every use; a new one was hashed as it was installed.
    paths.append(_download(model_id, source, table, progress) if source in absent else
                 cache.verify(model_id, source))
  return paths


def digests(model_id: str) -> list[str]:
  """The sha256 of each of `model_id`'s files (backbone, then head), as `fetch` checks them:
  the known one, or the one recorded at the first download. Reads no file: call it after
  `fetch`, which has just hashed every file against these."""
  return [cache.expected(model_id, source)[0] for source in registry.get(model_id).sources]


def _download(model_id: str, source: Source, table: Mapping[str, str], progress: bool) -> str:
  address = transport.mirrored(source, table)
  origin = address or source.canonical_url
  with cache.staging(model_id) as into:
    try:
      new_file = transport.download(model_id, source, address, into, progress)
    except transport.DigestMismatch as e:
      raise cache.mismatch(model_id, source, origin, e.got, source.sha256,
                           'the known sha256') from None
    return cache.install(model_id, source, new_file, origin)


def register(model_id: str, files: Sequence[str], *,
             check: Callable[[Entry, list[str]], None] | None = None) -> list[str]:
  """Registers `files` (in the registry's order: backbone, then head) as `model_id`'s, after
  checking a known sha256 and then calling `check(entry, paths)` (which raises a UserError to
  refuse them; lc_jax.checkpoints.add checks that they convert); copies them into the cache and
  records their sha256. Anything wrong is one UserError, and then nothing is added."""
  entry = registry.get(model_id)
  names = ', '.join(s.filename for s in entry.sources)
  if len(files) != len(entry.sources):
    raise UserError(f'{model_id} takes {len(entry.sources)} file(s) ({names}, in this order); '
                    f'got {len(files)}')
  return register_sources(model_id, entry.sources, files,
                          check=None if check is None else lambda paths: check(entry, paths))


def register_sources(model_id: str, sources: Sequence[Source], files: Sequence[str], *,
                     check: Callable[[list[str]], None] | None = None) -> list[str]:
  """`register` of `files` as the files `sources` (one each, in order) kept under `model_id`;
  `check(paths)` refuses them with a UserError."""
  files = [os.path.abspath(os.path.expanduser(f)) for f in files]
  for file in files:
    if not os.path.isfile(file):
      raise UserError(f'{file}: no such file')
  for file, source in zip(files, sources):
    want, where = cache.expected(model_id, source)
    got = cache.sha256(file)
    if want is not None and got != want:
      raise cache.mismatch(model_id, source, file, got, want, where, by_hand=True)
  if check is not None:
    check(files)
  with cache.staging(model_id) as into:
    copies = []
    for file, source in zip(files, sources):
      copies.append(os.path.join(into, source.filename))
      try:
        shutil.copyfile(file, copies[-1])
      except OSError as e:
        raise UserError(f'cannot copy {file} into the zoo cache: {e.strerror}') from None
    # Copied first, installed after: a copy that fails leaves the cache as it was.
    return [cache.install(model_id, source, copy, file)
            for copy, source, file in zip(copies, sources, files)]
