"""class_probabilities: how the seg, img and full variants compose Eq. 1-3 per query."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from zegformer_jax.modeling import inference
from zegformer_jax.modeling import segmenter


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _setup(top_k):
  rng = np.random.default_rng(0)
  b, q, k, d, hp, size = 2, 5, 4, 6, 16, 8
  logits = rng.normal(size=(b, q, k + 1)).astype(np.float32) * 3
  masks = rng.normal(size=(b, q, hp, hp)).astype(np.float32) * 4
  image = rng.normal(size=(b, hp, hp, 3)).astype(np.float32)
  text = rng.normal(size=(k, d)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  proj = rng.normal(size=(size * size * 3, d)).astype(np.float32)

  def embed(x):  # a fixed linear "image encoder", normalised like CLIP's output
    e = x.reshape(x.shape[0], -1) @ proj
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)

  cfg = ml_collections.ConfigDict(dict(clip_top_k=top_k, clip_style='cropmask',
                                       fusion_lambda=2 / 3))
  clip_inputs = dict(image=image, embed=embed, text=text, scale=50.0, size=size)
  seen = np.array([True, True, False, True])
  return logits, masks, clip_inputs, cfg, seen, proj


def _oracle_p_img(logits, masks, clip_inputs, proj):
  sub = np.asarray(inference.subimages(clip_inputs['image'], masks, 'cropmask', out_size=8))
  b, q = sub.shape[:2]
  e = sub.reshape(b, q, -1) @ proj
  e /= np.linalg.norm(e, axis=-1, keepdims=True)
  clip_logits = 50.0 * e @ clip_inputs['text'].T
  return _softmax(np.concatenate([clip_logits, logits[..., -1:]], -1))[..., :-1]


@pytest.mark.parametrize('variant', ['seg', 'img', 'full'])
def test_all_queries(variant):
  logits, masks, clip_inputs, cfg, seen, proj = _setup(top_k=0)
  got = np.asarray(segmenter.class_probabilities(variant, logits, masks, clip_inputs, cfg, seen))
  p_seg = _softmax(logits)[..., :-1]
  if variant == 'seg':
    want = p_seg
  else:
    p_img = _oracle_p_img(logits, masks, clip_inputs, proj)
    if variant == 'img':
      want = p_img
    else:  # Eq. 3 written out again
      lam = 2 / 3
      avg = p_img[..., seen].mean(-1, keepdims=True)
      want = np.where(seen, p_seg ** lam * avg ** (1 - lam), p_seg ** (1 - lam) * p_img ** lam)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)


def test_top_k_keeps_seg_probs_elsewhere():
  logits, masks, clip_inputs, cfg, seen, proj = _setup(top_k=2)
  got = np.asarray(segmenter.class_probabilities('img', logits, masks, clip_inputs, cfg, seen))
  p_seg = _softmax(logits)[..., :-1]
  p_img = _oracle_p_img(logits, masks, clip_inputs, proj)
  score = p_seg.max(-1)
  for bi in range(2):
    top = set(np.argsort(-score[bi])[:2].tolist())
    for qi in range(5):
      want = p_img[bi, qi] if qi in top else p_seg[bi, qi]
      np.testing.assert_allclose(got[bi, qi], want, rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize('top_k', [0, 2])
def test_variants_together_equal_each_alone(top_k):
  logits, masks, clip_inputs, cfg, seen, _ = _setup(top_k=top_k)
  calls = []
  embed = clip_inputs['embed']
  clip_inputs = dict(clip_inputs, embed=lambda x: calls.append(1) or embed(x))
  together = segmenter.variant_probabilities(('seg', 'img', 'full'), logits, masks, clip_inputs,
                                            cfg, seen)
  assert len(calls) == 1  # one pass of the image branch serves img and full
  for v in ('seg', 'img', 'full'):
    alone = segmenter.class_probabilities(v, logits, masks, clip_inputs, cfg, seen)
    np.testing.assert_array_equal(np.asarray(together[v]), np.asarray(alone))
  assert set(segmenter.variant_probabilities(('seg',), logits, masks, None, cfg, seen)) == {'seg'}
