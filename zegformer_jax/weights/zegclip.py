"""Released ZegCLIP (mmsegmentation) checkpoints -> the ZegCLIP model's Flax variables.

ZegCLIP's checkpoints (mmcv: {'meta', 'state_dict', 'optimizer'}) hold three modules
(docs/reference.md §10, 'Checkpoint layout'):

  backbone.*      VPTCLIPVisionTransformer: OpenAI CLIP's visual tower under its own
                  names without 'visual.' (conv1, class_embedding, positional_embedding
                  already resized to 1 + 32 x 32 rows, ln_pre, transformer.resblocks.<i>,
                  ln_post, proj) -> 'frozen'/image_encoder (transformers' names); and the
                  prompts: prompt_embeddings [1, N, D] (layer 0) + deep_prompt_embeddings
                  [L - 1, N, D] (layers 1..L-1) -> params/image_encoder/deep_prompts
                  [L, N, D], prompt_proj, prompt_norm.
  decode_head.*   q_proj (the relationship descriptor's projection) and
                  decoder_1.layers.<i>.{multihead_attn.{q,k,v,proj}, linear1, linear2,
                  norm2, norm3} -> params/head; each layer's self_attn and norm1 are built
                  by torch's TransformerDecoderLayer but never called (skipped).
  text_encoder.*  CLIP's text tower, frozen and unused (ZegCLIP reads precomputed text
                  embeddings; here they come from config.clip.model_path) (skipped).

The whitelisting reader (accounting.read_tensors: no code from the file runs) and the key
accounting (every key converted or skipped with a reason, every model variable covered)
are those of the other formats.
"""
import re
from typing import List, Mapping, Optional, Tuple

import numpy as np

from zegformer_jax.weights import openai_clip
from zegformer_jax.weights.accounting import (
    Conversion, ConversionError, Path, Target, account_key, add_targets, identity,
    linear_targets, norm_targets, record_missing)

COVERS = ('params', 'frozen')
SHALLOW_PROMPT = 'backbone.prompt_embeddings'
DEEP_PROMPTS = 'backbone.deep_prompt_embeddings'
PROMPTS_TARGET = ('params', 'image_encoder', 'deep_prompts')

_LAYER = re.compile(r'^decode_head\.decoder_1\.layers\.(\d+)\.(.+)$')


def known_unused(key: str) -> Optional[str]:
  """Why a ZegCLIP key is deliberately not converted, or None."""
  if key.startswith('text_encoder.'):
    return ('CLIP text tower (frozen, unused by ZegCLIP: text embeddings come from '
            'config.clip.model_path)')
  m = _LAYER.match(key)
  if m and m.group(2).split('.')[0] in ('self_attn', 'norm1'):
    return "built by torch's TransformerDecoderLayer, never called by ZegCLIP's decoder"
  if key == 'decode_head.loss_decode.criterion.empty_weight':
    return 'loss class weights (unused by the per-class sigmoid loss)'
  return None


def targets(key: str) -> Optional[List[Target]]:
  """(collection, flax path, transform) targets of a ZegCLIP key, by name; None if unknown.
  The two prompt tables are joined in `convert_zegclip`."""
  if key.startswith('backbone.'):
    rest = key[len('backbone.'):]
    module, _, leaf = rest.rpartition('.')
    if module == 'prompt_proj':
      return linear_targets(('image_encoder', 'prompt_proj'), leaf)
    if module == 'prompt_norm':
      return norm_targets(('image_encoder', 'prompt_norm'), leaf)
    clip = openai_clip.clip_targets('visual.' + rest)
    if clip is None:
      return None
    out = []
    for path, transform in clip:
      if path[0] == 'vision_model':
        path = path[1:]
      out.append(('frozen', ('image_encoder',) + path, transform))
    return out
  if key.startswith('decode_head.q_proj.'):
    return linear_targets(('head', 'q_proj'), key.rpartition('.')[2])
  m = _LAYER.match(key)
  if not m:
    return None
  layer = ('head', f'layers_{int(m.group(1))}')
  module, _, leaf = m.group(2).rpartition('.')
  if module in ('linear1', 'linear2'):
    return linear_targets(layer + (module,), leaf)
  if module in ('norm2', 'norm3'):
    return norm_targets(layer + (module,), leaf)
  attn = re.fullmatch(r'multihead_attn\.(q|k|v|proj)', module)
  if attn:
    return linear_targets(layer + ('cross_attn', attn.group(1)), leaf)
  return None


def _prompt_table(tensors: Mapping[str, np.ndarray]) -> Optional[np.ndarray]:
  """[L, N, D]: layer 0's prompts, then the deep prompts of layers 1..L-1."""
  if SHALLOW_PROMPT not in tensors:
    return None
  shallow = np.asarray(tensors[SHALLOW_PROMPT])
  if shallow.ndim != 3 or shallow.shape[0] != 1:
    raise ConversionError(f'{SHALLOW_PROMPT}: shape {shallow.shape}, expected [1, N, D]')
  if DEEP_PROMPTS not in tensors:
    return shallow
  deep = np.asarray(tensors[DEEP_PROMPTS])
  if deep.ndim != 3 or deep.shape[1:] != shallow.shape[1:]:
    raise ConversionError(f'{DEEP_PROMPTS}: shape {deep.shape} does not continue '
                          f'{SHALLOW_PROMPT} {shallow.shape}')
  return np.concatenate([shallow, deep], axis=0)


def convert_zegclip(tensors: Mapping[str, np.ndarray],
                    shapes: Optional[Mapping[Path, Tuple[int, ...]]] = None) -> Conversion:
  """A ZegCLIP state dict -> Conversion (accounting.check_conversion judges it).

  shapes: the ZegCLIP model's variable shapes (accounting.model_shapes of a config with
  model.name 'zegclip'), or None to convert by name only.
  """
  conv = Conversion('zegclip', {}, {}, COVERS, {}, [], [], [])
  prompts = _prompt_table(tensors)
  if prompts is not None:
    source = SHALLOW_PROMPT + (f' + {DEEP_PROMPTS}' if DEEP_PROMPTS in tensors else '')
    add_targets(conv, source, prompts, [(PROMPTS_TARGET[0], PROMPTS_TARGET[1:], identity)],
                shapes)
  elif DEEP_PROMPTS in tensors:
    raise ConversionError(f'{DEEP_PROMPTS} without {SHALLOW_PROMPT} (layer 0\'s prompts)')
  for key, value in tensors.items():
    if key not in (SHALLOW_PROMPT, DEEP_PROMPTS):
      account_key(conv, key, value, known_unused(key), targets(key), shapes)
  record_missing(conv, shapes)
  return conv
