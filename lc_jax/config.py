"""The run configuration: the defaults every config file starts from (the paper's protocol), and
the check that turns a config into typed, validated fields before anything is written.

    config = lc_jax.config.default()
    config.model.checkpoint = '/ckpt/resnet50.pth'
    settings = lc_jax.config.check(config)      # a RunConfig, or one UserError naming the problem

Fields (RunConfig):
- model: checkpoint (a file, bundled:NAME, zoo:ID for a model of the paper's zoo, or
  hf:REPO[/FILE][@REVISION] for a timm checkpoint on the Hugging Face Hub), arch
  (empty: inferred), id (the row label in results; empty: the checkpoint's file name),
  trust_pickle, allow_nonfinite (keep weights that hold NaN or inf, refused by default), offline
  and mirrors (for zoo:ID and hf:, see lc_jax.zoo); or factory instead of checkpoint and arch:
  package.module:function returning your own Flax model (lc_jax.factory);
- data: see lc_jax.data.config (source, path, num_images, batch_size, seed, order, sizes, ...);
- reset: mode (fresh, zero, checkpoint, interpolate, skip), layer_types ('conv,linear'; add
  batchnorm for the reference code's default; layernorm, embedding, layer_scale, attn_qkv,
  attn_proj, mlp for transformers and ConvNeXts: lc_jax.layers.TYPES), layers (a pattern; empty: all), granularity
  (layer, block, stage), init_scheme (empty: the architecture's), init_checkpoint (for mode
  checkpoint), alpha (the trained weights' share for mode interpolate, in [0, 1]);
- trials, seed: trial t of a random mode draws its fresh model from fold_in(key(seed), t);
- precision: 'float32' (exact, the default), 'tf32' (float32 storage, TensorFloat-32
  convolutions and matmuls where the hardware has them: the arithmetic of the paper's own GPU
  runs, as PyTorch's cuDNN convolutions default to it; float32 on CPU) or 'bfloat16' (weights
  stay float32, activations and matmuls run in bfloat16);
- matmul_precision: the expert setting under precision float32 and bfloat16 ('highest' keeps
  float32 exact on GPU/TPU too); precision tf32 sets it to tensorfloat32;
- reuse_prefix: a reset of a layer re-runs the network only from the block that contains it, on
  the original model's activations there (results are identical; False re-runs it all);
- spread_resets: split the devices into this many groups, each evaluating other resets on the
  whole batch (for batches small next to the device count); 1: every device takes a slice of
  every batch;
- chunk_size: run each batch through the model in chunks of at most this many images (0: whole
  batches). Bounds the activation the walk keeps and each segment's temporaries for a large
  data.batch_size; the numbers are the same within float32 rounding (a batch is only the unit
  of saved progress); chunks are a multiple of the device count;
- keep_per_image: also write WORKDIR/per_image.npz, each (trial, layer)'s criticality per image
  (keys 'TRIAL/LAYER', float64 over the decoded images in image order), durably and resumably,
  for the report's bootstrap over images and paired differences; one process only;
- progress: show progress (lc_jax.progress: live bars on a terminal, else a line at most every
  $LC_JAX_PROGRESS_EVERY seconds); verbose: also a line per finished row with its criticality;
- cache_dir: where decoded images are cached (empty: default);
- compilation_cache_dir: JAX's persistent compilation cache (empty: $LC_JAX_COMPILATION_CACHE or
  ~/.cache/lc_jax/compilation; 'none': off), so that a second process compiles nothing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import ml_collections

from lc_jax import reset as reset_lib
from lc_jax.data.config import DataConfig
from lc_jax import errors
from lc_jax.errors import UserError

MATMUL_PRECISIONS = ('highest', 'high', 'default', 'float32', 'tensorfloat32', 'bfloat16')
# Fields that change how a run is shown or how fast it goes, not what it measures: a workdir
# may be resumed with other values.
NOT_MEASURED = ('progress', 'verbose', 'keep_per_image', 'cache_dir', 'reuse_prefix',
                'spread_resets',
                'chunk_size', 'data.workers', 'model.offline', 'model.mirrors',
                'model.allow_nonfinite', 'compilation_cache_dir')


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Which checkpoint, as which architecture, under which name."""

  checkpoint: str = ''
  factory: str = ''  # package.module:function giving your own Flax model (lc_jax.factory)
  arch: str = ''
  id: str = ''
  trust_pickle: bool = False
  allow_nonfinite: bool = False  # keep weights that hold NaN or inf (refused by default)
  offline: bool = False  # zoo:ID, hf: only from the zoo's cache (also LC_JAX_OFFLINE=1)
  mirrors: str = ''  # zoo source prefixes rewritten (JSON or a .json file; LC_JAX_ZOO_MIRRORS)


