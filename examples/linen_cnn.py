r"""Criticality of a small Flax (linen) CNN trained for a few steps with optax, layer by layer.

    python examples/linen_cnn.py [--plot criticality.png]

Trains a 3-conv CNN for 60 Adam steps on stripes (examples/stripes.py), then resets each conv,
Dense and BatchNorm to a fresh draw of its own initialiser, 3 trials, and prints the table.
"""

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stripes  # pylint: disable=g-import-not-at-top,wrong-import-position

import lc_jax  # pylint: disable=g-import-not-at-top,wrong-import-position


class CNN(nn.Module):
  """conv-BN-relu x2, a strided conv, global pooling, two Dense layers."""

  train: bool = False

  @nn.compact
  def __call__(self, x):
    for features, stride in ((8, 1), (16, 2)):
      x = nn.Conv(features, (3, 3), strides=stride)(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not self.train)(x))
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x)).mean((1, 2))
    return nn.Dense(stripes.CLASSES)(nn.relu(nn.Dense(16)(x)))


def train(images, labels, steps: int = 60, seed: int = 0):
  """(initial variables, trained variables) of CNN after `steps` Adam steps on the batch."""
  model = CNN(train=True)
  initial = model.init(jax.random.key(seed), images[:1])
  optimizer = optax.adam(1e-2)

  @jax.jit
  def step(variables, opt_state):
    def loss_fn(params):
      logits, updates = model.apply({**variables, 'params': params}, images,
                                    mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates
    grads, updates = jax.grad(loss_fn, has_aux=True)(variables['params'])
    changes, opt_state = optimizer.update(grads, opt_state)
    params = optax.apply_updates(variables['params'], changes)
    return {'params': params, **updates}, opt_state

  variables, opt_state = initial, optimizer.init(initial['params'])
  for _ in range(steps):
    variables, opt_state = step(variables, opt_state)
  return initial, variables


def accuracy(variables, images, labels) -> float:
  logits = CNN().apply(variables, images)
  return float(jnp.mean(jnp.argmax(logits, -1) == labels))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--plot', default='', help='write the bar chart here')
  args = parser.parse_args()
  images, labels = stripes.dataset(128, seed=0)
  _, trained = train(images, labels)
  test_images, test_labels = stripes.dataset(128, seed=1)
  print(f'trained: test accuracy {accuracy(trained, test_images, test_labels):.1%}')
  result = lc_jax.criticality(CNN(), trained, test_images, test_labels,
                              layers='conv,linear,batchnorm', trials=3, batch_size=128)
  print(result.table())
  if args.plot:
    result.plot(args.plot)


if __name__ == '__main__':
  main()
