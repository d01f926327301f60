"""Reads checkpoint files into a flat {key: numpy array} state_dict, naming every key it drops.

Formats: PyTorch zip and legacy files (.pth, .pth.tar, .pt, .ckpt) through
`torch.load(weights_only=True)`, and .safetensors through the safetensors numpy API (no torch).
A zip or legacy checkpoint of tensors in plain containers (dicts, numbers, strings) is read
without torch, by an unpickler that knows only tensors and dicts: faster, torch never enters
memory, and the base install reads the bundled checkpoint (a legacy file).
The format is told by the file's first bytes, not its name.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import json
import math
import os
import pickle
import re
import struct
import zipfile
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from lc_jax.digest import file_sha256
from lc_jax.errors import UserError


class ConversionError(UserError):
  """A checkpoint that cannot be read or does not fit the architecture."""


class UntrustedPickle(ConversionError):
  """A checkpoint that holds Python objects besides tensors, read without `trust_pickle`;
  `path` is the file, so each command can name its own opt-in."""

  def __init__(self, message: str, path: str):
    super().__init__(message)
    self.path = path


# Where trainers keep the network's state_dict inside a checkpoint, tried in this order.
CONTAINER_KEYS = ('state_dict', 'model', 'model_state_dict', 'online_backbone')

# Prefixes left by DataParallel/DDP and by wrapper modules; stripped while every key has one.
PREFIXES = ('module.model.', 'module.', 'model.')


@dataclasses.dataclass(frozen=True)
class DropRule:
  """Keys that are not part of the network and are dropped on purpose, under a reported name."""

  name: str
  pattern: str
  reason: str

  def matches(self, key: str) -> bool:
    return re.search(self.pattern, key) is not None


DROP_RULES = (
    DropRule('robustness_attacker', r'^(module\.)?attacker\.',
             "robustness library: the attacker's second copy of the model"),
    DropRule('robustness_normalizer', r'^(module\.)?normalizer\.',
             'robustness library: input normaliser buffers (their mean and std become the '
             "model's normalisation)"),
    DropRule('aux_bn', r'(^|\.)aux_bn\.',
             'shape/texture-debiased training: auxiliary BatchNorm used only in training'),
    DropRule('num_batches_tracked', r'(^|\.)num_batches_tracked$',
             'BatchNorm step counter, unused at inference'),
)


# Checkpoints that ship inside installed packages, asked for as 'bundled:NAME' (a family's
# converter registers its own; lc_jax.checkpoints reads every kind of checkpoint argument).
BUNDLED_PREFIX = 'bundled:'
BUNDLED: dict[str, Callable[[], str]] = {}


def register_bundled(name: str, locate: Callable[[], str]) -> None:
  """Makes `bundled:<name>` resolve to the path that `locate()` returns."""
  BUNDLED[name] = locate


def resolve(src: str) -> str:
  """The file a local checkpoint argument names: a path, or 'bundled:NAME' for a checkpoint
  shipped in an installed package."""
  if not src.startswith(BUNDLED_PREFIX):
    return os.path.abspath(os.path.expanduser(src))
  name = src[len(BUNDLED_PREFIX):]
  if name not in BUNDLED:
    raise ConversionError(f'unknown bundled checkpoint {name!r}; known: '
                          f'{", ".join(sorted(BUNDLED)) or "none"}')
  return BUNDLED[name]()


@dataclasses.dataclass
class Checkpoint:
  """A read checkpoint: the network's tensors and how they were found."""

  path: str
  sha256: str
  format: str
  container: list[str]
  prefix: str
  tensors: dict[str, np.ndarray]
  dropped: dict[str, list[str]]
  # (mean, std) of the input normaliser the file holds as buffers (`normalizer`), or None
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None


# The robustness library's input normaliser: buffers of the model, kept beside its weights.
_NORMALIZER = re.compile(r'^(module\.)?normalizer\.new_(mean|std)$')


