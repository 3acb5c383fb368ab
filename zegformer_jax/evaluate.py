"""Evaluation: semantic inference, calibration, confusion matrix, metrics JSON.

For each batch, on device and under one jitted function:
  normalise (padding re-zeroed) -> model (final decoder layer)
  -> per-query class probabilities p_q(c):
       seg  : softmax over K+1, no-object dropped (Eq. 1 logits)
       img  : CLIP image embeddings of each segment's sub-image (Eq. 1 with A_q), with the
              segmentation branch's no-object logit appended (reference section 3)
       full : Eq. 3 fusion of the two with lambda
  -> mask logits upsampled to the padded input -> sum_q p_q(c) sigmoid(m_q)
  -> crop to the resized image, resize to the label's size -> minus gamma on seen classes
     (Eq. 2) -> argmax -> confusion matrix, summed over the whole split on device.
Several variants are evaluated in one pass (`evaluate_variants`): they share the model's
forward pass and the image branch. With test-time augmentation (`tta`) the scores of every
view are averaged before the argmax. The confusion matrices are reduced across processes by
the sharded sum itself, so every process ends with the same matrices; process 0 writes
`metrics_<variant>.json`.
"""
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common as config_common
from zegformer_jax import inference
from zegformer_jax import input_pipeline
from zegformer_jax import metrics as metrics_lib
from zegformer_jax import preprocess
from zegformer_jax import resources
from zegformer_jax import sharding
from zegformer_jax import tta
from zegformer_jax.models import clip

VARIANTS = ('seg', 'img', 'full')


def check_variants(variants) -> tuple:
  """The distinct variants, in order; an unknown one is an error naming it."""
  variants = tuple(dict.fromkeys(variants))
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f'config.eval.variant must be one of {VARIANTS}, got {v!r}')
  return variants


def class_probabilities(variant, pred_logits, mask_logits_full, clip_inputs, eval_cfg,
                        seen_mask):
  """Per-query class probabilities [B, Q, K] of one variant (`variant_probabilities`)."""
  return variant_probabilities((variant,), pred_logits, mask_logits_full, clip_inputs,
                               eval_cfg, seen_mask)[variant]


def variant_probabilities(variants, pred_logits, mask_logits_full, clip_inputs, eval_cfg,
                          seen_mask):
  """{variant: per-query class probabilities [B, Q, K]}, the image branch computed once.

  Args:
    variants: a sequence of 'seg' | 'img' | 'full'.
    pred_logits: [B, Q, K+1] Eq. 1 logits of the final decoder layer (no-object last).
    mask_logits_full: [B, Q, Hp, Wp] mask logits at the padded input size.
    clip_inputs: None when variants is only 'seg'; else dict(image=[B, Hp, Wp, 3]
      CLIP-normalised image, embed=fn(images [N, S, S, 3]) -> [N, D] normalised CLIP image
      embeddings, size=S (the CLIP image size: 224 for ViT-B/16),
      text=[K, D] CLIP text embeddings (image-branch prompt set), scale=CLIP logit scale).
    eval_cfg: config.eval (clip_style, clip_top_k, fusion_lambda).
    seen_mask: [K] bool.
  """
  p_seg = inference.segment_probs(pred_logits)
  out = {v: p_seg for v in variants if v == 'seg'}
  rest = [v for v in variants if v != 'seg']
  if not rest:
    return out
  b, q = p_seg.shape[:2]
  k = eval_cfg.clip_top_k if 0 < eval_cfg.clip_top_k < q else q
  # Only the top-k queries by segment score go through CLIP (all of them by default, as
  # in the paper); the others keep their segmentation-branch probabilities.
  _, top = jax.lax.top_k(jnp.max(p_seg, axis=-1), k)                       # [B, k]
  masks_k = jnp.take_along_axis(mask_logits_full, top[:, :, None, None], axis=1)
  sub = inference.subimages(clip_inputs['image'], masks_k, eval_cfg.clip_style,
                            out_size=clip_inputs['size'])
  emb = clip_inputs['embed'](sub.reshape((b * k,) + sub.shape[2:])).reshape(b, k, -1)
  clip_logits = clip_inputs['scale'] * jnp.einsum('bqd,kd->bqk', emb, clip_inputs['text'])
  no_object = jnp.take_along_axis(pred_logits[..., -1], top, axis=1)
  p_img_k = inference.image_branch_probs(clip_logits, no_object)          # [B, k, K]
  p_seg_k = jnp.take_along_axis(p_seg, top[:, :, None], axis=1)
  batch_idx = jnp.arange(b)[:, None]
  for v in rest:
    new_k = p_img_k if v == 'img' else inference.fuse(p_seg_k, p_img_k, seen_mask,
                                                      eval_cfg.fusion_lambda)
    out[v] = p_seg.at[batch_idx, top].set(new_k)
  return out


