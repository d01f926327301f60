"""Time in one home: the phases of a run, the programs it compiles, and the device's busy clock.

    with timing.Compiles() as compiles:          # programs compiled on this thread meanwhile
      phases = timing.Phases(compiles)
      with phases('images'): ...                 # wall time per phase, compiles taken out
    compiles.count, compiles.seconds, compiles.work
    busy = timing.Busy(); busy.dispatched(x); busy.wait(x); busy.fraction

`compile_all` compiles lowered programs ahead of the calls that need them, on worker threads.
Progress lines and bars are lc_jax.progress's.
"""

from __future__ import annotations

import collections
from concurrent import futures
import contextlib
import os
import threading
import time
from typing import Sequence

import jax


def compile_all(lowered: Sequence[jax.stages.Lowered]) -> list[jax.stages.Compiled]:
  """`lowered` compiled ahead of the calls that need them, on worker threads: on the CPU backend
  one per program up to the CPU count (XLA releases the GIL while it compiles), elsewhere one
  at a time. On an NVIDIA H200 (jax 0.11.2) concurrent compiles contend for the GPU, where
  XLA's autotuner times its kernel candidates: the demo's 18 programs took 10.9 s on one
  thread, 21.2 s on 4 and 20.8 s on 16 (docs/speed.md). $LC_JAX_COMPILE_THREADS overrides
  the count. Compiled programs land in JAX's caches, where the jitted calls of the same
  function, arguments and placement find them. An open `Compiles` of the calling thread counts
  the programs, their compile work, and the wall time of the whole."""
  if not lowered:
    return []
  owner = threading.get_ident()

  def compile_one(program: jax.stages.Lowered) -> jax.stages.Compiled:
    _WORKER.owner = owner
    try:
      return program.compile()
    finally:
      _WORKER.owner = None
  start = time.perf_counter()
  threads = int(os.environ.get('LC_JAX_COMPILE_THREADS', 0)) or (
      (os.cpu_count() or 1) if jax.default_backend() == 'cpu' else 1)
  with futures.ThreadPoolExecutor(min(len(lowered), threads),
                                  thread_name_prefix='lc_jax_compile') as pool:
    compiled = list(pool.map(compile_one, lowered))
  wall = time.perf_counter() - start
  for counter in _open_here():
    counter.seconds += wall
    counter.making += wall
  return compiled


class Compiles:
  """Counts the XLA programs compiled for this thread while it is open, and their compile time:
  `with Compiles() as compiles: ...; compiles.count, compiles.seconds, compiles.work`.
  `seconds` is wall time spent compiling (a `compile_all` batch counts its wall time once),
  `work` the sum of every program's own compile time (more than `seconds` when programs
  compiled in parallel). Programs read from JAX's persistent compilation cache are counted
  apart (`compiles.from_cache`); `compiles.making` is the wall time spent making programs at all
  (tracing, lowering, compiling or reading them). Another thread's programs (a sweep converting
  the next model in the background) are not this thread's work and are not counted; the
  threads of this thread's `compile_all` are."""

  def __init__(self):
    self.count, self.seconds, self.from_cache, self.making = 0, 0.0, 0, 0.0
    self.work, self.ahead = 0.0, 0  # ahead: programs compiled by compile_all
    self.thread: int | None = None  # the thread that opened it

  def __enter__(self) -> 'Compiles':
    self.thread = threading.get_ident()
    _OPEN.append(self)
    return self

  def __exit__(self, *exc) -> None:
    _OPEN.remove(self)


_OPEN: list[Compiles] = []
# JAX times each program it makes in three steps (a jit cache hit makes none of them). Its
# listeners run on the thread that made the program.
_MAKING = ('/jax/core/compile/jaxpr_trace_duration',
           '/jax/core/compile/jaxpr_to_mlir_module_duration',
           '/jax/core/compile/backend_compile_duration')


_WORKER = threading.local()  # .owner: the thread a compile_all worker compiles for


def _open_here() -> list[Compiles]:
  thread = getattr(_WORKER, 'owner', None) or threading.get_ident()
  return [counter for counter in _OPEN if counter.thread == thread]


def _on_duration(event: str, duration: float, **kwargs) -> None:
  del kwargs
  if event in _MAKING:
    worker = getattr(_WORKER, 'owner', None) is not None  # its wall time is compile_all's
    for counter in _open_here():
      if not worker:
        counter.making += duration
      if event == _MAKING[-1]:
        counter.count += 1
        counter.work += duration
        if worker:
          counter.ahead += 1
        else:
          counter.seconds += duration


