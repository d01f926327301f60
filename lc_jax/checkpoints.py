"""A checkpoint argument, `PATH`, `bundled:NAME`, `zoo:ID` or `hf:REPO[/FILE][@REVISION]`:
its sha256, and its conversion, made now or reused.

    sha256 = checkpoints.sha256('zoo:resnet50_dino')          # fetched (and checked) first
    module, variables, card = checkpoints.convert_into('zoo:resnet50_dino', 'out/model', sha256)
    arch, variables, metadata = checkpoints.convert('bundled:efficientnet_lite0')
    arch, variables, metadata = checkpoints.convert('hf:timm/convnext_tiny.fb_in1k')

converters/ converts local files (a path, or bundled:NAME: a file shipped in an installed
package) and knows no zoo; lc_jax.zoo fetches and keeps files and converts none. This module
joins them: it is the one place that reads `zoo:` and `hf:` (and a Hub repository's timm
`config.json`: the architecture and the normalisation), and `add` (files downloaded by hand,
checked to convert before the zoo keeps them) lives here.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import converters
from converters import reader
from converters.reader import UntrustedPickle
from lc_jax import models
from lc_jax import zoo
from lc_jax.digest import file_sha256
from lc_jax.errors import UserError
from lc_jax.zoo import hub
from lc_jax.version import __version__

ZOO = 'zoo:'  # 'zoo:ID' names a model of the paper's zoo (lc_jax.zoo)
BUNDLED = reader.BUNDLED_PREFIX  # 'bundled:NAME' names a checkpoint shipped in a package
HF = hub.PREFIX  # 'hf:REPO[/FILE][@REVISION]' names a checkpoint on the Hugging Face Hub
SUFFIXES = ('.safetensors', '.pth.tar', '.pth', '.pt', '.ckpt', '.tar')  # left out of an id


def zoo_id(source: str) -> str | None:
  """The model id of 'zoo:ID'; None for a path or bundled:NAME."""
  return source[len(ZOO):] if source.startswith(ZOO) else None


def check(source: str, field: str) -> None:
  """Refuses a checkpoint argument that names nothing, in one UserError: a missing file or a
  folder (named with the config `field`), an unknown bundled name or zoo id, a malformed hf:
  id. Downloads and hashes nothing."""
  if hub.is_hub(source):
    hub.parse(source)  # whether the Hub has it is known once it is fetched
    return
  model_id = zoo_id(source)
  if model_id is not None:
    zoo.get(model_id)  # an unknown id is refused with the closest ones
    return
  if source.startswith(BUNDLED):
    reader.resolve(source)  # an unknown name, or its package not installed, is refused
    return
  path = os.path.abspath(os.path.expanduser(source))
  if not os.path.exists(path):
    raise UserError(f'{field}: checkpoint not found: {path}')
  if not os.path.isfile(path):
    raise UserError(f'{field}: {path} is a folder, not a checkpoint file')


def sha256(source: str, *, offline: bool | None = None, mirrors: str = '') -> str:
  """The sha256 that identifies `source`, which a conversion and a run's identity are keyed by:
  a file's own; for zoo:ID and hf:, `converters.digests_sha256` of its files' (fetched and
  hashed first; an hf: id's config.json counts, as it sets the architecture and the
  normalisation), the sha256 its conversion records."""
  if hub.is_hub(source):
    hub.fetch(source, offline=offline, mirrors=mirrors or None)  # hashes every file
    return converters.digests_sha256(hub.digests(source))
  model_id = zoo_id(source)
  if model_id is None:
    return reader.sha256(reader.resolve(source))
  zoo.fetch(model_id, offline=offline, mirrors=mirrors or None)  # hashes every file
  return converters.digests_sha256(zoo.digests(model_id))


def convert(source: str, arch: str | None = None, *, trust_pickle: bool = False,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
            offline: bool | None = None, mirrors: str = '',
            allow_nonfinite: bool = False, of_model: str = '') -> tuple[str, dict, dict[str, Any]]:
  """`converters.convert` of any checkpoint argument: a path or bundled:NAME as it is; zoo:ID's
  files fetched (or taken from the cache; `offline`, `mirrors`) and read in the model's layout
  with its normalisation, unless `mean`/`std` are given; an hf: id's weights fetched likewise
  and read as the architecture and with the normalisation of its config.json (`hub_config`),
  or as its keys tell without one. `of_model`: the setting that names `source` when it must be
  of the model's architecture `arch` (e.g. 'reset.init_checkpoint'); one of another
  architecture is then refused as such, not with the advice to convert it as what it holds.
  Returns (arch, variables, metadata)."""
  try:
    return _convert(source, arch, trust_pickle=trust_pickle, mean=mean, std=std,
                    offline=offline, mirrors=mirrors, allow_nonfinite=allow_nonfinite)
  except converters.ArchitectureMismatch as e:
    if not of_model:
      raise
    raise converters.ConversionError(
        f'{of_model}: {e.where} holds {e.found} weights, not {e.arch}; it must hold weights of '
        f"the model's architecture ({e.arch})") from None


def _convert(source: str, arch: str | None, *, trust_pickle: bool,
             mean: Sequence[float] | None, std: Sequence[float] | None,
             offline: bool | None, mirrors: str,
             allow_nonfinite: bool) -> tuple[str, dict, dict[str, Any]]:
  if hub.is_hub(source):
    paths = hub.fetch(source, offline=offline, mirrors=mirrors or None)
    return _convert_hub(source, *paths, arch, trust_pickle=trust_pickle, mean=mean, std=std,
                        allow_nonfinite=allow_nonfinite)
  model_id = zoo_id(source)
  if model_id is None:
    return converters.convert(source, arch, trust_pickle=trust_pickle, mean=mean, std=std,
                              allow_nonfinite=allow_nonfinite)
  entry = zoo.get(model_id)
  paths = zoo.fetch(model_id, offline=offline, mirrors=mirrors or None)
  arch, variables, metadata = converters.convert_layout(
      paths, entry.recipe, arch or 'resnet50', trust_pickle=trust_pickle,
      mean=entry.mean if mean is None else mean, std=entry.std if std is None else std,
      allow_nonfinite=allow_nonfinite)
  # convert_layout's sha256 is digests_sha256 of the files it read: `sha256(source)`.
  metadata['source'] = source
  return arch, variables, metadata


def convert_into(source: str, model_dir: str, source_sha256: str, *, arch: str = '',
                 trust_pickle: bool = False, offline: bool | None = None, mirrors: str = '',
                 allow_nonfinite: bool = False) -> tuple:
  """(module, variables, card) of `source` (of sha256 `source_sha256`) converted into
  `model_dir`: the conversion already there or, for zoo:ID and hf:, the one in the zoo's cache
  of conversions, when it is of this source (as `arch`, when given) by this lc-jax version and
  intact; otherwise converted now and saved in both places. A damaged one is made again."""
  kept = zoo_id(source) or hub.is_hub(source)
  places = [model_dir] + ([_zoo_converted(source_sha256)] if kept else [])
  for place in places:
    loaded = _reusable(place, arch, source_sha256)
    if loaded is not None:
      if place != model_dir:
        models.save(model_dir, loaded[2]['arch'], loaded[1], loaded[2], overwrite=True)
      return loaded
  arch, variables, card = convert(source, arch or None, trust_pickle=trust_pickle,
                                  offline=offline, mirrors=mirrors,
                                  allow_nonfinite=allow_nonfinite)
  for place in places:
    models.save(place, arch, variables, card, overwrite=True)
  return models.load(model_dir)


def default_id(source: str) -> str:
  """The label of `source`'s rows when the run names none (model.id): a zoo model's id, an hf:
  id's repository name (lc_jax.zoo.hub.HubId.label), else the file's name without its
  checkpoint suffix."""
  if hub.is_hub(source):
    return hub.parse(source).label
  model_id = zoo_id(source)
  if model_id is not None:
    return model_id
  name = os.path.basename(source[len(BUNDLED):] if source.startswith(BUNDLED) else source)
  for suffix in SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return name


def add(model_id: str, paths: Sequence[str], *, trust_pickle: bool = False) -> list[str]:
  """Registers files downloaded by hand as zoo model `model_id`'s (lc_jax.zoo.register: in the
  registry's order, a known sha256 checked), once they convert as its layout; returns their
  paths in the zoo's cache. For an hf: id, the weights and optionally its config.json (else a
  config.json beside the weights is taken), once they convert as `convert` reads them.
  Anything wrong is one UserError, and then nothing is added."""
  if hub.is_hub(model_id):
    paths = list(paths)
    if len(paths) == 1 and hub.beside(paths[0]):
      paths.append(hub.beside(paths[0]))
    return hub.register(model_id, paths, check=lambda found: _check_hub_converts(
        model_id, found, trust_pickle))
  return zoo.register(model_id, paths,
                      check=lambda entry, found: _check_converts(entry, found, trust_pickle))


def _check_converts(entry: zoo.Entry, paths: Sequence[str], trust_pickle: bool) -> None:
  """Refuses `paths` unless they convert as the zoo `entry`'s layout."""
  try:
    converters.convert_layout(list(paths), entry.recipe, 'resnet50', mean=entry.mean,
                              std=entry.std, trust_pickle=trust_pickle)
  except Exception as e:  # pylint: disable=broad-except  # any failure means "does not convert"
    raise _not_added(e, entry.id, paths, f' (layout {entry.recipe})') from None


