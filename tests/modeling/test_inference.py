"""Tests of zegformer_jax.inference against independent numpy implementations.

The references here are written from the documented semantics, loop by loop:
  * torch F.interpolate(mode='bilinear', align_corners=False): source index
    (d + 0.5) * in / out - 0.5, clamped at 0, the upper neighbour clamped to the last index;
  * torchvision roi_align(aligned=True, spatial_scale=1, sampling_ratio=-1): per bin
    ceil(roi / out) x ceil(roi / out) samples; a sample with y < -1, y > H, x < -1 or x > W
    is 0, otherwise coordinates are clamped at 0 and at the last index;
  * the official sub-image construction (reference section 3 step 3);
  * Eq. 2 and Eq. 3 of the paper as the official code applies them.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zegformer_jax.modeling import inference


# ----------------------------------------------------------------------------
# numpy references


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _torch_bilinear_matrix(n_in, n_out):
  """[n_out, n_in] weights of torch's 1-D bilinear interpolation, align_corners=False."""
  mat = np.zeros((n_out, n_in))
  # torch computes the source coordinate in float32 for float32 tensors.
  f32 = np.float32
  scale = f32(n_in) / f32(n_out)
  for d in range(n_out):
    src = float(scale * (f32(d) + f32(0.5)) - f32(0.5))
    if src < 0:
      src = 0.0
    i0 = int(src)
    i1 = i0 + 1 if i0 < n_in - 1 else i0
    l1 = src - i0
    mat[d, i0] += 1.0 - l1
    mat[d, i1] += l1
  return mat


def _torch_resize(x, out_hw, axes=(-2, -1)):
  """Bilinear resize of the two `axes` of x (float64)."""
  x = np.asarray(x, np.float64)
  ha, wa = axes
  wy = _torch_bilinear_matrix(x.shape[ha], out_hw[0])
  wx = _torch_bilinear_matrix(x.shape[wa], out_hw[1])
  x = np.moveaxis(np.tensordot(wy, np.moveaxis(x, ha, 0), axes=(1, 0)), 0, ha)
  x = np.moveaxis(np.tensordot(wx, np.moveaxis(x, wa, 0), axes=(1, 0)), 0, wa)
  return x


def _roi_bilinear(img, y, x):
  h, w = img.shape[:2]
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(img.shape[2:])
  y = max(y, 0.0)
  x = max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_low = y_high = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_low = x_high = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * img[y_low, x_low] + hy * lx * img[y_low, x_high]
          + ly * hx * img[y_high, x_low] + ly * lx * img[y_high, x_high])


def _roi_align_np(img, box, out):
  """torchvision roi_align of one box on an [H, W, C] image, aligned=True, adaptive."""
  # Coordinates in float32, as torchvision computes them for float32 inputs.
  f32 = np.float32
  x1, y1, x2, y2 = (f32(v) for v in box)
  start_w, start_h = x1 - f32(0.5), y1 - f32(0.5)
  roi_w, roi_h = (x2 - f32(0.5)) - start_w, (y2 - f32(0.5)) - start_h
  bin_w, bin_h = roi_w / f32(out), roi_h / f32(out)
  grid_h, grid_w = math.ceil(roi_h / f32(out)), math.ceil(roi_w / f32(out))
  count = max(grid_h * grid_w, 1)
  res = np.zeros((out, out) + img.shape[2:])
  for ph in range(out):
    for pw in range(out):
      acc = np.zeros(img.shape[2:])
      for iy in range(grid_h):
        y = start_h + f32(ph) * bin_h + f32(iy + 0.5) * bin_h / f32(grid_h)
        for ix in range(grid_w):
          x = start_w + f32(pw) * bin_w + f32(ix + 0.5) * bin_w / f32(grid_w)
          acc = acc + _roi_bilinear(img, float(y), float(x))
      res[ph, pw] = acc / count
  return res


