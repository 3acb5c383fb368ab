"""ZegFormer's image branch in one CLIP pass (eval.image_branch = 'one_pass'; MAFT's idea,
Jiao et al. NeurIPS 2023, with CLIP's own weights and no fine-tuning).

The default image branch ('crops', the paper's and the official code's) runs CLIP's image
encoder once per segment on a masked crop: up to 100 ViT passes per image. Here the image
goes through CLIP's ViT once, at its own resolution, with one extra token per segment (a
*mask query*): it starts as CLIP's [CLS] input and, in every layer, attends only to itself
and to the patch tokens its mask covers. The [CLS] and patch tokens attend to each other
as in plain CLIP and never to the queries, so they are exactly CLIP's; the queries read
them. Each query's output, through CLIP's post-LayerNorm and visual projection, is that
segment's CLIP image embedding (what a masked crop gives in the crop branch), classified
against the text and fused by Eq. 3 the same way.

Shapes: B images, Q segments, P = h x w patches, D CLIP width, E = projection_dim.
The parameters are transformers' FlaxCLIPVisionTransformer's under its names (and
FlaxCLIPModel's visual_projection), so `prompted_vit.clip_params(clip_model.params)` is
used as it is; each layer is transformers' FlaxCLIPMLP and LayerNorms around an attention
that takes the mask (FlaxCLIPAttention only takes a padding or causal mask).
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from zegformer_jax.modeling import attention
from zegformer_jax.modeling import prompted_vit


def patch_masks(mask_logits, grid, threshold: float = 0.5):
  """[B, Q, P] bool: the patches a segment's mask covers.

  mask_logits: [B, Q, H, W] at the image's (padded) size; grid: (h, w) patch grid of the
  CLIP pass. The mask probability is averaged over each patch (area resize) and kept where
  it exceeds `threshold`; a segment whose mask covers no patch keeps its most probable one,
  so every query reads at least one patch.
  """
  b, q = mask_logits.shape[:2]
  prob = jax.image.resize(jax.nn.sigmoid(mask_logits.astype(jnp.float32)),
                          (b, q) + tuple(grid), 'linear', antialias=True)
  prob = prob.reshape(b, q, -1)
  return (prob > threshold) | (prob >= jnp.max(prob, axis=-1, keepdims=True))


def attention_mask(covered, num_prefix: int):
  """[B, T, T] bool (True: may attend) over tokens [prefix ([CLS]), P patches, Q queries].

  covered: [B, Q, P]. Prefix and patch tokens attend to prefix and patch tokens only;
  query i attends to itself and to the patches it covers.
  """
  b, q, p = covered.shape
  t = num_prefix + p + q
  image_rows = jnp.broadcast_to(jnp.arange(t) < num_prefix + p, (b, num_prefix + p, t))
  query_rows = jnp.concatenate([jnp.zeros((b, q, num_prefix), bool), covered,
                                jnp.broadcast_to(jnp.eye(q, dtype=bool), (b, q, q))], axis=-1)
  return jnp.concatenate([image_rows, query_rows], axis=1)


class _MaskedSelfAttention(nn.Module):
  """Multi-head self-attention with a [B, T, T] mask, FlaxCLIPAttention's parameter names.
  by_head: attention.softmax_attention's (None: one head at a time on CPU)."""
  config: Any
  dtype: Any = jnp.float32
  by_head: Optional[bool] = None

  @nn.compact
  def __call__(self, x, mask):
    d, heads = self.config.hidden_size, self.config.num_attention_heads
    hd = d // heads
    dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
    split = lambda y: y.reshape(y.shape[:2] + (heads, hd))
    q, k, v = (split(dense(n)(x)) for n in ('q_proj', 'k_proj', 'v_proj'))
    # mask None: every token attends to every token.
    out = attention.softmax_attention(q, k, v, mask, self.by_head).reshape(x.shape)
    return dense('out_proj')(out)


class _MaskedEncoderLayer(nn.Module):
  """FlaxCLIPEncoderLayer's computation and parameters, the attention masked."""
  config: Any
  dtype: Any = jnp.float32
  by_head: Optional[bool] = None

  @nn.compact
  def __call__(self, x, mask):
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPMLP
    eps = self.config.layer_norm_eps
    x = x + _MaskedSelfAttention(self.config, self.dtype, self.by_head, name='self_attn')(
        nn.LayerNorm(epsilon=eps, dtype=self.dtype, name='layer_norm1')(x), mask)
    return x + FlaxCLIPMLP(self.config, dtype=self.dtype, name='mlp')(
        nn.LayerNorm(epsilon=eps, dtype=self.dtype, name='layer_norm2')(x))


