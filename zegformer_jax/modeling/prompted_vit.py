"""The CLIP ViT image encoder with deep prompt tuning (ZegCLIP, Zhou et al. CVPR 2023, §3.3).

ZegCLIP keeps CLIP's image encoder frozen and learns `num_prompts` prompt tokens for each of
its first `prompt_depth` layers (VPT-deep, Jia et al. 2022): the tokens of layer i sit
between the [CLS] token and the patch tokens while layer i runs, and the next layer's
prompts replace them before layer i + 1; the prompts' outputs are never read. Every
prompt passes through one shared linear map (`prompt_proj`) and dropout 0.1 before it is
inserted; after the last layer a LayerNorm of its own (`prompt_norm`, eps 1e-6), then
CLIP's frozen post-LayerNorm and projection apply to every token, and the [CLS] token and
the patch tokens, L2-normalised, are the image's global embedding and its dense
embeddings in CLIP's joint space (ZegCLIP's img_encoder.py, out_indices = [11]). At 512 px
the 16-px patches form a 32 x 32 grid where CLIP was trained on 14 x 14 (224 px): the
position embeddings of the patches are resized bilinearly, as ZegCLIP's
`F.interpolate(mode='bilinear', align_corners=False)` does (`torch_linear_matrix`), the
[CLS] position kept.

The parameters are those of transformers' FlaxCLIPVisionTransformer under the same names
(`embeddings`, `pre_layrnorm`, `encoder/layers/<i>`, `post_layernorm`), so the
`vision_model` subtree of a FlaxCLIPModel loaded from a Hugging Face directory (the path
that loads openai/clip-vit-base-patch16) is used as it is; its encoder layers are
transformers' own FlaxCLIPEncoderLayer modules, driven one by one here so that prompts can
be inserted between them. The new parameters, the only trainable ones in ZegCLIP, are
`deep_prompts`, `prompt_proj` and `prompt_norm`; `visual_projection` is FlaxCLIPModel's
top-level projection. This module creates all of them as 'params'; ZegCLIP
(zegclip.py) keeps CLIP's own weights apart as constants.
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def torch_linear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] float64 weights of PyTorch's 1-D linear resize (align_corners=False).

  Output i samples the input at x = (i + 0.5) * size_in / size_out - 0.5, clamped below at
  0 (PyTorch's area_pixel_compute_source_index), between floor(x) and the next index
  (clamped to the last). Applied on both axes it is `F.interpolate(..., 'bilinear')`.
  """
  w = np.zeros((size_out, size_in), np.float64)
  for i in range(size_out):
    x = max((i + 0.5) * size_in / size_out - 0.5, 0.0)
    x0 = min(int(np.floor(x)), size_in - 1)
    t = x - x0
    w[i, x0] += 1 - t
    w[i, min(x0 + 1, size_in - 1)] += t
  return w


def resize_position_embeddings(table, grid: Tuple[int, int], xp=jnp) -> jnp.ndarray:
  """[1 + G*G, D] CLIP position table -> [1 + h*w, D] for a patch grid `grid` = (h, w).

  The [CLS] row is kept; the G x G patch rows are resized bilinearly as ZegCLIP does
  (img_encoder.py: F.interpolate(mode='bilinear'), 14 x 14 -> 32 x 32 at 512 px).
  """
  n, d = table.shape
  g = int(round((n - 1) ** 0.5))
  if g * g != n - 1:
    raise ValueError(f'position table of {n} rows is not 1 + a square grid')
  h, w = grid
  if (h, w) == (g, g):
    return table
  patches = table[1:].reshape(g, g, d)
  rows = xp.asarray(torch_linear_matrix(g, h), table.dtype)
  cols = xp.asarray(torch_linear_matrix(g, w), table.dtype)
  patches = xp.einsum('hi,ijd,wj->hwd', rows, patches, cols)
  return xp.concatenate([table[:1], patches.reshape(h * w, d)], axis=0)