def hub_config(path: str, where: str) -> dict[str, Any]:
  """What a Hub repository's timm config.json (at `path`, of the checkpoint `where`) says:
  {'arch': the registered architecture it names, or None when it names one not registered
  here (the keys then tell), 'mean', 'std' (or None), 'timm': what it says for the record}.
  Model arguments that change what a registered architecture computes are refused: lc-jax
  would build another network than the one the weights were trained in."""
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
    if not isinstance(config, dict):
      raise ValueError('not a JSON object')
  except (OSError, ValueError) as e:
    raise UserError(f'{where}: cannot read its {hub.CONFIG} ({path}: {e})') from None
  pretrained = config.get('pretrained_cfg') or {}
  name = config.get('architecture') or pretrained.get('architecture')
  timm_names = {models.get(n).timm_name: n for n in models.names() if models.get(n).timm_name}
  arch = name if name in models.names() else timm_names.get(name)
  args = {k: v for k, v in (config.get('model_args') or {}).items()
          if k not in _IGNORED_MODEL_ARGS and not (k in _DEFAULT_MODEL_ARGS and
                                                   v in _DEFAULT_MODEL_ARGS[k])}
  if args:
    listed = ', '.join(f'{k}={v!r}' for k, v in args.items())
    raise UserError(f'{where}: its {hub.CONFIG} builds {name} with {listed}, which lc-jax does '
                    'not model; its registered architectures are built as timm builds them by '
                    'default')
  norm = {k: pretrained.get(k, config.get(k)) for k in ('mean', 'std')}
  for key, value in norm.items():
    if value is not None and (not isinstance(value, list) or len(value) != 3):
      raise UserError(f'{where}: its {hub.CONFIG} gives {key} {value!r}; three numbers (RGB) '
                      'are needed')
  kept = {k: pretrained[k] for k in ('input_size', 'interpolation', 'crop_pct', 'tag')
          if k in pretrained}
  return {'arch': arch, **norm, 'timm': {'architecture': name, **kept}}


