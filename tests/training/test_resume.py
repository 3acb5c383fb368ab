"""Preemption and crash recovery: interrupted smoke trainings end bit-identical to one that
was never interrupted.

  * SIGKILL at a (seeded) random step, restart: the resumed run restores train state and
    data-iterator state from the latest checkpoint (saved every step here);
  * SIGKILL while a checkpoint is being written (ZEGFORMER_TEST_SLOW_SAVE pauses the save):
    the half-written step is ignored and removed, the previous checkpoint restores;
  * SIGTERM: the run saves a checkpoint, prints `preempted at step N`, exits with status 0,
    and the next run resumes from it (no regular checkpoints in that run, so the one it
    resumes from is the preemption checkpoint).
Each ends with the exact parameter fingerprint and loss curve of the uninterrupted run.
"""
import os
import random
import signal

import pytest

import cli_runs

pytestmark = pytest.mark.slow

STEPS = 5
OVERRIDES = (f'--config.train.total_steps={STEPS}', '--config.train.log_every=1',
             '--config.train.checkpoint_every=1')


def _reference(cached_run):
  workdir = cached_run('resume_reference', OVERRIDES)
  return cli_runs.summary(workdir)['params_fingerprint'], cli_runs.losses(workdir)


def _resume_and_compare(workdir, resources, cache, reference, overrides=OVERRIDES):
  result = cli_runs.run(cli_runs.main_args(workdir, resources, *overrides), cache)
  assert result.returncode == 0, cli_runs.tail(result.stdout + result.stderr)
  assert 'resuming from' in result.stderr, cli_runs.tail(result.stderr)
  fingerprint, losses = reference
  got = cli_runs.summary(workdir)['params_fingerprint']
  print('fingerprint after resume:', got)
  assert got == fingerprint  # exact: same programs, same inputs, same order
  assert cli_runs.losses(workdir) == losses
  return result


def test_sigkill_at_random_step_then_resume_is_exact(tmp_path, smoke_resources, compile_cache,
                                                     cached_run):
  reference = _reference(cached_run)
  resources, cache = smoke_resources, compile_cache
  workdir = str(tmp_path / 'run')
  kill_after = random.Random(0).randint(1, STEPS - 2)  # a checkpoint to wait for
  proc = cli_runs.start(cli_runs.main_args(workdir, resources, *OVERRIDES), cache,
                        str(tmp_path / 'killed.log'))
  cli_runs.wait_for(lambda: kill_after in cli_runs.checkpoint_steps(workdir), proc,
                    what=f'checkpoint {kill_after}')
  assert cli_runs.kill(proc) == -signal.SIGKILL
  saved = cli_runs.checkpoint_steps(workdir)
  print(f'killed after checkpoint {kill_after}; checkpoints on disk: {saved}')
  assert saved and max(saved) < STEPS
  _resume_and_compare(workdir, resources, cache, reference)
  assert max(cli_runs.checkpoint_steps(workdir)) == STEPS


def test_sigkill_during_checkpoint_save_keeps_previous(tmp_path, smoke_resources, compile_cache,
                                                       cached_run):
  reference = _reference(cached_run)
  resources, cache = smoke_resources, compile_cache
  workdir = str(tmp_path / 'run')
  log = str(tmp_path / 'killed.log')
  paused_step = 3
  proc = cli_runs.start(cli_runs.main_args(workdir, resources, *OVERRIDES), cache, log,
                        ZEGFORMER_TEST_SLOW_SAVE=f'{paused_step}:600')

  def paused():
    with open(log) as f:
      return f'checkpoint save of step {paused_step} paused' in f.read()

  cli_runs.wait_for(paused, proc, what='the paused save')
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  partial = [n for n in os.listdir(ckpt_dir) if n.startswith(f'{paused_step}.')]
  assert partial, os.listdir(ckpt_dir)  # orbax's temporary directory of the unfinished step
  assert cli_runs.kill(proc) == -signal.SIGKILL
  assert cli_runs.checkpoint_steps(workdir) == [1, 2]  # the unfinished save is not a step
  _resume_and_compare(workdir, resources, cache, reference)
  assert not [n for n in os.listdir(ckpt_dir) if 'tmp' in n], os.listdir(ckpt_dir)


def test_sigterm_saves_exits_zero_and_resumes(tmp_path, smoke_resources, compile_cache,
                                              cached_run):
  reference = _reference(cached_run)
  resources, cache = smoke_resources, compile_cache
  workdir = str(tmp_path / 'run')
  log = str(tmp_path / 'terminated.log')
  # No regular checkpoints: whatever is on disk afterwards was written for the SIGTERM.
  overrides = OVERRIDES[:-1] + ('--config.train.checkpoint_every=0',)
  proc = cli_runs.start(cli_runs.main_args(workdir, resources, *overrides), cache, log)
  metrics = os.path.join(workdir, 'metrics.jsonl')
  cli_runs.wait_for(lambda: os.path.exists(metrics) and os.path.getsize(metrics) > 0, proc,
                    what='the first logged step')
  assert cli_runs.kill(proc, signal.SIGTERM) == 0
  with open(log) as f:
    text = f.read()
  saved = cli_runs.checkpoint_steps(workdir)
  print(f'SIGTERM: checkpoints {saved}')
  assert len(saved) == 1 and 1 <= saved[0] < STEPS, (saved, cli_runs.tail(text))
  assert f'preempted at step {saved[0]}: checkpoint saved' in text
  summary = cli_runs.summary(workdir)
  assert summary['preempted'] and summary['final_step'] == saved[0]
  _resume_and_compare(workdir, resources, cache, reference, overrides)
