"""Tests for zegformer_jax.matching (MaskFormer Hungarian matcher).

The references here are written independently of the implementation: brute
force over permutations for the assignment, per-pair / per-pixel float64 loops
for the cost terms, integer arithmetic and strided slicing for the nearest
downsample.
"""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import common
from zegformer_jax.modeling import criterion
from zegformer_jax.modeling import matching


def loss_cfg(matcher='device'):
  cfg = common.base_config().loss
  cfg.matcher = matcher
  return cfg


# ---------------------------------------------------------------- helpers


def make_batch(rng, L=2, B=8, Q=6, K=3, M=4, h=4, w=4, stride=4,
               p_valid=0.7):
  """Random outputs / targets following the data contract (numpy)."""
  outputs = {
      'pred_logits': rng.normal(size=(L, B, Q, K + 1)).astype(np.float32) * 2,
      'pred_masks': rng.normal(size=(L, B, Q, h, w)).astype(np.float32) * 3,
  }
  valid = rng.random((B, M)) < p_valid
  valid[0] = True                      # one image with every target valid
  if B > 1:
    valid[1] = False                   # one image without targets
  targets = {
      'target_classes': rng.integers(0, K, size=(B, M)).astype(np.int32),
      'target_masks': (rng.random((B, M, h * stride, w * stride)) < 0.4
                       ).astype(np.uint8),
      'target_valid': valid,
  }
  return outputs, targets


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_cost(pred_logits, pred_masks, tgt_classes, tgt_masks_small, cfg):
  """Float64 loop re-derivation of the matcher cost, [B, Q, M]."""
  B, Q, C = pred_logits.shape
  M = tgt_classes.shape[1]
  out = np.zeros((B, Q, M))
  a, g = cfg.focal_alpha, cfg.focal_gamma
  for b in range(B):
    z = pred_logits[b].astype(np.float64)
    prob = np.exp(z - z.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    for q in range(Q):
      x = pred_masks[b, q].astype(np.float64).ravel()
      p = np_sigmoid(x)
      for m in range(M):
        t = tgt_masks_small[b, m].astype(np.float64).ravel()
        c_cls = -prob[q, tgt_classes[b, m]]
        # RetinaNet focal loss per pixel, mean over pixels.
        bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
        p_t = np.where(t > 0, p, 1 - p)
        alpha_t = np.where(t > 0, a, 1 - a)
        c_focal = np.mean(alpha_t * (1 - p_t) ** g * bce)
        c_dice = 1 - (2 * np.sum(p * t) + 1) / (p.sum() + t.sum() + 1)
        out[b, q, m] = (cfg.cost_class * c_cls + cfg.cost_mask * c_focal
                        + cfg.cost_dice * c_dice)
  return out


def brute_force(cost, valid):
  """Minimum total cost over all injective assignments (valid columns only)."""
  cols = np.flatnonzero(valid)
  q = cost.shape[0]
  if cols.size == 0:
    return 0.0
  c = cost[:, cols]
  if q >= cols.size:   # every valid target gets a distinct query
    return min(sum(c[rows[j], j] for j in range(cols.size))
               for rows in itertools.permutations(range(q), cols.size))
  return min(sum(c[i, ts[i]] for i in range(q))   # every query gets a target
             for ts in itertools.permutations(range(cols.size), q))


# ---------------------------------------------------------------- nearest


def test_nearest_indices():
  # torch F.interpolate(mode='nearest'): src = floor(dst * in / out).
  np.testing.assert_array_equal(matching.nearest_indices(16, 4), [0, 4, 8, 12])
  np.testing.assert_array_equal(matching.nearest_indices(10, 4), [0, 2, 5, 7])
  np.testing.assert_array_equal(matching.nearest_indices(7, 3), [0, 2, 4])
  np.testing.assert_array_equal(matching.nearest_indices(5, 5), range(5))
  np.testing.assert_array_equal(matching.nearest_indices(2, 5),
                                [0, 0, 0, 1, 1])
  for n_in, n_out in [(640, 160), (512, 128), (100, 25), (97, 24), (33, 8)]:
    exact = (np.arange(n_out) * n_in) // n_out     # exact rational floor
    np.testing.assert_array_equal(matching.nearest_indices(n_in, n_out), exact)


def test_nearest_downsample():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 2, size=(2, 3, 16, 12)).astype(np.uint8)
  y = matching.nearest_downsample(jnp.asarray(x), (4, 3))
  assert y.dtype == jnp.uint8 and y.shape == (2, 3, 4, 3)
  np.testing.assert_array_equal(np.asarray(y), x[..., ::4, ::4])
  z = matching.nearest_downsample(jnp.asarray(x), (3, 5))  # 16/3, 12/5
  np.testing.assert_array_equal(np.asarray(z),
                                x[..., [0, 5, 10], :][..., [0, 2, 4, 7, 9]])


