"""Pixel-level zero-shot baselines: SPNet-FPN and ZS3Net's segmentation network.

Both read the same backbone and FPN pixel decoder as ZegFormer (`pixel_decoder.resnet_fpn`)
and classify every pixel of the stride-4 mask features:

  images -> ResNet -> BasePixelDecoder -> mask features F [B, H/4, W/4, mask_dim]
  head 'text' (SPNet-FPN, paper section 4.3; the official repository's
      ZeroshotPerPixelBaselineHead): 1x1 conv `projection` (c2_msra_fill) to the text width D,
      L2 normalised, logits = cos(f, T_c) / tau against the class text embeddings T (no
      no-object class, no learnable class weights: a new vocabulary is a new T);
  head 'learned' (ZS3Net, Bucher et al. 2019): a 1x1 conv `classifier` [mask_dim, K] with
      bias, trained on the seen classes; ZS3Net replaces it after training by one fit on real
      seen and generated unseen features (training/generative.py). K is the number of rows
      of the class embeddings handed in: their values are not used by this head.

Parameter naming (official key of ZeroshotPerPixelBaselineHead -> flax path):

  =============================================  ==========================================
  official (`sem_seg_head.` prefix)              flax path
  =============================================  ==========================================
  pixel_decoder.*                                pixel_decoder/... (pixel_decoder.py)
  projection_layer.weight [D, C, 1, 1] / .bias   projection/kernel [1, 1, C, D] / bias
  logit_scale (fixed, exp = 1 / temperature)     none: the constant 1 / config.temperature
  =============================================  ==========================================
"""
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from zegformer_jax.modeling.inference import upsample_bilinear
from zegformer_jax.modeling.pixel_decoder import conv1x1_as_matmul
from zegformer_jax.modeling.pixel_decoder import resnet_fpn
from zegformer_jax.modeling.resnet import Conv2d, c2_msra_fill
from zegformer_jax.modeling.zegformer import l2_normalize

HEADS = ('text', 'learned')


class PerPixelSegmenter(nn.Module):
  """ResNet + FPN + a per-pixel classification head (module docstring).

  Attributes:
    config: the `model` sub-config (backbone, pixel_decoder, temperature, dtype).
    head: 'text' (SPNet-FPN) or 'learned' (ZS3Net).
  """
  config: Any
  head: str = 'text'

  @nn.compact
  def __call__(self, images: jax.Array, text_embeddings: jax.Array, *,
               train: bool) -> Dict[str, jax.Array]:
    """Per-pixel class logits at stride 4.

    Args:
      images: [B, H, W, 3] float32, normalised and zero-padded; H, W multiples of 32.
      text_embeddings: [K, D] L2-normalised class embeddings (head 'text'); head 'learned'
        only reads K.
      train: unused (no dropout); the same signature as ZegFormer.

    Returns:
      'sem_seg_logits': [B, H/4, W/4, K] float32 logits;
      'pixel_features': [B, H/4, W/4, mask_dim] float32 mask features (what ZS3Net's
        generator learns to imitate).
    """
    del train
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    _, mask_features = resnet_fpn(cfg, images, dtype)
    if self.head == 'text':
      emb = Conv2d(text_embeddings.shape[-1], 1, use_bias=True, kernel_init=c2_msra_fill,
                   conv1x1_as_matmul=conv1x1_as_matmul(cfg), dtype=dtype,
                   name='projection')(mask_features)
      logits = pixel_text_logits(emb, text_embeddings, 1.0 / cfg.temperature)
    elif self.head == 'learned':
      logits = nn.Dense(text_embeddings.shape[0], dtype=dtype, name='classifier')(
          mask_features).astype(jnp.float32)
    else:
      raise ValueError(f'head must be one of {HEADS}, got {self.head!r}')
    return {'sem_seg_logits': logits, 'pixel_features': mask_features.astype(jnp.float32)}


def pixel_text_logits(pixel_embeddings: jax.Array, text_embeddings: jax.Array,
                      logit_scale: float) -> jax.Array:
  """SPNet's per-pixel zero-shot logits: logit_scale * cos(pixel embedding, T_c).

  Args:
    pixel_embeddings: [..., D] projected pixel features (not normalised).
    text_embeddings: [K, D] L2-normalised class embeddings.
    logit_scale: 1 / temperature (100 in the official head).
  Returns:
    [..., K] float32.
  """
  e = l2_normalize(pixel_embeddings.astype(jnp.float32))
  return logit_scale * jnp.einsum('...d,kd->...k', e, text_embeddings.astype(jnp.float32),
                                  precision=jax.lax.Precision.HIGHEST)


def pixel_cross_entropy(logits: jax.Array, label: jax.Array, ignore_value: int) -> tuple:
  """The per-pixel loss of both baselines (official head's `losses`).

  The stride-4 logits are upsampled bilinearly (align_corners=False) to the label's padded
  size, then softmax cross-entropy over K, mean over the pixels whose label is not
  `ignore_value` (torch F.cross_entropy with ignore_index, reduction 'mean').

  Args:
    logits: [B, h, w, K] float32 at stride 4.
    label: [B, H, W] int32, H = 4h, W = 4w, values 0..K-1 or ignore_value.
    ignore_value: the ignored label.
  Returns:
    (loss scalar, {'loss_sem_seg': loss, 'valid_pixels': count}).
  """
  up = upsample_bilinear(jnp.moveaxis(logits.astype(jnp.float32), -1, 1), label.shape[1:3])
  logp = jax.nn.log_softmax(up, axis=1)                                   # [B, K, H, W]
  valid = label != ignore_value
  safe = jnp.where(valid, label, 0)
  nll = -jnp.take_along_axis(logp, safe[:, None], axis=1)[:, 0]            # [B, H, W]
  count = jnp.sum(valid)
  loss = jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1)
  return loss, {'loss_sem_seg': loss, 'valid_pixels': count.astype(jnp.float32)}


def pixel_scores(logits: jax.Array, out_hw, impl: str = 'matmul') -> jax.Array:
  """Per-pixel class probabilities [B, K, H, W] at the padded input size `out_hw`.

  The official inference: logits upsampled x4 (bilinear; `impl` as in upsample_bilinear),
  softmax over the classes; the caller crops, resizes and calibrates (Eq. 2) as for
  ZegFormer.
  """
  up = upsample_bilinear(jnp.moveaxis(logits.astype(jnp.float32), -1, 1), out_hw, impl)
  return jax.nn.softmax(up, axis=1)