def position_rows(config, input_resolution: int = 0) -> int:
  """Rows of the position table for images of side `input_resolution` (0: CLIP's own)."""
  side = (input_resolution or config.image_size) // config.patch_size
  return side * side + 1


def resize_position_table(table: np.ndarray, rows: int) -> np.ndarray:
  """A CLIP position table [1 + G*G, D] resized to `rows` = 1 + g*g rows (float64 numpy,
  the bilinear resize of `resize_position_embeddings`), as ZegCLIP's init_weights."""
  g = int(round((rows - 1) ** 0.5))
  if g * g != rows - 1:
    raise ValueError(f'{rows} position rows are not 1 + a square grid')
  return np.asarray(resize_position_embeddings(np.asarray(table, np.float64), (g, g),
                                               xp=np), table.dtype)


class VisionEmbeddings(nn.Module):
  """transformers' FlaxCLIPVisionEmbeddings' parameters, with resized positions.

  class_embedding_twice: the [CLS] token gets class_embedding + position 0 +
  class_embedding, as ZegCLIP's img_encoder.py computes it (its `cls_pos` adds the class
  embedding to the position row of a token that already is the class embedding).
  """
  config: Any
  class_embedding_twice: bool = False
  input_resolution: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images):
    cfg = self.config
    d, p = cfg.hidden_size, cfg.patch_size
    cls = self.param('class_embedding', nn.initializers.normal(0.02), (d,))
    patches = nn.Conv(d, (p, p), strides=(p, p), padding='VALID', use_bias=False,
                      dtype=self.dtype, name='patch_embedding')(images)
    b, h, w, _ = patches.shape
    table = nn.Embed(position_rows(cfg, self.input_resolution), d,
                     name='position_embedding').embedding
    if self.class_embedding_twice:
      table = table.at[0].add(cls)
    tokens = jnp.concatenate([jnp.broadcast_to(cls.astype(patches.dtype), (b, 1, d)),
                              patches.reshape(b, h * w, d)], axis=1)
    return tokens + resize_position_embeddings(table, (h, w)).astype(tokens.dtype), (h, w)


class _LayerStack(nn.Module):
  config: Any
  layer: Any
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = [self.layer(self.config, dtype=self.dtype, name=str(i))
                   for i in range(self.config.num_hidden_layers)]

  def __call__(self, i: int, *args, **kwargs):
    return self.layers[i](*args, **kwargs)


class CLIPEncoderLayers(nn.Module):
  """CLIP's encoder/layers/<i> parameter tree with one `layer` module per CLIP layer
  (`layer(config, dtype=, name=)`: transformers' FlaxCLIPEncoderLayer here, one_pass's
  masked layer there); `encoder(i, ...)` runs layer i on the rest of the arguments."""
  config: Any
  layer: Any
  dtype: Any = jnp.float32

  def setup(self):
    self.layers = _LayerStack(self.config, self.layer, self.dtype)

  def __call__(self, i: int, *args, **kwargs):
    return self.layers(i, *args, **kwargs)


