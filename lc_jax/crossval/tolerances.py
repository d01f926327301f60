"""What each check's difference is held to: TOLERANCES, and the overrides of --tolerance."""

from __future__ import annotations

from lc_jax import errors
from lc_jax.errors import UserError

# What each check's difference is held to (docs/crossval.md says how they were chosen).
TOLERANCES = {
    # largest |difference| of the original's logits / max(1, largest |torch logit|)
    'logits': 1e-4,
    # the same for every module output (stages, blocks, layers)
    'activations': 1e-4,
    # |difference| / max(1, |torch value|) of a continuous metric column
    'metrics': 1e-4,
    # the share of the images by which a counted column (compare_metrics.COUNTED) differs: a
    # near tie of the top two classes can flip one image's top-1 between the frameworks
    'images': 1e-3,
    # the lowest p-value allowed of the KS test of a fresh draw, lc-jax's against torch's
    'ks_p': 1e-4,
    # |std(lc-jax) / std(torch) - 1| of a fresh draw
    'std': 0.1,
    # |difference of the 1% or of the 99% quantile| / the larger |torch quantile| of a draw
    'bounds': 0.1,
}


def parse_tolerances(text: str) -> dict[str, float]:
  """The tolerance overrides of `text`, 'name=value,...' (empty: none)."""
  overrides = {}
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, _, value = (part.strip() for part in item.partition('='))
    check_tolerance_name(name)
    try:
      overrides[name] = float(value)
    except ValueError:
      raise UserError(f'tolerance {name} needs a number, got {value!r} '
                      f'(e.g. --tolerance={name}={TOLERANCES[name]:g})') from None
    if not overrides[name] >= 0:
      raise UserError(f'tolerance {name}={value} must be a number >= 0')
  return overrides


def check_tolerance_name(name: str) -> None:
  if name not in TOLERANCES:
    raise UserError(f'unknown tolerance {name!r}{errors.did_you_mean(name, TOLERANCES)} '
                    f'(known: {", ".join(TOLERANCES)})')
