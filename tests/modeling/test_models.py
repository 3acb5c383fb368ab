"""Model tests against independent oracles (numpy re-derivations, the official key list).

Full-size models are only traced (jax.eval_shape); real forward passes use the small
ShapesWorld variant, compiled a handful of times in total.
"""
import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import coco_stuff_r101
from configs import coco_stuff_r50
from configs import shapesworld
from zegformer_jax.tools import summary
from zegformer_jax.weights.zegformer import official_to_flax
from zegformer_jax.modeling import pixel_decoder
from zegformer_jax.modeling import resnet
from zegformer_jax.modeling import transformer
from zegformer_jax.modeling import zegformer

REFERENCE_KEYS = os.path.join(
    os.path.dirname(__file__), '..', '..', '..', 'shared', 'reference', 'data', 'derived',
    'zegformer_R50_state_dict_keys.json')
IMAGE_HW = (64, 64)
BATCH = 2


def _small_model_config(**decoder_overrides) -> ml_collections.ConfigDict:
  """The ShapesWorld model with dropout switched on (train=False must ignore it)."""
  c = ml_collections.ConfigDict(shapesworld.get_config().model.to_dict())
  c.decoder.dropout = 0.1
  for k, v in decoder_overrides.items():
    c.decoder[k] = v
  return c


def _text(key, k, d):
  t = jax.random.normal(key, (k, d))
  return t / jnp.linalg.norm(t, axis=-1, keepdims=True)


def _capture(mdl, method_name):
  del method_name
  return mdl.name in ('transformer', 'pixel_decoder')


@pytest.fixture(scope='module')
def small():
  """(model, variables, images, forward) for the small variant; forward is jitted once."""
  model = zegformer.build_model(_small_model_config())
  variables = zegformer.init_variables(model, jax.random.key(0), image_hw=IMAGE_HW,
                                       num_classes=5)
  images = jax.random.normal(jax.random.key(1), (BATCH, *IMAGE_HW, 3))

  fwd = jax.jit(
      lambda v, x, t, key, train: model.apply(
          v, x, t, train=train, rngs={'dropout': key}, capture_intermediates=_capture,
          mutable=['intermediates']),
      static_argnames='train')
  return model, variables, images, fwd


# ------------------------------------------------------------------- parameter counts


@pytest.mark.parametrize('config_module,with_frozen,without_frozen', [
    (coco_stuff_r50, 41_401_152, 41_348_032),
    (coco_stuff_r101, 60_393_280, 60_287_936),
])
def test_official_parameter_totals(config_module, with_frozen, without_frozen):
  table, total, trainable = summary.parameter_summary(config_module.get_config().model)
  assert (total, trainable) == (with_frozen, without_frozen)
  lines = table.splitlines()
  assert lines[-2] == f'total params: {with_frozen}'
  assert str(without_frozen) in lines[-1]
  for name in ('backbone', 'pixel_decoder', 'transformer', 'input_proj', 'query_embed',
               'mask_embed', 'semantic_proj', 'no_object_embedding'):
    assert any(line.startswith(name + ' ') for line in lines), name


def test_variables_match_official_state_dict_keys():
  """Every official R-50 tensor maps onto exactly one of ours (q/k/v split), shapes agree."""
  if not os.path.isfile(REFERENCE_KEYS):  # ../shared is beside the checkout only in the workspace
    pytest.skip(f'{os.path.normpath(REFERENCE_KEYS)} is absent')
  with open(REFERENCE_KEYS) as f:
    keys = json.load(f)['keys']
  shapes = zegformer.variable_shapes(coco_stuff_r50.get_config().model)
  ours = {}
  for coll in ('params', 'frozen'):
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes[coll]):
      ours[(coll, tuple(p.key for p in path))] = tuple(leaf.shape)
  mapped = {}
  for entry in keys:
    if entry['key'] in ('criterion.empty_weight', 'sem_seg_head.predictor.logit_scale'):
      continue
    for coll, path, shape in official_to_flax(entry['key'], entry['shape']):
      assert (coll, path) not in mapped
      mapped[(coll, path)] = shape
  assert set(mapped) == set(ours), (set(mapped) ^ set(ours))
  assert mapped == ours


