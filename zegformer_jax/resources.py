"""Where a run's data and CLIP weights come from.

Real datasets are read from `config.dataset.data_dir` (written by data_prep/<name>.py) and
CLIP from `config.clip.model_path` (a local Hugging Face directory). The embedded
ShapesWorld is generated on first use under `<workdir>/data`, and, when no CLIP path is
given, a miniature CLIP is pretrained under `<workdir>/clip` (zegformer_jax/clip_pretrain.py),
so `make demo` needs nothing from outside.
"""
import logging
import os

import jax


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
  path = os.path.join(workdir, 'clip')
  if jax.process_index() == 0:
    from zegformer_jax import clip_pretrain
    c = config.clip
    if not clip_pretrain.is_complete(path):
      logging.info('pretraining the miniature CLIP in %s (%d steps)', path, c.pretrain_steps)
    clip_pretrain.ensure_mini_clip(
        path, world_split=config.dataset.world_split, seed=config.seed,
        steps=c.pretrain_steps, batch_size=c.pretrain_batch, lr=c.pretrain_lr,
        image_size=c.pretrain_image_size, pool_per_class=c.pretrain_pool_per_class,
        eval_per_class=c.pretrain_eval_per_class)
  _barrier('miniature clip')
  return path


def init_from(config, workdir: str) -> str:
  """The weights training starts from: config.train.init_from, else for ShapesWorld with
  config.backbone_pretrain.steps > 0 the pretrained backbone in `<workdir>/backbone`
  (backbone_pretrain.ensure_backbone; made on first use), else '' (random init)."""
  if config.train.init_from:
    return config.train.init_from
  if config.dataset.name != 'shapesworld' or config.backbone_pretrain.steps <= 0:
    return ''
  path = os.path.join(workdir, 'backbone')
  if jax.process_index() == 0:
    from zegformer_jax import backbone_pretrain
    backbone_pretrain.ensure_backbone(path, backbone_pretrain.settings_from_config(config))
  _barrier('pretrained backbone')
  return path


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
