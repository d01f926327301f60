"""A checkpoint argument, `PATH`, `bundled:NAME` or `zoo:ID`: the files it names, its sha256,
and its conversion, made now or reused.

    sha256 = checkpoints.sha256('zoo:resnet50_dino')          # fetched (and checked) first
    module, variables, card = checkpoints.convert_into('zoo:resnet50_dino', 'out/model', sha256)
    arch, variables, metadata = checkpoints.convert('bundled:efficientnet_lite0')

converters/ converts local files (a path, or bundled:NAME: a file shipped in an installed
package) and knows no zoo; lc_jax.zoo fetches and keeps files and converts none. This module
joins them: it is the one place that reads `zoo:`, and `add` (files downloaded by hand, checked
to convert before the zoo keeps them) lives here.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import converters
from converters import reader
from converters.reader import UntrustedPickle
from lc_jax import models
from lc_jax import zoo
from lc_jax.errors import UserError
from lc_jax.version import __version__

ZOO = 'zoo:'  # 'zoo:ID' names a model of the paper's zoo (lc_jax.zoo)
BUNDLED = reader.BUNDLED_PREFIX  # 'bundled:NAME' names a checkpoint shipped in a package
SUFFIXES = ('.safetensors', '.pth.tar', '.pth', '.pt', '.ckpt', '.tar')  # left out of an id


def zoo_id(source: str) -> str | None:
  """The model id of 'zoo:ID'; None for a path or bundled:NAME."""
  return source[len(ZOO):] if source.startswith(ZOO) else None


def check(source: str, field: str) -> None:
  """Refuses a checkpoint argument that names nothing, in one UserError: a missing file or a
  folder (named with the config `field`), an unknown bundled name or zoo id. Downloads and
  hashes nothing."""
  model_id = zoo_id(source)
  if model_id is not None:
    zoo.get(model_id)  # an unknown id is refused with the closest ones
    return
  if source.startswith(BUNDLED):
    reader.resolve(source)  # an unknown name, or its package not installed, is refused
    return
  path = os.path.abspath(os.path.expanduser(source))
  if not os.path.exists(path):
    raise UserError(f'{field}: checkpoint not found: {path}')
  if not os.path.isfile(path):
    raise UserError(f'{field}: {path} is a folder, not a checkpoint file')


def files(source: str, *, offline: bool | None = None, mirrors: str = '') -> list[str]:
  """The local files `source` names: [the file] for a path or bundled:NAME; for zoo:ID the
  model's files (backbone, then head), fetched when not cached (`offline` and `mirrors` as
  lc_jax.zoo.fetch takes them) and checked against their sha256."""
  model_id = zoo_id(source)
  if model_id is None:
    return [reader.resolve(source)]
  return zoo.fetch(model_id, offline=offline, mirrors=mirrors or None)


def sha256(source: str, *, offline: bool | None = None, mirrors: str = '') -> str:
  """The sha256 that identifies `source`, which a conversion and a run's identity are keyed by:
  a file's own; for zoo:ID, `converters.digests_sha256` of its files' (fetched and hashed
  first), the sha256 its conversion records."""
  model_id = zoo_id(source)
  if model_id is None:
    return reader.sha256(reader.resolve(source))
  zoo.fetch(model_id, offline=offline, mirrors=mirrors or None)  # hashes every file
  return converters.digests_sha256(zoo.digests(model_id))


def convert(source: str, arch: str | None = None, *, trust_pickle: bool = False,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            offline: bool | None = None, mirrors: str = '',
            allow_nonfinite: bool = False) -> tuple[str, dict, dict[str, Any]]:
  """`converters.convert` of any checkpoint argument: a path or bundled:NAME as it is; zoo:ID's
  files fetched (or taken from the cache; `offline`, `mirrors`) and read in the model's layout
  with its normalisation, unless `mean`/`std` are given. Returns (arch, variables, metadata)."""
  model_id = zoo_id(source)
  if model_id is None:
    return converters.convert(source, arch, trust_pickle=trust_pickle, mean=mean, std=std,
                              allow_nonfinite=allow_nonfinite)
  entry = zoo.get(model_id)
  paths = zoo.fetch(model_id, offline=offline, mirrors=mirrors or None)
  arch, variables, metadata = converters.convert_layout(
      paths, entry.recipe, arch or 'resnet50', trust_pickle=trust_pickle,
      mean=entry.mean if mean is None else mean, std=entry.std if std is None else std,
      allow_nonfinite=allow_nonfinite)
  # convert_layout's sha256 is digests_sha256 of the files it read: `sha256(source)`.
  metadata['source'] = source
  return arch, variables, metadata


def convert_into(source: str, model_dir: str, source_sha256: str, *, arch: str = '',
                 trust_pickle: bool = False, offline: bool | None = None, mirrors: str = '',
                 allow_nonfinite: bool = False) -> tuple:
  """(module, variables, card) of `source` (of sha256 `source_sha256`) converted into
  `model_dir`: the conversion already there or, for zoo:ID, the one in the zoo's cache of
  conversions, when it is of this source (as `arch`, when given) by this lc-jax version and
  intact; otherwise converted now and saved in both places. A damaged one is made again."""
  places = [model_dir] + ([_zoo_converted(source_sha256)] if zoo_id(source) else [])
  for place in places:
    loaded = _reusable(place, arch, source_sha256)
    if loaded is not None:
      if place != model_dir:
        models.save(model_dir, loaded[2]['arch'], loaded[1], loaded[2], overwrite=True)
      return loaded
  arch, variables, card = convert(source, arch or None, trust_pickle=trust_pickle,
                                  offline=offline, mirrors=mirrors,
                                  allow_nonfinite=allow_nonfinite)
  for place in places:
    models.save(place, arch, variables, card, overwrite=True)
  return models.load(model_dir)


def default_id(source: str) -> str:
  """The label of `source`'s rows when the run names none (model.id): a zoo model's id, else
  the file's name without its checkpoint suffix."""
  model_id = zoo_id(source)
  if model_id is not None:
    return model_id
  name = os.path.basename(source[len(BUNDLED):] if source.startswith(BUNDLED) else source)
  for suffix in SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def add(model_id: str, paths: Sequence[str], *, trust_pickle: bool = False) -> list[str]:
  """Registers files downloaded by hand as zoo model `model_id`'s (lc_jax.zoo.register: in the
  registry's order, a known sha256 checked), once they convert as its layout; returns their
  paths in the zoo's cache. Anything wrong is one UserError, and then nothing is added."""
  return zoo.register(model_id, paths,
                      check=lambda entry, found: _check_converts(entry, found, trust_pickle))