def normalizer(tensors: Mapping[str, np.ndarray], path: str
               ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
  """(mean, std) of the input normaliser a checkpoint holds (`normalizer.new_mean` and
  `normalizer.new_std`, as the robustness library saves them), or None when it holds none.
  Values are read at float32 precision (0.485, not 0.48500001430511475)."""
  found = {}
  for key, value in tensors.items():
    match = _NORMALIZER.match(key)
    if match:
      found[match.group(2)] = (key, value)
  if not found:
    return None
  if len(found) != 2:
    (key, _), = found.values()
    raise ConversionError(f'{path} holds {key} without its '
                          f'{"new_std" if "mean" in found else "new_mean"}: an input normaliser '
                          'needs both')
  values = {}
  for which, (key, value) in found.items():
    flat = np.asarray(value, np.float32).reshape(-1)
    if flat.size != 3 or not np.isfinite(flat).all() or (which == 'std' and (flat <= 0).any()):
      raise ConversionError(f'{path}: {key} holds {flat.tolist()[:6]}; an input normaliser '
                            'holds three finite numbers, one per RGB channel (a std above 0)')
    values[which] = tuple(float(str(v)) for v in flat)
  return values['mean'], values['std']


def read(path: str, trust_pickle: bool = False,
         drop_rules: Iterable[DropRule] = DROP_RULES, *,
         container: Sequence[str] | None = None,
         allowed_globals: Iterable[type] = ()) -> Checkpoint:
  """Reads `path` (a file, or 'bundled:NAME') into a flat state_dict of numpy arrays.

  The state_dict is unwrapped from its container (found among CONTAINER_KEYS, or exactly at
  `container`, e.g. ('model',)), keys matched by a `drop_rules` entry are removed and reported,
  and DataParallel/wrapper prefixes are stripped. `allowed_globals` are classes of plain data
  (e.g. argparse.Namespace) that may be unpickled besides tensors without `trust_pickle`.
  """
  path, fmt, obj = load(path, trust_pickle, allowed_globals)
  state, found = select(obj, path, container)
  arrays = as_numpy(state)
  tensors, dropped, prefix = clean(arrays, drop_rules)
  return Checkpoint(path=path, sha256=sha256(path), format=fmt, container=found,
                    prefix=prefix, tensors=tensors, dropped=dropped,
                    normalization=normalizer(arrays, path))


def load(path: str, trust_pickle: bool = False,
         allowed_globals: Iterable[type] = ()) -> tuple[str, str, Any]:
  """(resolved path, format, the unpickled object) of a checkpoint file, nothing unwrapped.

  Besides tensors and plain containers only `allowed_globals` are unpickled, unless
  `trust_pickle`; the format is told by the file's first bytes, not its name.
  """
  path = resolve(path)
  if not os.path.exists(path):
    raise ConversionError(f'checkpoint not found: {path}')
  if not os.path.isfile(path):
    raise ConversionError(f'checkpoint is not a file: {path}')
  allowed = tuple(allowed_globals)
  with open(path, 'rb') as f:
    head = f.read(16)
  fmt = _sniff(head)
  if fmt == 'safetensors':
    obj = _read_safetensors(path)
  elif fmt in ('torch-zip', 'torch-legacy'):
    plain = _read_torch_zip if fmt == 'torch-zip' else _read_torch_legacy
    try:
      obj = plain(path, allowed)
    except _Damaged as e:  # torch.load fails on it too: no need of torch to say so
      raise ConversionError(_damaged_message(path, str(e))) from None
    if obj is None:  # holds more than tensors and plain containers: torch reads it
      obj = _read_torch(path, trust_pickle, allowed)
  else:
    raise ConversionError(f'{path} is not a checkpoint: expected a PyTorch file (.pth, .pt, '
                          '.pth.tar, .ckpt) or a .safetensors file')
  return path, fmt, obj


def select(obj: Any, path: str,
           container: Sequence[str] | None = None) -> tuple[Mapping[str, Any], list[str]]:
  """(state_dict, the keys that lead to it): found among CONTAINER_KEYS when `container` is
  None, else exactly at `container` (a missing entry, or one holding more than tensors, is an
  error: a layout that names its container must not guess)."""
  if container is None:
    return _unwrap(obj, path)
  state = obj
  for depth, key in enumerate(container):
    if not isinstance(state, Mapping) or not isinstance(state.get(key), Mapping):
      where = ''.join(f"['{k}']" for k in container[:depth]) or 'top level'
      found = (f'keys {sorted(map(str, state))[:8]}' if isinstance(state, Mapping)
               else f'a {type(state).__name__}')
      raise ConversionError(f"{path} has no state_dict under {key!r}: its {where} holds {found}")
    state = state[key]
  others = [str(k) for k, v in state.items() if not _is_tensor(v)]
  if others:
    at = ''.join(f"['{k}']" for k in container)
    raise ConversionError(f'{path}{at} is not a state_dict: it holds non-tensor entries '
                          f'{sorted(others)[:4]}')
  return state, list(container)


def as_numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """A state_dict of torch tensors or numpy arrays as numpy arrays (float widened to float32)."""
  return {k: _to_numpy(v) for k, v in state.items()}


def clean(tensors: dict[str, np.ndarray], drop_rules: Iterable[DropRule] = DROP_RULES
          ) -> tuple[dict[str, np.ndarray], dict[str, list[str]], str]:
  """(kept tensors, {rule name: dropped keys}, stripped prefix).

  Each key goes to the first rule that matches it, by its name in the file; prefixes are
  stripped from the kept keys afterwards, while every kept key has one.
  """
  rules = tuple(drop_rules)
  kept: dict[str, np.ndarray] = {}
  dropped: dict[str, list[str]] = {}
  for key, value in tensors.items():
    rule = next((r for r in rules if r.matches(key)), None)
    if rule is None:
      kept[key] = value
    else:
      dropped.setdefault(rule.name, []).append(key)
  kept, prefix = _strip_prefixes(kept)
  return kept, dropped, prefix


sha256 = file_sha256  # a checkpoint is identified by its bytes


def _sniff(head: bytes) -> str | None:
  if head.startswith(b'PK\x03\x04'):
    return 'torch-zip'
  if head[:1] == b'\x80' and len(head) > 1 and head[1] in range(2, 6):
    return 'torch-legacy'
  if len(head) >= 9 and head[8:9] == b'{':
    return 'safetensors'
  return None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError, json.JSONDecodeError, struct.error) as e:
    raise ConversionError(f'cannot read {path}: truncated or not a safetensors file ({e})') from None


