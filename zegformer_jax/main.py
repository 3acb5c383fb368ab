r"""Entry point: python -m zegformer_jax.main --config configs/<name>.py[:arg] --workdir DIR.

Modes:
  train           train (resuming from the latest checkpoint in --workdir)
  eval            evaluate the latest checkpoint; writes metrics_<variant>.json
  train_and_eval  both
  predict         segment --images with any --classes / --class_file
  summary         parameter table and `total params: N` (jax.eval_shape, nothing compiled)

Config overrides follow big_vision: --config.optim.lr=3e-4 --config.eval.variant=full.
A key that does not exist is an error naming the key.

Errors the user can fix (a missing file or directory, corrupt data, a checkpoint from
another config, an invalid value, a non-finite loss) are printed as one line
`error: <message>` on stderr with exit status 1; --debug (or ZEGFORMER_DEBUG=1) shows the
traceback instead. A SIGTERM during training saves a checkpoint and exits with status 0.

Multi-process jobs (launch/*.sh) run this same command in every process;
distributed.maybe_initialize() joins them, and only process 0 logs at INFO level and
writes config.json, metrics and summaries.
"""
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

config_flags.DEFINE_config_file('config', None, 'Experiment config (file.py or file.py:arg).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
flags.DEFINE_enum('mode', 'train_and_eval',
                  ['train', 'eval', 'train_and_eval', 'predict', 'summary'], 'What to run.')
flags.DEFINE_list('variants', None,
                  'Evaluation variants (seg,img,full); default: config.eval.variant.')
flags.DEFINE_string('images', None, 'predict: comma-separated image files or a folder.')
flags.DEFINE_string('classes', None, 'predict: comma-separated class names.')
flags.DEFINE_string('class_file', None, 'predict: text file with one class name per line.')
flags.DEFINE_string('output_dir', None, 'predict: where to write outputs (default workdir/predict).')
flags.DEFINE_bool('debug', False, 'Show the traceback of errors (also ZEGFORMER_DEBUG=1).')
FLAGS = flags.FLAGS

# Errors with a message meant for the user: FileNotFoundError (missing data, CLIP, checkpoint,
# images), ValueError and its subclasses (tfrecord.TFRecordError, corrupt images, label
# values, checkpoints.CheckpointMismatchError, invalid config values), FloatingPointError
# (train.NonFiniteError). Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, FloatingPointError)


def main(argv):
  try:
    _main(argv)
  except EXPECTED_ERRORS as e:
    if FLAGS.debug or os.environ.get('ZEGFORMER_DEBUG', '') not in ('', '0'):
      raise
    sys.exit(error_line(e))


def error_line(e: BaseException) -> str:
  """`error: <message>` on one line (plus the process, on multi-process jobs)."""
  message = ' '.join(str(e).split()) or type(e).__name__
  import jax
  if jax.process_count() > 1:
    message += f' (process {jax.process_index()} of {jax.process_count()})'
  return f'error: {message}'


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required')
  # Imported after flag parsing so `--help` and config errors are fast.
  import jax
  from zegformer_jax import distributed
  distributed.maybe_initialize()
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # one log per job: process 0's

  if FLAGS.mode == 'summary':
    from zegformer_jax import summary
    size = config.input.crop_size
    table, total, total_without = summary.parameter_summary(config.model, image_hw=(size, size))
    print(table)
    return

  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required for this mode')
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info('devices: %d (%d local), processes: %d', jax.device_count(),
               jax.local_device_count(), jax.process_count())

  if FLAGS.mode in ('train', 'train_and_eval'):
    from zegformer_jax import train
    if train.train(config, workdir)['preempted']:
      return  # checkpoint saved; exit 0 so the scheduler can requeue the same command
  if FLAGS.mode in ('eval', 'train_and_eval'):
    from zegformer_jax import evaluate
    evaluate.evaluate_variants(config, workdir, FLAGS.variants or [config.eval.variant])
  if FLAGS.mode == 'predict':
    from zegformer_jax import predict
    predict.run(config, workdir, images=FLAGS.images, classes=FLAGS.classes,
                class_file=FLAGS.class_file, output_dir=FLAGS.output_dir)


def run():
  std_logging.getLogger('absl').setLevel(std_logging.INFO)
  app.run(main, flags_parser=_parse_flags)


def _parse_flags(argv):
  """absl flag parsing with config errors shown as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:
    # ml_collections raises AttributeError("'<key>'\nDid you mean ...") for a locked config.
    text = str(e).encode().decode('unicode_escape')
    key = re.search(r"'([^'\\]+)'", text)
    key = key.group(1) if key else '?'
    culprit = [a for a in argv if a.startswith('--config.') and
               a.split('=')[0].split('.')[-1] == key]
    where = f' (from {culprit[0]})' if culprit else ''
    hint = re.search(r'Did you mean[^?]*\?', text)
    sys.exit(f'error: unknown config key {key!r}{where}.' + (f' {hint.group(0)}' if hint else ''))


if __name__ == '__main__':
  run()
