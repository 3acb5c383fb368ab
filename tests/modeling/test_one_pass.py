"""The one-pass image branch (modeling/one_pass.py): mask queries in one CLIP ViT pass.

Oracles: transformers' own FlaxCLIPEncoderLayer and CLIP image features (clip.image_embeddings),
a float64 numpy re-derivation of one masked layer, and invariances the design promises
(queries never change the image tokens or each other).
"""
import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zegformer_jax.modeling import clip
from zegformer_jax.modeling import one_pass
from zegformer_jax.modeling import prompted_vit


@pytest.fixture(scope='module')
def tiny(tiny_vit_clip):
  return tiny_vit_clip


def _images(n, size, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3), jnp.float32)


def test_patch_masks_and_attention_mask_by_hand():
  # One image, 2 segments on a 2 x 2 patch grid of a 4 x 4 mask.
  logits = np.full((1, 2, 4, 4), -10.0, np.float32)
  logits[0, 0, :2, :] = 10.0               # top row of patches
  logits[0, 1, 3, 3] = 10.0                # a quarter of the bottom-right patch: below 0.5
  covered = np.asarray(one_pass.patch_masks(jnp.asarray(logits), (2, 2)))
  np.testing.assert_array_equal(covered[0, 0], [True, True, False, False])
  np.testing.assert_array_equal(covered[0, 1], [False, False, False, True])   # its best patch
  m = np.asarray(one_pass.attention_mask(jnp.asarray(covered), num_prefix=1))
  assert m.shape == (1, 7, 7)                # [CLS, 4 patches, 2 queries]
  np.testing.assert_array_equal(m[0, :5], np.tile([1, 1, 1, 1, 1, 0, 0], (5, 1)).astype(bool))
  np.testing.assert_array_equal(m[0, 5], [0, 1, 1, 0, 0, 1, 0])
  np.testing.assert_array_equal(m[0, 6], [0, 0, 0, 0, 1, 0, 1])


def test_unmasked_layer_is_transformers_layer(tiny):
  from transformers.models.clip.modeling_flax_clip import FlaxCLIPEncoderLayer
  cfg = tiny.config.vision_config
  params = tiny.params['vision_model']['encoder']['layers']['1']
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, cfg.hidden_size))
  want = FlaxCLIPEncoderLayer(cfg).apply({'params': params}, x, None)[0]
  got = one_pass._MaskedEncoderLayer(cfg).apply({'params': params}, x,  # pylint: disable=protected-access
                                                jnp.ones((2, 9, 9), bool))
  np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize('by_head', [True, False])
def test_masked_layer_against_numpy(tiny, by_head):
  cfg = tiny.config.vision_config
  p = jax.tree.map(lambda a: np.asarray(a, np.float64),
                   tiny.params['vision_model']['encoder']['layers']['0'])
  rng = np.random.RandomState(0)
  x = rng.randn(1, 6, cfg.hidden_size)
  mask = rng.rand(1, 6, 6) > 0.4
  mask[0, np.arange(6), np.arange(6)] = True
  got = one_pass._MaskedEncoderLayer(cfg, by_head=by_head).apply(  # pylint: disable=protected-access
      {'params': tiny.params['vision_model']['encoder']['layers']['0']},
      jnp.asarray(x, jnp.float32), jnp.asarray(mask))

  def ln(y, q):
    mu, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
    return (y - mu) / np.sqrt(var + cfg.layer_norm_eps) * q['scale'] + q['bias']
  dense = lambda y, q: y @ q['kernel'] + q['bias']
  heads = cfg.num_attention_heads
  hd = cfg.hidden_size // heads
  h = ln(x, p['layer_norm1'])
  a = p['self_attn']
  qs, ks, vs = (dense(h, a[n]).reshape(1, 6, heads, hd) for n in ('q_proj', 'k_proj', 'v_proj'))
  out = np.zeros((1, 6, heads, hd))
  for head in range(heads):
    lg = qs[0, :, head] @ ks[0, :, head].T / np.sqrt(hd)
    lg = np.where(mask[0], lg, -np.inf)
    w = np.exp(lg - lg.max(-1, keepdims=True))
    out[0, :, head] = (w / w.sum(-1, keepdims=True)) @ vs[0, :, head]
  y = x + dense(out.reshape(1, 6, -1), a['out_proj'])
  m = dense(ln(y, p['layer_norm2']), p['mlp']['fc1'])
  m = m / (1 + np.exp(-1.702 * m))                                   # quick_gelu
  want = y + dense(m, p['mlp']['fc2'])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_query_covering_everything_is_clips_image_embedding(tiny):
  images = _images(2, 32)
  logits = jnp.full((2, 3, 32, 32), 10.0)                        # every patch, every query
  emb = one_pass.segment_embeddings(tiny, tiny.params, images, logits)
  want = clip.image_embeddings(tiny, images)
  assert emb.shape == (2, 3, tiny.config.projection_dim)
  for q in range(3):
    np.testing.assert_allclose(emb[:, q], want, atol=2e-5)


