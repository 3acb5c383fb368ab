"""Bad inputs end in one clear line, `error: <message>` (CLI, exit status 1), not a traceback.

The CLI is run for the inputs it rejects before compiling anything (config key and type,
missing data directory, truncated TFRecord, checkpoint of another config); the others are
checked on the function that raises, with the message the CLI would print (main.py prints
any FileNotFoundError / ValueError / FloatingPointError as `error: <str(e)>`).
Every message is printed (pytest -s) for the README table. The CLI runs are marked `slow`.
"""
import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cli_runs
from configs import shapesworld
from zegformer_jax.training import checkpoints
from zegformer_jax.data import data_source
from zegformer_jax.data import input_pipeline
from zegformer_jax import cli
from zegformer_jax.training import optim
from zegformer_jax.tools import predict
from zegformer_jax.training import sharding
from zegformer_jax.data import tfrecord
from zegformer_jax.modeling import zegformer
from zegformer_jax.training import state as state_lib


@pytest.fixture
def main_cli(tmp_path, smoke_resources, compile_cache):
  """main_cli(*args, config=SMOKE, **env) runs main with `args` after the smoke resources in
  tmp_path/run; returns (status, last stderr line, stderr)."""
  def run(*args, config=cli_runs.SMOKE, **env):
    argv = cli_runs.main_args(str(tmp_path / 'run'), smoke_resources, *args)
    argv[1] = config
    if 'shapesworld' not in config:   # the project's keys exist only in its config
      argv = [a for a in argv if not a.startswith('--config.shapesworld.')]
    result = cli_runs.run(argv, compile_cache, timeout=120, **env)
    lines = result.stderr.strip().splitlines()
    print(lines[-1] if lines else '(no stderr)')
    return result.returncode, (lines[-1] if lines else ''), result.stderr
  return run


def _assert_one_line_error(status, line, stderr, *fragments):
  assert status == 1, stderr[-3000:]
  assert line.startswith('error: '), stderr[-3000:]
  assert 'Traceback' not in stderr, stderr[-3000:]
  for fragment in fragments:
    assert fragment in line, (fragment, line)


def _data_copy(tmp_path, resources) -> str:
  data_dir = str(tmp_path / 'data')
  shutil.copytree(os.path.join(resources, 'data'), data_dir)
  return data_dir


def _train_shard(data_dir, shard=0) -> str:
  info = tfrecord.split_info(tfrecord.read_dataset_info(data_dir), 'train', data_dir)
  return os.path.join(data_dir, info['shards'][shard]['file'])


def _rewrite_record(path, index, fn):
  """Replaces record `index` of a TFRecord file by fn(parsed example) (re-encoded)."""
  records = list(tfrecord.read_records(path))
  records[index] = fn(tfrecord.parse_example(records[index]))
  tfrecord.write_records(path, records)


def _expected_error_line(exc: BaseException) -> str:
  return cli.error_line(exc)


# ----------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_unknown_config_key(main_cli):
  status, line, stderr = main_cli('--config.optim.lrr=1')
  _assert_one_line_error(status, line, stderr, "unknown config key 'lrr'",
                         '--config.optim.lrr=1', 'Did you mean "lr"')


@pytest.mark.slow
def test_config_value_of_wrong_type(main_cli):
  status, line, stderr = main_cli('--config.train.total_steps=1.5')
  _assert_one_line_error(status, line, stderr, '--config.train.total_steps=1.5',
                         'invalid literal for int()')


@pytest.mark.slow
def test_missing_data_directory_and_debug_traceback(main_cli):
  args = ('--config.dataset.data_dir=/nonexistent/voc', '--config.clip.model_path=/nonexistent')
  status, line, stderr = main_cli(*args, config='configs/voc_r50.py')
  _assert_one_line_error(status, line, stderr, "dataset directory '/nonexistent/voc'",
                         'does not exist', 'python -m data_prep.voc')
  status, _, stderr = main_cli(*args, config='configs/voc_r50.py', ZEGFORMER_DEBUG=1)
  assert status == 1 and 'Traceback' in stderr and 'FileNotFoundError' in stderr


@pytest.mark.slow
def test_truncated_tfrecord(tmp_path, smoke_resources, main_cli):
  data_dir = _data_copy(tmp_path, smoke_resources)
  shard = _train_shard(data_dir, 1)
  with open(shard, 'r+b') as f:
    f.truncate(os.path.getsize(shard) - 100)
  status, line, stderr = main_cli(f'--config.dataset.data_dir={data_dir}')
  _assert_one_line_error(status, line, stderr, shard, 'is truncated')


@pytest.mark.slow
def test_checkpoint_of_another_config(tmp_path, main_cli):
  workdir = str(tmp_path / 'run')
  # A checkpoint of a model with a wider FFN (another config), written in-process.
  other = shapesworld.get_config('smoke')
  with other.unlocked():
    other.model.decoder.ffn_dim = 256
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  abstract, _ = state_lib.create_train_state(
      other, zegformer.build_model(other.model),
      functools.partial(optim.make_optimizer, other.optim, 10), 26, mesh, jax.random.key(0),
      abstract_only=True)
  state = jax.tree.map(lambda x: jax.device_put(jnp.zeros(x.shape, x.dtype), x.sharding),
                       abstract)
  ckpt = checkpoints.Checkpointer(workdir, keep=1, every=1)
  ckpt.save(1, state)
  ckpt.close()
  status, line, stderr = main_cli()
  _assert_one_line_error(
      status, line, stderr, 'does not match the model of this config',
      'params/transformer/layers_0/linear1/kernel has shape (64, 256) in the checkpoint, '
      '(64, 128) in the model')


