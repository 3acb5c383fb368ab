"""ZegFormer inference maths: Eq. 2 and Eq. 3 of the paper, sub-images for CLIP, resizing.

Everything is jittable with static shapes and follows what the official code does
(docs/reference.md section 3), which fixes details the paper leaves
open:

  * p_q(c), segment classification (Eq. 1 logits): softmax over K+1, no-object dropped
    (`segment_probs`).
  * p'_q(c), image classification: CLIP logits of the segment's sub-image with the
    segmentation branch's no-object logit appended, softmax over K+1, no-object dropped
    (`subimages`, `image_branch_probs`).
  * Eq. 3 fusion (`fuse`), lambda = 2/3, no renormalisation.
  * Per-pixel scores sum_q p_q(c) sigmoid(m_q[h, w]) at the padded input size
    (`semantic_inference`), then crop to the resized image and bilinear resize to the label
    size (`postprocess`), then Eq. 2 calibration on the per-pixel map (`calibrate`); the
    caller takes the argmax over the K channels.

All bilinear resizes are torch `F.interpolate(mode='bilinear', align_corners=False)` without
antialiasing: half-pixel centres, source coordinates below 0 clamped to 0, the last row /
column repeated at the far edge. Two implementations compute them (`RESIZE_IMPLS`,
config.eval.resize_impl): 'matmul', jax.image's dense [out, in] kernel matrices, and 'taps',
torch's own two source pixels per output pixel and axis. They agree to float32 rounding;
'taps' does O(out) work per row where 'matmul' does O(out x in): 0.4 GFLOP against 92 for
171 score maps at 512 x 512 (BENCHMARKS.md).

Layouts: class-probability tensors are [B, Q, K]; mask logits [B, Q, H, W]; per-pixel score
maps [B, K, H, W]; images channels-last [B, H, W, 3].
"""
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
STYLES = ('crop', 'mask', 'cropmask')
RESIZE_IMPLS = ('matmul', 'taps')


# ----------------------------------------------------------------------------
# Class probabilities.


def segment_probs(pred_logits: jnp.ndarray) -> jnp.ndarray:
  """p_q(c) of the segmentation branch (Eq. 1 logits).

  Args:
    pred_logits: [B, Q, K+1] class logits, no-object last.
  Returns:
    [B, Q, K]: softmax over all K+1 entries with the no-object column dropped (so the rows
    sum to 1 - p(no-object), not to 1).
  """
  return jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]


def image_branch_probs(clip_logits: jnp.ndarray,
                       seg_no_object_logit: jnp.ndarray) -> jnp.ndarray:
  """p'_q(c) of the image branch (docs/reference.md section 3, steps 4-5).

  The official code appends the segmentation branch's raw no-object logit to the CLIP
  logits before the softmax, so a query the segmenter calls "no object" also gets small
  image-branch probabilities.

  Args:
    clip_logits: [B, Q, K] CLIP logit scale x cos(image embedding of the sub-image, text).
    seg_no_object_logit: [B, Q] the last column of the segmentation branch's pred_logits.
  Returns:
    [B, Q, K]: softmax over [clip_logits, no-object] (K+1) with the last column dropped.
  """
  logits = jnp.concatenate(
      [clip_logits.astype(jnp.float32),
       seg_no_object_logit.astype(jnp.float32)[..., None]], axis=-1)
  return jax.nn.softmax(logits, axis=-1)[..., :-1]