def make_segment_fn(config, model, variant, label_hw_static, clip_model=None,
                    view_shapes=None):
  """fn(params, frozen, batch, text, seen, clip_params, clip_text) -> pred int32 [B, Hl, Wl].

  The semantic segmentation of a batch at (padded) label resolution by one variant: the
  argmax of `make_scores_fn`. Not jitted: `predict` wraps it.
  """
  scores = make_scores_fn(config, model, (variant,), label_hw_static, clip_model, view_shapes)

  def segment(*args):
    return jnp.argmax(scores(*args)[variant], axis=1).astype(jnp.int32)

  return segment


def make_scores_fn(config, model, variants, label_hw_static, clip_model=None,
                   view_shapes=None):
  """fn(params, frozen, batch, text, seen, clip_params, clip_text) -> {variant: [B, K, Hl, Wl]}.

  Calibrated (Eq. 2) per-pixel class scores at (padded) label resolution of each of
  `variants`, which share one forward pass of the model and of the image branch. batch
  holds 'image' [B, Hp, Wp, 3] (0-255), 'image_hw' [B, 2] and 'label_hw' [B, 2]; text is
  [K, D]; seen is [K] bool.

  With test-time augmentation (config.eval.aug_min_sizes / aug_flip, `tta`) the scores of
  every view, brought back to label resolution, are averaged (detectron2's
  SemanticSegmentorWithTTA); view_shapes is then `tta.padded_view_shapes` of the original
  image sizes this fn will see, and the batch also holds 'view_hw' [B, S, 2]
  (`tta.view_sizes`).
  """
  variants = check_variants(variants)
  mean, std = config.model.pixel_mean, config.model.pixel_std
  eval_cfg = config.eval

  def scores(params, frozen, batch, text_embeddings, seen_mask, clip_params, clip_text):
    images = preprocess.normalize(batch['image'], mean, std, batch['image_hw'])
    outputs = model.apply({'params': params, 'frozen': frozen}, images, text_embeddings,
                          train=False)
    pred_logits = outputs['pred_logits'][-1]
    hp, wp = images.shape[1:3]
    mask_logits = inference.upsample_masks(outputs['pred_masks'][-1], (hp, wp))
    clip_inputs = None
    if any(v != 'seg' for v in variants):
      clip_inputs = dict(
          image=preprocess.normalize(batch['image'], config_common.CLIP_PIXEL_MEAN,
                                     config_common.CLIP_PIXEL_STD, batch['image_hw']),
          embed=lambda x: clip.image_embeddings(clip_model, x, params=clip_params),
          text=clip_text, scale=clip.clip_logit_scale(clip_params),
          size=clip_model.config.vision_config.image_size)
    probs = variant_probabilities(variants, pred_logits, mask_logits, clip_inputs, eval_cfg,
                                  seen_mask)
    out = {}
    for v in variants:
      sem_seg = inference.semantic_inference(probs[v], mask_logits)         # [B, K, Hp, Wp]
      sem_seg = inference.postprocess(sem_seg, batch['image_hw'], batch['label_hw'],
                                      label_hw_static)
      out[v] = inference.calibrate(sem_seg, seen_mask, eval_cfg.gamma)      # Eq. 2
    return out

  if not tta.enabled(eval_cfg, config.input):
    return scores

  views = tta.views(eval_cfg, config.input)
  max_size = tta.max_size(eval_cfg, config.input)
  plain = (int(config.input.min_size_test), int(config.input.max_size_test))
  if view_shapes is None or any(s not in view_shapes for s, _ in views):
    raise ValueError(f'test-time augmentation (config.eval.aug_min_sizes '
                     f'{tuple(eval_cfg.aug_min_sizes)}, aug_flip {eval_cfg.aug_flip}) needs '
                     f'the static shape of every view size; got {view_shapes}')

  def scores_tta(params, frozen, batch, *args):
    total = {v: 0.0 for v in variants}
    for i, size in enumerate(tta.distinct_sizes(eval_cfg, config.input)):
      if (size, max_size) == plain:  # the batch is this view: no second resampling
        image, image_hw = batch['image'], batch['image_hw']
      else:
        image_hw = batch['view_hw'][:, i]
        image = inference.resize_valid(batch['image'], batch['image_hw'], image_hw,
                                       view_shapes[size], spatial_axes=(1, 2),
                                       antialias=True)
      for _, flip in (v for v in views if v[0] == size):
        view = dict(image=tta.flip_valid(image, image_hw[:, 1], axis=2) if flip else image,
                    image_hw=image_hw, label_hw=batch['label_hw'])
        for v, sem_seg in scores(params, frozen, view, *args).items():
          if flip:
            sem_seg = tta.flip_valid(sem_seg, batch['label_hw'][:, 1], axis=3)
          total[v] = total[v] + sem_seg
    return {v: t / len(views) for v, t in total.items()}

  return scores_tta


