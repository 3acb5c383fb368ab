"""Batch sizes that do not divide over the devices: one line naming the key and the count."""
import os
import shutil

import jax
import pytest

import cli_runs
from zegformer_jax.training import sharding

# The run of tests/training/test_resume.py (cached_run shares it per session): same overrides.
REFERENCE_OVERRIDES = ('--config.train.total_steps=5', '--config.train.log_every=1',
                       '--config.train.checkpoint_every=1')


def test_local_batch_size_names_the_key_and_the_device_count():
  mesh = sharding.make_mesh(devices=jax.devices()[:8])
  assert sharding.local_batch_size(16, mesh, 'input.eval_batch_size') == 16
  with pytest.raises(ValueError) as e:
    sharding.local_batch_size(12, mesh, 'input.eval_batch_size')
  assert str(e.value) == (
      'input.eval_batch_size=12 is not divisible by the 8 devices of the mesh (every device '
      'takes an equal share of a batch); use a multiple of 8, e.g. '
      '--config.input.eval_batch_size=16')
  with pytest.raises(ValueError, match=r'^input\.global_batch_size=3 is not divisible by the 8 '):
    sharding.local_batch_size(3, mesh)


@pytest.mark.slow
def test_eval_batch_size_not_divisible_by_devices_is_one_line(tmp_path, smoke_resources,
                                                               compile_cache, cached_run):
  workdir = str(tmp_path / 'run')
  shutil.copytree(cached_run('resume_reference', REFERENCE_OVERRIDES), workdir)
  result = cli_runs.run(cli_runs.main_args(workdir, smoke_resources, *REFERENCE_OVERRIDES,
                                           '--config.input.eval_batch_size=12', mode='eval'),
                        compile_cache, devices=8)
  assert result.returncode == 1, cli_runs.tail(result.stdout + result.stderr)
  last = result.stderr.strip().splitlines()[-1]
  assert last == ('error: input.eval_batch_size=12 is not divisible by the 8 devices of the '
                  'mesh (every device takes an equal share of a batch); use a multiple of 8, '
                  'e.g. --config.input.eval_batch_size=16'), cli_runs.tail(result.stderr)
  assert 'Traceback' not in result.stderr and 'NamedSharding' not in result.stderr
  assert not [f for f in os.listdir(workdir) if f.startswith('metrics_')]
