r"""The bundled default: real ImageNet EfficientNet-Lite0 weights on scikit-image's photos, on CPU.

    python run.py --config=configs/demo.py --workdir=out/demo

Every layer (conv, depthwise conv, linear and BatchNorm: 99), reset fresh, 3 trials, on the 7
bundled photos (no labels, so accuracy columns stay empty). About 90 seconds on a 2-core CPU.
"""

from lc_jax import config as lc_config


def get_config(arg=None):
  """Demo configuration; `arg` is unused."""
  del arg
  config = lc_config.default()
  config.model.checkpoint = 'bundled:efficientnet_lite0'
  config.model.arch = 'efficientnet_lite0'
  config.data.source = 'photos'
  config.data.num_images = 0  # all of them
  config.data.order = 'sorted'
  config.data.batch_size = 8
  config.reset.layer_types = 'conv,linear,batchnorm'
  config.trials = 3
  return config
