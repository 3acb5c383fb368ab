"""Oracle diagnostics of ZegFormer's decoupling: which half fails, grouping or classification.

ZegFormer decouples zero-shot segmentation into class-agnostic grouping (Q segment masks)
and segment-level classification. Each oracle replaces one half by the ground truth and
keeps the other; the label images are scored like the evaluator's predictions
(`metrics.confusion_matrix` per batch, summed over the split on the host, then
`metrics.compute_metrics`). All functions are jittable with static shapes; `num_classes`
and `ignore_value` are static Python ints.

Labelled pixels are those with a label in [0, K); the ignore value (and any other label
outside [0, K), which `confusion_matrix` reports as a label / class-list mismatch) is
excluded from every vote below. Ties in a vote go to the lowest index (argmax).

Grouping oracle (ground-truth classes on predicted masks; the classification half made
perfect, measures the grouping):
  segment of query q = pixels where q wins argmax_q mask_logits[q] (sigmoid is monotone),
    or, with `query_scores` [B, Q] (e.g. max over the K classes of the query's class
    probabilities, no-object excluded), argmax_q sigmoid(mask_logits[q]) * query_scores[q];
  class of query q = the majority ground-truth class among the labelled pixels of its
    segment; every pixel of the segment gets it.
  A query whose segment has no labelled pixel gets `ignore_value`. The segments partition
  the image, so such a segment holds only excluded pixels: it never affects conf[:K, :K]
  (its ignore pixels are dropped from the excluded column, which the metrics do not read).

Classification oracle (predicted classes on ground-truth masks; the grouping made perfect,
measures the classification):
  ground-truth segment (b, g) = the pixels of image b labelled g;
  its class = argmax_c sum over the segment's pixels of scores[b, c, pixel] (a soft vote of
    the per-pixel scores, e.g. the evaluator's calibrated semantic scores; not the majority
    of the per-pixel argmax). Every pixel of the segment gets it; excluded pixels get
    `ignore_value`.
"""
from typing import Optional

import jax
import jax.numpy as jnp

from zegformer_jax.evaluation import metrics


def query_segments(mask_logits: jnp.ndarray,
                   query_scores: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Winning query per pixel: [B, Q, H, W] mask logits (+ optional [B, Q]) -> int32 [B, H, W]."""
  if query_scores is None:
    return jnp.argmax(mask_logits, axis=1).astype(jnp.int32)
  weighted = jax.nn.sigmoid(mask_logits) * query_scores[:, :, None, None]
  return jnp.argmax(weighted, axis=1).astype(jnp.int32)


def _labelled(label: jnp.ndarray, num_classes: int):
  label = label.astype(jnp.int32)
  ok = (label >= 0) & (label < num_classes)
  return jnp.where(ok, label, 0), ok


def grouping_oracle_labels(mask_logits: jnp.ndarray, label: jnp.ndarray, num_classes: int,
                           ignore_value: int,
                           query_scores: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Ground-truth classes assigned to the predicted masks (module docstring).

  Args:
    mask_logits: [B, Q, H, W] float, the queries' mask logits at label resolution.
    label: [B, H, W] int ground truth, `ignore_value` where unlabelled (incl. padding).
    num_classes: K (static).
    ignore_value: the label's ignore value (static); also the output of queries without
      labelled pixels.
    query_scores: optional [B, Q] float weights of the queries in the pixel assignment.
  Returns:
    int32 [B, H, W] predicted class per pixel.
  """
  b, q, h, w = mask_logits.shape
  k = int(num_classes)
  seg = query_segments(mask_logits, query_scores)                       # [B, H, W]
  cls, ok = _labelled(label, k)
  index = (jnp.arange(b, dtype=jnp.int32)[:, None, None] * q + seg) * k + cls
  counts = jnp.bincount(index.reshape(-1), weights=ok.reshape(-1).astype(jnp.int32),
                        length=b * q * k).reshape(b, q, k)
  query_class = jnp.where(counts.sum(-1) > 0, jnp.argmax(counts, axis=-1).astype(jnp.int32),
                          jnp.int32(ignore_value))                      # [B, Q]
  return jnp.take_along_axis(query_class, seg.reshape(b, h * w), axis=1).reshape(b, h, w)


def classification_oracle_labels(scores: jnp.ndarray, label: jnp.ndarray, num_classes: int,
                                 ignore_value: int) -> jnp.ndarray:
  """Predicted classes assigned to the ground-truth masks (module docstring).

  Args:
    scores: [B, K, H, W] float per-pixel class scores at label resolution.
    label: [B, H, W] int ground truth, `ignore_value` where unlabelled (incl. padding).
    num_classes: K (static), must equal scores.shape[1].
    ignore_value: the label's ignore value (static); the output on excluded pixels.
  Returns:
    int32 [B, H, W] predicted class per pixel.
  """
  b, k, h, w = scores.shape
  if k != int(num_classes):
    raise ValueError(f'scores have {k} classes, num_classes is {num_classes}')
  cls, ok = _labelled(label, k)
  # Segment id b * K + g of each labelled pixel; excluded pixels go to a dump segment b * K.
  seg_id = jnp.where(ok, jnp.arange(b, dtype=jnp.int32)[:, None, None] * k + cls, b * k)
  data = jnp.moveaxis(scores, 1, -1).reshape(b * h * w, k)
  sums = jax.ops.segment_sum(data, seg_id.reshape(-1), num_segments=b * k + 1)
  assign = jnp.argmax(sums[:b * k].reshape(b, k, k), axis=-1).astype(jnp.int32)  # [B, G]
  out = jnp.take_along_axis(assign, cls.reshape(b, h * w), axis=1).reshape(b, h, w)
  return jnp.where(ok, out, jnp.int32(ignore_value))


def grouping_oracle_confusion(mask_logits, label, num_classes: int, ignore_value: int,
                              valid=None, query_scores=None) -> jnp.ndarray:
  """[K+1, K+1] int32 `metrics.confusion_matrix` of the grouping oracle on one batch."""
  pred = grouping_oracle_labels(mask_logits, label, num_classes, ignore_value, query_scores)
  return metrics.confusion_matrix(pred, label, num_classes, ignore_value, valid)


def classification_oracle_confusion(scores, label, num_classes: int, ignore_value: int,
                                    valid=None) -> jnp.ndarray:
  """[K+1, K+1] int32 `metrics.confusion_matrix` of the classification oracle on one batch."""
  pred = classification_oracle_labels(scores, label, num_classes, ignore_value)
  return metrics.confusion_matrix(pred, label, num_classes, ignore_value, valid)
