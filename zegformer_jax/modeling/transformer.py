"""DETR-style transformer decoder and sine position encoding (MaskFormer / ZegFormer).

ZegFormer runs MaskFormer's transformer with zero encoder layers, so only the decoder exists
(docs/reference.md, section 1): 6 layers, d_model 256, 8 heads,
FFN 2048, dropout 0.1, ReLU, post-norm, and one final LayerNorm shared by every layer's
output (return_intermediate, used for deep supervision). The decoder's outputs are the
paper's *segment embeddings*.

Attention projections: PyTorch's nn.MultiheadAttention packs q/k/v into `in_proj_weight`
[3d, d] / `in_proj_bias` [3d]. Here they are three separate Dense layers `query`, `key`,
`value`, so a converter splits the packed tensor into thirds (in that order) and transposes
each. Their initialiser reproduces xavier_uniform on the packed [3d, d] matrix:
U(+-sqrt(6 / (4d))) == variance_scaling(0.5, 'fan_avg', 'uniform') on a [d, d] kernel.

Parameter naming (official key -> flax path, relative to `transformer`):

  ====================================================  =====================================
  official (`sem_seg_head.predictor.transformer.decoder.`)  flax path
  ====================================================  =====================================
  layers.{i}.self_attn.in_proj_weight[0:d] / [d:2d] /   layers_{i}/self_attn/query|key|value/
    [2d:3d] (and in_proj_bias thirds)                     kernel (transposed) / bias
  layers.{i}.self_attn.out_proj.weight / .bias          layers_{i}/self_attn/out/kernel / bias
  layers.{i}.multihead_attn.* (cross-attention)         layers_{i}/multihead_attn/* (as above)
  layers.{i}.linear1 / linear2 .weight / .bias          layers_{i}/linear1 / linear2 kernel / bias
  layers.{i}.norm1 / norm2 / norm3 .weight / .bias      layers_{i}/norm{1,2,3}/scale / bias
  norm.weight / .bias (shared final LayerNorm)          norm/scale / bias
  ====================================================  =====================================

Dense kernels are [in, out]: torch Linear weights convert with `w.T`.
"""
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

# DETR re-initialises every transformer parameter with dim > 1 by xavier_uniform.
xavier_uniform = nn.initializers.xavier_uniform()
# xavier_uniform of the packed [3d, d] in_proj matrix, applied to one [d, d] third.
packed_in_proj_init = nn.initializers.variance_scaling(0.5, 'fan_avg', 'uniform')


def torch_linear_bias_init(fan_in: int):
  """PyTorch's default nn.Linear bias init, U(+-1/sqrt(fan_in)) (DETR keeps it for 1-d)."""
  bound = 1.0 / math.sqrt(fan_in)
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def position_embedding_sine(height: int, width: int, num_pos_feats: int = 128,
                            temperature: float = 10000.0, normalize: bool = True,
                            scale: float = 2 * math.pi) -> jax.Array:
  """DETR's PositionEmbeddingSine on an all-valid (unmasked) height x width map.

  Coordinates are the cumulative sums of an all-ones mask (1..H, 1..W); with `normalize`
  they become cumsum / (last + 1e-6) * scale. For channel pair i, the frequency is
  temperature ** (2i / num_pos_feats); channels alternate sin, cos within each half.

  Returns:
    [height, width, 2 * num_pos_feats] float32, channels [pos_y, pos_x].
  """
  ones = jnp.ones((height, width), jnp.float32)
  y = jnp.cumsum(ones, axis=0)
  x = jnp.cumsum(ones, axis=1)
  if normalize:
    eps = jnp.float32(1e-6)
    y = y / (y[-1:, :] + eps) * jnp.float32(scale)
    x = x / (x[:, -1:] + eps) * jnp.float32(scale)
  i = jnp.arange(num_pos_feats, dtype=jnp.float32)
  dim_t = jnp.float32(temperature) ** (2 * (i // 2) / num_pos_feats)

  def encode(c):
    p = c[..., None] / dim_t                                     # [H, W, F]
    # sin on even channels, cos on odd ones, interleaved: [sin0, cos1, sin2, cos3, ...].
    return jnp.stack([jnp.sin(p[..., 0::2]), jnp.cos(p[..., 1::2])], axis=-1).reshape(
        height, width, num_pos_feats)

  return jnp.concatenate([encode(y), encode(x)], axis=-1)


class MultiHeadAttention(nn.Module):
  """nn.MultiheadAttention semantics with separate q/k/v projections (see module doc).

  Attention weights softmax(q k^T / sqrt(d_head)) are dropped out (rate `dropout`) when
  training, as in PyTorch; the softmax is computed in float32 for any compute dtype.
  """
  d_model: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, key: jax.Array, value: jax.Array, *,
               train: bool, key_mask: jax.Array | None = None) -> jax.Array:
    """query: [B, Nq, d]; key, value: [B, Nk, d] -> [B, Nq, d].

    key_mask: optional bool [B, Nq, Nk], True where query q may attend to key k (every
      head alike). A query that may attend to no key attends to all of them, as in
      Mask2Former (an empty mask prediction must not produce NaN).
    """
    d, h = self.d_model, self.num_heads
    if d % h:
      raise ValueError(f'd_model {d} is not divisible by num_heads {h}')
    dh = d // h
    proj = lambda name: nn.Dense(d, dtype=self.dtype, kernel_init=packed_in_proj_init,
                                 bias_init=nn.initializers.zeros, name=name)
    q = proj('query')(query).reshape(*query.shape[:2], h, dh)
    k = proj('key')(key).reshape(*key.shape[:2], h, dh)
    v = proj('value')(value).reshape(*value.shape[:2], h, dh)
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k, preferred_element_type=jnp.float32)
    if key_mask is not None:
      key_mask = key_mask | ~jnp.any(key_mask, axis=-1, keepdims=True)
      logits = jnp.where(key_mask[:, None], logits, -jnp.inf)
    weights = jax.nn.softmax(logits / math.sqrt(dh), axis=-1).astype(self.dtype)
    weights = nn.Dropout(self.dropout, name='attn_dropout')(weights, deterministic=not train)
    out = jnp.einsum('bhqk,bkhc->bqhc', weights, v).reshape(*query.shape[:2], d)
    return nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform,
                    bias_init=nn.initializers.zeros, name='out')(out)


