r"""Parity report: a converted checkpoint in Flax against the same weights in timm, on real photos.

    python -m converters.parity bundled:efficientnet_lite0
    python -m converters.parity resnet50.pth --arch resnet50 --photos chelsea,coffee

Converts SRC, loads the converted variables back into the timm model of the same architecture
(strictly), runs both at float32 with matmul precision 'highest' on scikit-image's photos
(Resize(256), CenterCrop(224), /255, bit for bit as torchvision), and prints the top-5 classes
of each and the largest logit and block-activation differences. Needs the torch extra.
"""

from __future__ import annotations

import functools
from typing import Sequence

from absl import app
from absl import flags
import jax
import numpy as np

import converters
from converters import cli
from converters import mapping
from lc_jax import batches
from lc_jax import data
from lc_jax import errors
from lc_jax import launch
from lc_jax import models
from lc_jax.errors import UserError

PHOTOS = ('chelsea', 'coffee', 'rocket', 'astronaut')

# Defined when run as a program (`_run`): lc_jax.crossval imports this module as a library.
_ARCH = _PHOTOS = _TRUST_PICKLE = None


def photos(names: Sequence[str] = PHOTOS, resize: int = 256, crop: int = 224) -> np.ndarray:
  """scikit-image photos through the run's preprocessing (torchvision's Resize and CenterCrop,
  bit for bit), as NHWC float32 in [0, 1]."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  import skimage.data  # pylint: disable=g-import-not-at-top
  transform = data.Transform(resize, crop)
  batch = []
  for name in names:
    if not hasattr(skimage.data, name):
      raise errors.unknown('scikit-image photo', name, PHOTOS)
    image = PIL.Image.fromarray(getattr(skimage.data, name)()).convert('RGB')
    batch.append(batches.to_unit(transform(image)))
  return np.stack(batch)


def timm_name(arch: str) -> str:
  """The timm model of the registered architecture `arch`; one without is refused by name."""
  name = models.get(arch).timm_name
  if name is None:
    raise UserError(f'{arch} has no timm counterpart to compare with')
  return name


def torch_model(arch: str, variables: dict, num_classes: int):
  """The timm model of `arch` holding exactly `variables` (loaded strictly), in eval mode."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  name = timm_name(arch)
  model = timm.create_model(name, pretrained=False, num_classes=num_classes)
  state = {k: torch.from_numpy(np.array(v)) for k, v in mapping.to_state_dict(variables).items()}
  # Strict but for the BatchNorm step counters, which Flax does not keep.
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not k.endswith('num_batches_tracked')]
  if missing or unexpected:
    raise UserError(f'timm {name} does not match the Flax {arch}: missing '
                    f'{missing[:4]}, unexpected {unexpected[:4]}')
  return model.eval()


