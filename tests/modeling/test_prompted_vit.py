"""The deep-prompted CLIP ViT (modeling/prompted_vit.py, ZegCLIP's image encoder).

Oracles: transformers' own FlaxCLIPVisionModel (no prompts, native grid), a float64 numpy
loop over transformers' encoder layers with the prompts spliced in by hand, and
jax.image.resize's Keys kernel for the interior rows of the bicubic matrix.
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


def test_without_prompts_it_is_clips_vision_tower(tiny):
  cfg = tiny.config.vision_config
  vision = tiny.params['vision_model']
  images = _images(2, 32)
  enc = prompted_vit.PromptedCLIPVisionEncoder(cfg, num_prompts=0, prompt_depth=0,
                                               out_indices=(0, 2))
  out = enc.apply({'params': vision}, images)
  ref = tiny.module.apply({'params': tiny.params}, images, method=lambda m, x: m.vision_model(
      pixel_values=x, output_hidden_states=True, deterministic=True))
  np.testing.assert_allclose(out['cls'], ref.pooler_output, atol=1e-5)
  for k, i in enumerate((0, 2)):   # hidden_states[0] is the embedding output
    np.testing.assert_allclose(out['layers'][k].reshape(2, 16, -1),
                               ref.hidden_states[i + 1][:, 1:], atol=1e-5)
  assert out['grid'] == (4, 4)


def test_deep_prompts_against_a_hand_spliced_loop(tiny):
  """Layer i runs on [CLS, prompts_i, patches]; layers past prompt_depth keep the last
  prompts' outputs in the sequence; outputs are the patch tokens."""
  cfg = tiny.config.vision_config
  vision = tiny.params['vision_model']
  enc = prompted_vit.PromptedCLIPVisionEncoder(cfg, num_prompts=3, prompt_depth=2,
                                               out_indices=(0, 1, 2))
  images = _images(2, 32, seed=1)
  params = enc.init(jax.random.PRNGKey(3), images)['params']
  prompts = np.asarray(params['deep_prompts'])
  assert prompts.shape == (2, 3, cfg.hidden_size)
  v = np.sqrt(6.0 / (3 * 8 * 8 + cfg.hidden_size))
  assert prompts.min() >= -v and prompts.max() < v and prompts.std() > v / 3
  params = dict(vision, deep_prompts=params['deep_prompts'])
  out = enc.apply({'params': params}, images)

  from transformers.models.clip.modeling_flax_clip import FlaxCLIPEncoderLayer
  layer = FlaxCLIPEncoderLayer(cfg)
  emb = tiny.module.apply({'params': tiny.params}, images, method=lambda m, x: (
      m.vision_model.pre_layrnorm(m.vision_model.embeddings(x))))
  x = np.asarray(emb)
  for i in range(3):
    if i < 2:
      x = np.concatenate([x[:, :1], np.broadcast_to(prompts[i], (2, 3, x.shape[-1])),
                          x[:, -16:]], axis=1)
    x = np.asarray(layer.apply({'params': vision['encoder']['layers'][str(i)]}, x, None)[0])
    np.testing.assert_allclose(out['layers'][i].reshape(2, 16, -1), x[:, -16:], atol=1e-5)
  assert x.shape[1] == 1 + 3 + 16
  # The prompts matter: zero them and the last layer's tokens move.
  zero = enc.apply({'params': dict(params, deep_prompts=jnp.zeros_like(prompts))}, images)
  assert float(jnp.abs(zero['layers'][-1] - out['layers'][-1]).max()) > 1e-3


def test_gradients_reach_the_prompts(tiny):
  cfg = tiny.config.vision_config
  enc = prompted_vit.PromptedCLIPVisionEncoder(cfg, num_prompts=2, prompt_depth=3,
                                               out_indices=(2,))
  images = _images(1, 32)
  params = dict(tiny.params['vision_model'],
                deep_prompts=enc.init(jax.random.PRNGKey(0), images)['params']['deep_prompts'])
  g = jax.grad(lambda p: jnp.sum(enc.apply({'params': p}, images)['patches'] ** 2))(params)
  per_layer = np.abs(np.asarray(g['deep_prompts'])).sum(axis=(1, 2))
  assert (per_layer > 0).all(), per_layer


def test_larger_input_resizes_the_position_table(tiny):
  cfg = tiny.config.vision_config
  enc = prompted_vit.PromptedCLIPVisionEncoder(cfg, num_prompts=0, prompt_depth=0,
                                               out_indices=(2,))
  out = enc.apply({'params': tiny.params['vision_model']}, _images(1, 64))
  assert out['grid'] == (8, 8) and out['patches'].shape == (1, 8, 8, cfg.hidden_size)


def test_bicubic_matrix_interior_matches_keys_kernel_and_borders_clamp():
  # a = -0.5 is Keys' kernel, jax.image.resize's; away from the borders (no clamping) the
  # rows must agree with it.
  w = prompted_vit.torch_bicubic_matrix(14, 32, a=-0.5)
  ref = np.asarray(jax.image.resize(jnp.eye(14), (32, 14), 'bicubic'))   # [32, 14] = rows
  interior = slice(5, 27)
  np.testing.assert_allclose(w[interior], ref[interior], atol=1e-6)
  ramp = np.arange(14.0)        # Keys' kernel reproduces linear functions (a = -0.75 does not)
  x = (np.arange(32) + 0.5) * 14 / 32 - 0.5
  np.testing.assert_allclose((w @ ramp)[interior], x[interior], atol=1e-12)
  w = prompted_vit.torch_bicubic_matrix(14, 32)
  np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-12)      # constants stay constant
  assert np.abs(w - prompted_vit.torch_bicubic_matrix(14, 32, a=-0.5)).max() > 1e-3
  np.testing.assert_array_equal(prompted_vit.torch_bicubic_matrix(7, 7), np.eye(7))
  # Hand case, 2 -> 4, first output: x = -0.25, taps at -2, -1, 0, 1 clamped to 0, 0, 0, 1,
  # weights k(1.75), k(0.75), k(0.25), k(1.25) of the a = -0.75 kernel.
  a = -0.75
  far = lambda t: ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  near = lambda t: ((a + 2) * t - (a + 3)) * t * t + 1
  first = prompted_vit.torch_bicubic_matrix(2, 4)[0]
  np.testing.assert_allclose(first, [far(1.75) + near(0.75) + near(0.25), far(1.25)],
                             atol=1e-12)


def test_position_table_resize_keeps_cls():
  table = jax.random.normal(jax.random.PRNGKey(0), (1 + 4 * 4, 5))
  out = prompted_vit.resize_position_embeddings(table, (6, 3))
  assert out.shape == (1 + 18, 5)
  np.testing.assert_array_equal(out[0], table[0])
  rows, cols = (prompted_vit.torch_bicubic_matrix(4, n) for n in (6, 3))
  expect = np.einsum('hi,ijd,wj->hwd', rows, np.asarray(table[1:], np.float64).reshape(4, 4, 5),
                     cols)
  np.testing.assert_allclose(out[1:].reshape(6, 3, 5), expect, atol=1e-5)
  with pytest.raises(ValueError, match='not 1 \\+ a square grid'):
    prompted_vit.resize_position_embeddings(table[:-1], (2, 2))
