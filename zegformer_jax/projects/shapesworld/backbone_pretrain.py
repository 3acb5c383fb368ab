"""Pretraining of the ResNet backbone: ShapesWorld's stand-in for ImageNet.

Every official ZegFormer config starts its ResNet from ImageNet weights that were trained
with batch norm and are then frozen (FrozenBN). ShapesWorld has no ImageNet, and a backbone
trained from scratch inside the segmentation model learns colour long before shape (the
probe in BENCHMARKS.md). So, before ZegFormer trains, `make demo` gives the same ResNet
(config.model.backbone) a pretrained start, with one of two tasks
(config.shapesworld.backbone_pretrain.task):

- 'classify' (image level, as ImageNet): single-object pictures of the SEEN classes
  (world.render_class_crop: a thing on a grey or textured ground, or a
  stuff texture), rendered once into a class-balanced pool; global average pool of res5,
  one Dense classifier.
- 'dense' (pixel level): scenes holding only SEEN classes (render_scene), rendered once into
  a pool; a semantic-FPN-style head over res2..res5 (DenseClassifier) and per-pixel
  cross-entropy. Knowing a shape from a single centred object does not carry over to the
  scenes' occluding objects read at stride 4 (BENCHMARKS.md); this task teaches it there.
  The head is dropped afterwards, as the classifier is.
- Either way unseen classes never reach the backbone as labels; their colours and shapes
  do occur among the seen classes, as ImageNet's do for COCO. The ResNet runs with
  BatchNorm on batch statistics (norm 'BN'); softmax cross-entropy, AdamW with warm-up and
  cosine decay, random flips and shifts (labels moved with the pixels); one jitted step.
- folding: BN's scale/bias (params) and running mean/var (batch_stats) become the FrozenBN
  variables of the same names (`fold_batch_norm`), exactly as detectron2 turns an ImageNet
  BN checkpoint into FrozenBN. Held-out accuracy (per picture, or per pixel) is measured
  through the FOLDED network, so a wrong fold shows up in the statistics.
- output: a weights store (zegformer_jax.weights.store: meta file + params/, covers
  params/backbone and frozen/backbone) that `--config.train.init_from` loads like an
  ImageNet ResNet conversion; the head is not kept. Assembled beside the target and
  renamed into place, so a directory is complete or absent; `ensure_backbone` reuses a
  complete one made with the same settings (prepare.backbone_dir).
"""
from __future__ import annotations

import concurrent.futures
import functools
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from zegformer_jax.weights import store
from zegformer_jax.modeling.resnet import FROZEN, ResNet
from zegformer_jax.projects.shapesworld import world as sw

logger = logging.getLogger(__name__)

SOURCE_FORMAT = 'shapesworld-pretrain'
TASKS = ('classify', 'dense')
STATS_FILE = 'pretrain_stats.json'
COVERS = ('params/backbone', 'frozen/backbone')
_STREAM_TRAIN, _STREAM_EVAL = 11, 12   # example_rng seeds, apart from the CLIP's streams


class Classifier(nn.Module):
  """ResNet (BN on batch statistics, or FrozenBN after folding) -> mean res5 -> Dense."""
  backbone: Mapping[str, Any]
  num_classes: int
  norm: str = 'BN'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, 3] normalised images -> [B, num_classes] logits."""
    features = _resnet(self.backbone, self.norm)(x)
    return nn.Dense(self.num_classes, name='head')(features['res5'].mean(axis=(1, 2)))


class DenseClassifier(nn.Module):
  """ResNet -> a semantic-FPN-style head -> per-pixel class logits (task 'dense').

  Every level res2..res5 goes through a 1x1 conv to `head_dim`, is bilinearly resized to
  res2 (stride 4) and summed; ReLU, a 3x3 conv + ReLU, a 1x1 classifier, and a bilinear
  resize to the input. The head is discarded after pretraining: only the ResNet is kept,
  so what it learnt has to sit in the backbone's own features at every level.
  """
  backbone: Mapping[str, Any]
  num_classes: int
  norm: str = 'BN'
  head_dim: int = 64

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, 3] normalised images -> [B, H, W, num_classes] logits."""
    features = _resnet(self.backbone, self.norm)(x)
    b, h, w, _ = features['res2'].shape
    fused = 0.0
    for level in ('res2', 'res3', 'res4', 'res5'):
      y = nn.Conv(self.head_dim, (1, 1), name=f'lateral_{level}')(features[level])
      fused = fused + jax.image.resize(y, (b, h, w, self.head_dim), 'bilinear')
    y = nn.relu(nn.Conv(self.head_dim, (3, 3), name='head_conv')(nn.relu(fused)))
    y = nn.Conv(self.num_classes, (1, 1), name='head')(y)
    return jax.image.resize(y, (b,) + x.shape[1:3] + (self.num_classes,), 'bilinear')