def make_eval_step(config, model, variants, num_classes, label_hw_static, clip_model=None,
                   view_shapes=None):
  """Jitted ((confs, n), params, frozen, batch, text, seen, clip_params, clip_text) -> (confs, n).

  confs maps each variant to its [K+1, K+1] confusion matrix (metrics.confusion_matrix); n
  counts the valid (non-padding) images, summed over every process by the sharded
  reduction. Label pixels beyond each label's own size hold the ignore value, so they never
  count.
  """
  scores = make_scores_fn(config, model, variants, label_hw_static, clip_model, view_shapes)
  ignore = config.dataset.ignore_value

  def step(acc, params, frozen, batch, *args):
    confs, count = acc
    new = {}
    for v, sem_seg in scores(params, frozen, batch, *args).items():
      pred = jnp.argmax(sem_seg, axis=1).astype(jnp.int32)
      new[v] = confs[v] + metrics_lib.confusion_matrix(pred, batch['label'], num_classes,
                                                       ignore, batch['example_valid'])
    return new, count + jnp.sum(batch['example_valid'].astype(jnp.int32))

  return jax.jit(step, donate_argnums=(0,))


def image_branch(config, workdir, class_names, variants):
  """(CLIP model, its params, [K, D] image-branch text embeddings); Nones if only 'seg'."""
  if all(v == 'seg' for v in variants):
    return None, None, None
  from zegformer_jax import train
  clip_model, _ = clip.load_clip(resources.clip_dir(config, workdir))
  clip_text = train.class_text_embeddings(config, workdir, class_names,
                                          config.clip.image_prompts)
  return clip_model, clip_model.params, clip_text


def load_trained_state(config, workdir):
  """(model, state) of the latest checkpoint in `workdir` (train.load_latest_state)."""
  from zegformer_jax import train  # train imports evaluate lazily; avoid a cycle
  train_classes, _ = input_pipeline.dataset_classes(resources.data_dir(config, workdir),
                                                    config.dataset.train_split)
  return train.load_latest_state(config, workdir, len(train_classes))