def fuse(p_seg: jnp.ndarray, p_img: jnp.ndarray, seen_mask: jnp.ndarray,
         lam: float = 2.0 / 3.0) -> jnp.ndarray:
  """Eq. 3: per-query fusion of the segmentation and image branches.

    seen c:   p_seg(c)^lam       * p_avg^(1 - lam),   p_avg = mean_{j in S} p_img(j)
    unseen c: p_seg(c)^(1 - lam) * p_img(c)^lam

  As in the official code: the image branch enters seen classes only through its mean
  over the seen classes (so it cannot reorder them), lam = 2/3 by default, and the result
  is not renormalised.

  Args:
    p_seg: [B, Q, K] segment probabilities (`segment_probs`).
    p_img: [B, Q, K] image-branch probabilities (`image_branch_probs`).
    seen_mask: [K] bool, True for seen classes S.
    lam: lambda of Eq. 3.
  Returns:
    [B, Q, K] fused scores p_{q,fusion}(c).
  """
  seen = jnp.asarray(seen_mask).astype(bool)
  p_seg = p_seg.astype(jnp.float32)
  p_img = p_img.astype(jnp.float32)
  num_seen = jnp.maximum(jnp.sum(seen), 1).astype(jnp.float32)
  p_avg = jnp.sum(jnp.where(seen, p_img, 0.0), axis=-1, keepdims=True) / num_seen
  fused_seen = jnp.power(p_seg, lam) * jnp.power(p_avg, 1.0 - lam)
  fused_unseen = jnp.power(p_seg, 1.0 - lam) * jnp.power(p_img, lam)
  return jnp.where(seen, fused_seen, fused_unseen)


# ----------------------------------------------------------------------------
# Per-pixel scores.


def semantic_inference(class_probs: jnp.ndarray, mask_logits: jnp.ndarray) -> jnp.ndarray:
  """Per-pixel class scores sum_q p_q(c) * sigmoid(m_q[h, w]) (the sum inside Eq. 2).

  Args:
    class_probs: [B, Q, K] per-query scores (p_q, p'_q or the Eq. 3 fusion).
    mask_logits: [B, Q, H, W] mask logits.
  Returns:
    [B, K, H, W] float32.
  """
  return jnp.einsum('bqk,bqhw->bkhw', class_probs.astype(jnp.float32),
                    jax.nn.sigmoid(mask_logits.astype(jnp.float32)), precision=_HIGHEST)


def calibrate(scores: jnp.ndarray, seen_mask: jnp.ndarray, gamma) -> jnp.ndarray:
  """Eq. 2 calibration: scores - gamma * 1[c in S].

  Applied, as in the official code, to the per-pixel score map after aggregation over the
  queries and after `postprocess`, not to segment probabilities. The official switch is
  `if gamma > 0`, so gamma <= 0 (configs use -1 for "off") leaves the scores unchanged.

  Args:
    scores: [..., K, H, W] per-pixel scores.
    seen_mask: [K] bool.
    gamma: calibration factor (Python float or scalar array).
  Returns:
    scores with gamma subtracted from the seen-class channels; same shape and dtype.
  """
  gamma = jnp.asarray(gamma, scores.dtype)
  gamma = jnp.where(gamma > 0, gamma, jnp.zeros_like(gamma))
  seen = jnp.asarray(seen_mask).astype(scores.dtype)[:, None, None]
  return scores - gamma * seen


# ----------------------------------------------------------------------------
# Resizing.


def check_resize_impl(impl: str) -> str:
  """impl if it is one of RESIZE_IMPLS, else a ValueError naming config.eval.resize_impl."""
  if impl not in RESIZE_IMPLS:
    raise ValueError(f'config.eval.resize_impl must be one of {RESIZE_IMPLS}, got {impl!r}')
  return impl


def linear_taps(start, n: int, size_in, size_out):
  """torch's bilinear taps (align_corners=False) along one axis.

  For the output positions start + [0, n) of an axis of size_out resampled from size_in:
  source coordinate (d + 0.5) * size_in / size_out - 0.5, clamped to [0, size_in - 1].
  Sizes and start may be traced (per-example sizes under vmap); positions at or beyond
  size_out read the last source pixel (finite don't-care values).

  Returns:
    (lo, hi, w): lo, hi [n] int32 source indices, w [n] float32 the weight of hi (lo's is
    1 - w).
  """
  size_in = jnp.asarray(size_in, jnp.int32)
  size_out = jnp.asarray(size_out, jnp.int32)
  pos = start + jnp.arange(n)
  src = (pos.astype(jnp.float32) + 0.5) * (size_in / size_out) - 0.5
  src = jnp.clip(src, 0.0, (size_in - 1).astype(jnp.float32))
  lo = jnp.floor(src).astype(jnp.int32)
  return lo, jnp.minimum(lo + 1, size_in - 1), src - lo


