"""ZegCLIP's head and loss (modeling/zegclip.py, zegclip_loss.py) against float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np

from zegformer_jax.modeling import zegclip
from zegformer_jax.modeling import zegclip_loss


def _ln(x, p, eps=1e-5):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p['scale']) + np.asarray(p['bias'])


def _dense(x, p):
  return x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)


def _numpy_head(params, dense, g, text, num_layers, heads):
  b, h, w, e = dense.shape
  tokens = dense.reshape(b, h * w, e)
  q = np.concatenate([text[None] * g[:, None], np.broadcast_to(text, (b,) + text.shape)], -1)
  q = _dense(q, params['q_proj'])
  hd = e // heads
  for i in range(num_layers):
    p = params[f'layers_{i}']
    a = p['cross_attn']
    qq = _dense(q, a['q']).reshape(b, -1, heads, hd)
    kk = _dense(tokens, a['k']).reshape(b, -1, heads, hd)
    vv = _dense(tokens, a['v']).reshape(b, -1, heads, hd)
    logits = np.zeros((b, heads, q.shape[1], h * w))
    out = np.zeros((b, q.shape[1], heads, hd))
    for bi in range(b):
      for hi in range(heads):
        lg = qq[bi, :, hi] @ kk[bi, :, hi].T / np.sqrt(hd)
        logits[bi, hi] = lg
        sm = np.exp(lg - lg.max(-1, keepdims=True))
        sm /= sm.sum(-1, keepdims=True)
        out[bi, :, hi] = sm @ vv[bi, :, hi]
    x = _ln(q + _dense(out.reshape(b, -1, e), a['proj']), p['norm2'])
    y = _dense(np.maximum(_dense(x, p['linear1']), 0), p['linear2'])
    q = _ln(x + y, p['norm3'])
    mask = logits.mean(axis=1)                                  # [B, C, T], last layer wins
  return mask.transpose(0, 2, 1).reshape(b, h, w, -1)


def test_relationship_descriptor():
  t = np.random.RandomState(0).randn(3, 4)
  g = np.random.RandomState(1).randn(2, 4)
  out = np.asarray(zegclip.relationship_descriptor(jnp.asarray(t), jnp.asarray(g)))
  assert out.shape == (2, 3, 8)
  for b in range(2):
    for c in range(3):
      np.testing.assert_allclose(out[b, c], np.concatenate([t[c] * g[b], t[c]]), rtol=1e-6)


def test_head_against_numpy():
  rng = np.random.RandomState(0)
  dense = rng.randn(2, 3, 4, 16).astype(np.float32)
  g = rng.randn(2, 16).astype(np.float32)
  text = rng.randn(5, 16).astype(np.float32)
  head = zegclip.ZegCLIPHead(num_layers=2, num_heads=4, ffn_dim=32)
  params = head.init(jax.random.PRNGKey(0), dense, g, text)['params']
  # Non-trivial LayerNorms and biases, so the oracle sees every term.
  params = jax.tree_util.tree_map(
      lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
  out = np.asarray(head.apply({'params': params}, dense, g, text))
  assert out.shape == (2, 3, 4, 5) and out.dtype == np.float32
  p64 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  ref = _numpy_head(p64, dense.astype(np.float64), g.astype(np.float64),
                    text.astype(np.float64), 2, 4)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_calibrated_scores():
  logits = jnp.asarray([[0.0, 0.2, -0.1]])
  seen = jnp.asarray([True, True, False])
  s = np.asarray(zegclip.calibrated_scores(logits, seen))
  sig = 1 / (1 + np.exp(-np.asarray(logits)))
  np.testing.assert_allclose(s, sig - [[0.1, 0.1, 0.0]], rtol=1e-6)
  assert int(np.argmax(s)) == 2 and int(np.argmax(sig)) == 1   # the penalty flips it


def _numpy_loss(logits, label, c, ignore, valid):
  b = logits.shape[0]
  focal, dice, n = 0.0, 0.0, 0
  for bi in range(b):
    keep = valid[bi]
    for ci in range(c):
      x = logits[bi, ..., ci][keep]
      y = (label[bi][keep] == ci).astype(np.float64)
      p = 1 / (1 + np.exp(-x))
      ce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
      p_t = p * y + (1 - p) * (1 - y)
      a_t = 0.25 * y + 0.75 * (1 - y)
      focal += np.mean(a_t * ce * (1 - p_t) ** 2)
      if y.sum() > 0:
        n += 1
        dice += 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
  n = max(n, 1)
  return 100 * focal / n + dice / n, focal / n, dice / n, n


def test_loss_against_numpy_with_ignore_and_padding():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 5, 6, 4) * 2
  label = rng.randint(0, 4, (2, 5, 6))
  label[0, 0, :] = 255                     # ignored: negatives for every class
  label[1][label[1] == 3] = 2              # class 3 absent from image 1
  valid = np.ones((2, 5, 6), bool)
  valid[1, :, 4:] = False                  # padding: left out
  loss, terms = zegclip_loss.zegclip_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(label),
                                          4, 255, jnp.asarray(valid))
  ref, focal, dice, n = _numpy_loss(logits, label, 4, 255, valid)
  assert float(terms['num_masks']) == n == 7
  np.testing.assert_allclose(float(terms['loss_focal']), focal, rtol=1e-5)
  np.testing.assert_allclose(float(terms['loss_dice']), dice, rtol=1e-5)
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  # Without valid_pixels every pixel counts (ZegCLIP's 255 padding as negatives).
  loss_all, _ = zegclip_loss.zegclip_loss(jnp.asarray(logits, jnp.float32),
                                          jnp.asarray(label), 4, 255)
  np.testing.assert_allclose(float(loss_all),
                             _numpy_loss(logits, label, 4, 255, np.ones_like(valid))[0],
                             rtol=1e-5)


def test_focal_hand_value():
  # logit 0, positive: p = 0.5, ce = ln 2, (1 - p_t)^2 = 0.25, alpha 0.25.
  v = float(zegclip_loss.sigmoid_focal(jnp.asarray(0.0), jnp.asarray(1.0)))
  np.testing.assert_allclose(v, 0.25 * np.log(2) * 0.25, rtol=1e-6)
  # A confident right negative costs almost nothing; a confident wrong one a lot.
  assert float(zegclip_loss.sigmoid_focal(jnp.asarray(-8.0), jnp.asarray(0.0))) < 1e-6
  assert float(zegclip_loss.sigmoid_focal(jnp.asarray(8.0), jnp.asarray(0.0))) > 5
  # Gradients are finite at large logits.
  g = jax.grad(lambda x: zegclip_loss.sigmoid_focal(x, 1.0))(jnp.asarray(-60.0))
  assert np.isfinite(float(g))


def _tiny_clip(tmp_path):
  from zegformer_jax.modeling import clip
  path = str(tmp_path / 'clip')
  clip.create_tiny_clip(path, vocab_words=['cat'], vision_layers=2, image_size=32,
                        patch_size=8, seed=0)
  return clip.load_clip(path)[0]


def test_model_trains_prompts_and_head_only(tmp_path):
  """A tiny CLIP loaded by the path of openai/clip-vit-base-patch16; a few AdamW steps on a
  toy task: CLIP's weights sit in 'frozen' (no gradient, no optimiser state), the loss
  falls, the prompts and the head move, CLIP's weights cannot."""
  import optax
  from flax import traverse_util
  clip_model = _tiny_clip(tmp_path)
  model = zegclip.ZegCLIP(clip_model.config.vision_config, clip_model.config.projection_dim,
                          num_prompts=4, prompt_depth=2, num_layers=2, num_heads=4, ffn_dim=64)
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randn(2, 48, 48, 3), jnp.float32)     # 6 x 6 patches: resized table
  text = rng.randn(3, clip_model.config.projection_dim)
  text = jnp.asarray(text / np.linalg.norm(text, axis=-1, keepdims=True), jnp.float32)
  label = jnp.asarray(np.repeat(np.repeat(rng.randint(0, 3, (2, 6, 6)), 8, 1), 8, 2))
  variables = model.init(jax.random.PRNGKey(0), images, text)
  params = variables['params']
  frozen = zegclip.with_clip_weights(variables['frozen'], clip_model.params)
  assert sorted(params) == ['head', 'image_encoder']
  assert sorted(params['image_encoder']) == ['deep_prompts', 'prompt_norm', 'prompt_proj']
  np.testing.assert_array_equal(
      frozen['image_encoder']['encoder']['layers']['0']['mlp']['fc1']['kernel'],
      clip_model.params['vision_model']['encoder']['layers']['0']['mlp']['fc1']['kernel'])
  out = model.apply({'params': params, 'frozen': frozen}, images, text)
  assert out['mask_logits'].shape == (2, 6, 6, 3)
  assert out['sem_seg_logits'].shape == (2, 48, 48, 3)

  tx = optax.adamw(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, key):
    def loss_fn(p):
      o = model.apply({'params': p, 'frozen': frozen}, images, text, train=True,
                      rngs={'dropout': key})
      return zegclip_loss.zegclip_loss(o['sem_seg_logits'], label, 3, 255)[0]
    loss, g = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  new = params
  for i in range(30):
    new, opt, loss = step(new, opt, jax.random.PRNGKey(i))
    losses.append(float(loss))
  assert losses[-1] < 0.75 * losses[0], losses      # 10.71 -> 6.88 when written
  before, after = traverse_util.flatten_dict(params), traverse_util.flatten_dict(new)
  moved = [k for k in before if not np.array_equal(after[k], before[k])]
  assert any(k[1] == 'deep_prompts' for k in moved) and any(k[0] == 'head' for k in moved)


