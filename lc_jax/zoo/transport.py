"""Getting one file into a folder: pooch (HTTPS), huggingface_hub (the Hub), gdown (Google Drive).

A mirror map rewrites a source's canonical URL (see `Source.canonical_url`); a rewritten source
is fetched as a plain URL through pooch, whatever its kind. The map is a JSON object from URL
prefix to replacement prefix, given inline or as the path of a .json file, in the `mirrors`
argument or $LC_JAX_ZOO_MIRRORS; the longest matching prefix wins:

    LC_JAX_ZOO_MIRRORS='{"https://huggingface.co/": "https://hf.example.org/"}'
"""

from __future__ import annotations

import importlib
import json
import os
import re
from typing import Any, Mapping

from lc_jax.errors import UserError
from lc_jax.zoo.entries import Source

INSTALL = 'pip install "lc-jax[zoo]"'
TIMEOUT_S = 60  # per network read: a stalled server fails instead of hanging the fetch


def require(module: str, purpose: str) -> Any:
  """Imports `module` (one of the zoo extra's) or says in one line how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise UserError(f'{purpose} needs the Python package {module.split(".")[0]}, which is not '
                    f'installed: {INSTALL}') from None


def mirror_map(mirrors: str | Mapping[str, str] | None = None) -> dict[str, str]:
  """The map from `mirrors` (a dict, inline JSON or a .json path), else $LC_JAX_ZOO_MIRRORS."""
  given = mirrors if mirrors is not None else os.environ.get('LC_JAX_ZOO_MIRRORS', '')
  where = 'the mirrors argument' if mirrors is not None else 'LC_JAX_ZOO_MIRRORS'
  if isinstance(given, Mapping):
    table = dict(given)
  elif not given.strip():
    return {}
  else:
    text = given
    if not given.lstrip().startswith('{'):
      try:
        with open(os.path.expanduser(given), encoding='utf-8') as f:
          text = f.read()
      except OSError as e:
        raise UserError(f'{where}: cannot read the mirror map {given}: {e.strerror}') from None
    try:
      table = json.loads(text)
    except ValueError as e:
      raise UserError(f'{where}: the mirror map is not valid JSON ({e})') from None
  if not isinstance(table, dict) or not all(
      isinstance(k, str) and isinstance(v, str) and k for k, v in table.items()):
    raise UserError(f'{where}: the mirror map must be a JSON object of URL prefix -> '
                    'replacement prefix (both strings)')
  return table


def mirrored(source: Source, table: Mapping[str, str]) -> str | None:
  """The source's URL rewritten by the longest matching prefix of `table`, or None."""
  address = source.canonical_url
  prefixes = [p for p in table if address.startswith(p)]
  if not prefixes:
    return None
  prefix = max(prefixes, key=len)
  return table[prefix] + address[len(prefix):]


def download(model_id: str, source: Source, address: str | None, into: str, progress: bool
             ) -> str:
  """Downloads `source` (from `address` when mirrored) into the folder `into`; returns the
  path. Pooch checks a known sha256 itself; the caller checks every digest again."""
  if address is not None or source.kind == 'url':
    return _pooch(address or source.url, source, into, progress)
  if source.kind == 'hf':
    return _hub(source, into, progress)
  return _gdrive(model_id, source, into, progress)


class MissingFile(UserError):
  """The source has no such file: the Hub says so (the repository and revision exist), or a
  plain URL answers 404."""


class DigestMismatch(Exception):
  """Pooch refused a download for its known sha256; `got` is what arrived."""

  def __init__(self, got: str):
    super().__init__(got)
    self.got = got


