"""The sha256 of a file, read in chunks: what checkpoints, zoo files and images are keyed by."""

import hashlib


def file_sha256(path: str) -> str:
  """The hex sha256 of the bytes of the file at `path`."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()
