"""Mask-aware fine-tuning of CLIP's image encoder for the one-pass image branch (MAFT).

Jiao et al., "Learning Mask-aware CLIP Representations for Zero-Shot Segmentation"
(NeurIPS 2023), the IP-CLIP training. CLIP's [CLS] token describes a whole image; a mask
query that only reads a segment's patches (modeling/one_pass.py) is not what CLIP was
trained to produce, and its embedding classifies segments poorly (BENCHMARKS.md: unseen
mIoU of ZegFormer-img 27 with CLIP's own weights against 70 with crops on ShapesWorld).
MAFT teaches the encoder to make it one, without new parameters:

  proposals: a trained mask generator, frozen (here: this workdir's ZegFormer, its final
    decoder layer's N mask logits upsampled to the input);
  IP-CLIP: CLIP's ViT with one mask query per proposal (one_pass.MaskQueryCLIP, the
    queries masked from layer eval.one_pass_mask_from on, at eval.one_pass_size: the
    branch exactly as evaluation runs it);
  scores: softmax over the training classes of logit_scale * cos(query, text) [B, N, K];
  L_ma (mask-aware loss): for every class present in an image, SmoothL1 between the N
    proposals' scores for it and their soft IoUs with its ground-truth mask, min-max
    normalised over the proposals (`mask_aware_loss`);
  L_sd (self-distillation): SmoothL1 between the class distributions of the tuned and the
    frozen encoder's [CLS] embedding of the whole image (`distillation_loss`), so the
    encoder keeps what it knew about images;
  loss = L_ma + mask_aware.distill_weight * L_sd;
  trained: every layer's attention projections and its two LayerNorms, and the final
    LayerNorm (`is_trainable`); the MLPs, embeddings and projection stay CLIP's
    (config.mask_aware.trainable='all' trains them too). The text encoder is never
    trained, so the classes' text embeddings do not change.

In the zero-shot setting only the seen classes are labelled in training (the others are
the ignore value), so the scores are over the seen classes, as ZegFormer's own training.

`finetune` trains with AdamW, poly decay and full-model gradient clipping
(config.mask_aware), checkpoints to <workdir>/mask_aware/checkpoints (resumed exactly,
the data iterator included), on one device (the step is not sharded; a
multi-process job is refused), and writes the tuned CLIP as a Hugging Face directory,
<workdir>/mask_aware/clip (complete or absent), which evaluation reads with
--config.eval.one_pass_clip_path=<workdir>/mask_aware/clip.
"""
import json
import logging
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from zegformer_jax.data import input_pipeline
from zegformer_jax.modeling import clip
from zegformer_jax.modeling import inference
from zegformer_jax.modeling import methods
from zegformer_jax.modeling import one_pass
from zegformer_jax.modeling import preprocess
from zegformer_jax.modeling import prompted_vit
from zegformer_jax.training import checkpoints
from zegformer_jax.training import optim
from zegformer_jax.training import state as state_lib

SUBDIR = 'mask_aware'
CLIP_SUBDIR = 'clip'
STATS_FILE = 'mask_aware_summary.json'


# ---------------------------------------------------------------------------- losses


def smooth_l1(x, y, beta: float = 1.0):
  """torch's SmoothL1Loss(reduction='none'): 0.5 d^2 / beta where |d| < beta, else |d| - beta/2."""
  d = jnp.abs(x - y)
  return jnp.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)


def _class_ids(label, num_classes: int):
  """[B, P] int32 class ids of label [B, H, W], anything outside [0, K) mapped to bin K."""
  ids = label.reshape(label.shape[0], -1).astype(jnp.int32)
  return jnp.where((ids >= 0) & (ids < num_classes), ids, num_classes)


def class_areas(label, num_classes: int):
  """[B, K] float32 pixel count of each class in label [B, H, W] (ids outside [0, K), the
  ignore value, count for no class); > 0 is the classes present in each image."""
  count = lambda ids: jnp.bincount(ids, length=num_classes + 1)[:num_classes]
  return jax.vmap(count)(_class_ids(label, num_classes)).astype(jnp.float32)


