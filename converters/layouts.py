"""`convert_layout`: checkpoint files of a known layout -> (architecture, Flax variables, metadata).

    arch, variables, metadata = converters.convert_layout(['resnet50_l2_eps3.ckpt'], 'robustness')
    arch, variables, metadata = converters.convert_layout(
        ['dino_resnet50_pretrain.pth', 'dino_resnet50_linearweights.pth'], 'split')

A layout is how a family of training codes stores a network: how many files, where the
state_dict lies in them, which keys are not part of the network (each dropped under a named
rule, reported in metadata['dropped']) and how the rest is named. The conversion is strict, as
in `convert`: every model variable filled and every kept key used. No layout unpickles anything
but tensors, plain containers and argparse.Namespace (data), so none needs `trust_pickle`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from typing import Any, Callable, Sequence

import numpy as np

from converters.convert import build
from converters.convert import digests_sha256
from converters import reader
from converters.reader import ConversionError, DropRule
from lc_jax import errors

# Plain data that training scripts pickle next to the weights; unpickling it runs no code.
SAFE_GLOBALS = (argparse.Namespace,)

_RULES = {rule.name: rule for rule in reader.DROP_RULES}
_NUM_BATCHES_TRACKED = _RULES['num_batches_tracked']
SWAV_PROJECTION_HEAD = DropRule('swav_projection_head', r'^(module\.)?projection_head\.',
                                'SwAV: the projection head used only in pre-training')
SWAV_PROTOTYPES = DropRule('swav_prototypes', r'^(module\.)?prototypes\.',
                           'SwAV: the prototype vectors used only in pre-training')
# The SimCLRv2 file's 'head' entry (the contrastive projection head); its keys are reported
# as 'head.<key>'.
SIMCLRV2_HEAD = DropRule('simclrv2_head', r'^head\.',
                         'SimCLRv2: the contrastive projection head used only in pre-training')


@dataclasses.dataclass
class _Part:
  """What one file gives: kept tensors under torch names, and how they were found."""

  checkpoint: reader.Checkpoint
  role: str
  origin: dict[str, str] = dataclasses.field(default_factory=dict)  # renamed key -> file key


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one kind of checkpoint holds the network: `roles` names each file it takes, in order;
  `read(files, trust_pickle)` returns each file's part."""

  name: str
  roles: tuple[str, ...]
  read: Callable[[Sequence[str], bool], list[_Part]]
  about: str


def _read(path: str, trust_pickle: bool, rules: Sequence[DropRule],
          container: Sequence[str] | None = None) -> reader.Checkpoint:
  return reader.read(path, trust_pickle, rules, container=container,
                     allowed_globals=SAFE_GLOBALS)


def _single(rules: Sequence[DropRule], container: Sequence[str] | None = None):
  """A one-file layout: the state_dict (at `container`, or found), `rules` dropped."""
  def read(files: Sequence[str], trust_pickle: bool) -> list[_Part]:
    return [_Part(_read(files[0], trust_pickle, rules, container), 'checkpoint')]
  return read


def _read_split(files: Sequence[str], trust_pickle: bool) -> list[_Part]:
  """An SSL backbone (DINO: torchvision names; SwAV: `module.` keys with a projection head and
  prototypes) and its linear-probe head (`['state_dict']`, `module.linear.*` -> `fc.*`)."""
  backbone = _read(files[0], trust_pickle,
                   (SWAV_PROJECTION_HEAD, SWAV_PROTOTYPES, _NUM_BATCHES_TRACKED))
  head = _read(files[1], trust_pickle, (), container=('state_dict',))
  head.tensors, origin = _rename(head, lambda key: re.sub(r'^linear\.', 'fc.', key))
  both = sorted(set(backbone.tensors) & set(head.tensors))
  if both:
    raise ConversionError(f'{backbone.path} and {head.path} both hold {", ".join(both[:4])}: '
                          'the split layout takes a backbone without classifier, then its head')
  return [_Part(backbone, 'backbone'), _Part(head, 'linear-probe head', origin)]


