"""Damaged checkpoints (issue 20, items 1 and 2): a reader steps back to the newest intact one.

The latest checkpoint of a finished smoke run (`cached_run`, steps 3, 4, 5 kept) is damaged
the ways a crash or a full disk damages files: a data file truncated, orbax's manifest
deleted, a JSON file inside it (orbax's metadata) replaced by garbage. state.load_latest_state
(evaluation and prediction) must restore step 4 and say so in one warning line naming the
damaged step (and the file, where it is a malformed JSON file), with no traceback; with no
intact step left it is one error line naming the directory. The training side (resume) is
tests/training/test_resume.py::test_damaged_latest_checkpoints_resume_from_the_newest_intact.
"""
import glob
import os
import shutil

import jax
import pytest

from configs import shapesworld
from zegformer_jax import cli
from zegformer_jax.training import checkpoints
from zegformer_jax.training import state as state_lib

pytestmark = pytest.mark.slow   # the smoke run behind cached_run

OVERRIDES = ('--config.train.total_steps=5', '--config.train.log_every=1',
             '--config.train.checkpoint_every=1')   # test_resume's reference run: shared
NUM_CLASSES = 26   # the smoke world's training classes


def truncate_largest_data_file(step_dir: str) -> str:
  files = glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_*', 'd', '*'))
  path = max(files, key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 3)
  return path


def garbage(path: str) -> str:
  with open(path, 'w') as f:
    f.write('{"cut short')
  return path


DAMAGE = {
    'truncated data file': (truncate_largest_data_file, False),
    'deleted manifest': (lambda d: os.remove(os.path.join(d, 'state', 'manifest.ocdbt')), False),
    'deleted state item': (lambda d: shutil.rmtree(os.path.join(d, 'state')), False),
    'malformed state metadata': (lambda d: garbage(os.path.join(d, 'state', '_METADATA')), True),
    'malformed checkpoint metadata': (
        lambda d: garbage(os.path.join(d, '_CHECKPOINT_METADATA')), True),
    'malformed sharding file': (lambda d: garbage(os.path.join(d, 'state', '_sharding')), True),
}


@pytest.fixture
def run_copy(tmp_path, cached_run):
  workdir = str(tmp_path / 'run')
  shutil.copytree(cached_run('resume_reference', OVERRIDES), workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['3', '4', '5']
  return workdir


@pytest.mark.parametrize('kind', sorted(DAMAGE))
def test_reader_steps_back_to_the_newest_intact_checkpoint(run_copy, kind, capfd):
  damage, names_file = DAMAGE[kind]
  step_dir = os.path.join(run_copy, 'checkpoints', '5')
  damaged = damage(step_dir)
  config = shapesworld.get_config('smoke')
  capfd.readouterr()
  _, state = state_lib.load_latest_state(config, run_copy, NUM_CLASSES)
  out, err = capfd.readouterr()
  print(out)
  assert int(state['step']) == 4
  lines = out.strip().splitlines()
  assert len(lines) == 1, out
  assert lines[0].startswith(f'warning: unreadable checkpoint {step_dir} ('), lines[0]
  assert lines[0].endswith('; using step 4, the newest intact one'), lines[0]
  if names_file:
    assert f'{damaged} is not valid JSON' in lines[0]
  for noise in ('Traceback', 'never retrieved', 'TensorStore({', 'Event loop is closed'):
    assert noise not in out + err, (noise, err[-3000:])
  assert os.path.isdir(step_dir)   # a reader moves nothing


def test_no_intact_checkpoint_is_one_error_naming_the_directory(run_copy, capfd):
  directory = os.path.join(run_copy, 'checkpoints')
  truncate_largest_data_file(os.path.join(directory, '5'))
  bad_json = garbage(os.path.join(directory, '4', 'state', '_METADATA'))
  os.remove(os.path.join(directory, '3', 'state', 'manifest.ocdbt'))
  with pytest.raises(checkpoints.CorruptCheckpointError) as e:
    state_lib.load_latest_state(shapesworld.get_config('smoke'), run_copy, NUM_CLASSES)
  line = cli.error_line(e.value)
  print(line)
  assert cli.is_user_error(e.value)
  assert line.startswith(f'error: no intact checkpoint in {directory}: step 5: ')
  assert f'step 4: {bad_json} is not valid JSON' in line and '; step 3: ' in line
  assert '\n' not in line
  _, err = capfd.readouterr()
  assert 'Traceback' not in err and 'never retrieved' not in err


def test_a_step_removed_while_a_reader_looks_at_it_is_skipped_silently(run_copy, capfd):
  """The training job's max_to_keep deletes the step a reader (eval beside training) picked:
  the reader takes the newest step left, without a warning."""
  config = shapesworld.get_config('smoke')
  _, state = state_lib.load_latest_state(config, run_copy, NUM_CLASSES)   # compiles nothing
  ckpt = checkpoints.Checkpointer(run_copy, 3, 1, read_only=True)
  try:
    assert ckpt.latest_step() == 5
    shutil.rmtree(os.path.join(run_copy, 'checkpoints', '5'))   # after the reader listed it
    capfd.readouterr()
    step, restored = ckpt.restore_latest(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
  finally:
    ckpt.close()
  out, err = capfd.readouterr()
  assert step == 4 and int(restored['step']) == 4
  assert 'warning' not in out.lower() and 'Traceback' not in err, out + err[-3000:]