def soft_iou(mask_probs, label, num_classes: int):
  """[B, N, K] soft IoU of each proposal with each class's ground-truth mask (MAFT's target).

  mask_probs: [B, N, H, W] proposal probabilities (sigmoid of the mask logits);
  label: [B, H, W] class ids, anything outside [0, K) (the ignore value) in no class.
  IoU = sum(p g) / (sum g + sum p - sum p g); sum p runs over the whole image, so a
  proposal that spreads beyond the class (onto unlabelled pixels too) scores lower. 0 where
  both are empty.
  """
  b, n = mask_probs.shape[:2]
  p = mask_probs.reshape(b, n, -1).astype(jnp.float32)

  def intersections(p_i, ids_i):   # [N, P], [P] -> [N, K]
    return jax.ops.segment_sum(p_i.T, ids_i, num_segments=num_classes + 1)[:num_classes].T

  inter = jax.vmap(intersections)(p, _class_ids(label, num_classes))      # [B, N, K]
  area = class_areas(label, num_classes)                                 # [B, K]
  union = area[:, None, :] + jnp.sum(p, axis=-1)[..., None] - inter
  return jnp.where(union > 0, inter / jnp.maximum(union, 1e-12), 0.0)


def minmax_over_proposals(x, eps: float = 1e-8):
  """[B, N, K] rescaled to [0, 1] over the N proposals of each (image, class), as MAFT
  normalises its IoU targets: the best proposal of a class is 1, the worst 0."""
  lo = jnp.min(x, axis=1, keepdims=True)
  hi = jnp.max(x, axis=1, keepdims=True)
  return (x - lo) / jnp.maximum(hi - lo, eps)


def mask_aware_loss(scores, iou, present):
  """MAFT's L_ma: mean SmoothL1 between the proposals' class scores and their IoU targets.

  scores: [B, N, K] class probabilities of the N mask queries; iou: [B, N, K] soft IoUs
  (`soft_iou`, normalised here by `minmax_over_proposals`); present: [B, K] bool, the
  classes in each image's ground truth. The mean runs over the N proposals of every present
  (image, class) pair; 0 when no image holds a class.
  """
  target = jax.lax.stop_gradient(minmax_over_proposals(iou))
  per = jnp.mean(smooth_l1(scores, target), axis=1)              # [B, K]
  w = present.astype(per.dtype)
  return jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)


def distillation_loss(student_probs, teacher_probs):
  """MAFT's L_sd: mean SmoothL1 between the tuned and the frozen encoder's class
  distributions of the whole image ([B, K] each; the teacher is not differentiated)."""
  return jnp.mean(smooth_l1(student_probs, jax.lax.stop_gradient(teacher_probs)))


def class_probs(embeddings, text, scale):
  """softmax_K(scale * <embedding, text_k>): [..., E] x [K, E] -> [..., K]."""
  return jax.nn.softmax(scale * jnp.einsum('...e,ke->...k', embeddings, text), axis=-1)


# ---------------------------------------------------------------------------- parameters


TRAINABLE = ('maft', 'all')


def is_trainable(path: str, which: str = 'maft') -> bool:
  """What IP-CLIP trains (MAFT's `_freeze`): in every encoder layer the attention's q, k, v
  and output projections and both LayerNorms, and the final LayerNorm; with which='all'
  (config.mask_aware.trainable) every parameter of the image encoder. `path` is a
  '/'-joined key path in MaskQueryCLIP's (= prompted_vit.clip_params') tree."""
  if which not in TRAINABLE:
    raise ValueError(f'config.mask_aware.trainable must be one of {TRAINABLE}, got {which!r}')
  if which == 'all':
    return True
  parts = path.split('/')
  if parts[0] == 'post_layernorm':
    return True
  return parts[0] == 'encoder' and any(p in ('self_attn', 'layer_norm1', 'layer_norm2')
                                       for p in parts)


