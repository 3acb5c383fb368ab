"""ZegFormer: decoupled zero-shot semantic segmentation (Ding et al., CVPR 2022).

The model groups pixels into segments class-agnostically and classifies each segment
against CLIP text embeddings (docs/reference.md, section 1):

  images -> ResNet (res2..res5) -> BasePixelDecoder -> mask features [B, H/4, W/4, mask_dim]
  res5 (config.decoder.in_feature: a backbone level or 'pixel_embedding', the mask features)
       -> input_proj (1x1 conv) -> memory;  sine position encoding of that grid -> pos
  learned queries (query_embed, as query position) + zero targets -> transformer decoder
       -> segment embeddings of every layer [L, B, Q, hidden]
       (config.decoder.masked_attention: layer l + 1 cross-attends only to the memory
       positions where layer l's mask logit is >= 0, Mask2Former's masked attention; off in
       ZegFormer and in every official config)
  segment embedding -> mask_embed (3-layer MLP) -> mask embedding -> masks = <mask emb, pixel>
  segment embedding -> semantic_proj (Linear) -> L2 norm -> semantic embedding
       -> Eq. 1 logits against the class text embeddings and the no-object embedding.

Parameter naming (official `sem_seg_head.predictor.` key -> flax path; the backbone, pixel
decoder and transformer tables are in resnet.py, pixel_decoder.py and transformer.py):

  ===========================================  =================================================
  official key                                 flax path (collection 'params' unless noted)
  ===========================================  =================================================
  backbone.*                                   backbone/... ('params' + 'frozen'), resnet.py
  sem_seg_head.pixel_decoder.*                 pixel_decoder/..., pixel_decoder.py
  transformer.decoder.*                        transformer/..., transformer.py
  input_proj.weight [256,2048,1,1] / .bias     input_proj/kernel [1,1,2048,256] / bias
  query_embed.weight [Q, 256]                  query_embed [Q, 256]
  mask_embed.layers.{0,1,2}.weight / .bias     mask_embed/layers_{0,1,2}/kernel (w.T) / bias
  projection_layer.weight [512,256] / .bias    semantic_proj/kernel [256,512] (w.T) / bias
  bg_feature [1, 512]                          no_object_embedding [512] (row 0)
  logit_scale (fixed, exp = 100)               none: the constant 1 / config.temperature
  ===========================================  =================================================
"""
import math
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from zegformer_jax.modeling.pixel_decoder import conv1x1_as_matmul
from zegformer_jax.modeling.pixel_decoder import resnet_fpn
from zegformer_jax.modeling.resnet import Conv2d, c2_xavier_fill
from zegformer_jax.modeling.transformer import TransformerDecoder
from zegformer_jax.modeling.transformer import position_embedding_sine
from zegformer_jax.modeling.transformer import torch_linear_bias_init

