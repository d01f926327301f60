"""Converted models on disk: an orbax checkpoint of the variables beside a small JSON card.

    DIR/variables/   orbax-checkpoint of {'params': ..., 'batch_stats': ...}
    DIR/model.json   architecture, num_classes, mean/std, source path and sha256, dropped keys,
                     and the sha256 of the variables themselves (`digest`), checked on loading
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp

from lc_jax import workdir
from lc_jax.errors import UserError
from lc_jax.models import registry

CARD = 'model.json'
VARIABLES = 'variables'


def save(directory: str, arch: str, variables: dict, metadata: dict | None = None,
         overwrite: bool = False) -> str:
  """Writes `variables` of architecture `arch` and its card to `directory`; returns its path.

  The variables are written to a temporary folder first and moved in place, so an interrupted
  save never leaves a half-written model behind. Writers of one folder (two runs converting the
  same zoo model into its shared cache) take turns; the last one's model stays. A save that
  fails (a full disk included) is one UserError, without orbax's own reports of it.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, CARD)) and not overwrite:
    raise UserError(f'{directory} already holds a converted model; choose another output '
                    'folder or allow overwriting it')
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create the model folder {directory}: {e.strerror}') from None
  # Names of this writer's own: a second writer never shares them.
  unique = f'{os.getpid()}.{uuid.uuid4().hex[:8]}.partial'
  staging = os.path.join(directory, f'.{VARIABLES}.{unique}')
  try:
    with workdir.take_turns(os.path.join(directory, '.saving')):
      try:
        with _quiet(), _checkpointer() as checkpointer:
          checkpointer.save(staging, variables)
      except OSError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds
        raise UserError(f'cannot write the model to {directory}: {_reason(e)}') from None
      card = dict(metadata or {}, arch=arch, variables_sha256=digest(variables))
      with open(os.path.join(directory, f'{CARD}.{unique}'), 'w') as f:
        json.dump(card, f, indent=2, sort_keys=True)
      # Without a card, variables/ is never a model to keep (nor one an interrupted save left).
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(directory, CARD))
      shutil.rmtree(os.path.join(directory, VARIABLES), ignore_errors=True)
      os.replace(staging, os.path.join(directory, VARIABLES))
      os.replace(os.path.join(directory, f'{CARD}.{unique}'), os.path.join(directory, CARD))
  except OSError as e:
    raise UserError(f'cannot write the model to {directory}: {_reason(e)}') from None
  finally:
    for left in [staging, *glob.glob(glob.escape(staging) + '.orbax-checkpoint-tmp*')]:
      shutil.rmtree(left, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
      os.remove(os.path.join(directory, f'{CARD}.{unique}'))
  return directory


def digest(variables: dict) -> str:
  """sha256 over every variable's path, dtype, shape and bytes: equal digests, equal models."""
  hasher = hashlib.sha256()
  for path, leaf in sorted(_flat(variables)):
    leaf = np.ascontiguousarray(np.asarray(leaf))
    hasher.update(f'{path}\0{leaf.dtype.str}\0{leaf.shape}\n'.encode())
    hasher.update(leaf.tobytes())
  return hasher.hexdigest()


def _flat(tree, prefix: str = ''):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _flat(value, f'{prefix}/{key}')
  else:
    yield prefix, tree


def read_card(directory: str) -> dict[str, Any] | None:
  """The model.json card of a converted model folder, or None if there is none."""
  path = os.path.join(directory, CARD)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'{directory} holds a damaged model card ({e}); convert the checkpoint '
                    'again') from None


def load(directory: str) -> tuple[nn.Module, dict, dict[str, Any]]:
  """Reads a model written by `save`: (module, variables, metadata).

  The module is built with the card's num_classes, mean and std, so `module.apply(variables,
  images)` reproduces the converted checkpoint. A folder whose variables are unreadable or do
  not match the card's digest is refused as damaged.
  """
  directory = os.path.abspath(directory)
  metadata = read_card(directory)
  if metadata is None:
    raise UserError(f'{directory} is not a converted model (no {CARD}); convert a checkpoint '
                    'first with `python -m converters SRC --out DIR`')
  module = create_from_card(metadata)
  try:
    with _quiet(), _checkpointer() as checkpointer:
      variables = checkpointer.restore(os.path.join(directory, VARIABLES))
  except Exception as e:  # pylint: disable=broad-except  # orbax raises many kinds
    raise UserError(f'{directory} holds a damaged model: its variables do not load '
                    f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}); '
                    'convert the checkpoint again') from None
  variables = {k: _as_numpy(v) for k, v in variables.items()}
  expected = metadata.get('variables_sha256')
  if expected is not None and digest(variables) != expected:
    raise UserError(f'{directory} holds a damaged model: its variables differ from those its '
                    'card recorded; convert the checkpoint again')
  return module, variables, metadata


def create_from_card(metadata: dict[str, Any]) -> nn.Module:
  """The module a card describes: its architecture with the card's classes, normalisation and
  the settings its checkpoint fixed (module_settings: a ViT's img_size)."""
  overrides = {k: tuple(metadata[k]) for k in ('mean', 'std') if k in metadata}
  if 'num_classes' in metadata:
    overrides['num_classes'] = int(metadata['num_classes'])
  overrides.update(metadata.get('module_settings', {}))
  return registry.create(metadata['arch'], **overrides)


def _checkpointer() -> ocp.StandardCheckpointer:
  """An orbax checkpointer that works in this process alone: in a run over several processes
  one of them writes the model and each reads it, without orbax's cross-process barriers."""
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                             active_processes={jax.process_index()})
  return ocp.StandardCheckpointer(multiprocessing_options=alone)


@contextlib.contextmanager
def _quiet():
  """Keeps orbax's own reports of a failure from the user, who gets one UserError for it: its
  error logs (tracebacks of its threads), and the 'Event loop is closed' tracebacks that its
  reads and writes still in flight print once a failed restore or save has closed their event
  loop (each an unraisable exception of a tensorstore callback, dropped by `_drop_closed_loop`)."""
  _drop_closed_loop()
  orbax = _FromOrbax()
  logger = logging.getLogger('absl')
  logger.addFilter(orbax)
  try:
    yield
  finally:
    logger.removeFilter(orbax)


class _FromOrbax(logging.Filter):
  """Drops orbax's error records (absl logs them from the orbax module that failed)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR
                and f'{os.sep}orbax{os.sep}' in (record.pathname or ''))


def _drop_closed_loop() -> None:
  """Makes sys.unraisablehook drop RuntimeError('Event loop is closed') raised in a callback
  without an object (tensorstore's, after orbax closed its loop), passing on every other.
  Installed at the first use of orbax, and again if something replaced it since."""
  previous = sys.unraisablehook
  if getattr(previous, 'drops_closed_loop', False):
    return

  def hook(unraisable):
    if (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
        and str(unraisable.exc_value) == 'Event loop is closed'):
      return
    previous(unraisable)
  hook.drops_closed_loop = True
  sys.unraisablehook = hook


def _reason(error: BaseException) -> str:
  """What went wrong, in a few words: an OSError's own ('No space left on device'), the
  system's words for the error code tensorstore reports, or the error's first line."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code:
    return os.strerror(int(code.group(1)))
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__


def _as_numpy(tree):
  if isinstance(tree, dict):
    return {k: _as_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
