"""OpenAI CLIP ViT state dict -> Hugging Face Flax CLIP directory (FlaxCLIPModel layout).

Used for `--from openai-clip` and for the `clip_model.*` tensors of eval-config ZegFormer
checkpoints. The CLIPConfig is derived from the tensor shapes as OpenAI's build_model does;
the key table and the conventions are in docs/weights.md.
"""
import json
import os
import re
import shutil
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from zegformer_jax.weights.accounting import (
    NORM_LEAVES, Conversion, ConversionError, Path, Transform, check_conversion, flat_shapes,
    identity, in_proj_part, known_unused, linear_to_dense, listing, oihw_to_hwio, path_str,
    to_scalar)

_CLIP_BLOCK = re.compile(r'^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$')
_CLIP_LAYER_NORMS = {'ln_1': 'layer_norm1', 'ln_2': 'layer_norm2'}


def _clip_targets(key: str) -> Optional[List[Tuple[Path, Transform]]]:
  """OpenAI CLIP key -> [(Hugging Face Flax path, transform)]; None if unknown."""
  m = _CLIP_BLOCK.match(key)
  if m:
    tower = 'vision_model' if m.group(1) else 'text_model'
    base = (tower, 'encoder', 'layers', str(int(m.group(2))))
    rest = m.group(3)
    if rest in ('attn.in_proj_weight', 'attn.in_proj_bias'):
      weight = rest.endswith('weight')
      return [(base + ('self_attn', f'{n}_proj', 'kernel' if weight else 'bias'),
               in_proj_part(i, weight)) for i, n in enumerate('qkv')]
    module, _, leaf = rest.rpartition('.')
    linear = {'attn.out_proj': ('self_attn', 'out_proj'), 'mlp.c_fc': ('mlp', 'fc1'),
              'mlp.c_proj': ('mlp', 'fc2')}
    if module in linear and leaf in ('weight', 'bias'):
      return [(base + linear[module] + ('kernel' if leaf == 'weight' else 'bias',),
               linear_to_dense if leaf == 'weight' else identity)]
    if module in _CLIP_LAYER_NORMS and leaf in ('weight', 'bias'):
      return [(base + (_CLIP_LAYER_NORMS[module], NORM_LEAVES[leaf]), identity)]
    return None
  norms = {'ln_final': ('text_model', 'final_layer_norm'),
           'visual.ln_pre': ('vision_model', 'pre_layrnorm'),
           'visual.ln_post': ('vision_model', 'post_layernorm')}
  module, _, leaf = key.rpartition('.')
  if module in norms and leaf in ('weight', 'bias'):
    return [(norms[module] + (NORM_LEAVES[leaf],), identity)]
  simple = {
      'token_embedding.weight': (('text_model', 'embeddings', 'token_embedding', 'embedding'),
                                 identity),
      'positional_embedding': (('text_model', 'embeddings', 'position_embedding',
                                'embedding'), identity),
      'text_projection': (('text_projection', 'kernel'), identity),
      'visual.class_embedding': (('vision_model', 'embeddings', 'class_embedding'),
                                 identity),
      'visual.positional_embedding': (('vision_model', 'embeddings', 'position_embedding',
                                       'embedding'), identity),
      'visual.conv1.weight': (('vision_model', 'embeddings', 'patch_embedding', 'kernel'),
                              oihw_to_hwio),
      'visual.proj': (('visual_projection', 'kernel'), identity),
      'logit_scale': (('logit_scale',), to_scalar),
  }
  return [simple[key]] if key in simple else None


def _count_blocks(tensors: Mapping[str, np.ndarray], prefix: str) -> int:
  pat = re.compile('^' + re.escape(prefix) + r'(\d+)\.')
  ids = {int(m.group(1)) for k in tensors for m in [pat.match(k)] if m}
  return max(ids) + 1 if ids else 0