def _resnet(b: Mapping[str, Any], norm: str) -> ResNet:
  return ResNet(block_counts=tuple(b['block_counts']), stem_width=b['stem_width'],
                bottleneck=b['bottleneck'], norm=norm, gn_groups=b['gn_groups'],
                name='backbone')


def _model(s: Mapping[str, Any], num_classes: int, norm: str) -> nn.Module:
  cls = DenseClassifier if s['task'] == 'dense' else Classifier
  return cls(backbone=s['backbone'], num_classes=num_classes, norm=norm)


def fold_batch_norm(params: Mapping, batch_stats: Mapping) -> Dict[Tuple[str, ...], np.ndarray]:
  """BN variables -> FrozenBN variables, as flat {('params'|'frozen', ...path): array}.

  Every `.../norm/{scale,bias}` of params and `.../norm/{mean,var}` of batch_stats goes to
  the 'frozen' collection under the same path; every other parameter stays in 'params'.
  FrozenBN(x) = (x - mean) / sqrt(var + eps) * scale + bias is then what BN computes in
  inference mode.
  """
  flat = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    collection = FROZEN if len(path) >= 2 and path[-2] == 'norm' else 'params'
    flat[(collection,) + path] = np.asarray(value, np.float32)
  for path, value in traverse_util.flatten_dict(dict(batch_stats)).items():
    flat[(FROZEN,) + path] = np.asarray(value, np.float32)
  return flat


def settings_from_config(config) -> Dict[str, Any]:
  """Everything that decides the pretrained backbone, as JSON values."""
  b, p = config.model.backbone, config.shapesworld.backbone_pretrain
  if p.task not in TASKS:
    raise ValueError(f'config.shapesworld.backbone_pretrain.task must be one of {TASKS}; '
                     f'got {p.task!r}')
  # Only the task's own pool sizes: changing the other task's does not redo a pretraining.
  pools = (dict(pool_scenes=int(p.pool_scenes), eval_scenes=int(p.eval_scenes))
           if p.task == 'dense' else
           dict(pool_per_class=int(p.pool_per_class), eval_per_class=int(p.eval_per_class)))
  return dict(world_split=config.shapesworld.split, seed=int(config.seed),
              task=str(p.task), steps=int(p.steps), batch_size=int(p.batch_size),
              lr=float(p.lr), image_size=int(p.image_size), **pools,
              pixel_mean=[float(v) for v in config.model.pixel_mean],
              pixel_std=[float(v) for v in config.model.pixel_std],
              backbone=dict(block_counts=[int(n) for n in b.block_counts],
                            stem_width=int(b.stem_width), bottleneck=bool(b.bottleneck),
                            gn_groups=int(b.gn_groups)))


