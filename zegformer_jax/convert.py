r"""Weight import: detectron2 / torchvision / official ZegFormer / OpenAI CLIP -> zegformer_jax.

  python -m zegformer_jax.convert --from FORMAT --input FILE --output DIR \
      [--config configs/x.py[:arg]] [--allow_missing PATTERN,...] [--tokenizer_dir HF_CLIP]

FORMAT:
  d2-resnet           detectron2 ImageNet pickle (R-50.pkl, R-101.pkl): {'model': {name:
                      ndarray}, '__author__', 'matching_heuristics'}. Backbone only.
  torchvision-resnet  torchvision resnet50/101 state dict (.pth torch zip, .safetensors or
                      .npz): conv1, bn1, layer{1-4}.{i}.conv{1,2,3}/bn{1,2,3}/downsample.{0,1};
                      renamed as detectron2's convert-torchvision-to-d2.py does. Backbone only.
  zegformer           official ZegFormer / MaskFormer detectron2 checkpoint (.pth zip or
                      legacy, or a pickle) holding {'model': state_dict}. Everything; the
                      optional `sem_seg_head.predictor.clip_model.*` tensors (eval configs)
                      become a Hugging Face CLIP directory DIR/clip.
  openai-clip         OpenAI CLIP ViT state dict (torch zip, the TorchScript archive
                      ViT-B-16.pt, or .safetensors) -> Hugging Face FlaxCLIPModel directory.

Every file is read with zegformer_jax.torch_pickle (a restricted unpickler: nothing in the
file can run code) or safetensors/npz; torch is never imported.

On-disk format of DIR (ZegFormer formats)
-----------------------------------------
  DIR/convert_meta.json   {"format": "zegformer_jax.convert", "version": 1, "source_format",
                          "input", "input_sha256", "config", "covers", "absent", "skipped",
                          "ignored", "num_variables", "clip", "notes"}
  DIR/params/             orbax StandardCheckpointer of {'params': {...}, 'frozen': {...}}
                          (float32, the Flax variable tree; a backbone-only import holds only
                          params/backbone and frozen/backbone)
  DIR/clip/               (zegformer with clip_model.* only) Hugging Face CLIP directory
For openai-clip, DIR itself is the Hugging Face CLIP directory (config.json,
flax_model.msgpack and, with --tokenizer_dir, the tokenizer files) plus convert_meta.json;
use it as --config.clip.model_path.

`covers` lists the subtrees the source is responsible for ('params/backbone' and
'frozen/backbone' for ResNet imports, 'params' and 'frozen' for ZegFormer). `load_params`
(used by `--config.train.init_from=DIR`) checks every path and shape against the model,
takes everything the checkpoint holds, and keeps the initial values only of variables
outside `covers` or listed in `absent` (those named by --allow_missing at conversion). Any
other missing, extra or mis-shaped variable is an error naming its path.

Key accounting
--------------
Every source key is either converted, skipped as known-unused (listed with the reason:
BatchNorm `num_batches_tracked`, the ImageNet `fc` classifier, `criterion.empty_weight`
(loss class weights of size K_train + 1, rebuilt from config.loss.no_object_weight),
`sem_seg_head.predictor.logit_scale` (fixed log(1/0.01); the model uses
1/config.model.temperature), CLIP's `attn_mask` attributes and `input_resolution` /
`context_length` / `vocab_size`), or reported. With --config, source keys whose target is
not in the model ("unused", e.g. res4.6-res4.22 of an R-101 file for an R-50 config) and
model variables the source does not provide ("missing") are errors listing them, unless an
--allow_missing pattern (fnmatch, matched against the source key and against the flax
path 'params/...') names them. A shape mismatch is always an error naming the source key,
the flax path and both shapes. Without --config the conversion is by name only and
`load_params` performs the same checks when the weights are used.

Layout changes (official -> flax):
  conv weight [O, I, kh, kw] -> kernel [kh, kw, I, O]           (w.transpose(2, 3, 1, 0))
  nn.Linear weight [out, in] -> Dense kernel [in, out]          (w.T)
  nn.MultiheadAttention in_proj_weight [3d, d] / in_proj_bias [3d] -> query, key, value
      (thirds in that order, each transposed) and out_proj -> out
  BN weight/bias/running_mean/running_var -> frozen scale/bias/mean/var
  GroupNorm / LayerNorm weight -> scale
  bg_feature [1, D] -> no_object_embedding [D]
The per-module tables are in models/resnet.py, pixel_decoder.py, transformer.py and
zegformer.py; `official_targets` below is the single implementation (tests/test_models.py
uses it for the full R-50 key list).

OpenAI CLIP -> Hugging Face Flax CLIP (`openai_clip_to_hf`):
  token_embedding.weight            text_model/embeddings/token_embedding/embedding
  positional_embedding              text_model/embeddings/position_embedding/embedding
  transformer.resblocks.N.attn.in_proj_{weight,bias}
                                    text_model/encoder/layers/N/self_attn/{q,k,v}_proj
                                    (split in thirds, kernels transposed)
  transformer.resblocks.N.attn.out_proj   .../self_attn/out_proj
  transformer.resblocks.N.ln_{1,2}        .../layer_norm{1,2}
  transformer.resblocks.N.mlp.c_fc / c_proj   .../mlp/fc1 / fc2
  ln_final                          text_model/final_layer_norm
  text_projection [W, D]            text_projection/kernel (no transpose: x @ P already)
  visual.conv1.weight               vision_model/embeddings/patch_embedding/kernel (HWIO)
  visual.class_embedding, visual.positional_embedding
                                    vision_model/embeddings/class_embedding, .../position_embedding
  visual.ln_pre / visual.ln_post    vision_model/pre_layrnorm (sic) / post_layernorm
  visual.transformer.resblocks.N.*  vision_model/encoder/layers/N/* (as the text tower)
  visual.proj [W, D]                visual_projection/kernel
  logit_scale                       logit_scale
The config follows OpenAI's build_model: widths, layers, context, vocabulary, patch and
image size from the tensor shapes, heads = width // 64 (override with --clip_text_heads /
--clip_vision_heads), quick_gelu, LayerNorm eps 1e-5. Text features pool at the first
<|endoftext|> token (the highest id in OpenAI's vocabulary, so identical to OpenAI's
argmax pooling). Weights are written as float32 (OpenAI stores fp16).
Tokenizer: the weights file has none. Pass --tokenizer_dir with a Hugging Face CLIP
checkout (e.g. openai/clip-vit-base-patch16: vocab.json, merges.txt, tokenizer.json, ...),
or copy vocab.json and merges.txt from one into the output directory afterwards;
`models.clip.load_clip` refuses a directory without them.

Pixel convention and FrozenBN statistics
----------------------------------------
The configs normalise RGB images on the 0-255 scale with mean [123.675, 116.28, 103.53]
and std [58.395, 57.12, 57.375]: torchvision's ImageNet statistics (mean [0.485, 0.456,
0.406], std [0.229, 0.224, 0.225] times 255). That is what detectron2's torchvision-derived
ImageNet weights (ImageNetPretrained/torchvision/R-50.pkl, and an R-101.pkl made from
torchvision's resnet101 with convert-torchvision-to-d2.py) expect, together with the stride
on the 3x3 conv (STRIDE_IN_1X1 False). Their BatchNorm running statistics become the
FrozenBN mean/var (eps 1e-5, y = (x - mean) / sqrt(var + eps) * scale + bias), exactly
detectron2's FrozenBatchNorm2d. The MSRA R-101.pkl (ImageNetPretrained/MSRA, Caffe2
'blobs' with names like res2_0_branch2a_w) is NOT what the configs expect: it takes BGR
input with caffe-style mean subtraction and unit std, puts the stride in the 1x1 conv, and
has BN folded into affine terms; `d2-resnet` refuses it. Use torchvision's resnet101 weights
(`--from torchvision-resnet`) for R-101.

How to evaluate a released ZegFormer checkpoint
-----------------------------------------------
  # 1. the ZegFormer weights (and, for an eval-config checkpoint, its CLIP -> W/imported/clip)
  python -m zegformer_jax.convert --from zegformer \
      --input zegformer_R101_bs32_60k_vit16_coco-stuff.pth --output W/imported \
      --config configs/coco_stuff_r101.py --tokenizer_dir HF_CLIP_B16
  # 2. CLIP ViT-B/16, if the checkpoint has no clip_model.* (training checkpoints): use a
  #    Hugging Face openai/clip-vit-base-patch16 directory as is (flax_model.msgpack or
  #    model.safetensors), or convert OpenAI's ViT-B-16.pt:
  python -m zegformer_jax.convert --from openai-clip --input ~/.cache/clip/ViT-B-16.pt \
      --output W/clip --tokenizer_dir HF_CLIP_B16
  # 3. evaluate (W/checkpoints is empty, so the weights come from init_from; the COCO
  #    configs evaluate the `full` variant: Eq. 2 calibration and Eq. 3 fusion)
  python -m zegformer_jax.main --config configs/coco_stuff_r101.py --workdir W --mode eval \
      --config.train.init_from=W/imported --config.clip.model_path=W/clip \
      --config.dataset.data_dir=data/coco_stuff
Use W/imported/clip as clip.model_path when step 1 wrote it. HF_CLIP_B16 is any directory
holding CLIP's vocab.json and merges.txt (e.g. a Hugging Face openai/clip-vit-base-patch16
checkout). Official numbers were produced with CLIP in fp16; here CLIP runs in float32.
"""
import argparse
import dataclasses
import fnmatch
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from zegformer_jax import torch_pickle

