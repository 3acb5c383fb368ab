"""ZegCLIP's head (Zhou et al., CVPR 2023): class queries from text, masks from attention.

One query per class: the relationship descriptor (§3.2) joins the class's text embedding
t with the image's global embedding g, [t ⊙ g, t] (2E), and a linear map brings it back to
E. Three decoder layers (ZegCLIP's TPN_DecoderLayer: cross-attention to the dense
embeddings, then an FFN, each a post-norm residual; no self-attention) refine the queries;
the per-class mask logits are the last layer's cross-attention logits before the softmax,
averaged over heads (decode_seg.py, ATMSingleHeadSeg with use_stages = 1). There is no
class-score head: a class's mask is its score map, and classes are not mutually exclusive
(sigmoid per class, zegclip_loss.py).

Shapes: B images, C classes, h x w patch grid, E = CLIP's joint width (512 for ViT-B/16).
"""
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zegformer_jax.modeling import prompted_vit


def relationship_descriptor(text, image_global):
  """[B, C, 2E] = [t ⊙ g, t] for text [C, E] (or [B, C, E]) and global embeddings g [B, E]."""
  text = jnp.broadcast_to(text, (image_global.shape[0],) + text.shape[-2:])
  return jnp.concatenate([text * image_global[:, None, :], text], axis=-1)


def _trunc_normal(std=0.02):
  return nn.initializers.truncated_normal(std)


class CrossAttention(nn.Module):
  """Multi-head attention of queries [B, C, E] over tokens [B, T, E].

  Returns (output [B, C, E], logits [B, C, T]): the scaled q·k logits before the softmax,
  averaged over heads (ZegCLIP reads its masks from them).
  """
  num_heads: int
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, tokens, deterministic: bool = True):
    e = queries.shape[-1]
    hd = e // self.num_heads
    dense = lambda name: nn.Dense(e, dtype=self.dtype, name=name, kernel_init=_trunc_normal())
    split = lambda x: x.reshape(x.shape[:2] + (self.num_heads, hd))
    q, k, v = split(dense('q')(queries)), split(dense('k')(tokens)), split(dense('v')(tokens))
    logits = jnp.einsum('bchd,bthd->bhct', q, k) * hd ** -0.5
    attn = nn.Dropout(self.dropout)(jax.nn.softmax(logits, axis=-1), deterministic=deterministic)
    out = jnp.einsum('bhct,bthd->bchd', attn, v).reshape(queries.shape)
    return dense('proj')(out), jnp.mean(logits, axis=1)


class DecoderLayer(nn.Module):
  """Cross-attention then FFN, each `x = LN(x + dropout(f(x)))` (post-norm, no self-attention)."""
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, queries, tokens, deterministic: bool = True):
    drop = lambda x: nn.Dropout(self.dropout)(x, deterministic=deterministic)
    attended, logits = CrossAttention(self.num_heads, self.dropout, self.dtype,
                                      name='cross_attn')(queries, tokens, deterministic)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm2')(queries + drop(attended))
    y = nn.Dense(self.ffn_dim, dtype=self.dtype, name='linear1', kernel_init=_trunc_normal())(x)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, name='linear2',
                 kernel_init=_trunc_normal())(drop(jax.nn.relu(y)))
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm3')(x + drop(y))
    return x, logits


class ZegCLIPHead(nn.Module):
  """Text + image embeddings -> per-class mask logits on the patch grid.

  Attributes: num_layers (3), num_heads (8), ffn_dim (2048), dropout (0.1).
  """
  num_layers: int = 3
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, dense, image_global, text, deterministic: bool = True):
    """dense: [B, h, w, E] patch embeddings; image_global: [B, E]; text: [C, E].

    Returns [B, h, w, C] float32 mask logits (the last layer's attention logits).
    """
    b, h, w, e = dense.shape
    tokens = dense.reshape(b, h * w, e)
    queries = nn.Dense(e, dtype=self.dtype, name='q_proj', kernel_init=_trunc_normal())(
        relationship_descriptor(text.astype(dense.dtype), image_global))
    logits = None
    for i in range(self.num_layers):
      queries, logits = DecoderLayer(self.num_heads, self.ffn_dim, self.dropout, self.dtype,
                                     name=f'layers_{i}')(queries, tokens, deterministic)
    return jnp.transpose(logits, (0, 2, 1)).reshape(b, h, w, -1).astype(jnp.float32)