@dataclasses.dataclass(frozen=True)
class ResetConfig:
  """What is reset, and how."""

  mode: str = 'fresh'
  layer_types: str = 'conv,linear'
  layers: str = ''
  granularity: str = 'layer'
  init_scheme: str = ''
  init_checkpoint: str = ''
  alpha: float = 0.0

  @property
  def types(self) -> list[str]:
    """layer_types as a list, with what the mode adds (lc_jax.reset.layer_types)."""
    return reset_lib.layer_types(self.mode, self.layer_types.split(','))


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """A checked run configuration (see the module docstring). Its fields mirror DataConfig's in
  shape only: each typed dataclass is the one home of its own defaults."""

  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  reset: ResetConfig = ResetConfig()
  trials: int = 3
  seed: int = 0
  matmul_precision: str = 'highest'
  precision: str = 'float32'
  reuse_prefix: bool = True
  spread_resets: int = 1
  chunk_size: int = 0
  keep_per_image: bool = False  # WORKDIR/per_image.npz: each row's criticality per image
  progress: bool = True
  verbose: bool = False
  cache_dir: str = ''
  compilation_cache_dir: str = ''

  @property
  def num_trials(self) -> int:
    """Trials run: the deterministic modes give the same numbers every time, so one."""
    return reset_lib.trials(self.reset.mode, self.trials)

  def measured(self) -> dict[str, Any]:
    """The fields that change the numbers (all but NOT_MEASURED), as a plain dict."""
    fields = dataclasses.asdict(self)
    for name in NOT_MEASURED:
      *parents, last = name.split('.')
      holder = fields
      for parent in parents:
        holder = holder[parent]
      holder.pop(last)
    if not fields['model']['factory']:  # a checkpoint's run: its identity as before the field
      del fields['model']['factory']
    return fields


def default() -> ml_collections.ConfigDict:
  """The paper's protocol: 10,000 ImageNet val images, conv + linear layers, fresh, 3 trials."""
  return ml_collections.ConfigDict(dataclasses.asdict(RunConfig()))


def check(config: ml_collections.ConfigDict | Mapping[str, Any] | RunConfig) -> RunConfig:
  """`config` as a RunConfig, every value checked that can be without heavy work: names, types,
  ranges, the files it names. Raises one UserError naming the first problem (an unknown key
  with the closest known one)."""
  if isinstance(config, RunConfig):
    return config
  values = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  _refuse_unknown(values, RunConfig, '')
  model = ModelConfig(**_typed(values.get('model', {}), ModelConfig, 'model'))
  reset_ = ResetConfig(**_typed(values.get('reset', {}), ResetConfig, 'reset'))
  data = DataConfig.from_config(values.get('data', {}))
  top = {k: v for k, v in values.items() if k not in ('model', 'reset', 'data')}
  run = RunConfig(model=model, data=data, reset=reset_, **_typed(top, RunConfig, ''))
  _check_values(run)
  return run


def _refuse_unknown(values: Mapping[str, Any], cls, prefix: str) -> None:
  fields = {f.name: f for f in dataclasses.fields(cls)}
  for key, value in values.items():
    if key not in fields:  # named by the full dotted key
      raise errors.unknown('config key', prefix + key, [prefix + name for name in fields],
                           listed_by='docs/command_line.md')
    default = fields[key].default
    if dataclasses.is_dataclass(default) and isinstance(value, Mapping):
      _refuse_unknown(value, type(default), f'{prefix}{key}.')


