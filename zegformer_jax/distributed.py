"""Multi-process start-up: jax.distributed.initialize when the environment asks for it."""
import os

import jax


def maybe_initialize():
  """Initialises JAX's distributed runtime for multi-host jobs; no-op on one process.

  Triggers: an explicit coordinator (ZEGFORMER_COORDINATOR=host:port with
  ZEGFORMER_NUM_PROCESSES and ZEGFORMER_PROCESS_ID), SLURM with more than one task, or a
  TPU pod slice (TPU_WORKER_HOSTNAMES with several hosts). JAX discovers the rest itself.
  """
  if os.environ.get('ZEGFORMER_COORDINATOR'):
    if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
      # CPU processes on one machine (launch/local_multiprocess.sh): collectives over gloo.
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(
        coordinator_address=os.environ['ZEGFORMER_COORDINATOR'],
        num_processes=int(os.environ['ZEGFORMER_NUM_PROCESSES']),
        process_id=int(os.environ['ZEGFORMER_PROCESS_ID']))
  elif int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
  elif len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1:
    jax.distributed.initialize()