# Storage classes a torch zip checkpoint's pickle names -> numpy dtypes (bfloat16 is read as
# uint16 and widened below).
_STORAGES = {'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
             'BFloat16Storage': 'bfloat16', 'LongStorage': np.int64, 'IntStorage': np.int32,
             'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
             'BoolStorage': np.bool_}


class _PlainUnpickler(pickle.Unpickler):
  """Unpickles tensors, parameters, ordered dicts and the `allowed` classes of plain data into
  numpy without torch, and stops at anything else (nothing of the file is run). Storages come
  from `persistent_load`, which each format defines; this one refuses them."""

  def __init__(self, file, allowed: tuple[type, ...] = ()):
    super().__init__(file, encoding='utf-8')  # torch.load's encoding, for Python 2 files
    self.allowed = {(c.__module__, c.__qualname__): c for c in allowed}

  def find_class(self, module: str, name: str):
    if (module, name) in self.allowed:
      return self.allowed[(module, name)]
    if (module, name) == ('collections', 'OrderedDict'):
      return collections.OrderedDict
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return self.rebuild_tensor
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return lambda data, requires_grad, hooks: data
    if module == 'torch' and name in _STORAGES:
      return _STORAGES[name]
    raise _NotPlain(f'{module}.{name}')

  def persistent_load(self, pid):
    raise _NotPlain('a storage outside the main pickle')

  def rebuild_tensor(self, storage, offset, size, stride, *unused):
    return _rebuild_tensor(storage, offset, size, stride, *unused)


