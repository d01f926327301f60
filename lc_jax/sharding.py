"""Devices and placement, apart from the model: the mesh, sharded batches, replicated variables,
and what several processes (hosts) must agree on.

    mesh = sharding.make_mesh()                   # every device of every process
    x = sharding.shard_batch(mesh, images)        # rows: a multiple of rows_multiple(mesh)
    variables = sharding.replicate(mesh, variables)

The mesh has axes ('resets', 'batch'). Batches are sharded along 'batch' and variables
replicated; with `resets=R` the devices form R groups, each evaluating its own reset on the
whole batch (lc_jax.evaluate.Forward.many). Batches are padded once, where they are made
(lc_jax.data.chunks); here they are only checked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from typing import Any, Iterator, Sequence

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from lc_jax.errors import UserError


def make_mesh(resets: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh ('resets', 'batch') over `devices` (default: every device of every process), with
  `resets` rows; the groups must divide the devices."""
  devices = jax.devices() if devices is None else list(devices)
  if resets < 1 or len(devices) % resets:
    raise UserError(f'{len(devices)} devices cannot be split into {resets} groups for resets; '
                    'choose a divisor of the device count')
  if resets > 1 and jax.process_count() > 1:
    raise UserError('spread_resets works within one process; with several processes (hosts) '
                    'leave it at 1: every device takes a slice of every batch')
  return Mesh(np.array(devices).reshape(resets, -1), ('resets', 'batch'))


def batch_devices(mesh: Mesh) -> int:
  """Devices a batch is sharded over (the 'batch' axis), over all processes."""
  return mesh.shape['batch']


def rows_multiple(mesh: Mesh) -> int:
  """What a process's rows of a batch must be a multiple of: its share of the 'batch' devices
  (with several processes, each holds the same number)."""
  return batch_devices(mesh) // jax.process_count()


def shard_batch(mesh: Mesh, batch: np.ndarray) -> jax.Array:
  """A host batch (images, labels or mask) sharded along 'batch'. With several processes,
  `batch` is this process's part and the result the global batch of all the parts."""
  batch = np.asarray(batch)
  if len(batch) % rows_multiple(mesh):
    raise ValueError(f'{len(batch)} rows do not split over {rows_multiple(mesh)} devices; pad '
                     'the batch where it is made (lc_jax.data.chunks)')
  sharded = NamedSharding(mesh, P('batch'))
  if jax.process_count() == 1:
    return jax.device_put(batch, sharded)
  return jax.make_array_from_process_local_data(sharded, batch)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """`tree` placed whole on every device of the mesh. Leaves a reset made may sit uncommitted on
  one device; placing every leaf alike keeps one compiled program per segment (jit specialises
  on placement). With several processes, a leaf of this process only goes through the host
  (every process holds the same value) to become a global array."""
  replicated = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, replicated)

  def place(leaf):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return leaf  # made from replicated arrays by all processes alike
    return jax.make_array_from_callback(np.shape(leaf), replicated,
                                        lambda index, leaf=np.asarray(leaf): leaf[index])
  return jax.tree.map(place, tree)


@contextlib.contextmanager
def agreed(step: str) -> Iterator[None]:
  """`with agreed('loading the images'): ...` runs the block; with several processes, it is also
  a barrier after which all of them fail if any did: the one that failed with its own message,
  the others saying so (no process is left waiting in a collective for one that stopped). A
  UserError then comes out `shared` on every process; any other failure comes out of the others
  as a RuntimeError, so that none of them goes on."""
  error = None
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # re-raised below
    error = e
  if jax.process_count() > 1:
    kinds = multihost_utils.process_allgather(
        np.int32(0 if error is None else 1 if isinstance(error, UserError) else 2))
    failed = kinds > 0
    if np.any(failed):
      user_errors = bool(np.all(kinds[failed] == 1))
      if error is None:
        message = f'process {int(np.argmax(failed))} failed while {step}; its output says why'
        error = UserError(message) if user_errors else RuntimeError(message)
      if isinstance(error, UserError) and user_errors:
        error.shared = True
  if error is not None:
    raise error


def first_process_digest(digest: str | None) -> str:
  """The hex sha256 `digest` of the first process, on every process (the others pass None)."""
  if jax.process_count() == 1:
    return digest
  raw = np.frombuffer(bytes.fromhex(digest), np.uint8) if jax.process_index() == 0 else np.zeros(
      32, np.uint8)
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(raw))).hex()


def same_everywhere(state: Any, what: str) -> None:
  """With several processes, refuses to go on unless all of them computed the same `state`."""
  if jax.process_count() > 1:
    digest = np.frombuffer(hashlib.sha256(json.dumps(state).encode()).digest(), np.uint8)
    if np.any(multihost_utils.process_allgather(digest) != digest):
      raise UserError(f'the processes read different {what}; WORKDIR must be one folder that '
                      'every host sees, up to date (a shared filesystem)')
