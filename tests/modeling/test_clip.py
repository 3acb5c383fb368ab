"""Tests for zegformer_jax.modeling.clip: prompts, loading, ensembles, cache, image tower.

Everything runs on a tiny random CLIP written by create_tiny_clip and read back through
load_clip, the code path of openai/clip-vit-base-patch16. Oracles are independent of the
code under test: FlaxCLIPModel.get_text_features / get_image_features per prompt plus numpy,
transformers' own PyTorch->Flax converter, and the reference prompt file.
"""
import json
import os
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from zegformer_jax.modeling import clip

REFERENCE_TEMPLATES = '/work/shared/reference/data/derived/prompt_templates.json'
# Short asset key -> the start of the reference file's descriptive key.
REFERENCE_KEYS = {
    'single': 'single (',
    'imagenet_select': 'IMAGENET_TEMPLATES_SELECT (',
    'select_clip': 'IMAGENET_TEMPLATES_SELECT_CLIP (',
    'imagenet': 'IMAGENET_TEMPLATES (',
}
CLASSES = ['red circle', 'wall-brick, brick wall', 'sky']
WORDS = CLASSES + ['blue square', 'green triangle']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(path, model, tokenizer) of a tiny CLIP saved as flax_model.msgpack."""
  path = str(tmp_path_factory.mktemp('clip') / 'tiny')
  clip.create_tiny_clip(path, vocab_words=WORDS, seed=0)
  model, tokenizer = clip.load_clip(path)
  return path, model, tokenizer


def _copy_without_weights(src, dst):
  os.makedirs(dst)
  for name in os.listdir(src):
    if name not in ('flax_model.msgpack', 'model.safetensors'):
      shutil.copy(os.path.join(src, name), dst)


def _to_torch_layout(params):
  """Flax CLIP params -> PyTorch state-dict names and layouts (written independently of clip.py)."""
  out = {}
  for key, value in flatten_dict(params).items():
    value = np.asarray(value)
    *prefix, leaf = key
    if leaf == 'kernel':
      # Conv HWIO -> OIHW; Dense [in, out] -> [out, in].
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      leaf = 'weight'
    elif leaf in ('scale', 'embedding'):
      leaf = 'weight'
    out['.'.join(prefix + [leaf])] = np.array(value, order='C')   # keeps 0-d logit_scale 0-d
  return out


def _assert_same_params(a, b, atol=0.0):
  fa, fb = flatten_dict(a), flatten_dict(b)
  assert set(fa) == set(fb)
  for k in fa:
    assert np.asarray(fa[k]).shape == np.asarray(fb[k]).shape, k
    np.testing.assert_allclose(np.asarray(fa[k]), np.asarray(fb[k]), atol=atol, rtol=0,
                               err_msg=str(k))


# ---------------------------------------------------------------------------- prompts


def test_prompt_sets_sizes_and_placeholders():
  assert clip.prompt_template_names() == ['single', 'imagenet_select', 'select_clip', 'imagenet',
                                          'zegclip_single', 'zegclip_multi']
  sizes = {name: len(clip.prompt_templates(name)) for name in clip.prompt_template_names()}
  assert sizes == {'single': 1, 'imagenet_select': 8, 'select_clip': 32, 'imagenet': 80,
                   'zegclip_single': 1, 'zegclip_multi': 15}
  for name in sizes:
    assert all(t.count('{}') == 1 for t in clip.prompt_templates(name))
    assert len(set(clip.prompt_templates(name))) == sizes[name]
  assert clip.prompt_templates('single') == ['A photo of a {} in the scene']
  # ZegCLIP's get_embedding.ipynb: VOC's single template, COCO-Stuff's first and last of 15.
  assert clip.prompt_templates('zegclip_single') == ['a photo of a {}']
  assert clip.prompt_templates('zegclip_multi')[::14] == ['a photo of a {}.',
                                                          'This is one {} in the scene.']


def test_prompt_sets_match_reference_file():
  if not os.path.isfile(REFERENCE_TEMPLATES):
    pytest.skip(f'{REFERENCE_TEMPLATES} not available')
  with open(REFERENCE_TEMPLATES) as f:
    reference = json.load(f)
  for short, prefix in REFERENCE_KEYS.items():
    matches = [k for k in reference if k.startswith(prefix)]
    assert len(matches) == 1, (prefix, matches)
    assert clip.prompt_templates(short) == reference[matches[0]], short   # order included


def test_unknown_prompt_set_lists_known_names():
  with pytest.raises(KeyError) as e:
    clip.prompt_templates('vild')
  for name in ('single', 'imagenet_select', 'select_clip', 'imagenet'):
    assert name in str(e.value)


def test_class_prompts_synonyms_and_plain_names():
  templates = ['a photo of a {}.', 'There is the {} in the scene']
  assert clip.class_prompts('wall-brick, brick wall', templates) == [
      'a photo of a wall-brick.', 'a photo of a brick wall.',
      'There is the wall-brick in the scene', 'There is the brick wall in the scene']
  assert clip.class_prompts('sky', templates) == [
      'a photo of a sky.', 'There is the sky in the scene']
  # Only ', ' separates synonyms: a bare comma is part of the name.
  assert clip.class_prompts('a,b', ['{}']) == ['a,b']
  assert clip.class_prompts('x, y, z', ['<{}>']) == ['<x>', '<y>', '<z>']


# ---------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_clip_conventions(tiny):
  path, model, tok = tiny
  from transformers import CLIPTokenizer
  slow = CLIPTokenizer.from_pretrained(path, local_files_only=True)
  cfg = model.config.text_config
  assert cfg.max_position_embeddings == clip.context_length(model) == 32
  assert tok.eos_token_id == cfg.eos_token_id == cfg.vocab_size - 1   # EOS has the largest id
  assert tok.bos_token_id == cfg.bos_token_id == cfg.vocab_size - 2
  assert tok.pad_token == '<|endoftext|>'
  ids = tok('A photo of a Red   circle')['input_ids']
  assert tok.convert_ids_to_tokens(ids) == [
      '<|startoftext|>', 'a</w>', 'photo</w>', 'of</w>', 'a</w>', 'red</w>', 'circle</w>',
      '<|endoftext|>']
  imagenet = clip.prompt_templates('imagenet')
  prompts = [p for name in WORDS for p in clip.class_prompts(name, imagenet)]
  prompts += ['unseen wörds: zebra 42!']   # falls back to byte characters
  assert tok(prompts)['input_ids'] == slow(prompts)['input_ids']   # fast == slow (vocab/merges)
  assert tok.unk_token_id not in tok('unseen wörds: zebra 42!')['input_ids'][1:-1]


def test_tokenize_pads_and_rejects_long_prompts(tiny):
  _, model, tok = tiny
  ids, mask = clip.tokenize(tok, ['sky', 'a photo of the sky.'], 32)
  assert ids.shape == mask.shape == (2, 32) and ids.dtype == np.int32
  assert mask.sum(1).tolist() == [3, 8]   # <bos> a photo of the sky . <eos>
  assert (ids[mask == 0] == tok.pad_token_id).all()
  with pytest.raises(ValueError, match='context'):
    clip.text_embeddings(model, tok, [' '.join(['sky'] * 40)], ['{}'])


# ---------------------------------------------------------------------------- loading


def test_missing_directory_and_files_name_the_path(tmp_path):
  missing = str(tmp_path / 'no_such_clip')
  with pytest.raises(FileNotFoundError, match='no_such_clip'):
    clip.load_clip(missing)
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match=str(empty / 'config.json')):
    clip.load_clip(str(empty))
  (empty / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=f'no CLIP weights in {empty}'):
    clip.load_clip(str(empty))


def test_tokenizer_files_required(tiny, tmp_path):
  path, _, _ = tiny
  dst = str(tmp_path / 'notok')
  os.makedirs(dst)
  for name in ('config.json', 'flax_model.msgpack'):
    shutil.copy(os.path.join(path, name), dst)
  with pytest.raises(FileNotFoundError, match='tokenizer'):
    clip.load_clip(dst)


class _Payload:
  """Unpickling this calls os.mkdir(marker): proof that a pickle was executed."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def test_pytorch_bin_only_is_refused_without_unpickling(tiny, tmp_path):
  path, _, _ = tiny
  # The payload is live: loading a twin pickle does run it.
  probe = str(tmp_path / 'probe_marker')
  pickle.loads(pickle.dumps(_Payload(probe)))
  assert os.path.isdir(probe)

  marker = str(tmp_path / 'pwned_marker')
  dst = str(tmp_path / 'torch_only')
  _copy_without_weights(path, dst)
  with open(os.path.join(dst, 'pytorch_model.bin'), 'wb') as f:
    pickle.dump(_Payload(marker), f)
  with pytest.raises(FileNotFoundError) as e:
    clip.load_clip(dst)
  message = str(e.value)
  assert os.path.join(dst, 'pytorch_model.bin') in message
  assert 'python -m zegformer_jax.weights.convert --from openai-clip' in message
  assert 'safetensors' in message and 'msgpack' in message
  assert not os.path.exists(marker)
  with pytest.raises(FileNotFoundError):
    clip.cached_text_embeddings(str(tmp_path / 'cache'), dst, CLASSES, ['{}'])
  assert not os.path.exists(marker)

  # Beside a msgpack the pickle is ignored, not opened.
  shutil.copy(os.path.join(path, 'flax_model.msgpack'), dst)
  clip.load_clip(dst)
  assert not os.path.exists(marker)