class _TensorUnpickler(_PlainUnpickler):
  """A torch zip checkpoint's `data.pkl`, its storages read from the archive's `data/` files."""

  def __init__(self, archive: zipfile.ZipFile, prefix: str, allowed: tuple[type, ...] = ()):
    super().__init__(io.BytesIO(archive.read(prefix + 'data.pkl')), allowed)
    self.archive, self.prefix = archive, prefix
    self.storages: dict[str, np.ndarray] = {}

  def persistent_load(self, pid):
    kind, dtype, key, _, numel = pid
    if kind != 'storage' or not isinstance(numel, int) or numel < 0:
      raise _NotPlain(kind)
    if key not in self.storages:  # tensors sharing a storage share one read
      name = f'{self.prefix}data/{key}'
      if name not in self.archive.NameToInfo:
        raise _Damaged(f'the archive has no {name}')
      raw = self.archive.read(name)
      if len(raw) < numel * _itemsize(dtype):
        raise _Damaged(f'{name} holds {len(raw)} bytes, its tensors need '
                       f'{numel * _itemsize(dtype)}')
      self.storages[key] = _storage(raw, dtype, numel)
    return self.storages[key]


def _itemsize(dtype) -> int:
  return 2 if dtype == 'bfloat16' else np.dtype(dtype).itemsize


def _storage(raw, dtype, numel: int, offset: int = 0) -> np.ndarray:
  """`numel` elements of `dtype` from the bytes `raw` at byte `offset`, without a copy but for
  bfloat16, which is widened exactly (it is the top half of a float32)."""
  if dtype == 'bfloat16':
    return (np.frombuffer(raw, np.uint16, numel, offset).astype(np.uint32) << 16).view(np.float32)
  return np.frombuffer(raw, dtype, numel, offset)


# torch's legacy (non-zip) format: these three pickles, the main pickle, the storage keys, then
# each storage's element count (8 bytes, little-endian) and bytes (torch/serialization.py).
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_LEGACY_PROTOCOL = 1001


class _LegacyUnpickler(_PlainUnpickler):
  """The main pickle of a torch legacy file. Its storages' bytes follow it in the file, so it is
  read twice: first to learn each storage's type and size (`storages` None: no tensor is
  built), then with the storages read."""

  def __init__(self, file, storages: dict[str, np.ndarray] | None,
               allowed: tuple[type, ...] = ()):
    super().__init__(file, allowed)
    self.storages = storages
    self.wanted: dict[str, tuple[Any, int]] = {}  # key -> (dtype, element count)

  def persistent_load(self, pid):
    if not isinstance(pid, tuple) or len(pid) != 6:
      raise _NotPlain('a persistent id besides storages')
    kind, dtype, key, _, numel, view = pid
    kind = kind.decode('ascii') if isinstance(kind, bytes) else kind
    if (kind != 'storage' or not isinstance(key, str) or not isinstance(numel, int) or numel < 0
        or not any(dtype is d for d in _STORAGES.values())):
      raise _NotPlain(str(kind))
    if self.wanted.setdefault(key, (dtype, numel)) != (dtype, numel):
      raise _NotPlain('one storage of two types or sizes')
    if self.storages is None:
      return None
    storage = self.storages[key]
    if view is None:
      return storage
    _, offset, count = view  # a view of the storage, written by torch before 1.0
    if not (isinstance(offset, int) and isinstance(count, int) and 0 <= offset
            and 0 <= count and offset + count <= len(storage)):
      raise _NotPlain('a view outside its storage')
    return storage[offset:offset + count]

  def rebuild_tensor(self, storage, offset, size, stride, *unused):
    if self.storages is None:
      return None
    return _rebuild_tensor(storage, offset, size, stride, *unused)