def test_queries_are_independent_and_read_only_their_patches(tiny):
  """A segment's embedding is the same alone or beside other segments: the queries read the
  image tokens only, which never read the queries."""
  images = _images(1, 32, seed=3)
  rng = np.random.RandomState(1)
  logits = jnp.asarray(rng.randn(1, 4, 32, 32) * 5, jnp.float32)
  together = one_pass.segment_embeddings(tiny, tiny.params, images, logits)
  for q in range(4):
    alone = one_pass.segment_embeddings(tiny, tiny.params, images, logits[:, q:q + 1])
    np.testing.assert_allclose(alone[:, 0], together[:, q], atol=2e-5)
  # Different masks read different patches: the embeddings differ.
  assert float(jnp.max(jnp.abs(together[:, 0] - together[:, 1]))) > 1e-5   # noise: ~1e-7


def test_size_resizes_the_pass_to_the_patch_grid(tiny):
  images = _images(1, 40)                                        # 5 x 5 patches as it is
  logits = jnp.full((1, 2, 40, 40), 10.0)
  emb = one_pass.segment_embeddings(tiny, tiny.params, images, logits, size=64)   # 8 x 8
  resized = jax.image.resize(images, (1, 64, 64, 3), 'linear', antialias=True)
  enc = prompted_vit.PromptedCLIPVisionEncoder(tiny.config.vision_config,
                                               tiny.config.projection_dim, 0, 0)
  want = enc.apply({'params': prompted_vit.clip_params(tiny.params)}, resized)['cls']
  np.testing.assert_allclose(emb[:, 0], want, atol=2e-5)



class _OpenThenMasked(flax_nn.Module):
  """The one pass as first written: queries from the start, layer 0 open to every patch
  (an explicit all-patches mask), layer 1 masked; MaskQueryCLIP's parameter names."""
  config: object
  projection_dim: int

  @flax_nn.compact
  def __call__(self, images, mask_logits):
    cfg = self.config
    x, grid = prompted_vit.VisionEmbeddings(cfg, name='embeddings')(images)
    b, q = mask_logits.shape[:2]
    x = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], (b, q, x.shape[-1]))], axis=1)
    x = flax_nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='pre_layrnorm')(x)
    covered = one_pass.patch_masks(mask_logits, grid)
    enc = prompted_vit.CLIPEncoderLayers(cfg, one_pass._MaskedEncoderLayer,  # pylint: disable=protected-access
                                         name='encoder')
    x = enc(0, x, one_pass.attention_mask(jnp.ones_like(covered), 1))
    x = enc(1, x, one_pass.attention_mask(covered, 1))
    x = flax_nn.LayerNorm(epsilon=cfg.layer_norm_eps, name='post_layernorm')(x[:, -q:])
    x = flax_nn.Dense(self.projection_dim, use_bias=False, name='visual_projection')(x)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def test_queries_entering_at_mask_from_equal_open_layers_before_it(tiny):
  """mask_from = 1: the queries join at layer 1 as copies of [CLS]. That equals running
  them through layer 0 with every patch open, where they are [CLS]."""
  cfg = tiny.config.vision_config
  params = {'params': prompted_vit.clip_params(tiny.params)}
  images = _images(2, 32, seed=5)
  logits = jnp.asarray(np.random.RandomState(2).randn(2, 3, 32, 32) * 5, jnp.float32)
  got = one_pass.MaskQueryCLIP(cfg, tiny.config.projection_dim, mask_from=1).apply(
      params, images, logits)
  want = _OpenThenMasked(cfg, tiny.config.projection_dim).apply(params, images, logits)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # And masking from layer 1 is not masking from layer 0.
  every = one_pass.MaskQueryCLIP(cfg, tiny.config.projection_dim).apply(params, images, logits)
  assert float(jnp.max(jnp.abs(every - got))) > 1e-4