# Model arguments timm writes into config.json that do not change the evaluated network:
# dropout rates (no dropout at evaluation), the input size (a ViT's comes from its position
# embedding, and is checked there), the class count (from the classifier's weights).
_IGNORED_MODEL_ARGS = ('drop_rate', 'drop_path_rate', 'proj_drop_rate', 'attn_drop_rate',
                       'pos_drop_rate', 'patch_drop_rate', 'drop_block_rate', 'img_size',
                       'num_classes')
# Those timm writes with the values every registered family is built with: three input channels,
# average pooling (ResNet, EfficientNet, ConvNeXt) or the class token (ViT; its average pooling
# brings an fc_norm that the conversion refuses). Another pooling (max, avgmax) keeps a CNN's
# keys and changes the network, so it must be refused, not ignored.
_DEFAULT_MODEL_ARGS = {'in_chans': (3,), 'global_pool': ('avg', 'token')}


def _convert_hub(source: str, weights: str, config: str | None, arch: str | None, *,
                 trust_pickle: bool, mean: Sequence[float] | None, std: Sequence[float] | None,
                 allow_nonfinite: bool) -> tuple[str, dict, dict[str, Any]]:
  """`converters.convert` of an hf: id's fetched `weights`, as the architecture and with the
  normalisation its `config` (or None) gives, unless `arch`, `mean`, `std` are given."""
  key = hub.parse(source).key
  told = hub_config(config, key) if config else {'arch': None, 'mean': None, 'std': None}
  if config and told['arch'] is None and arch is None:
    print(f'{key}: its {hub.CONFIG} names the architecture {told["timm"]["architecture"]}, '
          'which lc-jax has not registered; converting it as its keys tell', file=sys.stderr,
          flush=True)
  arch_, variables, metadata = converters.convert(
      weights, arch or told['arch'], trust_pickle=trust_pickle,
      mean=told['mean'] if mean is None else mean, std=told['std'] if std is None else std,
      allow_nonfinite=allow_nonfinite)
  size = (told.get('timm') or {}).get('input_size')
  module_size = (metadata.get('module_settings') or {}).get('img_size')
  if module_size and isinstance(size, list) and len(size) == 3 and size[1:] != [module_size] * 2:
    raise UserError(f'{key}: its {hub.CONFIG} says input_size {size}, but its position '
                    f'embedding is learned for {module_size}x{module_size} images')
  metadata['source'] = key
  # `sha256(source)`: the files' digests (the cached ones were checked against their records).
  metadata['sha256'] = converters.digests_sha256(
      [metadata['sha256']] + ([file_sha256(config)] if config else []))
  if config:
    metadata['hub_config'] = told['timm']
  return arch_, variables, metadata