def _box_np(binary):
  h, w = binary.shape
  ys, xs = np.nonzero(binary)
  if ys.size == 0:
    return (0, 0, w, h)
  x1, x2, y1, y2 = xs.min(), xs.max(), ys.min(), ys.max()   # inclusive, no +1
  if (x2 - x1) * (y2 - y1) == 0:
    return (0, 0, w, h)
  return (x1, y1, x2, y2)


def _subimages_np(image, logits_full, style, out):
  """Official sub-images from full-resolution mask logits, numpy float64."""
  b, q = logits_full.shape[:2]
  res = np.zeros((b, q, out, out, image.shape[-1]))
  small = _torch_resize(image, (out, out), axes=(1, 2))
  for i in range(b):
    for j in range(q):
      binary = 1.0 / (1.0 + np.exp(-logits_full[i, j])) > 0.5
      if style == 'mask':
        keep = _torch_resize(logits_full[i, j], (out, out)) > 0
        res[i, j] = small[i] * keep[..., None]
        continue
      src = image[i] * binary[..., None] if style == 'cropmask' else image[i]
      res[i, j] = _roi_align_np(src, _box_np(binary), out)
  return res


def _mask_logits(rng, b, h, w):
  """Mask logits |v| >= 0.5 with rectangles, edge cases and an irregular blob."""
  q = 8
  sign = -np.ones((b, q, h, w))
  for i in range(b):
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    sign[i, 0, y0:y0 + rng.integers(3, h // 2), x0:x0 + rng.integers(3, w // 2)] = 1
    sign[i, 1, h - 6:, w - 9:] = 1                    # touches the bottom-right edge
    # sign[i, 2]: empty mask -> whole image
    sign[i, 3, 6, 2:20] = 1                           # a single row -> whole image
    sign[i, 4, 1:15, 10] = 1                          # a single column -> whole image
    blob = rng.random((h, w)) < 0.3
    blob[:, 13:] = False
    sign[i, 5][blob] = 1                              # irregular, with holes
    sign[i, 6] = 1                                    # everything
    sign[i, 7, 2:4, 3:5] = 1                          # tiny 2x2: one sample per bin
  return sign * (0.5 + rng.random((b, q, h, w)))


# ----------------------------------------------------------------------------
# Class probabilities, Eq. 3, Eq. 2.


def test_segment_and_image_branch_probs():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 7)) * 3
  np.testing.assert_allclose(inference.segment_probs(jnp.asarray(logits, jnp.float32)),
                             _softmax(logits)[..., :-1], rtol=1e-5, atol=1e-7)
  clip_logits = rng.normal(size=(2, 5, 6)) * 5
  no_obj = rng.normal(size=(2, 5)) * 5
  want = _softmax(np.concatenate([clip_logits, no_obj[..., None]], -1))[..., :-1]
  got = inference.image_branch_probs(jnp.asarray(clip_logits, jnp.float32),
                                     jnp.asarray(no_obj, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  assert got.shape == (2, 5, 6)


def _fuse_np(p_seg, p_img, seen, lam):
  avg = p_img[..., seen].mean(-1, keepdims=True)
  out = np.empty_like(p_seg)
  out[..., seen] = p_seg[..., seen] ** lam * avg ** (1 - lam)
  out[..., ~seen] = p_seg[..., ~seen] ** (1 - lam) * p_img[..., ~seen] ** lam
  return out


@pytest.mark.parametrize('lam', [2.0 / 3.0, 0.4])
def test_fuse_eq3_random(lam):
  rng = np.random.default_rng(1)
  k = 9
  p_seg = _softmax(rng.normal(size=(2, 6, k + 1)) * 2)[..., :-1]
  p_img = _softmax(rng.normal(size=(2, 6, k + 1)) * 2)[..., :-1]
  p_seg[0, 0, 3] = 0.0                 # exact zeros stay zero (0 ** x)
  seen = rng.random(k) < 0.6
  got = inference.fuse(jnp.asarray(p_seg, jnp.float32), jnp.asarray(p_img, jnp.float32),
                       jnp.asarray(seen), lam)
  np.testing.assert_allclose(got, _fuse_np(p_seg, p_img, seen, lam), rtol=2e-5, atol=1e-7)


def test_fuse_eq3_hand_made():
  # seen = {0, 1}: p_avg = (0.1 + 0.028) / 2 = 0.064, p_avg^(1/3) = 0.4;
  # class 0: 0.125^(2/3) * 0.4 = 0.25 * 0.4;  class 1: 0.027^(2/3) * 0.4 = 0.09 * 0.4;
  # unseen class 2: 0.216^(1/3) * 0.125^(2/3) = 0.6 * 0.25. No renormalisation.
  p_seg = jnp.array([[[0.125, 0.027, 0.216]]])
  p_img = jnp.array([[[0.1, 0.028, 0.125]]])
  got = inference.fuse(p_seg, p_img, jnp.array([True, True, False]))
  np.testing.assert_allclose(got, [[[0.1, 0.036, 0.15]]], rtol=1e-5)
  # lam = 1 keeps only the segmentation branch on seen classes, only CLIP on unseen ones.
  got = inference.fuse(p_seg, p_img, jnp.array([True, True, False]), lam=1.0)
  np.testing.assert_allclose(got, [[[0.125, 0.027, 0.125]]], rtol=1e-6)


def test_calibrate_eq2():
  rng = np.random.default_rng(2)
  scores = rng.random((2, 5, 4, 3)).astype(np.float32)
  seen = np.array([True, False, True, True, False])
  got = jax.jit(inference.calibrate)(jnp.asarray(scores), jnp.asarray(seen), 0.1)
  np.testing.assert_allclose(got, scores - 0.1 * seen[None, :, None, None], atol=1e-7)
  # gamma <= 0 is "off", as the official `if gamma > 0`.
  for gamma in (0.0, -1.0):
    np.testing.assert_array_equal(inference.calibrate(jnp.asarray(scores),
                                                      jnp.asarray(seen), gamma), scores)
  # Eq. 2 decision: a seen class ahead by less than gamma loses the argmax.
  two = jnp.array([[[[0.55]], [[0.5]]]])                 # [1, K=2, 1, 1]
  cal = inference.calibrate(two, jnp.array([True, False]), 0.1)
  assert int(jnp.argmax(cal, axis=1)[0, 0, 0]) == 1


def test_semantic_inference():
  rng = np.random.default_rng(3)
  probs = rng.random((2, 5, 4))
  masks = rng.normal(size=(2, 5, 6, 7)) * 3
  want = np.einsum('bqk,bqhw->bkhw', probs, 1 / (1 + np.exp(-masks)))
  got = inference.semantic_inference(jnp.asarray(probs, jnp.float32),
                                     jnp.asarray(masks, jnp.float32))
  assert got.shape == (2, 4, 6, 7)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# Resizing.


@pytest.mark.parametrize('impl', inference.RESIZE_IMPLS)
@pytest.mark.parametrize('in_hw,out_hw', [((5, 7), (20, 28)), ((6, 4), (13, 9)),
                                          ((32, 32), (128, 128)), ((9, 11), (9, 11))])
def test_upsample_masks_matches_torch_bilinear(in_hw, out_hw, impl):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 3) + in_hw)
  got = inference.upsample_bilinear(jnp.asarray(x, jnp.float32), out_hw, impl=impl)
  assert got.shape == (2, 3) + out_hw and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _torch_resize(x, out_hw), rtol=1e-5, atol=1e-5)
  if in_hw == out_hw:   # the identity: weights 1 and 0 exactly
    np.testing.assert_array_equal(got, np.asarray(x, np.float32))


