"""The segmentation methods this codebase trains and evaluates, chosen by config.model.name.

  ==========  ===================================  =======================  ===========
  name        model                                training loss            variants
  ==========  ===================================  =======================  ===========
  zegformer   zegformer.ZegFormer (segments)       criterion (set losses)   seg img full
  spnet_fpn   per_pixel, head 'text' (SPNet-FPN)   per-pixel CE             seg
  zs3net      per_pixel, head 'learned' (ZS3Net)   per-pixel CE, then the   seg
                                                   generative stage
  zegclip     zegclip.ZegCLIP (prompted CLIP ViT,  per-class sigmoid focal  seg
              text-query decoder; one stage)       + dice (zegclip_loss)
  ==========  ===================================  =======================  ===========

Every model takes (images [B, H, W, 3], class embeddings [K, D], train=) and shares the
data pipeline, text embeddings, evaluator and metrics; the first three also share the
backbone and pixel decoder (ZegCLIP's backbone is CLIP's own image tower). 'seg' of a
pixel-level method is its own per-pixel classification; the CLIP image branch (img, full)
needs segments and exists for ZegFormer only. ZegCLIP's 'seg' is its per-class sigmoid
score map (its own image branch is the prompted CLIP it is built on).
"""
from typing import Dict, Tuple

import jax
import ml_collections

from zegformer_jax.modeling import per_pixel
from zegformer_jax.modeling import zegclip
from zegformer_jax.modeling import zegformer

METHODS = ('zegformer', 'spnet_fpn', 'zs3net', 'zegclip')
PIXEL_METHODS = ('spnet_fpn', 'zs3net')     # per-pixel softmax over the classes
DISPLAY_NAMES = {'zegformer': 'ZegFormer', 'spnet_fpn': 'SPNet-FPN', 'zs3net': 'ZS3Net',
                 'zegclip': 'ZegCLIP'}

# Initial variables of any method's model (jitted init; see zegformer.init_variables).
init_variables = zegformer.init_variables


def method_name(model_config) -> str:
  """config.model.name, checked ('zegformer' when a config predates the key)."""
  name = model_config.get('name', 'zegformer')
  if name not in METHODS:
    raise ValueError(f'config.model.name must be one of {METHODS}, got {name!r}')
  return name


def is_pixel_method(model_config) -> bool:
  return method_name(model_config) in PIXEL_METHODS


def has_segments(model_config) -> bool:
  """Whether the method predicts segments (queries with masks): ZegFormer only."""
  return method_name(model_config) == 'zegformer'


def has_class_sized_params(model_config) -> bool:
  """Whether parameters have a class axis (ZS3Net's classifier, fitted to the seen classes
  and generated unseen features): the others score any class list by its text embeddings."""
  return method_name(model_config) == 'zs3net'


def variants(model_config) -> tuple:
  """The evaluation variants the method has."""
  return ('seg', 'img', 'full') if has_segments(model_config) else ('seg',)


def build_model(model_config):
  """The method's flax module from the `model` sub-config (frozen, so it is hashable)."""
  if not isinstance(model_config, ml_collections.FrozenConfigDict):
    model_config = ml_collections.FrozenConfigDict(model_config)
  name = method_name(model_config)
  if name == 'zegformer':
    return zegformer.ZegFormer(config=model_config)
  if name == 'zegclip':
    return zegclip.build_model(model_config)
  return per_pixel.PerPixelSegmenter(config=model_config,
                                     head='text' if name == 'spnet_fpn' else 'learned')


def variable_shapes(model_config, image_hw: Tuple[int, int] = (64, 64),
                    num_classes: int = 1) -> Dict:
  """{'params', 'frozen'} of the method's model as jax.ShapeDtypeStruct trees (nothing is
  computed). Only ZS3Net's classifier depends on num_classes (one row per class)."""
  model = build_model(model_config)
  return jax.eval_shape(lambda: init_variables(
      model, jax.random.key(0), image_hw=image_hw, num_classes=num_classes))
