"""The segmenter: per-pixel class scores of ZegFormer's variants (Eq. 1-3), with test views.

For a batch, under one function that evaluation and prediction jit:
  normalise (padding re-zeroed) -> model (final decoder layer)
  -> per-query class probabilities p_q(c):
       seg  : softmax over K+1, no-object dropped (Eq. 1 logits)
       img  : CLIP image embeddings of each segment's sub-image (Eq. 1 with A_q), with the
              segmentation branch's no-object logit appended
       full : Eq. 3 fusion of the two with lambda
  -> mask logits upsampled to the padded input -> sum_q p_q(c) sigmoid(m_q)
  -> crop to the resized image, resize to the label's size -> minus gamma on seen classes
     (Eq. 2).
Several variants share the model's forward pass and the image branch. With test-time
augmentation (`tta`) the scores of every view are averaged. The other methods have only
'seg': SPNet-FPN and ZS3Net a per-pixel softmax, ZegCLIP a per-class sigmoid, each then
resized and calibrated (Eq. 2) the same way.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np

from zegformer_jax.modeling import clip
from zegformer_jax.modeling import inference
from zegformer_jax.modeling import methods
from zegformer_jax.modeling import one_pass
from zegformer_jax.modeling import per_pixel
from zegformer_jax.modeling import preprocess
from zegformer_jax.modeling import tta

VARIANTS = ('seg', 'img', 'full')


def check_variants(variants, model_config=None) -> tuple:
  """The distinct variants, in order; an unknown one (or one the method of `model_config`
  does not have: img and full need ZegFormer's segments) is an error naming it."""
  variants = tuple(dict.fromkeys(variants))
  for v in variants:
    if v not in VARIANTS:
      raise ValueError(f'config.eval.variant must be one of {VARIANTS}, got {v!r}')
    if model_config is not None and v not in methods.variants(model_config):
      raise ValueError(f'variant {v!r} needs segments: method '
                       f'{methods.method_name(model_config)!r} has only '
                       f'{methods.variants(model_config)}')
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
      text=[K, D] CLIP text embeddings (image-branch prompt set), scale=CLIP logit scale,
      segments=fn(image, masks [B, k, Hp, Wp]) -> [B, k, D] (the one-pass branch)).
    eval_cfg: config.eval (clip_style, clip_top_k, fusion_lambda, image_branch: 'crops' runs
      CLIP on each segment's sub-image, 'one_pass' once per image with a mask query per
      segment, modeling/one_pass.py).
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
  if image_branch_kind(eval_cfg) == 'one_pass':
    emb = clip_inputs['segments'](clip_inputs['image'], masks_k)
  else:
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


IMAGE_BRANCHES = ('crops', 'one_pass')