def evaluate(config, workdir, *, state=None, split=None, variant=None, tag=''):
  """Evaluates one variant (default config.eval.variant); see `evaluate_variants`."""
  variant = variant or config.eval.variant
  return evaluate_variants(config, workdir, (variant,), state=state, split=split,
                           tag=tag)[variant]


def evaluate_variants(config, workdir, variants, *, state=None, split=None, tag=''):
  """Evaluates the latest checkpoint (or `state`) on `split`, all variants in one pass.

  Writes metrics_<variant>[_<tag>].json per variant and returns {variant: metrics}. The
  variants share each batch's forward pass (and the image branch, for img and full).
  """
  from zegformer_jax import train  # train imports evaluate lazily; avoid a cycle
  variants = check_variants(variants)
  split = split or config.dataset.eval_split
  mesh = sharding.mesh_from_config(config)
  data_dir = resources.data_dir(config, workdir)
  class_names, seen_mask = input_pipeline.dataset_classes(data_dir, split)
  num_classes = len(class_names)
  text = train.class_text_embeddings(config, workdir, class_names, config.clip.test_prompts)
  if state is None:
    model, state = load_trained_state(config, workdir)
  else:
    from zegformer_jax.models import zegformer
    model = zegformer.build_model(config.model)

  clip_model, clip_params, clip_text = image_branch(config, workdir, class_names, variants)

  view_shapes = None
  if tta.enabled(config.eval, config.input):
    view_shapes = tta.padded_view_shapes(
        config.eval, config.input, input_pipeline.split_image_shapes(data_dir, split))

  t0 = time.time()
  acc = None
  step_fn = None
  text = sharding.replicate(text, mesh)
  seen_dev = sharding.replicate(np.asarray(seen_mask, bool), mesh)
  for batch in input_pipeline.make_eval_batches(config, data_dir, split):
    if view_shapes is not None:
      batch['view_hw'] = tta.view_sizes(config.eval, config.input, batch['label_hw'])
    dev_batch = sharding.shard_batch(batch, mesh)
    if step_fn is None:
      step_fn = make_eval_step(config, model, variants, num_classes,
                               tuple(batch['label'].shape[1:3]), clip_model, view_shapes)
      zeros = np.zeros((num_classes + 1, num_classes + 1), np.int32)
      acc = sharding.replicate(({v: zeros for v in variants}, np.zeros((), np.int32)), mesh)
    acc = step_fn(acc, state['params'], state['frozen'], dev_batch, text, seen_dev,
                  clip_params, clip_text)
    if config.eval.max_images and int(acc[1]) >= config.eval.max_images:
      break
  if acc is None:
    raise ValueError(f'split {split!r} in {data_dir} has no examples')
  confs, num_images = jax.device_get(acc)
  wall = round(time.time() - t0, 2)
  results = {}
  for variant in variants:
    result = metrics_lib.compute_metrics(
        np.asarray(confs[variant]), class_names, np.asarray(seen_mask, bool),
        dataset=config.dataset.name, variant=variant, num_images=int(num_images))
    result['split'] = split
    result['test_views'] = [{'min_size': s, 'flip': f}
                            for s, f in tta.views(config.eval, config.input)]
    result['eval_variants'] = list(variants)   # evaluated together in eval_wall_s
    result['eval_wall_s'] = wall
    if jax.process_index() == 0:
      name = f'metrics_{variant}{("_" + tag) if tag else ""}.json'
      path = os.path.join(workdir, name)
      metrics_lib.write_metrics_json(result, path)
      logging.info('wrote %s', path)
      print(f'{variant}: mIoU {_fmt(result["mIoU"])} seen {_fmt(result["mIoU_seen"])} '
            f'unseen {_fmt(result["mIoU_unseen"])} hIoU {_fmt(result["hIoU"])} '
            f'pAcc {_fmt(result["pAcc"])} -> {path}', flush=True)
    results[variant] = result
  return results


def _fmt(x):
  return 'n/a' if x is None else f'{x:.2f}'