def _on_event(event: str, **kwargs) -> None:
  del kwargs
  if event == '/jax/compilation_cache/cache_hits':
    for counter in _open_here():  # a cache hit went through the compile timer too: not a compile
      counter.from_cache += 1
      counter.count -= 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


class Busy:
  """How long the device was busy, measured from the host without stopping it: work dispatched
  at time t that is not finished at time t' kept the device busy from t to t' (it, or work
  queued before it, was running). Call `dispatched(*arrays)` after dispatching work whose small
  results are `arrays` (kept until seen ready), `segment(x)` after dispatching a segment whose
  output is `x` (a Forward reports each one through its `on_dispatch`; only the newest is kept,
  so the clock holds no activation the run has let go), `wait(*arrays)` to block until results
  are ready (the device was busy until they were), and `poll()` whenever the host looks.
  `seconds` is the busy time seen so far: a lower bound, missing only time between results
  becoming ready and the host's next look when the host was not waiting for them; `fraction` is
  its share of the wall time since the clock started. Works on every backend: it only asks
  arrays whether they are ready."""

  def __init__(self):
    self.start = self.covered = time.perf_counter()
    self.seconds = 0.0
    # (dispatch time, result), in dispatch order; ready ones are dropped from the front.
    self._pending: collections.deque[tuple[float, jax.Array]] = collections.deque()
    self._newest: tuple[float, jax.Array] | None = None  # the newest segment output

  def dispatched(self, *arrays: jax.Array) -> None:
    self.poll()
    self._pending.extend((self.covered, array) for array in arrays)

  def segment(self, x: jax.Array) -> None:
    self.poll()  # the segment before it, unfinished, shows a queue the dispatch may have waited on
    self._newest = (self.covered, x)

  def wait(self, *arrays: jax.Array) -> None:
    self.poll()
    if not all(array.is_ready() for array in arrays):  # the device computes them meanwhile
      for array in arrays:
        array.block_until_ready()
      now = time.perf_counter()
      self.seconds, self.covered = self.seconds + now - self.covered, now
    self.poll()

  def poll(self) -> None:
    """Credits the time since the last look if a result held is not ready yet: the device had
    work from the oldest such result's dispatch (or the last look) until now."""
    now = time.perf_counter()
    while self._pending and self._pending[0][1].is_ready():
      self._pending.popleft()
    if self._newest is not None and self._newest[1].is_ready():
      self._newest = None
    began = [held[0] for held in (self._pending[0] if self._pending else None, self._newest)
             if held is not None]
    if began:
      self.seconds += now - max(self.covered, min(began))
    self.covered = now

  @property
  def fraction(self) -> float:
    return self.seconds / max(time.perf_counter() - self.start, 1e-9)


class Phases:
  """Wall time of a run's phases in seconds, `seconds`: 'conversion' (hashing the checkpoint,
  converting it or reading an earlier conversion), 'images' (loading the images), 'compute'
  (evaluating the original and the resets) and 'compile' (tracing, lowering and compiling
  programs, or reading them from the persistent cache, in whichever phase it happened, and
  taken out of that phase, as `compiles` counted it). `with phases('images'): ...` around
  each phase, while `compiles` is open."""

  def __init__(self, compiles: Compiles):
    self.seconds = {'conversion': 0.0, 'images': 0.0, 'compile': 0.0, 'compute': 0.0}
    self._compiles = compiles

  @contextlib.contextmanager
  def __call__(self, name: str):
    start, made = time.perf_counter(), self._compiles.making
    try:
      yield
    finally:
      making = self._compiles.making - made
      self.seconds['compile'] += making
      self.seconds[name] += time.perf_counter() - start - making

  def summary(self, wall: float) -> str:
    """`took 41.2 s: conversion 2.0 s, images 1.7 s, compile 30.2 s, compute 7.3 s, other
    0.0 s`, the run's closing progress line (other: the wall time outside the phases)."""
    other = max(wall - sum(self.seconds.values()), 0.0)
    parts = [f'{name} {seconds:.1f} s' for name, seconds in {**self.seconds,
                                                              'other': other}.items()]
    return f'took {wall:.1f} s: ' + ', '.join(parts)