def test_msgpack_round_trip_is_deterministic(tiny, tmp_path):
  path, model, _ = tiny
  assert sorted(os.listdir(path)) == sorted([
      'config.json', 'flax_model.msgpack', 'merges.txt', 'special_tokens_map.json',
      'tokenizer.json', 'tokenizer_config.json', 'vocab.json'])
  # Same arguments -> same files' content (tokenizer) and parameters (seeded init).
  again = str(tmp_path / 'again')
  clip.create_tiny_clip(again, vocab_words=WORDS, seed=0, safe_serialization=True)
  assert os.path.isfile(os.path.join(again, 'model.safetensors'))
  assert not os.path.exists(os.path.join(again, 'flax_model.msgpack'))
  for name in ('vocab.json', 'merges.txt'):
    with open(os.path.join(path, name)) as a, open(os.path.join(again, name)) as b:
      assert a.read() == b.read()
  model2, _ = clip.load_clip(again)   # safetensors in the Flax layout (format 'flax')
  _assert_same_params(model.params, model2.params)
  leaves = jax.tree_util.tree_leaves(model.params)
  assert all(x.dtype == jnp.float32 for x in leaves)
  with pytest.raises(FileExistsError):
    clip.create_tiny_clip(again, vocab_words=WORDS)


@pytest.mark.parametrize('variant', ['pt', 'no_metadata', 'fp16'])
def test_safetensors_torch_layout(tiny, tmp_path, variant):
  from safetensors.numpy import save_file
  from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax
  path, model, _ = tiny
  dst = str(tmp_path / variant)
  _copy_without_weights(path, dst)
  state = _to_torch_layout(model.params)
  if variant == 'fp16':
    state = {k: v.astype(np.float16) for k, v in state.items()}
  # Real PyTorch CLIP checkpoints carry these int64 buffers; they are not parameters.
  state['text_model.embeddings.position_ids'] = np.arange(32, dtype=np.int64)[None]
  state['vision_model.embeddings.position_ids'] = np.arange(65, dtype=np.int64)[None]
  save_file(state, os.path.join(dst, 'model.safetensors'),
            metadata=None if variant == 'no_metadata' else {'format': 'pt'})
  loaded, _ = clip.load_clip(dst)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(loaded.params))
  atol = 1e-2 if variant == 'fp16' else 0.0
  _assert_same_params(loaded.params, model.params, atol=atol)
  # Independent oracle: transformers' own PyTorch->Flax mapping (numpy inputs, no torch).
  oracle = convert_pytorch_state_dict_to_flax(
      {k: v for k, v in state.items() if 'position_ids' not in k}, model)
  _assert_same_params(loaded.params, oracle)


