"""CLIP for ZegFormer: local loading, prompt ensembles, text and image embeddings.

ZegFormer uses a frozen CLIP ViT-B/16 twice (docs/reference.md, section 1, "CLIP"):

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
from typing import Any, Dict, Iterable, List, Sequence, Tuple

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

CONVERT_HINT = ('convert it with `python -m zegformer_jax.weights.convert --from openai-clip` '
                'or provide '
                f'{FLAX_WEIGHTS_NAME} / {SAFE_WEIGHTS_NAME}')

# CLIP's special tokens and its pre-tokenisation pattern (the same pattern transformers'
# CLIPTokenizer uses); the tiny tokenizer must split text exactly as the loader will.
BOS_TOKEN = '<|startoftext|>'
EOS_TOKEN = '<|endoftext|>'
_CLIP_PRETOKEN_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                          r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")

# OpenAI CLIP's image statistics on the 0-255 scale (the image branch normalises with them).
CLIP_PIXEL_MEAN = (122.7709383, 116.7460125, 104.09373615)
CLIP_PIXEL_STD = (68.5005327, 66.6321579, 70.323163)

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


def _safetensors_params(shape_tree, file: str) -> Dict[str, Any]:
  """Flax CLIP params from model.safetensors, without torch.

  Accepts both key layouts: PyTorch names (openai/clip-vit-base-patch16's file, the
  converter's output) and Flax paths joined with '.' (save_pretrained(safe_serialization=
  True)). PyTorch -> Flax, decided by what the Flax tree holds at that path:
    *.weight -> *.scale (LayerNorm), *.embedding (Embed), *.kernel (Dense: W.T;
    Conv: OIHW -> HWIO), other names unchanged (biases, class_embedding, logit_scale).
  Extra entries (the `position_ids` buffers of PyTorch checkpoints) are dropped; a missing
  parameter or a wrong shape is an error. Floats become float32: everything runs in f32.
  """
  from flax.traverse_util import flatten_dict, unflatten_dict
  from safetensors.numpy import load_file

  reference = flatten_dict(shape_tree)
  params, unused = {}, []
  for name, value in load_file(file).items():
    key = tuple(name.split('.'))
    if key not in reference and key[-1] == 'weight':
      for leaf in ('scale', 'embedding', 'kernel'):
        if key[:-1] + (leaf,) in reference:
          key = key[:-1] + (leaf,)
          break
      if key[-1] == 'kernel':
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    if key not in reference:
      unused.append(name)
      continue
    if value.shape != tuple(reference[key].shape):
      raise ValueError(f'{file}: {name} has shape {value.shape}; the config wants '
                       f'{tuple(reference[key].shape)} for {"/".join(key)}')
    params[key] = value
  missing = sorted('/'.join(k) for k in set(reference) - set(params))
  if missing:
    raise ValueError(f'{file} lacks {len(missing)} CLIP parameters, e.g. {missing[:5]}')
  if unused:
    logger.info('%s: ignored %d entries, e.g. %s', file, len(unused), unused[:3])
  return unflatten_dict(params)


def _attach_params(model, params) -> None:
  """Makes a model built with _do_init=False hold `params` like an initialised one.

  Building with _do_init=True would first draw random weights for every parameter, eagerly
  op by op: 5-15 s on a 2-core CPU, thrown away at once. transformers only blocks `.params`
  on such models through this flag; the setter still checks that no parameter is missing.
  """
  model._is_initialized = True
  # Plain float32 arrays on the default device: from_pretrained(_do_init=False) commits
  # them to the CPU, which would pin every later jit to the CPU.
  model.params = jax.tree_util.tree_map(_uncommitted_f32, params)


def _uncommitted_f32(x) -> jax.Array:
  x = np.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):   # also fp16 / bf16 checkpoints
    x = x.astype(np.float32)
  return jnp.asarray(x)


def load_clip(path: str):
  """Loads (FlaxCLIPModel, CLIPTokenizerFast) from a local Hugging Face CLIP directory.

  Prefers flax_model.msgpack (or its sharded index), then model.safetensors (PyTorch or
  Flax key layout, converted without torch). pytorch_model.bin is refused and never opened.
  Only local files are read (local_files_only=True): nothing is downloaded. The tokenizer
  comes from tokenizer.json, or is built from vocab.json + merges.txt. Parameters are
  float32, in model.params.
  """
  from transformers import CLIPConfig, CLIPTokenizerFast, FlaxCLIPModel

  path = os.fspath(path)
  weights = _check_clip_dir(path)
  if weights.endswith('.safetensors'):
    config = CLIPConfig.from_pretrained(path, local_files_only=True)
    model = FlaxCLIPModel(config, _do_init=False)
    params = _safetensors_params(model.params_shape_tree, weights)
  else:
    # from_pretrained checks shapes against the config; missing keys only warn with
    # _do_init=False, and _attach_params turns that into an error.
    model, params = FlaxCLIPModel.from_pretrained(path, local_files_only=True, _do_init=False)
  _attach_params(model, params)
  tokenizer = CLIPTokenizerFast.from_pretrained(path, local_files_only=True)
  return model, tokenizer


# ---------------------------------------------------------------------------- jitted towers


def _text_features(module, params, input_ids, attention_mask):
  """L2-normalised projected text features [B, D] of token ids [B, L] (EOS pooling)."""
  position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)

  def features(m, ids, mask, pos):
    pooled = m.text_model(input_ids=ids, attention_mask=mask, position_ids=pos,
                          deterministic=True)[1]
    return m.text_projection(pooled)

  x = module.apply({'params': params}, input_ids, attention_mask, position_ids, method=features)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _image_features(module, params, images):
  """L2-normalised projected image features [N, D] of NHWC images [N, S, S, 3]."""
  def features(m, x):
    # The Flax vision tower is NHWC inside; FlaxCLIPModel.get_image_features only transposes
    # its NCHW argument to NHWC before this call, so NHWC goes straight in here.
    pooled = m.vision_model(pixel_values=x, deterministic=True)[1]
    return m.visual_projection(pooled)

  x = module.apply({'params': params}, images.astype(jnp.float32), method=features)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# One compiled function per (tower, architecture): models with equal configs share it, so
# neither repeated calls nor reloading the same CLIP recompiles. Flax modules holding a
# transformers config are not hashable, hence this table instead of static jit arguments.
_JITTED: Dict[Tuple[str, str, str], Any] = {}


def _jitted(model, tower: str):
  key = (tower, model.config.to_json_string(), str(jnp.dtype(model.dtype)))
  fn = _JITTED.get(key)
  if fn is None:
    module = model.module
    impl = _text_features if tower == 'text' else _image_features
    fn = jax.jit(lambda params, *args: impl(module, params, *args))
    _JITTED[key] = fn
  return fn


def _params(model, params):
  return model.params if params is None else params


# ---------------------------------------------------------------------------- text


def context_length(model) -> int:
  """Token context of the text tower (77 for OpenAI CLIP)."""
  return int(model.config.text_config.max_position_embeddings)


def tokenize(tokenizer, texts: Sequence[str], context: int) -> Tuple[np.ndarray, np.ndarray]:
  """Token ids and attention mask, both int32 [len(texts), context].

  Each row is <|startoftext|> tokens <|endoftext|>, right-padded with the pad token (CLIP's
  is <|endoftext|>). The causal text tower pools at the first EOS, so the padding value
  never changes a feature. A text longer than the context is an error, as in OpenAI's
  clip.tokenize: silent truncation would change the class embedding without notice.
  """
  texts = list(texts)
  encoded = tokenizer(texts, add_special_tokens=True, padding=False,
                      truncation=False)['input_ids']
  pad_id = tokenizer.pad_token_id
  if pad_id is None:
    pad_id = tokenizer.eos_token_id
  ids = np.full((len(encoded), context), pad_id, dtype=np.int32)
  mask = np.zeros((len(encoded), context), dtype=np.int32)
  for row, (text, tokens) in enumerate(zip(texts, encoded)):
    if len(tokens) > context:
      raise ValueError(f'prompt {text!r} has {len(tokens)} tokens; the CLIP context is {context}')
    ids[row, :len(tokens)] = tokens
    mask[row, :len(tokens)] = 1
  return ids, mask


def prompt_features(model, tokenizer, prompts: Sequence[str], batch_size: int = 256,
                    params=None) -> np.ndarray:
  """L2-normalised text features of single prompts, float32 [len(prompts), D].

  All batches have the same shape [min(batch_size, P), context] (the last one is padded by
  repeating its final row), so one compiled function serves every batch.
  """
  prompts = list(prompts)
  if not prompts:
    raise ValueError('no prompts to encode')
  ids, mask = tokenize(tokenizer, prompts, context_length(model))
  num = len(prompts)
  batch = max(1, min(int(batch_size), num))
  fn = _jitted(model, 'text')
  params = _params(model, params)
  out = np.empty((num, model.config.projection_dim), np.float32)
  # 'highest': f32 matmuls also on TPU/GPU (their default is bf16/tf32 passes); this runs
  # once per class list, so accuracy is worth more than speed.
  with jax.default_matmul_precision('highest'):
    for start in range(0, num, batch):
      stop = min(start + batch, num)
      take = np.arange(start, start + batch).clip(max=stop - 1)   # pads with the last row
      feats = fn(params, jnp.asarray(ids[take]), jnp.asarray(mask[take]))
      out[start:stop] = np.asarray(feats)[:stop - start]
  return out


def text_embeddings(model, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                    batch_size: int = 256, params=None) -> np.ndarray:
  """Prompt-ensemble class embeddings, float32 [K, D], unit L2 norm (docs/reference.md s. 1).

  Per class: encode every template x synonym prompt, L2-normalise each prompt feature,
  average, L2-normalise the mean. The text tower is frozen: plain arrays, no gradients.
  `params` overrides model.params (e.g. a CLIP being pretrained).
  """
  class_names, templates = list(class_names), list(templates)
  if not class_names:
    raise ValueError('no class names')
  if not templates:
    raise ValueError('no prompt templates')
  prompts, counts = [], []
  for name in class_names:
    p = class_prompts(name, templates)
    prompts.extend(p)
    counts.append(len(p))
  feats = prompt_features(model, tokenizer, prompts, batch_size=batch_size, params=params)
  # Prompts of one class are contiguous: sum each run, divide by its length.
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  mean = np.add.reduceat(feats.astype(np.float64), starts, axis=0) / np.asarray(counts)[:, None]
  return (mean / np.linalg.norm(mean, axis=-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------- cache


def sha256_file(file: str) -> str:
  """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(file, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      h.update(chunk)
  return h.hexdigest()


def clip_fingerprint(model_path: str) -> Dict[str, Any]:
  """Identity of a CLIP directory for cache keys.

  Absolute path, content hashes of config.json and the tokenizer files (small), and the
  weights file's name, size and mtime (hashing ~600 MB on every start would cost seconds;
  rewriting the weights changes the mtime).
  """
  path = os.path.abspath(os.fspath(model_path))
  weights = _check_clip_dir(path)
  stat = os.stat(weights)
  return {
      'path': path,
      'config_sha256': sha256_file(os.path.join(path, CONFIG_NAME)),
      'weights': {'name': os.path.basename(weights), 'size': stat.st_size,
                  'mtime_ns': stat.st_mtime_ns},
      'tokenizer_sha256': {n: sha256_file(os.path.join(path, n)) for n in TOKENIZER_FILES
                           if os.path.isfile(os.path.join(path, n))},
  }


def text_cache_key(model_path: str, class_names: Sequence[str],
                   templates: Sequence[str]) -> str:
  """sha256 hex of (cache version, CLIP fingerprint, templates, class list), order included."""
  payload = {'version': _CACHE_VERSION, 'model': clip_fingerprint(model_path),
             'templates': list(templates), 'classes': list(class_names)}
  return hashlib.sha256(json.dumps(payload, sort_keys=True).encode('utf-8')).hexdigest()


def _atomic_write(file: str, write) -> None:
  # Write next to the target and rename: readers (other processes, other hosts on a shared
  # file system) never see a partial file, and concurrent writers just race to equal content.
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(file), prefix='.tmp-',
                             suffix=os.path.splitext(file)[1])
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(tmp, file)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def cached_text_embeddings(cache_dir: str, model_path: str, class_names: Sequence[str],
                           templates: Sequence[str], *, batch_size: int = 256, model=None,
                           tokenizer=None) -> np.ndarray:
  """text_embeddings, cached as <cache_dir>/text_embeddings_<key>.npy, float32 [K, D].

  The key hashes the CLIP fingerprint, the templates and the class list (see text_cache_key).
  On a miss CLIP is loaded from model_path unless `model` and `tokenizer` (loaded from that
  same path) are given. A sidecar .json records what the file holds, for people.
  """
  class_names, templates = list(class_names), list(templates)
  key = text_cache_key(model_path, class_names, templates)
  file = os.path.join(os.fspath(cache_dir), f'text_embeddings_{key[:32]}.npy')
  if os.path.isfile(file):
    try:
      cached = np.load(file, allow_pickle=False)
      if cached.ndim == 2 and cached.shape[0] == len(class_names):
        logger.info('text embeddings from cache %s', file)
        return cached.astype(np.float32, copy=False)
      logger.warning('ignoring cache %s: shape %s for %d classes', file, cached.shape,
                     len(class_names))
    except (OSError, ValueError) as e:
      logger.warning('ignoring unreadable cache %s: %s', file, e)
  if model is None or tokenizer is None:
    model, tokenizer = load_clip(model_path)
  emb = text_embeddings(model, tokenizer, class_names, templates, batch_size=batch_size)
  os.makedirs(os.fspath(cache_dir), exist_ok=True)
  info = {'model': clip_fingerprint(model_path), 'templates': templates, 'classes': class_names,
          'shape': list(emb.shape)}
  _atomic_write(file[:-4] + '.json',
                lambda f: f.write(json.dumps(info, indent=1).encode('utf-8')))
  _atomic_write(file, lambda f: np.save(f, emb))
  logger.info('text embeddings for %d classes written to %s', len(class_names), file)
  return emb


