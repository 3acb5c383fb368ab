"""Contrastive pretraining of ShapesWorld's miniature CLIP.

Web-scale CLIP has seen every class ZegFormer is later asked about; the miniature CLIP
plays that part for ShapesWorld, so it is pretrained on image-level examples of ALL 32
classes (seen and unseen of every split) with captions from the prompt templates, then saved
in the Hugging Face layout that `modeling.clip.load_clip` reads, the code path of
openai/clip-vit-base-patch16. `prepare.mini_clip_dir` makes it from the config's
shapesworld.clip_pretrain settings.

Pipeline:
- `create_tiny_clip` writes the random model and its BPE tokenizer (vocabulary: every class
  word and every template word); the weights are then redrawn with CLIP's width-scaled
  initialisation (`clip_init`), without which the image tower starts nearly constant.
- Examples (uint8 RGB, `image_size` square) are rendered once into a class-balanced pool
  with numpy from a seeded generator, in four kinds that cover what the image branch of
  ZegFormer-img feeds CLIP (inference.subimages, config.eval.clip_style):
    'crop'           the class drawn large (render_class_crop's picture), unmasked;
    'cropmask'       the same picture, 'cropmask' sub-image with the class's own mask;
    'scene_cropmask' a ShapesWorld scene (render_scene), cropmask with the label mask of
                     one class in it: small, occluded things, stuff regions with holes;
    'scene_crop'     the same box on the unmasked scene ('crop' style).
  Training masks are randomly dilated or eroded, since predicted masks are not exact.
  A 'cropmask' sub-image is computed as inference.subimages computes it: pixels outside the
  mask are 0 in CLIP-normalised space (the CLIP mean colour), the tight mask box is resized
  by RoIAlign (aligned, adaptive sampling) to image_size.
- Each step draws a batch in which classes are as balanced as possible (concatenated random
  permutations of the 32 classes), a random caption per example from 'select_clip' U
  'imagenet_select' U 'single', and a horizontal flip with p = 0.5.
- Loss: CLIP's symmetric InfoNCE with a label-aware target. Two examples of the same class in
  a batch are not negatives of each other: row i's target is uniform over the columns of i's
  class (with one example per class this is CLIP's one-hot target). logit_scale is learnt
  and clipped at ln(100), as in CLIP. AdamW, linear warm-up then cosine decay, gradient
  norm clipping; one jitted step.
- Zero-shot accuracy on held-out renders (another rng stream): image -> class among all 32
  classes with the 'select_clip' prompt ensemble (modeling.clip.text_embeddings), per kind and
  for the seen / unseen classes of the split, written to `<path>/pretrain_stats.json`.

The directory is assembled next to `path` and renamed into place (complete or absent);
`ensure_mini_clip` reuses a complete one.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zegformer_jax.projects.shapesworld import world as sw
from zegformer_jax.modeling import clip

logger = logging.getLogger(__name__)

STATS_FILE = 'pretrain_stats.json'
# Bump when the pretraining recipe changes what a given set of settings produces.
PRETRAIN_VERSION = 1
CAPTION_SETS = ('select_clip', 'imagenet_select', 'single')
EVAL_PROMPTS = 'select_clip'     # the image branch's prompt set (config.clip.image_prompts)
KINDS = ('crop', 'cropmask', 'scene_cropmask', 'scene_crop')
EVAL_KINDS = ('crop', 'cropmask', 'scene_cropmask')
# Share of each kind in the training pool (same order as KINDS). Scene cropmasks are what
# the image branch sees at evaluation, so they get the largest share.
DEFAULT_MIX = (0.25, 0.25, 0.4, 0.1)
# rng streams, distinct from shapesworld's (train 1, val 2, crop 3): the pretraining does
# not redraw the pictures of the ZegFormer dataset, nor the held-out renders those of the
# pool.
_STREAM_TRAIN, _STREAM_EVAL, _STREAM_STEPS = 11, 12, 13
_MIN_SCENE_PIXELS = 12           # smaller scene instances are not used (at 64 px)

_MEAN = np.asarray(clip.CLIP_PIXEL_MEAN, np.float32)
_STD = np.asarray(clip.CLIP_PIXEL_STD, np.float32)


# ---------------------------------------------------------------------------- captions


def caption_templates() -> List[str]:
  """Union of the caption prompt sets, without repeats, in first-seen order."""
  out: List[str] = []
  for name in CAPTION_SETS:
    out.extend(t for t in clip.prompt_templates(name) if t not in out)
  return out


# ---------------------------------------------------------------------------- rendering


def render_class_example(class_name: str, rng: np.random.Generator,
                         size: int) -> Tuple[np.ndarray, np.ndarray]:
  """render_class_crop's picture plus the class's own mask.

  Returns (image uint8 [size, size, 3], mask bool [size, size]). The image is exactly what
  shapesworld.render_class_crop draws from the same generator state (same draws in the same
  order); the mask's extra randomness is drawn afterwards. A thing's mask is its shape; a
  stuff picture is all texture, so its mask is a random smooth blob covering 35-95% of it
  (a region of stuff, as segments of stuff are).
  """
  if class_name in sw.STUFF:
    image = sw.render_class_crop(class_name, rng, size)
    return image, _blob_mask(rng, size)
  if class_name not in sw.THINGS:
    raise ValueError(f'unknown ShapesWorld class {class_name!r}')
  # Mirrors render_class_crop draw for draw (test_clip_pretrain checks the pixels agree).
  colour, shape = class_name.split(' ')
  if rng.uniform() < 0.5:
    grey = rng.uniform(90, 170)
    canvas = np.full((size, size, 3), grey, np.float32) + \
        (6 * sw._smooth_noise(rng, size, size, size / 6))[..., None]
  else:
    canvas = sw.stuff_texture(sw.STUFF[int(rng.integers(len(sw.STUFF)))], rng, size, size)
  r = rng.uniform(0.28, 0.4) * size
  cx, cy = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
  mask = sw.shape_mask(shape, size, size, cx, cy, r, rng.uniform(-0.45, 0.45))
  sw._paint_thing(canvas, mask, colour, rng)
  return np.clip(canvas + 0.5, 0, 255).astype(np.uint8), mask


def _blob_mask(rng: np.random.Generator, size: int) -> np.ndarray:
  """bool [size, size]: a smooth random region covering 35-95% of the square."""
  noise = sw._smooth_noise(rng, size, size, size / 3)
  coverage = rng.uniform(0.35, 0.95)
  return noise <= np.quantile(noise, coverage)


def perturb_mask(mask: np.ndarray, rng: np.random.Generator, max_step: int = 1) -> np.ndarray:
  """Dilates or erodes `mask` by 0..max_step 4-neighbour steps (never to empty).

  Predicted masks are upsampled stride-4 logits: their borders are off by a pixel or two.
  """
  steps = int(rng.integers(-max_step, max_step + 1))
  out = mask
  for _ in range(abs(steps)):
    p = np.pad(out, 1, constant_values=steps < 0)  # erosion treats the outside as set
    nb = [p[1:-1, 1:-1], p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]
    nxt = np.logical_or.reduce(nb) if steps > 0 else np.logical_and.reduce(nb)
    if not nxt.any():
      break
    out = nxt
  return out


# ---------------------------------------------------------------------------- sub-images


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 RGB [..., 3] -> float32 CLIP-normalised (configs.common CLIP_PIXEL_MEAN / STD)."""
  return (image.astype(np.float32) - _MEAN) / _STD


