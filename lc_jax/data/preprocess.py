"""torchvision's evaluation preprocessing on PIL images, bit for bit, without torch.

    transform = Transform(resize_size=256, crop_size=224)
    pixels = transform(load_rgb(path))   # uint8 (224, 224, 3)

equals `np.asarray(CenterCrop(224)(Resize(256)(pil_loader(path))))` with torchvision's default
loader (`Image.open(f).convert('RGB')`). ToTensor's division by 255 is left to the model, so images
stay uint8 (a quarter of the memory) until they reach it.
"""

from __future__ import annotations

import dataclasses
import os
from typing import BinaryIO

import numpy as np
import PIL
from PIL import features
from PIL import Image

from lc_jax.errors import UserError


def load_rgb(file: str | os.PathLike | BinaryIO) -> Image.Image:
  """Decodes an image file (a path or a binary file object) to RGB, as torchvision's pil_loader.

  Grayscale, CMYK, palette and RGBA images go through PIL's `convert('RGB')` (alpha dropped,
  palette transparency ignored), exactly as the reference code's ImageFolder loads them. 16-bit
  grayscale (PNG, TIFF, PGM) is scaled to 8 bits first, `round(v * 255 / 65535)`, where
  `convert` would clip it (nearly all white); other integer or float images, whose range the
  file does not give, raise ValueError (a decode failure).
  """
  if isinstance(file, (str, os.PathLike)):
    with open(file, 'rb') as f:
      return _to_rgb(Image.open(f))
  return _to_rgb(Image.open(file))


# PIL's modes of 16-bit grayscale; PIL also opens 16-bit PGM and, in older releases, PNG as 'I'.
_SIXTEEN_BITS = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_SIXTEEN_BIT_FORMATS = ('PNG', 'PPM')


def _to_rgb(image: Image.Image) -> Image.Image:
  if image.mode in _SIXTEEN_BITS or (image.mode == 'I' and image.format in _SIXTEEN_BIT_FORMATS):
    pixels = np.asarray(image).astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 65535:
      raise ValueError(f'a 16-bit image (mode {image.mode}) with values outside 0..65535')
    return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8)).convert('RGB')
  if image.mode in ('I', 'F') or image.mode.startswith('I;'):
    raise ValueError(f'PIL mode {image.mode}: integers or floats whose range the file does not '
                     'give; save the image with 8 bits per channel')
  return image.convert('RGB')


@dataclasses.dataclass(frozen=True)
class Transform:
  """`Resize(resize_size)` (shorter side; bilinear, antialiased) and `CenterCrop(crop_size)`."""

  resize_size: int = 256
  crop_size: int = 224

  def __post_init__(self):
    for name in ('resize_size', 'crop_size'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f'data.{name} must be a positive integer, got {value!r}')

  def resized_shape(self, height: int, width: int) -> tuple[int, int]:
    """(height, width) after Resize: torchvision's `_compute_resized_output_size` for an int size.

    The longer side is `int(size * long / short)`: truncated, with that exact float expression.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = self.resize_size, int(self.resize_size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)

  def __call__(self, image: Image.Image) -> np.ndarray:
    """The resized, centre-cropped RGB image as uint8 (crop_size, crop_size, 3)."""
    height, width = self.resized_shape(image.height, image.width)
    if (height, width) != (image.height, image.width):
      # torchvision hands PIL images to Image.resize with BILINEAR, which always antialiases.
      image = image.resize((width, height), Image.BILINEAR)
    return center_crop(np.asarray(image), self.crop_size)

  def spec(self) -> dict:
    """Everything that decides the output pixels, for cache keys: sizes and the decoder versions.

    Pillow and libjpeg releases have changed resampling and IDCT results before, so a cache made
    with other versions is not reused.
    """
    return {'resize_size': self.resize_size, 'crop_size': self.crop_size,
            'interpolation': 'bilinear', 'pillow': PIL.__version__,
            'libjpeg': features.version('jpg')}


def center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
  """torchvision's CenterCrop on an (H, W, C) array: zero padding when too small, offsets rounded.

  Offsets are `int(round((H - size) / 2.0))`: Python rounds halves to even, so a 33-pixel margin
  gives 16 above and 17 below, as in torchvision.
  """
  height, width = pixels.shape[:2]
  if size > height or size > width:
    pad_h, pad_w = max(size - height, 0), max(size - width, 0)
    pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2),
                             (0, 0)))
    height, width = pixels.shape[:2]
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return np.ascontiguousarray(pixels[top:top + size, left:left + size])
