"""Test-time augmentation (tta.py, segmenter.make_scores_fn) against numpy / Pillow oracles."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from zegformer_jax.data import augment
from zegformer_jax.modeling import inference
from zegformer_jax.modeling import tta
from zegformer_jax.modeling import segmenter


def _cfgs(min_sizes=(), flip=False, max_size=0, min_test=16, max_test=40, div=4):
  eval_cfg = ml_collections.ConfigDict(dict(
      aug_min_sizes=tuple(min_sizes), aug_flip=flip, aug_max_size=max_size, gamma=0.0,
      fusion_lambda=2 / 3, clip_style='cropmask', clip_top_k=0))
  input_cfg = ml_collections.ConfigDict(dict(min_size_test=min_test, max_size_test=max_test,
                                             size_divisibility=div))
  return eval_cfg, input_cfg


def test_views_and_enabled():
  e, i = _cfgs()
  assert tta.views(e, i) == ((16, False),) and not tta.enabled(e, i)
  e, i = _cfgs(min_sizes=(16,))
  assert not tta.enabled(e, i)
  e, i = _cfgs(flip=True)
  assert tta.views(e, i) == ((16, False), (16, True)) and tta.enabled(e, i)
  e, i = _cfgs(min_sizes=(12, 20), flip=True)
  assert tta.views(e, i) == ((12, False), (12, True), (20, False), (20, True))
  e, i = _cfgs(max_size=50)
  assert tta.enabled(e, i) and tta.max_size(e, i) == 50
  e, i = _cfgs(min_sizes=(0,))  # the config default: 0 is input.min_size_test
  assert tta.views(e, i) == ((16, False),) and not tta.enabled(e, i)
  e, i = _cfgs(min_sizes=(0, 24), flip=True)
  assert tta.views(e, i) == ((16, False), (16, True), (24, False), (24, True))
  with pytest.raises(ValueError, match='aug_min_sizes'):
    tta.views(*_cfgs(min_sizes=(-1,)))


def test_view_sizes():
  e, i = _cfgs(min_sizes=(12, 24, 12), flip=True, max_size=30)
  assert tta.distinct_sizes(e, i) == (12, 24)
  got = tta.view_sizes(e, i, np.array([[20, 28], [0, 0], [10, 60]]))
  # (20,28)@12: scale 0.6 -> (12, 16.8 -> 17); @24: (24, 33.6) > 30 -> (21.4, 30) -> (21, 30).
  # (10,60)@12: (12, 72) > 30 -> (5, 30); @24: (24, 144) -> (5, 30). Padding rows stay 0.
  np.testing.assert_array_equal(got, [[[12, 17], [21, 30]], [[0, 0], [0, 0]],
                                      [[5, 30], [5, 30]]])
  assert got.dtype == np.int32


def _pil_resize(x, hw):
  """Pillow's bilinear resize of a float [h, w] array (antialiased when shrinking)."""
  return np.asarray(Image.fromarray(x.astype(np.float32), mode='F').resize(
      (int(hw[1]), int(hw[0])), Image.BILINEAR))


@pytest.mark.parametrize('out_sizes', [[(30, 21), (9, 26)], [(7, 5), (20, 13)]])
def test_resize_valid_matches_pillow(out_sizes):
  rng = np.random.default_rng(1)
  in_hw = np.array([[17, 12], [11, 19]])
  x = rng.normal(size=(2, 20, 24, 3)).astype(np.float32) * 50
  for b in range(2):  # garbage in the padding must not leak into the valid region
    x[b, in_hw[b, 0]:] = 1e4
    x[b, :, in_hw[b, 1]:] = -1e4
  got = np.asarray(inference.resize_valid(x, in_hw, np.array(out_sizes), (32, 28),
                                          spatial_axes=(1, 2), antialias=True))
  for b, (oh, ow) in enumerate(out_sizes):
    for ch in range(3):
      want = _pil_resize(x[b, :in_hw[b, 0], :in_hw[b, 1], ch], (oh, ow))
      np.testing.assert_allclose(got[b, :oh, :ow, ch], want, atol=2e-3, rtol=1e-4)
  assert np.isfinite(got).all()


def test_flip_valid():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 2, 5, 9)).astype(np.float32)
  widths = np.array([9, 4, 0])
  got = np.asarray(tta.flip_valid(x, widths, axis=3))
  want = x.copy()
  for b, w in enumerate(widths):
    want[b, ..., :w] = x[b, ..., :w][..., ::-1]
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(np.asarray(tta.flip_valid(jnp.asarray(got), widths, 3)), x)


def test_padded_view_shapes():
  e, i = _cfgs(min_sizes=(12, 24), flip=True, max_size=30)
  shapes = tta.padded_view_shapes(e, i, [(20, 28), (24, 16), (10, 60)])
  # (20,28)@12 -> (12,17); (24,16)@12 -> (18,12); (10,60)@12 -> (12,72) capped to (5,30)
  # @24: (24,34)->(21,30); (36,24)->(30,20); (24,144)->(5,30); rounded up to 4.
  assert shapes == {12: (20, 32), 24: (32, 32)}