def mask_box(mask: np.ndarray) -> Tuple[float, float, float, float]:
  """(x1, y1, x2, y2) as inference.mask_boxes: first/last row and column (inclusive); the
  whole image (0, 0, W, H) when the mask is empty or a single row or column."""
  h, w = mask.shape
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  if rows.size == 0 or (cols[-1] - cols[0]) * (rows[-1] - rows[0]) == 0:
    return 0.0, 0.0, float(w), float(h)
  return float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])


def _roi_weights(lo: float, hi: float, size: int, out: int) -> np.ndarray:
  """[out, size] weights of one axis of RoIAlign (aligned=True, adaptive sampling).

  Bin p of the box covers [lo - 0.5 + p * b, lo - 0.5 + (p + 1) * b), b = (hi - lo) / out;
  it averages n = ceil(b) bilinear samples at the centres of n equal sub-bins. A sample
  outside [-1, size] contributes 0; otherwise it is clamped into the image and split
  between its two neighbouring pixels (a triangle of width 1 around it).
  """
  bin_size = (hi - lo) / out
  n = max(int(math.ceil(bin_size)), 1)
  p = np.arange(out, dtype=np.float64)[:, None]
  t = np.arange(n, dtype=np.float64)[None, :]
  y = (lo - 0.5) + p * bin_size + (t + 0.5) * bin_size / n              # [out, n]
  inside = (y >= -1.0) & (y <= size)
  y = np.clip(y, 0.0, size - 1.0)
  tent = np.maximum(0.0, 1.0 - np.abs(y[..., None] - np.arange(size)))  # [out, n, size]
  return (tent * inside[..., None]).sum(1) / n


