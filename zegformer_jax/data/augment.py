"""Training and test-time transforms of the official ZegFormer recipe, in numpy and Pillow.

Training (MaskFormerSemanticDatasetMapper, docs/reference.md section 4), in this order:
  1. ResizeShortestEdge: short side drawn from `min_size_train` ("choice"), long side capped
     at `max_size_train`; bilinear for the image, nearest for the label (Pillow, as
     detectron2's ResizeTransform does for uint8 images).
  2. Absolute random crop of `crop_size`, clipped to the image
     (RandomCrop_CategoryAreaConstraint with cat_max_ratio 1.0 is a plain random crop).
  3. ColorAugSSDTransform: brightness +-32, contrast [.5, 1.5], saturation [.5, 1.5],
     hue +-18, each with p=.5; contrast before or after saturation+hue at random. The
     reference runs saturation and hue through cv2's 8-bit HSV (H in [0, 180), S and V in
     [0, 255]); cv2 is not a dependency, so `rgb_to_hsv_u8` / `hsv_to_rgb_u8` implement
     that convention with numpy, rounding exactly. cv2's own 8-bit conversions do not (as
     measured with opencv-python-headless 4.14 and 5.1): RGB->HSV divides in fixed point (H
     off by 1 for 2.4% of all colours, S by 1), HSV->RGB truncates instead of rounding (1
     level lower for 74% of HSV triples); after the hue shift the whole colour jitter
     differs from cv2 by up to 15 grey levels (25% of values differ, 3% by more than 1, on
     fixed seeds). So cv2 is not used here: it would change the training data.
  4. Horizontal flip, p=.5.
  5. Pad (bottom/right) to exactly crop_size: image with 128, label with the ignore value.

Test time: ResizeShortestEdge(min_size_test, max_size_test), then padding to a multiple of
size_divisibility (the eval pipeline pads to one static size instead).

Every random draw comes from an explicit np.random.Generator, so one seed per example makes
the pipeline reproducible and resumable.
"""
from __future__ import annotations

import functools
import logging
from typing import Sequence

import numpy as np
from PIL import Image

# Images whose classes did not fit into max_masks (counted per process, see make_targets).
TRUNCATION_STATS = {'examples': 0, 'dropped_classes': 0}
_LOG_TRUNCATIONS = 10


# ----------------------------------------------------------------------------- resizing


