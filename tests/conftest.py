"""Test set-up: 8 simulated CPU devices so sharded code paths run as on a pod slice."""
import os
import sys

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """(config, workdir) of a ShapesWorld smoke training run, trained once per test worker.

  The config is the prepared one: its data, CLIP and init paths point into the workdir.
  """
  from configs import shapesworld
  from zegformer_jax.projects.shapesworld import prepare
  from zegformer_jax.training import train
  workdir = str(tmp_path_factory.mktemp('smoke_run'))
  config = prepare.prepare(shapesworld.get_config('smoke'), workdir)
  train.train(config, workdir)
  return config, workdir