logger = logging.getLogger(__name__)

FORMATS = ('d2-resnet', 'torchvision-resnet', 'zegformer', 'openai-clip')
META_NAME = 'convert_meta.json'
META_FORMAT = 'zegformer_jax.convert'
META_VERSION = 1
PARAMS_DIR = 'params'
CLIP_DIR = 'clip'
CLIP_PREFIX = 'sem_seg_head.predictor.clip_model.'
BACKBONE_COVERS = ('params/backbone', 'frozen/backbone')
FULL_COVERS = ('params', 'frozen')

Path = Tuple[str, ...]            # ('params', 'backbone', 'stem', 'conv1', 'kernel')
Transform = Callable[[np.ndarray], np.ndarray]
Target = Tuple[str, Path, Transform]   # (collection, path without collection, transform)


class ConversionError(ValueError):
  """A source file cannot be converted (unknown/missing keys, wrong shapes, bad layout)."""


# ----------------------------------------------------------------------------- transforms
# Written for arrays, and shape-only use passes zero-stride broadcast views, so they must
# not copy (no ascontiguousarray here): official_to_flax runs them on R-101-sized shapes.


def _identity(w: np.ndarray) -> np.ndarray:
  return w


def oihw_to_hwio(w: np.ndarray) -> np.ndarray:
  """Conv weight [O, I, kh, kw] (PyTorch) -> kernel [kh, kw, I, O] (Flax)."""
  if w.ndim != 4:
    raise ConversionError(f'expected a 4-d conv weight, got shape {w.shape}')
  return w.transpose(2, 3, 1, 0)


