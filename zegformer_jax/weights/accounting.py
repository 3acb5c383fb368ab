"""What the source formats share: reading tensors, layout transforms and key accounting.

Every source key is converted, skipped for a stated reason (`known_unused`) or reported;
every covered model variable is produced or reported (`check_conversion`). Files are read
without torch and without running code in them (`read_tensors`, via torch_pickle).
"""
import dataclasses
import fnmatch
import os
import re
import zipfile
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from zegformer_jax.modeling import clip
from zegformer_jax.weights import torch_pickle
from zegformer_jax.weights.store import Path, covered, flat_shapes, listing, path_str

__all__ = [
    'ConversionError', 'Conversion', 'Path', 'Transform', 'Target', 'NORM_LEAVES',
    'identity', 'oihw_to_hwio', 'linear_to_dense', 'in_proj_part', 'squeeze_row',
    'to_scalar', 'shape_of', 'known_unused', 'sha256_file', 'read_tensors', 'path_str',
    'flat_shapes', 'model_shapes', 'is_float', 'matches', 'listing', 'check_conversion']

Transform = Callable[[np.ndarray], np.ndarray]
Target = Tuple[str, Path, Transform]   # (collection, path without collection, transform)

# PyTorch norm-layer leaves -> Flax names (BatchNorm buffers become FrozenBN statistics).
NORM_LEAVES = {'weight': 'scale', 'bias': 'bias', 'running_mean': 'mean',
               'running_var': 'var'}


class ConversionError(ValueError):
  """A source file cannot be converted (unknown/missing keys, wrong shapes, bad layout)."""


# ----------------------------------------------------------------------------- transforms
# Written for arrays, and shape-only use passes zero-stride broadcast views, so they must
# not copy (no ascontiguousarray here): official_to_flax runs them on R-101-sized shapes.


def identity(w: np.ndarray) -> np.ndarray:
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


def shape_of(transform: Transform, shape: Sequence[int]) -> Tuple[int, ...]:
  """The shape `transform` makes of an array of `shape` (without allocating one)."""
  return tuple(transform(np.broadcast_to(np.zeros((), np.float32), tuple(shape))).shape)


# ----------------------------------------------------------------------------- accounting


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


@dataclasses.dataclass
class Conversion:
  """Result of converting a source state dict (before any file is written).

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


def account_key(conv: Conversion, key: str, value, reason: Optional[str],
                targets: Optional[Sequence[Target]],
                shapes: Optional[Mapping[Path, Tuple[int, ...]]]) -> None:
  """Records one source key in `conv`: skipped for `reason` (known unused), unused without
  targets, else converted (`add_targets`)."""
  if reason is not None:
    conv.skipped[key] = reason
  elif targets is None:
    conv.unused.append(key)
  else:
    add_targets(conv, key, value, targets, shapes)


def record_missing(conv: Conversion, shapes: Optional[Mapping[Path, Tuple[int, ...]]]) -> None:
  """conv.missing: the model variables under conv.covers that no source key produced."""
  if shapes is not None:
    conv.missing = sorted(path_str(p) for p in shapes
                          if covered(path_str(p), conv.covers) and p not in conv.variables)


def linear_targets(path: Path, leaf: str) -> Optional[List[Target]]:
  """A torch Linear's weight / bias -> a flax Dense's kernel / bias at `path` ('params')."""
  if leaf == 'weight':
    return [('params', path + ('kernel',), linear_to_dense)]
  if leaf == 'bias':
    return [('params', path + ('bias',), identity)]
  return None


def norm_targets(path: Path, leaf: str) -> Optional[List[Target]]:
  """A torch LayerNorm / GroupNorm's weight / bias -> scale / bias at `path` ('params')."""
  if leaf in ('weight', 'bias'):
    return [('params', path + (NORM_LEAVES[leaf],), identity)]
  return None


def model_shapes(model_config) -> Dict[Path, Tuple[int, ...]]:
  """{('params'|'frozen', ...): shape} of the method's model built from a `model` config."""
  from zegformer_jax.modeling import methods
  return flat_shapes(methods.variable_shapes(model_config))


def add_targets(conv: Conversion, key: str, value, targets: Sequence[Target],
                shapes: Optional[Mapping[Path, Tuple[int, ...]]]) -> None:
  """Converts source tensor `key` into each of its `targets`, recording it in `conv`: a
  target the model lacks makes the key unused, a shape the model does not want a mismatch
  (both judged by check_conversion); two sources for one variable are an error."""
  value = np.asarray(value)
  if not is_float(value.dtype):
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


def is_float(dtype: np.dtype) -> bool:
  # ml_dtypes' bfloat16 is not a subtype of np.floating for numpy.
  return np.issubdtype(dtype, np.floating) or dtype.name == 'bfloat16'


def matches(patterns: Sequence[str], *names: str) -> bool:
  """Whether any name matches any fnmatch pattern (case-sensitive)."""
  return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def check_conversion(conv: Conversion, allow_missing: Sequence[str] = (),
                     source: str = '<input>') -> Tuple[List[str], List[str]]:
  """Enforces the key accounting. Returns (ignored unused keys, absent flax paths).

  Raises ConversionError naming the keys: for any shape mismatch; for unused source keys
  and missing model variables not matched by an `allow_missing` pattern.
  """
  if conv.mismatched:
    key, path, got, want = conv.mismatched[0]
    more = (f' (and {len(conv.mismatched) - 1} more: '
            f'{listing([m[1] for m in conv.mismatched[1:]], 5)})' if len(conv.mismatched) > 1
            else '')
    raise ConversionError(f'{source}: {key} -> {path} has shape {got} but the model wants '
                          f'{want}{more}; is the checkpoint for another model size?')
  unused = [k for k in conv.unused if not matches(allow_missing, k)]
  missing = [p for p in conv.missing if not matches(allow_missing, p)]
  problems = []
  if unused:
    problems.append(f'{len(unused)} source keys are not used: {listing(unused)}')
  if missing:
    problems.append(f'{len(missing)} model variables are missing from the source: '
                    f'{listing(missing)}')
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


# ----------------------------------------------------------------------------- reading


sha256_file = clip.sha256_file   # the input file's fingerprint in the store's meta


def _unreadable(path: str, what: str, error: BaseException) -> str:
  """'<path> is not a <what>: it looks like <kind>' (or the reader's own reason)."""
  with open(path, 'rb') as f:
    head = f.read(4096)
  kind = torch_pickle.looks_like(head)
  if kind:
    return f'{path} is not a {what}: it looks like {kind}'
  if os.path.getsize(path) == 0:
    return f'{path} is empty (0 bytes), not a {what}'
  return f'{path} is not a readable {what} (truncated or damaged?): {error}'


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
    try:
      return dict(load_file(path)), {'container': 'safetensors'}
    except Exception as e:  # pylint: disable=broad-except  (SafetensorError is no ValueError)
      raise ConversionError(_unreadable(path, 'safetensors file', e)) from None
  if path.endswith('.npz'):
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}, {'container': 'npz'}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
      raise ConversionError(_unreadable(path, '.npz archive', e)) from None
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
