"""torch's legacy (non-zip) checkpoint format read without torch: the bundled EfficientNet-Lite0
and files torch writes, bit for bit as torch.load reads them; nothing in a file runs."""

import argparse
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from converters import reader  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in a fresh interpreter in which `import torch` fails: reads argv[1] with reader.load and
# saves what it holds (a dict of arrays, in order) to argv[2] as .npz.
_WITHOUT_TORCH = '''
import sys
sys.modules['torch'] = None  # importing torch raises ImportError
import numpy as np
from converters import reader
path, fmt, obj = reader.load(sys.argv[1])
assert fmt == 'torch-legacy', fmt
assert 'torch' not in sys.modules or sys.modules['torch'] is None
names = list(obj)
np.savez(sys.argv[2], names=np.array(names), **{f'a{i}': obj[n] for i, n in enumerate(names)})
'''


def _read_without_torch(path, out):
  result = subprocess.run([sys.executable, '-c', _WITHOUT_TORCH, str(path), str(out)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  with np.load(out) as saved:
    names = [str(n) for n in saved['names']]
    return {n: saved[f'a{i}'] for i, n in enumerate(names)}


def _assert_bit_exact(got, want):
  """`got` (the reader's arrays) holds `want`'s tensors (torch's) under the same names in the
  same order, with the reader's dtypes (floats widened to float32), shapes and bytes."""
  assert list(got) == list(want)
  for name, tensor in want.items():
    expected = reader._to_numpy(tensor)  # pylint: disable=protected-access
    assert got[name].dtype == expected.dtype, name
    assert got[name].shape == expected.shape, name
    assert got[name].tobytes() == expected.tobytes(), name


def test_bundled_lite0_is_read_without_torch_bit_exactly(tmp_path):
  from converters import efficientnet  # pylint: disable=g-import-not-at-top
  path = efficientnet.locate_bundled_lite0()
  with open(path, 'rb') as f:
    assert f.read(4) == b'\x80\x02\x8a\x0a'  # a legacy file: a pickled magic number first
  got = _read_without_torch(path, tmp_path / 'lite0.npz')
  want = torch.load(path, map_location='cpu', weights_only=True)
  assert len(want) == 296
  _assert_bit_exact(got, want)


def test_legacy_files_torch_writes_are_read_as_torch_reads_them(tmp_path):
  torch.manual_seed(0)
  shared = torch.randn(10)
  state = {
      'float32': torch.randn(3, 4), 'float16': torch.randn(5).half(),
      'int64': torch.arange(-3, 4), 'bfloat16': torch.randn(2, 3).bfloat16(),
      'float64': torch.randn(2, 2).double(), 'bool': torch.rand(6) > 0.5,
      'int32': torch.arange(4, dtype=torch.int32), 'uint8': torch.arange(5, dtype=torch.uint8),
      'shared': shared, 'view': shared[3:7], 'strided': shared[1::3],  # one storage, offsets
      'transposed': torch.randn(4, 6).t(), 'scalar': torch.tensor(2.5), 'empty': torch.zeros(0, 3),
      'param': torch.nn.Parameter(torch.randn(2)),
  }
  path = tmp_path / 'legacy.pth'
  torch.save({'state_dict': state, 'epoch': 7, 'arch': 'x'}, path,
             _use_new_zipfile_serialization=False)
  with open(path, 'rb') as f:
    assert f.read(2) == b'\x80\x02'  # legacy, not a zip
  fast = reader._read_torch_legacy(str(path))  # pylint: disable=protected-access
  slow = torch.load(path, weights_only=True)
  assert fast['epoch'] == 7 and fast['arch'] == 'x'
  _assert_bit_exact(fast['state_dict'], slow['state_dict'])
  assert fast['state_dict']['view'].tolist() == shared[3:7].tolist()
  # The same in an interpreter without torch, through reader.load.
  torch.save(state, tmp_path / 'flat.pth', _use_new_zipfile_serialization=False)
  _assert_bit_exact(_read_without_torch(tmp_path / 'flat.pth', tmp_path / 'flat.npz'), state)
  # Plain data classes a layout allows are read too; unknown ones go to torch.load, which decides.
  torch.save({'state_dict': state, 'args': argparse.Namespace(lr=0.1)}, tmp_path / 'args.pth',
             _use_new_zipfile_serialization=False)
  allowed = reader._read_torch_legacy(  # pylint: disable=protected-access
      str(tmp_path / 'args.pth'), (argparse.Namespace,))
  assert allowed['args'] == argparse.Namespace(lr=0.1)
  assert reader._read_torch_legacy(str(tmp_path / 'args.pth')) is None  # pylint: disable=protected-access
  with pytest.raises(reader.UntrustedPickle):
    reader.load(str(tmp_path / 'args.pth'))


def test_damaged_legacy_file_goes_to_torch_which_explains(tmp_path):
  path = tmp_path / 'legacy.pth'
  torch.save({'w': torch.randn(100, 100)}, path, _use_new_zipfile_serialization=False)
  cut = tmp_path / 'cut.pth'
  cut.write_bytes(path.read_bytes()[:20_000])
  with pytest.raises(reader._Damaged, match='cut short'):  # pylint: disable=protected-access
    reader._read_torch_legacy(str(cut))  # pylint: disable=protected-access
  with pytest.raises(reader.ConversionError, match='truncated or not a PyTorch checkpoint'):
    reader.load(str(cut))
  with pytest.raises(Exception):  # torch.load fails on it too
    torch.load(cut, weights_only=True)


# Reads each of argv[1:] with reader.load in an interpreter without torch; prints one line for
# each: the error's, or 'read'.
_ERRORS_WITHOUT_TORCH = """
import sys
sys.modules['torch'] = None  # importing torch raises ImportError
from converters import reader
for path in sys.argv[1:]:
  try:
    reader.load(path)
    print('read')
  except reader.ConversionError as e:
    print(str(e).replace(chr(10), ' NEWLINE '))
"""


def _errors_without_torch(paths):
  result = subprocess.run([sys.executable, '-c', _ERRORS_WITHOUT_TORCH, *map(str, paths)],
                          cwd=ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def test_damaged_files_are_called_damaged_without_torch(tmp_path):
  # A torch file cut short or garbled is damaged, with torch or without: the base install says
  # so, and does not send its user to install torch to learn it.
  state = {'w': torch.randn(100, 100), 'b': torch.randn(100)}
  torch.save(state, tmp_path / 'zip.pth')
  torch.save(state, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
  zipped, legacy = (tmp_path / 'zip.pth').read_bytes(), (tmp_path / 'legacy.pth').read_bytes()
  garbled = bytearray(zipped)
  at = zipped.index(b'data.pkl') + 40  # inside the pickle's stored bytes: its CRC fails
  garbled[at:at + 8] = b'\xff' * 8
  plain = pickle.dumps({'w': 1.0}, protocol=2)  # a pickle, but not torch's: starts like one
  cases = {
      'zip cut': zipped[:len(zipped) // 2], 'zip cut to its pickle': zipped[:300],
      'zip garbled': bytes(garbled), 'legacy cut': legacy[:len(legacy) // 2],
      'legacy cut in its pickle': legacy[:120], 'plain pickle': plain,
  }
  paths = {}
  for name, data in cases.items():
    paths[name] = tmp_path / f'{name.replace(" ", "_")}.pth'
    paths[name].write_bytes(data)
    assert reader._sniff(data[:16]) in ('torch-zip', 'torch-legacy'), name  # pylint: disable=protected-access
    with pytest.raises(reader.ConversionError, match='truncated or not a PyTorch checkpoint'):
      reader.load(str(paths[name]))  # with torch
    with pytest.raises(Exception):  # which cannot read it either
      torch.load(paths[name], weights_only=True)
  torch.save({'w': state['w'], 'args': argparse.Namespace(lr=0.1)}, tmp_path / 'args.pth')
  intact = [tmp_path / 'zip.pth', tmp_path / 'legacy.pth']
  lines = _errors_without_torch([*paths.values(), *intact, tmp_path / 'args.pth'])
  for (name, path), line in zip(paths.items(), lines):
    print(f'{name}: {line}')
    assert line.startswith(f'cannot read {path}: truncated or not a PyTorch checkpoint ('), (
        name, line)
    assert 'needs PyTorch' not in line and 'NEWLINE' not in line, (name, line)
  # The intact files read without torch; one that holds more than tensors asks for torch.
  assert lines[len(paths):] == ['read', 'read', lines[-1]]
  assert 'needs PyTorch' in lines[-1]


class _Payload:
  """Unpickling this runs `touch MARKER`."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def _legacy_bytes(parts):
  return b''.join(pickle.dumps(p, protocol=2) for p in parts)


@pytest.mark.parametrize('where', ['magic', 'sys_info', 'main', 'keys'])
def test_malicious_legacy_pickle_is_refused_without_running(tmp_path, where):
  marker = tmp_path / 'ran'
  parts = {'magic': reader._LEGACY_MAGIC, 'protocol': reader._LEGACY_PROTOCOL,  # pylint: disable=protected-access
           'sys_info': {'protocol_version': 1001, 'little_endian': True,
                        'type_sizes': {'short': 2, 'int': 4, 'long': 4}},
           'main': {'w': 1}, 'keys': []}
  parts[where] = _Payload(marker)
  path = tmp_path / 'evil.pth'
  path.write_bytes(_legacy_bytes(parts.values()))
  assert reader._sniff(path.read_bytes()[:16]) == 'torch-legacy'  # pylint: disable=protected-access
  assert reader._read_torch_legacy(str(path)) is None  # pylint: disable=protected-access
  with pytest.raises(reader.ConversionError):  # torch's weights-only unpickler refuses it too
    reader.load(str(path))
  # Without torch: the one line that asks for it.
  code = ('import sys; sys.modules["torch"] = None\n'
          'from converters import reader\n'
          'try:\n  reader.load(sys.argv[1])\n'
          'except reader.ConversionError as e:\n  print(e)\n')
  result = subprocess.run([sys.executable, '-c', code, str(path)], cwd=ROOT,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  assert 'needs PyTorch' in result.stdout
  assert not marker.exists()
  pickle.loads(pickle.dumps(_Payload(marker)))  # the payload is live: plain pickle runs it
  assert marker.exists()
