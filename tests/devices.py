"""The environment of a subprocess whose JAX sees several CPU devices."""

import os


def cpu_devices(count: int, env=None) -> dict:
  """`env` (default os.environ) with `count` host CPU devices, and XLA's CPU thread pool four times
  its default size (NPROC; the default is the larger of the cores and the devices).

  A collective holds a pool thread while it waits for the rest of its group, and the run queues
  the next programs while one computes: with as many threads as devices, the waiting
  participants of two queued programs can hold every thread, each waiting for one that cannot
  start, until XLA aborts the process (its 40 s rendezvous timeout; seen with 4 devices on 2
  cores)."""
  env = dict(os.environ if env is None else env)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={count}'
  env['NPROC'] = str(4 * max(count, os.cpu_count() or 1))
  return env
