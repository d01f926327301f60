"""The lc-jax version: a converted model's card records it, and a conversion by another version
is made again rather than reused."""

__version__ = '0.1.0'
