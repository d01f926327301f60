"""Helpers of the converter command line: argument parsing and the printed summary."""

from __future__ import annotations

from typing import Sequence

import jax

from lc_jax.errors import UserError


def one_source(argv: Sequence[str], usage: str) -> str:
  """The one checkpoint of a converter command line (`argv` as absl leaves it: the program,
  then the arguments that are not flags); a UserError, one `error:` line that shows `usage`,
  for none or several."""
  if len(argv) == 2:
    return argv[1]
  if len(argv) < 2:
    raise UserError(f'give one checkpoint: {usage}')
  raise UserError(f'unexpected arguments after the checkpoint {argv[1]}: {" ".join(argv[2:])} '
                  f'(one checkpoint at a time; the rest are flags): {usage}')


def floats(values: Sequence[str] | None, name: str) -> tuple[float, ...] | None:
  """'0.5,0.5,0.5' as parsed by a list flag -> (0.5, 0.5, 0.5); None stays None."""
  if values is None:
    return None
  try:
    parsed = tuple(float(v) for v in values)
  except ValueError:
    raise UserError(f'--{name} takes three numbers, e.g. --{name}=0.5,0.5,0.5; '
                    f'got {",".join(values)}') from None
  if len(parsed) != 3:
    raise UserError(f'--{name} takes one number per RGB channel (3), got {len(parsed)}')
  return parsed


def summary(metadata: dict, variables: dict, out: str | None) -> str:
  """A one-screen description of a conversion."""
  def count(tree) -> int:
    return len(jax.tree.leaves(tree))
  container = ''.join(f"['{k}']" for k in metadata['container']) or 'top level'
  prefix = f", prefix '{metadata['stripped_prefix']}' stripped" if metadata['stripped_prefix'] else ''
  how = 'inferred from the checkpoint' if metadata.get('arch_inferred') else 'as given'
  norm = f"mean {_rounded(metadata['mean'])}, std {_rounded(metadata['std'])}"
  own = metadata.get('checkpoint_normalization')
  if own is not None:
    same = (own['mean'], own['std']) == (metadata['mean'], metadata['std'])
    norm += (" (the checkpoint's own)" if same else
             f" (given; the checkpoint's own: mean {_rounded(own['mean'])}, "
             f"std {_rounded(own['std'])})")
  lines = [
      f"converted     {metadata['source']}",
      f"sha256        {metadata['sha256']}",
      f"format        {metadata['format']}, state_dict at {container}{prefix}",
      f"architecture  {metadata['arch']} ({how}), {metadata['num_classes']} classes",
      f'normalisation {norm}',
      f"variables     {count(variables.get('params', {}))} params + "
      f"{count(variables.get('batch_stats', {}))} batch_stats arrays, "
      f"{metadata['num_parameters']:,} parameters",
  ]
  dropped = metadata['dropped']
  if dropped:
    for i, (rule, keys) in enumerate(sorted(dropped.items())):
      example = f' (e.g. {keys[0]})' if keys else ''
      lines.append(f"{'dropped' if i == 0 else '':14s}{rule}: {len(keys)} keys{example}")
  else:
    lines.append('dropped       nothing')
  lines.append(f'written to    {out}' if out else 'written to    nowhere (no --out given)')
  return '\n'.join(lines)


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
  return tuple(round(float(v), 4) for v in values)