# ---------------------------------------------------------------- hungarian


def test_hungarian_matches_brute_force():
  rng = np.random.default_rng(1)
  for q, m in [(3, 3), (5, 3), (6, 4), (4, 4), (2, 4)]:
    n = 6
    cost = rng.normal(size=(n, q, m))
    valid = rng.random((n, m)) < 0.6
    valid[0] = True
    valid[1] = False
    res = matching.hungarian(cost, valid)
    assert res.dtype == np.int32 and res.shape == (n, q)
    for i in range(n):
      assigned = res[i][res[i] >= 0]
      # Injective, valid targets only.
      assert len(set(assigned.tolist())) == assigned.size
      assert valid[i][assigned].all()
      assert assigned.size == min(q, valid[i].sum())
      total = sum(cost[i, j, res[i, j]] for j in range(q) if res[i, j] >= 0)
      assert math.isclose(total, brute_force(cost[i], valid[i]), abs_tol=1e-9)


def test_hungarian_nonfinite_costs_do_not_raise():
  cost = np.array([[[np.nan, 0.0], [1.0, np.inf]]])
  res = matching.hungarian(cost, np.array([[True, True]]))
  np.testing.assert_array_equal(res, [[1, 0]])


def _check_assignment(res, cost, valid):
  """Injective, valid targets only, every valid target matched, minimum total cost."""
  q = cost.shape[1]
  for i in range(cost.shape[0]):
    assigned = res[i][res[i] >= 0]
    assert len(set(assigned.tolist())) == assigned.size
    assert valid[i][assigned].all() and assigned.size == valid[i].sum()
    total = sum(cost[i, j, res[i, j]] for j in range(q) if res[i, j] >= 0)
    assert math.isclose(total, brute_force(cost[i], valid[i]), abs_tol=1e-4)


def test_hungarian_device_against_brute_force_and_scipy():
  rng = np.random.default_rng(7)
  solve = jax.jit(matching.hungarian_device)
  for q, m in [(1, 1), (3, 3), (5, 3), (6, 4), (8, 5), (7, 7)]:
    n = 12
    valid = rng.random((n, m)) < 0.7
    valid[0], valid[1] = True, False
    cost = rng.normal(size=(n, q, m)).astype(np.float32)
    res = np.asarray(solve(cost, valid))
    assert res.dtype == np.int32 and res.shape == (n, q)
    _check_assignment(res, cost, valid)
    # Continuous costs have one optimum: the very assignment scipy finds.
    np.testing.assert_array_equal(res, matching.hungarian(cost, valid))
    # Small integer costs tie everywhere: any optimum will do.
    ties = rng.integers(0, 3, size=(n, q, m)).astype(np.float32)
    _check_assignment(np.asarray(solve(ties, valid)), ties, valid)
  # Larger problems (COCO-like: 100 queries, up to 32 targets) against scipy.
  cost = rng.normal(size=(4, 100, 32)).astype(np.float32) * 5
  valid = rng.random((4, 32)) < 0.8
  np.testing.assert_array_equal(np.asarray(solve(cost, valid)),
                                matching.hungarian(cost, valid))


def test_hungarian_device_nonfinite_and_shape_errors():
  cost = np.array([[[np.nan, 0.0], [1.0, np.inf]]], np.float32)
  res = matching.hungarian_device(cost, np.array([[True, True]]))
  np.testing.assert_array_equal(np.asarray(res), [[1, 0]])
  with pytest.raises(ValueError, match='loss.matcher="host"'):
    matching.hungarian_device(np.zeros((1, 2, 3), np.float32), np.ones((1, 3), bool))


# ---------------------------------------------------------------- cost


