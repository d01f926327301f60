r"""The bundled default: real ImageNet EfficientNet-Lite0 weights on scikit-image's photos, on CPU.

    python run.py --config=configs/demo.py --workdir=out/demo
"""

import ml_collections


def get_config(arg=None):
  """Demo configuration; `arg` is unused."""
  del arg
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict()
  config.model.arch = 'efficientnet_lite0'
  # A checkpoint file, or bundled:NAME for one shipped inside an installed package.
  config.model.checkpoint = 'bundled:efficientnet_lite0'
  config.model.trust_pickle = False
  return config
