"""Test-time augmentation: multi-scale and flipped views of an eval batch (detectron2 TEST.AUG).

detectron2's `SemanticSegmentorWithTTA` (which MaskFormer and ZegFormer inherit; every
official ZegFormer config leaves `TEST.AUG.ENABLED False`) runs the model on each image
resized by ResizeShortestEdge(min_size, TEST.AUG.MAX_SIZE) for every min size in
TEST.AUG.MIN_SIZES, each also horizontally flipped when TEST.AUG.FLIP, brings every output
back to the original resolution and averages the per-pixel scores.

Here the views are built on device from the eval batch, whose images are already test
resized and padded to one static shape: each view's per-image size is ResizeShortestEdge of
the *original* size (`view_sizes`, computed on the host), but its pixels are resampled from
the test-resized image (`inference.resize_valid`: bilinear, antialiased when shrinking, as
Pillow) rather than from the original; the view at input.min_size_test /
input.max_size_test is the batch itself, unchanged. Flips mirror
each image inside its own valid width, so padding stays on the right.

config.eval.aug_min_sizes = () and aug_flip = False (the defaults) mean one plain view; a
size of 0 stands for input.min_size_test.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import jax.numpy as jnp
import numpy as np

from zegformer_jax.data import augment
from zegformer_jax.data import input_pipeline


def views(eval_cfg, input_cfg) -> tuple[tuple[int, bool], ...]:
  """The (min_size, flip) views of config.eval, sizes in config order, unflipped first."""
  given = tuple(int(s) for s in eval_cfg.aug_min_sizes)
  if any(s < 0 for s in given):
    raise ValueError(f'config.eval.aug_min_sizes must hold sizes >= 0 (0: input.min_size_test); '
                     f'got {given}')
  sizes = tuple(s or int(input_cfg.min_size_test) for s in given) or (
      int(input_cfg.min_size_test),)
  flips = (False, True) if eval_cfg.aug_flip else (False,)
  return tuple((s, f) for s in sizes for f in flips)


def max_size(eval_cfg, input_cfg) -> int:
  """TEST.AUG.MAX_SIZE: config.eval.aug_max_size, or input.max_size_test when 0."""
  return int(eval_cfg.aug_max_size) or int(input_cfg.max_size_test)


def enabled(eval_cfg, input_cfg) -> bool:
  """False when the views are just the plain test view."""
  return views(eval_cfg, input_cfg) != ((int(input_cfg.min_size_test), False),) or (
      max_size(eval_cfg, input_cfg) != int(input_cfg.max_size_test))


def padded_view_shapes(eval_cfg, input_cfg,
                       image_shapes: Sequence[Tuple[int, int]]) -> dict[int, Tuple[int, int]]:
  """{min_size: (Hv, Wv)} static padded shape of each view size.

  The largest ResizeShortestEdge(min_size, max size) height and width over the original
  `image_shapes`, rounded up to input.size_divisibility (as `input_pipeline.eval_shapes`).
  """
  mx = max_size(eval_cfg, input_cfg)
  div = int(input_cfg.size_divisibility)
  return {s: input_pipeline.padded_resized_shape(image_shapes, s, mx, div)
          for s in distinct_sizes(eval_cfg, input_cfg)}


def view_sizes(eval_cfg, input_cfg, label_hw: np.ndarray) -> np.ndarray:
  """[B, S, 2] int32 (h, w) of every image at each of the S distinct view sizes (host side).

  ResizeShortestEdge(min_size, max size) of the original size `label_hw` [B, 2], with
  detectron2's own float arithmetic (`augment.resize_shortest_edge_shape`) so that sizes at
  a rounding tie agree with it; rows of zeros (padding examples) stay zero. The batch
  carries these as 'view_hw' into the jitted evaluation.
  """
  mx = max_size(eval_cfg, input_cfg)
  sizes = distinct_sizes(eval_cfg, input_cfg)
  out = np.zeros((len(label_hw), len(sizes), 2), np.int32)
  for b, (h, w) in enumerate(np.asarray(label_hw)):
    if h > 0 and w > 0:
      out[b] = [augment.resize_shortest_edge_shape(int(h), int(w), s, mx) for s in sizes]
  return out


def distinct_sizes(eval_cfg, input_cfg) -> tuple[int, ...]:
  """The distinct min sizes of the views, in order (the S axis of `view_sizes`)."""
  return tuple(dict.fromkeys(s for s, _ in views(eval_cfg, input_cfg)))


def flip_valid(x: jnp.ndarray, widths: jnp.ndarray, axis: int) -> jnp.ndarray:
  """Mirrors each example's first widths[b] entries along `axis`; the rest stay in place.

  Args:
    x: [B, ...].
    widths: [B] int valid width of each example.
    axis: the width axis of x (counting the batch axis).
  """
  n = x.shape[axis]
  pos = jnp.arange(n)[None, :]
  w = jnp.asarray(widths, jnp.int32)[:, None]
  idx = jnp.where(pos < w, w - 1 - pos, pos)                               # [B, n]
  shape = [1] * x.ndim
  shape[0], shape[axis] = x.shape[0], n
  return jnp.take_along_axis(x, idx.reshape(shape), axis=axis)