def clip_dir(config) -> str:
  """config.clip.model_path, checked: a local Hugging Face CLIP directory."""
  path = config.clip.model_path
  if not path:
    raise ValueError('config.clip.model_path is empty: set it to a local CLIP directory')
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'CLIP directory {path!r} (config.clip.model_path) does not exist; it must be a '
        'local Hugging Face CLIP directory (config.json, flax_model.msgpack or '
        'model.safetensors, vocab.json, merges.txt)')
  return path


def class_text_embeddings(config, workdir: str, class_names: Sequence[str],
                          prompt_set: str) -> np.ndarray:
  """[K, D] L2-normalised text embeddings of `class_names` with the prompt set `prompt_set`.

  The CLIP of config.clip.model_path; cached in <workdir>/text_embeddings.
  """
  return cached_text_embeddings(
      os.path.join(workdir, 'text_embeddings'), clip_dir(config), list(class_names),
      prompt_templates(prompt_set), batch_size=config.clip.text_batch_size)


def class_embeddings(config, workdir: str, class_names: Sequence[str],
                     prompt_set: str) -> np.ndarray:
  """[K, D] class embeddings of the segment branch (and of SPNet / ZS3Net): CLIP text
  embeddings (`class_text_embeddings`), or word vectors when
  config.clip.class_embeddings_file is set (modeling/word_vectors.py)."""
  path = config.clip.get('class_embeddings_file', '')
  if path:
    from zegformer_jax.modeling import word_vectors
    return word_vectors.class_vectors(path, class_names)
  return class_text_embeddings(config, workdir, class_names, prompt_set)


