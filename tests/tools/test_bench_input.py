"""bench_input (zegformer_jax/tools/bench_input.py): its CLI in a subprocess."""
import os
import subprocess
import sys

import pytest

from zegformer_jax.data import tfrecord

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))  # the repository root


def _cli(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})


@pytest.mark.slow
def test_bench_input_cli(tmp_path):
  """bench_input: --config with overrides, --make_fake (fake tree -> coco_stuff.convert)."""
  args = ('zegformer_jax.tools.bench_input', '--config', 'configs/coco_stuff_r50.py',
          '--data_dir', str(tmp_path))
  small = ('--config.input.crop_size=64', '--config.input.min_size_train=(64,)',
           '--config.input.max_size_train=128', '--make_fake', '2', '--workers', '0',
           '--batches', '1', '--warmup', '0', '--batch_size', '2', '--convert_workers', '0')
  proc = _cli(*args, *small)
  assert proc.returncode == 0, proc.stderr
  assert 'config configs/coco_stuff_r50.py: min_size_train 64..64 (max 128), crop 64' in proc.stdout
  assert '| 0 | ' in proc.stdout
  info = tfrecord.read_dataset_info(str(tmp_path / 'converted'))
  assert info['splits']['train']['num_examples'] == 2
  proc = _cli(*args, '--config.input.crop_sise=64')
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith(
      "error: unknown config key 'crop_sise' (from --config.input.crop_sise=64).")
  proc = _cli(*args, '--workers', '0,x')
  assert proc.returncode == 1
  assert proc.stderr.strip() == "error: --workers must be comma-separated integers, got '0,x'"
  proc = _cli(*args[:2], 'configs/none.py', *args[3:])
  assert proc.returncode == 1
  assert proc.stderr.strip() == ("error: cannot load config 'configs/none.py': config file "
                                 'configs/none.py does not exist')
