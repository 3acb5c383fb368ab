"""Evaluation beside a running training job, in two real processes (issue 20, item 8).

`python -m zegformer_jax.main --mode train` writes a checkpoint every 2 steps (orbax keeps the
last 3, so steps are also deleted while the reader runs) while `--mode eval` runs again and
again on the same workdir. Training must end normally with its checkpoints intact; every
evaluation must succeed without a warning; the reader must leave the training run's
config.json, metrics.jsonl and checkpoints alone.
"""
import json
import os
import time

import jax
import pytest

import cli_runs
from configs import shapesworld
from zegformer_jax.modeling import methods
from zegformer_jax.training import checkpoints
from zegformer_jax.training import sharding
from zegformer_jax.training import state as state_lib

pytestmark = pytest.mark.slow

STEPS, EVERY, KEEP = 16, 2, 3
NUM_CLASSES = 26


def _intact(workdir, step):
  """The state of checkpoint `step`, restored by itself (no fallback): its step number."""
  config = shapesworld.get_config('smoke')
  abstract, _ = state_lib.create_train_state(
      config, methods.build_model(config.model), state_lib.make_optimizer_fn(config, STEPS),
      NUM_CLASSES, sharding.mesh_from_config(config), jax.random.key(0), abstract_only=True)
  ckpt = checkpoints.Checkpointer(workdir, KEEP, EVERY, read_only=True)
  try:
    return int(ckpt.restore(step, abstract)['step'])
  finally:
    ckpt.close()


def test_eval_beside_a_running_training_job(tmp_path, smoke_resources, compile_cache):
  workdir = str(tmp_path / 'run')
  train_args = cli_runs.main_args(workdir, smoke_resources, f'--config.train.total_steps={STEPS}',
                                  f'--config.train.checkpoint_every={EVERY}',
                                  f'--config.train.keep_checkpoints={KEEP}',
                                  '--config.train.log_every=1')
  # A light evaluation (one view, 8 images), so several run while training does.
  eval_args = cli_runs.main_args(workdir, smoke_resources, '--variants=seg',
                                 '--config.eval.charts=False', '--config.eval.aug_flip=False',
                                 '--config.eval.aug_min_sizes=(64,)',
                                 '--config.eval.max_images=8', mode='eval')
  t0 = time.time()
  # The save of step 8 pauses 6 s half-written (ZEGFORMER_TEST_SLOW_SAVE): a reader then
  # meets orbax's temporary directory of a checkpoint being written.
  trainer = cli_runs.start(train_args, compile_cache, str(tmp_path / 'train.log'),
                           ZEGFORMER_TEST_SLOW_SAVE='8:6')
  try:
    cli_runs.wait_for(lambda: cli_runs.checkpoint_steps(workdir), trainer,
                      what='the first checkpoint')
    config_json = os.path.join(workdir, 'config.json')
    with open(config_json) as f:
      config_text = f.read()
    config_mtime = os.stat(config_json).st_mtime_ns
    evals = []   # (whether checkpoints were written during it, output)
    print(f'first checkpoint after {time.time() - t0:.0f} s')
    while trainer.poll() is None or len(evals) < 2:
      before = cli_runs.checkpoint_steps(workdir)
      t1 = time.time()
      result = cli_runs.run(eval_args, compile_cache, timeout=120)
      output = result.stdout + result.stderr
      assert result.returncode == 0, cli_runs.tail(output)
      assert 'warning' not in output.lower() and 'Traceback' not in output, output
      after = cli_runs.checkpoint_steps(workdir)
      print(f'eval {time.time() - t1:.0f} s; checkpoints {before} -> {after}')
      evals.append((before != after, output))
    assert trainer.wait(timeout=120) == 0
  finally:
    if trainer.poll() is None:
      trainer.kill()
  with open(tmp_path / 'train.log') as f:
    log = f.read()
  print(f'{len(evals)} evaluations, {time.time() - t0:.0f} s in all')
  assert any(overlapped for overlapped, _ in evals), 'no checkpoint was written during an eval'
  assert 'paused' in log   # the slow save happened
  assert 'warning' not in log.lower() and 'Traceback' not in log, cli_runs.tail(log)
  expected = list(range(EVERY, STEPS + 1, EVERY))[-KEEP:]
  assert cli_runs.checkpoint_steps(workdir) == expected
  assert [_intact(workdir, s) for s in expected] == expected
  assert not os.path.exists(os.path.join(workdir, 'checkpoints.unreadable'))
  # The training run's records, untouched by the reader.
  with open(config_json) as f:
    assert f.read() == config_text
  assert os.stat(config_json).st_mtime_ns == config_mtime
  assert not [n for n in os.listdir(workdir) if n.startswith('config.') and n != 'config.json']
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == list(range(1, STEPS + 1))
  assert cli_runs.summary(workdir)['final_step'] == STEPS
  assert os.path.exists(os.path.join(workdir, 'metrics_seg.json'))   # the reader's own output
