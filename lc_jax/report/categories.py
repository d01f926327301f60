"""Which category each model belongs to, as the paper groups them: the zoo's categories, or a
user's (`--category ID=NAME`, or a JSON map), with 'other' for models that none names.

    given = categories.parse(['my_run=augmentation', 'groups.json'])
    of, order = categories.assign(['tv_resnet50', 'my_run', 'x'], given)
    # of: {'tv_resnet50': 'baseline', 'my_run': 'augmentation', 'x': 'other'}
    # order: ['baseline', 'augmentation', 'other']

A JSON map is either {category: [model ids]} (the paper's r50_categories.json) or
{model id: category}. Categories come in the zoo's order (lc_jax.zoo.CATEGORIES), then the
user's in the order given, then 'other'.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Sequence

from lc_jax.errors import UserError

OTHER = 'other'  # the band of models that no category names


def _zoo_categories() -> tuple[tuple[str, ...], Mapping[str, str]]:
  from lc_jax.zoo import registry  # pylint: disable=g-import-not-at-top
  return registry.CATEGORIES, {i: registry.get(i).category for i in registry.ids()}


def _read_map(path: str) -> dict[str, str]:
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except OSError as e:
    raise UserError(f'cannot read the category map {path}: {e.strerror}') from None
  except ValueError as e:
    raise UserError(f'the category map {path} is not JSON ({e})') from None
  out: dict[str, str] = {}
  if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
    for category, model_ids in data.items():
      for model_id in model_ids:
        out[str(model_id)] = str(category)
    return out
  if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
    return {str(k): v for k, v in data.items()}
  raise UserError(f'the category map {path} is neither {{category: [model ids]}} nor '
                  '{model id: category}')


def parse(specs: Sequence[str]) -> dict[str, str]:
  """model id -> category from `--category` values: 'ID=NAME' each, or the path of a JSON map;
  a later value wins over an earlier one."""
  out: dict[str, str] = {}
  for spec in specs:
    if os.path.isfile(spec) or spec.endswith('.json'):
      out.update(_read_map(spec))
      continue
    model_id, sep, name = spec.partition('=')
    if not sep or not model_id.strip() or not name.strip():
      raise UserError(f"--category {spec!r}: give ID=NAME (e.g. --category=my_run=augmentation) "
                      'or the path of a JSON map')
    out[model_id.strip()] = name.strip()
  return out


def assign(model_ids: Sequence[str], given: Mapping[str, str] | None = None
           ) -> tuple[dict[str, str], list[str]]:
  """({model id: category} for each of `model_ids`, the categories present in band order).

  The user's map (`given`) wins over the zoo's; a model neither knows is OTHER.
  """
  given = dict(given or {})
  zoo_order, zoo_of = _zoo_categories()
  of = {m: given.get(m, zoo_of.get(m, OTHER)) for m in model_ids}
  order = [c for c in zoo_order] + list(dict.fromkeys(given.values())) + [OTHER]
  present = set(of.values())
  return of, [c for c in dict.fromkeys(order) if c in present]


def known(of: Mapping[str, str]) -> bool:
  """Whether any model has a category other than OTHER (else nothing is grouped)."""
  return any(c != OTHER for c in of.values())


def of_summaries(summaries, given: Mapping[str, str] | None = None
                 ) -> tuple[dict[str, str], list[str]]:
  """`assign` for the models of LayerSummary lists: ({model label: category}, band order)."""
  ids = {s.model: s.model_id for s in summaries}
  of, order = assign(list(dict.fromkeys(ids.values())), given)
  return {label: of[model_id] for label, model_id in ids.items()}, order