def render_pool(class_names, per_class: int, *, seed: int, stream: int,
                size: int) -> Tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, size, size, 3], labels int32 [N]), per_class pictures per class."""
  images, labels = [], []
  for c, name in enumerate(class_names):
    for j in range(per_class):
      rng = np.random.default_rng([seed, stream, c, j])
      images.append(sw.render_class_crop(name, rng, size))
      labels.append(c)
  return np.stack(images), np.asarray(labels, np.int32)


def render_scene_pool(world_split: str, num: int, *, seed: int, stream: int,
                      size: int, workers: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, size, size, 3], labels int32 [N, size, size]) of `num` scenes.

  Scenes hold only the seen classes of `world_split` (data_prep.shapesworld.render_scene);
  labels are their train ids, mapped by the same table the dataset writer uses (label_lut).
  Scene j has its own generator (seed, stream, j), so `workers` (rendering processes,
  shapesworld.parallel_map) does not change the pool.
  """
  seen, _ = sw.class_names(world_split)
  lut = sw.label_lut(world_split, 'train').astype(np.int32)
  render = functools.partial(sw.render_keyed_scene, size=size, classes=tuple(seen))
  scenes = sw.parallel_map(render, [(seed, stream, j) for j in range(num)], workers)
  return (np.stack([image for image, _ in scenes]),
          np.stack([lut[label] for _, label in scenes]))