def split_params(tree, which: str = 'maft'):
  """(trainable, frozen) flat dicts {path: array} of a MaskQueryCLIP parameter tree."""
  flat = traverse_util.flatten_dict(tree, sep='/')
  trainable = {k: v for k, v in flat.items() if is_trainable(k, which)}
  frozen = {k: v for k, v in flat.items() if not is_trainable(k, which)}
  return trainable, frozen


def merge_params(trainable, frozen):
  """The MaskQueryCLIP tree of two flat dicts (`split_params`)."""
  return traverse_util.unflatten_dict({**frozen, **trainable}, sep='/')


def clip_model_params(original, tuned_vision):
  """FlaxCLIPModel params: `original` with its vision tower (vision_model and
  visual_projection) replaced by the MaskQueryCLIP tree `tuned_vision`; the text tower
  and logit_scale are the original's, untouched."""
  tuned = dict(jax.tree.map(np.asarray, tuned_vision))
  projection = tuned.pop('visual_projection')
  out = dict(original)
  out['vision_model'] = tuned
  out['visual_projection'] = projection
  return out


def make_optimizer(mcfg, total_steps: int, trainable) -> optax.GradientTransformation:
  """AdamW (config.mask_aware): poly decay from lr to 0, no warm-up, LayerNorms not decayed,
  full-model gradient-norm clipping (MAFT's detectron2 solver)."""
  schedule = optim.poly_schedule(mcfg.lr, total_steps, mcfg.poly_power)
  decay = {k: not optim.has_no_weight_decay(k) for k in trainable}
  return optax.chain(
      optax.clip_by_global_norm(mcfg.clip_norm) if mcfg.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=mcfg.weight_decay,
                  mask=decay))


# ---------------------------------------------------------------------------- the step


def make_train_step(config, seg_model, clip_cfg, projection_dim: int, optimizer):
  """Jitted step(state, frozen_clip, teacher_clip, seg_vars, batch, seg_text, text, scale)
  -> (state, metrics). state = {'params': trainable flat dict, 'opt_state', 'step'};
  seg_text: the segmenter's class embeddings [K, D] (its training prompts); text: CLIP's
  text embeddings of the same classes with the image branch's prompts [K, E]."""
  ecfg, mcfg = config.eval, config.mask_aware
  mean, std = config.model.pixel_mean, config.model.pixel_std
  mask_from = int(ecfg.get('one_pass_mask_from', 0))
  size = int(ecfg.get('one_pass_size', 0))
  ignore = int(config.dataset.ignore_value)
  student = one_pass.MaskQueryCLIP(clip_cfg, projection_dim, mask_from, with_cls=True)

  def proposals(seg_vars, images, seg_text):
    """[B, N, H, W] mask logits of the frozen segmenter's final decoder layer."""
    outputs = seg_model.apply(seg_vars, preprocess.normalize(images, mean, std), seg_text,
                              train=False)
    return inference.upsample_bilinear(outputs['pred_masks'][-1].astype(jnp.float32),
                                       images.shape[1:3])

  def step(state, frozen_clip, teacher_clip, seg_vars, batch, seg_text, text, scale):
    images = batch['image']
    num_classes = text.shape[0]
    mask_logits = jax.lax.stop_gradient(proposals(seg_vars, images, seg_text))
    label = batch['label'].astype(jnp.int32)
    label = jnp.where(label == ignore, -1, label)
    iou = soft_iou(jax.nn.sigmoid(mask_logits), label, num_classes)          # [B, N, K]
    present = class_areas(label, num_classes) > 0                          # [B, K]
    clip_images = one_pass.resize_to_grid(
        preprocess.normalize(images, clip.CLIP_PIXEL_MEAN, clip.CLIP_PIXEL_STD),
        clip_cfg.patch_size, size)
    _, teacher_cls = student.apply({'params': teacher_clip}, clip_images, mask_logits[:, :1])
    teacher = class_probs(teacher_cls, text, scale)

    def loss_fn(trainable):
      emb, cls = student.apply({'params': merge_params(trainable, frozen_clip)}, clip_images,
                               mask_logits)
      l_ma = mask_aware_loss(class_probs(emb, text, scale), iou, present)
      l_sd = distillation_loss(class_probs(cls, text, scale), teacher)
      return l_ma + mcfg.distill_weight * l_sd, {'loss_ma': l_ma, 'loss_sd': l_sd}

    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
    params = optim.keep_where(finite, optax.apply_updates(state['params'], updates),
                              state['params'])
    opt_state = optim.keep_where(finite, opt_state, state['opt_state'])
    metrics = dict(terms, loss=loss, grad_norm=optax.tree.norm(grads), finite=finite)
    return {'params': params, 'opt_state': opt_state, 'step': state['step'] + 1}, metrics

  return jax.jit(step, donate_argnums=(0,))


