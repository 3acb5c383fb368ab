"""The deep-prompted CLIP ViT (modeling/prompted_vit.py, ZegCLIP's image encoder).

Oracles: transformers' own FlaxCLIPVisionModel (no prompts, native grid), a float64 numpy
loop over transformers' encoder layers with the prompts spliced in by hand, and
jax.image.resize's linear kernel for the position-table resize.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zegformer_jax.modeling import clip
from zegformer_jax.modeling import prompted_vit


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('clip') / 'tiny')
  clip.create_tiny_clip(path, vocab_words=['cat'], vision_layers=3, image_size=32,
                        patch_size=8, seed=0)
  model, _ = clip.load_clip(path)
  return model


def _images(n, size, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (n, size, size, 3), jnp.float32)


def _encoder(tiny, **kw):
  cfg = tiny.config.vision_config
  return prompted_vit.PromptedCLIPVisionEncoder(cfg, tiny.config.projection_dim, **kw)


def test_without_prompts_it_is_clips_vision_tower(tiny):
  images = _images(2, 32)
  enc = _encoder(tiny, num_prompts=0, prompt_depth=0, out_indices=(0, 2))
  out = enc.apply({'params': prompted_vit.clip_params(tiny.params)}, images)
  ref = tiny.module.apply({'params': tiny.params}, images, method=lambda m, x: m.vision_model(
      pixel_values=x, output_hidden_states=True, deterministic=True))
  np.testing.assert_allclose(out['cls'], clip.image_embeddings(tiny, images), atol=1e-5)
  for k, i in enumerate((0, 2)):   # hidden_states[0] is the embedding output
    np.testing.assert_allclose(out['layers'][k].reshape(2, 16, -1),
                               ref.hidden_states[i + 1][:, 1:], atol=1e-5)
  # Dense embeddings: every patch token through CLIP's post-LayerNorm and projection.
  last = np.asarray(ref.hidden_states[-1][:, 1:], np.float64)
  post = tiny.params['vision_model']['post_layernorm']
  mu, var = last.mean(-1, keepdims=True), last.var(-1, keepdims=True)
  normed = (last - mu) / np.sqrt(var + tiny.config.vision_config.layer_norm_eps)
  proj = (normed * post['scale'] + post['bias']) @ np.asarray(
      tiny.params['visual_projection']['kernel'], np.float64)
  proj /= np.linalg.norm(proj, axis=-1, keepdims=True)
  np.testing.assert_allclose(out['patches'].reshape(2, 16, -1), proj, atol=1e-5)
  assert out['grid'] == (4, 4)


def _layer_norm(x, p, eps):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p['scale']) + np.asarray(p['bias'])


def test_deep_prompts_against_a_hand_spliced_loop(tiny):
  """Layer i runs on [CLS, proj(prompts_i), patches]; layers past prompt_depth keep the
  last prompts' outputs in the sequence; prompt_norm, post-LN and projection follow."""
  cfg = tiny.config.vision_config
  d = cfg.hidden_size
  enc = _encoder(tiny, num_prompts=3, prompt_depth=2, out_indices=(0, 1, 2))
  images = _images(2, 32, seed=1)
  new = enc.init(jax.random.PRNGKey(3), images)['params']
  assert sorted(k for k in new if k in prompted_vit.PROMPT_PARAMS) == sorted(
      prompted_vit.PROMPT_PARAMS)
  prompts = np.asarray(new['deep_prompts'])
  assert prompts.shape == (2, 3, d)
  v = np.sqrt(6.0 / (3 * 8 * 8 + d))
  assert prompts.min() >= -v and prompts.max() < v and prompts.std() > v / 3
  kernel = np.asarray(new['prompt_proj']['kernel'])
  assert 0.5 < kernel.std() / np.sqrt(2.0 / d) < 1.5          # kaiming normal, fan_out
  params = dict(prompted_vit.clip_params(tiny.params),
                **{k: new[k] for k in prompted_vit.PROMPT_PARAMS})
  # A prompt_norm that is not the identity, so that the test sees it applied.
  params['prompt_norm'] = {'scale': 1 + 0.1 * np.arange(d, dtype=np.float32),
                           'bias': 0.01 * np.arange(d, dtype=np.float32)}
  out = enc.apply({'params': params}, images)

  from transformers.models.clip.modeling_flax_clip import FlaxCLIPEncoderLayer
  layer = FlaxCLIPEncoderLayer(cfg)
  emb = tiny.module.apply({'params': tiny.params}, images, method=lambda m, x: (
      m.vision_model.pre_layrnorm(m.vision_model.embeddings(x))))
  projected = prompts @ kernel + np.asarray(new['prompt_proj']['bias'])
  x = np.asarray(emb)
  for i in range(3):
    if i < 2:
      x = np.concatenate([x[:, :1], np.broadcast_to(projected[i], (2, 3, d)), x[:, -16:]], 1)
    x = np.asarray(layer.apply({'params': params['encoder']['layers'][str(i)]}, x, None)[0])
    np.testing.assert_allclose(out['layers'][i].reshape(2, 16, -1), x[:, -16:], atol=1e-5)
  assert x.shape[1] == 1 + 3 + 16
  x = _layer_norm(np.asarray(x, np.float64), params['prompt_norm'], 1e-6)
  x = _layer_norm(x, params['post_layernorm'], cfg.layer_norm_eps)
  x = x @ np.asarray(params['visual_projection']['kernel'], np.float64)
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  np.testing.assert_allclose(out['cls'], x[:, 0], atol=1e-5)
  np.testing.assert_allclose(out['patches'].reshape(2, 16, -1), x[:, -16:], atol=1e-5)
  # Dropout acts on the prompts in training only.
  train = enc.apply({'params': params}, images, deterministic=False,
                    rngs={'dropout': jax.random.PRNGKey(0)})
  assert float(jnp.abs(train['patches'] - out['patches']).max()) > 1e-4


