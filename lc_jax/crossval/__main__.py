"""Entry point of `python -m lc_jax.crossval` (see lc_jax.crossval.cli)."""

from lc_jax import launch

if __name__ == '__main__':
  launch.one_malloc_arena()  # before JAX starts its threads: cli imports JAX
  from lc_jax.crossval import cli  # pylint: disable=g-import-not-at-top
  __doc__ = cli.__doc__  # absl prints the __main__ module's docstring on a usage error
  cli.run()
