"""Device mesh, shardings and the host-to-device hand-off of batches.

Every process runs the same program. The mesh spans all devices of all processes with two
axes, `data` x `fsdp` (config.mesh.fsdp, default 1):

  batch       split over ('data', 'fsdp') jointly: every device holds global_batch / #devices
              examples, whatever the fsdp size.
  parameters  and optimiser state: with fsdp > 1, each array is split along its largest
              dimension divisible by the fsdp size (replicated over `data`), and replicated
              when no dimension divides; with fsdp == 1 everything is replicated (pure data
              parallelism). XLA inserts the all-gathers / reduce-scatters.

`fsdp` is the inner axis, so an fsdp group is a run of consecutive devices (the same host
when fsdp <= local device count) and its collectives stay on the fastest links.

Each process produces only its local slice of the global batch, and
`jax.make_array_from_process_local_data` assembles the global `jax.Array` without any
cross-host copy. jax.devices() lists devices process by process, so a process's devices
hold one contiguous block of the batch.
"""
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def make_mesh(fsdp: int = 1, devices: Optional[Any] = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  fsdp = int(fsdp)
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f'mesh.fsdp={fsdp} must be >= 1 and divide the {len(devices)} devices')
  return Mesh(np.asarray(devices).reshape(len(devices) // fsdp, fsdp), BATCH_AXES)


def mesh_from_config(config, devices: Optional[Any] = None) -> Mesh:
  """make_mesh with config.mesh.fsdp (1 when the config has no `mesh` section)."""
  fsdp = config.mesh.fsdp if 'mesh' in config else 1
  return make_mesh(fsdp, devices)


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every batch axis of the mesh."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def batch_axes(mesh: Mesh) -> tuple:
  """The mesh axes the batch is split over: ('data', 'fsdp') or whichever of them exist."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp: int) -> P:
  """P() or a spec naming `fsdp` on the largest dimension divisible by the fsdp size.

  Ties go to the later dimension (the output features of a [.., in, out] kernel).
  """
  if fsdp <= 1:
    return P()
  best = None
  for axis, size in enumerate(shape):
    if size % fsdp == 0 and (best is None or size >= shape[best]):
      best = axis
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = FSDP_AXIS
  return P(*spec)


def state_sharding(abstract_state: Any, mesh: Mesh) -> Any:
  """Per-leaf NamedSharding of a (train-state) pytree of arrays or ShapeDtypeStructs."""
  fsdp = mesh.shape.get(FSDP_AXIS, 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_state)


def local_batch_size(global_batch_size: int, mesh: Mesh,
                     key: str = 'input.global_batch_size') -> int:
  """Examples this process must produce; checks the batch divides over devices and hosts.

  A batch size that does not divide is a ValueError naming the config `key`
  ('input.global_batch_size', 'input.eval_batch_size') and the device count.
  """
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    multiple = -(-global_batch_size // num_devices) * num_devices
    raise ValueError(
        f'{key}={global_batch_size} is not divisible by the {num_devices} devices of the '
        f'mesh (every device takes an equal share of a batch); use a multiple of '
        f'{num_devices}, e.g. --config.{key}={multiple}')
  return global_batch_size // jax.process_count()


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict:
  """Turns this process's numpy slice of a batch into global arrays split over the batch axes.

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


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical on every process) -> global arrays replicated on every device.

  jax.device_put cannot target the devices of other processes; each process instead
  provides the copies for its own devices.
  """
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def to_host(tree: Any, mesh: Mesh) -> Any:
  """numpy copy of a pytree of global arrays on every process (all-gathers sharded leaves).

  jax.device_get needs every shard to be addressable, which fsdp-sharded parameters of a
  multi-process job are not; resharding to replicated first makes them so.
  """
  replicate = jax.jit(lambda t: t, out_shardings=replicated(mesh))
  return jax.device_get(replicate(tree))
