"""Where a run's data and CLIP weights come from.

Real datasets are read from `config.dataset.data_dir` (written by data_prep/<name>.py) and
CLIP from `config.clip.model_path` (a local Hugging Face directory). The embedded
ShapesWorld is generated on first use under `<workdir>/data`, and, when no CLIP path is
given, a miniature CLIP is pretrained under `<workdir>/clip` (zegformer_jax/clip_pretrain.py),
so `make demo` needs nothing from outside.

ShapesWorld's two pretrainings (the miniature CLIP, and the backbone when
config.backbone_pretrain.steps > 0) are independent; `pretrain_concurrently` runs them side by
side on first use, as they would otherwise run one after the other.
"""
import logging
import multiprocessing
import os
import signal
import sys

import jax

# Where ShapesWorld's pretrained artefacts live inside a workdir.
MINI_CLIP_SUBDIR = 'clip'
BACKBONE_SUBDIR = 'backbone'


def data_dir(config, workdir: str) -> str:
  """The dataset directory of this run; generates ShapesWorld when it is the dataset."""
  if config.dataset.name == 'shapesworld':
    path = config.dataset.data_dir or os.path.join(workdir, 'data')
    # Generation is deterministic, so every process may run it; only process 0 writes, the
    # others wait on the barrier (sync_global_devices) below.
    if jax.process_index() == 0:
      from data_prep import shapesworld
      shapesworld.generate(
          path, seed=config.dataset.world_seed, split=config.dataset.world_split,
          num_train=config.dataset.num_train, num_val=config.dataset.num_val,
          image_size=config.dataset.image_size,
          unseen_in_train=config.dataset.unseen_in_train)
    _barrier('shapesworld data')
    return path
  path = config.dataset.data_dir
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(
        f'dataset directory {path!r} (config.dataset.data_dir) does not exist; convert the '
        f'raw dataset with `python -m data_prep.{config.dataset.name} --input_dir RAW '
        f'--output_dir {path or "DIR"}` or set --config.dataset.data_dir')
  return path


def clip_dir(config, workdir: str) -> str:
  """The local CLIP directory; for ShapesWorld without one, the pretrained miniature CLIP.

  The miniature CLIP is pretrained once into `<workdir>/clip` by
  clip_pretrain.ensure_mini_clip (config.dataset.world_split, config.seed and the
  config.clip.pretrain_* fields) and reused afterwards.
  """
  path = config.clip.model_path
  if path:
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f'CLIP directory {path!r} (config.clip.model_path) does not exist; it must be a '
          'local Hugging Face CLIP directory (config.json, flax_model.msgpack or '
          'model.safetensors, vocab.json, merges.txt)')
    return path
  if config.dataset.name != 'shapesworld':
    raise ValueError('config.clip.model_path is empty: set it to a local CLIP directory')
  path = os.path.join(workdir, MINI_CLIP_SUBDIR)
  if jax.process_index() == 0:
    from zegformer_jax import clip_pretrain
    if not clip_pretrain.is_complete(path):
      logging.info('pretraining the miniature CLIP in %s (%d steps)', path,
                   config.clip.pretrain_steps)
    clip_pretrain.ensure_mini_clip(path, **_mini_clip_settings(config))
  _barrier('miniature clip')
  return path


def _mini_clip_settings(config) -> dict:
  """clip_pretrain.ensure_mini_clip's keyword settings for `config`.

  One place for clip_dir and pretrain_concurrently: a CLIP pretrained in the child process
  must be the one clip_dir would make, or clip_dir would refuse it afterwards (other settings).
  """
  c = config.clip
  return dict(world_split=config.dataset.world_split, seed=config.seed,
              steps=c.pretrain_steps, batch_size=c.pretrain_batch, lr=c.pretrain_lr,
              image_size=c.pretrain_image_size, pool_per_class=c.pretrain_pool_per_class,
              eval_per_class=c.pretrain_eval_per_class)


def init_from(config, workdir: str) -> str:
  """The weights training starts from: config.train.init_from, else for ShapesWorld with
  config.backbone_pretrain.steps > 0 the pretrained backbone in `<workdir>/backbone`
  (backbone_pretrain.ensure_backbone; made on first use), else '' (random init)."""
  if config.train.init_from:
    return config.train.init_from
  if config.dataset.name != 'shapesworld' or config.backbone_pretrain.steps <= 0:
    return ''
  path = os.path.join(workdir, BACKBONE_SUBDIR)
  if jax.process_index() == 0:
    from zegformer_jax import backbone_pretrain
    backbone_pretrain.ensure_backbone(path, backbone_pretrain.settings_from_config(config))
  _barrier('pretrained backbone')
  return path