# ----------------------------------------------------------------------------- data


def test_corrupt_tfrecord_crc(tmp_path, smoke_resources):
  data_dir = _data_copy(tmp_path, smoke_resources)
  shard = _train_shard(data_dir, 0)
  offset, length = tfrecord.index_records(shard)[2]
  with open(shard, 'r+b') as f:  # flip one byte inside the data of record 2
    f.seek(int(offset) + 12 + int(length) // 2)
    byte = f.read(1)
    f.seek(-1, 1)
    f.write(bytes([byte[0] ^ 0xFF]))
  source, _ = data_source.open_split(data_dir, 'train')
  with pytest.raises(tfrecord.TFRecordError) as e:
    source[2]
  print(_expected_error_line(e.value))
  assert 'record 2' in str(e.value) and 'data CRC mismatch' in str(e.value)
  # The training iterator raises the same error (grain re-raises it unchanged).
  config = shapesworld.get_config('smoke')
  it = input_pipeline.make_train_iterator(config, data_dir)
  with pytest.raises(tfrecord.TFRecordError, match='data CRC mismatch'):
    for _ in range(8):  # one epoch: 64 records, batch 8
      next(it)


def test_undecodable_image_in_record(tmp_path, smoke_resources):
  data_dir = _data_copy(tmp_path, smoke_resources)
  shard = _train_shard(data_dir, 0)
  _rewrite_record(shard, 0, lambda ex: tfrecord.encode_example(
      image=b'\x89PNG this is not an image', image_format='png', filename='broken.png',
      height=64, width=64, label=ex['label/encoded']))
  source, _ = data_source.open_split(data_dir, 'train')
  with pytest.raises(ValueError) as e:
    source[0]
  print(_expected_error_line(e.value))
  assert 'broken.png' in str(e.value) and 'cannot decode image' in str(e.value)


def test_label_value_out_of_range(tmp_path, smoke_resources):
  data_dir = _data_copy(tmp_path, smoke_resources)
  shard = _train_shard(data_dir, 0)

  def bad_label(ex):
    label = tfrecord.decode_label(ex['label/encoded'])
    label[:4, :4] = 200  # 26 train classes, ignore value 255
    return tfrecord.encode_example(
        image=ex['image/encoded'], image_format='png', filename='bad_label.png', height=64,
        width=64, label=tfrecord.encode_png(label.astype(np.uint8)))

  _rewrite_record(shard, 0, bad_label)
  source, _ = data_source.open_split(data_dir, 'train')
  with pytest.raises(ValueError) as e:
    source[0]
  print(_expected_error_line(e.value))
  assert 'bad_label.png' in str(e.value) and 'label values [200]' in str(e.value)
  assert "outside the split's range [0, 26)" in str(e.value)


def test_checkpoint_from_another_process_count(tmp_path, smoke_resources):
  data_dir = os.path.join(smoke_resources, 'data')
  config = shapesworld.get_config('smoke')
  it = input_pipeline.make_train_iterator(config, data_dir)
  state = {'step': jnp.zeros((), jnp.int32)}
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=1, every=1)
  ckpt.save(1, state, it)
  data = os.path.join(ckpt.directory, '1', 'data')
  for name in os.listdir(data):  # as if written by a 2-process job
    if name.startswith('process_'):
      os.rename(os.path.join(data, name), os.path.join(data, 'process_0-of-2.json'))
  with pytest.raises(checkpoints.CheckpointMismatchError) as e:
    ckpt.restore(1, jax.eval_shape(lambda: state), it)
  ckpt.close()
  print(_expected_error_line(e.value))
  assert 'data-iterator state for 2 process(es), this job has 1' in str(e.value)


# ----------------------------------------------------------------------------- predict


def test_undecodable_image_file(tmp_path):
  path = tmp_path / 'photo.jpg'
  path.write_bytes(b'GIF89a but not really')
  with pytest.raises(ValueError) as e:
    predict.load_image(str(path))
  print(_expected_error_line(e.value))
  assert f'cannot decode image {path}' in str(e.value)


@pytest.mark.parametrize('content,classes,message', [
    ('cat\ndog\ncat\n', None, "duplicate class name 'cat' at {f}:3 (first at {f}:1)"),
    ('cat\n   \ndog\n', None, 'empty class name at {f}:2'),
    (None, 'cat,,dog', 'empty class name at --classes item 2'),
    (None, 'cat, dog,cat', "duplicate class name 'cat' at --classes item 3"),
])
def test_bad_class_lists(tmp_path, content, classes, message):
  class_file = None
  if content is not None:
    class_file = str(tmp_path / 'classes.txt')
    with open(class_file, 'w') as f:
      f.write(content)
  with pytest.raises(ValueError) as e:
    predict.parse_classes(classes, class_file)
  print(_expected_error_line(e.value))
  assert message.format(f=class_file) in str(e.value)


def test_missing_class_file(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    predict.parse_classes(None, str(tmp_path / 'nope.txt'))
  print(_expected_error_line(e.value))
  assert 'class file' in str(e.value) and 'does not exist' in str(e.value)