def test_safetensors_shape_mismatch_is_an_error(tiny, tmp_path):
  from safetensors.numpy import save_file
  path, model, _ = tiny
  dst = str(tmp_path / 'bad')
  _copy_without_weights(path, dst)
  state = _to_torch_layout(model.params)
  state['visual_projection.weight'] = state['visual_projection.weight'][:, :10]
  save_file(state, os.path.join(dst, 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match='visual_projection.weight'):
    clip.load_clip(dst)
  del state['visual_projection.weight']
  save_file(state, os.path.join(dst, 'model.safetensors'), metadata={'format': 'pt'})
  with pytest.raises(ValueError, match='visual_projection'):
    clip.load_clip(dst)


# ---------------------------------------------------------------------------- text embeddings


def _oracle_embeddings(model, tok, class_names, templates):
  """Per-prompt get_text_features, then numpy: normalise, mean, normalise."""
  ctx = model.config.text_config.max_position_embeddings
  out = []
  for name in class_names:
    feats = []
    for prompt in clip.class_prompts(name, templates):
      enc = tok([prompt], padding='max_length', max_length=ctx, return_tensors='np')
      f = np.asarray(model.get_text_features(enc['input_ids'], enc['attention_mask']))[0]
      feats.append(f / np.linalg.norm(f))
    mean = np.mean(feats, axis=0)
    out.append(mean / np.linalg.norm(mean))
  return np.stack(out)


def test_text_embeddings_match_per_prompt_oracle(tiny):
  _, model, tok = tiny
  templates = clip.prompt_templates('imagenet_select')[:3] + clip.prompt_templates('single')
  emb = clip.text_embeddings(model, tok, CLASSES, templates)
  assert emb.shape == (3, model.config.projection_dim) and emb.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
  oracle = _oracle_embeddings(model, tok, CLASSES, templates)
  np.testing.assert_allclose(emb, oracle, atol=2e-6)
  # The synonyms matter: the two-synonym class is not either synonym alone.
  alone = clip.text_embeddings(model, tok, ['wall-brick', 'brick wall'], templates)
  assert not np.allclose(emb[1], alone[0], atol=1e-4)
  assert not np.allclose(emb[1], alone[1], atol=1e-4)


def test_padded_last_batch_equals_batch_of_one(tiny):
  _, model, tok = tiny
  templates = clip.prompt_templates('imagenet_select')[:2]
  num_prompts = sum(len(clip.class_prompts(c, templates)) for c in CLASSES)   # 8
  fn = clip._jitted(model, 'text')
  one = clip.text_embeddings(model, tok, CLASSES, templates, batch_size=1)
  before = fn._cache_size()
  three = clip.text_embeddings(model, tok, CLASSES, templates, batch_size=3)   # 3 + 3 + 2 (padded)
  assert num_prompts % 3 != 0
  assert fn._cache_size() == before + 1   # one compilation for all three batches
  big = clip.text_embeddings(model, tok, CLASSES, templates, batch_size=256)   # one batch of 8
  np.testing.assert_allclose(three, one, atol=1e-6)
  np.testing.assert_allclose(big, one, atol=1e-6)
  p1 = clip.prompt_features(model, tok, ['sky', 'a photo of a sky.', 'red circle'], batch_size=2)
  p2 = clip.prompt_features(model, tok, ['sky', 'a photo of a sky.', 'red circle'], batch_size=1)
  np.testing.assert_allclose(p1, p2, atol=1e-6)


def test_text_embeddings_with_explicit_params(tiny):
  _, model, tok = tiny
  params = jax.tree_util.tree_map(lambda x: x * 1.01, model.params)
  a = clip.text_embeddings(model, tok, CLASSES, ['{}'])
  b = clip.text_embeddings(model, tok, CLASSES, ['{}'], params=params)
  assert a.shape == b.shape and not np.allclose(a, b, atol=1e-6)


# ---------------------------------------------------------------------------- cache


def test_cache_hit_miss_and_key(tiny, tmp_path, monkeypatch):
  path, model, tok = tiny
  cache = str(tmp_path / 'cache')
  calls = []
  real = clip.text_embeddings

  def counting(*args, **kwargs):
    calls.append(1)
    return real(*args, **kwargs)

  monkeypatch.setattr(clip, 'text_embeddings', counting)
  templates = clip.prompt_templates('single')
  first = clip.cached_text_embeddings(cache, path, CLASSES, templates)   # loads CLIP itself
  assert len(calls) == 1
  files = sorted(f for f in os.listdir(cache) if f.endswith('.npy'))
  assert len(files) == 1 and not any(f.startswith('.tmp') for f in os.listdir(cache))
  mtime = os.stat(os.path.join(cache, files[0])).st_mtime_ns
  np.testing.assert_array_equal(first, real(model, tok, CLASSES, templates))

  second = clip.cached_text_embeddings(cache, path, CLASSES, templates, model=model, tokenizer=tok)
  assert len(calls) == 1   # hit: nothing recomputed or rewritten
  assert os.stat(os.path.join(cache, files[0])).st_mtime_ns == mtime
  np.testing.assert_array_equal(first, second)
  assert second.dtype == np.float32

  key = clip.text_cache_key(path, CLASSES, templates)
  assert key != clip.text_cache_key(path, CLASSES, clip.prompt_templates('imagenet_select'))
  assert key != clip.text_cache_key(path, CLASSES[::-1], templates)   # order is part of the key
  assert key != clip.text_cache_key(path, CLASSES[:2], templates)
  clip.cached_text_embeddings(cache, path, CLASSES[:2], templates, model=model, tokenizer=tok)
  clip.cached_text_embeddings(cache, path, CLASSES, templates * 2, model=model, tokenizer=tok)
  assert len(calls) == 3
  assert len([f for f in os.listdir(cache) if f.endswith('.npy')]) == 3

  # Rewriting the weights (new mtime) or the config changes the model identity.
  weights = os.path.join(path, 'flax_model.msgpack')
  st = os.stat(weights)
  os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  try:
    assert clip.text_cache_key(path, CLASSES, templates) != key
  finally:
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert clip.text_cache_key(path, CLASSES, templates) == key

  # A corrupt cache file is recomputed, not trusted.
  with open(os.path.join(cache, files[0]), 'wb') as f:
    f.write(b'not numpy')
  again = clip.cached_text_embeddings(cache, path, CLASSES, templates, model=model, tokenizer=tok)
  assert len(calls) == 4
  np.testing.assert_array_equal(again, first)


# ---------------------------------------------------------------------------- image tower


def test_image_embeddings_shape_norm_and_oracle(tiny):
  _, model, _ = tiny
  size = model.config.vision_config.image_size
  images = np.random.RandomState(0).randn(3, size, size, 3).astype(np.float32)
  emb = clip.image_embeddings(model, images)
  assert emb.shape == (3, model.config.projection_dim) and emb.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(np.asarray(emb), axis=1), 1.0, atol=1e-5)
  # get_image_features takes NCHW.
  ref = np.array(model.get_image_features(images.transpose(0, 3, 1, 2)))
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(np.asarray(emb), ref, atol=1e-5)
  # Jittable with params as an argument.
  jitted = jax.jit(lambda p, x: clip.image_embeddings(model, x, params=p))
  np.testing.assert_allclose(np.asarray(jitted(model.params, images)), np.asarray(emb), atol=1e-6)
  with pytest.raises(ValueError, match='NHWC'):
    clip.image_embeddings(model, images.transpose(0, 3, 1, 2))


