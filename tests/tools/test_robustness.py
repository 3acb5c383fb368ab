"""Nothing lost, one line per error: predict's output names, Ctrl-C, settings refused early."""
import math
import os
import signal

import pytest

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