def test_gradients_reach_every_layers_prompts(tiny):
  enc = _encoder(tiny, num_prompts=2, prompt_depth=3)
  images = _images(1, 32)
  new = enc.init(jax.random.PRNGKey(0), images)['params']
  params = dict(prompted_vit.clip_params(tiny.params),
                **{k: new[k] for k in prompted_vit.PROMPT_PARAMS})
  g = jax.grad(lambda p: jnp.sum(enc.apply({'params': p}, images)['patches'][..., 0]))(params)
  per_layer = np.abs(np.asarray(g['deep_prompts'])).sum(axis=(1, 2))
  assert (per_layer > 0).all(), per_layer


def test_larger_input_resizes_the_position_table(tiny):
  enc = _encoder(tiny, num_prompts=0, prompt_depth=0)
  out = enc.apply({'params': prompted_vit.clip_params(tiny.params)}, _images(1, 64))
  assert out['grid'] == (8, 8)
  assert out['patches'].shape == (1, 8, 8, tiny.config.projection_dim)


def test_linear_matrix_is_jax_image_resize_and_pytorch_borders():
  # jax.image.resize's 'linear' (triangle kernel, half-pixel centres, out-of-range taps
  # dropped and the rest renormalised) equals PyTorch's clamped source index when
  # upsampling; an independent oracle for every row.
  for n_in, n_out in ((14, 32), (4, 6), (3, 7)):
    ref = np.asarray(jax.image.resize(jnp.eye(n_in), (n_out, n_in), 'linear'))
    np.testing.assert_allclose(prompted_vit.torch_linear_matrix(n_in, n_out), ref, atol=1e-6)
  np.testing.assert_array_equal(prompted_vit.torch_linear_matrix(5, 5), np.eye(5))
  # Hand case 2 -> 4: sources -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to index 1).
  np.testing.assert_allclose(prompted_vit.torch_linear_matrix(2, 4),
                             [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]], atol=1e-12)


def test_position_table_resize_keeps_cls():
  table = jax.random.normal(jax.random.PRNGKey(0), (1 + 4 * 4, 5))
  out = prompted_vit.resize_position_embeddings(table, (6, 3))
  assert out.shape == (1 + 18, 5)
  np.testing.assert_array_equal(out[0], table[0])
  ref = jax.image.resize(table[1:].reshape(4, 4, 5), (6, 3, 5), 'linear', antialias=False)
  np.testing.assert_allclose(out[1:].reshape(6, 3, 5), ref, atol=1e-5)
  with pytest.raises(ValueError, match='not 1 \\+ a square grid'):
    prompted_vit.resize_position_embeddings(table[:-1], (2, 2))
