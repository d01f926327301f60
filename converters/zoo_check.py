"""The zoo's check that files added by hand convert (lc_jax.zoo.add calls it; set on import of
converters, so the zoo, which fetches and keeps files, imports no converter)."""

from __future__ import annotations

from typing import Sequence

import converters
from converters.reader import UntrustedPickle
from lc_jax.errors import UserError
from lc_jax.zoo import files as zoo_files


def check_zoo_files(entry, files: Sequence[str], trust_pickle: bool) -> None:
  """Refuses `files` unless they convert as the zoo `entry`'s layout (lc_jax.zoo.add's check)."""
  try:
    converters.convert_layout(list(files), entry.recipe, 'resnet50', mean=entry.mean, std=entry.std,
                   trust_pickle=trust_pickle)
  except UntrustedPickle as e:
    raise UserError(f'{e.path} holds Python objects besides tensors, and unpickling them can '
                    'run code from the file; if you trust it, add it with --trust_pickle: '
                    f'python -m lc_jax.zoo add --trust_pickle {entry.id} {" ".join(files)}; '
                    'nothing was added') from None
  except Exception as e:  # pylint: disable=broad-except  # any failure means "does not convert"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    reason = lines[0] if isinstance(e, UserError) and lines else \
        f'{type(e).__name__}: {lines[0] if lines else ""}'
    raise UserError(f'{", ".join(files)} does not convert as {entry.id} (layout '
                    f'{entry.recipe}): {reason}; nothing was added') from None


zoo_files.check_converts = check_zoo_files