def _check_hub_converts(source: str, paths: Sequence[str], trust_pickle: bool) -> None:
  """Refuses an hf: id's weights (and config.json) unless they convert as `convert` reads
  them."""
  try:
    _convert_hub(source, paths[0], paths[1] if len(paths) > 1 else None, None,
                 trust_pickle=trust_pickle, mean=None, std=None, allow_nonfinite=False)
  except Exception as e:  # pylint: disable=broad-except  # any failure means "does not convert"
    raise _not_added(e, source, paths) from None


def _not_added(error: Exception, model_id: str, paths: Sequence[str], how: str = ''
               ) -> UserError:
  """The one-line refusal of `add` when `paths` failed to convert as `model_id` (`how`)."""
  if isinstance(error, UntrustedPickle):
    return UserError(f'{error.path} holds Python objects besides tensors, and unpickling them '
                     'can run code from the file; if you trust it, add it with --trust_pickle: '
                     f'python -m lc_jax.zoo add --trust_pickle {model_id} {" ".join(paths)}; '
                     'nothing was added')
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  reason = lines[0] if isinstance(error, UserError) and lines else \
      f'{type(error).__name__}: {lines[0] if lines else ""}'
  return UserError(f'{", ".join(paths)} does not convert as {model_id}{how}: {reason}; nothing '
                   'was added')


def _reusable(model_dir: str, arch: str, source_sha256: str) -> tuple | None:
  """`models.load(model_dir)` if it holds a conversion of the source `source_sha256` (as
  `arch`, when given) by this lc-jax version, intact; None otherwise (a damaged one is
  reported)."""
  try:
    card = models.store.read_card(model_dir)
    if (card and card.get('arch') == (arch or card.get('arch'))
        and card.get('sha256') == source_sha256 and card.get('lc_jax_version') == __version__):
      return models.load(model_dir)
  except UserError as e:  # its source is known: make it again
    print(f'{model_dir} was damaged; converting the checkpoint again ({e})', file=sys.stderr)
  return None


def _zoo_converted(source_sha256: str) -> str:
  """The zoo's cache of conversions: a zoo model converted once serves every run of it."""
  return os.path.join(zoo.cache_dir(), 'converted', source_sha256)
