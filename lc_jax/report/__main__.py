"""Entry point of `python -m lc_jax.report` (see lc_jax.report.cli)."""

from lc_jax.report import cli

if __name__ == '__main__':
  cli.run()