def bilinear_taps(x: jnp.ndarray, rows, cols) -> jnp.ndarray:
  """x [..., H, W] sampled at the taps `rows` and `cols` (`linear_taps`) -> [..., n_rows,
  n_cols]: each output pixel is the two-by-two lerp of its source pixels, along the width
  first (the order tools/predict.py has always used)."""
  y0, y1, fy = rows
  x0, x1, fx = cols
  rows0, rows1 = x[..., y0, :], x[..., y1, :]                       # [..., n_rows, W]
  top = rows0[..., x0] * (1 - fx) + rows0[..., x1] * fx             # [..., n_rows, n_cols]
  bottom = rows1[..., x0] * (1 - fx) + rows1[..., x1] * fx
  return top * (1 - fy)[:, None] + bottom * fy[:, None]


def upsample_bilinear(x: jnp.ndarray, out_hw: Tuple[int, int],
                      impl: str = 'matmul') -> jnp.ndarray:
  """Bilinear resize of the last two axes (torch F.interpolate, align_corners=False).

  `jax.image.resize(method='bilinear', antialias=False)` samples at the same half-pixel
  source coordinates (d + 0.5) * in / out - 0.5 with a width-1 triangle kernel; at the array
  edges it renormalises the kernel over the existing pixels, which equals torch's clamping
  of the source coordinate when upsampling (tests check this against a numpy port of
  torch's rule). Used for mask logits in the losses and at inference.

  Args:
    x: [..., h, w].
    out_hw: static (H, W), each >= the input size (e.g. the padded input size, 4h x 4w).
    impl: 'matmul' (jax.image.resize) or 'taps' (`bilinear_taps`); see the module doc.
  Returns:
    [..., H, W], x's dtype.
  """
  out_h, out_w = (int(s) for s in out_hw)
  if check_resize_impl(impl) == 'taps':
    h, w = x.shape[-2:]
    if out_h % h == 0 and out_w % w == 0:   # e.g. mask logits at stride 4: no gathers
      return _upsample_by_factor(_upsample_by_factor(x, x.ndim - 1, out_w // w),
                                 x.ndim - 2, out_h // h)
    return bilinear_taps(x, linear_taps(0, out_h, h, out_h),
                         linear_taps(0, out_w, w, out_w)).astype(x.dtype)
  return jax.image.resize(x, x.shape[:-2] + (out_h, out_w), method='bilinear',
                          antialias=False)


def _upsample_by_factor(x: jnp.ndarray, axis: int, f: int) -> jnp.ndarray:
  """torch's bilinear upsampling of one axis by an integer factor f, as shifted slices.

  Output f * i + k reads source i + o_k, o_k = (k + 0.5) / f - 0.5 in (-0.5, 0.5): the lerp of
  pixels i - 1 and i (o_k < 0) or i and i + 1, with the same weights `linear_taps` gives;
  the edge pixel stands in for the missing neighbour, as torch's clamping does. The f
  phases are stacked after `axis` and merged into it: elementwise work only, where the
  gathers of `bilinear_taps` made XLA:CPU's consumers of the result slower (BENCHMARKS.md).
  """
  if f == 1:
    return x
  n = x.shape[axis]
  edge = lambda i: jax.lax.slice_in_dim(x, i, i + 1, axis=axis)
  padded = jnp.concatenate([edge(0), x, edge(n - 1)], axis=axis)
  prev = jax.lax.slice_in_dim(padded, 0, n, axis=axis)
  nxt = jax.lax.slice_in_dim(padded, 2, n + 2, axis=axis)
  phases = []
  for k in range(f):
    o = (k + 0.5) / f - 0.5
    lo, hi, w = (prev, x, 1 + o) if o < 0 else (x, nxt, o)
    phases.append(lo * jnp.asarray(1 - w, x.dtype) + hi * jnp.asarray(w, x.dtype))
  shape = list(x.shape)
  shape[axis] = n * f
  return jnp.stack(phases, axis=axis + 1).reshape(shape)


def resize_valid(x: jnp.ndarray, in_hw: jnp.ndarray, out_hw: jnp.ndarray,
                 out_shape: Tuple[int, int], spatial_axes: Tuple[int, int],
                 antialias: bool = False, impl: str = 'matmul') -> jnp.ndarray:
  """Per-example bilinear resize of the valid region x[:ih, :iw] to [:oh, :ow].

  `jax.image.scale_and_translate` (vmapped, scale = out_hw / in_hw per example) only clamps
  at the edges of the *padded* array, so the padding is masked out and the result divided by
  the resize of the validity mask (normalised convolution): the kernel weights are
  separable, so this renormalises each output pixel's weights over the valid region exactly
  as clamping the source coordinate at the crop edge does (torch, Pillow).

  Args:
    x: [B, ...] with two spatial axes (per example, i.e. counting the batch axis).
    in_hw: [B, 2] int valid (h, w) of each example.
    out_hw: [B, 2] int target (h, w), each <= out_shape.
    out_shape: static padded (H, W) of the result.
    spatial_axes: the (height, width) axes of x, e.g. (1, 2) for [B, H, W, C].
    antialias: widen the kernel when shrinking (Pillow's resize), else sample as
      torch F.interpolate(align_corners=False).
    impl: 'matmul' (the normalised convolution above) or 'taps' (torch's two taps per
      axis, clamped at the valid region's edge: `linear_taps`); 'taps' needs antialias
      False and the spatial axes last.
  Returns:
    float32 x resized; entries beyond out_hw are don't-care (finite).
  """
  if check_resize_impl(impl) == 'taps':
    if antialias or tuple(spatial_axes) != (x.ndim - 2, x.ndim - 1):
      raise ValueError('resize_valid(impl="taps") resizes the last two axes without '
                       f'antialiasing; got spatial_axes {tuple(spatial_axes)} of a '
                       f'{x.ndim}-d array, antialias={antialias}')
    oh, ow = (int(v) for v in out_shape)

    def one_taps(e, ihw, ohw):
      return bilinear_taps(e, linear_taps(0, oh, ihw[0], jnp.maximum(ohw[0], 1)),
                           linear_taps(0, ow, ihw[1], jnp.maximum(ohw[1], 1)))

    in_hw = jnp.maximum(jnp.asarray(in_hw, jnp.int32), 1)   # as the matmul path's
    return jax.vmap(one_taps)(x.astype(jnp.float32), in_hw, jnp.asarray(out_hw, jnp.int32))

  ah, aw = (a - 1 for a in spatial_axes)  # axes within one example
  hp, wp = x.shape[spatial_axes[0]], x.shape[spatial_axes[1]]
  oh, ow = (int(v) for v in out_shape)
  ex_shape = list(x.shape[1:])
  ex_shape[ah], ex_shape[aw] = oh, ow

  def one(e, ihw, ohw):
    ihw_f = jnp.maximum(ihw.astype(jnp.float32), 1.0)
    scale = jnp.maximum(ohw.astype(jnp.float32), 1.0) / ihw_f
    zero1 = jnp.zeros((1,), jnp.float32)
    valid_h = (jnp.arange(hp) < ihw[0]).astype(jnp.float32)
    valid_w = (jnp.arange(wp) < ihw[1]).astype(jnp.float32)
    bshape_h = [1] * e.ndim
    bshape_h[ah] = hp
    bshape_w = [1] * e.ndim
    bshape_w[aw] = wp
    e = e * valid_h.reshape(bshape_h) * valid_w.reshape(bshape_w)
    num = jax.image.scale_and_translate(e, tuple(ex_shape), (ah, aw), scale, jnp.zeros((2,)),
                                        method='linear', antialias=antialias)
    den_h = jax.image.scale_and_translate(valid_h, (oh,), (0,), scale[:1], zero1,
                                          method='linear', antialias=antialias)
    den_w = jax.image.scale_and_translate(valid_w, (ow,), (0,), scale[1:], zero1,
                                          method='linear', antialias=antialias)
    dshape_h = [1] * e.ndim
    dshape_h[ah] = oh
    dshape_w = [1] * e.ndim
    dshape_w[aw] = ow
    den = den_h.reshape(dshape_h) * den_w.reshape(dshape_w)
    # den > 0 everywhere inside (oh, ow); it is 0 only beyond it, which is don't-care.
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)

  return jax.vmap(one)(x.astype(jnp.float32), jnp.asarray(in_hw, jnp.int32),
                       jnp.asarray(out_hw, jnp.int32))



def postprocess(sem_seg: jnp.ndarray, image_hw: jnp.ndarray, label_hw: jnp.ndarray,
                out_hw: Tuple[int, int], impl: str = 'matmul') -> jnp.ndarray:
  """detectron2 `sem_seg_postprocess`: crop to the resized image, resize to the label size.

  Per image: sem_seg[:, :ih, :iw] resized bilinearly (align_corners=False, no antialias) to
  (lh, lw), where the sizes vary per image but the output shape is static (`resize_valid`).

  Args:
    sem_seg: [B, K, Hp, Wp] per-pixel scores at the padded input size.
    image_hw: [B, 2] int, (ih, iw) size of the resized image inside the padding.
    label_hw: [B, 2] int, (lh, lw) original label size, lh <= Hl, lw <= Wl.
    out_hw: static (Hl, Wl), the padded label size of the batch.
    impl: 'matmul' or 'taps' (`resize_valid`).
  Returns:
    [B, K, Hl, Wl] float32; entries at rows >= lh or columns >= lw are don't-care (finite;
    the labels are ignore there).
  """
  return resize_valid(sem_seg, image_hw, label_hw, out_hw, spatial_axes=(2, 3), impl=impl)


# ----------------------------------------------------------------------------
# RoIAlign (torchvision.ops.roi_align, aligned=True, sampling_ratio=-1).


def _roi_align_axis_weights(lo: jnp.ndarray, hi: jnp.ndarray, size: int, out_size: int,
                            max_grid: int) -> jnp.ndarray:
  """One axis of RoIAlign as a [out_size, size] weight matrix.

  torchvision, aligned=True, per output bin p of a box [lo, hi] (pixel-index coordinates,
  spatial_scale 1): start = lo - 0.5, bin = (hi - lo) / out_size, grid = ceil((hi - lo) /
  out_size) samples per bin (adaptive sampling_ratio), sample t at
  start + p * bin + (t + 0.5) * bin / grid, averaged. Bilinear interpolation of a sample y:
  0 if y < -1 or y > size, else y is clamped to [0, size - 1] and split between floor(y)
  and floor(y) + 1, i.e. the triangle weight max(0, 1 - |clamp(y) - i|) on pixel i. The 2-D
  rule "zero if y or x is out of range" and the 1/(grid_h * grid_w) average both factor
  into a y part and an x part, so the 2-D RoIAlign is Wy @ image @ Wx^T.

  The sampling grid varies per box; `max_grid` (static) bounds it and unused samples get
  weight 0. Boxes needing more samples than `max_grid` are under-sampled (never the case
  in `subimages`, where max_grid = ceil(padded size / out_size)).
  """
  lo = lo.astype(jnp.float32)
  hi = hi.astype(jnp.float32)
  start = lo - 0.5
  length = (hi - 0.5) - start
  bin_size = length / out_size
  grid = jnp.maximum(jnp.ceil(length / out_size), 0.0)
  grid_div = jnp.maximum(grid, 1.0)
  p = jnp.arange(out_size, dtype=jnp.float32)[:, None]
  t = jnp.arange(max_grid, dtype=jnp.float32)[None, :]
  # Same operation order as torchvision so that samples land on the same floats.
  y = start + p * bin_size + (t + 0.5) * bin_size / grid_div            # [out, G]
  use = (t < grid) & (y >= -1.0) & (y <= float(size))
  y = jnp.clip(y, 0.0, float(size - 1))
  i = jnp.arange(size, dtype=jnp.float32)
  tent = jnp.maximum(0.0, 1.0 - jnp.abs(y[..., None] - i))             # [out, G, size]
  return jnp.sum(jnp.where(use[..., None], tent, 0.0), axis=1) / grid_div


def _roi_align_one(image: jnp.ndarray, box: jnp.ndarray, out_size: int,
                   max_grid: Tuple[int, int]) -> jnp.ndarray:
  """RoIAlign of one box (x1, y1, x2, y2) on one [H, W, C] image -> [out, out, C]."""
  h, w = image.shape[:2]
  wy = _roi_align_axis_weights(box[1], box[3], h, out_size, max_grid[0])
  wx = _roi_align_axis_weights(box[0], box[2], w, out_size, max_grid[1])
  rows = jnp.einsum('pi,ijc->pjc', wy, image, precision=_HIGHEST)
  return jnp.einsum('pjc,rj->prc', rows, wx, precision=_HIGHEST)


def roi_align(image: jnp.ndarray, boxes: jnp.ndarray, out_size: int,
              max_grid: Optional[Tuple[int, int]] = None) -> jnp.ndarray:
  """torchvision.ops.roi_align(aligned=True, spatial_scale=1, sampling_ratio=-1), bilinear.

  Args:
    image: [H, W, C] float.
    boxes: [N, 4] float (x1, y1, x2, y2) in pixel-index coordinates.
    out_size: static output side (square bins).
    max_grid: static (gy, gx) bound of the adaptive samples per bin; default
      ceil(H / out_size), ceil(W / out_size), exact for boxes inside the image.
  Returns:
    [N, out_size, out_size, C].
  """
  h, w = image.shape[:2]
  if max_grid is None:
    max_grid = (math.ceil(h / out_size), math.ceil(w / out_size))
  return jax.vmap(lambda b: _roi_align_one(image, b, out_size, max_grid))(
      jnp.asarray(boxes, jnp.float32))


def mask_boxes(binary: jnp.ndarray) -> jnp.ndarray:
  """Tight boxes of binary masks, as the official sub-image code builds them.

  xmin / ymin = first column / row containing the mask, xmax / ymax = index of the last one
  (inclusive index, no +1). If the mask is empty or (xmax - xmin) * (ymax - ymin) == 0 (a
  single row or column), the box is the whole padded image (0, 0, W, H).

  Args:
    binary: [..., H, W] bool.
  Returns:
    [..., 4] float32 (x1, y1, x2, y2).
  """
  h, w = binary.shape[-2:]
  rows = jnp.any(binary, axis=-1)                                       # [..., H]
  cols = jnp.any(binary, axis=-2)                                       # [..., W]
  ymin = jnp.argmax(rows, axis=-1)
  ymax = h - 1 - jnp.argmax(rows[..., ::-1], axis=-1)
  xmin = jnp.argmax(cols, axis=-1)
  xmax = w - 1 - jnp.argmax(cols[..., ::-1], axis=-1)
  degenerate = ~jnp.any(rows, axis=-1) | ((xmax - xmin) * (ymax - ymin) == 0)
  box = jnp.stack([xmin, ymin, xmax, ymax], axis=-1)
  whole = jnp.array([0, 0, w, h], box.dtype)
  return jnp.where(degenerate[..., None], whole, box).astype(jnp.float32)


def subimages(clip_image: jnp.ndarray, mask_logits: jnp.ndarray, style: str = 'cropmask',
              out_size: int = 224, *, query_chunk: Optional[int] = 8) -> jnp.ndarray:
  """Sub-image I_q = f(m_q, I) of every query for the CLIP image encoder (sec. 3.3).

  docs/reference.md section 3, step 3. The binary mask is sigmoid(m_q) > 0.5 at the padded input
  size (mask logits given at stride 4 are first upsampled like `upsample_bilinear`).
    'cropmask' (official default): torchvision roi_align (224x224, aligned=True, adaptive
      sampling) of image * binary_mask over `mask_boxes(binary_mask)`.
    'crop': the same box on the unmasked image.
    'mask': the whole padded image resized to out_size x out_size, times
      sigmoid(resize(m_q)) > 0.5 (the mask logits are resized to out_size first, then
      thresholded).
  RoIAlign is computed as two small matmuls per query (`_roi_align_axis_weights`), and the
  queries are processed `query_chunk` at a time (lax.map), so at most `query_chunk`
  full-size masked images exist at once. Background and padding are 0 in CLIP-normalised
  space (the CLIP mean colour), as in the official code.

  Args:
    clip_image: [B, Hp, Wp, 3] CLIP-normalised image, zero-padded.
    mask_logits: [B, Q, Hp, Wp] mask logits at the padded size, or [B, Q, Hp/4, Wp/4] (any
      size other than (Hp, Wp) is upsampled bilinearly to it).
    style: 'crop' | 'mask' | 'cropmask' (static).
    out_size: static side of the sub-images (224 for CLIP ViT-B/16).
    query_chunk: queries processed together (memory bound); None = all at once.
  Returns:
    [B, Q, out_size, out_size, 3] in clip_image's normalised space, float32.
  """
  if style not in STYLES:
    raise ValueError(f'style must be one of {STYLES}, got {style!r}')
  b, hp, wp, c = clip_image.shape
  q = mask_logits.shape[1]
  clip_image = clip_image.astype(jnp.float32)
  full_res = tuple(mask_logits.shape[2:]) == (hp, wp)
  max_grid = (math.ceil(hp / out_size), math.ceil(wp / out_size))
  if style == 'mask':
    small = jax.image.resize(clip_image, (b, out_size, out_size, c), method='bilinear',
                             antialias=False)
  else:
    small = jnp.zeros((b, 0), jnp.float32)  # unused placeholder with a batch axis

  def per_query(image, image_small, m):
    # image [Hp, Wp, 3]; m [h, w] mask logits of one query.
    m = m.astype(jnp.float32)
    if not full_res:
      m = jax.image.resize(m, (hp, wp), method='bilinear', antialias=False)
    if style == 'mask':
      m_small = jax.image.resize(m, (out_size, out_size), method='bilinear',
                                 antialias=False)
      keep = jax.nn.sigmoid(m_small) > 0.5
      return image_small * keep[..., None].astype(jnp.float32)
    binary = jax.nn.sigmoid(m) > 0.5
    box = mask_boxes(binary)
    src = image * binary[..., None].astype(jnp.float32) if style == 'cropmask' else image
    return _roi_align_one(src, box, out_size, max_grid)

  def per_image(image, image_small, masks):
    fn = lambda m: per_query(image, image_small, m)
    chunk = q if query_chunk is None else max(1, min(int(query_chunk), q))
    return jax.lax.map(fn, masks, batch_size=chunk)

  return jax.vmap(per_image)(clip_image, small, mask_logits)