def clip_config_from_tensors(tensors: Mapping[str, np.ndarray], *,
                             text_heads: Optional[int] = None,
                             vision_heads: Optional[int] = None,
                             token_ids: Optional[Mapping[str, int]] = None):
  """The transformers CLIPConfig of an OpenAI CLIP ViT state dict (OpenAI build_model rules).

  token_ids: {'bos', 'eos'} ids from the tokenizer; default: OpenAI's layout, where
  <|startoftext|> and <|endoftext|> are the last two ids of the vocabulary.
  """
  from transformers import CLIPConfig
  required = ('visual.conv1.weight', 'visual.positional_embedding', 'visual.proj',
              'token_embedding.weight', 'positional_embedding', 'ln_final.weight',
              'text_projection', 'transformer.resblocks.0.mlp.c_fc.weight',
              'visual.transformer.resblocks.0.mlp.c_fc.weight')
  absent = [k for k in required if k not in tensors]
  if absent:
    resnet = any(k.startswith('visual.layer1.') or k.startswith('visual.attnpool.')
                 for k in tensors)
    raise ConversionError(
        f'not an OpenAI CLIP ViT state dict: {", ".join(absent)} missing' +
        (' (a ModifiedResNet CLIP visual tower: only ViT CLIP is supported)' if resnet else ''))
  vision_width, _, patch, _ = tensors['visual.conv1.weight'].shape
  grid = int(round((tensors['visual.positional_embedding'].shape[0] - 1) ** 0.5))
  if grid * grid + 1 != tensors['visual.positional_embedding'].shape[0]:
    raise ConversionError('visual.positional_embedding is not a square grid plus a class token')
  vocab, text_width = tensors['token_embedding.weight'].shape
  context = tensors['positional_embedding'].shape[0]
  embed_dim = tensors['text_projection'].shape[1]
  text_heads = text_heads or max(1, text_width // 64)
  vision_heads = vision_heads or max(1, vision_width // 64)
  for what, width, heads in (('text', text_width, text_heads),
                             ('vision', vision_width, vision_heads)):
    if width % heads:
      raise ConversionError(f'{what} width {width} is not divisible by {heads} heads')
  ids = dict(token_ids or {'bos': vocab - 2, 'eos': vocab - 1})
  return CLIPConfig(
      text_config=dict(
          vocab_size=int(vocab), hidden_size=int(text_width),
          intermediate_size=int(tensors['transformer.resblocks.0.mlp.c_fc.weight'].shape[0]),
          num_hidden_layers=_count_blocks(tensors, 'transformer.resblocks.'),
          num_attention_heads=int(text_heads), max_position_embeddings=int(context),
          hidden_act='quick_gelu', layer_norm_eps=1e-5, projection_dim=int(embed_dim),
          bos_token_id=int(ids['bos']), eos_token_id=int(ids['eos']),
          pad_token_id=int(ids['eos'])),
      vision_config=dict(
          image_size=int(patch * grid), patch_size=int(patch), hidden_size=int(vision_width),
          intermediate_size=int(
              tensors['visual.transformer.resblocks.0.mlp.c_fc.weight'].shape[0]),
          num_hidden_layers=_count_blocks(tensors, 'visual.transformer.resblocks.'),
          num_attention_heads=int(vision_heads), num_channels=3, hidden_act='quick_gelu',
          layer_norm_eps=1e-5, projection_dim=int(embed_dim)),
      projection_dim=int(embed_dim),
      logit_scale_init_value=float(np.asarray(tensors.get('logit_scale', 4.6052), np.float32)
                                   .reshape(-1)[0]))


def openai_clip_to_hf(tensors: Mapping[str, np.ndarray], *, text_heads: Optional[int] = None,
                      vision_heads: Optional[int] = None,
                      token_ids: Optional[Mapping[str, int]] = None,
                      allow_missing: Sequence[str] = (), source: str = '<clip>',
                      key_prefix: str = ''):
  """(CLIPConfig, Flax params (nested dict, float32), skipped {key: reason}, ignored keys).

  Every Hugging Face parameter must be produced and every source key used or known-unused,
  unless `allow_missing` patterns (matched against `key_prefix + key` and the flax path)
  name it. key_prefix is only for messages (the clip_model. prefix of a zegformer file).
  """
  from flax import traverse_util
  from transformers import FlaxCLIPModel
  config = clip_config_from_tensors(tensors, text_heads=text_heads, vision_heads=vision_heads,
                                    token_ids=token_ids)
  reference = flat_shapes(FlaxCLIPModel(config, _do_init=False).params_shape_tree)
  params, skipped, unused, mismatched = {}, {}, [], []
  for key, value in tensors.items():
    reason = known_unused('openai-clip', key)
    if reason is not None:
      skipped[key_prefix + key] = reason
      continue
    targets = _clip_targets(key)
    if targets is None:
      unused.append(key_prefix + key)
      continue
    value = np.asarray(value)
    for path, transform in targets:
      converted = transform(value)
      if path not in reference:
        unused.append(key_prefix + key)
        break
      if tuple(converted.shape) != reference[path]:
        mismatched.append((key_prefix + key, path_str(path), tuple(converted.shape),
                           reference[path]))
        continue
      params[path] = np.array(converted, dtype=np.float32, order='C')
  missing = sorted(path_str(p) for p in reference if p not in params)
  conv = Conversion('openai-clip', {}, {}, (), skipped, unused, missing, mismatched)
  ignored, absent = check_conversion(conv, allow_missing, source)
  if absent:
    raise ConversionError(f'{source}: Hugging Face CLIP cannot load without {listing(absent)}')
  return config, traverse_util.unflatten_dict(params), skipped, ignored


def _tokenizer_ids(tokenizer_dir: str, vocab_size: int) -> Dict[str, int]:
  """{'bos', 'eos'} ids from a Hugging Face CLIP tokenizer directory (vocab.json)."""
  from zegformer_jax.modeling import clip
  vocab_file = os.path.join(tokenizer_dir, 'vocab.json')
  if not os.path.isfile(vocab_file):
    if os.path.isfile(os.path.join(tokenizer_dir, 'tokenizer.json')):
      with open(os.path.join(tokenizer_dir, 'tokenizer.json'), encoding='utf-8') as f:
        vocab = json.load(f)['model']['vocab']
    else:
      raise FileNotFoundError(f'{tokenizer_dir}: no vocab.json / merges.txt (or '
                              'tokenizer.json): not a Hugging Face CLIP tokenizer directory')
  else:
    with open(vocab_file, encoding='utf-8') as f:
      vocab = json.load(f)
  if len(vocab) != vocab_size:
    raise ConversionError(f'{tokenizer_dir}: the tokenizer has {len(vocab)} tokens but '
                          f'token_embedding has {vocab_size} rows')
  try:
    return {'bos': int(vocab[clip.BOS_TOKEN]), 'eos': int(vocab[clip.EOS_TOKEN])}
  except KeyError as e:
    raise ConversionError(f'{tokenizer_dir}: tokenizer lacks {e}') from None


def write_hf_clip(directory: str, tensors: Mapping[str, np.ndarray], *,
                  tokenizer_dir: Optional[str] = None, text_heads: Optional[int] = None,
                  vision_heads: Optional[int] = None, allow_missing: Sequence[str] = (),
                  source: str = '<clip>', key_prefix: str = '') -> Dict[str, Any]:
  """Writes an OpenAI CLIP state dict as a Hugging Face Flax CLIP directory.

  `directory` must not exist or be empty. Returns a summary (config sizes, skipped keys,
  whether a tokenizer was copied).
  """
  from transformers import FlaxCLIPModel
  from zegformer_jax.modeling import clip
  vocab = tensors.get('token_embedding.weight')
  token_ids = None
  if tokenizer_dir and vocab is not None:
    token_ids = _tokenizer_ids(tokenizer_dir, vocab.shape[0])
  config, params, skipped, ignored = openai_clip_to_hf(
      tensors, text_heads=text_heads, vision_heads=vision_heads, token_ids=token_ids,
      allow_missing=allow_missing, source=source, key_prefix=key_prefix)
  os.makedirs(directory, exist_ok=True)
  model = FlaxCLIPModel(config, _do_init=False)
  model.save_pretrained(directory, params=params)
  copied = []
  if tokenizer_dir:
    for name in clip.TOKENIZER_FILES:
      if os.path.isfile(os.path.join(tokenizer_dir, name)):
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(directory, name))
        copied.append(name)
  return {'text': {'width': config.text_config.hidden_size,
                   'layers': config.text_config.num_hidden_layers,
                   'heads': config.text_config.num_attention_heads,
                   'context': config.text_config.max_position_embeddings,
                   'vocab': config.text_config.vocab_size},
          'vision': {'width': config.vision_config.hidden_size,
                     'layers': config.vision_config.num_hidden_layers,
                     'heads': config.vision_config.num_attention_heads,
                     'image_size': config.vision_config.image_size,
                     'patch_size': config.vision_config.patch_size},
          'projection_dim': config.projection_dim, 'skipped': skipped, 'ignored': ignored,
          'tokenizer_files': copied}