# ---------------------------------------------------------------------------- the loop


def output_dir(workdir: str) -> str:
  """<workdir>/mask_aware/clip: the tuned CLIP (a Hugging Face directory)."""
  return os.path.join(workdir, SUBDIR, CLIP_SUBDIR)


def settings(config) -> dict:
  """What a finished fine-tuning was made with: config.mask_aware and the one pass's
  eval.one_pass_size / one_pass_mask_from (a reused result must match them)."""
  return dict(mask_aware=config.mask_aware.to_dict(),
              one_pass_size=int(config.eval.get('one_pass_size', 0)),
              one_pass_mask_from=int(config.eval.get('one_pass_mask_from', 0)))


def check_config(config) -> None:
  mcfg = config.mask_aware
  is_trainable('', mcfg.get('trainable', 'maft'))   # an unknown choice fails here, named
  if int(mcfg.steps) <= 0 or int(mcfg.batch_size) <= 0:
    raise ValueError(f'config.mask_aware.steps ({mcfg.steps}) and batch_size '
                     f'({mcfg.batch_size}) must be positive')
  if jax.process_count() > 1:
    raise ValueError('mask-aware fine-tuning runs in one process (MAFT: 1000 steps of 16 '
                     f'images); this job has {jax.process_count()}: run --mode mask_aware on '
                     'one host')
  if not methods.has_segments(config.model) or methods.method_name(config.model) == 'zegclip':
    raise ValueError('mask-aware fine-tuning needs segment proposals: method '
                     f'{methods.method_name(config.model)!r} has none')