# PyTorch's default nn.Linear init (kaiming_uniform with a=sqrt(5)): U(+-1/sqrt(fan_in)) for
# the weight; the bias is U(+-1/sqrt(fan_in)) as well. mask_embed and projection_layer use it.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_linear(features: int, fan_in: int, dtype: Any, name: str) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=torch_linear_kernel_init,
                  bias_init=torch_linear_bias_init(fan_in), name=name)


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x||; the 1e-12 floor only guards an all-zero vector (the reference has none)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class MLP(nn.Module):
  """DETR's MLP: `num_layers` Dense layers (layers_0, layers_1, ...), ReLU between them."""
  hidden_dim: int
  output_dim: int
  num_layers: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., Cin] -> [..., output_dim]."""
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = torch_linear(self.output_dim if last else self.hidden_dim, x.shape[-1], self.dtype,
                       f'layers_{i}')(x)
      if not last:
        x = nn.relu(x)
    return x


class ZegFormer(nn.Module):
  """The ZegFormer segmentation model (segment branch; the CLIP image branch is separate).

  Attributes:
    config: the `model` sub-config of configs/common.py (backbone, pixel_decoder, decoder,
      mask_embed_layers, embed_dim, temperature, dtype).

  Variables: 'params' (trainable) and 'frozen' (FrozenBN scale/bias/mean/var of the
  backbone). No parameter depends on the number of classes K.

  Class logits follow Eq. 1 (see `eq1_logits`): 100 * cosine similarity between the
  semantic embedding and each class text embedding, plus a no-object logit against the
  learnable no-object embedding `no_object_embedding` [D], which, as in the official code
  (`bg_feature`), is NOT L2-normalised.
  """
  config: Any

  @nn.compact
  def __call__(self, images: jax.Array, text_embeddings: jax.Array, *,
               train: bool) -> Dict[str, jax.Array]:
    """Runs the model on a batch.

    Args:
      images: [B, H, W, 3] float32, already normalised ((x - pixel_mean) / pixel_std) and
        zero-padded; H and W multiples of 32.
      text_embeddings: [K, D] float32 L2-normalised class text embeddings, D =
        config.embed_dim (seen classes in training, all classes at evaluation).
      train: enables dropout (rng name 'dropout').

    Returns:
      Outputs of all L decoder layers (deep supervision; index -1 is the final layer):
        'pred_logits': [L, B, Q, K + 1] float32, Eq. 1 class logits, no-object last;
        'pred_masks': [L, B, Q, H/4, W/4] float32 mask logits at stride 4;
        'semantic_embeddings': [L, B, Q, D] float32, L2-normalised semantic embeddings.
    """
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    dec = cfg.decoder
    hidden = dec.hidden_dim

    features, mask_features = resnet_fpn(cfg, images, dtype)

    # TRANSFORMER_IN_FEATURE: the decoder reads a backbone level (res5 in every official
    # config) or, with MaskFormer's 'pixel_embedding' option, the stride-4 mask features.
    # Small inputs (ShapesWorld's 64 px, where res5 is 2x2) need the finer memory.
    in_name = dec.get('in_feature', 'res5')
    in_feature = mask_features if in_name == 'pixel_embedding' else features[in_name]
    b, h, w, _ = in_feature.shape
    memory = Conv2d(hidden, 1, use_bias=True, kernel_init=c2_xavier_fill, dtype=dtype,
                    conv1x1_as_matmul=conv1x1_as_matmul(cfg),
                    name='input_proj')(in_feature).reshape(b, h * w, hidden)
    pos = position_embedding_sine(h, w, hidden // 2).reshape(1, h * w, hidden).astype(dtype)
    query_embed = self.param('query_embed', nn.initializers.normal(1.0),
                             (dec.num_queries, hidden), jnp.float32)
    tgt = jnp.zeros((b, dec.num_queries, hidden), dtype)
    mask_embed = MLP(hidden, cfg.pixel_decoder.mask_dim, cfg.mask_embed_layers, dtype=dtype,
                     name='mask_embed')

    def memory_mask(seg: jax.Array) -> jax.Array:
      """Mask2Former's attention mask: [B, Q, hidden] -> bool [B, Q, h*w], mask logit >= 0."""
      logits = jnp.einsum('bqc,bhwc->bqhw', mask_embed(seg), mask_features.astype(dtype),
                          preferred_element_type=jnp.float32)
      if logits.shape[2:] != (h, w):  # memory coarser than the mask features (a res level)
        logits = jax.image.resize(logits, logits.shape[:2] + (h, w), 'bilinear')
      return (logits >= 0).reshape(b, -1, h * w)  # a comparison: no gradient flows back

    segment_embeddings = TransformerDecoder(
        num_layers=dec.num_layers, d_model=hidden, num_heads=dec.num_heads,
        ffn_dim=dec.ffn_dim, dropout=dec.dropout, pre_norm=dec.pre_norm, dtype=dtype,
        name='transformer')(tgt, memory, pos=pos, query_pos=query_embed[None].astype(dtype),
                            train=train,
                            memory_mask_fn=memory_mask if dec.get('masked_attention', False)
                            else None)                          # [L, B, Q, hidden]

    # Mask embeddings -> per-pixel mask logits against the stride-4 mask features.
    pred_masks = jnp.einsum('lbqc,bhwc->lbqhw', mask_embed(segment_embeddings),
                            mask_features.astype(dtype), preferred_element_type=jnp.float32)

    semantic = torch_linear(cfg.embed_dim, hidden, dtype, 'semantic_proj')(segment_embeddings)
    semantic = l2_normalize(semantic.astype(jnp.float32))       # semantic embeddings
    bound = 1.0 / math.sqrt(cfg.embed_dim)  # bg_feature: kaiming_uniform(a=sqrt(5)), fan_in D
    no_object = self.param(
        'no_object_embedding',
        lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound),
        (cfg.embed_dim,))
    pred_logits = eq1_logits(semantic, text_embeddings, no_object, 1.0 / cfg.temperature)
    return {'pred_logits': pred_logits, 'pred_masks': pred_masks,
            'semantic_embeddings': semantic}