def _plain_or_none(read) -> Any | None:
  """`read()`'s tensors in plain containers; None where torch.load must read the file (it holds
  more than tensors, or anything unusual); `_Damaged` for a file cut short or damaged."""
  try:
    return read()
  except _NotPlain:
    return None  # torch.load reads it, or refuses it
  except _Damaged:
    raise
  except _DAMAGE as e:
    raise _Damaged(_first_line(e)) from None
  except Exception:  # pylint: disable=broad-except
    return None  # anything unusual: torch.load reads it, or says what is wrong


def _read_torch_legacy(path: str, allowed: tuple[type, ...] = ()) -> Any | None:
  """A torch legacy (non-zip) checkpoint of tensors in plain containers, read without torch;
  None when it holds anything else (torch then reads it, or says what is wrong). A file cut
  short or damaged, on which torch.load fails too, raises `_Damaged`."""
  with open(path, 'rb') as f:
    raw = f.read()
  return _plain_or_none(lambda: _plain_legacy(raw, allowed))


def _plain_legacy(raw: bytes, allowed: tuple[type, ...]) -> Any | None:
  stream = io.BytesIO(raw)
  magic, protocol, sys_info = (_PlainUnpickler(stream).load() for _ in range(3))
  if magic != _LEGACY_MAGIC:
    raise _Damaged("it starts with a pickle, but not with torch's magic number")
  if protocol != _LEGACY_PROTOCOL or not isinstance(sys_info, dict):
    raise _Damaged(f"protocol {protocol!r}, not torch's {_LEGACY_PROTOCOL}")
  if sys_info.get('little_endian') is not True:
    return None  # big-endian: torch.load reads it
  start = stream.tell()
  scan = _LegacyUnpickler(stream, None, allowed)
  scan.load()
  keys = _PlainUnpickler(stream).load()
  if not isinstance(keys, list) or sorted(keys) != sorted(scan.wanted):
    raise _Damaged('its list of storages is not that of its tensors')
  storages: dict[str, np.ndarray] = {}
  at = stream.tell()
  for key in keys:
    dtype, numel = scan.wanted[key]
    count, = struct.unpack_from('<q', raw, at)
    at += 8
    if count != numel:
      raise _Damaged(f'storage {key} holds {count} elements, its tensors {numel}')
    if at + count * _itemsize(dtype) > len(raw):
      raise _Damaged(f'cut short: storage {key} ends at byte {at + count * _itemsize(dtype)} '
                     f'of a file of {len(raw)}')
    storages[key] = _storage(raw, dtype, count, at)
    at += count * _itemsize(dtype)
  stream.seek(start)
  return _LegacyUnpickler(stream, storages, allowed).load()


class _NotPlain(Exception):
  """Something besides tensors and plain containers: torch.load reads it, or refuses it."""


class _Damaged(Exception):
  """A torch file cut short or damaged (torch.load fails on it too); the message says how."""


# What reading a cut or damaged file raises (a bad archive, a pickle cut short or garbled).
_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, pickle.UnpicklingError, struct.error)


def _damaged_message(path: str, reason: str) -> str:
  return f'cannot read {path}: truncated or not a PyTorch checkpoint ({reason})'


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused
  numbers = [offset, *size, *stride]
  if (not all(isinstance(n, int) and n >= 0 for n in numbers) or len(size) != len(stride)
      or (math.prod(size) and offset + sum((n - 1) * s for n, s in zip(size, stride))
          >= len(storage))):
    raise _NotPlain('a tensor outside its storage')  # torch.load refuses it with a reason
  view = np.lib.stride_tricks.as_strided(storage[offset:], tuple(size),
                                         tuple(s * storage.itemsize for s in stride))
  array = np.array(view)  # owns its memory, writable
  return array.astype(np.float32) if array.dtype.kind == 'f' else array


