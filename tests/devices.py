"""The environment of a subprocess whose JAX sees several CPU devices."""

import os


def cpu_devices(count: int, env=None) -> dict:
  """`env` (default os.environ) with `count` host CPU devices, and XLA's CPU thread pool four times
  its default size (NPROC; the default is the larger of the cores and the devices).

  A collective holds a pool thread while it waits for the rest of its group, so a pool with no
  more threads than devices can run out of them: a spread-resets run on 4 devices of 2 cores
  aborted after XLA's 40 s rendezvous timeout, one participant of each group waiting for a
  partner that never started."""
  env = dict(os.environ if env is None else env)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={count}'
  env['NPROC'] = str(4 * max(count, os.cpu_count() or 1))
  return env