def test_with_clip_weights_names_a_shape_mismatch(tmp_path):
  import pytest
  clip_model = _tiny_clip(tmp_path)
  cfg = clip_model.config.vision_config
  model = zegclip.ZegCLIP(cfg, clip_model.config.projection_dim, num_prompts=2,
                          prompt_depth=1, num_layers=1, num_heads=4, ffn_dim=16)
  frozen = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                      jnp.ones((2, clip_model.config.projection_dim)))['frozen']
  other = jax.tree_util.tree_map(lambda x: x, clip_model.params)
  other['visual_projection'] = {'kernel': np.zeros((cfg.hidden_size, 7), np.float32)}
  with pytest.raises(ValueError, match=r"image_encoder/visual_projection/kernel has shape "
                                       r"\(64, 7\), the model wants"):
    zegclip.with_clip_weights(frozen, other)
  other = dict(clip_model.params, vision_model=dict(clip_model.params['vision_model']))
  del other['vision_model']['post_layernorm']
  with pytest.raises(ValueError, match=r"do not cover the image encoder: no "
                                       r"\['image_encoder/post_layernorm/bias', "):
    zegclip.with_clip_weights(frozen, other)


def test_learnable_parameters_match_zegclips_readme():
  """ViT-B/16 shapes at 512 px, nothing computed (eval_shape). ZegCLIP's README gives 13.8M
  (VOC, 10 prompts) and 14.6M (COCO-Stuff, 100 prompts) learnable parameters; its decoder
  layers are torch TransformerDecoderLayers whose self-attention (in_proj 3·512² + 3·512,
  out_proj 512² + 512) and norm1 (2·512) exist but are never called: 1,051,648 per layer,
  3,154,944 for three, counted there and absent here."""
  from flax import traverse_util
  from transformers import CLIPVisionConfig
  vit_b16 = CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, image_size=224, patch_size=16)
  unused = 3 * (3 * 512 * 512 + 3 * 512 + 512 * 512 + 512 + 2 * 512)
  assert unused == 3_154_944
  for prompts, readme in ((10, 13.8e6), (100, 14.6e6)):
    model = zegclip.ZegCLIP(vit_b16, 512, num_prompts=prompts, prompt_depth=12)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                               jnp.zeros((1, 512, 512, 3)),
                                               jnp.zeros((20, 512))))
    count = lambda tree: sum(int(np.prod(v.shape))
                             for v in traverse_util.flatten_dict(tree).values())
    learnable = count(shapes['params'])
    by_hand = (12 * prompts * 768 + 768 * 768 + 768 + 2 * 768          # prompts, proj, norm
               + 1024 * 512 + 512                                       # q_proj
               + 3 * (4 * (512 * 512 + 512) + 512 * 2048 + 2048 + 2048 * 512 + 512
                      + 4 * 512))                                       # 3 decoder layers
    assert learnable == by_hand
    assert abs((learnable + unused) - readme) < 0.06e6, (prompts, learnable + unused)
    frozen = count(shapes['frozen'])
    # CLIP ViT-B/16's image tower with its 14x14+1 position table and the projection.
    assert frozen == 85_799_424 + 768 * 512, frozen


