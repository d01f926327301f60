"""Entry point of `python -m lc_jax.zoo` (see lc_jax.zoo.cli)."""

from lc_jax.zoo import cli

if __name__ == '__main__':
  cli.run()
