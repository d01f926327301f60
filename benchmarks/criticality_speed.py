r"""Our criticality run against the paper's PyTorch procedure, side by side, on ResNet-50 (or
any registered architecture with --arch).

    python benchmarks/criticality_speed.py --num_images=32 --batch_size=32
    python benchmarks/criticality_speed.py --arch=vit_small_patch16_224 --num_images=32

Runs, one after the other and each in its own process, the same job: all conv + linear layers
(54 for ResNet-50, 50 for a ViT) of the same checkpoint, one trial of fresh resets, on the same
NUM_IMAGES generated ImageNet-like JPEGs (benchmarks/decode.py's, written into WORKDIR/images):

  a  ours, end to end: `python run.py --config=configs/paper.py ...` with a fresh image cache
     (decoding included) and a fresh compilation cache (every program compiled), prefix reuse
     on;
  b  the paper's procedure in PyTorch, as its code (github.com/paulgavrikov/layer_criticality)
     does it: the timm model, the trained state_dict restored before each reset, the layer's
     parameters and buffers taken from a freshly initialised model, and for every one of the
     1 + L evaluations the ImageFolder + DataLoader rebuilt and every JPEG decoded again
     (Resize(256), CenterCrop(224), ToTensor; shuffle with a generator seeded 0), in full
     float32 (TF32 off on a GPU, as ours at precision float32; --precision=tf32 or bfloat16
     sets both procedures' arithmetic alike);
  c  ours as a, with --config.reuse_prefix=false (every reset runs the whole forward).

Without --checkpoint it builds the timm ARCH (torch.manual_seed(0), BatchNorm statistics, if
any, calibrated on smooth random images, the head scaled to a trained model's logit spread) and
saves it to WORKDIR/ARCH.pth (kept and reused when the workdir is given again). Prints a header
(CPUs, versions, jax backend), then per leg: wall time of the process (imports included),
images*layers per second, the process's own peak resident memory (its VmHWM at exit) and its
mean criticality, and for legs a and c the run's own split of its time (its closing progress
lines: programs compiled, and conversion, images, compile and compute seconds) and the
process's start-up and exit around it; then the ratios b/a and c/a; then the model FLOPs each
procedure executes (2 * MACs of every Conv2d and Linear at 224x224, counted with forward hooks)
against the minimum
the protocol needs (one original forward, and for each layer the forward from that layer on),
(a ViT's attention products, which no Conv2d or Linear computes, are not counted), and with
--peak_tflops those FLOPs per second of wall time as a fraction of the device's peak.
A leg that fails is reported with its exit status and last error line; the others still run.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import _shared  # pylint: disable=g-import-not-at-top,wrong-import-position
from lc_jax import errors  # pylint: disable=g-import-not-at-top,wrong-import-position

_NUM_IMAGES = flags.DEFINE_integer('num_images', 32, 'JPEGs to generate and evaluate.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Batch size of every procedure.')
_CHECKPOINT = flags.DEFINE_string(
    'checkpoint', '', 'A state_dict (.pth) of --arch; empty: a calibrated random timm model '
    'saved to WORKDIR/ARCH.pth.')
_WORKDIR = flags.DEFINE_string('workdir', '', 'Folder for everything; empty: a temporary one.')
_THREADS = flags.DEFINE_integer(
    'threads', 0, 'CPU cores for every leg (CPU affinity, and torch.set_num_threads for b); '
    '0: all.')
_LEGS = flags.DEFINE_list('legs', ['a', 'b', 'c'], 'Which legs to run, of a, b, c.')
_TORCH_DEVICE = flags.DEFINE_string(
    'torch_device', 'auto', 'Device of leg b: cpu, cuda, or auto (cuda when available).')
_TORCH_WORKERS = flags.DEFINE_integer(
    'torch_workers', 0, "Leg b's DataLoader num_workers (the reference uses up to 8; 0 decodes "
    'in the process itself).')
_PEAK_TFLOPS = flags.DEFINE_float(
    'peak_tflops', 0.0, "The device's float32 peak in TFLOP/s (e.g. 67 for an H100 SXM without "
    "tensor cores); when given, each leg's executed FLOPs per second of wall time are shown as a "
    'fraction of it.')
_ARCH = flags.DEFINE_string(
    'arch', 'resnet50', 'The registered architecture (a timm name: resnet50, '
    'vit_small_patch16_224, convnext_tiny, ...) whose checkpoint is benchmarked.')
_PRECISION = flags.DEFINE_enum(
    'precision', 'float32', ['float32', 'tf32', 'bfloat16'],
    "Every leg's arithmetic: ours --config.precision; leg b float32 with TF32 off, TF32 "
    "convolutions and matmuls (torch's cuDNN default), or bfloat16 autocast.")
_MODE = flags.DEFINE_enum('mode', 'compare', ['compare', 'torch'],
                          'Internal: torch runs leg b in this process.')

TRIALS = 1
SEED = 0
LEG_NAMES = {'a': 'ours', 'b': 'paper procedure, PyTorch', 'c': 'ours, reuse_prefix=false'}


# ------------------------------------------------------------------------ leg b (PyTorch) -----


def torch_leg(workdir: str, checkpoint: str, num_images: int, batch_size: int, threads: int,
              device: str, workers: int) -> dict:
  """The reference code's loop (one trial, conv + linear layers); returns its rows and timings."""
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils.data import DataLoader  # pylint: disable=g-import-not-at-top
  from torchvision import datasets  # pylint: disable=g-import-not-at-top
  from torchvision import transforms  # pylint: disable=g-import-not-at-top

  # Imports torch and numpy only, no jax.
  from lc_jax import torch_reference  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  # As ours at the same --precision: float32 with TF32 off (torch's cuDNN convolutions default
  # to TF32 on a GPU, fewer mantissa bits, more FLOP/s), TF32, or bfloat16 autocast.
  tf32 = _PRECISION.value == 'tf32'
  torch.backends.cudnn.allow_tf32 = tf32
  torch.backends.cuda.matmul.allow_tf32 = tf32
  autocast = _PRECISION.value == 'bfloat16'
  torch.manual_seed(SEED)  # the reference's seed_everything(seed)
  device = torch.device(('cuda' if torch.cuda.is_available() else 'cpu')
                        if device == 'auto' else device)
  root = os.path.join(workdir, 'images')
  test_transforms = transforms.Compose(
      [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()])

  model = timm.create_model(_ARCH.value, pretrained=False)
  model.load_state_dict(torch.load(checkpoint, map_location='cpu', weights_only=True))
  model.eval().to(device)
  cfg = model.pretrained_cfg
  mean = torch.tensor(cfg['mean'], device=device).view(1, 3, 1, 1)
  std = torch.tensor(cfg['std'], device=device).view(1, 3, 1, 1)
  names = [n for n, m in model.named_modules() if type(m) in (torch.nn.Conv2d, torch.nn.Linear)]
  seconds = {'decode': 0.0, 'forward': 0.0}

  def evaluate():
    # As the reference's _test_individual: a new dataset and loader for every evaluation.
    generator = torch.Generator()
    generator.manual_seed(SEED)
    dataset = datasets.ImageFolder(root, transform=test_transforms)
    if len(dataset) < num_images:
      raise ValueError(f'{root} holds {len(dataset)} images, fewer than {num_images}')
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator,
                        num_workers=workers, pin_memory=device.type == 'cuda')
    logits, labels, seen = [], [], 0
    tick = time.perf_counter()
    for x, y in loader:
      x, y = x[:num_images - seen], y[:num_images - seen]
      start = time.perf_counter()
      seconds['decode'] += start - tick
      with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=autocast):
        out = model((x.to(device) - mean) / std)
        logits.append(out.float().cpu())
      labels.append(y)
      seen += len(x)
      tick = time.perf_counter()
      seconds['forward'] += tick - start
      if seen >= num_images:
        break
    return torch.cat(logits), torch.cat(labels)

  start = time.perf_counter()
  # A real backup (the reference's state_dict().copy() is shallow on CPU: resets pile up).
  backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
  ref_logits, labels = evaluate()
  original = torch_reference.metrics(ref_logits, ref_logits, labels)
  rows = [{'layer': 'original', 'trial': 0, **original}]
  for trial in range(TRIALS):
    fresh = timm.create_model(_ARCH.value, pretrained=False)  # timm's init, one model per trial
    for name in names:
      model.load_state_dict(backup)
      with torch.no_grad():
        model.get_submodule(name).load_state_dict(fresh.get_submodule(name).state_dict())
      logits, _ = evaluate()
      rows.append({'layer': name, 'trial': trial,
                   **torch_reference.metrics(ref_logits, logits, labels, original['top1_acc'])})
  model.load_state_dict(backup)
  return {'rows': rows, 'loop_seconds': time.perf_counter() - start, 'device': str(device),
          'evaluations': 1 + TRIALS * len(names), **{f'{k}_seconds': v for k, v in seconds.items()}}


