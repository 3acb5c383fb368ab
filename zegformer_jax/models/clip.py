"""CLIP for ZegFormer: local loading, prompt ensembles, text and image embeddings.

ZegFormer uses a frozen CLIP ViT-B/16 twice (../shared/reference/official_zegformer.md,
section 1):

- text tower: one embedding per class name, a prompt ensemble. For each class the name is
  split into synonyms on ", ", every template x synonym is encoded, each prompt embedding is
  L2-normalised, the embeddings are averaged and the mean is L2-normalised again. They are
  computed once, never trained, and stored as plain arrays ([K, D], D = 512 for ViT-B/16).
- image tower (evaluation only): embeddings of masked/cropped sub-images, scored against
  text embeddings of the 32 `select_clip` templates with CLIP's own exp(logit_scale) (~100).

Weights are a Hugging Face `FlaxCLIPModel` in a local directory with the layout of
openai/clip-vit-base-patch16 (config.json, flax_model.msgpack or model.safetensors, tokenizer
files). Nothing is ever downloaded (local_files_only=True) and torch is never needed. A
directory that holds only pytorch_model.bin (a torch zip pickle) is refused without opening
it: unpickling executes arbitrary code.

Differences from the official code, on purpose: it runs CLIP in fp16 on the GPU; here
everything is float32 (text features with 'highest' matmul precision), which only moves the
embeddings by fp16 rounding.

`create_tiny_clip` writes a small random CLIP with its own small BPE tokenizer in the same
format, so the ShapesWorld demo and the tests load it through exactly the code path used for
the real model.
"""
import hashlib
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

# File names of the Hugging Face layout (as in transformers.utils).
CONFIG_NAME = 'config.json'
FLAX_WEIGHTS_NAME = 'flax_model.msgpack'
FLAX_WEIGHTS_INDEX_NAME = 'flax_model.msgpack.index.json'
SAFE_WEIGHTS_NAME = 'model.safetensors'
TORCH_WEIGHTS_NAMES = ('pytorch_model.bin', 'pytorch_model.bin.index.json')
TOKENIZER_FILES = ('vocab.json', 'merges.txt', 'tokenizer.json', 'tokenizer_config.json',
                   'special_tokens_map.json')

CONVERT_HINT = ('convert it with `python -m zegformer_jax.convert --from openai-clip` or provide '
                f'{FLAX_WEIGHTS_NAME} / {SAFE_WEIGHTS_NAME}')

# CLIP's special tokens and its pre-tokenisation pattern (the same pattern transformers'
# CLIPTokenizer uses); the tiny tokenizer must split text exactly as the loader will.
BOS_TOKEN = '<|startoftext|>'
EOS_TOKEN = '<|endoftext|>'
_CLIP_PRETOKEN_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                          r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

# Bump when the embedding computation changes, so stale cache files are not reused.
_CACHE_VERSION = 1
_SYNONYM_SEPARATOR = ', '


# ---------------------------------------------------------------------------- prompts


def _all_prompt_sets() -> Dict[str, List[str]]:
  text = importlib.resources.files('zegformer_jax').joinpath(
      'assets', 'prompt_templates.json').read_text(encoding='utf-8')
  return json.loads(text)


def prompt_template_names() -> List[str]:
  """Names of the prompt sets in assets/prompt_templates.json."""
  return list(_all_prompt_sets())


def prompt_templates(name: str) -> List[str]:
  """The prompt templates of set `name` ('single', 'imagenet_select', 'select_clip', 'imagenet').

  Each template holds one '{}' for the class name. Order is the official one.
  """
  sets = _all_prompt_sets()
  if name not in sets:
    raise KeyError(f'unknown prompt set {name!r}; known sets: {", ".join(sets)}')
  return list(sets[name])


def class_prompts(class_name: str, templates: Sequence[str]) -> List[str]:
  """All prompts of one class: template x synonym, template-major as in the official code.

  A name such as 'wall-brick, brick wall' holds synonyms separated by exactly ', '; a comma
  without the space is part of the name.
  """
  synonyms = class_name.split(_SYNONYM_SEPARATOR)
  return [template.format(synonym) for template in templates for synonym in synonyms]


# ---------------------------------------------------------------------------- loading