def test_clip_table_resized_once_to_the_input_resolution(tmp_path):
  """ZegCLIP's init_weights: CLIP's 4 x 4 (tiny) position grid becomes the model's 6 x 6
  table for 48-px inputs, the [CLS] row kept; at 48 px the forward pass uses it as it is."""
  clip_model = _tiny_clip(tmp_path)
  model = zegclip.ZegCLIP(clip_model.config.vision_config, clip_model.config.projection_dim,
                          num_prompts=2, prompt_depth=1, num_layers=1, num_heads=4, ffn_dim=16,
                          input_resolution=48)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3)),
                         jnp.ones((2, clip_model.config.projection_dim)))
  frozen = zegclip.with_clip_weights(variables['frozen'], clip_model.params)
  table = np.asarray(frozen['image_encoder']['embeddings']['position_embedding']['embedding'])
  clip_table = np.asarray(clip_model.params['vision_model']['embeddings']['position_embedding']
                          ['embedding'])
  assert clip_table.shape == (17, 64) and table.shape == (37, 64)
  np.testing.assert_array_equal(table[0], clip_table[0])
  # Oracle: PyTorch's bilinear (align_corners=False) weights written out per output index.
  def weights(n_in, n_out):
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
      x = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
      lo = int(np.floor(x))
      hi = min(lo + 1, n_in - 1)
      w[i, lo] += 1 - (x - lo)
      w[i, hi] += x - lo
    return w
  grid = clip_table[1:].reshape(4, 4, 64).astype(np.float64)
  ref = np.einsum('hi,ijd,wj->hwd', weights(4, 6), grid, weights(4, 6))
  np.testing.assert_allclose(table[1:].reshape(6, 6, 64), ref, rtol=1e-6, atol=1e-7)