# Separius/SimCLRv2-Pytorch resnet.py (r50_1x_sk0): a block's `net` is conv, BatchNormRelu
# (a Sequential: the BatchNorm at .0), conv, BatchNormRelu, conv, BatchNormRelu; its
# `projection` is a 1x1 conv `shortcut` and a BatchNormRelu `bn` without relu.
_SIMCLRV2_BLOCK = {'net.0': 'conv1', 'net.1.0': 'bn1', 'net.2': 'conv2', 'net.3.0': 'bn2',
                   'net.4': 'conv3', 'net.5.0': 'bn3', 'projection.shortcut': 'downsample.0',
                   'projection.bn.0': 'downsample.1'}
_SIMCLRV2_KEY = re.compile(r'net\.([1-4])\.blocks\.(\d+)\.(' + '|'.join(
    re.escape(k) for k in _SIMCLRV2_BLOCK) + r')\.(\w+)')


def _simclrv2_name(key: str) -> str:
  """A Separius SimCLRv2 key -> the torchvision key; unknown keys stay (and fail the strict
  fill with their own name)."""
  for stem, name in (('net.0.0.', 'conv1.'), ('net.0.1.0.', 'bn1.')):  # the stem: conv, BN
    if key.startswith(stem):
      return name + key[len(stem):]
  match = _SIMCLRV2_KEY.fullmatch(key)
  if match:
    stage, block, module, leaf = match.groups()
    return f'layer{stage}.{block}.{_SIMCLRV2_BLOCK[module]}.{leaf}'
  return key  # fc.* is the supervised head: named as in torchvision already


def _read_simclrv2(files: Sequence[str], trust_pickle: bool) -> list[_Part]:
  """Separius/SimCLRv2-Pytorch convert.py output: `{'resnet': state_dict, 'head': state_dict}`;
  the network is `resnet`, renamed; the contrastive `head` is dropped by a named rule."""
  path, fmt, obj = reader.load(files[0], trust_pickle, SAFE_GLOBALS)
  state, container = reader.select(obj, path, ('resnet',))
  tensors, dropped, prefix = reader.clean(reader.as_numpy(state), (_NUM_BATCHES_TRACKED,))
  if 'head' in obj:  # Separius's convert.py always writes it; a state_dict or an error
    head, _ = reader.select(obj, path, ('head',))
    _, head_dropped, _ = reader.clean(
        {f'head.{k}': v for k, v in reader.as_numpy(head).items()}, (SIMCLRV2_HEAD,))
    dropped.update(head_dropped)
  checkpoint = reader.Checkpoint(path=path, sha256=reader.sha256(path), format=fmt,
                                 container=container, prefix=prefix, tensors=tensors,
                                 dropped=dropped)
  checkpoint.tensors, origin = _rename(checkpoint, _simclrv2_name)
  return [_Part(checkpoint, 'checkpoint', origin)]