def _read_torch_zip(path: str, allowed: tuple[type, ...] = ()) -> Any | None:
  """A torch zip checkpoint of tensors in plain containers, read without torch (faster, and no
  torch in memory); None when it holds anything else (torch then reads it, or says what is
  wrong). A file cut short or damaged, on which torch.load fails too, raises `_Damaged`."""
  def read():
    with zipfile.ZipFile(path) as archive:
      pickles = [n for n in archive.namelist() if n.endswith('/data.pkl')]
      if not pickles:
        raise _Damaged('a zip archive without the data.pkl of a PyTorch file')
      if len(pickles) != 1:
        return None
      prefix = pickles[0][:-len('data.pkl')]
      if prefix + 'byteorder' in archive.namelist() and archive.read(
          prefix + 'byteorder') != b'little':
        return None
      return _TensorUnpickler(archive, prefix, allowed).load()

  return _plain_or_none(read)


def _read_torch(path: str, trust_pickle: bool, allowed: tuple[type, ...] = ()) -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError(f'reading {path} needs PyTorch: pip install "lc-jax[torch]", or '
                          'convert the checkpoint to .safetensors') from None
  try:
    with _safe_globals(torch, allowed):
      return torch.load(path, map_location='cpu', weights_only=not trust_pickle)
  except torch.serialization.pickle.UnpicklingError as e:
    if trust_pickle:
      raise ConversionError(f'cannot unpickle {path}: {_first_line(e)}') from None
    raise UntrustedPickle(
        f'{path} holds Python objects besides tensors, and unpickling them can run code from '
        'the file; if you trust it, allow it: --config.model.trust_pickle=true for run.py, '
        '--trust_pickle for python -m converters, trust_pickle=True in Python', path) from None
  except (RuntimeError, EOFError, OSError, ValueError) as e:
    raise ConversionError(_damaged_message(path, _first_line(e))) from None
  except Exception as e:  # pylint: disable=broad-except
    # Unpickling a trusted file runs its code: any error of that code ends up here.
    raise ConversionError(f'cannot load {path}: {type(e).__name__}: {_first_line(e)}') from None


def _safe_globals(torch, allowed: tuple[type, ...]):
  """A context in which torch's weights-only unpickler also accepts the `allowed` classes."""
  if not allowed:
    return contextlib.nullcontext()
  scoped = getattr(torch.serialization, 'safe_globals', None)  # torch >= 2.5
  if scoped is not None:
    return scoped(list(allowed))
  torch.serialization.add_safe_globals(list(allowed))  # torch 2.4: for the whole process
  return contextlib.nullcontext()


def _first_line(error: BaseException) -> str:
  # Torch's messages run on for several sentences of advice; the first says what happened.
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text.split('. ')[0].rstrip('.')


def _is_tensor(value: Any) -> bool:
  return isinstance(value, np.ndarray) or type(value).__name__ in ('Tensor', 'Parameter')


def _unwrap(obj: Any, path: str) -> tuple[Mapping[str, Any], list[str]]:
  container: list[str] = []
  while isinstance(obj, Mapping):
    if obj and all(_is_tensor(v) for v in obj.values()):
      return obj, container
    key = next((k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if key is None:
      break
    container.append(key)
    obj = obj[key]
  found = (f'top-level keys {sorted(map(str, obj))[:8]}' if isinstance(obj, Mapping)
           else f'a {type(obj).__name__}')
  raise ConversionError(
      f'found no state_dict in {path}: it holds {found}; expected a dict of tensors, or one '
      f'under {", ".join(repr(k) for k in CONTAINER_KEYS)}')


def _to_numpy(value: Any) -> np.ndarray:
  if isinstance(value, np.ndarray):
    return value
  value = value.detach().cpu()
  if value.is_floating_point():
    value = value.float()  # bfloat16/float16 widen exactly; numpy has no bfloat16
  return value.numpy()


def _strip_prefixes(tensors: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str]:
  stripped = ''
  while tensors:
    prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in tensors)), None)
    if prefix is None:
      break
    tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    stripped += prefix
  return tensors, stripped