def _weights_file(path: str) -> str:
  """The weights file load_clip uses in `path`, or an error that names the directory."""
  for name in (FLAX_WEIGHTS_NAME, FLAX_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  torch_files = [n for n in TORCH_WEIGHTS_NAMES if os.path.isfile(os.path.join(path, n))]
  if torch_files:
    # Never hand this to transformers or pickle: loading a torch pickle runs its code.
    raise FileNotFoundError(
        f'{os.path.join(path, torch_files[0])} is a PyTorch pickle and is not loaded (unpickling '
        f'can execute code, and torch is not required here); {CONVERT_HINT}.')
  raise FileNotFoundError(
      f'no CLIP weights in {path}: expected {FLAX_WEIGHTS_NAME} or {SAFE_WEIGHTS_NAME}')


def _check_clip_dir(path: str) -> str:
  """Validates the directory layout before anything is loaded; returns the weights file."""
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'CLIP model directory not found: {path} (weights are never downloaded; put a Hugging '
        f'Face CLIP directory there, e.g. openai/clip-vit-base-patch16)')
  config_file = os.path.join(path, CONFIG_NAME)
  if not os.path.isfile(config_file):
    raise FileNotFoundError(f'CLIP config not found: {config_file}')
  weights = _weights_file(path)
  has_bpe = all(os.path.isfile(os.path.join(path, n)) for n in ('vocab.json', 'merges.txt'))
  if not (has_bpe or os.path.isfile(os.path.join(path, 'tokenizer.json'))):
    raise FileNotFoundError(
        f'CLIP tokenizer not found in {path}: expected vocab.json + merges.txt or tokenizer.json')
  return weights


def _safetensors_format(file: str) -> Optional[str]:
  """The 'format' entry of a safetensors header ('pt', 'flax', ...), None if absent."""
  from safetensors import safe_open
  with safe_open(file, framework='numpy') as f:
    return (f.metadata() or {}).get('format')


def _load_safetensors_params(model, file: str) -> Dict[str, Any]:
  """Flax params from a safetensors file without format metadata.

  transformers refuses such files, yet a plain `save_file(state_dict)` writes one. The keys
  are either Flax paths joined with '.', or PyTorch names, which transformers' converter maps
  (it only needs torch for torch.Tensor inputs; numpy arrays are fine).
  """
  from flax.traverse_util import flatten_dict, unflatten_dict
  from safetensors.numpy import load_file
  from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

  state = load_file(file)
  reference = flatten_dict(model.params)
  flax_keys = {'.'.join(k) for k in reference}
  if set(state) <= flax_keys:
    params = flatten_dict(unflatten_dict({tuple(k.split('.')): v for k, v in state.items()}))
  else:
    params = flatten_dict(convert_pytorch_state_dict_to_flax(state, model))
  missing = sorted('.'.join(k) for k in set(reference) - set(params))
  if missing:
    raise ValueError(f'{file} lacks CLIP parameters: {missing[:8]}{" ..." if len(missing) > 8 else ""}')
  out = {}
  for key, ref in reference.items():
    value = np.asarray(params[key])
    if value.shape != ref.shape:
      raise ValueError(f'{file}: {".".join(key)} has shape {value.shape}, config wants {ref.shape}')
    out[key] = jnp.asarray(value, dtype=ref.dtype)
  # Extra entries (e.g. the `position_ids` buffer of PyTorch checkpoints) are dropped.
  return unflatten_dict(out)


def load_clip(path: str):
  """Loads (FlaxCLIPModel, tokenizer) from a local Hugging Face CLIP directory.

  Prefers flax_model.msgpack, then model.safetensors (PyTorch or Flax key layout; converted
  without torch). pytorch_model.bin is refused, never unpickled. The tokenizer is a
  CLIPTokenizerFast (built from vocab.json + merges.txt when tokenizer.json is absent).
  """
  from transformers import CLIPTokenizerFast, FlaxCLIPModel

  path = os.fspath(path)
  weights = _check_clip_dir(path)
  if weights.endswith('.safetensors') and _safetensors_format(weights) not in ('pt', 'flax'):
    # transformers requires the format metadata; convert such a file here instead.
    model = FlaxCLIPModel.from_pretrained(path, local_files_only=True, _do_init=True,
                                          ignore_mismatched_sizes=False,
                                          **_only_config_kwargs(path))
    model.params = _load_safetensors_params(model, weights)
  else:
    model = FlaxCLIPModel.from_pretrained(path, local_files_only=True)
  tokenizer = CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
  return model, tokenizer


def _only_config_kwargs(path: str) -> Dict[str, Any]:
  """from_pretrained kwargs that build a randomly initialised model from config.json only."""
  # from_pretrained would insist on the metadata; instantiate from the config instead and let
  # _load_safetensors_params fill the weights.
  raise NotImplementedError  # replaced below; kept for readability of load_clip


def _model_from_config(path: str):
  from transformers import CLIPConfig, FlaxCLIPModel
  config = CLIPConfig.from_pretrained(path, local_files_only=True)
  return FlaxCLIPModel(config)