def _rename(checkpoint: reader.Checkpoint,
            name: Callable[[str], str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors renamed by `name`, {new key: key in the file} for the renamed ones)."""
  renamed: dict[str, np.ndarray] = {}
  origin: dict[str, str] = {}
  for key, value in checkpoint.tensors.items():
    new = name(key)
    if new in renamed:
      raise ConversionError(f'{checkpoint.path}: two keys become {new} ({origin.get(new, new)} '
                            f'and {checkpoint.prefix + key})')
    renamed[new] = value
    if new != key:
      origin[new] = checkpoint.prefix + key
  return renamed, origin


_STATE_DICT = (_NUM_BATCHES_TRACKED,)
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout('timm', ('checkpoint',), _single(_STATE_DICT),
           'timm weights (model.safetensors or .pth): a plain state_dict'),
    Layout('torchvision', ('checkpoint',), _single(_STATE_DICT),
           'torchvision weights: a plain state_dict'),
    Layout('state_dict', ('checkpoint',), _single(_STATE_DICT),
           f'a torchvision-named state_dict, plain or under one of '
           f'{", ".join(reader.CONTAINER_KEYS)}, `module.` prefixes stripped'),
    Layout('robustness', ('checkpoint',),
           _single((_RULES['robustness_attacker'], _RULES['robustness_normalizer'],
                    _NUM_BATCHES_TRACKED), container=('model',)),
           "robustness library: ['model'], `module.model.*` kept, the attacker's copy and the "
           "normalisers dropped (the model's `normalizer` gives its mean and std)"),
    Layout('aux_bn', ('checkpoint',), _single((_RULES['aux_bn'], _NUM_BATCHES_TRACKED)),
           'state_dict with auxiliary BatchNorms (shape/texture-debiased training), dropped'),
    Layout('split', ('backbone', 'linear-probe head'), _read_split,
           'SSL backbone (DINO, SwAV) and linear-probe head in two files, merged'),
    Layout('simclrv2', ('checkpoint',), _read_simclrv2,
           "Separius/SimCLRv2-Pytorch conversion: ['resnet'] renamed, ['head'] dropped"),
    Layout('diffusionnoise', ('checkpoint',),
           _single(_STATE_DICT, container=('model',)),
           "torchvision reference-script checkpoint of DiffusionNoiseModel: ['model'], "
           '`module.` stripped (the noise front-end has no weights)'),
)}


def convert_layout(files: Sequence[str], layout: str, arch: str | None = 'resnet50', *,
                   mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                   trust_pickle: bool = False, allow_nonfinite: bool = False
                   ) -> tuple[str, dict, dict[str, Any]]:
  """Converts the checkpoint file(s) of `layout` (a key of LAYOUTS) into Flax variables, strictly.

  `files` are the layout's files in its order ('split': backbone, then linear-probe head).
  `arch` is inferred when None; `mean`/`std` override the architecture's input normalisation
  (use 0 and 1 for models trained without), or the normaliser a file holds (robustness: its
  `normalizer.new_mean/new_std`), which is used when they are not given; a given one that
  differs from it is stated in one line on stderr. Every model variable must be filled and
  every kept key used; dropped keys are listed under metadata['dropped'] by rule. A tensor with
  NaN or inf is refused unless `allow_nonfinite`. Returns (arch,
  variables, metadata) as `convert` does, with 'layout' and 'sources' (each file's path and
  sha256) added.
  """
  spec = _layout(layout)
  files = [files] if isinstance(files, (str, os.PathLike)) else [os.fspath(f) for f in files]
  if len(files) != len(spec.roles):
    count = f'{len(spec.roles)} file{"s" if len(spec.roles) > 1 else ""}'
    raise ConversionError(f'layout {layout!r} takes {count} ({", then ".join(spec.roles)}), '
                          f'got {len(files)}')
  parts = spec.read(files, trust_pickle)
  tensors = {k: v for part in parts for k, v in part.checkpoint.tensors.items()}
  where = ' + '.join(part.checkpoint.path for part in parts)
  origin = {k: f'{v} in {os.path.basename(part.checkpoint.path)}'
            for part in parts for k, v in part.origin.items()}
  normalization = next((part.checkpoint.normalization for part in parts
                        if part.checkpoint.normalization is not None), None)
  arch, variables, metadata = build(tensors, arch, mean, std, where, origin,
                                    normalization=normalization,
                                    allow_nonfinite=allow_nonfinite)
  return arch, variables, {**metadata, **_provenance(spec, parts)}


def _layout(name: str) -> Layout:
  if name not in LAYOUTS:
    raise errors.unknown('checkpoint layout', name, LAYOUTS, error=ConversionError)
  return LAYOUTS[name]


def _provenance(spec: Layout, parts: list[_Part]) -> dict[str, Any]:
  """The metadata fields that say where the weights came from.

  'source' and 'sha256' name one file as `convert`'s do; for several files they join the paths
  and take the sha256 of the files' hex digests concatenated in order (as
  converters.convert.digests_sha256 does), so the pair is identified as one checkpoint.
  """
  checkpoints = [part.checkpoint for part in parts]
  dropped: dict[str, list[str]] = {}
  for checkpoint in checkpoints:
    for rule, keys in checkpoint.dropped.items():
      dropped.setdefault(rule, []).extend(keys)
  sha = digests_sha256([c.sha256 for c in checkpoints])
  return {
      'layout': spec.name,
      'source': ' + '.join(c.path for c in checkpoints),
      'sha256': sha,
      'sources': [{'role': part.role, 'path': part.checkpoint.path,
                   'sha256': part.checkpoint.sha256, 'format': part.checkpoint.format,
                   'container': part.checkpoint.container,
                   'stripped_prefix': part.checkpoint.prefix} for part in parts],
      'format': checkpoints[0].format,
      'container': checkpoints[0].container,
      'stripped_prefix': checkpoints[0].prefix,
      'dropped': dropped,
  }
