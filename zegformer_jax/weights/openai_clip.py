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


def clip_targets(key: str) -> Optional[List[Tuple[Path, Transform]]]:
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
    targets = clip_targets(key)
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


# OpenAI's SimpleTokenizer reads merges = lines[1:49152 - 256 - 2 + 1] of its
# bpe_simple_vocab_16e6.txt.gz: 48894 merges, a vocabulary of 49408 tokens.
OPENAI_BPE_MERGES = 49152 - 256 - 2
OPENAI_BPE_FILE = 'bpe_simple_vocab_16e6.txt.gz'


def _bytes_to_unicode() -> Dict[int, str]:
  """OpenAI CLIP's (GPT-2's) byte -> printable character table, in its order."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('\xa1'), ord('\xac') + 1)) +
        list(range(ord('\xae'), ord('\xff') + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def openai_bpe_vocab(bpe_path: str) -> Tuple[List[str], List[Tuple[str, str]]]:
  """(vocabulary in id order, merges) exactly as OpenAI's SimpleTokenizer builds them from
  `bpe_simple_vocab_16e6.txt.gz` (gzip or plain text):

    merges = lines 1 .. 49152-256-2 of the file (line 0 is a header),
    vocab  = the 256 byte characters, the same with '</w>', the merged pairs, then
             <|startoftext|>, <|endoftext|>.
  """
  import gzip
  from zegformer_jax.modeling import clip
  path = os.fspath(bpe_path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file (OpenAI CLIP\'s {OPENAI_BPE_FILE})')
  try:
    with open(path, 'rb') as f:
      raw = f.read()
    text = (gzip.decompress(raw) if raw[:2] == b'\x1f\x8b' else raw).decode('utf-8')
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise ConversionError(f'{path} is not a BPE merges file like {OPENAI_BPE_FILE} '
                          f'({type(e).__name__}: {e})') from None
  lines = text.split('\n')[1:OPENAI_BPE_MERGES + 1]
  while lines and not lines[-1].strip():   # a short file's final newline
    lines.pop()
  merges = []
  for number, line in enumerate(lines, 2):
    pair = tuple(line.split())
    if len(pair) != 2:
      from zegformer_jax.weights import torch_pickle
      kind = torch_pickle.looks_like(raw[:4096])
      if kind and kind != 'a text file':
        raise ConversionError(f'{path} is not a BPE merges file like {OPENAI_BPE_FILE}: it '
                              f'looks like {kind}')
      raise ConversionError(f'{path}: line {number} is {line[:60]!r}, not a merge "a b" '
                            f'(is it {OPENAI_BPE_FILE}?)')
    merges.append(pair)
  if not merges:
    raise ConversionError(f'{path}: no merges after its first line (is it {OPENAI_BPE_FILE}?)')
  chars = list(_bytes_to_unicode().values())
  vocab = chars + [c + '</w>' for c in chars] + [a + b for a, b in merges]
  vocab += [clip.BOS_TOKEN, clip.EOS_TOKEN]
  if len(set(vocab)) != len(vocab):
    twice = sorted({t for t in vocab if vocab.count(t) > 1})[:5]
    raise ConversionError(f'{path}: merges produce tokens more than once ({twice}); '
                          'not a BPE vocabulary')
  return vocab, merges


def write_openai_bpe_tokenizer(bpe_path: str, directory: str) -> List[str]:
  """Writes vocab.json and merges.txt (Hugging Face CLIPTokenizer layout) of OpenAI's
  `bpe_simple_vocab_16e6.txt.gz` into `directory`; returns the file names."""
  vocab, merges = openai_bpe_vocab(bpe_path)
  with open(os.path.join(directory, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(directory, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n')   # CLIPTokenizer skips the first line, like SimpleTokenizer
    f.writelines(f'{a} {b}\n' for a, b in merges)
  return ['vocab.json', 'merges.txt']


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
                  tokenizer_dir: Optional[str] = None, bpe_vocab: Optional[str] = None,
                  text_heads: Optional[int] = None,
                  vision_heads: Optional[int] = None, allow_missing: Sequence[str] = (),
                  source: str = '<clip>', key_prefix: str = '') -> Dict[str, Any]:
  """Writes an OpenAI CLIP state dict as a Hugging Face Flax CLIP directory.

  `directory` must not exist or be empty. The tokenizer files are copied from the Hugging
  Face CLIP `tokenizer_dir`, or built from OpenAI's `bpe_vocab` (bpe_simple_vocab_16e6.txt.gz,
  `write_openai_bpe_tokenizer`). Returns a summary (config sizes, skipped keys, the tokenizer
  files written).
  """
  from transformers import FlaxCLIPModel
  from zegformer_jax.modeling import clip
  if tokenizer_dir and bpe_vocab:
    raise ValueError('give --tokenizer_dir (a Hugging Face CLIP) or --bpe_vocab (OpenAI\'s '
                     f'{OPENAI_BPE_FILE}), not both')
  vocab = tensors.get('token_embedding.weight')
  token_ids = None
  if tokenizer_dir and vocab is not None:
    token_ids = _tokenizer_ids(tokenizer_dir, vocab.shape[0])
  if bpe_vocab:
    tokens, _ = openai_bpe_vocab(bpe_vocab)
    if vocab is not None and len(tokens) != vocab.shape[0]:
      raise ConversionError(f'{bpe_vocab}: the BPE vocabulary has {len(tokens)} tokens but '
                            f'token_embedding has {vocab.shape[0]} rows')
    token_ids = {'bos': tokens.index(clip.BOS_TOKEN), 'eos': tokens.index(clip.EOS_TOKEN)}
  config, params, skipped, ignored = openai_clip_to_hf(
      tensors, text_heads=text_heads, vision_heads=vision_heads, token_ids=token_ids,
      allow_missing=allow_missing, source=source, key_prefix=key_prefix)
  os.makedirs(directory, exist_ok=True)
  model = FlaxCLIPModel(config, _do_init=False)
  model.save_pretrained(directory, params=params)
  copied = []
  if bpe_vocab:
    copied = write_openai_bpe_tokenizer(bpe_vocab, directory)
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

