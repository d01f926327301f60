"""The paper's 51 ResNet-50 models by name: where each checkpoint comes from, how it is laid out,
and a verified local copy of its files.

    from lc_jax import zoo
    entry = zoo.get('robust_resnet50_l2_eps3')   # Entry: sources, recipe, mean/std, top-1, notes
    paths = zoo.fetch(entry.id)                  # downloads once, checks sha256 on every use
    arch, variables, meta = lc_jax.checkpoints.convert(f'zoo:{entry.id}')  # fetched, converted

The zoo fetches and keeps files; it converts none (lc_jax.checkpoints does, and its `add`
checks that files downloaded by hand convert before `register` keeps them).

Any checkpoint on the Hugging Face Hub, `hf:REPO[/FILE][@REVISION]`, is fetched into the same
cache with the same checks (lc_jax.zoo.hub; lc_jax.checkpoints converts it).

Command line: python -m lc_jax.zoo list | info ID | fetch ID... | fetch --all | add ID FILE
(ID: a paper model's, or an hf: id).
Downloads need the `zoo` extra (pip install "lc-jax[zoo]"). Environment: LC_JAX_ZOO_DIR (the
cache, default ~/.cache/lc_jax/zoo), LC_JAX_OFFLINE=1 (cache only), LC_JAX_ZOO_MIRRORS (URL
prefix rewrites; see transport).
"""

from lc_jax.zoo.cache import cache_dir
from lc_jax.zoo.entries import Entry, Source
from lc_jax.zoo.files import digests, fetch, missing, register
from lc_jax.zoo.registry import CATEGORIES, get, ids

__all__ = ['CATEGORIES', 'Entry', 'Source', 'cache_dir', 'digests', 'fetch', 'get', 'ids',
           'missing', 'register']
