r"""The paper's protocol on a Vision Transformer: only a timm checkpoint path is needed.

    python run.py --config=configs/vit.py --workdir=out/vit_small \
      --config.model.checkpoint=/ckpt/vit_small_patch16_224.safetensors \
      --config.data.path=/data/imagenet/val

The checkpoint is timm's (a .pth, or the model.safetensors of a Hub repo timm/vit_*): the
variant is told from its keys; a DeiT of the same size needs
--config.model.arch=deit_small_patch16_224 (its input normalisation differs). Every Conv2d and
Linear (the patch embedding, each block's qkv, proj, fc1 and fc2, the head: 50 layers), fresh
resets from timm's ViT init, 3 trials; add layernorm,embedding to the layer types for the norms,
the position embedding and the class token. The ViT's position embedding fixes its input at
224, which the paper's Resize(256) + CenterCrop(224) gives. `:tfds` reads ImageNet through tfds.
"""

from lc_jax import config as lc_config


def get_config(arg=None):
  """The protocol on a ViT; `arg` 'tfds' switches the image source to tfds."""
  config = lc_config.default()
  config.model.arch = ''  # inferred from the checkpoint
  if arg == 'tfds':
    config.data.source = 'tfds'
  elif arg:
    raise ValueError(f'unknown config argument {arg!r}; use configs/vit.py or :tfds')
  return config