def image_branch_kind(eval_cfg) -> str:
  """config.eval.image_branch, checked ('crops' when a config predates the key)."""
  branch = eval_cfg.get('image_branch', 'crops')
  if branch not in IMAGE_BRANCHES:
    raise ValueError(f'config.eval.image_branch must be one of {IMAGE_BRANCHES}, got {branch!r}')
  return branch


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
                   view_shapes=None, with_masks=False):
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

  with_masks adds 'masks': the final layer's mask logits [B, Q, Hl, Wl] at label resolution
  (averaged over the views like the scores), for the grouping oracle.
  """
  variants = check_variants(variants, config.model)
  mean, std = config.model.pixel_mean, config.model.pixel_std
  eval_cfg = config.eval
  image_branch_kind(eval_cfg)   # an unknown branch is an error before anything is compiled
  resize_impl = inference.check_resize_impl(str(eval_cfg.get('resize_impl', 'matmul')))
  pixel_level = methods.is_pixel_method(config.model)
  one_stage = methods.method_name(config.model) == 'zegclip'
  if with_masks and not methods.has_segments(config.model):
    raise ValueError('masks (the grouping oracle) need segments; method '
                     f'{methods.method_name(config.model)!r} classifies pixels')

  def forward(params, frozen, image, image_hw, text_embeddings, seen_mask, clip_params,
              clip_text):
    """{variant: [B, K, H, W] (Eq. 1 / 3, before Eq. 2)} at the (padded) size of `image`."""
    images = preprocess.normalize(image, mean, std, image_hw)
    outputs = model.apply({'params': params, 'frozen': frozen}, images, text_embeddings,
                          train=False)
    hp, wp = images.shape[1:3]
    if pixel_level:   # SPNet-FPN / ZS3Net: per-pixel softmax at the padded size
      pixel_probs = per_pixel.pixel_scores(outputs['sem_seg_logits'], (hp, wp), resize_impl)
      return {'seg': pixel_probs}
    if one_stage:     # ZegCLIP: per-class sigmoid of the mask logits upsampled to the input;
      # Eq. 2 below (gamma 0.1 on the seen classes) is ZegCLIP's own seen-class penalty.
      return {'seg': jax.nn.sigmoid(jnp.moveaxis(outputs['sem_seg_logits'], -1, 1))}
    pred_logits = outputs['pred_logits'][-1]
    mask_logits = inference.upsample_bilinear(
        outputs['pred_masks'][-1].astype(jnp.float32), (hp, wp), impl=resize_impl)
    clip_inputs = None
    if any(v != 'seg' for v in variants):
      clip_inputs = dict(
          image=preprocess.normalize(image, clip.CLIP_PIXEL_MEAN, clip.CLIP_PIXEL_STD,
                                     image_hw),
          embed=lambda x: clip.image_embeddings(clip_model, x, params=clip_params),
          segments=lambda x, masks: one_pass.segment_embeddings(
              clip_model, clip_params, x, masks, int(eval_cfg.get('one_pass_size', 0)),
              int(eval_cfg.get('one_pass_mask_from', 0))),
          text=clip_text, scale=clip.clip_logit_scale(clip_params),
          size=clip_model.config.vision_config.image_size)
    probs = variant_probabilities(variants, pred_logits, mask_logits, clip_inputs, eval_cfg,
                                  seen_mask)
    out = {v: inference.semantic_inference(probs[v], mask_logits) for v in variants}
    if with_masks:
      out['masks'] = mask_logits
    return out

  windows = sliding_windows(config) if eval_cfg.get('sliding_window', False) else None
  if windows is not None and with_masks:
    raise ValueError('config.eval.oracles needs whole-image masks; it does not combine with '
                     'config.eval.sliding_window')

  def scores(params, frozen, batch, text_embeddings, seen_mask, clip_params, clip_text):
    args = (text_embeddings, seen_mask, clip_params, clip_text)
    if windows is None:
      out = forward(params, frozen, batch['image'], batch['image_hw'], *args)
    else:
      out = slide(forward, windows, params, frozen, batch['image'], batch['image_hw'], *args)
    for k, x in out.items():
      out[k] = inference.postprocess(x, batch['image_hw'], batch['label_hw'], label_hw_static,
                                     impl=resize_impl)
      if k != 'masks':
        out[k] = inference.calibrate(out[k], seen_mask, eval_cfg.gamma)   # Eq. 2
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
    total = {}
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
          total[v] = total.get(v, 0.0) + sem_seg
    return {v: t / len(views) for v, t in total.items()}

  return scores_tta


def image_branch(config, workdir, class_names, variants):
  """(CLIP model, its params, [K, D] image-branch text embeddings); Nones if only 'seg'.

  The one-pass branch reads its CLIP from config.eval.one_pass_clip_path when it is set
  (a mask-aware one, training/mask_aware.py); the text embeddings stay those of
  config.clip.model_path's CLIP, whose text tower the fine-tuning does not change.
  """
  if all(v == 'seg' for v in variants):
    return None, None, None
  path = clip.clip_dir(config)
  tuned = config.eval.get('one_pass_clip_path', '')
  if tuned and image_branch_kind(config.eval) == 'one_pass':
    if not os.path.isdir(tuned):
      raise FileNotFoundError(
          f'CLIP directory {tuned!r} (config.eval.one_pass_clip_path) does not exist; '
          '`--mode mask_aware` writes one to <workdir>/mask_aware/clip')
    path = tuned
  clip_model, _ = clip.load_clip(path)
  clip_text = clip.class_text_embeddings(config, workdir, class_names,
                                         config.clip.image_prompts)
  return clip_model, clip_model.params, clip_text


def sliding_windows(config):
  """(window, stride) of config.eval's sliding-window inference, validated."""
  window = int(config.eval.window_size or config.input.crop_size)
  stride = int(config.eval.window_stride or max(1, (2 * window) // 3))
  if window <= 0 or not 0 < stride <= window:
    raise ValueError(f'sliding window {window} with stride {stride}: need 0 < stride <= window')
  return window, stride


def window_offsets(size: int, window: int, stride: int) -> list:
  """Start offsets of windows covering [0, size): every `stride`, the last flush with the end
  (mmsegmentation's slide inference); one window at 0 when the image is not larger."""
  if size <= window:
    return [0]
  n = -(-(size - window) // stride) + 1
  return sorted({min(i * stride, size - window) for i in range(n)})


def slide(forward, windows, params, frozen, image, image_hw, *args) -> dict:
  """forward() on overlapping windows of `image`, scores averaged where windows overlap.

  image: [B, H, W, 3] (static H, W); each window is a static crop [h, w] = min(window, H/W),
  its valid size the part of image_hw inside it; windows lying in the padding only add
  scores where the caller crops them away (postprocess keeps [:ih, :iw]).
  """
  window, stride = windows
  _, h, w, _ = image.shape
  wh, ww = min(window, h), min(window, w)
  total, count = {}, np.zeros((h, w), np.float32)
  for y in window_offsets(h, wh, stride):
    for x in window_offsets(w, ww, stride):
      crop = image[:, y:y + wh, x:x + ww]
      crop_hw = jnp.clip(image_hw - jnp.asarray([y, x]), 0, jnp.asarray([wh, ww]))
      for k, v in forward(params, frozen, crop, crop_hw, *args).items():
        pad = ((0, 0), (0, 0), (y, h - y - wh), (x, w - x - ww))
        total[k] = total.get(k, 0.0) + jnp.pad(v, pad)
      count[y:y + wh, x:x + ww] += 1
  return {k: v / jnp.asarray(count) for k, v in total.items()}
