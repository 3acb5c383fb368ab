"""Device mesh, shardings and the host-to-device hand-off of batches.

Every process runs the same program. The mesh spans all devices of all processes with one
axis, `data`; the batch is split along it and parameters are replicated. Each process
produces only its local slice of the global batch, and
`jax.make_array_from_process_local_data` assembles the global `jax.Array` without any
cross-host copy.
"""
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Examples this process must produce; checks the batch divides over devices and hosts."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(
        f'input.global_batch_size={global_batch_size} is not divisible by the '
        f'{num_devices} devices of the mesh')
  return global_batch_size // jax.process_count()


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Turns this process's numpy slice of a batch into global arrays sharded on `data`.

  Non-array entries (e.g. file names) are dropped: they never go to the device.
  """
  sharding = data_sharding(mesh)
  out = {}
  for key, value in batch.items():
    if not isinstance(value, np.ndarray) or value.dtype.kind in 'OUS':
      continue
    global_shape = (value.shape[0] * jax.process_count(),) + value.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
  return out