def test_naming_contract_and_k_independence():
  cfg = _small_model_config()
  model = zegformer.build_model(cfg)
  shapes = {k: jax.eval_shape(lambda k=k: zegformer.init_variables(
      model, jax.random.key(0), image_hw=IMAGE_HW, num_classes=k)) for k in (5, 7)}
  params = shapes[5]['params']
  assert set(params) == {'backbone', 'pixel_decoder', 'transformer', 'input_proj',
                         'query_embed', 'mask_embed', 'semantic_proj', 'no_object_embedding'}
  assert set(shapes[5]['frozen']) == {'backbone'}
  assert params['no_object_embedding'].shape == (cfg.embed_dim,)
  assert params['query_embed'].shape == (cfg.decoder.num_queries, cfg.decoder.hidden_dim)
  # Nothing depends on the number of classes.
  assert jax.tree_util.tree_structure(shapes[5]) == jax.tree_util.tree_structure(shapes[7])
  assert jax.tree_util.tree_leaves(shapes[5]) == jax.tree_util.tree_leaves(shapes[7])
  # Norm modules (and only they) carry 'norm' in their module names: each holds scale+bias.
  norm_modules = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params):
    names = [p.key for p in path]
    if any('norm' in n for n in names[:-1]):
      norm_modules.setdefault(tuple(names[:-1]), set()).add(names[-1])
  assert norm_modules and all(v == {'scale', 'bias'} for v in norm_modules.values())
  # GroupNorm in the pixel decoder: 7 of them; LayerNorm: 3 per layer + the final one.
  assert sum(p[0] == 'pixel_decoder' for p in norm_modules) == 7
  assert sum(p[0] == 'transformer' for p in norm_modules) == 3 * cfg.decoder.num_layers + 1