class TransformerDecoderLayer(nn.Module):
  """DETR TransformerDecoderLayer: self-attention, cross-attention, FFN; post- or pre-norm.

  Self-attention: q = k = tgt + query_pos, v = tgt. Cross-attention: q = tgt + query_pos,
  k = memory + pos, v = memory. Dropout (rate `dropout`) on each residual branch, inside
  the FFN after the ReLU, and on the attention weights.
  """
  d_model: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  pre_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tgt: jax.Array, memory: jax.Array, *, pos: jax.Array,
               query_pos: jax.Array, train: bool,
               memory_mask: jax.Array | None = None) -> jax.Array:
    """tgt: [B, Q, d]; memory: [B, N, d]; pos: [B or 1, N, d]; query_pos: [B or 1, Q, d].

    memory_mask: optional bool [B, Q, N], the memory positions each query's
      cross-attention may read (see MultiHeadAttention); None reads all.

    Returns:
      [B, Q, d].
    """
    d = self.d_model
    drop = lambda name: (lambda x: nn.Dropout(self.dropout, name=name)(
        x, deterministic=not train))
    norm = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attn = lambda name: MultiHeadAttention(d, self.num_heads, self.dropout, dtype=self.dtype,
                                           name=name)
    linear1 = nn.Dense(self.ffn_dim, dtype=self.dtype, kernel_init=xavier_uniform,
                       bias_init=torch_linear_bias_init(d), name='linear1')
    linear2 = nn.Dense(d, dtype=self.dtype, kernel_init=xavier_uniform,
                       bias_init=torch_linear_bias_init(self.ffn_dim), name='linear2')
    ffn = lambda x: linear2(drop('dropout')(nn.relu(linear1(x))))
    self_attn, cross_attn = attn('self_attn'), attn('multihead_attn')
    norm1, norm2, norm3 = norm('norm1'), norm('norm2'), norm('norm3')

    if self.pre_norm:
      t = norm1(tgt)
      q = t + query_pos
      tgt = tgt + drop('dropout1')(self_attn(q, q, t, train=train))
      t = norm2(tgt)
      tgt = tgt + drop('dropout2')(cross_attn(t + query_pos, memory + pos, memory,
                                              train=train, key_mask=memory_mask))
      return tgt + drop('dropout3')(ffn(norm3(tgt)))

    q = tgt + query_pos
    tgt = norm1(tgt + drop('dropout1')(self_attn(q, q, tgt, train=train)))
    tgt = norm2(tgt + drop('dropout2')(cross_attn(tgt + query_pos, memory + pos, memory,
                                                  train=train, key_mask=memory_mask)))
    return norm3(tgt + drop('dropout3')(ffn(tgt)))


class TransformerDecoder(nn.Module):
  """A stack of decoder layers plus the shared final LayerNorm `norm`.

  Every layer's output goes through `norm` (DETR's return_intermediate), giving the segment
  embeddings of all layers for deep supervision.
  """
  num_layers: int = 6
  d_model: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  pre_norm: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tgt: jax.Array, memory: jax.Array, *, pos: jax.Array,
               query_pos: jax.Array, train: bool,
               memory_mask_fn: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """tgt: [B, Q, d]; memory: [B, N, d]; pos: [B or 1, N, d]; query_pos: [B or 1, Q, d].

    memory_mask_fn: optional masked attention (Mask2Former, Cheng et al. 2022): maps the
      segment embeddings [B, Q, d] of layer i to a bool [B, Q, N] memory mask (the
      foreground of that layer's mask prediction) for the cross-attention of layer i + 1.
      The first layer reads the whole memory. None: DETR/MaskFormer, no mask anywhere.

    Returns:
      segment embeddings of every layer, [num_layers, B, Q, d] (index -1: last layer).
    """
    final_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm')
    outputs = []
    x = tgt
    memory_mask = None
    for i in range(self.num_layers):
      x = TransformerDecoderLayer(self.d_model, self.num_heads, self.ffn_dim, self.dropout,
                                  self.pre_norm, dtype=self.dtype, name=f'layers_{i}')(
                                      x, memory, pos=pos, query_pos=query_pos, train=train,
                                      memory_mask=memory_mask)
      outputs.append(final_norm(x))
      if memory_mask_fn is not None:
        memory_mask = memory_mask_fn(outputs[-1])
    return jnp.stack(outputs)