def eq1_logits(semantic_embeddings: jax.Array, text_embeddings: jax.Array,
               no_object_embedding: jax.Array, logit_scale: float = 100.0) -> jax.Array:
  """Eq. 1 of the paper: cosine-similarity class logits with a fixed temperature.

  logit_c = cos(S_q, T_c) / tau for each class text embedding T_c. tau = 0.01, so the scale
  is the constant 100, not a parameter (the reference's logit_scale has requires_grad
  False). The no-object logit is 100 * <S_q, T_0> with the learnable no-object embedding
  T_0. As in the official code (`bg_feature`), T_0 is **not** L2-normalised, so the
  no-object logit is not a cosine. Text embeddings are used as given (L2-normalised by the
  caller).

  Args:
    semantic_embeddings: [..., D] L2-normalised semantic embeddings S_q.
    text_embeddings: [K, D] class text embeddings T_1..T_K.
    no_object_embedding: [D] no-object embedding T_0 (unnormalised).
    logit_scale: 1 / tau.

  Returns:
    [..., K + 1] float32 logits, no-object last.
  """
  s = semantic_embeddings.astype(jnp.float32)
  hi = jax.lax.Precision.HIGHEST  # logits are scaled by 100: keep full f32 products
  class_logits = jnp.einsum('...d,kd->...k', s, text_embeddings.astype(jnp.float32),
                            precision=hi)
  no_object_logit = jnp.einsum('...d,d->...', s, no_object_embedding.astype(jnp.float32),
                               precision=hi)
  return logit_scale * jnp.concatenate([class_logits, no_object_logit[..., None]], axis=-1)


def build_model(model_config: ml_collections.ConfigDict) -> ZegFormer:
  """ZegFormer from the `model` sub-config. The config is frozen so the module is hashable."""
  if not isinstance(model_config, ml_collections.FrozenConfigDict):
    model_config = ml_collections.FrozenConfigDict(model_config)
  return ZegFormer(config=model_config)


def init_variables(model: ZegFormer, rng: jax.Array, image_hw: Tuple[int, int] = (64, 64),
                   num_classes: int = 2, batch: int = 1) -> Dict[str, Any]:
  """Initial variables {'params': ..., 'frozen': ...}; none depends on image_hw or K.

  Args:
    model: a ZegFormer.
    rng: PRNG key for the 'params' initialisers.
    image_hw: dummy input size (multiples of 32).
    num_classes: dummy number of text embeddings K.
    batch: dummy batch size.

  Jitted, so XLA drops the forward pass and only the initialisers run. On CPU the program
  is compiled without backend optimisation: it runs once, and the ~150 unrolled RNG
  computations otherwise take several times longer to optimise than to execute.
  Under jax.eval_shape nothing is compiled.
  """
  h, w = image_hw

  def init(key):
    images = jnp.zeros((batch, h, w, 3), jnp.float32)
    embed_dim = getattr(model, 'embed_dim', None) or model.config.embed_dim
    text = jnp.zeros((num_classes, embed_dim), jnp.float32)
    variables = model.init({'params': key}, images, text, train=False)
    return {'params': variables['params'], 'frozen': variables.get('frozen', {})}

  if isinstance(rng, jax.core.Tracer):  # traced (eval_shape, an outer jit): no compile here
    return init(rng)
  lowered = jax.jit(init).lower(rng)
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else {}
  return lowered.compile(compiler_options=options)(rng)


def variable_shapes(model_config, image_hw: Tuple[int, int] = (64, 64)) -> Dict:
  """{'params': ..., 'frozen': ...} as jax.ShapeDtypeStruct trees (nothing is computed)."""
  model = build_model(model_config)
  return jax.eval_shape(lambda: init_variables(
      model, jax.random.key(0), image_hw=image_hw, num_classes=1))