def resize_shortest_edge_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
  """detectron2 ResizeShortestEdge.get_output_shape: (new_h, new_w).

  scale = short / min(h, w); if max(h, w) * scale > max_size: scale = max_size / max(h, w);
  sizes are int(x * scale + 0.5).
  """
  scale = short / min(h, w)
  if h < w:
    newh, neww = float(short), scale * w
  else:
    newh, neww = scale * h, float(short)
  if max(newh, neww) > max_size:
    s = max_size / max(newh, neww)
    newh, neww = newh * s, neww * s
  return int(newh + 0.5), int(neww + 0.5)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """uint8 [H,W,3] -> uint8 [h,w,3], bilinear (Pillow, as detectron2 for uint8 images)."""
  if image.shape[:2] == tuple(hw):
    return image
  return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def resize_label(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """int [H,W] -> [h,w], nearest neighbour: a uint8 label stays uint8 (Pillow 'L', a quarter
  of the bytes), any other becomes int32 (Pillow 32-bit integer mode); both pick the same
  source pixels."""
  if label.dtype == np.uint8:
    if label.shape == tuple(hw):
      return label
    return np.asarray(Image.fromarray(label).resize((hw[1], hw[0]), Image.NEAREST))
  if label.shape == tuple(hw):
    return label.astype(np.int32, copy=False)
  img = Image.fromarray(np.ascontiguousarray(label, dtype=np.int32))  # mode 'I'
  return np.asarray(img.resize((hw[1], hw[0]), Image.NEAREST)).astype(np.int32)


# ----------------------------------------------------------------------------- colour (cv2 HSV)


def rgb_to_hsv_u8(rgb: np.ndarray) -> np.ndarray:
  """uint8 [...,3] RGB -> uint8 [...,3] HSV in OpenCV's 8-bit convention.

  H = hue_degrees / 2 in [0, 180), S = 255 * (max - min) / max, V = max.
  """
  c = rgb.astype(np.int32)
  r, g, b = c[..., 0], c[..., 1], c[..., 2]
  # Elementwise max / min of the three planes: far cheaper than reducing a length-3 axis.
  v = np.maximum(np.maximum(r, g), b)
  diff = v - np.minimum(np.minimum(r, g), b)
  s = np.take(_saturation_table(), (v << 8) + diff)
  # cv2 checks v == r first, then v == g (ties resolved in that order).
  num = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = np.take(_hue_table(), ((num + _HUE_NUM_OFFSET) << 8) + diff)
  return np.stack([h, s, v.astype(np.uint8)], -1)


# The S and H formulas take two 8-bit-ranged integers each, so they are tabulated once with
# exactly the float arithmetic below, flattened: S[v * 256 + diff], H[(num + 255) * 256 + diff].
_HUE_NUM_OFFSET = 255   # num = (g - b) or (b - r + 2 diff) or (r - g + 4 diff), in [-255, 1275]


@functools.lru_cache(maxsize=None)
def _saturation_table() -> np.ndarray:
  v, diff = np.meshgrid(np.arange(256), np.arange(256), indexing='ij')
  s = np.where(v > 0, np.floor(diff * 255.0 / np.maximum(v, 1) + 0.5), 0)
  return np.where(diff <= v, s, 0).astype(np.uint8).ravel()   # diff > v never occurs


@functools.lru_cache(maxsize=None)
def _hue_table() -> np.ndarray:
  num, diff = np.meshgrid(np.arange(-_HUE_NUM_OFFSET, 1276), np.arange(256), indexing='ij')
  h = np.floor(num * 30.0 / np.maximum(diff, 1) + 0.5)
  h = np.where(diff == 0, 0, h)
  h = np.where(h < 0, h + 180, h)
  h = np.where(h >= 180, h - 180, h)
  return np.clip(h, 0, 255).astype(np.uint8).ravel()   # out-of-range cells are never used


# Which of (v, q, p, t) is R, G, B in each of the six hue sectors.
_SECTOR_CHANNELS = np.array([[0, 1, 2, 2, 3, 0],
                             [3, 0, 0, 1, 2, 2],
                             [2, 2, 3, 0, 0, 1]], np.intp)


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
  """uint8 [...,3] HSV (OpenCV 8-bit: H in [0,180)) -> uint8 [...,3] RGB, rounded."""
  h = hsv[..., 0].astype(np.float32) * (6.0 / 180.0)
  s = hsv[..., 1].astype(np.float32) / 255.0
  v = hsv[..., 2].astype(np.float32)
  sector = np.floor(h)
  f = h - sector
  sector = sector.astype(np.int32) % 6
  p = v * (1 - s)
  q = v * (1 - s * f)
  t = v * (1 - s * (1 - f))
  candidates = np.stack([v, q, p, t]).ravel()   # [4 * n]: the four planes one after another
  n = sector.size
  at = np.arange(n)
  sector = sector.ravel()
  out = np.empty((n, 3), np.float32)
  for channel in range(3):   # flat gathers: several times faster than np.choose here
    out[:, channel] = np.take(candidates, np.take(_SECTOR_CHANNELS[channel], sector) * n + at)
  out = out.reshape(hsv.shape)
  return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


# The colour jitter runs through tables: every uint8 -> uint8 map is a 256-entry lookup, and
# the two 8-bit HSV conversions are tabulated once per process from the formulas above over
# all their inputs (32 MiB and 45 MiB). Same outputs, bit for bit; 5x faster on a 640 x 640
# crop than evaluating the formulas per pixel (BENCHMARKS.md, input pipeline).
_TABLE_CHUNK = 1 << 18


@functools.lru_cache(maxsize=None)
def _hs_of_rgb_table() -> np.ndarray:
  """'<u2' [2**24]: H | S << 8 of rgb_to_hsv_u8, at index R | G << 8 | B << 16."""
  table = np.empty(1 << 24, '<u2')
  for start in range(0, 1 << 24, _TABLE_CHUNK):
    keys = np.arange(start, start + _TABLE_CHUNK, dtype='<u4')
    hsv = rgb_to_hsv_u8(keys.view(np.uint8).reshape(-1, 4)[:, :3])
    table[start:start + _TABLE_CHUNK] = hsv[:, 0] | (hsv[:, 1].astype(np.uint16) << 8)
  return table


@functools.lru_cache(maxsize=None)
def _rgb_of_hsv_table() -> np.ndarray:
  """'<u4' [180 * 2**16]: R | G << 8 | B << 16 of hsv_to_rgb_u8, at index H << 16 | V << 8 | S."""
  table = np.empty(180 << 16, '<u4')
  for start in range(0, 180 << 16, _TABLE_CHUNK):   # 180 << 16 is a multiple of the chunk
    keys = np.arange(start, start + _TABLE_CHUNK, dtype='<u4')
    hsv = np.stack([keys >> 16, keys & 255, (keys >> 8) & 255], -1).astype(np.uint8)
    rgb = hsv_to_rgb_u8(hsv).astype(np.uint32)
    table[start:start + _TABLE_CHUNK] = rgb[:, 0] | (rgb[:, 1] << 8) | (rgb[:, 2] << 16)
  return table


def _hsv_planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """uint8 [...,3] RGB -> uint8 H, S, V planes [...] (rgb_to_hsv_u8, by table)."""
  c = rgb.astype(np.uint32)
  hs = np.take(_hs_of_rgb_table(), c[..., 0] | (c[..., 1] << 8) | (c[..., 2] << 16))
  hs = hs.view(np.uint8).reshape(hs.shape + (2,))
  v = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
  return hs[..., 0], hs[..., 1], v


def _rgb_of_planes(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
  """uint8 H (< 180), S, V planes [...] -> uint8 [...,3] RGB (hsv_to_rgb_u8, by table), a
  strided view of 4-byte pixels (train_augment's last copy makes it contiguous)."""
  key = (h.astype(np.uint32) << 16) | (v.astype(np.uint32) << 8) | s
  rgb = np.take(_rgb_of_hsv_table(), key)
  return rgb.view(np.uint8).reshape(key.shape + (4,))[..., :3]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  """uint8 -> uint8 as the reference: float32 multiply-add, clip, truncating cast. Applied by
  a 256-entry table of that very arithmetic."""
  table = np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)
  return np.take(table, x)


def color_aug_ssd(image: np.ndarray, rng: np.random.Generator, *, brightness_delta: float = 32,
                  contrast_range: tuple[float, float] = (0.5, 1.5),
                  saturation_range: tuple[float, float] = (0.5, 1.5),
                  hue_delta: int = 18) -> np.ndarray:
  """ColorAugSSDTransform on uint8 [H,W,3] RGB; returns uint8 [H,W,3]."""
  img = image
  if rng.integers(2):
    img = _convert(img, beta=rng.uniform(-brightness_delta, brightness_delta))

  def contrast(x):
    if rng.integers(2):
      return _convert(x, alpha=rng.uniform(*contrast_range))
    return x

  def saturation(x):
    if rng.integers(2):
      h, s, v = _hsv_planes(x)
      return _rgb_of_planes(h, _convert(s, alpha=rng.uniform(*saturation_range)), v)
    return x

  def hue(x):
    if rng.integers(2):
      h, s, v = _hsv_planes(x)
      shift = int(rng.integers(-hue_delta, hue_delta + 1))  # randint is inclusive
      shifted = ((np.arange(256) + shift) % 180).astype(np.uint8)   # H < 180 always
      return _rgb_of_planes(np.take(shifted, h), s, v)
    return x

  if rng.integers(2):
    img = hue(saturation(contrast(img)))
  else:
    img = contrast(hue(saturation(img)))
  return img


# ----------------------------------------------------------------------------- crop / flip / pad


def _hw(size) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def random_crop_box(h: int, w: int, crop_size, rng: np.random.Generator
                    ) -> tuple[int, int, int, int]:
  """Absolute crop clipped to the image: (y0, x0, crop_h, crop_w) (detectron2 RandomCrop)."""
  ch, cw = _hw(crop_size)
  ch, cw = min(ch, h), min(cw, w)
  y0 = int(rng.integers(h - ch + 1))
  x0 = int(rng.integers(w - cw + 1))
  return y0, x0, ch, cw


def pad_to(array: np.ndarray, hw: tuple[int, int], value) -> np.ndarray:
  """Pads [H,W,...] at the bottom and right to exactly hw (which must not be smaller)."""
  if array.shape[:2] == tuple(hw):
    return array
  return _flip_and_pad(array, hw, value, flip=False)


def pad_to_multiple(array: np.ndarray, divisor: int, value) -> np.ndarray:
  """Pads [H,W,...] bottom/right so that H and W are multiples of `divisor` (0: no-op)."""
  if divisor <= 0:
    return array
  h, w = array.shape[:2]
  return pad_to(array, (-(-h // divisor) * divisor, -(-w // divisor) * divisor), value)


# ----------------------------------------------------------------------------- pipelines


def train_augment(image: np.ndarray, label: np.ndarray, rng: np.random.Generator, *,
                  min_size_train: Sequence[int], max_size_train: int, crop_size,
                  ignore_value: int, color_aug: bool = True
                  ) -> tuple[np.ndarray, np.ndarray]:
  """The official training augmentation.

  Args:
    image: uint8 [H,W,3] RGB.  label: int [H,W] (uint8 where the ids and the ignore value
      fit: it is resized and cropped in a quarter of the bytes, same result).
    rng: the example's generator (all randomness comes from it).
  Returns:
    image uint8 [ch,cw,3] (padding 128), label int32 [ch,cw] (padding ignore_value), where
    (ch, cw) = crop_size.
  """
  if image.shape[:2] != label.shape:
    raise ValueError(f'train_augment: image {image.shape[:2]} and label {label.shape} differ')
  h, w = label.shape
  short = int(rng.choice(np.asarray(min_size_train)))
  if short > 0:  # detectron2: a size of 0 means no resize
    nh, nw = resize_shortest_edge_shape(h, w, short, max_size_train)
    image, label = resize_image(image, (nh, nw)), resize_label(label, (nh, nw))
  y0, x0, ch, cw = random_crop_box(label.shape[0], label.shape[1], crop_size, rng)
  image = image[y0:y0 + ch, x0:x0 + cw]
  label = label[y0:y0 + ch, x0:x0 + cw]
  if color_aug:
    image = color_aug_ssd(image, rng)
  flip = rng.uniform() < 0.5
  size = _hw(crop_size)
  return _flip_and_pad(image, size, 128, flip), _flip_and_pad(label, size, ignore_value, flip,
                                                               np.int32)


def _flip_and_pad(array: np.ndarray, hw: tuple[int, int], value, flip: bool,
                  dtype=None) -> np.ndarray:
  """array [h,w,...] mirrored left-right if `flip`, padded bottom/right with `value` to hw
  (which must not be smaller), in one copy."""
  h, w = array.shape[:2]
  if h > hw[0] or w > hw[1]:
    raise ValueError(f'pad: array {array.shape[:2]} is larger than the target {hw}')
  shape = tuple(hw) + array.shape[2:]
  out = np.empty(shape, dtype or array.dtype) if (h, w) == tuple(hw) else np.full(
      shape, value, dtype or array.dtype)
  out[:h, :w] = array[:, ::-1] if flip else array
  return out


def test_resize(image: np.ndarray, min_size_test: int, max_size_test: int) -> np.ndarray:
  """ResizeShortestEdge(min_size_test, max_size_test) on uint8 [H,W,3] (bilinear)."""
  h, w = image.shape[:2]
  return resize_image(image, resize_shortest_edge_shape(h, w, min_size_test, max_size_test))


# ----------------------------------------------------------------------------- targets


def make_targets(label: np.ndarray, num_classes: int, max_masks: int, ignore_value: int,
                 with_masks: bool = True) -> dict[str, np.ndarray]:
  """Per-class binary masks of a label map, padded to max_masks (static shapes).

  Classes present (excluding ignore_value) in ascending id order, as MaskFormer's semantic
  mapper. If more than max_masks are present, the max_masks largest (by pixel count) are
  kept (still in ascending id order) and the event is counted in TRUNCATION_STATS.

  Args:
    label: int [H,W] with values in [0, num_classes) or ignore_value.
  Returns:
    target_classes int32 [M] (padding 0), target_masks uint8 [M,H,W] (padding 0),
    target_valid bool [M], with M = max_masks. With with_masks=False the masks are left
    out: the train step rebuilds them on device (losses.masks_from_label), which saves
    M x H x W bytes per example of host memory and host-to-device transfer.
  """
  label = np.asarray(label)
  ids, counts = np.unique(label, return_counts=True)
  keep = ids != ignore_value
  ids, counts = ids[keep], counts[keep]
  bad = ids[(ids < 0) | (ids >= num_classes)]
  if bad.size:
    raise ValueError(f'make_targets: label values {bad.tolist()} are outside [0, {num_classes}) '
                     f'and not the ignore value {ignore_value}')
  if ids.size > max_masks:
    order = np.argsort(-counts, kind='stable')[:max_masks]
    dropped = ids.size - max_masks
    ids = np.sort(ids[order])
    TRUNCATION_STATS['examples'] += 1
    TRUNCATION_STATS['dropped_classes'] += dropped
    if TRUNCATION_STATS['examples'] <= _LOG_TRUNCATIONS:
      logging.warning('make_targets: %d classes present, max_masks=%d; dropped the %d '
                      'smallest (%d truncated examples so far in this process)',
                      ids.size + dropped, max_masks, dropped, TRUNCATION_STATS['examples'])
  m = ids.size
  classes = np.zeros(max_masks, np.int32)
  classes[:m] = ids
  valid = np.zeros(max_masks, bool)
  valid[:m] = True
  out = {'target_classes': classes, 'target_valid': valid}
  if with_masks:
    masks = np.zeros((max_masks,) + label.shape, np.uint8)
    if m:
      masks[:m] = label[None] == ids[:, None, None]
    out['target_masks'] = masks
  return out
