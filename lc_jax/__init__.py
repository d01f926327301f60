"""lc-jax: layer criticality of ImageNet classifiers in JAX."""

from lc_jax.errors import UserError

__version__ = '0.1.0'
