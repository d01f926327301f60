"""A researcher's own Flax model for run.py: `--config.model.factory=package.module:function`.

The function takes no arguments and returns the model with its trained weights:
- `(module, variables)`: a `flax.linen.Module` and its variables ({'params': ...,
  'batch_stats': ...}, as `module.init` or a checkpoint gives them);
- or a `flax.nnx.Module`, its weights inside.

The model takes float32 NHWC images in [0, 1], as registered models do: normalisation is part of
the model; `data.*` gives the preprocessing (resize, crop). Its layers are found as
`lc_jax.criticality` finds them (lc_jax.adapters), and a fresh model per trial is drawn by the
model's own initialisers (linen), flax's defaults per layer class (NNX), or `reset.init_scheme`.
A registered architecture keeps prefix reuse; any other model runs whole for every reset.

The run's identity holds the factory's name (in the config) and the digest of the variables it
returned, so a changed model is refused on resume as a changed checkpoint is.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable

import flax.linen as nn
from flax import nnx
import jax
import numpy as np

from lc_jax import adapters
from lc_jax import models
from lc_jax.errors import UserError

PREFIX = 'factory:'  # a factory model's `arch` in run.json, before the factory's name
_SPEC = re.compile(r'[A-Za-z_][\w.]*:[A-Za-z_]\w*')


@dataclasses.dataclass
class Made:
  """What a factory gave, adapted: the model as the loop takes it, and its facts."""

  adapted: adapters.Adapted
  num_classes: int
  sha256: str  # of the variables (lc_jax.models.store.digest)
  name: str  # the function's name, the rows' default model_id


def check(spec: str) -> None:
  """Refuses a factory that is not written `package.module:function`."""
  if not _SPEC.fullmatch(spec):
    raise UserError(f'model.factory={spec!r} is not package.module:function (a Python function '
                    'that returns (linen module, variables) or an NNX module)')


def load(spec: str) -> Callable[[], Any]:
  """The function `spec` names, imported; one UserError when it cannot be."""
  check(spec)
  module_name, function_name = spec.split(':')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise UserError(f'model.factory={spec!r}: cannot import {module_name} ({e}); is it on '
                    'PYTHONPATH?') from None
  except Exception as e:  # pylint: disable=broad-except  # the user's module failed at import
    raise _raised(spec, f'importing {module_name}', e) from e
  function = getattr(module, function_name, None)
  if not callable(function):
    raise UserError(f'model.factory={spec!r}: {module_name} has no function {function_name}')
  return function


def _raised(spec: str, doing: str, error: Exception) -> UserError:
  """The one-line error of a factory whose own code raised while `doing`."""
  return UserError(f'model.factory={spec!r} raised {type(error).__name__} {doing}: '
                   f'{str(error).splitlines()[0] if str(error) else "(no message)"} (call it in '
                   'Python to see the traceback)')


def make(spec: str, image_size: int, scheme: str = '') -> Made:
  """Calls the factory `spec` and adapts what it returns (traced on one image of
  `image_size` x `image_size` x 3, nothing computed)."""
  function = load(spec)
  try:
    made = function()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # the user's code: one line, not a trace
    raise _raised(spec, 'calling it', e) from e
  if isinstance(made, nnx.Module):
    model, variables = made, None
  elif (isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], nn.Module)
        and isinstance(made[1], dict)):
    model, variables = made
    if not jax.tree.leaves(variables.get('params', {})):
      raise UserError(f'model.factory={spec!r} returned variables without params')
  else:
    raise UserError(f'model.factory={spec!r} returned a {type(made).__name__}; return '
                    '(linen module, variables) or an NNX module')
  example = np.zeros((1, image_size, image_size, 3), np.float32)  # a fresh linen model inits on it
  try:
    adapted = adapters.adapt(model, variables, example, scheme=scheme or None)
    logits = jax.eval_shape(adapted.apply, adapted.variables, example)
  except (TypeError, ValueError) as e:
    raise UserError(f'the model of model.factory={spec!r} does not run on images of shape '
                    f'{example.shape}: {str(e).splitlines()[0]}') from e
  if len(getattr(logits, 'shape', ())) != 2 or logits.shape[1] < 2:
    raise UserError(f'the model of model.factory={spec!r} must give logits (N, classes); it '
                    f'gave {getattr(logits, "shape", type(logits).__name__)}')
  # Host arrays: the run places them on its mesh in one transfer.
  adapted.variables = jax.tree.map(np.asarray, adapted.variables)
  return Made(adapted, int(logits.shape[1]), models.store.digest(adapted.variables),
              spec.split(':')[1])
