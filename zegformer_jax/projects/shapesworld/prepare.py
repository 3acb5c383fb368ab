"""ShapesWorld's `prepare`: the world, its miniature CLIP and its pretrained backbone as paths.

The library reads only ordinary paths: config.dataset.data_dir, config.clip.model_path and
config.train.init_from. For ShapesWorld those are made here, under the workdir, on first use
and reused afterwards (each directory records the settings it was made with and refuses
others):

  <workdir>/data      the generated world (world.generate)
  <workdir>/clip      the miniature CLIP, pretrained contrastively on all classes
                      (clip_pretrain), when config.clip.model_path is empty
  <workdir>/backbone  the ResNet pretrained per pixel on seen-class scenes (backbone_pretrain),
                      for a fresh training run with shapesworld.backbone_pretrain.steps > 0
                      and no config.train.init_from

A field the user set is kept as it is (the tests share one world and one CLIP that way).
ZegCLIP's image encoder is the world's CLIP itself: config.model.zegclip.vision is set to
the architecture of the CLIP at config.clip.model_path (the miniature one's size follows
its pretraining settings).
main calls `prepare` through config.project before training, evaluation or prediction.
"""
import logging
import multiprocessing
import os
import signal
import sys

import jax

from zegformer_jax.projects.shapesworld import backbone_pretrain
from zegformer_jax.projects.shapesworld import clip_pretrain
from zegformer_jax.projects.shapesworld import world
from zegformer_jax.training import checkpoints

# Where ShapesWorld's generated and pretrained artefacts live inside a workdir.
DATA_SUBDIR = 'data'
MINI_CLIP_SUBDIR = 'clip'
BACKBONE_SUBDIR = 'backbone'


def prepare(config, workdir: str, *, for_training: bool = True):
  """A copy of `config` whose data, CLIP and init paths are filled in (made when missing).

  The backbone is pretrained only `for_training`, and only for a run that starts afresh: a
  run that resumes from a checkpoint never reads it.
  """
  config = config.copy_and_resolve_references()
  make_clip = not config.clip.model_path
  make_backbone = (for_training and not config.train.init_from
                   and config.shapesworld.backbone_pretrain.steps > 0
                   and not checkpoints.has_checkpoint(workdir))
  data = config.dataset.data_dir or world_dir(config, workdir)
  if make_clip and make_backbone:
    pretrain_concurrently(config, workdir)   # CLIP beside the backbone; nothing if done
  with config.unlocked():
    config.dataset.data_dir = data
    if make_clip:
      config.clip.model_path = mini_clip_dir(config, workdir)
    if make_backbone:
      config.train.init_from = backbone_dir(config, workdir)
    if config.model.get('name') == 'zegclip':
      _zegclip_vision_from_clip(config)
  return config


def _zegclip_vision_from_clip(config) -> None:
  """config.model.zegclip.vision <- the vision_config of the CLIP at clip.model_path."""
  from transformers import CLIPConfig
  from zegformer_jax.modeling import zegclip
  loaded = CLIPConfig.from_pretrained(config.clip.model_path)
  for key in zegclip.VISION_KEYS:
    config.model.zegclip.vision[key] = getattr(loaded.vision_config, key)
  config.model.embed_dim = loaded.projection_dim


def world_settings(config) -> dict:
  """world.generate's keyword settings for `config`."""
  w = config.shapesworld
  return dict(seed=w.seed, split=w.split, num_train=w.num_train, num_val=w.num_val,
              image_size=w.image_size, unseen_in_train=w.unseen_in_train)


def world_dir(config, workdir: str) -> str:
  """<workdir>/data, generated on first use (deterministic: every process may run it)."""
  path = os.path.join(workdir, DATA_SUBDIR)
  # Only process 0 writes; the others wait on the barrier (sync_global_devices) below.
  if jax.process_index() == 0:
    world.generate(path, **world_settings(config))
  _barrier('shapesworld data')
  return path