def test_linear_taps_are_torchs_source_pixels():
  # torch upsample_bilinear2d, align_corners=False, 5 -> 8: src = (d + 0.5) * 5 / 8 - 0.5,
  # clamped at 0; the far edge repeats the last pixel.
  lo, hi, w = (np.asarray(a) for a in inference.linear_taps(0, 8, 5, 8))
  np.testing.assert_array_equal(lo, [0, 0, 1, 1, 2, 2, 3, 4])
  np.testing.assert_array_equal(hi, [1, 1, 2, 2, 3, 3, 4, 4])
  np.testing.assert_allclose(w, [0, 0.4375, 0.0625, 0.6875, 0.3125, 0.9375, 0.5625, 0],
                             atol=1e-7)
  # Shrinking 7 -> 3 without antialiasing, output rows 1 and 2 (a traced start offset):
  # src = (d + 0.5) * 7 / 3 - 0.5 = 3 and 5.3333.
  lo, hi, w = (np.asarray(a) for a in inference.linear_taps(jnp.int32(1), 2, 7, 3))
  np.testing.assert_array_equal(lo, [3, 5])
  np.testing.assert_array_equal(hi, [4, 6])
  np.testing.assert_allclose(w, [0, 1 / 3], atol=1e-6)


def test_resize_impl_errors_name_the_key():
  x = jnp.zeros((1, 2, 4, 4))
  hw = jnp.asarray([[4, 4]])
  with pytest.raises(ValueError, match='config.eval.resize_impl.*gather'):
    inference.upsample_bilinear(x, (8, 8), impl='gather')
  with pytest.raises(ValueError, match='without antialiasing'):
    inference.resize_valid(x, hw, hw, (8, 8), spatial_axes=(2, 3), antialias=True,
                           impl='taps')
  with pytest.raises(ValueError, match='last two axes'):
    inference.resize_valid(x, hw, hw, (8, 8), spatial_axes=(1, 2), impl='taps')


