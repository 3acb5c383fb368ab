"""Multi-process start-up: jax.distributed.initialize when the environment asks for it.

Must run before anything touches a JAX backend (main.py calls it right after parsing flags).
After it, jax.devices() lists the devices of every process and the train loop builds one
mesh over all of them (sharding.py).
"""
import logging
import os

import jax


def maybe_initialize():
  """Initialises JAX's distributed runtime for multi-host jobs; no-op on one process.

  Triggers: an explicit coordinator (ZEGFORMER_COORDINATOR=host:port with
  ZEGFORMER_NUM_PROCESSES and ZEGFORMER_PROCESS_ID; launch/local_multiprocess.sh), SLURM
  with more than one task (launch/gpu_slurm.sh), or a TPU pod slice (TPU_WORKER_HOSTNAMES
  with several hosts; launch/tpu_pod.sh). In the last two JAX discovers the rest itself.
  ZEGFORMER_INIT_TIMEOUT (seconds, default 300) bounds the wait for all processes.
  """
  timeout = int(os.environ.get('ZEGFORMER_INIT_TIMEOUT', '300'))
  if os.environ.get('ZEGFORMER_COORDINATOR'):
    try:
      num_processes = int(os.environ['ZEGFORMER_NUM_PROCESSES'])
      process_id = int(os.environ['ZEGFORMER_PROCESS_ID'])
    except (KeyError, ValueError):
      raise ValueError('ZEGFORMER_COORDINATOR is set: ZEGFORMER_NUM_PROCESSES and '
                       'ZEGFORMER_PROCESS_ID must be set to integers too') from None
    if not 0 <= process_id < num_processes:
      raise ValueError(f'ZEGFORMER_PROCESS_ID={process_id} is not in [0, {num_processes})')
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      # CPU processes on one machine (launch/local_multiprocess.sh): collectives over gloo.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=os.environ['ZEGFORMER_COORDINATOR'],
        num_processes=num_processes, process_id=process_id,
        initialization_timeout=timeout)
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize(initialization_timeout=timeout)
  elif len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    jax.distributed.initialize(initialization_timeout=timeout)
  else:
    return
  logging.info('distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