def linear_to_dense(w: np.ndarray) -> np.ndarray:
  """nn.Linear weight [out, in] -> Dense kernel [in, out]."""
  if w.ndim != 2:
    raise ConversionError(f'expected a 2-d Linear weight, got shape {w.shape}')
  return w.T


def in_proj_part(index: int, weight: bool) -> Transform:
  """Third `index` (0 query, 1 key, 2 value) of a packed in_proj_weight [3d, d] (returned
  transposed, [d, d] kernel) or in_proj_bias [3d]."""
  def split(w: np.ndarray) -> np.ndarray:
    if w.shape[0] % 3 or w.ndim != (2 if weight else 1):
      raise ConversionError(f'packed in_proj of shape {w.shape} does not split in thirds')
    d = w.shape[0] // 3
    part = w[index * d:(index + 1) * d]
    return part.T if weight else part
  return split


def squeeze_row(w: np.ndarray) -> np.ndarray:
  """bg_feature [1, D] -> no_object_embedding [D]."""
  if w.ndim == 2 and w.shape[0] == 1:
    return w[0]
  if w.ndim == 1:
    return w
  raise ConversionError(f'expected shape [1, D], got {w.shape}')


def to_scalar(w: np.ndarray) -> np.ndarray:
  """CLIP logit_scale [] or [1] -> []."""
  if w.size != 1:
    raise ConversionError(f'expected a scalar, got shape {w.shape}')
  return w.reshape(())


def _shape_of(transform: Transform, shape: Sequence[int]) -> Tuple[int, ...]:
  return tuple(transform(np.broadcast_to(np.zeros((), np.float32), tuple(shape))).shape)


# ----------------------------------------------------------------------------- key mapping

_NORM_LEAVES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean',
                'running_var': 'var'}
_RESNET_KEY = re.compile(r'^(?:(stem)\.(conv1)|res([2-5])\.(\d+)\.(conv[1-3]|shortcut))\.(.+)$')
_PIXEL_DECODER_KEY = re.compile(r'^(adapter_[1-3]|layer_[1-4]|mask_features)\.(.+)$')
_DECODER_LAYER_KEY = re.compile(r'^layers\.(\d+)\.(.+)$')


def _resnet_targets(rest: str) -> Optional[List[Target]]:
  """detectron2 ResNet key (without `backbone.`) -> targets relative to 'backbone'."""
  m = _RESNET_KEY.match(rest)
  if not m:
    return None
  if m.group(1):
    module = ('stem', 'conv1')
  else:
    module = (f'res{m.group(3)}_{int(m.group(4))}', m.group(5))
  leaf = m.group(6)
  if leaf == 'weight':
    return [('params', ('backbone',) + module + ('kernel',), oihw_to_hwio)]
  if leaf.startswith('norm.') and leaf[5:] in _NORM_LEAVES:
    return [('frozen', ('backbone',) + module + ('norm', _NORM_LEAVES[leaf[5:]]), _identity)]
  return None


def _linear_targets(path: Path, leaf: str) -> Optional[List[Target]]:
  if leaf == 'weight':
    return [('params', path + ('kernel',), linear_to_dense)]
  if leaf == 'bias':
    return [('params', path + ('bias',), _identity)]
  return None


def _norm_targets(path: Path, leaf: str) -> Optional[List[Target]]:
  if leaf in ('weight', 'bias'):
    return [('params', path + (_NORM_LEAVES[leaf],), _identity)]
  return None


def _attention_targets(path: Path, leaf: str) -> Optional[List[Target]]:
  """nn.MultiheadAttention keys -> MultiHeadAttention (query/key/value/out) targets."""
  if leaf in ('in_proj_weight', 'in_proj_bias'):
    weight = leaf == 'in_proj_weight'
    return [('params', path + (name, 'kernel' if weight else 'bias'), in_proj_part(i, weight))
            for i, name in enumerate(('query', 'key', 'value'))]
  if leaf.startswith('out_proj.'):
    return _linear_targets(path + ('out',), leaf[len('out_proj.'):])
  return None


def _decoder_targets(rest: str) -> Optional[List[Target]]:
  """`transformer.decoder.` key remainder -> targets under 'transformer'."""
  top = ('transformer',)
  if rest.startswith('norm.'):
    return _norm_targets(top + ('norm',), rest[5:])
  m = _DECODER_LAYER_KEY.match(rest)
  if not m:
    return None
  path = top + (f'layers_{int(m.group(1))}',)
  module, _, leaf = m.group(2).partition('.')
  if module in ('self_attn', 'multihead_attn'):
    return _attention_targets(path + (module,), leaf)
  if module in ('linear1', 'linear2'):
    return _linear_targets(path + (module,), leaf)
  if module in ('norm1', 'norm2', 'norm3'):
    return _norm_targets(path + (module,), leaf)
  return None