@pytest.mark.parametrize('impl', inference.RESIZE_IMPLS)
def test_postprocess_crop_then_resize(impl):
  rng = np.random.default_rng(5)
  sem = rng.normal(size=(3, 4, 64, 64)).astype(np.float32)
  # Image 40x56 inside the 64x64 padding -> label 50x70 (upsampling, non-integer ratio);
  # no padding -> 30x20 (downsampling); 33x17 -> 33x17 (identity).
  image_hw = np.array([[40, 56], [64, 64], [33, 17]], np.int32)
  label_hw = np.array([[50, 70], [30, 20], [33, 17]], np.int32)
  fn = jax.jit(inference.postprocess, static_argnums=(3, 4))
  got = np.asarray(fn(jnp.asarray(sem), jnp.asarray(image_hw), jnp.asarray(label_hw),
                      (50, 70), impl))
  assert got.shape == (3, 4, 50, 70)
  assert np.all(np.isfinite(got))
  for b in range(3):
    (ih, iw), (lh, lw) = image_hw[b], label_hw[b]
    want = _torch_resize(sem[b, :, :ih, :iw], (lh, lw))
    np.testing.assert_allclose(got[b, :, :lh, :lw], want, rtol=1e-5, atol=1e-5)
  # The padding must not leak in: the naive resize of the padded map differs at the edge.
  naive = jax.image.scale_and_translate(jnp.asarray(sem[0]), (4, 50, 70), (1, 2),
                                        jnp.array([50 / 40, 70 / 56]), jnp.zeros(2),
                                        'linear', antialias=False)
  assert not np.allclose(naive[:, -1], got[0, :, 49, :70], atol=1e-3)


# ----------------------------------------------------------------------------
# RoIAlign and sub-images.