# ---------------------------------------------------------------------------- image


def image_embeddings(model, images, params=None) -> jax.Array:
  """L2-normalised CLIP image embeddings [N, D] of images [N, S, S, 3] (NHWC, float32).

  Images must already be CLIP-normalised ((x - CLIP_PIXEL_MEAN) / CLIP_PIXEL_STD) and
  S = vision_config.image_size (224 for ViT-B/16). Jittable: inside a jitted caller pass
  `params` explicitly, otherwise model.params become compile-time constants.
  """
  images = jnp.asarray(images)
  size = int(model.config.vision_config.image_size)
  if images.ndim != 4 or tuple(images.shape[1:]) != (size, size, 3):
    raise ValueError(f'CLIP images must be [N, {size}, {size}, 3] (NHWC); got {images.shape}')
  return _jitted(model, 'image')(_params(model, params), images)


def clip_logit_scale(model_params) -> jax.Array:
  """exp(logit_scale), the CLIP similarity scale (~100 for OpenAI CLIP); a float32 scalar.

  Accepts FlaxCLIPModel.params (or {'params': ...}) or the model itself.
  """
  params = getattr(model_params, 'params', model_params)
  if 'logit_scale' not in params and 'params' in params:
    params = params['params']
  return jnp.exp(jnp.asarray(params['logit_scale'], jnp.float32)).reshape(())