def finetune(config, workdir: str) -> dict:
  """MAFT fine-tuning of config.clip.model_path's image encoder on this workdir's proposals.

  Reads the latest ZegFormer checkpoint in `workdir` (the frozen mask generator) and the
  training split; writes <workdir>/mask_aware/clip and returns the summary (also in
  <workdir>/mask_aware/mask_aware_summary.json). A finished run is not redone.
  """
  check_config(config)
  mcfg = config.mask_aware
  out = output_dir(workdir)
  root = os.path.dirname(out)
  summary_file = os.path.join(root, STATS_FILE)
  if os.path.isfile(os.path.join(out, 'config.json')) and os.path.isfile(summary_file):
    with open(summary_file) as f:
      done = json.load(f)
    if done.get('settings') != settings(config):
      raise ValueError(
          f'{out} was tuned with other settings ({done.get("settings")}) than '
          f'config.mask_aware / eval.one_pass_* now ({settings(config)}); remove '
          f'{os.path.dirname(out)} to tune again')
    logging.info('mask-aware CLIP already in %s', out)
    return done

  data_dir = input_pipeline.data_dir(config)
  class_names, _ = input_pipeline.dataset_classes(data_dir, config.dataset.train_split)
  seg_model, seg_state = state_lib.load_latest_state(config, workdir, len(class_names))
  seg_vars = {'params': seg_state['params'], 'frozen': seg_state['frozen']}
  seg_text = jnp.asarray(clip.class_embeddings(config, workdir, class_names,
                                               config.clip.train_prompts))
  clip_text = jnp.asarray(clip.class_text_embeddings(config, workdir, class_names,
                                                     config.clip.image_prompts))
  clip_model, tokenizer = clip.load_clip(clip.clip_dir(config))
  scale = clip.clip_logit_scale(clip_model.params)
  teacher = prompted_vit.clip_params(clip_model.params)
  trainable, frozen = split_params(teacher, mcfg.get('trainable', 'maft'))
  # Its own buffers: the step donates the state, and the teacher keeps CLIP's weights.
  trainable = jax.tree.map(lambda x: jnp.array(x, copy=True), trainable)
  total = int(mcfg.steps)
  optimizer = make_optimizer(mcfg, total, trainable)
  step_fn = make_train_step(config, seg_model, clip_model.config.vision_config,
                            clip_model.config.projection_dim, optimizer)

  data_config = config.copy_and_resolve_references()
  with data_config.unlocked():
    data_config.input.global_batch_size = int(mcfg.batch_size)
  data_iter = input_pipeline.make_train_iterator(data_config, data_dir)
  state = {'params': trainable, 'opt_state': optimizer.init(trainable),
           'step': jnp.zeros((), jnp.int32)}
  ckpt = checkpoints.Checkpointer(root, keep=2, every=int(mcfg.checkpoint_every))
  if ckpt.latest_step() is not None:
    restored = ckpt.restore_latest(jax.tree.map(np.asarray, state), data_iter)
    if restored is None:
      raise checkpoints.CorruptCheckpointError(f'no intact checkpoint in {ckpt.directory}')
    _, state = restored
    logging.info('mask-aware fine-tuning: resuming at step %d', int(state['step']))

  t0, log, history = time.time(), max(1, total // 20), []
  step = int(state['step'])
  while step < total:
    batch = next(data_iter)
    batch = {k: batch[k] for k in ('image', 'label')}
    state, metrics = step_fn(state, frozen, teacher, seg_vars, batch, seg_text, clip_text,
                             scale)
    step += 1
    if step % log == 0 or step == total or not bool(metrics['finite']):
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not m['finite']:
        raise FloatingPointError(f'mask-aware fine-tuning: non-finite loss or gradient at '
                                 f'step {step} (loss_ma {m["loss_ma"]}, loss_sd {m["loss_sd"]}); '
                                 'the step was not applied')
      history.append(dict(step=step, **{k: m[k] for k in ('loss', 'loss_ma', 'loss_sd',
                                                           'grad_norm')}))
      logging.info('mask-aware step %d/%d: loss %.5f (ma %.5f, sd %.5f)', step, total,
                   m['loss'], m['loss_ma'], m['loss_sd'])
    ckpt.save(step, state, data_iter, force=step == total)
  ckpt.close()

  tuned = merge_params(jax.device_get(state['params']), frozen)
  write_clip_dir(clip_model, tokenizer, clip_model_params(clip_model.params, tuned), out)
  summary = dict(steps=total, batch_size=int(mcfg.batch_size), seconds=time.time() - t0,
                 settings=settings(config),
                 source_clip=clip.clip_dir(config), output=out, history=history)
  with open(summary_file + '.tmp', 'w') as f:
    json.dump(summary, f, indent=1)
  os.replace(summary_file + '.tmp', summary_file)
  return summary


def write_clip_dir(clip_model, tokenizer, params, path: str) -> None:
  """The CLIP `params` saved as a Hugging Face directory at `path` (what clip.load_clip
  reads), assembled beside it and renamed into place, so it is complete or absent."""
  tmp = path + '.tmp'
  shutil.rmtree(tmp, ignore_errors=True)
  clip_model.save_pretrained(tmp, params=params)
  tokenizer.save_pretrained(tmp)
  shutil.rmtree(path, ignore_errors=True)
  os.replace(tmp, path)