def _check_converts(entry: zoo.Entry, paths: Sequence[str], trust_pickle: bool) -> None:
  """Refuses `paths` unless they convert as the zoo `entry`'s layout."""
  try:
    converters.convert_layout(list(paths), entry.recipe, 'resnet50', mean=entry.mean,
                              std=entry.std, trust_pickle=trust_pickle)
  except UntrustedPickle as e:
    raise UserError(f'{e.path} holds Python objects besides tensors, and unpickling them can '
                    'run code from the file; if you trust it, add it with --trust_pickle: '
                    f'python -m lc_jax.zoo add --trust_pickle {entry.id} {" ".join(paths)}; '
                    'nothing was added') from None
  except Exception as e:  # pylint: disable=broad-except  # any failure means "does not convert"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = lines[0] if isinstance(e, UserError) and lines else \
        f'{type(e).__name__}: {lines[0] if lines else ""}'
    raise UserError(f'{", ".join(paths)} does not convert as {entry.id} (layout '
                    f'{entry.recipe}): {reason}; nothing was added') from None


def _reusable(model_dir: str, arch: str, source_sha256: str) -> tuple | None:
  """`models.load(model_dir)` if it holds a conversion of the source `source_sha256` (as
  `arch`, when given) by this lc-jax version, intact; None otherwise (a damaged one is
  reported)."""
  try:
    card = models.store.read_card(model_dir)
    if (card and card.get('arch') == (arch or card.get('arch'))
        and card.get('sha256') == source_sha256 and card.get('lc_jax_version') == __version__):
      return models.load(model_dir)
  except UserError as e:  # its source is known: make it again
    print(f'{model_dir} was damaged; converting the checkpoint again ({e})', file=sys.stderr)
  return None


def _zoo_converted(source_sha256: str) -> str:
  """The zoo's cache of conversions: a zoo model converted once serves every run of it."""
  return os.path.join(zoo.cache_dir(), 'converted', source_sha256)
