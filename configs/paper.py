r"""The paper's protocol: ImageNet val, 10,000 images in the reference DataLoader's order.

    python run.py --config=configs/paper.py --workdir=out/resnet50 \
      --config.model.checkpoint=/ckpt/resnet50.pth --config.data.path=/data/imagenet/val

`--config=configs/paper.py:tfds` reads imagenet2012 validation through tfds instead of an
ImageFolder (data.path is then the tfds data_dir, empty for the default). Conv + linear layers
(54 for ResNet-50, as the released results), fresh resets from the family's init, 3 trials,
seed 0, batch 500. Add batchnorm with --config.reset.layer_types=conv,linear,batchnorm.
"""

from lc_jax import config as lc_config


def get_config(arg=None):
  """The protocol; `arg` 'tfds' switches the image source to tfds."""
  config = lc_config.default()
  if arg == 'tfds':
    config.data.source = 'tfds'
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use configs/paper.py or :tfds')
  return config