def pretrain_concurrently(config, workdir: str) -> bool:
  """Pretrains ShapesWorld's miniature CLIP in a child process beside the backbone in this one.

  Both are made on first use, and clip_dir / init_from would make them one after the other
  (about 60 s and 200 s on 2 CPU cores, 271 s in all). Neither keeps both cores busy all the
  time (op-by-op init, compilation), so side by side they take about 253 s. Each process
  computes exactly what it would alone: the weights are bit-identical to sequential ones.
  Afterwards clip_dir and init_from find both finished and reuse them (and still hold their
  barriers, so the other processes of a multi-process job wait as before).

  Runs only on process 0, on the CPU backend, for ShapesWorld, when no CLIP path is given, the
  backbone pretraining is wanted (no config.train.init_from, backbone_pretrain.steps > 0), and
  `<workdir>/clip`, `<workdir>/backbone` and `<workdir>/checkpoints` are all absent or empty.
  Otherwise it does nothing and clip_dir / init_from do (or reuse) whatever is needed, as
  without it:
  - with one pretraining to do there is nothing to overlap;
  - a run that resumes from a checkpoint never reads the backbone (init_from is only for a
    fresh start), so it must not be made here;
  - a directory holding something else is an error that clip_dir / init_from report at once
    with their own message; found in the child it would surface only after the backbone;
  - on an accelerator two processes would compete for its memory (a TPU admits only one).

  The child is spawned, not forked: this process runs JAX, and a forked child would inherit
  its threads' locks in whatever state they were. So, as for data_prep.shapesworld
  .parallel_map (which both pretrainings use), the main module must have the usual
  `if __name__ == '__main__':` guard. The child is not daemonic: daemonic processes may not
  start processes of their own, and parallel_map's workers are such processes.

  Returns whether it pretrained (False: it did nothing). Raises what the backbone pretraining
  raises (the child is stopped first), ValueError for invalid CLIP settings (before anything
  starts), and RuntimeError when the child fails (its traceback is on stderr above).
  """
  if (config.dataset.name != 'shapesworld' or jax.process_index() != 0
      or jax.default_backend() != 'cpu' or config.clip.model_path
      or config.train.init_from or config.backbone_pretrain.steps <= 0):
    return False
  from zegformer_jax import checkpoints
  clip_path = os.path.join(workdir, MINI_CLIP_SUBDIR)
  backbone_path = os.path.join(workdir, BACKBONE_SUBDIR)
  if not all(_absent_or_empty(p) for p in
             (clip_path, backbone_path, os.path.join(workdir, checkpoints.SUBDIR))):
    return False
  from zegformer_jax import backbone_pretrain
  from zegformer_jax import clip_pretrain
  clip_settings = _mini_clip_settings(config)
  # Invalid settings are reported now, as clip_dir would, not by the child after the backbone.
  clip_pretrain._settings(**clip_settings)  # pylint: disable=protected-access
  backbone_settings = backbone_pretrain.settings_from_config(config)

  logging.info('pretraining the miniature CLIP in %s (%d steps) in a child process, beside '
               'the backbone', clip_path, config.clip.pretrain_steps)
  process = _start_mini_clip_process(clip_path, clip_settings)
  try:
    backbone_pretrain.ensure_backbone(backbone_path, backbone_settings)
    _join_mini_clip_process(process, clip_path)
  except BaseException:
    # Also on KeyboardInterrupt: the child must not outlive this process's run.
    _stop(process)
    raise
  return True


def _absent_or_empty(path: str) -> bool:
  return not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path))


def _start_mini_clip_process(path: str, settings: dict) -> multiprocessing.Process:
  """Starts _pretrain_mini_clip_in_child(path, settings) in a spawned, non-daemonic process."""
  context = multiprocessing.get_context('spawn')
  process = context.Process(target=_pretrain_mini_clip_in_child, args=(path, settings),
                            name='mini-clip-pretraining', daemon=False)
  process.start()
  return process


def _join_mini_clip_process(process: multiprocessing.Process, path: str) -> None:
  """Waits for the child; RuntimeError naming `path` and the exit status when it failed."""
  process.join()
  code = process.exitcode
  if code != 0:
    how = (f'killed by {signal.Signals(-code).name}' if code < 0 else f'exit code {code}')
    raise RuntimeError(
        f'pretraining the miniature CLIP in {path} failed in its child process ({how}; its '
        'traceback, if any, is above); the backbone is pretrained, so the next run pretrains '
        'the CLIP in the training process itself')


def _stop(process: multiprocessing.Process, timeout_s: float = 60.0) -> None:
  """Terminates the child; kills it when its clean-up takes longer than `timeout_s`."""
  if process.is_alive():
    process.terminate()
    process.join(timeout_s)
    if process.is_alive():
      process.kill()
  process.join()


def _pretrain_mini_clip_in_child(path: str, settings: dict) -> None:
  """The child of pretrain_concurrently: clip_pretrain.ensure_mini_clip(path, **settings).

  A spawned interpreter starts without logging handlers, so the pretraining's progress lines
  (INFO) would be lost; they go to stderr, as the parent's do. JAX stays on the CPU, where the
  parent runs (pretrain_concurrently runs only there): an explicit jax_platforms setting of
  the parent may live in its config rather than in the environment the child inherits.
  SIGTERM (the parent's Process.terminate) becomes SystemExit, so `finally` blocks still run:
  the half-built directory beside `path` is removed and parallel_map's workers are shut down
  rather than left orphaned.
  """
  logging.basicConfig(
      level=logging.INFO, stream=sys.stderr, datefmt='%m%d %H:%M:%S',
      format='%(levelname).1s%(asctime)s.%(msecs)03d %(process)d %(filename)s:%(lineno)d] '
             '%(message)s')
  signal.signal(signal.SIGTERM, _exit_on_sigterm)
  jax.config.update('jax_platforms', 'cpu')
  from zegformer_jax import clip_pretrain
  clip_pretrain.ensure_mini_clip(path, **settings)


def _exit_on_sigterm(signum, frame):
  del frame
  raise SystemExit(128 + signum)


def check_settings(path: str, what: str, have: dict, wanted: dict) -> None:
  """Raises ValueError naming every setting of `wanted` that the existing `have` differs in.

  For directories made once and reused (the miniature CLIP, the pretrained backbone): reusing
  one made with other settings would silently change the experiment.
  """
  if have != wanted:
    diff = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    raise ValueError(f'{path} holds {what} with other settings ((existing, requested) = '
                     f'{diff}); remove it or use another workdir')


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