def _apply_roi(wy, images, keep, wx, as_uint8: bool):
  # wy [N, P, H], images uint8 [N, H, W, 3], keep bool [N, H, W], wx [N, Q, W]
  # -> [N, P, Q, 3] CLIP-normalised float32, or as uint8 RGB (the pool's storage).
  mean, std = jnp.asarray(_MEAN), jnp.asarray(_STD)
  src = (images.astype(jnp.float32) - mean) / std * keep[..., None]
  rows = jnp.einsum('nph,nhwc->npwc', wy, src, precision=jax.lax.Precision.HIGHEST)
  out = jnp.einsum('npwc,nqw->npqc', rows, wx, precision=jax.lax.Precision.HIGHEST)
  if as_uint8:
    return jnp.clip(jnp.round(out * std + mean), 0, 255).astype(jnp.uint8)
  return out


_apply_roi_jit = jax.jit(_apply_roi, static_argnums=4)


def subimages(images: np.ndarray, masks: np.ndarray, out_size: int, cropmask,
              as_uint8: bool = False, chunk: int = 256) -> np.ndarray:
  """Sub-images as inference.subimages makes them, [N, out_size, out_size, 3].

  images: uint8 RGB [N, H, W, 3]; masks: bool [N, H, W]; cropmask: bool, scalar or [N]:
  True zeroes the pixels outside the mask in CLIP-normalised space (the 'cropmask' style),
  False keeps them ('crop'). Both resize the tight mask box (mask_box) by RoIAlign.
  Returns CLIP-normalised float32, or with as_uint8 the same denormalised to uint8 RGB (a
  masked-out pixel becomes the CLIP mean colour). The resampling runs as batched matmuls in
  XLA, `chunk` images at a time (padded: one compilation serves all chunks); thousands of
  tiny numpy matmuls would each pay OpenBLAS's thread wake-up, which on busy cores costs
  more than the product.
  """
  n, h, w = masks.shape
  cropmask = np.broadcast_to(np.asarray(cropmask, bool), (n,))
  out = np.empty((n, out_size, out_size, 3), np.uint8 if as_uint8 else np.float32)
  if n == 0:
    return out
  chunk = max(1, min(int(chunk), n))
  for start in range(0, n, chunk):
    take = np.arange(start, start + chunk).clip(max=n - 1)
    boxes = [mask_box(m) for m in masks[take]]
    wy = np.stack([_roi_weights(b[1], b[3], h, out_size) for b in boxes]).astype(np.float32)
    wx = np.stack([_roi_weights(b[0], b[2], w, out_size) for b in boxes]).astype(np.float32)
    keep = masks[take] | ~cropmask[take, None, None]
    stop = min(start + chunk, n)
    out[start:stop] = np.asarray(
        _apply_roi_jit(wy, images[take], keep, wx, bool(as_uint8)))[:stop - start]
  return out


# ---------------------------------------------------------------------------- pool


def _kind_counts(per_class: int, mix: Sequence[float]) -> List[int]:
  """Examples of each kind per class: per_class split by `mix`, largest remainders first."""
  mix = np.asarray(mix, np.float64)
  if mix.shape != (len(KINDS),) or (mix < 0).any() or mix.sum() <= 0:
    raise ValueError(f'mix must be {len(KINDS)} non-negative shares, got {mix}')
  raw = per_class * mix / mix.sum()
  counts = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - counts), kind='stable')[:per_class - counts.sum()]:
    counts[i] += 1
  return counts.tolist()