def compare(module, variables: dict, model, images: np.ndarray) -> dict:
  """Runs both models on `images`; returns their logits, and per compared tensor the max abs
  difference ('diffs') and the max abs torch value ('scales').

  Activations are compared at every Flax module (and sown intermediate) whose path is also a
  torch module name: block by block, not only at the logits.
  """
  import torch  # pylint: disable=g-import-not-at-top
  with jax.default_matmul_precision('highest'):
    flax_logits, state = _captured(module, variables, images)
  taps = flax_activations(state['intermediates'])
  modules = dict(model.named_modules())
  captured = {}  # cloned: timm applies in-place activations after many modules
  hooks = [modules[name].register_forward_hook(
      lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().cpu().clone()))
           for name in taps if name in modules]
  try:
    with torch.no_grad():
      mean = torch.tensor(module.mean).view(1, 3, 1, 1)
      std = torch.tensor(module.std).view(1, 3, 1, 1)
      x = (torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std
      torch_logits = model(x.to(_device(model))).cpu().numpy()
  finally:
    for hook in hooks:
      hook.remove()
  flax_logits = np.asarray(flax_logits)
  report = {'flax_logits': flax_logits, 'torch_logits': torch_logits,
            'diffs': {'logits': float(np.max(np.abs(flax_logits - torch_logits)))},
            'scales': {'logits': float(np.max(np.abs(torch_logits)))}}
  for name, value in captured.items():
    value = value.numpy()
    flax_value = np.asarray(taps[name])
    # Torch activations are NCHW, but some timm modules (a ConvNeXt block's norm and MLP) run
    # channels-last: each layout whose shape fits Flax's NHWC is compared (both when C = H = W)
    # and the closer one counts.
    layouts = [v for v in ((value.transpose(0, 2, 3, 1),) if value.ndim == 4 else ()) + (value,)
               if v.size == flax_value.size and (flax_value.ndim != 4 or v.shape == flax_value.shape)]
    if not layouts:
      raise ValueError(f'{name}: the Flax activation {flax_value.shape} fits no layout of the '
                       f'torch one {value.shape}')
    report['diffs'][name] = min(float(np.max(np.abs(flax_value.reshape(v.shape) - v)))
                                for v in layouts)
    report['scales'][name] = float(np.max(np.abs(value)))
  return report


@functools.partial(jax.jit, static_argnums=0)
def _captured(module, variables: dict, images):
  """The logits and every module's output (compiled once per module and input shape)."""
  return module.apply(variables, images, capture_intermediates=True, mutable=['intermediates'])


def _device(model):
  return next(model.parameters()).device


def flax_activations(intermediates: dict) -> dict[str, np.ndarray]:
  """{torch-style module name: activation} from captured and sown Flax intermediates."""
  found = {}

  def visit(prefix: tuple[str, ...], node):
    for key, value in node.items():
      if isinstance(value, dict):
        visit(prefix + (key,), value)
      elif key == '__call__':  # a module's output, captured
        found['.'.join(prefix)] = value[0]
      else:  # a sown value
        found['.'.join(prefix + (key,))] = value[0]

  visit((), intermediates)
  found.pop('', None)  # the model's own output: the logits
  return found


def _class_name(index: int) -> str:
  try:
    from timm.data import ImageNetInfo  # pylint: disable=g-import-not-at-top
    return ImageNetInfo().index_to_description(index).split(',')[0]
  except Exception:  # pylint: disable=broad-except
    return ''


@errors.exits_cleanly
def main(argv):
  src = cli.one_source(argv, 'python -m converters.parity SRC [--arch ARCH] (--help lists the '
                       'flags)')
  jax.config.update('jax_default_matmul_precision', 'highest')
  arch, variables, metadata = converters.convert(src, _ARCH.value,
                                                 trust_pickle=_TRUST_PICKLE.value)
  module = models.create_from_card(metadata)
  model = torch_model(arch, variables, metadata['num_classes'])
  images = photos(_PHOTOS.value)
  report = compare(module, variables, model, images)

  print(f"parity of {arch} from {metadata['source']} (sha256 {metadata['sha256'][:12]}...)")
  print(f'flax (jax {jax.__version__}, {jax.default_backend()}) vs timm {model.__class__.__name__}'
        f', float32, matmul precision highest, {len(images)} photos at {images.shape[1]}px\n')
  for i, name in enumerate(_PHOTOS.value):
    top_flax = np.argsort(-report['flax_logits'][i])[:5]
    top_torch = np.argsort(-report['torch_logits'][i])[:5]
    same = 'same' if list(top_flax) == list(top_torch) else 'DIFFERENT'
    print(f'{name:10s} top-1 {top_flax[0]:4d} {_class_name(top_flax[0])!r:28s} '
          f'top-5 {list(map(int, top_flax))} ({same} in torch)')
  diffs, scales = report['diffs'], report['scales']
  print(f'\nflax vs torch over {len(diffs) - 1} modules and the logits:')
  print(f'  {"":14s} {"max abs diff":>12s} {"max abs value":>13s}')
  for name, value in diffs.items():
    if '.' not in name:  # top-level modules; every module is in the overall maximum below
      print(f'  {name:14s} {value:12.3g} {scales[name]:13.3g}')
  worst = max(diffs, key=lambda k: diffs[k] / max(scales[k], 1e-30))
  print(f'  largest relative difference: {worst}, {diffs[worst] / scales[worst]:.3g}')


def _run() -> None:
  global _ARCH, _PHOTOS, _TRUST_PICKLE  # pylint: disable=global-statement
  _ARCH = flags.DEFINE_string('arch', None, 'Architecture; inferred from the checkpoint if '
                              'omitted.')
  _PHOTOS = flags.DEFINE_list('photos', list(PHOTOS), 'scikit-image photos to run.')
  _TRUST_PICKLE = flags.DEFINE_bool('trust_pickle', False, 'Allow legacy pickled checkpoints.')
  app.run(main, flags_parser=launch.parse_flags)


if __name__ == '__main__':
  _run()
