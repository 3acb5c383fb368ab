"""Semantic-segmentation metrics of the GZS3 evaluation (docs/reference.md section 6).

The official `SemSegGzeroEvaluator` is detectron2's `SemSegEvaluator` plus seen / unseen
means and their harmonic mean. This module has two halves:

  * `confusion_matrix`: jittable, static-shape, on device. One batch of argmax predictions
    and labels becomes a [K+1, K+1] int32 count matrix that the caller sums over the split.
  * `compute_metrics` / `write_metrics_json`: host-side numpy on the summed matrix.

Confusion-matrix layout (detectron2's): rows = prediction, columns = ground truth, index K
is the extra "excluded" bin.
  conf[:K, :K]   counted pixels: conf[p, g] = #pixels predicted p whose label is g.
  conf[:K, K]    pixels whose label is the ignore value (bucketed by their prediction).
  conf[K, :K]    pixels whose prediction is outside [0, K) (argmax cannot produce them;
                 any count here is a bug upstream).
  conf[K, K]     pixels whose label is neither the ignore value nor in [0, K): a label /
                 class-list mismatch. They are excluded like ignore pixels but counted here,
                 so it is not silent; `compute_metrics` raises if this (or conf[K, :K]) is
                 non-zero (`check_confusion`).
Examples whose `valid` flag is False (batch padding) contribute nothing at all.

Only conf[:K, :K] enters the metrics. Per class c (detectron2 `SemSegEvaluator.evaluate`):
  tp = conf[c, c], pos_gt = sum_p conf[p, c], pos_pred = sum_g conf[c, g]
  acc_valid = pos_gt > 0;  iou_valid = pos_gt + pos_pred > 0
  Acc_c = tp / pos_gt,  IoU_c = tp / (pos_gt + pos_pred - tp)   (for acc_valid classes)
  mAcc  = mean of Acc over acc_valid
  mIoU  = sum(IoU over acc_valid) / #iou_valid   -- a class that is predicted but has no
          ground truth adds 0 to the numerator and 1 to the denominator
  fwIoU = sum(IoU_c * pos_gt_c / sum(pos_gt)) over acc_valid
  pAcc  = sum(tp) / sum(pos_gt)
GZS3 additions: mIoU_seen / mIoU_unseen are plain means of IoU over the seen / unseen classes
that have ground truth (the official mean is NaN-unsafe: a seen class without ground truth
makes it NaN; here such classes are skipped), hIoU = 2 S U / (S + U).
All values are percentages (0-100). Undefined values are None (JSON null), never NaN.
"""
import json
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence

import jax.numpy as jnp
import numpy as np


