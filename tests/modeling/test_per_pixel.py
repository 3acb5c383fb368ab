"""SPNet-FPN / ZS3Net per-pixel heads and loss against numpy re-derivations."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from configs import shapesworld
from zegformer_jax.modeling import methods
from zegformer_jax.modeling import per_pixel
from zegformer_jax.modeling import segmenter


def _bilinear_np(x, out_h, out_w):
  """torch F.interpolate(bilinear, align_corners=False) of x [..., h, w], float64."""
  h, w = x.shape[-2:]

  def axis(out, size):
    src = np.maximum((np.arange(out) + 0.5) * size / out - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(int), size - 1)
    i1 = np.minimum(i0 + 1, size - 1)
    return i0, i1, src - i0

  y0, y1, fy = axis(out_h, h)
  x0, x1, fx = axis(out_w, w)
  top = x[..., y0, :] * (1 - fy)[:, None] + x[..., y1, :] * fy[:, None]
  return top[..., x0] * (1 - fx) + top[..., x1] * fx


def test_pixel_text_logits_are_scaled_cosines():
  rng = np.random.default_rng(0)
  pix = rng.normal(size=(2, 3, 4, 6))
  text = rng.normal(size=(5, 6))
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  got = per_pixel.pixel_text_logits(jnp.asarray(pix, jnp.float32),
                                    jnp.asarray(text, jnp.float32), 100.0)
  cos = (pix / np.linalg.norm(pix, axis=-1, keepdims=True)) @ text.T
  np.testing.assert_allclose(np.asarray(got), 100.0 * cos, rtol=1e-5, atol=1e-4)


def test_pixel_cross_entropy_matches_numpy():
  rng = np.random.default_rng(1)
  b, h, w, k = 2, 3, 5, 4
  logits = rng.normal(size=(b, h, w, k)) * 3
  label = rng.integers(0, k, size=(b, 4 * h, 4 * w))
  label[0, :5, :7] = 255
  label[1, -3:] = 255
  loss, terms = per_pixel.pixel_cross_entropy(jnp.asarray(logits, jnp.float32),
                                              jnp.asarray(label, jnp.int32), 255)
  up = _bilinear_np(np.moveaxis(logits, -1, 1), 4 * h, 4 * w)        # [B, K, H, W]
  logp = up - np.log(np.exp(up).sum(axis=1, keepdims=True))
  valid = label != 255
  nll = -np.take_along_axis(logp, np.where(valid, label, 0)[:, None], axis=1)[:, 0]
  want = nll[valid].mean()
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(terms['valid_pixels']) == valid.sum()


def test_pixel_cross_entropy_all_ignored_is_zero():
  loss, _ = per_pixel.pixel_cross_entropy(jnp.ones((1, 2, 2, 3)),
                                          jnp.full((1, 8, 8), 255, jnp.int32), 255)
  assert float(loss) == 0.0


def test_pixel_scores_are_softmax_of_upsampled_logits():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(1, 2, 3, 4))
  got = np.asarray(per_pixel.pixel_scores(jnp.asarray(logits, jnp.float32), (8, 12)))
  up = _bilinear_np(np.moveaxis(logits, -1, 1), 8, 12)
  want = np.exp(up) / np.exp(up).sum(axis=1, keepdims=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _tiny_model_config(name):
  c = shapesworld.get_config(name).model
  return c


@pytest.mark.parametrize('name', ['spnet_fpn', 'zs3net'])
def test_models_share_the_backbone_and_fpn_of_zegformer(name):
  cfg_z = _tiny_model_config('zegformer')
  cfg_p = _tiny_model_config(name)
  shapes = lambda cfg, k: jax.eval_shape(lambda: methods.init_variables(
      methods.build_model(cfg), jax.random.key(0), image_hw=(64, 64), num_classes=k))
  z, p = shapes(cfg_z, 7), shapes(cfg_p, 7)
  for part in ('backbone', 'pixel_decoder'):
    assert jax.tree.map(lambda a: a.shape, z['params'][part]) == jax.tree.map(
        lambda a: a.shape, p['params'][part])
  head = set(p['params']) - {'backbone', 'pixel_decoder'}
  c = cfg_p.pixel_decoder.mask_dim
  if name == 'spnet_fpn':   # the official projection_layer: 1x1 conv mask_dim -> D
    assert head == {'projection'}
    assert p['params']['projection']['kernel'].shape == (1, 1, c, cfg_p.embed_dim)
  else:                     # ZS3Net's classifier: one row per class
    assert head == {'classifier'}
    assert p['params']['classifier']['kernel'].shape == (c, 7)


def test_spnet_forward_equals_projection_cosines():
  cfg = _tiny_model_config('spnet_fpn')
  model = methods.build_model(cfg)
  v = methods.init_variables(model, jax.random.key(0), image_hw=(64, 64), num_classes=3)
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.normal(size=(1, 64, 64, 3)), jnp.float32)
  text = rng.normal(size=(3, cfg.embed_dim))
  text = jnp.asarray(text / np.linalg.norm(text, axis=1, keepdims=True), jnp.float32)
  out = model.apply(v, images, text, train=False)
  feats = np.asarray(out['pixel_features'], np.float64)
  kernel = np.asarray(v['params']['projection']['kernel'], np.float64)[0, 0]
  emb = feats @ kernel + np.asarray(v['params']['projection']['bias'])
  want = 100 * (emb / np.linalg.norm(emb, axis=-1, keepdims=True)) @ np.asarray(text).T
  assert out['sem_seg_logits'].shape == (1, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(out['sem_seg_logits']), want, rtol=1e-4, atol=2e-3)


def test_pixel_methods_have_only_the_seg_variant():
  cfg = _tiny_model_config('spnet_fpn')
  assert segmenter.check_variants(['seg'], cfg) == ('seg',)
  with pytest.raises(ValueError, match="variant 'full' needs segments"):
    segmenter.check_variants(['seg', 'full'], cfg)


def test_method_names_agree_between_configs_and_library():
  assert common.METHODS == methods.METHODS
  with pytest.raises(ValueError, match='config.model.name must be one of'):
    methods.build_model(ml_collections.ConfigDict({'name': 'spnet'}))
  with pytest.raises(ValueError, match='comma-separated list'):
    shapesworld.get_config('spnet')