def official_targets(key: str) -> Optional[List[Target]]:
  """Targets (collection, flax path, transform) of an official ZegFormer state_dict key.

  None for a key this model has no variable for (known-unused keys included; see
  `known_unused`). The mapping is by name only: shapes are checked against a model later.
  """
  if key.startswith('backbone.'):
    return _resnet_targets(key[len('backbone.'):])
  if key.startswith('sem_seg_head.pixel_decoder.'):
    m = _PIXEL_DECODER_KEY.match(key[len('sem_seg_head.pixel_decoder.'):])
    if not m:
      return None
    path, leaf = ('pixel_decoder', m.group(1)), m.group(2)
    if leaf == 'weight':
      return [('params', path + ('kernel',), oihw_to_hwio)]
    if leaf == 'bias':
      return [('params', path + ('bias',), _identity)]
    if leaf.startswith('norm.'):
      return _norm_targets(path + ('norm',), leaf[5:])
    return None
  prefix = 'sem_seg_head.predictor.'
  if not key.startswith(prefix):
    return None
  rest = key[len(prefix):]
  if rest.startswith('transformer.decoder.'):
    return _decoder_targets(rest[len('transformer.decoder.'):])
  if rest == 'bg_feature':
    return [('params', ('no_object_embedding',), squeeze_row)]
  if rest == 'query_embed.weight':
    return [('params', ('query_embed',), _identity)]
  if rest in ('input_proj.weight', 'input_proj.bias'):
    leaf = rest.split('.')[1]
    return [('params', ('input_proj', 'kernel' if leaf == 'weight' else 'bias'),
             oihw_to_hwio if leaf == 'weight' else _identity)]
  m = re.match(r'^mask_embed\.layers\.(\d+)\.(weight|bias)$', rest)
  if m:
    return _linear_targets(('mask_embed', f'layers_{int(m.group(1))}'), m.group(2))
  m = re.match(r'^projection_layer\.(weight|bias)$', rest)
  if m:
    return _linear_targets(('semantic_proj',), m.group(1))
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
  return [(coll, path, _shape_of(t, shape)) for coll, path, t in targets]


_TORCHVISION_BLOCK = re.compile(
    r'^layer([1-4])\.(\d+)\.(?:(conv[1-3])\.weight|bn([1-3])\.(.+)|downsample\.0\.weight|'
    r'downsample\.1\.(.+))$')


def torchvision_to_d2(key: str) -> Optional[str]:
  """torchvision ResNet key -> detectron2 name (as convert-torchvision-to-d2.py renames).

  conv1 -> stem.conv1, bn1 -> stem.conv1.norm, layerK -> res(K+1), bnJ -> convJ.norm,
  downsample.0 -> shortcut, downsample.1 -> shortcut.norm. None for other keys (fc.*).
  """
  if key == 'conv1.weight':
    return 'stem.conv1.weight'
  if key.startswith('bn1.'):
    return 'stem.conv1.norm.' + key[4:]
  m = _TORCHVISION_BLOCK.match(key)
  if not m:
    return None
  block = f'res{int(m.group(1)) + 1}.{m.group(2)}'
  if m.group(3):
    return f'{block}.{m.group(3)}.weight'
  if m.group(4):
    return f'{block}.conv{m.group(4)}.norm.{m.group(5)}'
  if m.group(6) is not None:
    return f'{block}.shortcut.norm.{m.group(6)}'
  return f'{block}.shortcut.weight'


def known_unused(source_format: str, key: str) -> Optional[str]:
  """The reason a source key is deliberately not converted, or None."""
  if key.endswith('.num_batches_tracked'):
    return 'BatchNorm step counter (FrozenBN has none)'
  if source_format in ('d2-resnet', 'torchvision-resnet'):
    if re.match(r'^(stem\.)?(fc|fc1000)\.(weight|bias)$', key) or key.startswith('fc1000'):
      return 'ImageNet classifier (not part of the backbone)'
  if source_format == 'zegformer':
    if key == 'criterion.empty_weight':
      return ('loss class weights [K_train + 1] (rebuilt from config.loss.no_object_weight)')
    if key == 'sem_seg_head.predictor.logit_scale':
      return 'fixed log(1 / 0.01); the model uses 1 / config.model.temperature'
    if key in ('pixel_mean', 'pixel_std', 'clip_pixel_mean', 'clip_pixel_std'):
      return 'normalisation constant (config.model.pixel_mean / pixel_std)'
  if source_format == 'openai-clip':
    if key in ('input_resolution', 'context_length', 'vocab_size'):
      return 'size attribute (read from the tensor shapes instead)'
    if key.endswith('.attn_mask'):
      return 'causal attention mask attribute (Hugging Face CLIP builds its own)'
  return None


# ----------------------------------------------------------------------------- reading


def sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      h.update(chunk)
  return h.hexdigest()