def render_pool(class_names: Sequence[str], per_class: int, *, seed: int, stream: int,
                image_size: int, scene_size: int = 64, mix: Sequence[float] = DEFAULT_MIX,
                perturb: bool = True) -> Dict[str, np.ndarray]:
  """A class-balanced set of examples, ready for CLIP but stored as uint8.

  Returns dict(images uint8 [N, S, S, 3] (S = image_size; CLIP-normalised values
  denormalised to RGB, so a masked-out pixel is the CLIP mean colour), labels int32 [N]
  (index into class_names), kinds int32 [N] (index into KINDS)). N = len(class_names) *
  per_class, grouped by class then kind; `mix` sets the kinds' shares. Deterministic from
  (seed, stream); scene instances come from scenes of side `scene_size`. `perturb`
  dilates / erodes the masks (perturb_mask) before the sub-images are cut.
  """
  names = list(class_names)
  counts = dict(zip(KINDS, _kind_counts(per_class, mix)))
  rng = np.random.default_rng([int(seed), int(stream)])
  # Scene instances (image index, class) for both scene kinds; class i takes the first
  # `need` scenes in which it covers at least _MIN_SCENE_PIXELS pixels.
  need = counts['scene_cropmask'] + counts['scene_crop']
  scenes, labels = [], []
  found: Dict[int, List[int]] = {i: [] for i in range(len(names))}
  canon = np.asarray([sw.CANONICAL_CLASSES.index(n) for n in names])
  while need and min(len(v) for v in found.values()) < need:
    if len(scenes) > 100 * need * len(names):   # a bound far above the expected count
      raise RuntimeError('render_pool: too few scene instances')
    image, label = sw.render_scene(rng, scene_size)
    area = np.bincount(label.ravel(), minlength=len(sw.CANONICAL_CLASSES))[canon]
    for i in np.flatnonzero(area >= _MIN_SCENE_PIXELS):
      if len(found[i]) < need:
        found[i].append(len(scenes))
    scenes.append(image)
    labels.append(label)

  # Class pictures, then all sub-images of one source size in one batched call.
  n_crop, n_cm = counts['crop'], counts['cropmask']
  square = (image_size, image_size)
  pics = [render_class_example(name, rng, image_size) for name in names
          for _ in range(n_crop + n_cm)]
  pic_images = np.asarray([p[0] for p in pics], np.uint8).reshape(
      (len(names), n_crop + n_cm) + square + (3,))
  cm_masks = np.asarray([p[1] for p in pics], bool).reshape(
      (len(names), n_crop + n_cm) + square)[:, n_crop:].reshape((-1,) + square)
  if perturb and len(cm_masks):
    cm_masks = np.stack([perturb_mask(m, rng) for m in cm_masks])
  cm = subimages(pic_images[:, n_crop:].reshape((-1,) + pic_images.shape[2:]), cm_masks,
                 image_size, True, as_uint8=True)
  cm = cm.reshape((len(names), n_cm) + pic_images.shape[2:])
  if need:
    pairs = [(j, i) for i in range(len(names)) for j in found[i][:need]]
    masks = np.stack([labels[j] == canon[i] for j, i in pairs])
    if perturb:
      masks = np.stack([perturb_mask(m, rng) for m in masks])
    cropmask = np.tile(np.arange(need) < counts['scene_cropmask'], len(names))
    sc = subimages(np.stack([scenes[j] for j, _ in pairs]), masks, image_size, cropmask,
                   as_uint8=True)
    sc = sc.reshape((len(names), need) + pic_images.shape[2:])
  else:
    sc = np.zeros((len(names), 0) + pic_images.shape[2:], np.uint8)
  out_images = np.concatenate([pic_images[:, :n_crop], cm, sc], axis=1)
  kinds = [0] * n_crop + [1] * n_cm + [2] * counts['scene_cropmask'] + [3] * counts['scene_crop']
  return {'images': out_images.reshape((-1,) + pic_images.shape[2:]),
          'labels': np.repeat(np.arange(len(names), dtype=np.int32), per_class),
          'kinds': np.tile(np.asarray(kinds, np.int32), len(names))}


# ---------------------------------------------------------------------------- loss


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                     labels: jax.Array) -> jax.Array:
  """Symmetric InfoNCE with a label-aware target, a scalar.

  image_emb, text_emb: [B, D], L2-normalised, pair i = (image i, caption i); logit_scale:
  scalar (log of the temperature's inverse); labels: int [B] class of pair i. logits =
  exp(logit_scale) * image_emb @ text_emb.T [B, B]. The target of row i (image -> text) and
  of column i (text -> image) is uniform over the pairs j with labels[j] == labels[i]:
  same-class pairs are positives, not false negatives. loss = (CE_rows + CE_cols) / 2, each
  the mean over the batch of -sum_j target_ij log softmax_j.
  """
  logits = jnp.exp(logit_scale) * image_emb @ text_emb.T
  same = (labels[:, None] == labels[None, :]).astype(logits.dtype)
  target = same / same.sum(axis=1, keepdims=True)      # symmetric matrix: rows = columns
  rows = -(target * jax.nn.log_softmax(logits, axis=1)).sum(axis=1).mean()
  cols = -(target * jax.nn.log_softmax(logits, axis=0)).sum(axis=0).mean()
  return 0.5 * (rows + cols)


# ---------------------------------------------------------------------------- training