class MaskQueryCLIP(nn.Module):
  """CLIP's image encoder with one mask query per segment: segment embeddings in one pass.

  Attributes:
    config: the transformers CLIPVisionConfig of the loaded CLIP.
    projection_dim: E, the width of CLIP's joint space.
    mask_from: the first layer whose queries see only their segment's patches (0: masked
      in every layer). Before it a query would see what [CLS] sees and be [CLS], so the
      queries enter there as copies of the [CLS] token, as in MAFT, and the layers before
      run on the image tokens alone. MAFT masks the last four of ViT-B/16's twelve
      (mask_from 8).
    with_cls: also return the [CLS] token's embedding (plain CLIP's image embedding at this
      input size: no query reaches it), for MAFT's self-distillation (training/mask_aware.py).
    attention_by_head: attention.softmax_attention's `by_head` (None: one head at a time on
      CPU, where it is 1.4-1.7x faster at a thousand tokens).
  """
  config: Any
  projection_dim: int
  mask_from: int = 0
  with_cls: bool = False
  dtype: Any = jnp.float32
  attention_by_head: Optional[bool] = None

  @nn.compact
  def __call__(self, images, mask_logits):
    """images: [B, H, W, 3] CLIP-normalised, H and W multiples of the patch size;
    mask_logits: [B, Q, Hm, Wm] segment mask logits over the same image (any size).

    Returns [B, Q, E] L2-normalised segment embeddings.
    """
    cfg = self.config
    x, grid = prompted_vit.VisionEmbeddings(cfg, dtype=self.dtype, name='embeddings')(
        images.astype(self.dtype))
    b, q = mask_logits.shape[:2]
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name='pre_layrnorm')(x)
    mask = attention_mask(patch_masks(mask_logits, grid), num_prefix=1)
    layer = functools.partial(_MaskedEncoderLayer, by_head=self.attention_by_head)
    encoder = prompted_vit.CLIPEncoderLayers(cfg, layer, self.dtype, name='encoder')
    start = min(max(int(self.mask_from), 0), cfg.num_hidden_layers)
    for i in range(start):             # [CLS, patches]: plain CLIP
      x = encoder(i, x, None)
    # Every query starts as the [CLS] token of layer `start`'s input.
    x = jnp.concatenate([x, jnp.broadcast_to(x[:, :1], (b, q, x.shape[-1]))], axis=1)
    for i in range(start, cfg.num_hidden_layers):
      x = encoder(i, x, mask)
    x = jnp.concatenate([x[:, :1], x[:, -q:]], axis=1) if self.with_cls else x[:, -q:]
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name='post_layernorm')(x)
    x = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                 name='visual_projection')(x).astype(jnp.float32)
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return (x[:, 1:], x[:, 0]) if self.with_cls else x


def resize_to_grid(images, patch_size: int, size: int = 0):
  """images [B, H, W, 3] resized (antialiased bilinear) so the short side is about `size`
  and both sides are multiples of `patch_size` (0: the image's own size, rounded down)."""
  b, h, w, _ = images.shape
  scale = size / min(h, w) if size else 1.0
  gh = max(int(round(h * scale)) // patch_size, 1)
  gw = max(int(round(w * scale)) // patch_size, 1)
  if (gh * patch_size, gw * patch_size) != (h, w):
    images = jax.image.resize(images, (b, gh * patch_size, gw * patch_size, 3), 'linear',
                              antialias=True)
  return images


def segment_embeddings(clip_model, clip_params, images, mask_logits, size: int = 0,
                       mask_from: int = 0):
  """[B, Q, E] CLIP embeddings of Q segments per image in one ViT pass (`MaskQueryCLIP`).

  clip_model: the FlaxCLIPModel (its config); clip_params: its params. images: [B, H, W, 3]
  CLIP-normalised; mask_logits: [B, Q, H, W]. size: the short side the image is resized to
  for the pass (rounded to the patch grid; 0: as it is, rounded down to the grid).
  mask_from: MaskQueryCLIP.mask_from.
  """
  cfg = clip_model.config.vision_config
  images = resize_to_grid(images, cfg.patch_size, size)
  model = MaskQueryCLIP(cfg, clip_model.config.projection_dim, mask_from, dtype=images.dtype)
  return model.apply({'params': prompted_vit.clip_params(clip_params)}, images, mask_logits)