class _PixelModel:
  """A fixed, position-dependent function of the image in the model's output format.

  Mask logits are linear in the 4x4-pooled image plus a ramp in the column index, class
  logits linear in its mean: not flip- or scale-equivariant, so every view differs.
  """

  def __init__(self, q=3, k=4, layers=2):
    rng = np.random.default_rng(3)
    self.wm = rng.normal(size=(3, q)).astype(np.float32)
    self.ramp = rng.normal(size=(q,)).astype(np.float32)
    self.wc = rng.normal(size=(3, q, k + 1)).astype(np.float32)
    self.layers = layers

  def apply(self, variables, images, text, train=False):
    del variables, train
    b, h, w, _ = images.shape
    pooled = images.reshape(b, h // 4, 4, w // 4, 4, 3).mean((2, 4))
    cols = jnp.arange(w // 4, dtype=jnp.float32) / 4.0
    masks = jnp.einsum('bhwc,cq->bqhw', pooled, self.wm) + self.ramp[:, None, None] * cols
    logits = jnp.einsum('bc,cqk->bqk', pooled.mean((1, 2)), self.wc) + 0.0 * text.sum()
    return {'pred_logits': jnp.stack([logits] * self.layers),
            'pred_masks': jnp.stack([masks] * self.layers)}


def _scores_config(min_sizes, flip):
  eval_cfg, input_cfg = _cfgs(min_sizes=min_sizes, flip=flip)
  return ml_collections.ConfigDict(dict(
      eval=eval_cfg, input=input_cfg,
      model=dict(pixel_mean=(120.0, 115.0, 100.0), pixel_std=(60.0, 55.0, 58.0))))


def test_tta_scores_average_the_views():
  """TTA scores == mean over views built with Pillow and numpy, run as plain batches."""
  rng = np.random.default_rng(4)
  originals = [rng.integers(0, 256, size=(20, 28, 3), dtype=np.uint8),
               rng.integers(0, 256, size=(24, 16, 3), dtype=np.uint8)]
  label_hw = np.array([o.shape[:2] for o in originals], np.int32)
  label_static = (24, 28)
  model = _PixelModel()
  text = np.zeros((4, 8), np.float32)
  seen = np.array([True, False, True, True])

  def batch(images, image_hw, shape):
    padded = np.zeros((2,) + shape + (3,), np.float32)
    for b, im in enumerate(images):
      padded[b, :im.shape[0], :im.shape[1]] = im
    return {'image': padded, 'image_hw': np.asarray(image_hw, np.int32),
            'label_hw': label_hw}

  # The eval batch: ResizeShortestEdge(16, 40) of the originals, padded to 4.
  test_images = [augment.test_resize(o, 16, 40).astype(np.float32) for o in originals]
  test_hw = [im.shape[:2] for im in test_images]
  test_batch = batch(test_images, test_hw, (24, 24))

  cfg = _scores_config((16, 24), True)
  view_shapes = tta.padded_view_shapes(cfg.eval, cfg.input, [tuple(h) for h in label_hw])
  test_batch['view_hw'] = tta.view_sizes(cfg.eval, cfg.input, label_hw)
  got = np.asarray(segmenter.make_scores_fn(cfg, model, ('seg',), label_static,
                                           view_shapes=view_shapes)(
      None, None, test_batch, text, seen, None, None)['seg'])

  plain_fn = segmenter.make_scores_fn(_scores_config((), False), model, ('seg',), label_static)
  plain = lambda *a: plain_fn(*a)['seg']
  want = np.zeros_like(got)
  for size in (16, 24):
    if size == 16:
      images = test_images
    else:  # Pillow's resize of each test-size image to ResizeShortestEdge(24, 40) of its original
      images = [np.stack([_pil_resize(im[..., c], augment.resize_shortest_edge_shape(
          *o.shape[:2], 24, 40)) for c in range(3)], -1) for im, o in zip(test_images,
                                                                         originals)]
    hw = [im.shape[:2] for im in images]
    for flip in (False, True):
      view_images = [im[:, ::-1] for im in images] if flip else images
      s = np.array(plain(None, None, batch(view_images, hw, view_shapes[size]), text, seen,
                           None, None))
      if flip:
        for b, (lh, lw) in enumerate(label_hw):
          s[b, :, :, :lw] = s[b, :, :, :lw][..., ::-1]
      want += s / 4
  for b, (lh, lw) in enumerate(label_hw):
    np.testing.assert_allclose(got[b, :, :lh, :lw], want[b, :, :lh, :lw], atol=1e-3)
  # The views matter: the plain scores are not the average.
  base = np.asarray(plain(None, None, test_batch, text, seen, None, None))
  assert np.abs(base - got)[0, :, :20, :28].max() > 1e-2


def test_tta_without_view_shapes_is_an_error():
  cfg = _scores_config((16, 24), False)
  with pytest.raises(ValueError, match='aug_min_sizes'):
    segmenter.make_scores_fn(cfg, _PixelModel(), ('seg',), (24, 28))
