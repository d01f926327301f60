"""lc-jax: layer criticality of ImageNet classifiers in JAX.

`lc_jax.criticality(model, variables, images, ...)` is the one call for research code
(lc_jax.api); importing lc_jax alone loads nothing heavy, so lc_jax.schema and lc_jax.report
stay free of JAX until a run needs it.
"""

from lc_jax.errors import UserError
from lc_jax.version import __version__


def __getattr__(name: str):
  if name in ('criticality', 'Result'):
    from lc_jax import api  # pylint: disable=g-import-not-at-top
    return getattr(api, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