# ---------------------------------------------------------------------------- tiny CLIP


def _pretokens(text: str) -> List[str]:
  """CLIP pre-tokenisation of one text: lower case, whitespace-collapsed, regex pieces."""
  import regex
  text = ' '.join(text.split()).lower()
  return regex.findall(_CLIP_PRETOKEN_PATTERN, text)


def _train_bpe(texts: Iterable[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
  """A byte-level BPE vocabulary in CLIP's layout that holds every word of `texts`.

  Returns (vocab tokens in id order, merges in rank order). Layout as OpenAI's: the 256
  byte characters, the same with '</w>', the merge results, then <|startoftext|> and
  <|endoftext|>, so EOS has the largest id (what legacy EOS pooling by argmax relies on).
  Merges are learnt greedily (most frequent adjacent pair; ties by lexical order, so the
  result is deterministic) until each distinct word is one symbol; any other text still
  tokenises, falling back to byte characters.
  """
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  byte_chars = list(bytes_to_unicode().values())
  byte_encoder = bytes_to_unicode()
  words = Counter()
  for text in texts:
    for piece in _pretokens(text):
      chars = [byte_encoder[b] for b in piece.encode('utf-8')]
      words[tuple(chars[:-1]) + (chars[-1] + '</w>',)] += 1

  merges = []
  while True:
    pairs = Counter()
    for word, count in words.items():
      for pair in zip(word[:-1], word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    merges.append(best)
    merged = Counter()
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] += count
    words = merged

  vocab = byte_chars + [c + '</w>' for c in byte_chars]
  seen = set(vocab)
  for a, b in merges:
    if a + b not in seen:
      seen.add(a + b)
      vocab.append(a + b)
  vocab += [BOS_TOKEN, EOS_TOKEN]
  return vocab, merges


# The prompt sets whose words the tiny CLIP's BPE vocabulary is trained on. Fixed: a prompt
# set added later (ZegCLIP's) must not change the tokenizer, hence the miniature CLIP, of
# an existing world and the demo's numbers; its words still tokenize (byte fallback).
TINY_CLIP_PROMPT_SETS = ('single', 'imagenet_select', 'select_clip', 'imagenet')


def create_tiny_clip(path: str, *, vocab_words: Iterable[str], seed: int = 0,
                     projection_dim: int = 64, text_width: int = 64, text_layers: int = 2,
                     text_heads: int = 4, context_length: int = 32, vision_width: int = 64,
                     vision_layers: int = 2, vision_heads: int = 4, image_size: int = 64,
                     patch_size: int = 8, mlp_ratio: int = 4,
                     logit_scale_init: float = 2.6592, safe_serialization: bool = False,
                     overwrite: bool = False) -> None:
  """Writes a small random FlaxCLIPModel and its BPE tokenizer to `path` (HF layout).

  The tokenizer vocabulary covers `vocab_words` (e.g. class names; ', ' synonyms are fine),
  every word of the prompt sets TINY_CLIP_PROMPT_SETS and all byte characters. The result
  loads with `load_clip(path)`, the code path of openai/clip-vit-base-patch16. Defaults suit 64-px
  ShapesWorld: D = 64, 2-layer width-64 towers, 64-px images in 8-px patches, context 32.
  logit_scale starts at CLIP's ln(1/0.07). `safe_serialization` writes model.safetensors
  (Flax key layout) instead of flax_model.msgpack. The directory is assembled next to
  `path` and renamed into place, so it is complete or absent.
  """
  from transformers import CLIPConfig, CLIPTokenizerFast, FlaxCLIPModel

  path = os.path.abspath(os.fspath(path))
  if isinstance(vocab_words, str):
    vocab_words = [vocab_words]
  if os.path.isdir(path) and os.listdir(path):
    if not overwrite:
      raise FileExistsError(f'{path} exists and is not empty (pass overwrite=True)')
  texts = list(vocab_words)
  for name in TINY_CLIP_PROMPT_SETS:
    texts.extend(t.replace('{}', ' ') for t in prompt_templates(name))
  vocab, merges = _train_bpe(texts)

  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(dir=parent, prefix='.tmp-tiny-clip-')
  try:
    vocab_file = os.path.join(tmp, 'vocab.json')
    merges_file = os.path.join(tmp, 'merges.txt')
    with open(vocab_file, 'w', encoding='utf-8') as f:
      json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(merges_file, 'w', encoding='utf-8') as f:
      f.write('#version: 0.2\n')   # CLIPTokenizer skips the first line of merges.txt
      f.writelines(f'{a} {b}\n' for a, b in merges)
    tokenizer = CLIPTokenizerFast(vocab_file=vocab_file, merges_file=merges_file,
                                  model_max_length=context_length)
    bos_id = tokenizer.convert_tokens_to_ids(BOS_TOKEN)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert (bos_id, eos_id) == (len(vocab) - 2, len(vocab) - 1), (bos_id, eos_id)

    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=text_width,
            intermediate_size=mlp_ratio * text_width, num_hidden_layers=text_layers,
            num_attention_heads=text_heads, max_position_embeddings=context_length,
            hidden_act='quick_gelu', projection_dim=projection_dim,
            # The real ids (not the legacy eos_token_id=2) make pooling look for EOS itself.
            bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id),
        vision_config=dict(
            image_size=image_size, patch_size=patch_size, hidden_size=vision_width,
            intermediate_size=mlp_ratio * vision_width, num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads, num_channels=3, hidden_act='quick_gelu',
            projection_dim=projection_dim),
        projection_dim=projection_dim, logit_scale_init_value=logit_scale_init)
    model = FlaxCLIPModel(config, seed=seed)
    model.save_pretrained(tmp, safe_serialization=safe_serialization)
    # tokenizer.json, tokenizer_config.json, special_tokens_map.json and (rewritten by
    # save_vocabulary) vocab.json + merges.txt.
    tokenizer.save_pretrained(tmp)
    for name in ('vocab.json', 'merges.txt', 'tokenizer.json', CONFIG_NAME):
      if not os.path.isfile(os.path.join(tmp, name)):
        raise RuntimeError(f'tiny CLIP: {name} was not written')
    os.chmod(tmp, 0o755)   # mkdtemp makes it 0700
    if os.path.isdir(path):
      shutil.rmtree(path) if os.listdir(path) else os.rmdir(path)
    os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
