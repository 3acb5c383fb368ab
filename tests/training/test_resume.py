"""Preemption and crash recovery: interrupted smoke trainings end bit-identical to one that
was never interrupted.

  * SIGKILL at a (seeded) random step, restart: the resumed run restores train state and
    data-iterator state from the latest checkpoint (saved every step here);
  * SIGKILL while a checkpoint is being written (ZEGFORMER_TEST_SLOW_SAVE pauses the save):
    the half-written step is ignored and removed, the previous checkpoint restores;
  * SIGTERM: the run saves a checkpoint, prints `preempted at step N`, exits with status 0,
    and the next run resumes from it (no regular checkpoints in that run, so the one it
    resumes from is the preemption checkpoint).
  * the latest checkpoints damaged (a truncated data file, a malformed JSON file): the run
    names them in one warning line, moves them aside and resumes from the newest intact one.
Each ends with the exact parameter fingerprint and loss curve of the uninterrupted run.
"""
import glob
import json
import os
import random
import shutil
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


def test_damaged_latest_checkpoints_resume_from_the_newest_intact(tmp_path, smoke_resources,
                                                                  compile_cache, cached_run):
  """Issue 20, items 1-3: the latest checkpoint truncated, the one before it with a malformed
  data-iterator JSON: the run names both in one warning line, moves them aside, resumes from
  the newest intact one (3) and ends exact, each step logged once in metrics.jsonl."""
  reference = _reference(cached_run)
  workdir = str(tmp_path / 'run')
  shutil.copytree(cached_run('resume_reference', OVERRIDES), workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert cli_runs.checkpoint_steps(workdir) == [3, 4, 5]
  data_files = glob.glob(os.path.join(ckpt_dir, '5', 'state', 'ocdbt.process_*', 'd', '*'))
  largest = max(data_files, key=os.path.getsize)
  os.truncate(largest, os.path.getsize(largest) // 3)
  bad_json = os.path.join(ckpt_dir, '4', 'data', 'process_0-of-1.json')
  with open(bad_json, 'w') as f:
    f.write('{"next_index": ')
  result = _resume_and_compare(workdir, smoke_resources, compile_cache, reference)
  print(result.stdout)
  warnings = [l for l in result.stdout.splitlines() if l.startswith('warning:')]
  assert len(warnings) == 1, result.stdout
  assert warnings[0].startswith(f'warning: unreadable checkpoints {ckpt_dir}/5 (OUT_OF_RANGE')
  assert f'{ckpt_dir}/4 ({bad_json} is not valid JSON' in warnings[0]
  assert warnings[0].endswith(f'moved to {ckpt_dir}.unreadable; using step 3, the newest '
                              'intact one')
  assert 'Traceback' not in result.stderr and 'never retrieved' not in result.stderr
  assert sorted(os.listdir(ckpt_dir + '.unreadable')) == ['4', '5']
  assert cli_runs.checkpoint_steps(workdir) == [3, 4, 5]   # 4 and 5 written again
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    steps = [json.loads(line)['step'] for line in f]
  assert steps == [1, 2, 3, 4, 5]   # the interrupted run's 4 and 5 are not kept twice