def _augment(key: jax.Array, x: jax.Array, y: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Random horizontal flip per image and one random shift (reflect-padded) per batch.

  x: [B, H, W, 3] images; y: labels, [B] (left as they are) or [B, H, W] (moved with x).
  """
  k_flip, k_shift = jax.random.split(key)
  dense = y.ndim == 3
  flip = jax.random.bernoulli(k_flip, 0.5, (x.shape[0],))
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)
  pad = x.shape[1] // 8
  dy, dx = jax.random.randint(k_shift, (2,), 0, 2 * pad + 1)

  def shift(a):
    widths = ((0, 0), (pad, pad), (pad, pad)) + ((0, 0),) * (a.ndim - 3)
    return jax.lax.dynamic_slice(jnp.pad(a, widths, mode='reflect'),
                                 (0, dy, dx) + (0,) * (a.ndim - 3), a.shape)

  x = shift(x)
  if dense:
    y = shift(jnp.where(flip[:, None, None], y[:, :, ::-1], y))
  return x, y


def _pool(s: Mapping[str, Any], seen, stream: int) -> Tuple[np.ndarray, np.ndarray]:
  """The task's pre-rendered pictures: single objects ('classify') or scenes ('dense')."""
  train = stream == _STREAM_TRAIN
  if s['task'] == 'dense':
    return render_scene_pool(s['world_split'], s['pool_scenes'] if train else s['eval_scenes'],
                             seed=s['seed'], stream=stream, size=s['image_size'])
  return render_pool(seen, s['pool_per_class'] if train else s['eval_per_class'],
                     seed=s['seed'], stream=stream, size=s['image_size'])


def pretrain_backbone(path: str, s: Mapping[str, Any], log_every: int = 250) -> Dict[str, Any]:
  """Pretrains the backbone with settings `s` (settings_from_config) into `path`."""
  start = time.time()
  path = os.path.abspath(os.fspath(path))
  seen, _ = sw.class_names(s['world_split'])
  mean = jnp.asarray(s['pixel_mean'], jnp.float32)
  std = jnp.asarray(s['pixel_std'], jnp.float32)
  # The pool renders (in worker processes) while this thread initialises the model: run op
  # by op, init compiles every initializer on its own (about 12 s, mostly one core). Init
  # stays eager: under jit XLA fuses the initializers and rounds a few weights differently.
  rendering = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='render_pool')
  pool = rendering.submit(_pool, s, seen, _STREAM_TRAIN)
  try:
    model = _model(s, len(seen), 'BN')
    variables = model.init(jax.random.key(s['seed']),
                           jnp.zeros((2, s['image_size'], s['image_size'], 3)))
    images, labels = pool.result()
  finally:
    rendering.shutdown(wait=True)
  images, labels = jnp.asarray(images), jnp.asarray(labels)
  render_s = time.time() - start   # rendering and init together
  params, batch_stats = variables['params'], variables['batch_stats']
  steps = s['steps']
  schedule = optax.warmup_cosine_decay_schedule(0.0, s['lr'], max(1, steps // 10), steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
  opt_state = tx.init(params)

  # The pool is an argument, not a closed-over constant: as a constant, XLA spends about
  # 7 s compiling 130 MB of literals into the step.
  @jax.jit
  def step(params, batch_stats, opt_state, key, images, labels):
    k_idx, k_aug = jax.random.split(key)
    idx = jax.random.randint(k_idx, (s['batch_size'],), 0, labels.shape[0])
    x, y = _augment(k_aug, (images[idx].astype(jnp.float32) - mean) / std, labels[idx])

    def loss_fn(p):
      logits, updates = model.apply({'params': p, 'batch_stats': batch_stats}, x,
                                    mutable=['batch_stats'])
      # Mean over pictures ('classify') or over every pixel ('dense').
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, (updates['batch_stats'], jnp.mean(logits.argmax(-1) == y))

    (loss, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss, acc

  key = jax.random.key(s['seed'] + 1)
  history = []
  t0 = time.time()
  for i in range(1, steps + 1):
    key, sub = jax.random.split(key)
    params, batch_stats, opt_state, loss, acc = step(params, batch_stats, opt_state, sub,
                                                     images, labels)
    if i % log_every == 0 or i == steps:
      history.append(dict(step=i, loss=float(loss), batch_accuracy=float(acc)))
      logger.info('backbone pretraining step %d/%d: loss %.4f', i, steps, float(loss))
  train_s = time.time() - t0

  # Held-out accuracy through the folded (FrozenBN) network: checks the fold as well.
  flat = fold_batch_norm(params, batch_stats)
  folded = traverse_util.unflatten_dict(flat)
  eval_images, eval_labels = _pool(s, seen, _STREAM_EVAL)
  frozen_model = _model(s, len(seen), 'FrozenBN')
  logits = jax.jit(frozen_model.apply)(
      {'params': folded['params'], FROZEN: folded[FROZEN]},
      (jnp.asarray(eval_images, jnp.float32) - mean) / std)
  pred = np.asarray(logits).argmax(-1)
  accuracy = float(np.mean(pred == eval_labels))
  # Accuracy per picture ('classify') or per pixel ('dense'), and on the things alone.
  things = np.asarray([n not in sw.STUFF for n in seen])[eval_labels]
  stats = dict(settings=dict(s), classes=seen, held_out_accuracy=accuracy,
               held_out_accuracy_things=float(np.mean((pred == eval_labels)[things])),
               history=history, seconds=dict(render_and_init=round(render_s, 2),
                                             train=round(train_s, 2),
                                             total=round(time.time() - start, 2)))

  backbone_only = {k: v for k, v in flat.items() if k[1] == 'backbone'}
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp-backbone-')
  try:
    store.save_params(os.path.join(tmp, store.PARAMS_DIR), backbone_only)
    meta = {'format': store.META_FORMAT, 'version': store.META_VERSION,
            'source_format': SOURCE_FORMAT, 'input': None, 'config': None,
            'covers': list(COVERS), 'absent': [], 'skipped': {}, 'ignored': [],
            'num_variables': len(backbone_only), 'clip': None,
            'notes': [f"ShapesWorld {s['task']} pretraining (zegformer_jax.backbone_pretrain)"]}
    with open(os.path.join(tmp, store.META_NAME), 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=1)
    # Written last: a directory holding this file is a finished pretraining.
    with open(os.path.join(tmp, STATS_FILE), 'w', encoding='utf-8') as f:
      json.dump(stats, f, indent=1)
    os.chmod(tmp, 0o755)
    if os.path.isdir(path):
      os.rmdir(path)   # only an empty directory may be replaced (checked by the caller)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return stats


def ensure_backbone(path: str, s: Mapping[str, Any]) -> Dict[str, Any]:
  """pretrain_backbone(path, s) unless `path` holds a finished one with the same settings."""
  file = os.path.join(os.fspath(path), STATS_FILE)
  if os.path.isfile(file):
    with open(file, encoding='utf-8') as f:
      stats = json.load(f)
    sw.check_settings(path, 'a backbone pretrained', stats.get('settings', {}),
                             json.loads(json.dumps(dict(s))))
    logger.info('reusing the pretrained backbone in %s', path)
    return stats
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f'{path} exists but holds no finished backbone pretraining '
                          f'({STATS_FILE} missing); remove it to pretrain there')
  return pretrain_backbone(path, s)