def confusion_matrix(pred: jnp.ndarray, label: jnp.ndarray, num_classes: int,
                     ignore_value: int, valid: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """Per-batch confusion counts, on device (jittable; `num_classes` is static).

  Args:
    pred: [B, H, W] int, predicted class per pixel (argmax over K channels).
    label: [B, H, W] int, ground-truth train id per pixel; `ignore_value` where unlabelled
      (including the padding beyond each label's own size).
    num_classes: K (static Python int).
    ignore_value: label value that marks pixels to exclude (255, or 65535 for ADE).
    valid: optional [B] bool; examples with False (batch padding) are not counted.
  Returns:
    [K+1, K+1] int32, rows = prediction, columns = ground truth; layout of the excluded
    bin K in the module docstring. Sum over batches on the host in int64 if the split has
    more than ~2e9 pixels of one (pred, gt) pair.
  """
  k = int(num_classes)
  pred = pred.astype(jnp.int32)
  label = label.astype(jnp.int32)
  if valid is None:
    valid = jnp.ones(label.shape[:1], bool)
  example_ok = jnp.broadcast_to(valid.astype(bool)[:, None, None], label.shape)
  label_in = (label >= 0) & (label < k)
  label_ignored = label == jnp.int32(ignore_value)
  # Labels that are neither a class nor the ignore value: a data / class-list mismatch.
  label_bad = ~label_in & ~label_ignored
  pred_in = (pred >= 0) & (pred < k)
  # Column: the class, or K for ignore and bad labels. Row: the prediction, or K for
  # predictions out of range and for bad labels (so bad labels land in [K, K] only).
  gt_bin = jnp.where(label_in, label, k)
  pred_bin = jnp.where(pred_in & ~label_bad, pred, k)
  # A bad prediction on an ignore pixel is dropped: the pixel is excluded either way, and
  # keeping it would put it into [K, K], which is reserved for bad labels.
  counted = example_ok & ~(~pred_in & label_ignored)
  index = pred_bin * (k + 1) + gt_bin
  counts = jnp.bincount(index.reshape(-1), weights=counted.reshape(-1).astype(jnp.int32),
                        length=(k + 1) * (k + 1))
  return counts.astype(jnp.int32).reshape(k + 1, k + 1)


def check_confusion(conf: np.ndarray) -> None:
  """Raises ValueError if the excluded bin holds bad labels or out-of-range predictions."""
  conf = np.asarray(conf)
  k = conf.shape[0] - 1
  bad_labels = int(conf[k, k])
  bad_preds = int(np.sum(conf[k, :k]))
  if bad_labels or bad_preds:
    raise ValueError(
        f'confusion matrix: {bad_labels} pixels have labels outside [0, {k}) that are not '
        f'the ignore value, {bad_preds} pixels have predictions outside [0, {k}); check '
        'the label encoding / class list of the evaluated split')


def _pct(x: float) -> Optional[float]:
  """100 * x as a Python float, or None where undefined (NaN)."""
  x = float(x)
  return None if not np.isfinite(x) else 100.0 * x


def compute_metrics(conf: np.ndarray, class_names: Sequence[str], seen_mask: np.ndarray,
                    dataset: str, variant: str, num_images: int) -> Dict[str, Any]:
  """Metrics of a summed confusion matrix (definitions in the module docstring).

  Args:
    conf: [K+1, K+1] counts in the `confusion_matrix` layout (a [K, K] matrix without the
      excluded bin is accepted too).
    class_names: K names, in train-id order.
    seen_mask: [K] bool, True for seen classes.
    dataset, variant: recorded as given ('seg' | 'img' | 'full' for the variant).
    num_images: number of evaluated images, recorded as given.
  Returns:
    {"dataset", "variant", "num_images", "mIoU", "mIoU_seen", "mIoU_unseen", "hIoU",
     "pAcc", "mAcc", "fwIoU", "per_class": [{"name", "split", "IoU", "Acc"}]} with
    percentages in 0-100; None where a value is undefined (per-class IoU / Acc of a class
    without ground truth, seen / unseen means without such classes, everything when the
    matrix is empty).
  Raises:
    ValueError on shape mismatches and if the excluded bin records bad labels/predictions.
  """
  conf = np.asarray(conf, dtype=np.int64)
  k = len(class_names)
  seen_mask = np.asarray(seen_mask, dtype=bool).reshape(-1)
  if seen_mask.shape != (k,):
    raise ValueError(f'seen_mask has {seen_mask.size} entries for {k} classes')
  if conf.shape == (k + 1, k + 1):
    check_confusion(conf)
    conf = conf[:k, :k]
  elif conf.shape != (k, k):
    raise ValueError(f'confusion matrix of shape {conf.shape} for {k} classes')

  conf = conf.astype(np.float64)
  tp = np.diag(conf)
  pos_gt = conf.sum(axis=0)
  pos_pred = conf.sum(axis=1)
  acc_valid = pos_gt > 0
  iou_valid = (pos_gt + pos_pred) > 0
  acc = np.full(k, np.nan)
  iou = np.full(k, np.nan)
  acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
  union = pos_gt + pos_pred - tp
  iou[acc_valid] = tp[acc_valid] / union[acc_valid]

  total_gt = pos_gt.sum()
  with np.errstate(invalid='ignore', divide='ignore'):
    macc = np.sum(acc[acc_valid]) / np.sum(acc_valid) if acc_valid.any() else np.nan
    miou = np.sum(iou[acc_valid]) / np.sum(iou_valid) if iou_valid.any() else np.nan
    fwiou = (np.sum(iou[acc_valid] * pos_gt[acc_valid] / total_gt)
             if total_gt > 0 else np.nan)
    pacc = np.sum(tp) / total_gt if total_gt > 0 else np.nan

  def split_mean(sel):
    # Plain mean over the classes of the split that have ground truth (NaN-safe).
    sel = sel & acc_valid
    return float(np.mean(iou[sel])) if sel.any() else np.nan

  s = _pct(split_mean(seen_mask))
  u = _pct(split_mean(~seen_mask))
  if s is None or u is None:
    h = None
  elif s + u == 0:
    h = 0.0
  else:
    h = 2.0 * s * u / (s + u)

  per_class: List[Dict[str, Any]] = []
  for c, name in enumerate(class_names):
    per_class.append({
        'name': str(name),
        'split': 'seen' if seen_mask[c] else 'unseen',
        'IoU': _pct(iou[c]),
        'Acc': _pct(acc[c]),
    })
  return {
      'dataset': str(dataset),
      'variant': str(variant),
      'num_images': int(num_images),
      'mIoU': _pct(miou),
      'mIoU_seen': s,
      'mIoU_unseen': u,
      'hIoU': h,
      'pAcc': _pct(pacc),
      'mAcc': _pct(macc),
      'fwIoU': _pct(fwiou),
      'per_class': per_class,
  }


def write_metrics_json(metrics: Dict[str, Any], path: str) -> None:
  """Writes `metrics` as JSON to `path` atomically (temporary file + os.replace).

  Readers never see a half-written file; NaN / Infinity are refused (allow_nan=False) so the
  output is strict JSON (undefined values must already be None).
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp',
                             dir=directory)
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(metrics, f, indent=2, allow_nan=False)
      f.write('\n')
      f.flush()
      os.fsync(f.fileno())
    # mkstemp creates the file 0600; metrics are meant to be read by others too.
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
