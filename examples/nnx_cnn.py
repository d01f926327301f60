r"""Criticality of a Flax NNX model, trained for a few steps with optax, layer by layer.

    python examples/nnx_cnn.py

NNX modules do not keep their initialisers, so the fresh draw of each trial comes from
`fresh(key)`, a new model: every layer is then reset to what its own constructor draws.
"""

import os
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stripes  # pylint: disable=g-import-not-at-top,wrong-import-position

import lc_jax  # pylint: disable=g-import-not-at-top,wrong-import-position


class CNN(nnx.Module):
  """conv-BN-relu, a strided conv, global pooling, two Linears."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.hidden = nnx.Linear(16, 16, rngs=rngs)
    self.out = nnx.Linear(16, stripes.CLASSES, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.relu(self.conv2(x)).mean((1, 2))
    return self.out(nnx.relu(self.hidden(x)))


def train(images, labels, steps: int = 60, seed: int = 0) -> CNN:
  model = CNN(nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      logits = model(images)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  model.train()
  for _ in range(steps):
    step(model, optimizer)
  model.eval()
  return model


def main():
  images, labels = stripes.dataset(128, seed=0)
  model = train(images, labels)
  test_images, test_labels = stripes.dataset(128, seed=1)
  accuracy = jnp.mean(jnp.argmax(model(test_images), -1) == test_labels)
  print(f'trained: test accuracy {float(accuracy):.1%}')
  result = lc_jax.criticality(model, None, test_images, test_labels,
                              layers='conv,linear,batchnorm', trials=3, batch_size=128,
                              key=jax.random.key(0), fresh=lambda key: CNN(nnx.Rngs(key)))
  print(result.table())


if __name__ == '__main__':
  main()