def test_bfloat16_compute_returns_float32():
  cfg = _small_model_config()
  cfg.dtype = 'bfloat16'
  model = zegformer.build_model(cfg)
  variables = jax.eval_shape(lambda: zegformer.init_variables(model, jax.random.key(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  out = jax.eval_shape(lambda v: model.apply(
      v, jnp.zeros((1, *IMAGE_HW, 3)), jnp.zeros((3, cfg.embed_dim)), train=False), variables)
  assert {k: v.dtype for k, v in out.items()} == {
      'pred_logits': jnp.float32, 'pred_masks': jnp.float32,
      'semantic_embeddings': jnp.float32}


def test_resnet50_feature_shapes():
  cfg = coco_stuff_r50.get_config().model.backbone
  net = resnet.ResNet(tuple(cfg.block_counts), cfg.stem_width, cfg.bottleneck)
  x = jnp.zeros((1, 64, 96, 3))
  out = jax.eval_shape(lambda: net.init_with_output(jax.random.key(0), x)[0])
  assert {k: v.shape for k, v in out.items()} == {
      'res2': (1, 16, 24, 256), 'res3': (1, 8, 12, 512), 'res4': (1, 4, 6, 1024),
      'res5': (1, 2, 3, 2048)}


# ------------------------------------------------------------------- building blocks


def test_position_embedding_sine_matches_numpy():
  h, w, f = 3, 5, 8
  got = np.asarray(transformer.position_embedding_sine(h, w, f))
  want = np.zeros((h, w, 2 * f))
  for i in range(h):
    for j in range(w):
      coords = ((i + 1) / (h + 1e-6) * 2 * math.pi, (j + 1) / (w + 1e-6) * 2 * math.pi)
      for half, c in enumerate(coords):   # [pos_y, pos_x]
        for ch in range(f):
          t = c / 10000.0 ** (2 * (ch // 2) / f)
          want[i, j, half * f + ch] = math.sin(t) if ch % 2 == 0 else math.cos(t)
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_frozen_batchnorm_matches_numpy():
  rng = np.random.default_rng(0)
  c = 6
  x = rng.normal(size=(2, 3, 4, c)).astype(np.float32)
  stats = {'scale': rng.normal(size=c), 'bias': rng.normal(size=c),
           'mean': rng.normal(size=c), 'var': rng.uniform(0.1, 2.0, size=c)}
  stats = {k: v.astype(np.float32) for k, v in stats.items()}
  bn = resnet.FrozenBatchNorm()
  assert set(bn.init(jax.random.key(0), x)) == {'frozen'}
  got = bn.apply({'frozen': stats}, x)
  want = ((x - stats['mean']) / np.sqrt(stats['var'] + 1e-5)) * stats['scale'] + stats['bias']
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_conv_stride2_symmetric_padding_matches_numpy():
  """detectron2 7x7/2 conv pads 3 on every side (flax 'SAME' would not), then FrozenBN."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 8, 8, 3)).astype(np.float32)
  conv = resnet.Conv2d(4, 7, strides=2, norm='FrozenBN', activation=True)
  variables = jax.tree_util.tree_map(np.asarray, conv.init(jax.random.key(0), x))
  variables['frozen']['norm'] = {'scale': np.full(4, 2.0, np.float32),
                                 'bias': np.full(4, 0.5, np.float32),
                                 'mean': np.full(4, 0.1, np.float32),
                                 'var': np.full(4, 3.0, np.float32)}
  got = np.asarray(conv.apply(variables, x))
  k = variables['params']['kernel']
  xp = np.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))
  want = np.zeros((1, 4, 4, 4))
  for i in range(4):
    for j in range(4):
      want[0, i, j] = np.einsum('hwc,hwco->o', xp[0, 2 * i:2 * i + 7, 2 * j:2 * j + 7], k)
  want = np.maximum((want - 0.1) / np.sqrt(3.0 + 1e-5) * 2.0 + 0.5, 0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('strides,hw', [(1, 6), (2, 7), (2, 8)])
def test_conv1x1_as_matmul_matches_numpy_and_the_convolution(strides, hw):
  """The matmul form of a 1x1 conv: output and both gradients against float64 numpy (and
  the output against the convolution it replaces), odd sizes and stride 2 included."""
  rng = np.random.default_rng(strides + hw)
  x = rng.normal(size=(2, hw, hw, 5)).astype(np.float32)
  dy_shape = (2, -(-hw // strides), -(-hw // strides), 3)
  dy = rng.normal(size=dy_shape).astype(np.float32)
  conv = resnet.Conv2d(3, 1, strides=strides, use_bias=True)
  fast = resnet.Conv2d(3, 1, strides=strides, use_bias=True, conv1x1_as_matmul=True)
  params = conv.init(jax.random.key(0), x)['params']
  y, vjp = jax.vjp(lambda p, x: fast.apply({'params': p}, x), params, x)
  grads, dx = vjp(jnp.asarray(dy))
  w, b = np.float64(params['kernel'][0, 0]), np.float64(params['bias'])
  xs = np.float64(x)[:, ::strides, ::strides]
  np.testing.assert_allclose(y, xs @ w + b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(y, conv.apply({'params': params}, x), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grads['kernel'][0, 0], np.einsum('bhwc,bhwo->co', xs, dy),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(grads['bias'], dy.sum((0, 1, 2)), rtol=1e-5, atol=1e-5)
  want_dx = np.zeros(x.shape)
  want_dx[:, ::strides, ::strides] = dy @ w.T
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)


def test_conv1x1_as_matmul_is_on_for_the_recipes_and_off_for_the_demo():
  assert coco_stuff_r50.get_config().model.conv1x1_as_matmul
  assert not shapesworld.get_config().model.conv1x1_as_matmul


def _max_pool_oracle(x, dy):
  """F.max_pool2d(x, 3, 2, 1) and its gradient by loops: each window's gradient goes to
  its first maximum in row-major order, windows added in row-major order."""
  b, h, w, c = x.shape
  ho, wo = dy.shape[1:3]
  y = np.zeros(dy.shape, x.dtype)
  dx = np.zeros(x.shape, x.dtype)
  for n in range(b):
    for ch in range(c):
      for i in range(ho):
        for j in range(wo):
          best, at = -np.inf, None
          for ky in range(3):
            for kx in range(3):
              r, q = 2 * i + ky - 1, 2 * j + kx - 1
              if 0 <= r < h and 0 <= q < w and x[n, r, q, ch] > best:
                best, at = x[n, r, q, ch], (r, q)
          y[n, i, j, ch] = best
          dx[n, at[0], at[1], ch] += dy[n, i, j, ch]
  return y, dx


@pytest.mark.parametrize('hw', [(8, 8), (9, 6), (5, 7)])
def test_stem_max_pool_and_its_gradient_match_loops_and_nn_max_pool(hw):
  """The stem's max-pool against loops (ties go to the first maximum: integer values after a
  ReLU tie often) and bit for bit against nn.max_pool's value and gradient."""
  rng = np.random.default_rng(hw[0] * 10 + hw[1])
  x = np.maximum(rng.integers(-3, 4, size=(2, *hw, 3)), 0).astype(np.float32)
  x[1] += rng.normal(size=x[1].shape).astype(np.float32)           # and one without ties
  y, vjp = jax.vjp(resnet.max_pool_3x3_s2, jnp.asarray(x))
  dy = rng.normal(size=y.shape).astype(np.float32)
  (dx,) = vjp(jnp.asarray(dy))
  want_y, want_dx = _max_pool_oracle(x, dy)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_array_equal(dx, want_dx)
  ref = lambda v: nn.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  ref_y, ref_vjp = jax.vjp(ref, jnp.asarray(x))
  np.testing.assert_array_equal(y, ref_y)
  np.testing.assert_array_equal(dx, ref_vjp(jnp.asarray(dy))[0])


def test_resize_nearest_follows_pytorch_rule():
  x = jnp.arange(2 * 3 * 1, dtype=jnp.float32).reshape(1, 2, 3, 1)
  got = np.asarray(pixel_decoder.resize_nearest(x, (4, 7)))[0, ..., 0]
  rows = [(i * 2) // 4 for i in range(4)]
  cols = [(j * 3) // 7 for j in range(7)]
  np.testing.assert_array_equal(got, np.asarray(x)[0, ..., 0][np.ix_(rows, cols)])


def _np_layer_norm(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p['scale'] + p['bias']


def _np_mha(p, q_in, k_in, v_in, heads, key_mask=None):
  lin = lambda x, q: x @ q['kernel'] + q['bias']
  q, k, v = lin(q_in, p['query']), lin(k_in, p['key']), lin(v_in, p['value'])
  b, nq, d = q.shape
  dh = d // heads
  split = lambda t: t.reshape(b, t.shape[1], heads, dh).transpose(0, 2, 1, 3)
  logits = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(dh)
  if key_mask is not None:  # [b, nq, nk]; a query with no allowed key reads every key
    allowed = key_mask | ~key_mask.any(-1, keepdims=True)
    logits = np.where(allowed[:, None], logits, -1e30)
  wts = np.exp(logits - logits.max(-1, keepdims=True))
  wts /= wts.sum(-1, keepdims=True)
  out = (wts @ split(v)).transpose(0, 2, 1, 3).reshape(b, nq, d)
  return lin(out, p['out'])


def _np_decoder_layer(p, tgt, memory, pos, query_pos, heads, pre_norm, memory_mask=None):
  ffn = lambda x: np.maximum(x @ p['linear1']['kernel'] + p['linear1']['bias'], 0) @ (
      p['linear2']['kernel']) + p['linear2']['bias']
  if pre_norm:
    t = _np_layer_norm(tgt, p['norm1'])
    tgt = tgt + _np_mha(p['self_attn'], t + query_pos, t + query_pos, t, heads)
    t = _np_layer_norm(tgt, p['norm2'])
    tgt = tgt + _np_mha(p['multihead_attn'], t + query_pos, memory + pos, memory, heads,
                        memory_mask)
    return tgt + ffn(_np_layer_norm(tgt, p['norm3']))
  q = tgt + query_pos
  tgt = _np_layer_norm(tgt + _np_mha(p['self_attn'], q, q, tgt, heads), p['norm1'])
  tgt = _np_layer_norm(
      tgt + _np_mha(p['multihead_attn'], tgt + query_pos, memory + pos, memory, heads,
                    memory_mask), p['norm2'])
  return _np_layer_norm(tgt + ffn(tgt), p['norm3'])


@pytest.mark.parametrize('pre_norm', [False, True])
def test_decoder_matches_numpy(pre_norm):
  """One DETR decoder layer (dropout off) and the shared final norm, against numpy."""
  d, heads, ffn, nq, nk = 16, 4, 32, 5, 6
  ks = jax.random.split(jax.random.key(3), 5)
  tgt = jax.random.normal(ks[0], (2, nq, d))
  memory = jax.random.normal(ks[1], (2, nk, d))
  pos = jax.random.normal(ks[2], (1, nk, d))
  query_pos = jax.random.normal(ks[3], (1, nq, d))
  dec = transformer.TransformerDecoder(num_layers=2, d_model=d, num_heads=heads, ffn_dim=ffn,
                                       dropout=0.1, pre_norm=pre_norm)
  kw = dict(pos=pos, query_pos=query_pos, train=False)
  params = dec.init(ks[4], tgt, memory, **kw)['params']
  # Random norm affines so LayerNorm scale/bias are exercised too.
  params = jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * jax.random.normal(jax.random.key(len(str(path))), x.shape)
      if 'norm' in str(path) else x, params)
  got = np.asarray(dec.apply({'params': params}, tgt, memory, **kw))
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  args = [np.asarray(a, np.float64) for a in (tgt, memory, pos, query_pos)]
  x, want = args[0], []
  for i in range(2):
    x = _np_decoder_layer(p[f'layers_{i}'], x, *args[1:], heads, pre_norm)
    want.append(_np_layer_norm(x, p['norm']))
  assert got.shape == (2, 2, nq, d)
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-4)
  # q/k/v are separate [d, d] projections (the converter splits in_proj_weight in thirds).
  assert params['layers_0']['self_attn']['query']['kernel'].shape == (d, d)


def test_masked_attention_decoder_matches_numpy():
  """Mask2Former's masked cross-attention: layer i + 1 reads only the memory positions that
  memory_mask_fn allows for layer i's segment embeddings; an all-false row reads everything."""
  d, heads, ffn, nq, nk, layers = 16, 4, 32, 5, 12, 3
  ks = jax.random.split(jax.random.key(5), 6)
  tgt = jax.random.normal(ks[0], (2, nq, d))
  memory = jax.random.normal(ks[1], (2, nk, d))
  pos = jax.random.normal(ks[2], (1, nk, d))
  query_pos = jax.random.normal(ks[3], (1, nq, d))
  proj = np.asarray(jax.random.normal(ks[4], (2, d, nk)))

  def mask_rule(seg, xp):  # a stand-in for "mask logit >= 0"; query 0 of image 1 gets none
    m = xp.einsum('bqd,bdk->bqk', seg, proj) >= 0
    return m.at[1, 0].set(False) if xp is jnp else np.where(
        (np.arange(2)[:, None, None] == 1) & (np.arange(nq)[None, :, None] == 0), False, m)

  dec = transformer.TransformerDecoder(num_layers=layers, d_model=d, num_heads=heads,
                                       ffn_dim=ffn, dropout=0.0)
  kw = dict(pos=pos, query_pos=query_pos, train=False)
  params = dec.init(ks[5], tgt, memory, **kw)['params']
  got = np.asarray(dec.apply({'params': params}, tgt, memory, **kw,
                             memory_mask_fn=lambda seg: mask_rule(seg, jnp)))
  plain = np.asarray(dec.apply({'params': params}, tgt, memory, **kw))
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
  args = [np.asarray(a, np.float64) for a in (tgt, memory, pos, query_pos)]
  x, want, mask, allowed = args[0], [], None, []
  for i in range(layers):
    x = _np_decoder_layer(p[f'layers_{i}'], x, *args[1:], heads, False, mask)
    want.append(_np_layer_norm(x, p['norm']))
    mask = mask_rule(want[-1], np)
    allowed.append(mask.mean())
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(got[0], plain[0], rtol=1e-6, atol=1e-6)   # layer 0: unmasked
  assert np.abs(got[1:] - plain[1:]).max() > 1e-2                      # the mask matters
  assert all(0.2 < a < 0.8 for a in allowed), allowed                  # a real mask


# ------------------------------------------------------------------- full (small) model


def test_init_values(small):
  model, variables, _, _ = small
  cfg = model.config
  t0 = np.asarray(variables['params']['no_object_embedding'])
  assert np.abs(t0).max() <= 1 / math.sqrt(cfg.embed_dim) and t0.std() > 0
  q = np.asarray(variables['params']['query_embed'])
  assert 0.8 < q.std() < 1.2                                    # N(0, 1)
  frozen = variables['frozen']['backbone']['stem']['conv1']['norm']
  np.testing.assert_array_equal(frozen['scale'], 1)
  np.testing.assert_array_equal(frozen['var'], 1)
  np.testing.assert_array_equal(frozen['mean'], 0)
  np.testing.assert_array_equal(variables['params']['input_proj']['bias'], 0)


def test_small_forward_shapes_and_eq1(small):
  """Output shapes; semantic embeddings, Eq. 1 logits and masks re-derived in numpy."""
  model, variables, images, fwd = small
  cfg = model.config
  k, layers, q = 5, cfg.decoder.num_layers, cfg.decoder.num_queries
  text = _text(jax.random.key(4), k, cfg.embed_dim)
  # Scale T_0 so that its norm is clearly not 1: the no-object logit must use it as is.
  params = dict(variables['params'])
  params['no_object_embedding'] = params['no_object_embedding'] * 7.0
  variables = {'params': params, 'frozen': variables['frozen']}
  out, state = fwd(variables, images, text, jax.random.key(0), train=False)
  h4, w4 = IMAGE_HW[0] // 4, IMAGE_HW[1] // 4
  assert out['pred_logits'].shape == (layers, BATCH, q, k + 1)
  assert out['pred_masks'].shape == (layers, BATCH, q, h4, w4)
  assert out['semantic_embeddings'].shape == (layers, BATCH, q, cfg.embed_dim)
  assert all(np.isfinite(np.asarray(v)).all() for v in out.values())

  inter = state['intermediates']
  seg = np.asarray(inter['transformer']['__call__'][0], np.float64)   # segment embeddings
  mask_features = np.asarray(inter['pixel_decoder']['__call__'][0], np.float64)
  assert seg.shape == (layers, BATCH, q, cfg.decoder.hidden_dim)
  assert mask_features.shape == (BATCH, h4, w4, cfg.pixel_decoder.mask_dim)
  p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)

  sem = seg @ p['semantic_proj']['kernel'] + p['semantic_proj']['bias']
  sem /= np.linalg.norm(sem, axis=-1, keepdims=True)
  np.testing.assert_allclose(out['semantic_embeddings'], sem, rtol=1e-4, atol=1e-5)

  t0 = p['no_object_embedding']
  assert abs(np.linalg.norm(t0) - 1) > 0.5
  want = 100.0 * np.concatenate(
      [sem @ np.asarray(text, np.float64).T, (sem @ t0)[..., None]], axis=-1)
  np.testing.assert_allclose(out['pred_logits'], want, rtol=1e-4, atol=2e-3)
  normalised = 100.0 * sem @ (t0 / np.linalg.norm(t0))
  assert np.abs(np.asarray(out['pred_logits'])[..., -1] - normalised).max() > 1.0

  m = seg
  for i in range(cfg.mask_embed_layers):
    m = m @ p['mask_embed'][f'layers_{i}']['kernel'] + p['mask_embed'][f'layers_{i}']['bias']
    if i < cfg.mask_embed_layers - 1:
      m = np.maximum(m, 0)
  masks = np.einsum('lbqc,bhwc->lbqhw', m, mask_features)
  np.testing.assert_allclose(out['pred_masks'], masks, rtol=1e-4,
                             atol=1e-4 * np.abs(masks).max())
  # Eq. 1 helper agrees with the model.
  np.testing.assert_allclose(
      zegformer.eq1_logits(out['semantic_embeddings'], text, params['no_object_embedding']),
      out['pred_logits'], rtol=1e-6, atol=1e-5)


def test_masked_attention_reads_previous_layer_mask_foreground():
  """model.decoder.masked_attention: the cross-attention of layer l + 1 reads exactly the
  memory positions where the model's own pred_masks[l] logit is >= 0 (memory is the
  stride-4 pixel embedding in the ShapesWorld model, so no resize)."""
  model = zegformer.build_model(_small_model_config(masked_attention=True))
  variables = zegformer.init_variables(model, jax.random.key(0), image_hw=IMAGE_HW,
                                       num_classes=5)
  images = jax.random.normal(jax.random.key(1), (BATCH, *IMAGE_HW, 3))
  text = _text(jax.random.key(2), 5, model.config.embed_dim)
  out, inter = model.apply(
      variables, images, text, train=False, mutable=['intermediates'],
      capture_intermediates=lambda mdl, _: mdl.name in ('transformer', 'input_proj'))
  inter = inter['intermediates']
  memory = inter['input_proj']['__call__'][0]                     # [B, h, w, hidden]
  b, h, w, hidden = memory.shape
  masks = [np.asarray(m >= 0).reshape(b, m.shape[1], h * w) for m in out['pred_masks']]
  assert 0.05 < np.mean(masks[0]) < 0.95                          # a real, partial mask
  calls = iter(masks)
  dec = model.config.decoder
  standalone = transformer.TransformerDecoder(
      num_layers=dec.num_layers, d_model=hidden, num_heads=dec.num_heads,
      ffn_dim=dec.ffn_dim, dropout=dec.dropout, pre_norm=dec.pre_norm)
  query_embed = variables['params']['query_embed']
  want = standalone.apply(
      {'params': variables['params']['transformer']},
      jnp.zeros((b, dec.num_queries, hidden)), memory.reshape(b, h * w, hidden),
      pos=transformer.position_embedding_sine(h, w, hidden // 2).reshape(1, h * w, hidden),
      query_pos=query_embed[None], train=False, memory_mask_fn=lambda _: next(calls))
  np.testing.assert_allclose(inter['transformer']['__call__'][0], want, rtol=1e-5, atol=1e-5)
  unmasked = model.clone(config=ml_collections.FrozenConfigDict(
      _small_model_config(masked_attention=False)))
  plain = unmasked.apply(variables, images, text, train=False)
  np.testing.assert_allclose(out['pred_masks'][0], plain['pred_masks'][0], rtol=1e-5,
                             atol=1e-5)
  assert np.abs(out['pred_masks'][-1] - plain['pred_masks'][-1]).max() > 1e-3


def test_k_independence_and_determinism(small):
  """Same params serve K=5 and K=7; train=False ignores the dropout rng."""
  model, variables, images, fwd = small
  d = model.config.embed_dim
  text7 = _text(jax.random.key(5), 7, d)
  out5a, _ = fwd(variables, images, text7[:5], jax.random.key(0), train=False)
  out5b, _ = fwd(variables, images, text7[:5], jax.random.key(1), train=False)
  out7, _ = fwd(variables, images, text7, jax.random.key(0), train=False)
  for key in out5a:
    np.testing.assert_array_equal(out5a[key], out5b[key])
  assert out7['pred_logits'].shape[-1] == 8
  np.testing.assert_allclose(out7['pred_logits'][..., :5], out5a['pred_logits'][..., :5],
                             rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(out7['pred_logits'][..., -1], out5a['pred_logits'][..., -1],
                             rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(out7['pred_masks'], out5a['pred_masks'], rtol=1e-6, atol=1e-6)


def test_dropout_active_only_in_training(small):
  model, variables, images, fwd = small
  assert model.config.decoder.dropout == 0.1
  text = _text(jax.random.key(6), 5, model.config.embed_dim)
  eval_out, _ = fwd(variables, images, text, jax.random.key(0), train=False)
  a, _ = fwd(variables, images, text, jax.random.key(0), train=True)
  a2, _ = fwd(variables, images, text, jax.random.key(0), train=True)
  b, _ = fwd(variables, images, text, jax.random.key(1), train=True)
  np.testing.assert_array_equal(a['pred_logits'], a2['pred_logits'])  # rng-determined
  assert np.abs(np.asarray(a['pred_logits'] - b['pred_logits'])).max() > 1e-3
  assert np.abs(np.asarray(a['pred_masks'] - eval_out['pred_masks'])).max() > 1e-3


@pytest.mark.parametrize('level,channels,tokens', [('res5', 128, 2 * 2), ('res4', 64, 4 * 4),
                                                   ('res3', 32, 8 * 8),
                                                   ('pixel_embedding', 64, 16 * 16)])
def test_decoder_in_feature(level, channels, tokens):
  """TRANSFORMER_IN_FEATURE: input_proj reads the chosen level; memory has its h*w tokens.

  'pixel_embedding' is the stride-4 mask features (mask_dim channels).
  """
  cfg = _small_model_config(in_feature=level)
  model = zegformer.build_model(cfg)
  shapes = jax.eval_shape(lambda: zegformer.init_variables(
      model, jax.random.key(0), image_hw=IMAGE_HW, num_classes=3))
  assert shapes['params']['input_proj']['kernel'].shape == (1, 1, channels,
                                                           cfg.decoder.hidden_dim)
  out = jax.eval_shape(lambda: model.apply(
      zegformer.init_variables(model, jax.random.key(0), image_hw=IMAGE_HW, num_classes=3),
      jnp.zeros((1, *IMAGE_HW, 3)), _text(jax.random.key(1), 3, cfg.embed_dim), train=False,
      capture_intermediates=lambda mdl, _: mdl.name == 'input_proj',
      mutable=['intermediates']))
  proj = out[1]['intermediates']['input_proj']['__call__'][0]
  assert proj.shape[1] * proj.shape[2] == tokens


def test_conv_batch_norm_folds_into_frozen_batch_norm():
  """Conv2d(norm='BN') on batch statistics == Conv2d(norm='FrozenBN') with the statistics
  folded in (backbone_pretrain.fold_batch_norm), against numpy batch statistics."""
  from zegformer_jax.projects.shapesworld import backbone_pretrain
  from flax import traverse_util
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)).astype(np.float32))
  bn = resnet.Conv2d(5, 3, norm='BN', activation=True)
  v = bn.init(jax.random.key(0), x)
  params = {'kernel': v['params']['kernel'],
            'norm': {'scale': jnp.asarray(rng.uniform(0.5, 2, 5), jnp.float32),
                     'bias': jnp.asarray(rng.normal(size=5), jnp.float32)}}
  y_bn, _ = bn.apply({'params': params, 'batch_stats': v['batch_stats']}, x,
                     mutable=['batch_stats'])
  z = np.asarray(resnet.Conv2d(5, 3).apply({'params': {'kernel': params['kernel']}}, x))
  batch_stats = {'norm': {'mean': z.mean((0, 1, 2)), 'var': z.var((0, 1, 2))}}
  flat = backbone_pretrain.fold_batch_norm(params, batch_stats)
  assert set(flat) == {('params', 'kernel'), ('frozen', 'norm', 'scale'),
                       ('frozen', 'norm', 'bias'), ('frozen', 'norm', 'mean'),
                       ('frozen', 'norm', 'var')}
  tree = traverse_util.unflatten_dict(flat)
  y_frozen = resnet.Conv2d(5, 3, norm='FrozenBN', activation=True).apply(tree, x)
  np.testing.assert_allclose(np.asarray(y_frozen), np.asarray(y_bn), rtol=1e-4, atol=1e-4)
  want = np.maximum((z - z.mean((0, 1, 2))) / np.sqrt(z.var((0, 1, 2)) + 1e-5)
                    * np.asarray(params['norm']['scale']) + np.asarray(params['norm']['bias']), 0)
  np.testing.assert_allclose(np.asarray(y_bn), want, rtol=1e-4, atol=1e-4)


def test_backbone_group_norm_is_trainable_and_has_no_frozen_statistics():
  """RESNETS.NORM 'GN': GroupNorm scale/bias in 'params', nothing in 'frozen'; forward runs."""
  cfg = _small_model_config()
  cfg.backbone.norm = 'GN'
  cfg.backbone.gn_groups = 8
  model = zegformer.build_model(cfg)
  v = zegformer.init_variables(model, jax.random.key(0), image_hw=IMAGE_HW, num_classes=3)
  assert not v['frozen']
  stem_norm = v['params']['backbone']['stem']['conv1']['norm']
  assert set(stem_norm) == {'scale', 'bias'} and stem_norm['scale'].shape == (16,)
  out = model.apply(v, jnp.ones((1, *IMAGE_HW, 3)), _text(jax.random.key(1), 3, cfg.embed_dim),
                    train=False)
  assert np.isfinite(np.asarray(out['pred_logits'])).all()


@pytest.mark.parametrize('freeze_at,frozen_stages', [(0, ()), (1, ('stem',)),
                                                     (3, ('stem', 'res2_0', 'res3_0'))])
def test_freeze_at_stops_gradients_of_frozen_stages(freeze_at, frozen_stages):
  """BACKBONE.FREEZE_AT: exactly the stem and res2..res{k} get zero gradients."""
  net = resnet.ResNet(block_counts=(1, 1, 1, 1), stem_width=8, bottleneck=False,
                      freeze_at=freeze_at)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 64, 64, 3)), jnp.float32)
  v = net.init(jax.random.key(0), x)
  grads = jax.grad(lambda p: sum(jnp.sum(f ** 2) for f in net.apply(
      {'params': p, 'frozen': v['frozen']}, x).values()))(v['params'])
  for name, g in grads.items():
    norm = sum(float(jnp.abs(leaf).sum()) for leaf in jax.tree.leaves(g))
    assert (norm == 0.0) == (name in frozen_stages), (name, norm)
