"""Any checkpoint on the Hugging Face Hub by name, `hf:REPO[/FILE][@REVISION]`: its weights and
the repository's `config.json`, kept in the zoo's cache as a paper model's files are.

    hf:timm/resnet50.a1_in1k                   model.safetensors at main
    hf:timm/convnext_tiny.fb_in1k@COMMIT       at a commit (or a branch, a tag)
    hf:someone/repo/weights.pth                another file at the repository's top level

`fetch` downloads the weights (a missing file, revision or repository is one UserError) and
`config.json` when the repository has one (timm writes the architecture and the normalisation
there; a repository without one is converted from its keys alone). The files live under
ROOT/files/hf/REPO[/FILE]@REVISION (lc_jax.zoo.cache), each with the sha256 of its first
download or `register` (trust on first use); offline, LC_JAX_OFFLINE and the mirror map work as
for the paper's models. The zoo reads no config and converts nothing: lc_jax.checkpoints does.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable, Mapping, Sequence

from lc_jax.errors import UserError
from lc_jax.zoo import cache
from lc_jax.zoo import files
from lc_jax.zoo import transport
from lc_jax.zoo.entries import Source, hf

PREFIX = 'hf:'
WEIGHTS = 'model.safetensors'  # the file timm's Hub repositories hold
CONFIG = 'config.json'
MAIN = 'main'
FORM = 'hf:OWNER/REPO[/FILE][@REVISION]'

# The Hub's own rules for repository names; a file at the top level; a revision is a branch, a
# tag or a commit (a branch may hold '/'). None may climb out of its cache folder.
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,95}')
_REVISION = re.compile(r'[A-Za-z0-9][A-Za-z0-9._/-]{0,199}')


@dataclasses.dataclass(frozen=True)
class HubId:
  """One checkpoint on the Hub: `repo` (owner/name), `filename` (its weights) at `revision`."""

  repo: str
  filename: str = WEIGHTS
  revision: str = MAIN

  @property
  def key(self) -> str:
    """The id in full, hf:REPO[/FILE]@REVISION (FILE left out when it is model.safetensors):
    the zoo's cache keeps the files under it, and its messages name it."""
    file = '' if self.filename == WEIGHTS else f'/{self.filename}'
    return f'{PREFIX}{self.repo}{file}@{self.revision}'

  @property
  def label(self) -> str:
    """The name of the model's rows and sweep folder: the repository's name (timm's model
    name for timm/ repositories), with the file's stem and the revision when not the
    defaults."""
    label = self.repo.split('/')[1]
    if self.filename != WEIGHTS:
      label += '-' + self.filename.split('.')[0]
    if self.revision != MAIN:
      label += '@' + self.revision.replace('/', '_')
    return label

  @property
  def weights(self) -> Source:
    return hf(self.repo, self.filename, self.revision)

  @property
  def config(self) -> Source:
    return hf(self.repo, CONFIG, self.revision)


def is_hub(source: str) -> bool:
  """Whether the checkpoint argument `source` is an hf: id."""
  return source.startswith(PREFIX)


def parse(spec: str) -> HubId:
  """The HubId of 'hf:REPO[/FILE][@REVISION]'; a malformed one is a UserError."""
  if not is_hub(spec):
    raise UserError(f'{spec} is not a Hub checkpoint: give {FORM}')
  path, at, revision = spec[len(PREFIX):].partition('@')
  parts = path.split('/')
  problem = None
  if len(parts) not in (2, 3) or not all(parts):
    problem = ('a file inside a folder of the repository cannot be named; it takes OWNER/REPO '
               'and an optional FILE at the top level' if len(parts) > 3 else
               'it names no repository OWNER/REPO')
  elif not all(_NAME.fullmatch(p) and '..' not in p for p in parts):
    problem = 'names hold letters, digits, ".", "_" and "-"'
  elif at and not (_REVISION.fullmatch(revision) and '..' not in revision
                   and '//' not in revision and not revision.endswith('/')):
    problem = f'the revision {revision!r} is no branch, tag or commit id'
  if problem:
    raise UserError(f'{spec}: {problem}; give {FORM}, e.g. hf:timm/resnet50.a1_in1k')
  return HubId('/'.join(parts[:2]), parts[2] if len(parts) == 3 else WEIGHTS,
               revision if at else MAIN)


def fetch(spec: str, *, offline: bool | None = None,
          mirrors: str | Mapping[str, str] | None = None, progress: bool = True
          ) -> tuple[str, str | None]:
  """(the weights' path, config.json's or None) of the hf: id `spec`, downloading what the
  cache lacks. Each is hashed against its recorded sha256. Offline, only the cache is used:
  missing weights are one UserError; a config.json not cached is left out."""
  hub_id = parse(spec)
  try:
    (weights,) = files.fetch_sources(hub_id.key, [hub_id.weights], offline=offline,
                                     mirrors=mirrors, progress=progress)
  except transport.MissingFile as e:
    hint = ('; timm repositories hold model.safetensors, others name theirs: '
            f'hf:{hub_id.repo}/FILE' if hub_id.filename == WEIGHTS else '')
    raise UserError(f'{e}{hint}') from None  # it names the repository, revision and file
  if cache.is_cached(hub_id.key, hub_id.config):
    return weights, cache.verify(hub_id.key, hub_id.config)
  if files.is_offline(offline):
    return weights, None
  try:
    (config,) = files.fetch_sources(hub_id.key, [hub_id.config], offline=False, mirrors=mirrors,
                                    progress=False)
  except transport.MissingFile:  # a repository without one: its keys tell the architecture
    return weights, None
  return weights, config


def digests(spec: str) -> list[str]:
  """The sha256 of the hf: id's weights, and of its config.json when cached, as `fetch`
  checks them. Reads no file: call it after `fetch`."""
  hub_id = parse(spec)
  present = [hub_id.weights] + ([hub_id.config] if cache.is_cached(hub_id.key, hub_id.config)
                                else [])
  return [cache.expected(hub_id.key, source)[0] for source in present]


def beside(weights: str) -> str | None:
  """The config.json in the folder of the file `weights`, if there is one."""
  path = os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(weights))), CONFIG)
  return path if os.path.isfile(path) else None


def register(spec: str, paths: Sequence[str], *,
             check: Callable[[list[str]], None] | None = None) -> list[str]:
  """Registers files downloaded by hand as the hf: id's: its weights, then optionally its
  config.json; `check(paths)` refuses them with a UserError. Returns their cached paths."""
  hub_id = parse(spec)
  if not 1 <= len(paths) <= 2:
    raise UserError(f'{spec} takes its weights ({hub_id.filename}) and optionally the '
                    f'repository\'s {CONFIG}, in this order; got {len(paths)} files')
  sources = [hub_id.weights, hub_id.config][:len(paths)]
  return files.register_sources(hub_id.key, sources, paths, check=check)
