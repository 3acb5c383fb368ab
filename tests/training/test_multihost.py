"""Multi-process training on one machine (launch/local_multiprocess.sh, gloo over loopback).

The same ShapesWorld smoke training (global batch 8, 2 steps) as
  2 processes x 4 CPU devices, 1 process x 8 devices, 1 process x 1 device, and
  1 process x 8 devices with FSDP (mesh.fsdp=4: parameters and optimiser state split over
  4 devices, batch over all 8)
gives the same loss curve and parameter fingerprint within 1e-5 relative (measured: at most
about 3e-7 on the losses and 2e-8 on the fingerprint; the differences are float reduction
order). Only process 0 logs; evaluation with 2 processes gives exactly the metrics of 1
process on the same checkpoint.
"""
import json
import os
import shutil

import pytest

import cli_runs
from configs import shapesworld

pytestmark = pytest.mark.slow

# Two steps: the second runs on updated, sharded parameters and optimiser state and on the
# data iterator's next batch. A third was dropped: on an AVX2 CPU (2026-12-03) the 1 x 8 runs
# matched 1 x 1 to 3e-7 for two steps, then the third step's loss_ce jumped (18.5346 against
# 18.5144) while its mask and dice terms stayed within 1e-4. That is a discrete change of
# the Hungarian assignment: from random weights many queries predict nearly the same mask,
# and reduction order alone can move a target between two near-tied queries.
STEPS = 2
OVERRIDES = (f'--config.train.total_steps={STEPS}', '--config.train.log_every=1',
             '--config.train.checkpoint_every=0')
TOLERANCE = 1e-5
RUNS = {  # name: (processes, devices per process, extra overrides)
    '2x4': (2, 4, ()),
    '1x8': (1, 8, ()),
    '1x1': (1, 1, ()),
    '1x8_fsdp4': (1, 8, ('--config.mesh.fsdp=4',)),
}


def test_processes_and_devices_do_not_change_training(tmp_path, smoke_resources, compile_cache):
  # One test (not a module fixture shared by several): pytest-xdist may send tests of one
  # module to different workers, which would repeat these runs.
  resources, cache = smoke_resources, compile_cache
  runs = {}
  for name, (processes, devices, extra) in RUNS.items():
    workdir = str(tmp_path / name)
    mode = 'train_and_eval' if name == '2x4' else 'train'
    result = cli_runs.run(cli_runs.main_args(workdir, resources, *OVERRIDES, *extra, mode=mode),
                          cache, processes=processes, devices=devices)
    assert result.returncode == 0, (name, cli_runs.tail(result.stdout + result.stderr))
    runs[name] = (workdir, result)

  _check_equivalence(runs)
  _check_layout(runs)
  _check_eval(runs['2x4'][0], resources, cache)


def _check_equivalence(runs):
  reference = cli_runs.losses(runs['1x1'][0])
  assert sorted(reference) == list(range(1, STEPS + 1))
  fingerprint = cli_runs.summary(runs['1x1'][0])['params_fingerprint']
  errors = {}
  for name, (workdir, _) in runs.items():
    errors[name] = (
        cli_runs.max_rel_diff(cli_runs.losses(workdir), reference),
        cli_runs.max_rel_diff(cli_runs.summary(workdir)['params_fingerprint'], fingerprint))
  print('max relative error vs 1x1 (losses, params fingerprint):', errors)
  for name, (loss_err, param_err) in errors.items():
    assert loss_err <= TOLERANCE and param_err <= TOLERANCE, (name, errors)


def _check_layout(runs):
  meshes = {name: cli_runs.summary(w)['mesh'] for name, (w, _) in runs.items()}
  assert meshes == {'2x4': {'data': 8, 'fsdp': 1}, '1x8': {'data': 8, 'fsdp': 1},
                    '1x1': {'data': 1, 'fsdp': 1}, '1x8_fsdp4': {'data': 2, 'fsdp': 4}}
  workdir, result = runs['2x4']
  assert cli_runs.summary(workdir)['num_processes'] == 2
  # Process 0 alone logs: one console line and one JSONL record per step.
  assert result.stdout.count(f'step 1/{STEPS}') == 1, cli_runs.tail(result.stdout)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == list(range(1, STEPS + 1))
  # Each process saved its own data-iterator state.
  data = os.path.join(workdir, 'checkpoints', str(STEPS), 'data')
  assert {'process_0-of-2.json', 'process_1-of-2.json'} <= set(os.listdir(data))


def _check_eval(workdir, resources, cache):
  """The 2-process evaluation equals a 1-process evaluation of the same checkpoint."""
  variant = shapesworld.get_config('smoke').eval.variant  # what train_and_eval evaluated
  path = os.path.join(workdir, f'metrics_{variant}.json')
  shutil.move(path, path + '.2proc')
  result = cli_runs.run(cli_runs.main_args(workdir, resources, *OVERRIDES, mode='eval'),
                        cache, processes=1, devices=8)
  assert result.returncode == 0, cli_runs.tail(result.stdout + result.stderr)
  with open(path + '.2proc') as f:
    two = json.load(f)
  with open(path) as f:
    one = json.load(f)
  assert two['num_images'] == one['num_images'] == 16
  for key in ('mIoU', 'mIoU_seen', 'mIoU_unseen', 'pAcc', 'mAcc', 'fwIoU', 'per_class'):
    assert two[key] == one[key], key
