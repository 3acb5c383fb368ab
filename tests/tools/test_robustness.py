"""Nothing lost, one line per error: predict's output names, Ctrl-C, settings refused early,
outputs that cannot be written (a full device, a path through a regular file), a resumed run's
metrics log and config history."""
import errno
import json
import math
import os
import shutil
import signal

import numpy as np
import pytest

import cli_runs
from configs import shapesworld
from zegformer_jax import cli
from zegformer_jax.data import tfrecord
from zegformer_jax.tools import predict
from zegformer_jax.training import train


def test_outputs_of_same_named_images_do_not_overwrite_each_other():
  paths = ['in/a.png', 'in/a.jpg', 'in/b.png', 'other/b.png', 'in/c.png']
  stems = predict.output_stems(paths)
  assert stems == {'in/a.png': 'a_png', 'in/a.jpg': 'a_jpg', 'in/b.png': 'in_b_png',
                   'other/b.png': 'other_b_png', 'in/c.png': 'c'}
  with pytest.raises(ValueError, match='same name in folders of the same name'):
    predict.output_stems(['x/in/a.png', 'y/in/a.png'])


def test_a_split_typo_is_a_one_line_error_naming_the_file():
  info = {'splits': {'val_all': {}}, 'ignore_value': 255}
  with pytest.raises(ValueError) as e:
    tfrecord.split_info(info, 'val_al', '/data/x')
  assert isinstance(e.value, KeyError)   # still a KeyError for callers that catch one
  assert cli.error_line(e.value) == (
      "error: split 'val_al' not in /data/x/dataset_info.json; available: ['val_all']")


@pytest.mark.parametrize('key,value,message', [
    ('train.total_steps', 0, 'config.train.total_steps must be >= 1, got 0'),
    ('train.total_steps', -5, 'config.train.total_steps must be >= 1, got -5'),
    ('optim.lr', math.nan, 'config.optim.lr must be a finite number >= 0, got nan'),
    ('optim.lr', -1e-3, 'config.optim.lr must be a finite number >= 0, got -0.001')])
def test_useless_training_settings_are_refused_before_anything_runs(tmp_path, key, value,
                                                                     message):
  config = shapesworld.get_config('smoke')
  section, leaf = key.split('.')
  config[section][leaf] = value
  with pytest.raises(ValueError, match=message.replace('(', r'\(')):
    train.train(config, str(tmp_path))   # data_dir is empty: it would fail later otherwise
  assert os.listdir(tmp_path) == []


def test_ctrl_c_asks_for_a_checkpoint_and_twice_stops_at_once():
  before = signal.getsignal(signal.SIGINT)
  watch = train.PreemptionWatch()
  try:
    assert not watch.should_stop(1)
    os.kill(os.getpid(), signal.SIGINT)
    assert watch.should_stop(1) and watch.signalled == 'SIGINT'
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
  finally:
    watch.close()
  assert signal.getsignal(signal.SIGINT) is before   # handlers put back
  term = train.PreemptionWatch()
  try:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)   # a second SIGTERM changes nothing
    assert term.should_stop(3) and term.signalled == 'SIGTERM'
  finally:
    term.close()


@pytest.mark.slow
def test_readers_leave_a_checkpoint_being_written_alone(smoke_run):
  """Evaluation beside a training job: the step orbax is writing must survive the reader."""
  from zegformer_jax.training import checkpoints
  from zegformer_jax.training import state as state_lib
  config, workdir = smoke_run
  being_written = os.path.join(workdir, checkpoints.SUBDIR, '99.orbax-checkpoint-tmp')
  os.makedirs(being_written)
  try:
    _, state = state_lib.load_latest_state(config, workdir, 26)
    assert int(state['step']) == config.train.total_steps
    assert os.path.isdir(being_written)             # the reader did not clean it up
  finally:
    if os.path.isdir(being_written):
      os.rmdir(being_written)


# --------------------------------------------- issue 20: outputs that cannot be written (item 5)

def test_metrics_on_a_full_device_is_one_line_naming_the_file(tmp_path):
  from zegformer_jax.training import metric_writers
  os.symlink('/dev/full', tmp_path / 'metrics.jsonl')
  writer = metric_writers.MetricWriter(str(tmp_path), total_steps=3)
  try:
    with pytest.raises(OSError) as e:
      writer.write(1, {'loss': 1.0})
  finally:
    writer.close()
  assert cli.is_user_error(e.value)
  assert cli.error_line(e.value) == (
      f'error: cannot write {tmp_path}/metrics.jsonl: No space left on device')


def test_checkpoints_that_cannot_be_written_are_one_line(tmp_path):
  from zegformer_jax.training import checkpoints
  (tmp_path / 'checkpoints').write_text('a file where the directory belongs')
  with pytest.raises(OSError) as e:
    checkpoints.Checkpointer(str(tmp_path), keep=2, every=1)
  assert cli.error_line(e.value) == f'error: cannot write {tmp_path}/checkpoints: Not a directory'
  # The directory replaced by a file after the manager opened it: the save fails.
  other = tmp_path / 'other'
  ckpt = checkpoints.Checkpointer(str(other), keep=2, every=1)
  os.rmdir(other / 'checkpoints')
  (other / 'checkpoints').write_text('')
  try:
    with pytest.raises(OSError) as e:
      ckpt.save(1, {'step': np.zeros((), np.int32)}, force=True)
  finally:
    os.remove(other / 'checkpoints')
    ckpt.close()
  assert cli.is_user_error(e.value)
  assert cli.error_line(e.value) == (
      f'error: cannot write {other}/checkpoints/1: Not a directory')