def _typed(values: Mapping[str, Any], cls, prefix: str) -> dict[str, Any]:
  """The scalar fields of `values`, each of its dataclass field's type (an int is a float)."""
  typed = {}
  for field in dataclasses.fields(cls):
    if field.name not in values or dataclasses.is_dataclass(field.default):
      continue
    value, kind = values[field.name], type(field.default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
      raise UserError(f'config {prefix and prefix + "."}{field.name} must be a {kind.__name__}, '
                      f'got {value!r}')
    typed[field.name] = value
  return typed


def _check_values(run: RunConfig) -> None:
  # Imported here: these modules import JAX, the dataclasses above do not need it.
  from lc_jax import checkpoints  # pylint: disable=g-import-not-at-top
  from lc_jax import evaluate  # pylint: disable=g-import-not-at-top
  from lc_jax import init  # pylint: disable=g-import-not-at-top
  from lc_jax import layers  # pylint: disable=g-import-not-at-top
  from lc_jax import models  # pylint: disable=g-import-not-at-top
  from lc_jax import reset  # pylint: disable=g-import-not-at-top

  model, reset_ = run.model, run.reset
  if model.factory:
    from lc_jax import factory  # pylint: disable=g-import-not-at-top
    if model.checkpoint or model.arch:
      raise UserError('model.factory and model.checkpoint (with model.arch) exclude each other: '
                      'give one, and leave the other empty (--config.model.checkpoint= '
                      '--config.model.arch=)')
    factory.check(model.factory)
    if reset_.mode == 'checkpoint':
      raise UserError('reset.mode=checkpoint takes converted checkpoint weights: it needs '
                      'model.checkpoint, not model.factory')
  elif not model.checkpoint:
    raise UserError('no checkpoint is set: give --config.model.checkpoint=PATH (a .pth, .pt, '
                    '.pth.tar, .ckpt or .safetensors file, bundled:NAME, zoo:ID, or '
                    'hf:REPO[/FILE][@REVISION]), or '
                    '--config.model.factory=package.module:function')
  else:
    checkpoints.check(model.checkpoint, 'model.checkpoint')
  if model.arch and model.arch not in models.names():
    raise errors.unknown('architecture', model.arch, models.names())
  reset.check_mode(reset_.mode)
  if not reset_.types:
    raise UserError(f'reset.layer_types is empty: give one or more of '
                    f'{", ".join(layers.TYPES)}, comma-separated (the paper: conv,linear)')
  unknown = [t for t in reset_.types if t not in layers.TYPES]
  if unknown:
    raise errors.unknown('layer type', unknown[0], layers.TYPES)
  layers.check_pattern(reset_.layers)
  if reset_.granularity not in layers.GRANULARITIES:
    raise errors.unknown('reset.granularity', reset_.granularity, layers.GRANULARITIES)
  if reset_.mode == 'skip' and reset_.granularity != 'block':
    raise UserError('reset.mode=skip removes whole residual blocks: set reset.granularity=block')
  if reset_.init_scheme:
    init.scheme(reset_.init_scheme)
  if reset_.mode == 'checkpoint':
    if not reset_.init_checkpoint:
      raise UserError('reset.mode=checkpoint needs reset.init_checkpoint=PATH')
    checkpoints.check(reset_.init_checkpoint, 'reset.init_checkpoint')
  elif reset_.init_checkpoint:
    raise UserError(f'reset.init_checkpoint applies to reset.mode=checkpoint only, and this run '
                    f'resets in mode {reset_.mode}: leave it empty '
                    '(--config.reset.init_checkpoint=), or set --config.reset.mode=checkpoint')
  reset.check_alpha(reset_.mode, reset_.alpha, 'reset.alpha')
  if run.data.source == 'photos' and run.data.path:
    raise UserError(f'data.path={run.data.path} is not read: data.source=photos measures the '
                    "bundled scikit-image photos; for a folder of images add "
                    '--config.data.source=imagefolder (or tfds with its data_dir)')
  if run.trials <= 0:
    raise UserError(f'trials={run.trials}: give a positive number of trials')
  if not 0 <= run.seed < 2**32:
    raise UserError(f'seed={run.seed} must lie in [0, 2^32)')
  if run.matmul_precision not in MATMUL_PRECISIONS:
    raise errors.unknown('matmul_precision', run.matmul_precision, MATMUL_PRECISIONS)
  evaluate.compute_dtype(run.precision)  # refuses an unknown precision
  if run.precision == 'tf32' and run.matmul_precision != 'highest':
    raise UserError(f'precision=tf32 sets the matmul precision itself (tensorfloat32); leave '
                    f'matmul_precision at highest, not {run.matmul_precision!r}')
  if run.spread_resets < 1:
    raise UserError(f'spread_resets={run.spread_resets}: give a positive number of groups')
  if run.chunk_size < 0:
    raise UserError(f'chunk_size={run.chunk_size!r}: give a number of images, or 0 for whole '
                    'batches')
  if run.cache_dir:
    _check_folder(run.cache_dir, 'cache_dir')


def _check_folder(folder: str, field: str) -> None:
  """Refuses a folder path that is, or lies under, a file. (A read-only folder may be fine: a
  cache that holds every entry needed is only read; writing fails in one line if it is not.)"""
  path = os.path.abspath(os.path.expanduser(folder))
  while not os.path.exists(path):  # the nearest existing ancestor decides
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise UserError(f'{field}: {path} is a file, not a folder')
