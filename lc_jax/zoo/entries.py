"""What the zoo knows about a model: `Entry` (the model) and `Source` (one file of it)."""

from __future__ import annotations

import dataclasses
import urllib.parse

from lc_jax.constants import IMAGENET_MEAN
from lc_jax.constants import IMAGENET_STD

KINDS = ('url', 'hf', 'gdrive')
RECIPES = ('timm', 'torchvision', 'state_dict', 'robustness', 'aux_bn', 'split', 'simclrv2',
           'diffusionnoise')


@dataclasses.dataclass(frozen=True)
class Source:
  """One checkpoint file and where it comes from.

  kind: 'url' (plain HTTPS: `url`), 'hf' (Hugging Face Hub: `repo`, `filename`, `revision`) or
    'gdrive' (Google Drive: `gdrive_id`).
  filename: the file's name in the cache (for 'hf', also its name in the repository).
  sha256: the file's known digest, or None (then the first download's digest is recorded and
    later ones must match it: trust on first use).
  """
  kind: str
  filename: str
  url: str | None = None
  repo: str | None = None
  revision: str | None = None
  gdrive_id: str | None = None
  sha256: str | None = None

  def __post_init__(self):
    assert self.kind in KINDS, self.kind
    assert '/' not in self.filename and not self.filename.startswith('.'), self.filename

  @property
  def canonical_url(self) -> str:
    """The URL the file is published at; the mirror map rewrites this one."""
    if self.kind == 'url':
      return self.url
    if self.kind == 'hf':
      return f'https://huggingface.co/{self.repo}/resolve/{self.revision}/{self.filename}'
    return f'https://drive.google.com/uc?id={self.gdrive_id}'


@dataclasses.dataclass(frozen=True)
class Entry:
  """One of the paper's models.

  id: the paper's model id (as in its results and r50_categories.json).
  category: one of registry.CATEGORIES.
  method: a short description of how it was trained.
  sources: its files, in the order `converters.convert_layout` takes them (backbone, then head).
  recipe: the checkpoint layout, as `converters.convert_layout` names it.
  mean, std: the input normalisation the paper used (RGB, for inputs in [0, 1]).
  init_scheme: how its layers are re-initialised ('timm_resnet' or 'torchvision_resnet').
  expected_top1: top-1 (%) on the paper's 10,000-image validation subset.
  full_val_top1: top-1 (%) on the full validation set, as the paper reports it.
  notes: oddities; 'unconfirmed' marks what the sources did not pin down.
  """
  id: str
  category: str
  method: str
  sources: tuple[Source, ...]
  recipe: str
  expected_top1: float
  full_val_top1: float
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  init_scheme: str = 'timm_resnet'
  notes: str = ''

  def __post_init__(self):
    assert self.recipe in RECIPES, self.recipe
    assert self.sources, self.id


def url(address: str, sha256: str | None = None) -> Source:
  """A plain HTTPS file, cached under the last part of its path."""
  name = urllib.parse.unquote(urllib.parse.urlsplit(address).path.rsplit('/', 1)[-1])
  return Source('url', name, url=address, sha256=sha256)


def hf(repo: str, filename: str, revision: str, sha256: str | None = None) -> Source:
  """A file of a Hugging Face Hub repository at a pinned revision."""
  return Source('hf', filename, repo=repo, revision=revision, sha256=sha256)


def gdrive(model_id: str, file_id: str) -> Source:
  """A Google Drive file, cached as MODEL_ID.pth (the name the paper's loader gave it)."""
  return Source('gdrive', f'{model_id}.pth', gdrive_id=file_id)
