"""The optimiser against a numpy re-derivation of torch AdamW with detectron2 param groups."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from configs import common
from zegformer_jax.training import optim


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  return {
      'backbone': {'res2_0': {'conv1': {'kernel': f(3, 3, 2, 2)}}},
      'pixel_decoder': {'layer_1': {'kernel': f(3, 3, 2, 2)}, 'layer_1_norm': {'scale': f(2), 'bias': f(2)}},
      'transformer': {'norm': {'scale': f(4), 'bias': f(4)}, 'layers_0': {'linear1': {'kernel': f(4, 4), 'bias': f(4)}}},
      'query_embed': {'embedding': f(5, 4)},
      'no_object_embedding': f(4),
  }


def _torch_adamw_reference(params, grads_seq, cfg, total):
  """Plain numpy: clip by global norm, then per-group AdamW (decoupled decay x group lr)."""
  flat = {jax.tree_util.keystr(p): np.asarray(v, np.float64)
          for p, v in jax.tree_util.tree_leaves_with_path(params)}
  m = {k: np.zeros_like(v) for k, v in flat.items()}
  v2 = {k: np.zeros_like(v) for k, v in flat.items()}
  for t, grads in enumerate(grads_seq):
    g = {jax.tree_util.keystr(p): np.asarray(x, np.float64)
         for p, x in jax.tree_util.tree_leaves_with_path(grads)}
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    scale = min(1.0, cfg.clip_norm / norm)
    lr_t = cfg.lr * (1 - t / total) ** cfg.poly_power
    for k in flat:
      gk = g[k] * scale
      lr = lr_t * (cfg.backbone_multiplier if "'backbone'" in k else 1.0)
      no_decay = ('norm' in k.replace("'no_object_embedding'", '')) or 'query_embed' in k
      wd = 0.0 if no_decay else cfg.weight_decay
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * gk
      v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * gk ** 2
      mhat = m[k] / (1 - cfg.b1 ** (t + 1))
      vhat = v2[k] / (1 - cfg.b2 ** (t + 1))
      flat[k] = flat[k] * (1 - lr * wd) - lr * mhat / (np.sqrt(vhat) + cfg.eps)
  return flat


def test_matches_torch_adamw_param_groups():
  cfg = common.base_config().optim
  cfg.unlock()
  cfg.weight_decay = 0.05   # large so a wrong mask shows
  cfg.lr = 1e-2
  total = 10
  params = _params()
  opt = optim.make_optimizer(cfg, total, params)
  state = opt.init(params)
  rng = np.random.default_rng(1)
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 10, jnp.float32), params)
               for _ in range(4)]
  p = params
  for g in grads_seq:
    updates, state = opt.update(g, state, p)
    p = optax.apply_updates(p, updates)
  want = _torch_adamw_reference(params, grads_seq, cfg, total)
  got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(p)}
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_param_groups():
  d = optim.describe(_params(), 0.1)
  assert d['backbone/res2_0/conv1/kernel'] == (0.1, True)
  assert d['pixel_decoder/layer_1_norm/scale'] == (1.0, False)
  assert d['transformer/norm/bias'] == (1.0, False)
  assert d['transformer/layers_0/linear1/bias'] == (1.0, True)   # biases decay, as detectron2
  assert d['query_embed/embedding'] == (1.0, False)
  assert d['no_object_embedding'] == (1.0, True)


def test_poly_schedule():
  s = optim.poly_schedule(1e-4, 100, 0.9)
  np.testing.assert_allclose(float(s(0)), 1e-4)
  np.testing.assert_allclose(float(s(50)), 1e-4 * 0.5 ** 0.9, rtol=1e-6)
  assert float(s(100)) == 0.0 and float(s(150)) == 0.0


def test_freeze_at_stops_every_update_of_the_frozen_stages():
  """detectron2 FREEZE_AT: frozen parameters never change (weight decay included)."""
  cfg = common.base_config().optim
  cfg.unlock()
  cfg.weight_decay = 0.05
  cfg.lr = 1e-2
  rng = np.random.default_rng(2)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  params = {'backbone': {'stem': {'conv1': {'kernel': f(3, 3, 3, 2)}},
                         'res2_0': {'conv1': {'kernel': f(3, 3, 2, 2)}},
                         'res3_0': {'conv1': {'kernel': f(3, 3, 2, 2)}}},
            'pixel_decoder': {'layer_1': {'kernel': f(3, 3, 2, 2)}}}
  grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
  expected_frozen = {0: set(), 1: {'stem'}, 2: {'stem', 'res2_0'},
                     3: {'stem', 'res2_0', 'res3_0'}}
  for freeze_at, frozen in expected_frozen.items():
    opt = optim.make_optimizer(cfg, 10, params, freeze_at=freeze_at)
    state, p = opt.init(params), params
    for _ in range(3):
      updates, state = opt.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    for name in ('stem', 'res2_0', 'res3_0'):
      before = np.asarray(params['backbone'][name]['conv1']['kernel'])
      after = np.asarray(p['backbone'][name]['conv1']['kernel'])
      if name in frozen:
        np.testing.assert_array_equal(after, before, err_msg=f'{freeze_at} {name}')
      else:
        assert np.abs(after - before).min() > 1e-4, (freeze_at, name)
    assert not np.allclose(p['pixel_decoder']['layer_1']['kernel'],
                           params['pixel_decoder']['layer_1']['kernel'])
  d = optim.describe(params, 0.1, freeze_at=2)
  assert d['backbone/stem/conv1/kernel'] == (0.0, True)
  assert d['backbone/res2_0/conv1/kernel'] == (0.0, True)
  assert d['backbone/res3_0/conv1/kernel'] == (0.1, True)
  assert optim.is_frozen('backbone/res12_0/conv1/kernel', 2) is False


def test_scale_by_adam_is_optax_bit_for_bit_and_keeps_its_state_when_not_applied():
  params = _params()
  rng = np.random.default_rng(2)
  grads_seq = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32),
                            params) for _ in range(4)]
  ours = jax.jit(lambda g, s, p, a: optim.scale_by_adam(0.9, 0.999, 1e-8).update(g, s, p, apply=a))
  ref = optax.scale_by_adam(0.9, 0.999, 1e-8)
  s_ours = s_ref = ref.init(params)
  ref_update = jax.jit(ref.update)   # both compiled, as the train step is
  for i, g in enumerate(grads_seq):
    u_ref, new_ref = ref_update(g, s_ref, params)
    if i == 2:   # a step not applied: the state is what it was (the update is not used)
      _, kept = ours(g, s_ours, params, jnp.asarray(False))
      for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(s_ours)):
        np.testing.assert_array_equal(a, b)
      continue
    u_ours, s_ours = ours(g, s_ours, params, jnp.asarray(True))
    s_ref = new_ref
    for a, b in zip(jax.tree.leaves((u_ours, s_ours)), jax.tree.leaves((u_ref, s_ref))):
      np.testing.assert_array_equal(a, b)
  assert int(s_ours.count) == 3


def test_update_with_donated_state_copies_no_moment():
  """The optimiser's moments are updated in place: the compiled step copies none of them
  (optim.scale_by_adam: with the guard outside the optimiser XLA copied every one)."""
  cfg = common.base_config().optim
  params = _params()
  opt = optim.make_optimizer(cfg, 10, params)

  def step(p, s, g):
    finite = jnp.isfinite(optax.tree.norm(g))
    u, s = opt.update(g, s, p, apply=finite)
    return jax.tree.map(lambda a, b: jnp.where(finite, a, b), optax.apply_updates(p, u), p), s

  text = jax.jit(step, donate_argnums=(0, 1)).lower(
      params, opt.init(params), params).compile().as_text()
  copied = [line for line in text.splitlines() if ' copy(' in line and ('mu' in line or 'nu' in line)]
  assert not copied, copied[:3]
