r"""Module criticality after Chatterji et al. (2020): how far back towards its initial weights
each layer can be moved before the accuracy drops, with the alphas vmapped.

    python examples/module_criticality.py [--threshold 0.05]

Trains the linen CNN of examples/linen_cnn.py, keeping its initial weights theta_0. For each
layer, theta = (1 - alpha) * theta_0 + alpha * theta_trained on that layer only (lc_jax.reset's
'interpolate', a pure function), for 21 alphas from 0 to 1 evaluated at once under jax.vmap;
the layer's alpha* is the smallest alpha whose accuracy stays within the threshold of the
trained model's. A layer with alpha* 0 can go back to its initialisation unharmed; alpha* near 1
marks a critical one.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import linen_cnn  # pylint: disable=g-import-not-at-top,wrong-import-position
import stripes  # pylint: disable=g-import-not-at-top,wrong-import-position

from lc_jax import adapters  # pylint: disable=g-import-not-at-top,wrong-import-position
from lc_jax import layers as layers_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from lc_jax import reset  # pylint: disable=g-import-not-at-top,wrong-import-position

ALPHAS = np.linspace(0.0, 1.0, 21)


def accuracies(model, variables, initial, target, images, labels, alphas) -> np.ndarray:
  """Accuracy of the model with `target` interpolated at each of `alphas` (one vmapped call)."""
  def one(alpha):
    moved = reset.interpolate(variables, target.layers, initial, alpha)
    return jnp.mean(jnp.argmax(model.apply(moved, images), -1) == labels)
  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(alphas)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--threshold', type=float, default=0.05,
                      help='accuracy the model may lose (absolute)')
  args = parser.parse_args()
  images, labels = stripes.dataset(128, seed=0)
  initial, trained = linen_cnn.train(images, labels)
  test_images, test_labels = stripes.dataset(128, seed=1)
  model = linen_cnn.CNN()
  baseline = linen_cnn.accuracy(trained, test_images, test_labels)
  print(f'trained: test accuracy {baseline:.1%}; alpha* = the smallest alpha within '
        f'{args.threshold:.0%} of it')
  found = adapters.linen_inventory(model, test_images[:1])
  for target in layers_lib.select(found, ['conv', 'linear', 'batchnorm']):
    curve = accuracies(model, trained, initial, target, test_images, test_labels, ALPHAS)
    alpha = ALPHAS[np.argmax(curve >= baseline - args.threshold)]
    print(f'  {target.name:12s} alpha* {alpha:.2f}   accuracy at alpha 0: {curve[0]:.1%}')


if __name__ == '__main__':
  main()
