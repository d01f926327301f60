"""The whole cross-validation of one run config (`run`): fresh models drawn in torch, the torch
loop, one lc-jax run a trial resetting from the same tensors, the three comparisons, the report."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from typing import Mapping

import jax
import ml_collections
import numpy as np

from converters import parity
from lc_jax import config as lc_config
from lc_jax import data
from lc_jax import experiment
from lc_jax import init
from lc_jax import schema
from lc_jax import workdir
from lc_jax.crossval.compare_init import init_checks
from lc_jax.crossval.compare_metrics import metric_checks
from lc_jax.crossval.compare_parity import first_disagreement
from lc_jax.crossval.compare_parity import parity_checks
from lc_jax.crossval.report import Report
from lc_jax.crossval.tolerances import check_tolerance_name
from lc_jax.crossval.tolerances import TOLERANCES
from lc_jax.errors import UserError

def run(config: ml_collections.ConfigDict | lc_config.RunConfig, out: str,
        tolerances: Mapping[str, float] | None = None) -> Report:
  """Cross-validates the run of `config` into the folder `out` (what is drawn, run and checked:
  lc_jax.crossval.cli, docs/crossval.md); returns the report, also written to OUT/crossval.md
  and OUT/crossval.csv.

  `tolerances` overrides entries of TOLERANCES. The config must reset fresh, layer by layer,
  with an architecture that has a torch counterpart; anything else is one UserError before work
  starts.
  """
  for name in tolerances or {}:
    check_tolerance_name(name)
  tolerances = {**TOLERANCES, **(tolerances or {})}
  settings = experiment.check(config)
  if settings.reset.mode != 'fresh':
    raise UserError(f'crossval checks fresh resets, drawn once in torch for both frameworks; '
                    f'reset.mode={settings.reset.mode} is not supported (leave it at fresh)')
  if settings.reset.granularity != 'layer':
    raise UserError('crossval compares with the torch loop, which resets one layer at a time: '
                    f'reset.granularity={settings.reset.granularity} is not supported (use layer)')
  if settings.model.arch:
    parity.timm_name(settings.model.arch)  # one without a torch counterpart is refused now
  torch, timm, torch_reference = _torch()
  out = workdir.ensure_folder(out, '--out', 'the cross-validation report')
  show = settings.progress

  def say(message: str) -> None:
    if show:
      print(f'crossval: {message}', file=sys.stderr, flush=True)

  # ---------------------------------------------------------------- model, images, layers ----
  # Converted into OUT/model: the lc-jax runs' workdirs are theirs to check before they write.
  model = experiment.prepare_model(settings, out)
  arch = model.spec.name
  timm_model = parity.timm_name(arch)
  num_classes = int(model.card['num_classes'])
  images, labels, info = data.load(settings.data, cache_dir=settings.cache_dir or None,
                                   progress=show)
  if not info.valid.all():  # rows that did not decode are zeros: left out
    images = images[info.valid]
    labels = None if labels is None else labels[info.valid]
  if not len(images):
    raise UserError('the image set is empty')
  names = [target.name for target in experiment.select_targets(settings, model)]
  trials = settings.num_trials

  # ---------------------------------------------------------------- fresh models, in torch ---
  fresh_dir = workdir.ensure_folder(os.path.join(out, 'fresh'), '--out', 'the fresh models')
  fresh, fresh_paths = [], []
  for trial in range(trials):
    with torch.random.fork_rng(devices=[]):
      torch.manual_seed(int(np.random.SeedSequence([settings.seed, trial]).generate_state(1)[0]))
      state = timm.create_model(timm_model, pretrained=False, num_classes=num_classes).state_dict()
    tensors = {k: v.numpy() for k, v in state.items() if not k.endswith('num_batches_tracked')}
    path = os.path.join(fresh_dir, f'trial{trial}.safetensors')
    _save_safetensors(tensors, path)
    fresh.append(tensors)
    fresh_paths.append(path)

  # ---------------------------------------------------------------- the torch loop ----------
  trained = parity.torch_model(arch, model.variables, num_classes)
  if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = False  # float32, as lc-jax's 'highest'
    torch.backends.cudnn.allow_tf32 = False
    trained.to('cuda')
  device = next(trained.parameters()).device
  # The torch loop's full forwards take most of the time: one, timed, tells the user how long.
  start = time.perf_counter()
  torch_reference.evaluate(trained, images, model.module.mean, model.module.std,
                           settings.data.batch_size)
  forward = time.perf_counter() - start
  forwards = 1 + trials * len(names)
  # The lc-jax runs compile, then reuse prefixes: about a quarter of the torch loop, and some
  # seconds a trial (the demo on the 2-core CPU: 20 s against 34 s for 6 layers, 93 against
  # 531 for 99), and the parity check some seconds more.
  expected = 1.25 * forwards * forward + 10 * trials + 10
  print(f'crossval: expected about {_minutes(expected)}: the torch loop runs '
        f'{forwards} full forwards of {len(images)} images at {forward:.1f} s each (measured), '
        f'then {trials} lc-jax run{"s" * (trials != 1)} and the parity check; fewer layers '
        '(--layers) or trials (--config.trials) take less', file=sys.stderr, flush=True)
  say(f'torch ({timm_model} on {device}): the original and {trials} x {len(names)} resets '
      f'on {len(images)} images')
  seconds: dict[str, float] = {}
  with _timed(seconds, 'torch loop'):
    theirs = torch_reference.run_protocol(trained, fresh, images, labels, names,
                                          model.module.mean, model.module.std,
                                          settings.data.batch_size)

  # ---------------------------------------------------------------- lc-jax -------------------
  ours: dict[tuple[str, int], Mapping] = {}
  with _timed(seconds, 'lc-jax runs'):
    for trial, path in enumerate(fresh_paths):
      say(f'lc-jax trial {trial}: resets from {path}')
      reset = dataclasses.replace(settings.reset, mode='checkpoint', init_checkpoint=path)
      try:
        rows = experiment.run(dataclasses.replace(settings, reset=reset),
                              os.path.join(out, 'jax', f'trial{trial}'))
      except UserError as e:  # e.g. a run of other settings there: its workdir is crossval's
        raise UserError(f'lc-jax run of trial {trial}: {e} (crossval: give a new --out)'
                        ) from None
      for row in rows:
        if row['layer'] != schema.ORIGINAL:
          ours[(row['layer'], trial)] = row
        elif trial == 0:
          ours[(row['layer'], 0)] = row

  # ---------------------------------------------------------------- compare -----------------
  say('parity of the original model, module by module')
  with _timed(seconds, 'parity'):
    checks = parity_checks(model.module, model.variables, trained, images, tolerances)
  module, stage, layer = first_disagreement(checks, model.layers)
  metric = metric_checks(theirs, ours, tolerances)
  broken = {c.name for c in metric if not c.passed}
  first_row = next((name for name in [schema.ORIGINAL] + names if name in broken), None)
  checks += metric
  drawn = model.fresh(init.trial_key(settings.seed, 0))  # trial 0's fresh model, as the run's
  checks += init_checks(model.layers, drawn, fresh[0], tolerances, settings.seed)

  context = [
      f'checkpoint {settings.model.checkpoint} (sha256 {model.card["sha256"][:12]}), '
      f'{arch}; torch counterpart timm {timm_model} on {device} (torch {torch.__version__}, '
      f'timm {timm.__version__}); lc-jax on {jax.default_backend()} (jax {jax.__version__}), '
      f'precision {settings.precision}, matmul precision {settings.matmul_precision}',
      f'{len(images)} images ({info.source}, {images.shape[1]}x{images.shape[2]}), '
      f'{"labelled" if labels is not None else "no labels"}; {len(names)} layers '
      f'({", ".join(settings.reset.types)}), trials: {trials}, seed {settings.seed}',
      f'fresh models: {os.path.relpath(fresh_dir, out)}/trialT.safetensors (torch, drawn with '
      f'seed {settings.seed}); lc-jax runs: jax/trialT/results.csv',
      'seconds: ' + ', '.join(f'{name} {value:.0f}' for name, value in seconds.items()),
  ]
  stages = list(dict.fromkeys(layer.stage for layer in model.layers))
  report = Report(arch, checks, tolerances, stages, module, stage, layer, first_row, context)
  report.write(out)
  return report


def _minutes(seconds: float) -> str:
  return f'{seconds:.0f} s' if seconds < 90 else f'{seconds / 60:.0f} min'


@contextlib.contextmanager
def _timed(seconds: dict[str, float], name: str):
  """Records the seconds the `with` block took as `seconds[name]`."""
  start = time.perf_counter()
  yield
  seconds[name] = time.perf_counter() - start


def _torch():
  """torch, timm and lc_jax.torch_reference (which needs torch), or a UserError saying how to
  install them."""
  try:
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    from lc_jax import torch_reference  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f'crossval needs the torch extra (torch, timm): pip install '
                    f'"lc-jax[torch]" ({e})') from None
  return torch, timm, torch_reference


def _save_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(dict(tensors), path)