def test_clip_logit_scale(tiny):
  _, model, _ = tiny
  np.testing.assert_allclose(float(clip.clip_logit_scale(model.params)), np.exp(2.6592), rtol=1e-6)
  assert float(clip.clip_logit_scale(model)) == float(clip.clip_logit_scale(model.params))
  params = dict(model.params, logit_scale=jnp.asarray(np.log(100.0), jnp.float32))
  np.testing.assert_allclose(float(clip.clip_logit_scale(params)), 100.0, rtol=1e-5)
  np.testing.assert_allclose(float(clip.clip_logit_scale({'params': params})), 100.0, rtol=1e-5)


def test_tiny_clip_tokenizer_is_fixed_by_its_prompt_sets(tmp_path):
  """The tiny CLIP's BPE files are those of the code the demo's numbers were made with
  (sha256 of merges.txt recorded from it, 2026-12-03): a prompt set added since (ZegCLIP's)
  does not change them, and its words still tokenize."""
  import hashlib
  clip.create_tiny_clip(str(tmp_path / 'c'), vocab_words=['cat'])
  vocab = json.load(open(tmp_path / 'c' / 'vocab.json'))
  merges = (tmp_path / 'c' / 'merges.txt').read_bytes()
  assert len(vocab) == 711
  assert hashlib.sha256(merges).hexdigest()[:16] == 'b060d37fff2ab820'
  _, tokenizer = clip.load_clip(str(tmp_path / 'c'))
  ids = tokenizer('This is one cat in the scene.')['input_ids']
  assert len(ids) > 3 and tokenizer.decode(ids, skip_special_tokens=True).replace(' ', '') == \
      'thisisonecatinthescene.'
