"""modeling/attention.py: masked softmax attention, all heads at once or one after another.

Oracle: a float64 numpy loop over heads; the two schedules against each other; XLA's FLOP
count of both (the per-head schedule is unrolled so that the benchmarks count every head).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zegformer_jax.modeling import attention


def _inputs(b=2, tq=7, tk=9, h=3, d=4, seed=0):
  rng = np.random.RandomState(seed)
  q, k, v = (rng.randn(b, t, h, d) for t in (tq, tk, tk))
  mask = rng.rand(b, tq, tk) > 0.5
  mask[:, np.arange(tq), np.arange(tq) % tk] = True          # every row attends somewhere
  return q, k, v, mask


def _numpy_attention(q, k, v, mask):
  b, tq, h, d = q.shape
  out = np.zeros((b, tq, h, d))
  for i in range(b):
    for j in range(h):
      lg = q[i, :, j] @ k[i, :, j].T / np.sqrt(d)
      if mask is not None:
        lg = np.where(mask[i], lg, -np.inf)
      w = np.exp(lg - lg.max(-1, keepdims=True))
      out[i, :, j] = (w / w.sum(-1, keepdims=True)) @ v[i, :, j]
  return out


@pytest.mark.parametrize('by_head', [True, False])
@pytest.mark.parametrize('masked', [True, False])
def test_against_numpy(by_head, masked):
  q, k, v, mask = _inputs()
  mask = mask if masked else None
  got = attention.softmax_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)),
                                    None if mask is None else jnp.asarray(mask), by_head)
  assert got.shape == q.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, _numpy_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_a_masked_key_is_ignored_whatever_its_value():
  q, k, v, mask = _inputs(seed=1)
  mask[:, :, 0] = False
  mask[:, np.arange(7), 1 + np.arange(7) % 8] = True
  args = lambda kk, vv: [jnp.asarray(a, jnp.float32) for a in (q, kk, vv)] + [jnp.asarray(mask)]
  k2, v2 = k.copy(), v.copy()
  k2[:, 0], v2[:, 0] = 1e3, -1e3
  for by_head in (True, False):
    np.testing.assert_array_equal(attention.softmax_attention(*args(k, v), by_head=by_head),
                                  attention.softmax_attention(*args(k2, v2), by_head=by_head))


def test_default_is_by_head_on_cpu_only():
  assert attention.heads_in_sequence(None) == (jax.default_backend() == 'cpu')
  assert attention.heads_in_sequence(True) and not attention.heads_in_sequence(False)


def test_both_schedules_count_every_head():
  """XLA's cost analysis counts a while loop's body once; the per-head schedule is unrolled,
  so a benchmark's FLOPs (and MFU) stay those of the batched one."""
  q, k, v, mask = (jnp.asarray(a) for a in _inputs(b=1, tq=64, tk=64, h=6, d=16))
  q, k, v = (a.astype(jnp.float32) for a in (q, k, v))

  def flops(by_head):
    fn = jax.jit(lambda *a: attention.softmax_attention(*a, by_head=by_head))
    cost = fn.lower(q, k, v, mask).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)['flops']
  two_products = 2 * 2 * 6 * 64 * 64 * 16                    # QK^T and PV, every head
  assert flops(True) >= two_products
  assert flops(True) == pytest.approx(flops(False), rel=0.05)


def test_bfloat16_inputs_keep_their_dtype():
  q, k, v, mask = _inputs(seed=2)
  want = _numpy_attention(q, k, v, mask)
  got = attention.softmax_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)),
                                    jnp.asarray(mask))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05)
