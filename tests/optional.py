"""Optional packages that tests import with care."""

import pytest


def tensorflow_datasets():
  """tensorflow_datasets, or the calling test (module) skipped without it.

  torch's compiler stack (torch._dynamo, which torchvision and timm import) segfaults when it is
  imported after TensorFlow (torch 2.14, tensorflow-cpu 2.21: `import tensorflow; import
  torch._dynamo`), so a pytest session that read tfds and then built a timm model crashed. It is
  imported first here, where torch is installed; lc-jax's own runs never import both.
  """
  try:
    import torch._dynamo  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pass
  return pytest.importorskip('tensorflow_datasets')