def test_class_embedding_twice_is_zegclips_cls_input(tmp_path):
  """ZegCLIP's [CLS] input is class_embedding + (position 0 + class_embedding): the same
  as CLIP's encoder with the class embedding added to position row 0 by hand."""
  from zegformer_jax.modeling import prompted_vit
  clip_model = _tiny_clip(tmp_path)
  cfg = clip_model.config.vision_config
  images = jnp.asarray(np.random.RandomState(0).randn(2, 32, 32, 3), jnp.float32)
  params = prompted_vit.clip_params(clip_model.params)
  twice = prompted_vit.PromptedCLIPVisionEncoder(cfg, 64, 0, 0, class_embedding_twice=True)
  plain = prompted_vit.PromptedCLIPVisionEncoder(cfg, 64, 0, 0)
  emb = params['embeddings']
  edited = dict(params, embeddings=dict(emb, position_embedding={
      'embedding': emb['position_embedding']['embedding'].at[0].add(emb['class_embedding'])}))
  a = twice.apply({'params': params}, images)['cls']
  b = plain.apply({'params': edited}, images)['cls']
  c = plain.apply({'params': params}, images)['cls']
  np.testing.assert_allclose(a, b, atol=1e-6)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_check_clip_names_the_first_differing_key(tmp_path):
  import ml_collections
  import pytest
  from configs import common
  clip_model = _tiny_clip(tmp_path)     # 32-px images, 8-px patches, width 64, D = 64
  cfg = ml_collections.ConfigDict({'embed_dim': 64, 'zegclip': common.zegclip_model_config()})
  with pytest.raises(ValueError, match=r"^CLIP at W/clip has vision_config.hidden_size = 64; "
                                       r"config.model.zegclip.vision.hidden_size is 768$"):
    zegclip.check_clip(cfg, clip_model, 'W/clip')
  v = cfg.zegclip.vision
  v.hidden_size, v.intermediate_size, v.num_hidden_layers = 64, 256, 2
  v.num_attention_heads, v.image_size, v.patch_size = 4, 32, 16
  with pytest.raises(ValueError, match=r"vision_config.patch_size = 8; "
                                       r"config.model.zegclip.vision.patch_size is 16$"):
    zegclip.check_clip(cfg, clip_model, 'W/clip')
  v.patch_size = 8
  zegclip.check_clip(cfg, clip_model, 'W/clip')
  cfg.embed_dim = 512
  with pytest.raises(ValueError, match='projection_dim 64; config.model.embed_dim is 512'):
    zegclip.check_clip(cfg, clip_model, 'W/clip')