def mini_clip_dir(config, workdir: str) -> str:
  """<workdir>/clip: the miniature CLIP, pretrained once (clip_pretrain.ensure_mini_clip)."""
  path = os.path.join(workdir, MINI_CLIP_SUBDIR)
  if jax.process_index() == 0:
    if not clip_pretrain.is_complete(path):
      logging.info('pretraining the miniature CLIP in %s (%d steps)', path,
                   config.shapesworld.clip_pretrain.steps)
    clip_pretrain.ensure_mini_clip(path, **mini_clip_settings(config))
  _barrier('miniature clip')
  return path


def mini_clip_settings(config) -> dict:
  """clip_pretrain.ensure_mini_clip's keyword settings for `config`.

  One place for mini_clip_dir and pretrain_concurrently: a CLIP pretrained in the child
  process must be the one mini_clip_dir would make, or it would refuse it afterwards.
  """
  c = config.shapesworld.clip_pretrain
  return dict(world_split=config.shapesworld.split, seed=config.seed,
              steps=c.steps, batch_size=c.batch_size, lr=c.lr, image_size=c.image_size,
              pool_per_class=c.pool_per_class, eval_per_class=c.eval_per_class)


def backbone_dir(config, workdir: str) -> str:
  """<workdir>/backbone: the pretrained backbone as a weights store (made on first use)."""
  path = os.path.join(workdir, BACKBONE_SUBDIR)
  if jax.process_index() == 0:
    backbone_pretrain.ensure_backbone(path, backbone_pretrain.settings_from_config(config))
  _barrier('pretrained backbone')
  return path


def pretrain_concurrently(config, workdir: str) -> bool:
  """Pretrains ShapesWorld's miniature CLIP in a child process beside the backbone in this one.

  Both are made on first use, and mini_clip_dir / backbone_dir would make them one after
  the other. Neither keeps both cores busy all the time (op-by-op init, compilation), so side
  by side they finish sooner (BENCHMARKS.md, eighth pass). Each process computes exactly what
  it would alone: the weights are bit-identical to sequential ones. Afterwards mini_clip_dir
  and backbone_dir find both finished and reuse them (and still hold their barriers, so the
  other processes of a multi-process job wait as before).

  Runs only on process 0, on the CPU backend, for ShapesWorld, when no CLIP path is given, the
  backbone pretraining is wanted (no config.train.init_from, shapesworld.backbone_pretrain.steps
  > 0), and
  `<workdir>/clip`, `<workdir>/backbone` and `<workdir>/checkpoints` are all absent or empty.
  Otherwise it does nothing and mini_clip_dir / backbone_dir do (or reuse) whatever is
  needed, as without it:
  - with one pretraining to do there is nothing to overlap;
  - a run that resumes from a checkpoint never reads the backbone (init_from is only for a
    fresh start), so it must not be made here;
  - a directory holding something else is an error that mini_clip_dir / backbone_dir
    report at once with their own message; found in the child it would surface only after the backbone;
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
  if (jax.process_index() != 0 or jax.default_backend() != 'cpu' or config.clip.model_path
      or config.train.init_from or config.shapesworld.backbone_pretrain.steps <= 0):
    return False
  clip_path = os.path.join(workdir, MINI_CLIP_SUBDIR)
  backbone_path = os.path.join(workdir, BACKBONE_SUBDIR)
  if not all(_absent_or_empty(p) for p in
             (clip_path, backbone_path, os.path.join(workdir, checkpoints.SUBDIR))):
    return False
  clip_settings = mini_clip_settings(config)
  # Invalid settings are reported now, as mini_clip_dir would, not by the child after the backbone.
  clip_pretrain._settings(**clip_settings)  # pylint: disable=protected-access
  backbone_settings = backbone_pretrain.settings_from_config(config)

  logging.info('pretraining the miniature CLIP in %s (%d steps) in a child process, beside '
               'the backbone', clip_path, config.shapesworld.clip_pretrain.steps)
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
  clip_pretrain.ensure_mini_clip(path, **settings)


def _exit_on_sigterm(signum, frame):
  del frame
  raise SystemExit(128 + signum)


def _barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
