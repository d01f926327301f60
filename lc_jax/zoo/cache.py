"""The zoo's cache: verified files under ROOT/files/ID/NAME, each with its digest beside it.

    ROOT/files/ID/NAME           a complete file, installed by os.replace (never half-written);
                                 an hf: id's ID is hf/REPO[/FILE]@REVISION
    ROOT/files/ID/NAME.sha256    its sha256, `sha256sum` style, recorded on first download
    ROOT/files/ID/.staging-*     downloads in progress (one folder per process)

The digest record is written before the file is moved into place, so every file under its final
name has one. A record is never overwritten: a later download or `add` with another digest is
refused (trust on first use). Every use of a cached file hashes it again, so a file changed on disk is caught before it is loaded.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import uuid
from typing import Iterator

from lc_jax import workdir
from lc_jax.digest import file_sha256
from lc_jax.errors import UserError
from lc_jax.zoo.entries import Source

_STAGING = '.staging-'


def cache_dir() -> str:
  """$LC_JAX_ZOO_DIR, or ~/.cache/lc_jax/zoo."""
  return os.environ.get('LC_JAX_ZOO_DIR') or os.path.join(
      os.path.expanduser('~'), '.cache', 'lc_jax', 'zoo')


def folder(model_id: str) -> str:
  """ROOT/files/MODEL_ID, where the model's files live; an hf: id's (lc_jax.zoo.hub) under
  ROOT/files/hf/REPO[/FILE]@REVISION."""
  return os.path.join(cache_dir(), 'files', *model_id.split(':', 1))


def path(model_id: str, source: Source) -> str:
  """Where `source` of `model_id` is cached (whether or not it is there)."""
  return os.path.join(folder(model_id), source.filename)


def record_path(model_id: str, source: Source) -> str:
  return path(model_id, source) + '.sha256'


sha256 = file_sha256


def recorded(model_id: str, source: Source) -> str | None:
  """The digest recorded by the first download of `source`, or None."""
  try:
    with open(record_path(model_id, source), encoding='utf-8') as f:
      return f.read().split()[0]
  except (OSError, IndexError):
    return None


def expected(model_id: str, source: Source) -> tuple[str | None, str]:
  """The digest `source` must have, and where that digest comes from (for messages)."""
  if source.sha256:
    return source.sha256, 'the known sha256'
  return recorded(model_id, source), f'the sha256 recorded at first download in ' \
                                     f'{record_path(model_id, source)}'


def is_cached(model_id: str, source: Source) -> bool:
  """Whether the file is in place (complete by construction; its digest is checked on use)."""
  return os.path.isfile(path(model_id, source))


def verify(model_id: str, source: Source) -> str:
  """Hashes the cached file and returns its path; a digest that differs is a UserError."""
  file = path(model_id, source)
  want, where = expected(model_id, source)
  if want is None:
    raise UserError(f'{file} ({model_id}) has no recorded sha256, so lc_jax.zoo did not put it '
                    f'there; delete it and fetch again, or register it with: python -m '
                    f'lc_jax.zoo add {model_id} FILE')
  got = sha256(file)
  if got != want:
    if recorded(model_id, source) is None:  # lc_jax.zoo records every file it puts there
      raise UserError(f'{file} ({model_id}) has sha256 {got}, but {where} is {want}: it is '
                      'not the file the zoo names, and lc_jax.zoo did not put it there (it has '
                      'no recorded sha256); delete it to download it again, or register the '
                      f'right file with: python -m lc_jax.zoo add {model_id} FILE')
    raise UserError(f'{file} ({model_id}) has sha256 {got}, but {where} is {want}: the file '
                    'changed after it was cached (downloaded or added); delete it to download '
                    'it again')
  return file


def mismatch(model_id: str, source: Source, origin: str, got: str, want: str, where: str,
             by_hand: bool = False) -> UserError:
  """The error for a new file (downloaded from `origin`, or a file the user gives: `by_hand`)
  whose digest is not the expected one."""
  if source.sha256 is None:
    hint = f'if the new file is the right one, delete {record_path(model_id, source)} and retry'
  elif by_hand:
    hint = (f'it is not the file the zoo names: another release of the weights, or a damaged '
            f'copy; the right one is {source.filename} from {source.canonical_url}')
  else:
    hint = 'the download is corrupt or the file was replaced at its source'

  return UserError(f'{model_id}/{source.filename} from {origin} has sha256 {got}, but {where} '
                   f'is {want}; nothing was cached ({hint})')


def install(model_id: str, source: Source, new_file: str, origin: str) -> str:
  """Moves the complete `new_file` (in the model's folder) to its cached name.

  Its digest must match the known or recorded one; without either, it is recorded now.
  """
  got = sha256(new_file)
  want, where = expected(model_id, source)
  if want is not None and got != want:
    raise mismatch(model_id, source, origin, got, want, where)
  if recorded(model_id, source) is None:
    workdir.write_atomically(record_path(model_id, source), f'{got}  {source.filename}\n')
  final = path(model_id, source)
  os.replace(new_file, final)
  return final


@contextlib.contextmanager
def staging(model_id: str) -> Iterator[str]:
  """A new, empty folder of this process inside the model's folder, removed on leaving.

  Downloads land here and are moved into place by `install` (same file system, so atomic). A
  process killed mid-download leaves its folder behind; the next call on this host removes it.
  """
  parent = folder(model_id)
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create the zoo cache folder {parent}: {e.strerror}; set '
                    'LC_JAX_ZOO_DIR to a folder you can write') from None
  _remove_abandoned(parent)
  host = socket.gethostname().replace('-', '_')
  tmp = os.path.join(parent, f'{_STAGING}{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}')
  os.mkdir(tmp)
  try:
    yield tmp
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):  # a failed first download leaves no empty folder
      os.rmdir(parent)


def _remove_abandoned(parent: str) -> None:
  # Only folders of this host whose process is gone: another host's download may be running.
  host = socket.gethostname().replace('-', '_')
  for name in os.listdir(parent):
    parts = name[len(_STAGING):].split('-')
    if not name.startswith(_STAGING) or len(parts) != 3 or parts[0] != host:
      continue
    try:
      os.kill(int(parts[1]), 0)
    except ProcessLookupError:
      shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    except (ValueError, PermissionError):
      pass
