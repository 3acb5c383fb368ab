"""Scaled dot-product attention with a boolean mask, one head at a time where that is faster.

The one-pass image branch (one_pass.py) attends over about a thousand tokens: at 480 px,
ViT-B/16 has 900 patches, [CLS] and 100 mask queries. All twelve heads' logits at once are
[12, 1001, 1001] float32, 48 MB, written by the QK product, read by the softmax and again
by the PV product. On a CPU that traffic, not the arithmetic, sets the time: XLA:CPU ran
those products at 20-36 GFLOP/s against 140 for the dense layers of the same pass. A head
at a time keeps one 4 MB logit matrix in the cache: 1.4-1.7x faster per layer on a 2-core
AVX2 machine, and the one-pass inference 1.2x faster (BENCHMARKS.md). On an accelerator the
loop would only serialise work that runs in parallel, so the heads go together there.
"""
from typing import Optional

import jax
import jax.numpy as jnp


def heads_in_sequence(by_head: Optional[bool] = None) -> bool:
  """The choice `softmax_attention` makes: as given, or (None) one head at a time on CPU."""
  return jax.default_backend() == 'cpu' if by_head is None else bool(by_head)


def _attend(q, k_t, v, mask):
  """q [..., B, Tq, d] (scaled), k_t [..., B, d, Tk], v [..., B, Tk, d]; mask [B, Tq, Tk] or
  None. Returns [..., B, Tq, d]."""
  logits = jnp.matmul(q, k_t).astype(jnp.float32)     # the softmax in float32 at any dtype
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  # Normalise the [Tq, d] output rather than the [Tq, Tk] weights: one pass less over them.
  out = jnp.matmul(e.astype(v.dtype), v).astype(jnp.float32) / jnp.sum(e, -1, keepdims=True)
  return out.astype(v.dtype)


def softmax_attention(q, k, v, mask=None, by_head: Optional[bool] = None):
  """softmax(q k^T / sqrt(d), masked) v, per head.

  q: [B, Tq, H, d]; k, v: [B, Tk, H, d]; mask: [B, Tq, Tk] bool, True where a query may
  attend (every row needs at least one True), or None for no mask. by_head: run the heads
  one after another rather than as one batched product; None: on CPU only
  (`heads_in_sequence`). Both give the same values up to float rounding.

  Returns [B, Tq, H, d].
  """
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  qh = jnp.transpose(q, (2, 0, 1, 3))                  # [H, B, Tq, d]
  kt = jnp.transpose(k, (2, 0, 3, 1))                  # [H, B, d, Tk]
  vh = jnp.transpose(v, (2, 0, 1, 3))                  # [H, B, Tk, d]
  if heads_in_sequence(by_head):
    # Unrolled rather than lax.map: the same speed, and XLA's cost analysis counts a loop
    # body once, so the benchmarks' FLOPs would lose eleven heads in twelve.
    out = jnp.stack([_attend(qh[i], kt[i], vh[i], mask) for i in range(qh.shape[0])])
  else:
    out = _attend(qh, kt, vh, mask)
  return jnp.transpose(out, (1, 2, 0, 3))
