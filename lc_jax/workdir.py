"""The workdir of a run: one writer at a time, and files replaced atomically under unique names.

    with workdir.Lock(path):      # refuses at once if another run holds it
      ...                         # everything that writes to the workdir

A workdir's own files (schema.OWN) are never links: `refuse_links` says so in one line before
anything is written, and `open_own` opens them without following one (O_NOFOLLOW), so a run
never reads or writes outside its workdir through them.

The lock is `flock` on WORKDIR/.lock: the kernel drops it when its process ends, however it ends
(kill -9 included), so there is never a stale lock to clean up. The file holds the holder's pid,
host and start time, which a refused run names.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import shutil
import socket
import uuid

from lc_jax import schema
from lc_jax.errors import UserError


def ensure(workdir: str) -> str:
  """Creates `workdir` if needed; refuses a path that is a file or a folder it cannot write."""
  return ensure_folder(workdir, '--workdir', 'the results')


def ensure_folder(path: str, flag: str, purpose: str) -> str:
  """Creates the folder `path` (given as `flag`, to hold `purpose`) if needed and returns it,
  absolute; a file there, or a folder that cannot be created or written, is one UserError."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'{flag} {path} is a file, not a folder; give a folder for {purpose}')
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UserError(f'cannot create the {flag} folder {path}: {e.strerror}') from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise UserError(f'cannot write to the {flag} folder {path} (permission denied); give a '
                    'folder you can write to')
  return path


class Lock:
  """An exclusive lock on a workdir for as long as the `with` block runs (see module doc).

  On a shared filesystem the lock holds between hosts only where the filesystem supports
  `flock` across clients (NFSv4 and Lustre with -o flock do; some FUSE mounts do not, and
  then each host sees only its own lock).
  """

  def __init__(self, workdir: str):
    self.workdir = ensure(workdir)
    self.path = os.path.join(self.workdir, schema.LOCK)
    self._fd: int | None = None

  def __enter__(self) -> Lock:
    refuse_links(self.workdir)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise UserError(_link_message(self.path)) from None
      raise UserError(f'cannot write to the workdir {self.workdir}: {e.strerror}') from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise UserError(f'{self.workdir} is in use by another run ({_holder(self.path)}); wait '
                        'for it to finish, or use another --workdir') from None
      raise UserError(f'cannot lock the workdir {self.workdir} ({e.strerror}): its filesystem '
                      'does not support flock; use a local folder') from None
    holder = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
    try:  # who holds it, for the message a second run gets
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(holder) + '\n').encode(), 0)
    except OSError as e:
      os.close(fd)
      raise UserError(f'cannot write to the workdir {self.workdir}: {e.strerror}') from None
    self._fd = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.close(self._fd)  # releases the lock; the file stays (removing it would race a waiter)
      self._fd = None


def refuse_links(workdir: str) -> None:
  """Raises if one of the files or folders a run writes in `workdir` (schema.OWN) is a symbolic
  link: writing it would write wherever the link points."""
  for name in schema.OWN:
    path = os.path.join(workdir, name)
    if os.path.islink(path):
      raise UserError(_link_message(path))


def open_own(path: str, mode: str = 'r', **kwargs):
  """`open(path, mode, **kwargs)` for a workdir's own file, refusing (one UserError) a symbolic
  link there rather than following it. Modes: 'r', 'rb', 'a', 'r+b'."""
  flags = {'r': os.O_RDONLY, 'a': os.O_WRONLY | os.O_APPEND | os.O_CREAT,
           'r+': os.O_RDWR}[mode.replace('b', '')]
  try:
    fd = os.open(path, flags | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise UserError(_link_message(path)) from None
    raise
  return os.fdopen(fd, mode, **kwargs)


def _link_message(path: str) -> str:
  try:
    target = f' (to {os.readlink(path)})'
  except OSError:
    target = ''
  return (f'{path} is a symbolic link{target}; a run writes only its workdir\'s own files: put '
          'the file itself there, or use a new --workdir')


@contextlib.contextmanager
def take_turns(path: str):
  """Holds the `flock` of the file `path` for as long as the `with` block runs, waiting for it
  while another writer holds it (unlike `Lock`, which refuses at once)."""
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def _holder(path: str) -> str:
  try:
    with open(path, encoding='utf-8') as f:
      holder = json.loads(f.read() or '{}')
    return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
  except (OSError, ValueError, KeyError, TypeError):
    return 'holder unknown'


def write_atomically(path: str, text: str | bytes) -> None:
  """Replaces `path` with `text` (or bytes) in one step (fsynced), through a temporary file of
  its own, so a kill leaves the old file or the new one and two writers never share a temporary
  file."""
  partial = f'{path}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial'
  try:
    with open(partial, 'wb' if isinstance(text, bytes) else 'w',
              **({} if isinstance(text, bytes) else {'encoding': 'utf-8'})) as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(partial, path)
  except OSError as e:
    raise UserError(f'cannot write {path}: {e.strerror}') from None
  finally:  # also when stopped (Ctrl-C) before the replace; after it, nothing is left
    with contextlib.suppress(OSError):
      os.remove(partial)
  sync_folder(os.path.dirname(path))


def sync_folder(folder: str) -> None:
  """fsyncs `folder` itself, so that a file just created or renamed in it survives a power loss
  (where the filesystem allows it)."""
  with contextlib.suppress(OSError):
    fd = os.open(folder or '.', os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def untouched(workdir: str) -> tuple[str, bool] | None:
  """What a run on `workdir` would remove to leave it as it is now, when it holds nothing:
  (the workdir, True) when it is an empty folder, which stays; (the topmost of the folders up
  to it that do not exist yet, False); None when it holds anything. See `take_back`."""
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.lexists(path):
    empty = os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)
    return (path, True) if empty else None
  while not os.path.lexists(os.path.dirname(path)):
    path = os.path.dirname(path)
  return path, False


def take_back(found: tuple[str, bool]) -> None:
  """Leaves a workdir as `untouched` `found` it: an empty folder, or not there."""
  folder, stays = found
  if not stays:
    shutil.rmtree(folder, ignore_errors=True)
    return
  for name in os.listdir(folder):
    path = os.path.join(folder, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(OSError):
        os.remove(path)