def test_roi_align_matches_torchvision_semantics():
  rng = np.random.default_rng(6)
  img = rng.normal(size=(20, 28, 3)).astype(np.float32)
  boxes = np.array([
      [0, 0, 28, 20],            # whole image: several samples per bin, clamp at the far edge
      [3, 2, 17, 9],
      [-3.5, -2.2, 6.3, 4.1],    # starts outside: samples in [-1, 0) clamp, < -1 give 0
      [20.2, 14.7, 31.0, 26.0],  # ends outside: samples beyond W / H give 0
      [5, 5, 5, 12],             # zero width: no samples -> 0
      [1.25, 0.5, 27.75, 19.5],
      [10, 3, 8, 9],             # negative width -> 0
  ], np.float32)
  out = 7
  got = np.asarray(inference.roi_align(jnp.asarray(img), jnp.asarray(boxes), out,
                                       max_grid=(4, 5)))
  for n, box in enumerate(boxes):
    np.testing.assert_allclose(got[n], _roi_align_np(img.astype(np.float64), box, out),
                               rtol=1e-5, atol=1e-5, err_msg=f'box {box}')


@pytest.mark.parametrize('style', inference.STYLES)
def test_subimages_full_resolution_masks(style):
  rng = np.random.default_rng(7)
  b, h, w, out = 2, 20, 28, 7
  image = rng.normal(size=(b, h, w, 3)).astype(np.float32)
  logits = _mask_logits(rng, b, h, w).astype(np.float32)
  if style == 'mask':   # thresholding after the resize must not sit on a rounding edge
    assert np.min(np.abs(_torch_resize(logits, (out, out)))) > 1e-4
  fn = jax.jit(inference.subimages, static_argnames=('style', 'out_size', 'query_chunk'))
  got = np.asarray(fn(jnp.asarray(image), jnp.asarray(logits), style=style, out_size=out,
                      query_chunk=3))
  assert got.shape == (b, logits.shape[1], out, out, 3)
  want = _subimages_np(image.astype(np.float64), logits.astype(np.float64), style, out)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('style', ['cropmask', 'mask'])
def test_subimages_stride4_masks_are_upsampled_first(style):
  rng = np.random.default_rng(8)
  b, h, w, out = 1, 20, 28, 7
  image = rng.normal(size=(b, h, w, 3)).astype(np.float32)
  low = _mask_logits(rng, b, h, w)[:, :, ::4, ::4]
  full = _torch_resize(low, (h, w))
  assert np.min(np.abs(full)) > 1e-4      # binary masks well defined
  if style == 'mask':
    assert np.min(np.abs(_torch_resize(full, (out, out)))) > 1e-4
  got = inference.subimages(jnp.asarray(image), jnp.asarray(low, jnp.float32), style, out,
                            query_chunk=None)
  want = _subimages_np(image.astype(np.float64), full, style, out)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mask_boxes_and_degenerate_masks():
  binary = np.zeros((4, 6, 9), bool)
  binary[0, 1:4, 2:7] = True         # -> (2, 1, 6, 3), inclusive max index
  binary[0, 5, 8] = True             # -> extends to (8, 5)
  binary[2, 3, 1:5] = True           # single row -> whole image
  binary[3, 2, 4] = True             # single pixel -> whole image
  got = np.asarray(inference.mask_boxes(jnp.asarray(binary)))
  np.testing.assert_array_equal(got, [[2, 1, 8, 5], [0, 0, 9, 6], [0, 0, 9, 6],
                                      [0, 0, 9, 6]])
  # An empty mask in 'cropmask' is the whole padded image times an all-zero mask: zeros;
  # in 'crop' it is the whole image resampled.
  image = np.random.default_rng(9).normal(size=(1, 6, 9, 3)).astype(np.float32)
  empty = -np.ones((1, 1, 6, 9), np.float32)
  assert np.all(np.asarray(inference.subimages(jnp.asarray(image), jnp.asarray(empty),
                                               'cropmask', 4)) == 0)
  crop = inference.subimages(jnp.asarray(image), jnp.asarray(empty), 'crop', 4)
  np.testing.assert_allclose(crop[0, 0], _roi_align_np(image[0].astype(np.float64),
                                                       (0, 0, 9, 6), 4), atol=1e-5)
