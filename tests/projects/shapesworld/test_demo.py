"""`make demo`'s entry point (projects/shapesworld/demo.py) end to end on the smoke config."""
import json
import os
import subprocess
import sys

import pytest

import cli_runs

pytestmark = pytest.mark.slow


def test_demo_writes_metrics_of_both_view_sets_and_overlays(tmp_path, smoke_resources,
                                                            compile_cache):
  resources = smoke_resources
  workdir = str(tmp_path / 'demo')
  cli_runs.main_args(workdir, resources)  # seeds the text-embedding cache
  cmd = [sys.executable, '-m', 'zegformer_jax.projects.shapesworld.demo', '--workdir', workdir,
         '--config', 'configs/shapesworld.py:smoke', '--num_overlays', '1',
         f'--config.dataset.data_dir={resources}/data',
         f'--config.clip.model_path={resources}/clip',
         '--config.shapesworld.backbone_pretrain.steps=0']
  result = subprocess.run(cmd, cwd=cli_runs.ROOT, capture_output=True, text=True,
                          timeout=400, env=cli_runs.env(compile_cache))
  assert result.returncode == 0, cli_runs.tail(result.stdout + result.stderr)
  for v in ('seg', 'img', 'full'):
    with open(os.path.join(workdir, f'metrics_{v}.json')) as f:
      tta_metrics = json.load(f)
    with open(os.path.join(workdir, f'metrics_{v}_single_view.json')) as f:
      single = json.load(f)
    assert tta_metrics['test_views'] == [{'min_size': 64, 'flip': False},
                                         {'min_size': 64, 'flip': True},
                                         {'min_size': 80, 'flip': False},
                                         {'min_size': 80, 'flip': True}]
    assert single['test_views'] == [{'min_size': 64, 'flip': False}]
    assert tta_metrics['num_images'] == single['num_images'] == 16
    assert f'-> {workdir}/metrics_{v}_single_view.json' in result.stdout
  assert '(views: 64, 64 flipped, 80, 80 flipped)' in result.stdout
  assert os.path.exists(os.path.join(workdir, 'predict', 'val_000_overlay.png'))