def calibrated_scores(mask_logits, seen_mask, seen_penalty: float = 0.1):
  """ZegCLIP's inference: sigmoid per class, `seen_penalty` subtracted from seen classes.

  mask_logits: [..., C]; seen_mask: [C] bool. Inductive models use 0.1, transductive 0.
  The argmax over C is the label.
  """
  return jax.nn.sigmoid(mask_logits) - seen_penalty * seen_mask.astype(jnp.float32)


def upsample_logits(mask_logits, hw):
  """[B, h, w, C] -> [B, H, W, C], bilinear as PyTorch's align_corners=False (upsampling:
  jax.image.resize's triangle kernel with edge renormalisation gives the same weights)."""
  b, _, _, c = mask_logits.shape
  return jax.image.resize(mask_logits, (b,) + tuple(hw) + (c,), 'linear', antialias=False)


def _merge_frozen(variables):
  """The encoder's view: CLIP's weights ('frozen') and the prompts ('params') as one
  'params' collection, under the names the encoder creates them."""
  return {'params': {**variables.get('frozen', {}), **variables.get('params', {})}}


def _split_frozen(variables):
  """The model's view of what the encoder created: the prompt parameters train ('params'),
  CLIP's own weights are constants ('frozen', like FrozenBN statistics elsewhere)."""
  params = dict(variables.get('params', {}))
  frozen = {k: params.pop(k) for k in list(params) if k not in prompted_vit.PROMPT_PARAMS}
  return {'params': params, 'frozen': frozen}


class ZegCLIP(nn.Module):
  """The one-stage model: deep-prompted frozen CLIP ViT + ZegCLIP's head.

  Attributes:
    clip_config: transformers CLIPVisionConfig of the CLIP whose weights are loaded.
    projection_dim: CLIP's joint width E.
    num_prompts, prompt_depth, prompt_dropout: the encoder's deep prompts.
    num_layers, num_heads, ffn_dim, dropout: the head.
    class_embedding_twice: ZegCLIP's [CLS] input (prompted_vit.VisionEmbeddings).
    input_resolution: the side of the images the position table is kept for (ZegCLIP: 512;
      0: CLIP's own); `with_clip_weights` resizes CLIP's table to it.

  Variables: 'params' holds what trains, the prompt parameters ('image_encoder/
  deep_prompts', 'prompt_proj', 'prompt_norm') and the head; 'frozen' holds CLIP's image
  tower under transformers' names ('image_encoder/embeddings', 'encoder', ...,
  'visual_projection'), so gradients and optimiser state exist for the trainable part
  only (ZegCLIP trains names with 'prompt' in its backbone and the whole decode head).
  """
  clip_config: Any
  projection_dim: int
  num_prompts: int = 10
  prompt_depth: int = 12
  prompt_dropout: float = 0.1
  num_layers: int = 3
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  class_embedding_twice: bool = False
  input_resolution: int = 0
  dtype: Any = jnp.float32

  @property
  def embed_dim(self) -> int:
    """Width of the class embeddings the model takes (methods.init_variables)."""
    return self.projection_dim

  @nn.compact
  def __call__(self, images, text_embeddings, train: bool = False):
    """images: [B, H, W, 3] CLIP-normalised; text_embeddings: [C, E] L2-normalised.

    Returns {'mask_logits': [B, h, w, C] on the patch grid,
             'sem_seg_logits': [B, H, W, C] upsampled to the input}.
    """
    initializing = self.is_initializing()
    encoder_cls = nn.map_variables(
        prompted_vit.PromptedCLIPVisionEncoder, ['params', 'frozen'],
        trans_in_fn=_merge_frozen, trans_out_fn=_split_frozen,
        init=initializing, mutable=initializing)
    enc = encoder_cls(self.clip_config, self.projection_dim, self.num_prompts,
                      self.prompt_depth, prompt_dropout=self.prompt_dropout,
                      class_embedding_twice=self.class_embedding_twice,
                      input_resolution=self.input_resolution, dtype=self.dtype,
                      name='image_encoder')(images, deterministic=not train)
    logits = ZegCLIPHead(self.num_layers, self.num_heads, self.ffn_dim, self.dropout,
                         self.dtype, name='head')(enc['patches'], enc['cls'],
                                                  text_embeddings, deterministic=not train)
    return {'mask_logits': logits, 'sem_seg_logits': upsample_logits(logits, images.shape[1:3])}