def clip_init(params, config, seed: int):
  """Redraws the weights of a FlaxCLIPModel with CLIP's initialisation, a new param tree.

  transformers' Flax CLIP draws every weight from N(0, 0.02). With such small attention and
  MLP weights the CLS output barely depends on the image (cosine ~0.9999 between random
  images at width 64) and training idles for hundreds of steps before the towers separate
  anything. CLIP (and transformers' PyTorch port) scales them with the width w and the
  depth L instead: q/k/v w^-1/2 (2L)^-1/2, attention output w^-1/2, fc1 (2w)^-1/2,
  fc2 w^-1/2 (2L)^-1/2, the vision class embedding and both projections w^-1/2 (of their
  tower); token, position and patch embeddings keep 0.02; biases 0, LayerNorms 1 / 0, and
  logit_scale are left as they are.
  """
  from flax.traverse_util import flatten_dict, unflatten_dict
  flat = flatten_dict(params)
  rng = np.random.default_rng([int(seed), 77])
  out = {}
  for key, value in flat.items():
    tower = {'text_model': 'text_config', 'text_projection': 'text_config',
             'vision_model': 'vision_config', 'visual_projection': 'vision_config'}.get(key[0])
    std = None
    if tower is not None:
      tc = getattr(config, tower)
      w, depth = tc.hidden_size, tc.num_hidden_layers
      name = '/'.join(key)
      if key[-1] == 'kernel' and any(p in key for p in ('q_proj', 'k_proj', 'v_proj')):
        std = w ** -0.5 * (2 * depth) ** -0.5
      elif key[-1] == 'kernel' and 'out_proj' in key:
        std = w ** -0.5
      elif key[-1] == 'kernel' and 'fc1' in key:
        std = (2 * w) ** -0.5
      elif key[-1] == 'kernel' and 'fc2' in key:
        std = w ** -0.5 * (2 * depth) ** -0.5
      elif key[0] in ('text_projection', 'visual_projection') or name.endswith('class_embedding'):
        std = w ** -0.5
    if std is None:
      out[key] = value
    else:
      out[key] = jnp.asarray(rng.standard_normal(np.shape(value)).astype(np.float32) * std)
  return unflatten_dict(out)


