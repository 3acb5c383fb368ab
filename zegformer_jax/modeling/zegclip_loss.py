"""ZegCLIP's non-mutually-exclusive loss: per-class sigmoid focal + dice (no softmax).

As ZegCLIP's SegPlusCriterion (criterion.py) computes it, for mask logits upsampled to the
label's resolution:

  focal = sum over (image, class) of mean over pixels of sigmoid_focal(x, y; α 0.25, γ 2)
          / num_masks, over every training class of every image;
  dice  = sum over the classes present in each image of 1 - (2 Σ p y + 1) / (Σ p + Σ y + 1)
          / num_masks, p = sigmoid(x);
  num_masks = the number of (image, class) pairs present, at least 1;
  loss = 100 · focal + 1 · dice  (mask_weight, dice_weight of its configs).

y is the one-hot label. Pixels with the ignore value (VOC's 255, and every unseen-class
pixel in inductive training) have no positive class: they stay in both terms as negatives
of every class, as in ZegCLIP (its "TODO use valid"). Padding beyond each label's own size
is left out when `valid_pixels` is given (ZegCLIP pads with 255, which makes it a negative;
`valid_pixels=None` reproduces that).
"""
from typing import Optional

import jax
import jax.numpy as jnp


def sigmoid_focal(logits, targets, alpha: float = 0.25, gamma: float = 2.0):
  """Elementwise sigmoid focal loss (Lin et al. 2017), the form of detectron2's fvcore."""
  p = jax.nn.sigmoid(logits)
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * (1 - p_t) ** gamma
  return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


def zegclip_loss(mask_logits, label, num_classes: int, ignore_value: int,
                 valid_pixels: Optional[jnp.ndarray] = None, *, focal_weight: float = 100.0,
                 dice_weight: float = 1.0, alpha: float = 0.25, gamma: float = 2.0):
  """The loss of a batch.

  Args:
    mask_logits: [B, H, W, C] float, at the label's resolution.
    label: [B, H, W] int class ids in [0, C) or `ignore_value`.
    num_classes: C.
    ignore_value: the unlabelled value.
    valid_pixels: optional [B, H, W] bool; False pixels (padding) are left out entirely.
  Returns:
    (loss scalar, {'loss_focal', 'loss_dice', 'num_masks'}).
  """
  logits = mask_logits.astype(jnp.float32)
  onehot = jax.nn.one_hot(jnp.where(label == ignore_value, -1, label), num_classes,
                          dtype=jnp.float32)                             # ignore -> all zeros
  if valid_pixels is None:
    valid_pixels = jnp.ones(label.shape, bool)
  v = valid_pixels.astype(jnp.float32)[..., None]                        # [B, H, W, 1]
  present = (jnp.sum(onehot * v, axis=(1, 2)) > 0).astype(jnp.float32)    # [B, C]
  num_masks = jnp.maximum(jnp.sum(present), 1.0)
  n_pix = jnp.maximum(jnp.sum(v, axis=(1, 2)), 1.0)                       # [B, 1]
  focal = jnp.sum(jnp.sum(sigmoid_focal(logits, onehot, alpha, gamma) * v, axis=(1, 2))
                  / n_pix) / num_masks
  p = jax.nn.sigmoid(logits) * v
  inter = jnp.sum(p * onehot, axis=(1, 2))
  dice = 1 - (2 * inter + 1) / (jnp.sum(p, axis=(1, 2)) + jnp.sum(onehot * v, axis=(1, 2)) + 1)
  dice = jnp.sum(dice * present) / num_masks
  loss = focal_weight * focal + dice_weight * dice
  return loss, {'loss_focal': focal, 'loss_dice': dice, 'num_masks': num_masks}
