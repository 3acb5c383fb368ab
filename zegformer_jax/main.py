r"""Entry point: python -m zegformer_jax.main --config configs/<name>.py[:arg] --workdir DIR.

Modes:
  train           train (resuming from the latest checkpoint in --workdir)
  eval            evaluate the latest checkpoint; writes metrics_<variant>.json
  train_and_eval  both
  predict         segment --images with any --classes / --class_file
  summary         parameter table and `total params: N` (jax.eval_shape, nothing compiled)
  mask_aware      fine-tune CLIP's image encoder for the one-pass image branch on the latest
                  checkpoint's proposals (MAFT; training/mask_aware.py), into
                  <workdir>/mask_aware/clip; evaluate it with --config.eval.image_branch=one_pass
                  --config.eval.one_pass_clip_path=<workdir>/mask_aware/clip

Config overrides follow big_vision: --config.optim.lr=3e-4 --config.eval.variant=full.
A key that does not exist is an error naming the key.

A config with `project` set (ShapesWorld) first has its project make what its paths point
at (the world, its CLIP, its pretrained backbone); training, evaluation and prediction then
read only those paths. Periodic evaluation during training is config.evals.

Errors the user can fix (a missing file or directory, corrupt data, a checkpoint from
another config, an invalid value, a non-finite loss) are printed as one line
`error: <message>` on stderr with exit status 1; --debug (or ZEGFORMER_DEBUG=1) shows the
traceback instead (zegformer_jax/cli.py). A SIGTERM during training saves a checkpoint and
exits with status 0.

Multi-process jobs (launch/*.sh) run this same command in every process;
distributed.maybe_initialize() joins them, and only process 0 logs at INFO level and
writes config.json, metrics and summaries.
"""
import importlib
import os

from absl import app
from absl import flags
from absl import logging

from zegformer_jax import cli

FLAGS = flags.FLAGS


def define_flags():
  """This program's flags (defined when it runs, so modules can be imported side by side)."""
  cli.define_config_flag()
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
  flags.DEFINE_enum('mode', 'train_and_eval',
                    ['train', 'eval', 'train_and_eval', 'predict', 'summary',
                     'mask_aware'], 'What to run.')
  flags.DEFINE_list('variants', None,
                    'Evaluation variants (seg,img,full); default: config.eval.variant.')
  flags.DEFINE_string('images', None, 'predict: comma-separated image files or a folder.')
  flags.DEFINE_string('classes', None, 'predict: comma-separated class names.')
  flags.DEFINE_string('class_file', None, 'predict: text file with one class name per line.')
  flags.DEFINE_string('output_dir', None,
                      'predict: where to write outputs (default workdir/predict).')


def prepare_project(config, workdir: str, *, for_training: bool):
  """`config` with the paths its project makes (config.project's prepare), else as it is."""
  if not config.project:
    return config
  module = importlib.import_module(config.project)
  return module.prepare(config, workdir, for_training=for_training)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = FLAGS.config
  if config is None:
    raise app.UsageError('--config is required')
  # Imported after flag parsing so `--help` and config errors are fast.
  import jax
  from zegformer_jax.training import distributed
  distributed.maybe_initialize()
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # one log per job: process 0's

  if FLAGS.mode == 'summary':
    from zegformer_jax.tools import summary
    size = config.input.crop_size
    table, _, _ = summary.parameter_summary(config.model, image_hw=(size, size))
    print(table)
    return

  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required for this mode')
  workdir = FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  training = FLAGS.mode in ('train', 'train_and_eval')
  if not training and not config.train.init_from:
    from zegformer_jax.training import checkpoints
    if not checkpoints.has_checkpoint(workdir):   # before a project prepares anything
      raise checkpoints.no_checkpoint_error(workdir)
  config = prepare_project(config, workdir, for_training=training)
  if training and jax.process_index() == 0:   # readers (eval, predict) leave the run's own
    # A changed config keeps the previous one as config.<n>.json (and a changed
    # train.total_steps on resume is one warning line): metric_writers.record_config.
    from zegformer_jax.training import checkpoints as ckpts
    from zegformer_jax.training import metric_writers
    metric_writers.record_config(workdir, config.to_json_best_effort(indent=2),
                                 resuming=ckpts.has_checkpoint(workdir))
  logging.info('devices: %d (%d local), processes: %d', jax.device_count(),
               jax.local_device_count(), jax.process_count())

  from zegformer_jax.evaluation import evaluator
  if training:
    from zegformer_jax.training import train
    evaluators = evaluator.evaluators_from_config(config, workdir)
    if train.train(config, workdir, evaluators)['preempted']:
      return  # checkpoint saved; exit 0 so the scheduler can requeue the same command
  if FLAGS.mode in ('eval', 'train_and_eval'):
    evaluator.evaluate_settings(config, workdir, FLAGS.variants or [config.eval.variant])
  if FLAGS.mode == 'mask_aware':
    from zegformer_jax.training import mask_aware
    summary = mask_aware.finetune(config, workdir)
    logging.info('mask-aware CLIP: %s', summary['output'])
  if FLAGS.mode == 'predict':
    from zegformer_jax.tools import predict
    predict.run(config, workdir, images=FLAGS.images, classes=FLAGS.classes,
                class_file=FLAGS.class_file, output_dir=FLAGS.output_dir)


def run():
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