def _decay_mask(params):
  # Decay matrices only (Dense and patch-conv kernels); embeddings, biases, LayerNorm and
  # logit_scale are left alone, as in CLIP.
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(params, lr: float, steps: int, warmup: int,
                   weight_decay: float = 0.1, clip_norm: float = 1.0):
  """AdamW (b2 0.98, eps 1e-6 as CLIP), linear warm-up to lr then cosine decay to 0."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup_steps=max(int(warmup), 1), decay_steps=max(int(steps), 2), end_value=0.0)
  return optax.chain(
      optax.clip_by_global_norm(clip_norm),
      optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-6, weight_decay=weight_decay,
                  mask=_decay_mask(params)))


def make_train_step(model, tx):
  """Jitted (params, opt_state, images, ids, mask, labels) -> (params, opt_state, metrics).

  images float32 [B, S, S, 3] CLIP-normalised NHWC; ids, mask int32 [B, L]; labels int32 [B].
  Features come from the same functions the evaluation uses (models.clip), so training and
  use see one computation. logit_scale is clipped at ln(100) after the update, as in CLIP.
  """
  module = model.module
  max_scale = math.log(100.0)

  def loss_fn(params, images, ids, mask, labels):
    img = clip._image_features(module, params, images)
    txt = clip._text_features(module, params, ids, mask)
    loss = contrastive_loss(img, txt, params['logit_scale'], labels)
    return loss, (img, txt)

  def step(params, opt_state, images, ids, mask, labels):
    (loss, (img, txt)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, images, ids, mask, labels)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = dict(params, logit_scale=jnp.minimum(params['logit_scale'], max_scale))
    # Batch accuracy image -> caption class (the caption of any same-class pair counts).
    pred = jnp.argmax(img @ txt.T, axis=1)
    acc = jnp.mean((labels[pred] == labels).astype(jnp.float32))
    return params, opt_state, {'loss': loss, 'accuracy': acc,
                               'scale': jnp.exp(params['logit_scale'])}

  return jax.jit(step, donate_argnums=(0, 1))


class BatchSampler:
  """Draws training batches from a pool; deterministic from its generator.

  Classes in a batch: concatenated random permutations of the pool's classes, so each class
  appears floor or ceil(B / K) times (at most once when B <= K); the example of a class is
  uniform over the pool's examples of it, flipped left-right with p = 0.5, and its caption a
  uniform random template.
  """

  def __init__(self, pool: Dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray,
               rng: np.random.Generator):
    # ids, mask: int32 [K, T, L] tokens of template t for class k.
    self.images, self.labels = pool['images'], pool['labels']
    self.by_class = [np.flatnonzero(self.labels == k) for k in range(ids.shape[0])]
    self.ids, self.mask, self.rng = ids, mask, rng
    self.num_classes, self.num_templates = ids.shape[:2]

  def __call__(self, batch_size: int):
    k = self.num_classes
    reps = -(-batch_size // k)
    classes = np.concatenate([self.rng.permutation(k) for _ in range(reps)])[:batch_size]
    idx = np.asarray([self.by_class[c][self.rng.integers(len(self.by_class[c]))]
                      for c in classes])
    images = normalize(self.images[idx])
    flip = self.rng.uniform(size=batch_size) < 0.5
    images[flip] = images[flip, :, ::-1]
    t = self.rng.integers(self.num_templates, size=batch_size)
    return (images, self.ids[classes, t], self.mask[classes, t],
            self.labels[idx].astype(np.int32))


def _caption_tokens(tokenizer, class_names, templates, context: int):
  """ids, mask int32 [K, T, L]; L = the longest caption (+ BOS/EOS), at most `context`.

  The text tower is causal and pools at EOS, so cutting the padding after the longest caption
  changes no feature and saves compute; positions stay absolute.
  """
  prompts = [t.format(n) for n in class_names for t in templates]
  ids, mask = clip.tokenize(tokenizer, prompts, context)
  length = int(mask.sum(1).max())
  shape = (len(class_names), len(templates), length)
  return ids[:, :length].reshape(shape), mask[:, :length].reshape(shape)


# ---------------------------------------------------------------------------- evaluation


def zero_shot_accuracy(model, tokenizer, params, class_names: Sequence[str],
                       seen: Sequence[bool], pool: Dict[str, np.ndarray],
                       batch_size: int = 256) -> Dict[str, Any]:
  """Top-1 zero-shot accuracy of images -> class among all `class_names`.

  Text embeddings: the EVAL_PROMPTS ensemble (modeling.clip.text_embeddings). Returns
  {kind: {'all', 'seen', 'unseen': accuracy, 'n': examples}} for the kinds in the pool.
  """
  text = clip.text_embeddings(model, tokenizer, class_names, clip.prompt_templates(EVAL_PROMPTS),
                              params=params)
  images = pool['images']
  n = len(images)
  batch = min(batch_size, n)
  preds = np.empty(n, np.int64)
  for start in range(0, n, batch):
    take = np.arange(start, start + batch).clip(max=n - 1)   # one shape: one compilation
    emb = np.asarray(clip.image_embeddings(model, normalize(images[take]), params=params))
    preds[start:start + batch] = (emb @ text.T).argmax(1)[:min(batch, n - start)]
  correct = preds == pool['labels']
  seen_ex = np.asarray(seen)[pool['labels']]
  out: Dict[str, Any] = {}
  for k, kind in enumerate(KINDS):
    sel = pool['kinds'] == k
    if not sel.any():
      continue
    out[kind] = {
        'all': float(correct[sel].mean()),
        'seen': float(correct[sel & seen_ex].mean()) if (sel & seen_ex).any() else None,
        'unseen': float(correct[sel & ~seen_ex].mean()) if (sel & ~seen_ex).any() else None,
        'n': int(sel.sum()),
        'top_confusions': _top_confusions(pool['labels'][sel], preds[sel], class_names)}
  return out


def _top_confusions(labels, preds, class_names, k: int = 5) -> List[List[Any]]:
  # [[true class, predicted class, count], ...] of the k most frequent mistakes.
  wrong = labels != preds
  pairs, counts = np.unique(np.stack([labels[wrong], preds[wrong]], 1), axis=0,
                            return_counts=True)
  order = np.argsort(-counts, kind='stable')[:k]
  return [[class_names[pairs[i][0]], class_names[pairs[i][1]], int(counts[i])] for i in order]


# ---------------------------------------------------------------------------- entry points


def model_kwargs(image_size: int, **overrides) -> Dict[str, Any]:
  """create_tiny_clip's size knobs used here; `overrides` win.

  Tuned for 2 CPU cores: 2-layer width-64 towers, D = 64, and 4 x 4 image patches whatever
  the image size (patch = image_size / 4): 16 patch tokens cost a quarter of 64 and learnt
  the shapes better per CPU second than 8 x 8 grids did. logit_scale starts at ln 50
  (CLIP's ln(1/0.07) = ln 14.3 learnt more slowly in a few thousand steps).
  """
  kw = dict(projection_dim=64, text_width=64, text_layers=2, text_heads=4, context_length=32,
            vision_width=64, vision_layers=2, vision_heads=4, image_size=int(image_size),
            patch_size=max(int(image_size) // 4, 1), mlp_ratio=4,
            logit_scale_init=round(math.log(50.0), 4))
  kw.update(overrides)
  return kw


def _settings(world_split: str = 'default', seed: int = 0, steps: int = 3000,
              batch_size: int = 64, lr: float = 3e-3, image_size: int = 32,
              warmup: Optional[int] = None, weight_decay: float = 0.1,
              pool_per_class: int = 384, eval_per_class: int = 32,
              mix: Sequence[float] = DEFAULT_MIX,
              model: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Everything that decides the pretrained CLIP, as JSON values (the defaults live here)."""
  sw.class_names(world_split)   # validates the split
  steps = int(steps)
  if steps < 1 or int(batch_size) < 2 or int(pool_per_class) < 1 or int(eval_per_class) < 1:
    raise ValueError('pretrain_mini_clip: need steps >= 1, batch_size >= 2, pool_per_class '
                     f'>= 1, eval_per_class >= 1 (got {steps}, {batch_size}, '
                     f'{pool_per_class}, {eval_per_class})')
  return dict(version=PRETRAIN_VERSION, world_split=world_split, seed=int(seed), steps=steps,
              batch_size=int(batch_size), lr=float(lr), image_size=int(image_size),
              warmup=max(1, steps // 10) if warmup is None else int(warmup),
              weight_decay=float(weight_decay), pool_per_class=int(pool_per_class),
              eval_per_class=int(eval_per_class), mix=[float(m) for m in mix],
              model=model_kwargs(image_size, **(model or {})))


def pretrain_mini_clip(path: str, *, log_every: int = 500, **settings) -> Dict[str, Any]:
  """Pretrains the miniature CLIP and saves it (HF layout) with pretrain_stats.json in `path`.

  Keyword settings (defaults in `_settings`):
    world_split ('default'): ShapesWorld split; only decides which classes the statistics
      call seen / unseen: training always uses all 32 classes.
    seed (0): seeds the model init, the pool, the batches and the held-out renders.
    steps (3000), batch_size (64), lr (3e-3): optimisation; peak lr after `warmup` steps
      (default steps // 10), cosine decay to 0; weight_decay (0.1) on matrices.
    image_size (32): CLIP input side (vision_config.image_size); 32 learnt as well as 64
      (patch 16) in less time, and makes the image branch's sub-images 4x cheaper.
    pool_per_class (384): pre-rendered training examples per class; eval_per_class (32):
      held-out examples per class and evaluated kind.
    mix (DEFAULT_MIX): shares of KINDS in the training pool.
    model: overrides of create_tiny_clip's size knobs (model_kwargs).
  `path` must not exist or be empty; the directory is assembled beside it and renamed into
  place. Returns the statistics written to pretrain_stats.json (settings, accuracies, loss
  history, seconds).
  """
  start, start_cpu = time.time(), time.process_time()
  cfg = _settings(**settings)
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f'{path} exists and is not empty')
  seen, _ = sw.class_names(cfg['world_split'])
  names = list(sw.CANONICAL_CLASSES)        # canonical order: all 32 classes
  seen_flags = [n in seen for n in names]
  seed, steps, image_size = cfg['seed'], cfg['steps'], cfg['image_size']

  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp-mini-clip-')
  try:
    out_dir = os.path.join(tmp, 'clip')
    words = sorted({w for n in names for w in n.split()})
    # create_tiny_clip's random init compiles op by op (~10 s, mostly one core); the
    # training pool renders meanwhile in this thread.
    error: List[BaseException] = []

    def create():
      try:
        clip.create_tiny_clip(out_dir, vocab_words=words, seed=seed, **cfg['model'])
      except BaseException as e:  # re-raised in the calling thread
        error.append(e)

    worker = threading.Thread(target=create, name='create_tiny_clip', daemon=True)
    worker.start()
    t0 = time.time()
    try:
      pool = render_pool(names, cfg['pool_per_class'], seed=seed, stream=_STREAM_TRAIN,
                         image_size=image_size, mix=cfg['mix'])
    finally:
      worker.join()
    render_s = time.time() - t0
    if error:
      raise error[0]
    clip_model, tokenizer = clip.load_clip(out_dir)
    ids, mask = _caption_tokens(tokenizer, names, caption_templates(),
                                clip.context_length(clip_model))

    # A fresh tree (the train step donates its input; the model keeps its own arrays).
    params = clip_init(clip_model.params, clip_model.config, seed)
    tx = make_optimizer(params, cfg['lr'], steps, cfg['warmup'], cfg['weight_decay'])
    opt_state = tx.init(params)
    train_step = make_train_step(clip_model, tx)
    sampler = BatchSampler(pool, ids, mask, np.random.default_rng([seed, _STREAM_STEPS]))
    t0, t0_cpu = time.time(), time.process_time()
    history = []
    for step in range(1, steps + 1):
      params, opt_state, metrics = train_step(params, opt_state, *sampler(cfg['batch_size']))
      if step % max(int(log_every), 1) == 0 or step == steps:
        m = {k: float(v) for k, v in metrics.items()}
        history.append(dict(step=step, **m))
        logger.info('mini CLIP step %d/%d: loss %.4f, batch accuracy %.3f, scale %.1f',
                    step, steps, m['loss'], m['accuracy'], m['scale'])
    train_s, train_cpu = time.time() - t0, time.process_time() - t0_cpu

    t0 = time.time()
    held_out = render_pool(names, cfg['eval_per_class'] * len(EVAL_KINDS), seed=seed,
                           stream=_STREAM_EVAL, image_size=image_size, perturb=False,
                           mix=[1.0 if k in EVAL_KINDS else 0.0 for k in KINDS])
    accuracy = zero_shot_accuracy(clip_model, tokenizer, params, names, seen_flags, held_out)
    eval_s = time.time() - t0

    clip_model.save_pretrained(out_dir, params=params)
    stats = dict(settings=cfg, classes=names, seen=seen_flags, eval_prompts=EVAL_PROMPTS,
                 zero_shot_accuracy=accuracy, final=history[-1], history=history,
                 logit_scale=float(jnp.exp(params['logit_scale'])))
    # CPU seconds of this process (all threads) beside wall seconds: on a shared machine
    # the wall time says little about the cost.
    stats['seconds'] = dict(
        render=round(render_s, 2), train=round(train_s, 2), eval=round(eval_s, 2),
        total=round(time.time() - start, 2), train_cpu=round(train_cpu, 2),
        total_cpu=round(time.process_time() - start_cpu, 2))
    # Written last: a directory holding this file is a finished pretraining.
    with open(os.path.join(out_dir, STATS_FILE), 'w', encoding='utf-8') as f:
      json.dump(stats, f, indent=1)
    os.chmod(out_dir, 0o755)   # mkdtemp's parent is 0700, the model dir should not be
    if os.path.isdir(path):
      os.rmdir(path)   # empty (checked above)
    os.replace(out_dir, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return stats


def read_stats(path: str) -> Optional[Dict[str, Any]]:
  """pretrain_stats.json of a pretrained directory, or None."""
  file = os.path.join(os.fspath(path), STATS_FILE)
  if not os.path.isfile(file):
    return None
  with open(file, encoding='utf-8') as f:
    return json.load(f)


def is_complete(path: str) -> bool:
  """Whether `path` holds a CLIP directory load_clip can open (config + weights)."""
  try:
    clip._check_clip_dir(os.fspath(path))
  except FileNotFoundError:
    return False
  return True


def ensure_mini_clip(path: str, *, log_every: int = 500, **settings) -> Dict[str, Any]:
  """pretrain_mini_clip(path, **settings) unless `path` already holds a finished one.

  A complete directory (is_complete) with pretrain_stats.json is reused when it was
  pretrained with these settings and is an error otherwise, as shapesworld.generate treats a
  dataset made with other settings. A complete CLIP directory without stats (a random
  create_tiny_clip of older runs, or one put there by hand) is reused with a warning:
  replacing it would silently change the text embeddings a trained ZegFormer expects.
  Returns the stats of the directory ({} when it has none).
  """
  path = os.fspath(path)
  if is_complete(path):
    stats = read_stats(path)
    if stats is None:
      logger.warning('%s holds a CLIP without %s; reusing it as is', path, STATS_FILE)
      return {}
    sw.check_settings(path, 'a miniature CLIP pretrained', stats.get('settings', {}),
                             _settings(**settings))
    logger.info('reusing the miniature CLIP in %s', path)
    return stats
  if os.path.isdir(path) and os.listdir(path):
    raise FileExistsError(f'{path} exists but holds no CLIP (config.json and weights); '
                          'remove it to pretrain the miniature CLIP there')
  return pretrain_mini_clip(path, log_every=log_every, **settings)