def _pooch(address: str, source: Source, into: str, progress: bool) -> str:
  pooch = require('pooch', f'downloading {address}')
  requests = require('requests', f'downloading {address}')
  # Pooch streams into a temporary file next to `fname` and renames it only once its hash
  # matched: `into` never holds a partial file under the final name either.
  # Pooch's INFO lines advise pasting the digest into a pooch.retrieve call: not ours to follow.
  pooch.get_logger().setLevel('WARNING')
  downloader = pooch.HTTPDownloader(progressbar=progress, timeout=TIMEOUT_S)
  try:
    return pooch.retrieve(address, known_hash=f'sha256:{source.sha256}' if source.sha256 else
                          None, fname=source.filename, path=into, downloader=downloader,
                          progressbar=progress)
  except ValueError as e:
    got = re.search(r'but got (\w+)', str(e))
    if got:
      raise DigestMismatch(got.group(1)) from None
    raise UserError(f'cannot download {address}: {e}') from None
  except (requests.exceptions.RequestException, OSError) as e:
    response = getattr(e, 'response', None)
    if getattr(response, 'status_code', None) == 404:
      raise MissingFile(f'{address} is not there (HTTP 404)') from None
    raise UserError(f'download of {address} failed ({_reason(e)}); run the same command to '
                    'start it again') from None


def _hub(source: Source, into: str, progress: bool) -> str:
  hub = require('huggingface_hub', f'downloading {source.repo}/{source.filename}')
  utils = require('huggingface_hub.utils', 'the Hub')  # a lazy attribute of the package
  quiet = not progress and not utils.are_progress_bars_disabled()
  if quiet:
    utils.disable_progress_bars()
  try:
    # local_dir: the Hub client writes its .incomplete file under into/.cache and renames it
    # to into/FILENAME when complete; the caller then moves it into the cache. The endpoint is
    # read now: the client reads $HF_ENDPOINT once, when it is imported.
    return hub.hf_hub_download(source.repo, source.filename, revision=source.revision,
                               local_dir=into, etag_timeout=TIMEOUT_S,
                               endpoint=os.environ.get('HF_ENDPOINT') or None)
  except Exception as e:  # pylint: disable=broad-except  # network, auth, missing file, ...
    raise _hub_error(source, e, utils) from None
  finally:
    if quiet:
      utils.enable_progress_bars()


def _hub_error(source: Source, error: Exception, utils: Any) -> UserError:
  """One line for a failed Hub download: what the Hub has not (a repository, a revision, a
  file), or a failure worth retrying."""
  where = f'{source.repo}@{source.revision}'
  if isinstance(error, utils.RepositoryNotFoundError):  # GatedRepoError too
    return UserError(f'the Hub has no repository {source.repo} that you may read: check its '
                     'name; a private or gated one needs a login (hf auth login)')
  if isinstance(error, utils.RevisionNotFoundError):
    return UserError(f'the Hub repository {source.repo} has no revision {source.revision}: give '
                     'a branch, a tag or a full commit id')
  if (isinstance(error, utils.EntryNotFoundError)
      and not isinstance(error, utils.LocalEntryNotFoundError)):  # the latter: no connection
    return MissingFile(f'{where} has no file {source.filename}')
  return UserError(f'download of {source.canonical_url} failed ({_reason(error)}); run the same '
                   'command to start it again')


def _gdrive(model_id: str, source: Source, into: str, progress: bool) -> str:
  gdown = require('gdown', f'downloading Google Drive file {source.gdrive_id}')
  target = os.path.join(into, source.filename)
  try:
    # Old gdown versions print the error and return None; newer ones raise.
    done = gdown.download(id=source.gdrive_id, output=target, quiet=not progress)
  except Exception as e:  # pylint: disable=broad-except  # quota, permission, network, ...
    done, reason = None, _reason(e)
  else:
    reason = 'gdown returned nothing'
  if not done or not os.path.isfile(target):
    raise UserError(f'Google Drive download of {source.canonical_url} failed ({reason}); Drive '
                    'often refuses files over its download quota: download it in a browser and '
                    f'register it with: python -m lc_jax.zoo add {model_id} FILE')
  return target


def _reason(error: BaseException) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return f'{type(error).__name__}: {lines[0] if lines else ""}'.rstrip(': ')
