"""The CLIP ViT image encoder with deep prompt tuning (ZegCLIP, Zhou et al. CVPR 2023, §3.3).

ZegCLIP keeps CLIP's image encoder frozen and learns `num_prompts` prompt tokens for each of
its first `prompt_depth` layers (VPT-deep, Jia et al. 2022): the tokens of layer i sit
between the [CLS] token and the patch tokens while layer i runs, and the next layer's
prompts replace them before layer i + 1; the prompts' outputs are never read. At 512 px
the 16-px patches form a 32 x 32 grid where CLIP was trained on 14 x 14 (224 px): the
position embeddings of the patches are resized bicubically, as PyTorch's
`F.interpolate(mode='bicubic', align_corners=False)` does it (`torch_bicubic_matrix`), the
[CLS] position kept.

The parameters are those of transformers' FlaxCLIPVisionTransformer under the same names
(`embeddings`, `pre_layrnorm`, `encoder/layers/<i>`, `post_layernorm`), so the
`vision_model` subtree of a FlaxCLIPModel loaded from a Hugging Face directory (the path
that loads openai/clip-vit-base-patch16) is used as it is; its encoder layers are
transformers' own FlaxCLIPEncoderLayer modules, driven one by one here so that prompts can
be inserted between them. The only new parameter is `deep_prompts`. Freezing CLIP is the
optimiser's job (a parameter partition), not this module's.
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def torch_bicubic_matrix(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
  """[size_out, size_in] float64 weights of PyTorch's 1-D bicubic resize (align_corners=False).

  Output i samples the input at x = (i + 0.5) * size_in / size_out - 0.5 with the cubic
  convolution kernel of parameter a (-0.75, PyTorch's; jax.image.resize uses Keys' -0.5),
  indices clamped to the border. Applied on both axes it is `F.interpolate(..., 'bicubic')`.
  """
  def kernel(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0

  w = np.zeros((size_out, size_in), np.float64)
  scale = size_in / size_out
  for i in range(size_out):
    x = (i + 0.5) * scale - 0.5
    x0 = int(np.floor(x))
    t = x - x0
    for k in range(-1, 3):
      w[i, min(max(x0 + k, 0), size_in - 1)] += kernel(k - t)
  return w


def resize_position_embeddings(table, grid: Tuple[int, int]) -> jnp.ndarray:
  """[1 + G*G, D] CLIP position table -> [1 + h*w, D] for a patch grid `grid` = (h, w).

  The [CLS] row is kept; the G x G patch rows are resized bicubically (PyTorch's kernel).
  """
  n, d = table.shape
  g = int(round((n - 1) ** 0.5))
  if g * g != n - 1:
    raise ValueError(f'position table of {n} rows is not 1 + a square grid')
  h, w = grid
  if (h, w) == (g, g):
    return table
  patches = table[1:].reshape(g, g, d)
  rows = jnp.asarray(torch_bicubic_matrix(g, h), table.dtype)
  cols = jnp.asarray(torch_bicubic_matrix(g, w), table.dtype)
  patches = jnp.einsum('hi,ijd,wj->hwd', rows, patches, cols)
  return jnp.concatenate([table[:1], patches.reshape(h * w, d)], axis=0)


class _VisionEmbeddings(nn.Module):
  """transformers' FlaxCLIPVisionEmbeddings' parameters, with resized positions."""
  config: Any
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    d, p = cfg.hidden_size, cfg.patch_size
    cls = self.param('class_embedding', nn.initializers.normal(0.02), (d,))
    patches = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', use_bias=False,
                      dtype=self.dtype, name='patch_embedding')(images)
    b, h, w, _ = patches.shape
    table = nn.Embed((cfg.image_size // p) ** 2 + 1, d, name='position_embedding').embedding
    tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, d)),
                              patches.reshape(b, h * w, d)], axis=1)
    return tokens + resize_position_embeddings(table, (h, w)).astype(tokens.dtype), (h, w)


class _LayerStack(nn.Module):
  """encoder/layers/<i>: transformers' FlaxCLIPEncoderLayer, one per CLIP layer."""
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPEncoderLayer
    self.layers = [FlaxCLIPEncoderLayer(self.config, dtype=self.dtype, name=str(i))
                   for i in range(self.config.num_hidden_layers)]

  def __call__(self, i: int, x):
    return self.layers[i](x, None, deterministic=True)[0]


class _Encoder(nn.Module):
  config: Any
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = _LayerStack(self.config, self.dtype)

  def __call__(self, i: int, x):
    return self.layers(i, x)


class PromptedCLIPVisionEncoder(nn.Module):
  """CLIP ViT with deep prompts; returns per-layer patch tokens and the image embedding.

  Attributes:
    config: the transformers CLIPVisionConfig of the loaded CLIP.
    num_prompts: P, prompt tokens per layer (0: plain CLIP).
    prompt_depth: layers 0 .. prompt_depth-1 receive prompts (ZegCLIP: all of them).
    out_indices: layers whose output patch tokens are returned (0-based).
    prompt_init: prompts start uniform in [-v, v], v = sqrt(6 / (3 * patch_size^2 + D))
      (VPT's Xavier-uniform over the patch-embedding fan-in) when 0; else this v.
  """
  config: Any
  num_prompts: int
  prompt_depth: int
  out_indices: Sequence[int]
  prompt_init: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images) -> dict:
    """images: [B, H, W, 3] CLIP-normalised, H and W multiples of the patch size.

    Returns:
      'layers': tuple over out_indices of [B, h, w, D] patch tokens (before post_layernorm);
      'patches': [B, h, w, D] the last layer's patch tokens after post_layernorm;
      'cls': [B, D] the last layer's [CLS] token after post_layernorm (CLIP's pooled
        output; visual_projection maps it to the joint space);
      'grid': (h, w).
    """
    cfg = self.config
    num_layers = cfg.num_hidden_layers
    if not 0 <= self.prompt_depth <= num_layers:
      raise ValueError(f'prompt_depth={self.prompt_depth}: CLIP has {num_layers} layers')
    if any(not 0 <= i < num_layers for i in self.out_indices):
      raise ValueError(f'out_indices {tuple(self.out_indices)}: CLIP has {num_layers} layers')
    d, p = cfg.hidden_size, self.num_prompts
    x, (h, w) = _VisionEmbeddings(cfg, self.dtype, name='embeddings')(images.astype(self.dtype))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name='pre_layrnorm')(x)
    if p and self.prompt_depth:
      v = self.prompt_init or float(np.sqrt(6.0 / (3 * cfg.patch_size ** 2 + d)))
      init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -v, v)
      prompts = self.param('deep_prompts', init, (self.prompt_depth, p, d))
    encoder = _Encoder(cfg, self.dtype, name='encoder')
    b = x.shape[0]
    outs = []
    for i in range(num_layers):
      has_prompts = p and i < self.prompt_depth
      if has_prompts:   # [CLS, prompts_i, patches]: layer i's prompts replace layer i-1's
        x = jnp.concatenate([x[:, :1], jnp.broadcast_to(prompts[i].astype(x.dtype), (b, p, d)),
                             x[:, -h * w:]], axis=1)
      x = encoder(i, x)
      if i in self.out_indices:
        outs.append(x[:, -h * w:].reshape(b, h, w, d))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name='post_layernorm')(x)
    return {'layers': tuple(outs), 'patches': x[:, -h * w:].reshape(b, h, w, d),
            'cls': x[:, 0], 'grid': (h, w)}
