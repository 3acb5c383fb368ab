"""Sliding-window inference (config.eval.sliding_window): window placement and stitching."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zegformer_jax.modeling import segmenter
from zegformer_jax.modeling import zegformer


@pytest.mark.parametrize('size,window,stride,want', [
    (10, 4, 3, [0, 3, 6]), (10, 4, 4, [0, 4, 6]), (8, 4, 4, [0, 4]), (3, 4, 2, [0]),
    (4, 4, 1, [0]), (7, 4, 2, [0, 2, 3])])
def test_window_offsets_cover_the_image_and_end_flush(size, window, stride, want):
  got = segmenter.window_offsets(size, window, stride)
  assert got == want
  covered = np.zeros(size, bool)
  for o in got:
    covered[o:o + window] = True
  assert covered.all() and got[-1] + min(window, size) == size


def _window_mean(params, frozen, image, image_hw, *args):
  """A forward pass that depends on the whole window: each pixel gets the window's mean of
  channel 0 (over its valid region) plus the pixel's own channel 1."""
  del params, frozen, args
  h, w = image.shape[1:3]
  valid = ((jnp.arange(h)[None, :, None] < image_hw[:, 0, None, None])
           & (jnp.arange(w)[None, None, :] < image_hw[:, 1, None, None]))
  mean = (jnp.sum(jnp.where(valid, image[..., 0], 0), axis=(1, 2))
          / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1))
  return {'seg': (mean[:, None, None] + image[..., 1])[:, None]}


def test_slide_averages_overlapping_windows_like_a_numpy_loop():
  rng = np.random.default_rng(0)
  image = rng.uniform(0, 255, (2, 10, 7, 3)).astype(np.float32)
  image_hw = np.asarray([[10, 7], [6, 5]], np.int32)
  got = np.asarray(segmenter.slide(_window_mean, (4, 3), None, None, jnp.asarray(image),
                                   jnp.asarray(image_hw))['seg'])[:, 0]
  want = np.zeros((2, 10, 7))
  count = np.zeros((10, 7))
  for y in (0, 3, 6):
    for x in (0, 3):
      for b in range(2):
        vh = np.clip(image_hw[b, 0] - y, 0, 4)
        vw = np.clip(image_hw[b, 1] - x, 0, 4)
        crop = image[b, y:y + 4, x:x + 4]
        mean = crop[:vh, :vw, 0].mean() if vh * vw else 0.0
        want[b, y:y + 4, x:x + 4] += mean + crop[..., 1]
      count[y:y + 4, x:x + 4] += 1
  np.testing.assert_allclose(got, want / count, rtol=1e-5)


def _scores(config, variables, batch, text):
  model = zegformer.build_model(config.model)
  fn = segmenter.make_scores_fn(config, model, ('seg',), (64, 64))
  return np.asarray(jax.jit(fn)(variables['params'], variables['frozen'], batch, text,
                                jnp.ones(5, bool), None, None)['seg'])


def test_one_window_over_the_whole_image_is_plain_inference(smoke_zegformer):
  z = smoke_zegformer
  config, variables, text = z.config, z.variables, z.text
  batch = {'image': jnp.asarray(z.rng.uniform(0, 255, (2, 64, 64, 3)), jnp.float32),
           'image_hw': jnp.asarray([[64, 64], [48, 60]], jnp.int32),
           'label_hw': jnp.asarray([[64, 64], [40, 50]], jnp.int32)}
  plain = _scores(config, variables, batch, text)
  config.eval.sliding_window, config.eval.window_size = True, 64
  np.testing.assert_array_equal(_scores(config, variables, batch, text), plain)
  config.eval.window_size, config.eval.window_stride = 32, 16   # 9 windows: scores change
  windowed = _scores(config, variables, batch, text)
  assert windowed.shape == plain.shape and np.isfinite(windowed).all()
  assert not np.allclose(windowed, plain)
  with pytest.raises(ValueError, match='need 0 < stride <= window'):
    config.eval.window_stride = 40
    segmenter.sliding_windows(config)
