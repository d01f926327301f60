"""Looking models up by id: `get`, `ids`, `CATEGORIES`."""

from __future__ import annotations


from lc_jax import errors
from lc_jax.zoo.entries import Entry
from lc_jax.zoo.paper import ENTRIES

# The paper's grouping (its r50_categories.json), in its order.
CATEGORIES = ('baseline', 'training_recipes', 'augmentation', 'freezing', 'adversarial_training',
              'contrastive')

_BY_ID = {entry.id: entry for entry in sorted(ENTRIES, key=lambda e: CATEGORIES.index(e.category))}
assert len(_BY_ID) == len(ENTRIES), 'duplicate model id'


def get(model_id: str) -> Entry:
  """The entry of `model_id`; an unknown id is a UserError naming the closest ids."""
  try:
    return _BY_ID[model_id]
  except KeyError:
    raise errors.unknown('model id', model_id, _BY_ID, listed_by='python -m lc_jax.zoo list'
                         ) from None


def ids(category: str | None = None) -> list[str]:
  """Every model id, or those of `category`, grouped by category in the paper's order."""
  if category is not None and category not in CATEGORIES:
    raise errors.unknown('category', category, CATEGORIES)
  return [i for i, e in _BY_ID.items() if category is None or e.category == category]