class PromptedCLIPVisionEncoder(nn.Module):
  """CLIP ViT with deep prompts: dense and global image embeddings in CLIP's joint space.

  Attributes:
    config: the transformers CLIPVisionConfig of the loaded CLIP.
    projection_dim: width of CLIP's joint space (visual_projection's output).
    num_prompts: N, prompt tokens per layer (ZegCLIP: 10 on VOC, 100 on COCO-Stuff; 0:
      plain CLIP, no prompt parameters).
    prompt_depth: layers 0 .. prompt_depth-1 receive prompts (ZegCLIP: all 12).
    out_indices: layers whose raw output patch tokens are also returned (0-based).
    prompt_dropout: dropout on the projected prompts (ZegCLIP: 0.1).
    class_embedding_twice: ZegCLIP's [CLS] input (`VisionEmbeddings`); False is CLIP's.
    input_resolution: the image side the position table is made for (0: CLIP's own
      image_size). ZegCLIP keeps a 512-px table (1 + 32 x 32 rows), CLIP's resized once
      when the weights load (`resize_position_table`), and resizes it again to the grid of
      each input (an identity for 512-px windows).
  """
  config: Any
  projection_dim: int
  num_prompts: int
  prompt_depth: int
  out_indices: Sequence[int] = ()
  prompt_dropout: float = 0.1
  class_embedding_twice: bool = False
  input_resolution: int = 0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images, deterministic: bool = True) -> dict:
    """images: [B, H, W, 3] CLIP-normalised, H and W multiples of the patch size.

    Returns:
      'patches': [B, h, w, E] L2-normalised dense embeddings (E = projection_dim);
      'cls': [B, E] the L2-normalised global embedding ([CLS] through the same head);
      'layers': tuple over out_indices of [B, h, w, D] raw patch tokens of those layers;
      'grid': (h, w).
    """
    cfg = self.config
    num_layers = cfg.num_hidden_layers
    if not 0 <= self.prompt_depth <= num_layers:
      raise ValueError(f'prompt_depth={self.prompt_depth}: CLIP has {num_layers} layers')
    if any(not 0 <= i < num_layers for i in self.out_indices):
      raise ValueError(f'out_indices {tuple(self.out_indices)}: CLIP has {num_layers} layers')
    d, n = cfg.hidden_size, self.num_prompts
    x, (h, w) = VisionEmbeddings(cfg, self.class_embedding_twice, self.input_resolution,
                                  self.dtype, name='embeddings')(images.astype(self.dtype))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name='pre_layrnorm')(x)
    prompted = bool(n and self.prompt_depth)
    if prompted:
      # VPT's Xavier-uniform bound over the patch embedding's fan-in (0.0625 for ViT-B/16).
      v = float(np.sqrt(6.0 / (3 * cfg.patch_size ** 2 + d)))
      prompts = self.param('deep_prompts',
                           lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -v, v),
                           (self.prompt_depth, n, d))
      # kaiming_normal_(mode='fan_out') of a d x d torch Linear: std sqrt(2 / d).
      prompts = nn.Dense(d, dtype=self.dtype, name='prompt_proj',
                         kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
                         bias_init=nn.initializers.zeros)(prompts)
      prompts = nn.Dropout(self.prompt_dropout)(prompts, deterministic=deterministic)
    from transformers.models.clip.modeling_flax_clip import FlaxCLIPEncoderLayer
    encoder = CLIPEncoderLayers(cfg, FlaxCLIPEncoderLayer, self.dtype, name='encoder')
    b = x.shape[0]
    layers = []
    for i in range(num_layers):
      if prompted and i < self.prompt_depth:   # [CLS, prompts_i, patches]: replace layer i-1's
        x = jnp.concatenate([x[:, :1], jnp.broadcast_to(prompts[i].astype(x.dtype), (b, n, d)),
                             x[:, -h * w:]], axis=1)
      x = encoder(i, x, None, deterministic=True)[0]
      if i in self.out_indices:
        layers.append(x[:, -h * w:].reshape(b, h, w, d))
    if prompted:
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='prompt_norm')(x)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name='post_layernorm')(x)
    x = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype,
                 name='visual_projection')(x)
    x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return {'patches': x[:, -h * w:].reshape(b, h, w, -1), 'cls': x[:, 0],
            'layers': tuple(layers), 'grid': (h, w)}


def clip_params(clip_model_params) -> dict:
  """The encoder's frozen parameters from FlaxCLIPModel.params: its vision_model subtree
  and the top-level visual_projection."""
  return dict(clip_model_params['vision_model'],
              visual_projection=clip_model_params['visual_projection'])


PROMPT_PARAMS = ('deep_prompts', 'prompt_proj', 'prompt_norm')   # ZegCLIP's trainable ones