def test_match_cost_against_numpy():
  rng = np.random.default_rng(2)
  cfg = loss_cfg()
  outputs, targets = make_batch(rng, L=1, B=2, Q=5, K=3, M=3)
  small = targets['target_masks'][..., ::4, ::4].astype(np.float32)
  got = matching.match_cost(outputs['pred_logits'][0], outputs['pred_masks'][0],
                            targets['target_classes'], small, cfg)
  want = np_cost(outputs['pred_logits'][0], outputs['pred_masks'][0],
                 targets['target_classes'], small, cfg)
  assert got.shape == (2, 5, 3)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_match_cost_terms_separately():
  """Each weight selects its own term (guards against swapped weights)."""
  rng = np.random.default_rng(3)
  outputs, targets = make_batch(rng, L=1, B=1, Q=4, K=2, M=2)
  small = targets['target_masks'][..., ::4, ::4].astype(np.float32)
  args = (outputs['pred_logits'][0], outputs['pred_masks'][0],
          targets['target_classes'], small)
  for name in ('cost_class', 'cost_mask', 'cost_dice'):
    cfg = loss_cfg()
    for other in ('cost_class', 'cost_mask', 'cost_dice'):
      cfg[other] = 1.0 if other == name else 0.0
    np.testing.assert_allclose(np.asarray(matching.match_cost(*args, cfg)),
                               np_cost(*args, cfg), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- match()


def _numpy_matches(outputs, targets, cfg):
  """hungarian() on costs computed outside jit with numpy-side downsampling."""
  small = targets['target_masks'][..., ::4, ::4].astype(np.float32)
  res = []
  for l in range(outputs['pred_logits'].shape[0]):
    cost = np.asarray(matching.match_cost(
        outputs['pred_logits'][l], outputs['pred_masks'][l],
        targets['target_classes'], small, cfg))
    res.append(matching.hungarian(cost, targets['target_valid']))
  return np.stack(res)


def _sharded(mesh, outputs, targets):
  lay = NamedSharding(mesh, P(None, 'data'))
  bat = NamedSharding(mesh, P('data'))
  return ({k: jax.device_put(v, lay) for k, v in outputs.items()},
          {k: jax.device_put(v, bat) for k, v in targets.items()})


@pytest.mark.parametrize('matcher', ['host', 'device'])
@pytest.mark.parametrize('num_devices', [1, 8])
def test_match_under_jit_with_mesh(num_devices, matcher):
  assert jax.device_count() >= 8
  rng = np.random.default_rng(4)
  cfg = loss_cfg(matcher)
  outputs, targets = make_batch(rng, L=3, B=8, Q=6, K=3, M=4)
  want = _numpy_matches(outputs, targets, cfg)
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ('data',))
  out_s, tgt_s = _sharded(mesh, outputs, targets)
  got = jax.jit(lambda o, t: matching.match(o, t, cfg, mesh))(out_s, tgt_s)
  assert got.shape == (3, 8, 6) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), want)
  # Padding targets are never matched; image 1 has none valid.
  assert (np.asarray(got)[:, 1] == -1).all()
  if num_devices == 8:
    # Each device holds (and matched) exactly its own image.
    assert got.sharding.spec == P(None, 'data')
    assert {s.data.shape for s in got.addressable_shards} == {(3, 1, 6)}


@pytest.mark.parametrize('matcher', ['host', 'device'])
def test_match_without_mesh(matcher):
  rng = np.random.default_rng(5)
  cfg = loss_cfg(matcher)
  outputs, targets = make_batch(rng, L=2, B=2, Q=5, K=3, M=3)
  got = jax.jit(lambda o, t: matching.match(o, t, cfg, None))(outputs, targets)
  np.testing.assert_array_equal(np.asarray(got),
                                _numpy_matches(outputs, targets, cfg))


def test_match_rejects_unknown_matcher():
  outputs, targets = make_batch(np.random.default_rng(0), L=1, B=1, Q=3, K=2, M=2)
  with pytest.raises(ValueError, match='loss.matcher must be'):
    matching.match(outputs, targets, loss_cfg('gpu'), None)


def test_target_to_query():
  q2t = jnp.array([[2, -1, 0, -1]])
  t2q, matched = matching.target_to_query(q2t, 4)
  np.testing.assert_array_equal(np.asarray(matched), [[True, False, True, False]])
  np.testing.assert_array_equal(np.asarray(t2q)[matched], [2, 0])


def test_gradient_stops_at_matching():
  """grad of compute_loss == grad of set_criterion with the indices frozen."""
  rng = np.random.default_rng(6)
  cfg = loss_cfg()
  outputs, targets = make_batch(rng, L=2, B=8, Q=5, K=3, M=3)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  out_s, tgt_s = _sharded(mesh, outputs, targets)

  def full(logits, masks):
    o = {'pred_logits': logits, 'pred_masks': masks}
    return criterion.compute_loss(o, tgt_s, cfg, mesh)[0]

  g_full = jax.jit(jax.grad(full, argnums=(0, 1)))(
      out_s['pred_logits'], out_s['pred_masks'])
  q2t = _numpy_matches(outputs, targets, cfg)

  def fixed(logits, masks):
    o = {'pred_logits': logits, 'pred_masks': masks}
    return criterion.set_criterion(o, targets, jnp.asarray(q2t), cfg)['loss']

  g_fixed = jax.jit(jax.grad(fixed, argnums=(0, 1)))(
      outputs['pred_logits'], outputs['pred_masks'])
  for a, b in zip(g_full, g_fixed):
    a, b = np.asarray(a), np.asarray(b)
    assert np.isfinite(a).all() and np.abs(a).max() > 0
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