# ------------------------------------------------------------------------ set-up --------------


def flops_per_leg(flops: list[tuple[str, int]], num_images: int) -> dict[str, float]:
  """Model FLOPs each procedure executes, and the protocol's minimum, for `num_images`."""
  counted = _shared.run_flops(flops, TRIALS, arch=_ARCH.value)
  return {'a': counted['ours'] * num_images, 'b': counted['whole'] * num_images,
          'c': counted['whole'] * num_images, 'min': counted['minimum'] * num_images}


def jax_backend() -> str:
  """jax's default backend and devices, asked in a child so that this process holds none."""
  try:
    out = subprocess.run(
        [sys.executable, '-c', 'import jax; d = jax.devices(); '
         'print(f"{jax.default_backend()} ({len(d)} x {d[0].device_kind})")'],
        capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip()
  except (subprocess.SubprocessError, OSError) as e:
    return f'unknown ({type(e).__name__})'


# ------------------------------------------------------------------------ running legs --------


# Runs a script (argv[2], with argv[3:]) as __main__ and writes the process's own peak resident
# memory (VmHWM, KiB) into argv[1] when it exits: wait4's ru_maxrss would carry over the
# high-water mark of the parent it was forked from (Linux keeps it across exec).
_PEAK_LAUNCHER = """
import atexit, runpy, sys
peak_file, script = sys.argv[1], sys.argv[2]
def write_peak():
  with open('/proc/self/status') as f:
    peak = [line.split()[1] for line in f if line.startswith('VmHWM:')]
  with open(peak_file, 'w') as f:
    f.write(peak[0] if peak else '')
atexit.register(write_peak)
sys.argv = sys.argv[2:]
sys.path.insert(0, '.')
runpy.run_path(script, run_name='__main__')
"""


def run_child(command: list[str], log_prefix: str, cores: list[int] | None) -> dict:
  """Runs `command` (a Python script and its arguments) from the repository root; its wall
  time, exit status and peak RSS (KiB: the child's own VmHWM, or wait4's ru_maxrss where the
  child could not report it)."""
  peak_file = log_prefix + '.peak'
  if os.path.exists(peak_file):
    os.remove(peak_file)
  command = [command[0], '-c', _PEAK_LAUNCHER, peak_file, *command[1:]]
  preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
  with open(log_prefix + '.out', 'w') as out, open(log_prefix + '.err', 'w') as err:
    start = time.perf_counter()
    proc = subprocess.Popen(  # pylint: disable=subprocess-popen-preexec-fn
        command, cwd=ROOT, stdout=out, stderr=err, preexec_fn=preexec)
    try:
      _, status, usage = os.wait4(proc.pid, 0)
    except BaseException:
      proc.kill()
      proc.wait()
      raise
    wall = time.perf_counter() - start
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
  with open(log_prefix + '.err', errors='replace') as f:
    lines = [l.strip() for l in f if l.strip()]
  try:
    with open(peak_file) as f:
      peak = int(f.read())
  except (OSError, ValueError):
    peak = usage.ru_maxrss
  return {'wall': wall, 'rc': proc.returncode, 'maxrss_kib': peak,
          'error': lines[-1] if lines else '', 'log': log_prefix + '.err'}


def ours_command(tmp: str, leg: str, checkpoint: str, num_images: int, batch_size: int) -> list:
  command = [sys.executable, 'run.py', '--config=configs/paper.py',
             f'--workdir={os.path.join(tmp, leg)}',
             f'--config.model.checkpoint={checkpoint}', f'--config.model.arch={_ARCH.value}',
             '--config.data.source=imagefolder',
             f'--config.data.path={os.path.join(tmp, "images")}',
             f'--config.data.num_images={num_images}', f'--config.data.batch_size={batch_size}',
             f'--config.trials={TRIALS}', f'--config.seed={SEED}',
             f'--config.cache_dir={os.path.join(tmp, "cache_" + leg)}',
             f'--config.compilation_cache_dir={os.path.join(tmp, "compilation_" + leg)}',
             f'--config.precision={_PRECISION.value}']
  if leg == 'c':
    command.append('--config.reuse_prefix=false')
  return command


def mean_criticality_ours(workdir: str) -> float:
  with open(os.path.join(workdir, 'results.csv'), newline='') as f:
    values = [float(r['criticality']) for r in csv.DictReader(f) if r['layer'] != 'original']
  return sum(values) / len(values) if values else math.nan


def compare(tmp: str) -> None:
  """Runs the selected legs in `tmp` and prints the comparison."""
  legs = [l.strip() for l in _LEGS.value if l.strip()]
  unknown = sorted(set(legs) - set(LEG_NAMES))
  if unknown:
    raise errors.unknown('leg', unknown[0], LEG_NAMES, error=app.UsageError)
  num_images, batch_size = _NUM_IMAGES.value, _BATCH_SIZE.value
  available = sorted(os.sched_getaffinity(0))
  threads = _THREADS.value or len(available)
  cores = available[:threads] if threads < len(available) else None

  version = _shared.version
  print(f'machine: {os.cpu_count()} CPUs ({len(available)} usable, legs run on {threads}); '
        f'python {sys.version.split()[0]}, jax {version("jax")}, jaxlib {version("jaxlib")}, '
        f'torch {version("torch")}, torchvision {version("torchvision")}, '
        f'timm {version("timm")}; jax backend: {jax_backend()}', flush=True)

  images = os.path.join(tmp, 'images')
  shutil.rmtree(images, ignore_errors=True)
  size = _shared.make_images(images, num_images)
  checkpoint = os.path.abspath(_CHECKPOINT.value) if _CHECKPOINT.value else os.path.join(
      tmp, f'{_ARCH.value}.pth')
  if not _CHECKPOINT.value and not os.path.exists(checkpoint):
    _shared.make_checkpoint(checkpoint, _ARCH.value, SEED)
  flops = _shared.layer_flops(_ARCH.value)
  print(f'{_ARCH.value}: {checkpoint}; {len(flops)} conv + linear layers, {TRIALS} trial, fresh '
        f'resets; {num_images} JPEGs ({size / num_images / 1024:.0f} KiB on average) in '
        f'{images}, batch {batch_size}', flush=True)

  print()
  results = {}
  os.makedirs(os.path.join(tmp, 'logs'), exist_ok=True)
  for leg in legs:
    # A first run: no resume, no image cache, no compiled programs.
    for stale in (leg, f'cache_{leg}', f'compilation_{leg}'):
      shutil.rmtree(os.path.join(tmp, stale), ignore_errors=True)
    if leg == 'b':
      os.makedirs(os.path.join(tmp, 'b'))
      command = [sys.executable, os.path.abspath(__file__), '--mode=torch', f'--workdir={tmp}',
                 f'--checkpoint={checkpoint}', f'--num_images={num_images}',
                 f'--arch={_ARCH.value}',
                 f'--batch_size={batch_size}', f'--threads={threads}',
                 f'--torch_device={_TORCH_DEVICE.value}',
                 f'--torch_workers={_TORCH_WORKERS.value}',
                 f'--precision={_PRECISION.value}']
    else:
      command = ours_command(tmp, leg, checkpoint, num_images, batch_size)
    result = run_child(command, os.path.join(tmp, 'logs', leg), cores)
    if result['rc'] == 0:
      try:
        if leg == 'b':
          with open(os.path.join(tmp, 'b', 'result.json')) as f:
            detail = json.load(f)
          crits = [r['criticality'] for r in detail['rows'] if r['layer'] != 'original']
          result['crit'] = sum(crits) / len(crits)
          result['note'] = (f'{detail["device"]}; {detail["evaluations"]} evaluations: decoding '
                            f'{detail["decode_seconds"]:.1f} s, forward '
                            f'{detail["forward_seconds"]:.1f} s')
        else:
          result['crit'] = mean_criticality_ours(os.path.join(tmp, leg))
          result['phases'], result['took'] = closing_lines(result['log'])
      except (OSError, ValueError, KeyError) as e:
        result['rc'], result['error'] = -1, f'no readable results: {e}'
    if result['rc'] != 0 and leg == 'c' and 'reuse_prefix' in result['error']:
      result['error'] += ' (this checkout has no config.reuse_prefix)'
    results[leg] = result
    show_leg(leg, result, num_images * len(flops))

  done = {l: r for l, r in results.items() if r['rc'] == 0}
  for leg in ('b', 'c'):
    if leg in done and 'a' in done:
      a, x = done['a'], done[leg]
      print(f'  {leg}/a: wall time {x["wall"] / a["wall"]:.2f}x, images*layers/s '
            f'{a["wall"] / x["wall"]:.2f}x, peak RSS {x["maxrss_kib"] / a["maxrss_kib"]:.2f}x')
    elif leg in results and 'a' in results:
      print(f'  {leg}/a: n/a ({" and ".join(l for l in ("a", leg) if l not in done)} failed)')

  counted = flops_per_leg(flops, num_images)
  print(f'\nmodel FLOPs (2 * MACs of conv + linear at 224x224, {num_images} images):')
  labels = {
      'a': 'a ours: original + walk (no head) + per layer its block on',
      'b': f'b paper procedure: {1 + TRIALS * len(flops)} full forwards',
      'c': f'c ours, reuse_prefix=false: 1 + {TRIALS * len(flops)} full forwards',
      'min': 'minimum: original + per layer from the layer on',
  }
  for key, label in labels.items():
    print(f'  {label:62s} {counted[key] / 1e9:9.1f} GFLOPs  '
          f'{counted[key] / counted["min"]:5.2f}x minimum')
  if _PEAK_TFLOPS.value > 0:
    print(f'\nexecuted FLOPs per second of wall time (imports, conversion, decoding and compiling '
          f'included) against a float32 peak of {_PEAK_TFLOPS.value:g} TFLOP/s:')
    for leg, result in done.items():
      rate = counted[leg] / result['wall'] / 1e12
      print(f'  {leg} {LEG_NAMES[leg]:30s} {rate:8.3f} TFLOP/s  '
            f'{100 * rate / _PEAK_TFLOPS.value:5.1f}% of peak')


def closing_lines(log: str) -> tuple[str, float | None]:
  """The run's own split of its time, from its progress lines on stderr: `compiled N programs
  in X s (Y s of compile work); took W s: conversion ..., images ..., compile ..., compute ...,
  other ...`, and W (its wall time from the workdir's opening, imports not included)."""
  with open(log, errors='replace') as f:
    lines = [line.split('] ', 1)[-1].strip() for line in f]
  found = [line for line in lines if line.startswith(('compiled ', 'took '))][-2:]
  took = re.match(r'took (\d+(?:\.\d+)?) s', found[-1]) if found else None
  return '; '.join(found), float(took.group(1)) if took else None


def show_leg(leg: str, result: dict, images_layers: int) -> None:
  name = f'{leg} {LEG_NAMES[leg]}:'
  if result['rc'] != 0:
    print(f'{name:32s} FAILED (exit {result["rc"]}) after {result["wall"]:.1f} s: '
          f'{result["error"][:300]} (log: {result["log"]})', flush=True)
    return
  note = f' ({result["note"]})' if result.get('note') else ''
  print(f'{name:32s} {result["wall"]:8.1f} s  {images_layers / result["wall"]:8.1f} '
        f'images*layers/s  peak RSS {result["maxrss_kib"] / 1024:7.0f} MiB  mean criticality '
        f'{100 * result["crit"]:6.2f}%{note}', flush=True)
  if result.get('phases'):
    start = (f'; start-up and exit {result["wall"] - result["took"]:.1f} s'
             if result.get('took') is not None else '')
    print(f'{"":34s}{result["phases"]}{start}', flush=True)


@errors.exits_cleanly
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _MODE.value == 'torch':
    tmp = _WORKDIR.value
    detail = torch_leg(tmp, _CHECKPOINT.value, _NUM_IMAGES.value, _BATCH_SIZE.value,
                       _THREADS.value or len(os.sched_getaffinity(0)), _TORCH_DEVICE.value,
                       _TORCH_WORKERS.value)
    with open(os.path.join(tmp, 'b', 'result.json'), 'w') as f:
      json.dump(detail, f)
    return
  if _WORKDIR.value:
    os.makedirs(_WORKDIR.value, exist_ok=True)
    compare(os.path.abspath(_WORKDIR.value))
  else:
    with tempfile.TemporaryDirectory() as tmp:
      compare(tmp)


if __name__ == '__main__':
  app.run(main)
