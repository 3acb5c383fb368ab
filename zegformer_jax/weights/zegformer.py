"""Official ZegFormer (detectron2) state_dict keys -> zegformer_jax Flax variables.

`official_targets` is the single key mapping (tests/modeling/test_models.py runs it over the
full R-50 key list); `convert_zegformer_format` applies it to the formats whose targets are
ZegFormer variables: a whole official checkpoint, or a ResNet backbone alone.
"""
import re
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np

from zegformer_jax.weights import resnet
from zegformer_jax.weights.accounting import (
    Conversion, ConversionError, Path, Target, account_key, identity, in_proj_part,
    known_unused, linear_targets, norm_targets, oihw_to_hwio, record_missing, shape_of,
    squeeze_row)

# What a full checkpoint is responsible for.
FULL_COVERS = ('params', 'frozen')
# Eval-config checkpoints carry the CLIP model under this prefix (OpenAI layout).
CLIP_PREFIX = 'sem_seg_head.predictor.clip_model.'

_PIXEL_DECODER_KEY = re.compile(r'^(adapter_[1-3]|layer_[1-4]|mask_features)\.(.+)$')
_DECODER_LAYER_KEY = re.compile(r'^layers\.(\d+)\.(.+)$')


def _attention_targets(path: Path, leaf: str) -> Optional[List[Target]]:
  """nn.MultiheadAttention keys -> MultiHeadAttention (query/key/value/out) targets."""
  if leaf in ('in_proj_weight', 'in_proj_bias'):
    weight = leaf == 'in_proj_weight'
    return [('params', path + (name, 'kernel' if weight else 'bias'), in_proj_part(i, weight))
            for i, name in enumerate(('query', 'key', 'value'))]
  if leaf.startswith('out_proj.'):
    return linear_targets(path + ('out',), leaf[len('out_proj.'):])
  return None


def _decoder_targets(rest: str) -> Optional[List[Target]]:
  """`transformer.decoder.` key remainder -> targets under 'transformer'."""
  top = ('transformer',)
  if rest.startswith('norm.'):
    return norm_targets(top + ('norm',), rest[5:])
  m = _DECODER_LAYER_KEY.match(rest)
  if not m:
    return None
  path = top + (f'layers_{int(m.group(1))}',)
  module, _, leaf = m.group(2).partition('.')
  if module in ('self_attn', 'multihead_attn'):
    return _attention_targets(path + (module,), leaf)
  if module in ('linear1', 'linear2'):
    return linear_targets(path + (module,), leaf)
  if module in ('norm1', 'norm2', 'norm3'):
    return norm_targets(path + (module,), leaf)
  return None


def _pixel_decoder_targets(rest: str) -> Optional[List[Target]]:
  """`sem_seg_head.pixel_decoder.` key remainder -> targets under 'pixel_decoder'."""
  m = _PIXEL_DECODER_KEY.match(rest)
  if not m:
    return None
  path, leaf = ('pixel_decoder', m.group(1)), m.group(2)
  if leaf == 'weight':
    return [('params', path + ('kernel',), oihw_to_hwio)]
  if leaf == 'bias':
    return [('params', path + ('bias',), identity)]
  if leaf.startswith('norm.'):
    return norm_targets(path + ('norm',), leaf[5:])
  return None


def official_targets(key: str) -> Optional[List[Target]]:
  """Targets (collection, flax path, transform) of an official ZegFormer state_dict key.

  None for a key this model has no variable for (known-unused keys included; see
  `accounting.known_unused`). The mapping is by name only: shapes are checked against a
  model later.
  """
  if key.startswith('backbone.'):
    return resnet.backbone_targets(key[len('backbone.'):])
  if key.startswith('sem_seg_head.pixel_decoder.'):
    return _pixel_decoder_targets(key[len('sem_seg_head.pixel_decoder.'):])
  prefix = 'sem_seg_head.predictor.'
  if not key.startswith(prefix):
    return None
  rest = key[len(prefix):]
  if rest.startswith('transformer.decoder.'):
    return _decoder_targets(rest[len('transformer.decoder.'):])
  if rest == 'bg_feature':
    return [('params', ('no_object_embedding',), squeeze_row)]
  if rest == 'query_embed.weight':
    return [('params', ('query_embed',), identity)]
  if rest in ('input_proj.weight', 'input_proj.bias'):
    leaf = rest.split('.')[1]
    return [('params', ('input_proj', 'kernel' if leaf == 'weight' else 'bias'),
             oihw_to_hwio if leaf == 'weight' else identity)]
  m = re.match(r'^mask_embed\.layers\.(\d+)\.(weight|bias)$', rest)
  if m:
    return linear_targets(('mask_embed', f'layers_{int(m.group(1))}'), m.group(2))
  m = re.match(r'^projection_layer\.(weight|bias)$', rest)
  if m:
    return linear_targets(('semantic_proj',), m.group(1))
  return None


def official_to_flax(key: str, shape: Sequence[int]) -> List[Tuple[str, Path, Tuple[int, ...]]]:
  """[(collection, flax path, shape)] of an official key of the given shape.

  [] for known-unused keys (criterion.empty_weight, logit_scale, ...); ConversionError for
  a key that maps nowhere.
  """
  if known_unused('zegformer', key):
    return []
  targets = official_targets(key)
  if targets is None:
    raise ConversionError(f'{key}: not an official ZegFormer key this model knows')
  return [(coll, path, shape_of(t, shape)) for coll, path, t in targets]


def convert_zegformer_format(source_format: str, tensors: Mapping[str, np.ndarray],
                             shapes: Optional[Mapping[Path, Tuple[int, ...]]] = None
                             ) -> Conversion:
  """Converts a d2-resnet / torchvision-resnet / zegformer state dict to flax variables.

  Args:
    source_format: one of 'd2-resnet', 'torchvision-resnet', 'zegformer'.
    tensors: {source key: array}; arrays may be zero-stride placeholders
      (np.broadcast_to) when only shapes matter.
    shapes: model variable shapes (`accounting.model_shapes(config.model)`), or None to
      convert by name only.

  Returns:
    A Conversion; nothing is raised for accounting problems (see
    `accounting.check_conversion`), only for malformed tensors (e.g. an in_proj that does
    not split in thirds).
  """
  if source_format not in ('d2-resnet', 'torchvision-resnet', 'zegformer'):
    raise ValueError(f'not a ZegFormer-variable format: {source_format!r}')
  covers = FULL_COVERS if source_format == 'zegformer' else resnet.BACKBONE_COVERS
  conv = Conversion(source_format, {}, {}, covers, {}, [], [], [])
  clip = {}
  for key, value in tensors.items():
    if source_format == 'zegformer' and key.startswith(CLIP_PREFIX):
      clip[key[len(CLIP_PREFIX):]] = value
      continue
    name = key
    if source_format == 'torchvision-resnet':
      name = resnet.torchvision_to_d2(key) or key
    account_key(conv, key, value, known_unused(source_format, name),
                official_targets(name if source_format == 'zegformer' else 'backbone.' + name),
                shapes)
  record_missing(conv, shapes)
  if clip:
    conv.clip = clip
  return conv
