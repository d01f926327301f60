"""ImageNet's test sets under distribution shift, named as tfds names them, and what a run needs
to know of each: the split it reads and, for ImageNet-R and ImageNet-A, the 200 classes that
predictions are restricted to.

    --config.data.source=tfds --config.data.name=imagenet_r
    --config.data.name=imagenet_v2/matched-frequency        # or threshold-0.7, topimages
    --config.data.name=imagenet2012_corrupted/fog_3         # ImageNet-C: <corruption>_<1..5>

Every set labels its images with ImageNet-1k indices (tfds's imagenet2012 label list). A set
of 200 classes is measured the way its authors evaluate it: the logits of those classes only,
in 1k order, before the softmax (lc_jax.data.classes names the lists and their source), so
accuracy, criticality and every other metric see one 200-way distribution.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from lc_jax import schema
from lc_jax.data import classes as classes_lib
from lc_jax.errors import UserError

# The split read when data.split is empty and the set is none of FAMILIES.
DEFAULT_SPLIT = 'validation'


@dataclasses.dataclass(frozen=True)
class Family:
  """A tfds dataset (all its configs): its evaluation split and the classes it covers (None:
  all 1000)."""

  name: str
  title: str
  split: str
  classes: tuple[str, ...] | None = None


FAMILIES = {family.name: family for family in (
    Family(schema.IMAGENET_VAL, 'ImageNet val', 'validation'),
    Family('imagenet_v2', 'ImageNetV2', 'test'),
    Family('imagenet_r', 'ImageNet-R', 'test', classes_lib.IMAGENET_R),
    Family('imagenet_a', 'ImageNet-A', 'test', classes_lib.IMAGENET_A),
    Family('imagenet_sketch', 'ImageNet-Sketch', 'test'),
    Family('imagenet2012_corrupted', 'ImageNet-C', 'validation'),
)}


def family(name: str) -> Family | None:
  """The family of a tfds name ('imagenet_v2/topimages' -> imagenet_v2), None for other sets."""
  return FAMILIES.get(name.split('/', 1)[0])


def split(name: str) -> str:
  """The split that `name` is evaluated on: its family's, else DEFAULT_SPLIT."""
  found = family(name)
  return found.split if found else DEFAULT_SPLIT


def class_indices(name: str, label_names: Sequence[str] | None) -> tuple[int, ...] | None:
  """The indices into `label_names` (the set's labels, ImageNet-1k wnids) of the classes that
  `name` restricts predictions to, in label order; None when it covers every class."""
  found = family(name)
  if found is None or found.classes is None:
    return None
  position = {wnid: i for i, wnid in enumerate(label_names or ())}
  missing = [wnid for wnid in found.classes if wnid not in position]
  if missing:
    raise UserError(f'{name} covers {len(found.classes)} ImageNet classes, but its labels do not '
                    f'name {len(missing)} of them (first: {missing[0]}); its tfds label list '
                    'should be the 1000 ImageNet wnids')
  return tuple(sorted(position[wnid] for wnid in found.classes))