def read_tensors(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, Any]]:
  """({key: ndarray}, info) of a checkpoint file, without torch and without running code.

  .safetensors and .npz are read directly; anything else (torch zip, TorchScript archive,
  legacy torch.save, plain pickle) through torch_pickle. A dict holding the weights under
  'model' (detectron2) or 'state_dict' is unwrapped; info records where and the
  detectron2 '__author__'.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file')
  info: Dict[str, Any] = {}
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    return dict(load_file(path)), {'container': 'safetensors'}
  if path.endswith('.npz'):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}, {'container': 'npz'}
  obj = torch_pickle.load(path)
  if isinstance(obj, dict) and 'blobs' in obj and 'model' not in obj:
    raise ConversionError(
        f'{path}: a Caffe2/Detectron1 "blobs" pickle (e.g. the MSRA ImageNet weights): BGR, '
        'caffe-style, stride in the 1x1 conv, BN folded; not what the configs expect. Use '
        "torchvision's ResNet weights (--from torchvision-resnet) instead")
  if isinstance(obj, dict):
    for key in ('__author__', 'matching_heuristics', 'iteration'):
      if key in obj and isinstance(obj[key], (str, int, bool)):
        info[key.strip('_')] = obj[key]
  tensors, where = torch_pickle.tensor_dict(obj, path)
  info['container'] = where
  # Checkpoints saved from DistributedDataParallel prefix every key with 'module.'.
  if tensors and all(k.startswith('module.') for k in tensors):
    tensors = {k[len('module.'):]: v for k, v in tensors.items()}
    info['stripped_prefix'] = 'module.'
  return tensors, info


# ----------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class Conversion:
  """Result of converting a ZegFormer-format source (before any file is written).

  variables: {('params'|'frozen', ...): array} (source dtype; float32 when saved).
  sources: flax path string -> source key it came from.
  covers: subtrees the source is responsible for.
  skipped: source key -> reason (known-unused).
  unused: source keys that were not converted (unknown, or no such variable in the model).
  missing: covered model variables (flax path strings) the source does not provide; only
    known with a model.
  mismatched: (source key, flax path, converted shape, model shape).
  clip: the `clip_model.` tensors (prefix stripped) of a zegformer checkpoint, or None.
  """
  source_format: str
  variables: Dict[Path, np.ndarray]
  sources: Dict[str, str]
  covers: Tuple[str, ...]
  skipped: Dict[str, str]
  unused: List[str]
  missing: List[str]
  mismatched: List[Tuple[str, str, Tuple[int, ...], Tuple[int, ...]]]
  clip: Optional[Dict[str, np.ndarray]] = None
  notes: List[str] = dataclasses.field(default_factory=list)


def path_str(path: Path) -> str:
  return '/'.join(path)


def flat_shapes(tree: Mapping[str, Any]) -> Dict[Path, Tuple[int, ...]]:
  """{path: shape} of a nested dict of arrays / ShapeDtypeStructs."""
  from flax import traverse_util
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def model_shapes(model_config) -> Dict[Path, Tuple[int, ...]]:
  """{('params'|'frozen', ...): shape} of the ZegFormer built from a `model` config."""
  from zegformer_jax import summary
  return flat_shapes(summary.variable_shapes(model_config))


def _covered(path: str, covers: Iterable[str]) -> bool:
  return any(path == c or path.startswith(c + '/') for c in covers)


def convert_zegformer_format(source_format: str, tensors: Mapping[str, np.ndarray],
                             shapes: Optional[Mapping[Path, Tuple[int, ...]]] = None
                             ) -> Conversion:
  """Converts a d2-resnet / torchvision-resnet / zegformer state dict to flax variables.

  Args:
    source_format: one of 'd2-resnet', 'torchvision-resnet', 'zegformer'.
    tensors: {source key: array}; arrays may be zero-stride placeholders
      (np.broadcast_to) when only shapes matter.
    shapes: model variable shapes (`model_shapes(config.model)`), or None to convert by
      name only.

  Returns:
    A Conversion; nothing is raised for accounting problems (see `check_conversion`), only
    for malformed tensors (e.g. an in_proj that does not split in thirds).
  """
  if source_format not in ('d2-resnet', 'torchvision-resnet', 'zegformer'):
    raise ValueError(f'not a ZegFormer-variable format: {source_format!r}')
  covers = FULL_COVERS if source_format == 'zegformer' else BACKBONE_COVERS
  conv = Conversion(source_format, {}, {}, covers, {}, [], [], [])
  clip = {}
  for key, value in tensors.items():
    if source_format == 'zegformer' and key.startswith(CLIP_PREFIX):
      clip[key[len(CLIP_PREFIX):]] = value
      continue
    name = key
    if source_format == 'torchvision-resnet':
      name = torchvision_to_d2(key) or key
    reason = known_unused(source_format, name)
    if reason is not None:
      conv.skipped[key] = reason
      continue
    targets = official_targets(name if source_format == 'zegformer' else 'backbone.' + name)
    if targets is None:
      conv.unused.append(key)
      continue
    value = np.asarray(value)
    if not _is_float(value.dtype):
      raise ConversionError(f'{key}: dtype {value.dtype} where a float tensor is expected')
    for coll, path, transform in targets:
      full = (coll,) + path
      try:
        converted = transform(value)
      except ConversionError as e:
        raise ConversionError(f'{key}: {e}') from None
      if shapes is not None:
        if full not in shapes:
          if key not in conv.unused:
            conv.unused.append(key)
          continue
        if tuple(converted.shape) != tuple(shapes[full]):
          conv.mismatched.append((key, path_str(full), tuple(converted.shape),
                                  tuple(shapes[full])))
          continue
      if full in conv.variables:
        raise ConversionError(f'{key}: {path_str(full)} is also produced by '
                              f'{conv.sources[path_str(full)]}')
      conv.variables[full] = converted
      conv.sources[path_str(full)] = key
  if shapes is not None:
    conv.missing = sorted(path_str(p) for p in shapes
                          if _covered(path_str(p), covers) and p not in conv.variables)
  if clip:
    conv.clip = clip
  return conv


def _is_float(dtype: np.dtype) -> bool:
  # ml_dtypes' bfloat16 is not a subtype of np.floating for numpy.
  return np.issubdtype(dtype, np.floating) or dtype.name == 'bfloat16'


def _matches(patterns: Sequence[str], *names: str) -> bool:
  return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def _listing(items: Sequence[str], limit: int = 12) -> str:
  shown = ', '.join(items[:limit])
  return shown + (f', ... ({len(items)} in all)' if len(items) > limit else '')


def check_conversion(conv: Conversion, allow_missing: Sequence[str] = (),
                     source: str = '<input>') -> Tuple[List[str], List[str]]:
  """Enforces the key accounting. Returns (ignored unused keys, absent flax paths).

  Raises ConversionError naming the keys: for any shape mismatch; for unused source keys
  and missing model variables not matched by an `allow_missing` pattern.
  """
  if conv.mismatched:
    key, path, got, want = conv.mismatched[0]
    more = (f' (and {len(conv.mismatched) - 1} more: '
            f'{_listing([m[1] for m in conv.mismatched[1:]], 5)})' if len(conv.mismatched) > 1
            else '')
    raise ConversionError(f'{source}: {key} -> {path} has shape {got} but the model wants '
                          f'{want}{more}; is the checkpoint for another model size?')
  unused = [k for k in conv.unused if not _matches(allow_missing, k)]
  missing = [p for p in conv.missing if not _matches(allow_missing, p)]
  problems = []
  if unused:
    problems.append(f'{len(unused)} source keys are not used: {_listing(unused)}')
  if missing:
    problems.append(f'{len(missing)} model variables are missing from the source: '
                    f'{_listing(missing)}')
  if problems:
    hint = ''
    if any(re.search(r'_branch2[abc]_|_bn_[sb]$|^conv1_w$', k) for k in unused):
      hint = (' (these are Caffe2/MSRA names: BGR caffe-style weights, not supported; use '
              "torchvision's weights)")
    elif any(re.search(r'(^|\.)(res[2-5]\.\d+\.(conv[1-3]|shortcut)|'
                       r'layer[1-4]\.\d+\.(conv[1-3]|bn[1-3]|downsample))\.', k)
             for k in unused):
      hint = (' (ResNet blocks the model does not have: a checkpoint of another depth, e.g. '
              'R-101 weights for an R-50 config?)')
    raise ConversionError(f'{source}: ' + '; '.join(problems) + hint +
                          ' (name them with --allow_missing to proceed)')
  return list(conv.unused), list(conv.missing)


# ----------------------------------------------------------------------------- OpenAI CLIP

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
               linear_to_dense if leaf == 'weight' else _identity)]
    if module in _CLIP_LAYER_NORMS and leaf in ('weight', 'bias'):
      return [(base + (_CLIP_LAYER_NORMS[module], _NORM_LEAVES[leaf]), _identity)]
    return None
  norms = {'ln_final': ('text_model', 'final_layer_norm'),
           'visual.ln_pre': ('vision_model', 'pre_layrnorm'),
           'visual.ln_post': ('vision_model', 'post_layernorm')}
  module, _, leaf = key.rpartition('.')
  if module in norms and leaf in ('weight', 'bias'):
    return [(norms[module] + (_NORM_LEAVES[leaf],), _identity)]
  simple = {
      'token_embedding.weight': (('text_model', 'embeddings', 'token_embedding', 'embedding'),
                                 _identity),
      'positional_embedding': (('text_model', 'embeddings', 'position_embedding',
                                'embedding'), _identity),
      'text_projection': (('text_projection', 'kernel'), _identity),
      'visual.class_embedding': (('vision_model', 'embeddings', 'class_embedding'),
                                 _identity),
      'visual.positional_embedding': (('vision_model', 'embeddings', 'position_embedding',
                                       'embedding'), _identity),
      'visual.conv1.weight': (('vision_model', 'embeddings', 'patch_embedding', 'kernel'),
                              oihw_to_hwio),
      'visual.proj': (('visual_projection', 'kernel'), _identity),
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
    raise ConversionError(f'{source}: Hugging Face CLIP cannot load without {_listing(absent)}')
  return config, traverse_util.unflatten_dict(params), skipped, ignored


def _tokenizer_ids(tokenizer_dir: str, vocab_size: int) -> Dict[str, int]:
  """{'bos', 'eos'} ids from a Hugging Face CLIP tokenizer directory (vocab.json)."""
  from zegformer_jax.models import clip
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
  from zegformer_jax.models import clip
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


# ----------------------------------------------------------------------------- DIR


def save_params(directory: str, variables: Mapping[Path, np.ndarray]) -> None:
  """Writes {'params': ..., 'frozen': ...} (flat paths) with orbax to `directory`."""
  import orbax.checkpoint as ocp
  from flax import traverse_util
  tree = traverse_util.unflatten_dict(
      {k: np.array(v, dtype=np.float32, order='C') for k, v in variables.items()})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), tree)
  checkpointer.wait_until_finished()
  checkpointer.close()


def read_meta(directory: str) -> Dict[str, Any]:
  file = os.path.join(os.fspath(directory), META_NAME)
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f'{directory}: no {META_NAME}; init_from expects a directory written by '
        '`python -m zegformer_jax.convert`')
  with open(file, encoding='utf-8') as f:
    meta = json.load(f)
  if meta.get('format') != META_FORMAT or meta.get('version') != META_VERSION:
    raise ValueError(f'{file}: not a {META_FORMAT} v{META_VERSION} metadata file')
  return meta


def checkpoint_shapes(directory: str) -> Dict[Path, Tuple[int, ...]]:
  """{path: shape} of DIR/params, from orbax metadata only."""
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(os.path.abspath(os.path.join(directory, PARAMS_DIR)))
  checkpointer.close()
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  return flat_shapes(_plain(tree))


def _plain(tree):
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items() if not (isinstance(v, Mapping) and not v)}
  return tree


def load_params(directory: str, params: Any, frozen: Any) -> Tuple[Any, Any]:
  """Loads a converted checkpoint DIR into the structure of (params, frozen).

  Args:
    directory: DIR written by `python -m zegformer_jax.convert`.
    params, frozen: the model's current variables (jax arrays, numpy arrays or
      ShapeDtypeStructs): the reference structure, shapes and shardings.

  Returns:
    (params, frozen) with the same tree structure and shapes: every variable the checkpoint
    holds is loaded (restored straight into the given leaf's sharding); variables outside
    the checkpoint's `covers` or listed in its `absent` keep the given values.

  Raises:
    ValueError naming the parameter path: a shape mismatch, a checkpoint variable the
    model does not have, or a covered model variable the checkpoint lacks.
  """
  import jax
  import orbax.checkpoint as ocp
  from flax import traverse_util

  directory = os.fspath(directory)
  meta = read_meta(directory)
  saved = checkpoint_shapes(directory)
  target = traverse_util.flatten_dict({'params': dict(params), 'frozen': dict(frozen or {})})
  covers, absent = meta.get('covers', []), set(meta.get('absent', []))

  mismatched = [(path_str(k), saved[k], tuple(v.shape)) for k, v in target.items()
                if k in saved and saved[k] != tuple(v.shape)]
  if mismatched:
    path, got, want = mismatched[0]
    more = f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''
    raise ValueError(f'{directory}: {path} has shape {got} in the checkpoint but the model '
                     f'wants {want}{more}; was it converted for another config?')
  extra = sorted(path_str(k) for k in saved if k not in target)
  if extra:
    raise ValueError(f'{directory}: the model has no variable {extra[0]} '
                     f'({len(extra)} such: {_listing(extra, 5)}); was it converted for '
                     'another config?')
  lacking = sorted(path_str(k) for k in target if k not in saved and
                   _covered(path_str(k), covers) and path_str(k) not in absent)
  if lacking:
    raise ValueError(f'{directory}: lacks {lacking[0]} ({len(lacking)} missing: '
                     f'{_listing(lacking, 5)}) and does not list it as intentionally absent')

  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def abstract(leaf):
    sharding = getattr(leaf, 'sharding', None)
    if not isinstance(sharding, jax.sharding.Sharding):
      sharding = default
    return jax.ShapeDtypeStruct(tuple(leaf.shape), np.float32, sharding=sharding)

  restore_target = traverse_util.unflatten_dict(
      {k: abstract(target[k]) for k in saved})
  checkpointer = ocp.StandardCheckpointer()
  restored = traverse_util.flatten_dict(checkpointer.restore(
      os.path.abspath(os.path.join(directory, PARAMS_DIR)), restore_target))
  checkpointer.close()
  merged = {}
  for k, leaf in target.items():
    if k not in restored:
      merged[k] = leaf
      continue
    value = restored[k]
    dtype = getattr(leaf, 'dtype', np.float32)
    if isinstance(leaf, np.ndarray):
      value = np.asarray(value, dtype=dtype)
    elif value.dtype != dtype:
      value = value.astype(dtype)
    merged[k] = value
  tree = traverse_util.unflatten_dict(merged)
  return tree.get('params', {}), tree.get('frozen', {})


# ----------------------------------------------------------------------------- CLI


def load_config(spec: str):
  """get_config(arg) of a config file given as 'path.py' or 'path.py:arg'."""
  path, _, arg = spec.partition(':')
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} not found')
  # Config files import `configs.common`: make the repository root importable.
  root = os.path.dirname(os.path.dirname(path))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec_ = importlib.util.spec_from_file_location('_convert_config', path)
  module = importlib.util.module_from_spec(spec_)
  spec_.loader.exec_module(module)
  return module.get_config(arg or None)


def _prepare_output(output: str, overwrite: bool) -> str:
  """A fresh temporary directory next to `output` (renamed into place at the end)."""
  output = os.path.abspath(output)
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    if not overwrite:
      raise FileExistsError(f'{output} exists and is not empty (pass --overwrite)')
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(dir=parent, prefix='.tmp-convert-')


def _finish_output(tmp: str, output: str) -> None:
  output = os.path.abspath(output)
  os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
  if os.path.isdir(output):
    shutil.rmtree(output)
  os.replace(tmp, output)


def _skipped_summary(skipped: Mapping[str, str]) -> List[str]:
  by_reason: Dict[str, List[str]] = {}
  for key, reason in skipped.items():
    by_reason.setdefault(reason, []).append(key)
  return [f'skipped {len(keys)} ({reason}): {_listing(keys, 3)}'
          for reason, keys in by_reason.items()]


def convert(source_format: str, input_path: str, output: str, *, config_spec: str = '',
            allow_missing: Sequence[str] = (), tokenizer_dir: Optional[str] = None,
            clip_text_heads: Optional[int] = None, clip_vision_heads: Optional[int] = None,
            overwrite: bool = False, model_config=None) -> Dict[str, Any]:
  """The CLI's work: read, convert, check, write DIR. Returns the metadata written.

  The model to check against is `config_spec` ('configs/x.py[:arg]') or, from Python, a
  `model_config` (the `model` sub-config); with neither, conversion is by name only.
  """
  if source_format not in FORMATS:
    raise ValueError(f'unknown format {source_format!r}; expected one of {", ".join(FORMATS)}')
  tensors, info = read_tensors(input_path)
  allow_missing = [p for p in allow_missing if p]
  notes = [f'read {len(tensors)} tensors from {info.get("container")}']
  if info.get('author'):
    notes.append(f'__author__: {info["author"]}')
  if info.get('stripped_prefix'):
    notes.append(f'stripped the {info["stripped_prefix"]!r} prefix of every key')

  tmp = _prepare_output(output, overwrite)
  try:
    if source_format == 'openai-clip':
      summary = write_hf_clip(tmp, tensors, tokenizer_dir=tokenizer_dir,
                              text_heads=clip_text_heads, vision_heads=clip_vision_heads,
                              allow_missing=allow_missing, source=input_path)
      notes += _skipped_summary(summary['skipped'])
      if not summary['tokenizer_files']:
        notes.append('no tokenizer: copy vocab.json and merges.txt of a Hugging Face CLIP '
                     f'(openai/clip-vit-base-patch16) into {os.path.abspath(output)}')
      meta = {'format': META_FORMAT, 'version': META_VERSION, 'source_format': source_format,
              'input': os.path.abspath(input_path), 'input_sha256': sha256_file(input_path),
              'clip': summary, 'notes': notes}
      with open(os.path.join(tmp, META_NAME), 'w', encoding='utf-8') as f:
        json.dump(meta, f, indent=1)
      _finish_output(tmp, output)
      return meta

    shapes = None
    if config_spec:
      shapes = model_shapes(load_config(config_spec).model)
    elif model_config is not None:
      shapes = model_shapes(model_config)
    else:
      notes.append('no --config: converted by name only; shapes are checked by load_params')
    conv = convert_zegformer_format(source_format, tensors, shapes)
    ignored, absent = check_conversion(conv, allow_missing, input_path)
    if not conv.variables:
      raise ConversionError(f'{input_path}: no tensor converted (is --from {source_format} '
                            'right?)')
    logit_scale = tensors.get('sem_seg_head.predictor.logit_scale')
    if logit_scale is not None:
      scale = float(np.exp(np.asarray(logit_scale, np.float64).reshape(-1)[0]))
      notes.append(f'exp(logit_scale) = {scale:.4g} in the checkpoint (the model uses '
                   '1 / config.model.temperature)')
    save_params(os.path.join(tmp, PARAMS_DIR), conv.variables)
    clip_summary = None
    if conv.clip:
      clip_summary = write_hf_clip(
          os.path.join(tmp, CLIP_DIR), conv.clip, tokenizer_dir=tokenizer_dir,
          text_heads=clip_text_heads, vision_heads=clip_vision_heads,
          allow_missing=allow_missing, source=input_path, key_prefix=CLIP_PREFIX)
      conv.skipped.update(clip_summary.pop('skipped'))
      ignored += clip_summary['ignored']
      if not clip_summary['tokenizer_files']:
        notes.append(f'{CLIP_DIR}/ has no tokenizer: copy vocab.json and merges.txt of a '
                     'Hugging Face CLIP into it (or pass --tokenizer_dir)')
    elif source_format == 'zegformer':
      notes.append('no clip_model.* tensors (a training-config checkpoint): use a Hugging '
                   'Face CLIP ViT-B/16 directory or an --from openai-clip conversion')
    notes += _skipped_summary(conv.skipped)
    meta = {'format': META_FORMAT, 'version': META_VERSION, 'source_format': source_format,
            'input': os.path.abspath(input_path), 'input_sha256': sha256_file(input_path),
            'config': config_spec or None, 'covers': list(conv.covers), 'absent': absent,
            'skipped': conv.skipped, 'ignored': ignored,
            'num_variables': len(conv.variables),
            'clip': CLIP_DIR if conv.clip else None, 'clip_summary': clip_summary,
            'notes': notes}
    with open(os.path.join(tmp, META_NAME), 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=1)
    _finish_output(tmp, output)
    return meta
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m zegformer_jax.convert',
      description='Convert PyTorch ZegFormer / ResNet / CLIP weights (see the module doc).')
  parser.add_argument('--from', dest='source_format', required=True, choices=FORMATS)
  parser.add_argument('--input', required=True, help='source checkpoint file')
  parser.add_argument('--output', required=True, help='output directory DIR')
  parser.add_argument('--config', default='',
                      help='configs/x.py[:arg]: check names and shapes against this model')
  parser.add_argument('--allow_missing', default='',
                      help='comma-separated fnmatch patterns of source keys / flax paths '
                      'that may stay unused / missing')
  parser.add_argument('--tokenizer_dir', default=None,
                      help='Hugging Face CLIP directory whose tokenizer files are copied')
  parser.add_argument('--clip_text_heads', type=int, default=None)
  parser.add_argument('--clip_vision_heads', type=int, default=None)
  parser.add_argument('--overwrite', action='store_true')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)
  try:
    meta = convert(args.source_format, args.input, args.output, config_spec=args.config,
                   allow_missing=args.allow_missing.split(','),
                   tokenizer_dir=args.tokenizer_dir, clip_text_heads=args.clip_text_heads,
                   clip_vision_heads=args.clip_vision_heads, overwrite=args.overwrite)
  except (ConversionError, torch_pickle.UnsafePickleError, torch_pickle.TorchFileError,
          FileNotFoundError, FileExistsError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  for note in meta['notes']:
    print(note)
  print(f'wrote {os.path.abspath(args.output)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