VISION_KEYS = ('hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
               'image_size', 'patch_size', 'hidden_act', 'layer_norm_eps')


def vision_config(model_config):
  """transformers CLIPVisionConfig of config.model.zegclip.vision (the CLIP architecture
  whose weights the model loads; checked against them by `check_clip`)."""
  from transformers import CLIPVisionConfig
  return CLIPVisionConfig(**{k: model_config.zegclip.vision[k] for k in VISION_KEYS})


def build_model(model_config) -> ZegCLIP:
  """ZegCLIP from the `model` sub-config: model.zegclip (prompts, head, CLIP's vision
  architecture) and model.embed_dim (CLIP's joint width)."""
  z = model_config.zegclip
  return ZegCLIP(vision_config(model_config), int(model_config.embed_dim),
                 num_prompts=int(z.num_prompts), prompt_depth=int(z.prompt_depth),
                 prompt_dropout=float(z.prompt_dropout), num_layers=int(z.num_layers),
                 num_heads=int(z.num_heads), ffn_dim=int(z.ffn_dim),
                 dropout=float(z.dropout), class_embedding_twice=bool(z.class_embedding_twice),
                 input_resolution=int(z.input_resolution), dtype=jnp.dtype(model_config.dtype))


def check_clip(model_config, clip_model, where: str) -> None:
  """Refuses CLIP weights (`clip_model`, loaded from `where`) of another architecture than
  config.model.zegclip.vision / model.embed_dim, naming the first key that differs."""
  got = clip_model.config.vision_config
  for key in VISION_KEYS:
    want = model_config.zegclip.vision[key]
    if getattr(got, key) != want:
      raise ValueError(f'CLIP at {where} has vision_config.{key} = {getattr(got, key)!r}; '
                       f'config.model.zegclip.vision.{key} is {want!r}')
  if clip_model.config.projection_dim != model_config.embed_dim:
    raise ValueError(f'CLIP at {where} has projection_dim {clip_model.config.projection_dim}; '
                     f'config.model.embed_dim is {model_config.embed_dim}')


POSITION_TABLE = ('embeddings', 'position_embedding', 'embedding')


def with_clip_weights(frozen, clip_model_params):
  """The model's 'frozen' variables with the image encoder's CLIP weights replaced by those
  of a FlaxCLIPModel (e.g. load_clip(openai/clip-vit-base-patch16)); names and shapes
  checked, every weight of the encoder covered. CLIP's position table is resized to the
  model's input_resolution first (ZegCLIP's init_weights: 14 x 14 -> 32 x 32)."""
  flat_shapes = lambda tree: {k: tuple(v.shape)
                               for k, v in traverse_util.flatten_dict(dict(tree)).items()}
  name = lambda path: '/'.join(('image_encoder',) + path)
  clip_tree = prompted_vit.clip_params(clip_model_params)
  want = flat_shapes(frozen['image_encoder'])
  if POSITION_TABLE in want:
    table = np.asarray(clip_tree['embeddings']['position_embedding']['embedding'])
    rows = want[POSITION_TABLE][0]
    if table.shape[0] != rows and table.shape[1:] == tuple(want[POSITION_TABLE][1:]):
      clip_tree = dict(clip_tree, embeddings=dict(
          clip_tree['embeddings'], position_embedding={
              'embedding': prompted_vit.resize_position_table(table, rows)}))
  got = flat_shapes(clip_tree)
  for path, shape in got.items():
    if path not in want:
      raise ValueError(f'CLIP weight {name(path)} has no place in the model')
    if want[path] != shape:
      raise ValueError(f'CLIP weight {name(path)} has shape {shape}, the model wants '
                       f'{want[path]}: another CLIP architecture?')
  missing = sorted(name(p) for p in want if p not in got)
  if missing:
    raise ValueError(f'the CLIP weights do not cover the image encoder: no {missing[:3]}')
  return dict(frozen, image_encoder=clip_tree)