def test_os_refusals_read_as_cannot_write():
  enospc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/w/metrics.jsonl')
  assert cli.error_line(enospc) == 'error: cannot write /w/metrics.jsonl: No space left on device'
  erofs = OSError(errno.EROFS, os.strerror(errno.EROFS), '/w/config.json')
  assert cli.is_user_error(erofs)
  assert cli.error_line(erofs) == 'error: cannot write /w/config.json: Read-only file system'
  assert not cli.is_user_error(OSError(errno.EBADF, 'Bad file descriptor'))   # a bug: traceback


@pytest.mark.slow
def test_unwritable_outputs_through_the_cli(tmp_path, smoke_resources, compile_cache):
  """The CLI: metrics.jsonl on a full device (the first metrics write, after step 1), and a
  workdir under a regular file (NotADirectory): one line each, exit status 1."""
  workdir = tmp_path / 'full'
  workdir.mkdir()
  os.symlink('/dev/full', workdir / 'metrics.jsonl')
  result = cli_runs.run(cli_runs.main_args(str(workdir), smoke_resources), compile_cache)
  assert result.returncode == 1, cli_runs.tail(result.stdout + result.stderr)
  assert result.stderr.strip().splitlines()[-1] == (
      f'error: cannot write {workdir}/metrics.jsonl: No space left on device')
  assert 'Traceback' not in result.stderr
  (tmp_path / 'a_file').write_text('')
  below = tmp_path / 'a_file' / 'run'
  args = ['--config', cli_runs.SMOKE, '--workdir', str(below), '--mode', 'train']
  result = cli_runs.run(args, compile_cache)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [f'error: cannot write {below}: Not a directory']


# ------------------------------------------------------ issue 20: resumed runs' records (3, 4)

def test_resumed_metrics_log_keeps_each_step_once(tmp_path):
  from zegformer_jax.training import metric_writers
  path = tmp_path / 'metrics.jsonl'
  lines = [json.dumps({'step': s, 'loss': float(s)}) for s in (1, 2, 4, 6, 8)]
  path.write_text('\n'.join(lines) + '\n{"step": 10, "lo')   # the crash cut the last line
  assert metric_writers.drop_entries_after(str(path), 6) == 2
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 4, 6]
  assert os.listdir(tmp_path) == ['metrics.jsonl']   # rewritten in place, nothing left over
  assert metric_writers.drop_entries_after(str(path), 6) == 0
  writer = metric_writers.MetricWriter(str(tmp_path), total_steps=9, resume_step=2)
  writer.write(3, {'loss': 3.0})
  writer.close()
  assert [json.loads(l)['step'] for l in path.read_text().splitlines()] == [1, 2, 3]
  os.symlink('/dev/full', tmp_path / 'special.jsonl')   # never read (endless zeros)
  assert metric_writers.drop_entries_after(str(tmp_path / 'special.jsonl'), 0) == 0


def test_config_history_is_kept_and_a_changed_total_steps_warns(tmp_path, capsys):
  from zegformer_jax.training import metric_writers
  config = shapesworld.get_config('smoke')
  first = config.to_json_best_effort(indent=2)
  workdir = str(tmp_path)
  assert metric_writers.record_config(workdir, first, resuming=False) is None
  assert metric_writers.record_config(workdir, first, resuming=True) is None   # unchanged
  config.train.total_steps = 8
  second = config.to_json_best_effort(indent=2)
  assert metric_writers.record_config(workdir, second, resuming=True) == 'config.1.json'
  out = capsys.readouterr().out
  assert out.splitlines() == [
      f'warning: config.train.total_steps is 8, the run being resumed in {workdir} had 6 '
      '(its config is kept as config.1.json); the learning-rate schedule changes']
  config.optim.lr = 5e-4   # another change: kept, no warning (total_steps is the same)
  assert metric_writers.record_config(workdir, config.to_json_best_effort(indent=2),
                                      resuming=True) == 'config.2.json'
  assert capsys.readouterr().out == ''
  assert (tmp_path / 'config.1.json').read_text() == first
  assert (tmp_path / 'config.2.json').read_text() == second
  assert json.loads((tmp_path / 'config.json').read_text())['optim']['lr'] == 5e-4


@pytest.mark.slow
def test_resume_with_another_total_steps_warns_and_keeps_the_config(tmp_path, smoke_resources,
                                                                     compile_cache, cached_run):
  """The CLI: a finished 5-step run resumed with total_steps=6 trains one more step, says so
  in one warning line and keeps the 5-step config as config.1.json."""
  overrides = ('--config.train.total_steps=5', '--config.train.log_every=1',
               '--config.train.checkpoint_every=1')   # test_resume's reference run
  workdir = str(tmp_path / 'run')
  shutil.copytree(cached_run('resume_reference', overrides), workdir)
  result = cli_runs.run(cli_runs.main_args(workdir, smoke_resources, *overrides[1:],
                                           '--config.train.total_steps=6'), compile_cache)
  assert result.returncode == 0, cli_runs.tail(result.stdout + result.stderr)
  warnings = [l for l in result.stdout.splitlines() if l.startswith('warning:')]
  assert warnings == [
      f'warning: config.train.total_steps is 6, the run being resumed in {workdir} had 5 (its '
      'config is kept as config.1.json); the learning-rate schedule changes'], result.stdout
  with open(os.path.join(workdir, 'config.1.json')) as f:
    assert json.load(f)['train']['total_steps'] == 5
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['total_steps'] == 6
  assert cli_runs.checkpoint_steps(workdir)[-1] == 6
