"""Weight import (zegformer_jax.weights) against independent oracles.

Source files are written here in each source layout without torch: detectron2-style
pickles of numpy arrays, torch zip archives (archive/data.pkl with persistent ids,
archive/data/<key> raw storages, archive/version), the legacy torch.save stream, and a
TorchScript-like archive. Converted weights are checked against numpy forward passes computed
directly from the SOURCE-layout arrays (NCHW activations, OIHW convs, packed in_proj
attention, [out, in] Linear weights): a tiny bottleneck ResNet, the FPN pixel decoder, the
DETR decoder and Eq. 1 of a tiny ZegFormer, and a tiny OpenAI-layout CLIP (numpy text and
image transformers). Full-size R-50/R-101 only go through shapes (jax.eval_shape).

Tests marked `torch` cross-check the reader against real torch files; they are skipped
when torch is not installed (it is an optional extra).
"""
import collections
import json
import math
import os
import pickle
import re
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import coco_stuff_r101
from configs import coco_stuff_r50
from configs import shapesworld
from zegformer_jax.modeling import resnet
from zegformer_jax.modeling import zegformer
from zegformer_jax.weights import accounting
from zegformer_jax.weights import convert
from zegformer_jax.weights import openai_clip
from zegformer_jax.weights import resnet as resnet_keys
from zegformer_jax.weights import store
from zegformer_jax.weights import torch_pickle
from zegformer_jax.weights import zegformer as zegformer_keys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))  # the repository root
REFERENCE = os.path.join(REPO, '..', 'shared', 'reference', 'data', 'derived')
RTOL = 1e-4
# Measured errors, collected by the parity tests (printed with -s, see _report).
ERRORS = {}


def _report(name, got, want):
  """Max abs / relative (to max |want|) error; asserts the relative one is below RTOL."""
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  assert got.shape == want.shape, (name, got.shape, want.shape)
  abs_err = float(np.abs(got - want).max())
  rel_err = abs_err / max(float(np.abs(want).max()), 1e-30)
  ERRORS[name] = (abs_err, rel_err)
  print(f'{name}: max abs {abs_err:.3g}, rel {rel_err:.3g}')
  assert rel_err < RTOL, (name, abs_err, rel_err)


# =============================================================================================
# Writers for the source formats (no torch).


class _Global:
  """A pickle GLOBAL `module name`, written without importing the module (torch is absent)."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):  # save_reduce requires a callable
    raise AssertionError('never called')


class TensorView:
  """A tensor over a shared storage: `base` (1-d) viewed with size/stride/offset."""

  def __init__(self, base, offset, size, stride):
    self.base, self.offset, self.size, self.stride = base, offset, size, stride


class ScriptModule:
  """A TorchScript module object: GLOBAL __torch__.<qualname>, state = attribute dict."""

  def __init__(self, qualname, attrs):
    self.qualname, self.attrs = qualname, attrs


class _StorageRef:
  def __init__(self, key, array):
    self.key, self.array = key, array


_STORAGE_NAMES = {np.dtype(np.float32): 'FloatStorage', np.dtype(np.float16): 'HalfStorage',
                  np.dtype(np.float64): 'DoubleStorage', np.dtype(np.int64): 'LongStorage',
                  np.dtype(np.bool_): 'BoolStorage'}


def _storage_name(dtype):
  if dtype.name == 'bfloat16':
    return 'BFloat16Storage'
  return _STORAGE_NAMES[np.dtype(dtype)]


class TorchPickler(pickle._Pickler):  # the pure-Python pickler lets us write raw GLOBALs
  """Writes objects as torch.save does: tensors -> _rebuild_tensor_v2 + storage pids."""

  def __init__(self, file, storages, legacy=False):
    super().__init__(file, protocol=2)
    self.storages = storages      # id(base array) -> _StorageRef, shared with the caller
    self.legacy = legacy

  def _storage(self, base):
    ref = self.storages.get(id(base))
    if ref is None:
      ref = _StorageRef(str(len(self.storages)), np.ascontiguousarray(base).reshape(-1))
      self.storages[id(base)] = ref
    return ref

  def save_global(self, obj, name=None):
    if isinstance(obj, _Global):
      self.write(pickle.GLOBAL + f'{obj.module}\n{obj.name}\n'.encode('utf-8'))
      self.memoize(obj)
    else:
      super().save_global(obj, name)

  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      pid = ('storage', _Global('torch', _storage_name(obj.array.dtype)), obj.key, 'cpu',
             obj.array.size)
      return pid + (None,) if self.legacy else pid
    return None

  def reducer_override(self, obj):
    if isinstance(obj, _Global):
      return obj.name  # a string: pickled as a global, via save_global above
    rebuild = _Global('torch._utils', '_rebuild_tensor_v2')
    if isinstance(obj, TensorView):
      return rebuild, (self._storage(obj.base), obj.offset, tuple(obj.size),
                       tuple(obj.stride), False, collections.OrderedDict())
    if isinstance(obj, np.ndarray):
      ref = self._storage(obj)
      stride = tuple(int(np.prod(obj.shape[i + 1:])) for i in range(obj.ndim))
      return rebuild, (ref, 0, tuple(obj.shape), stride, False, collections.OrderedDict())
    if isinstance(obj, ScriptModule):
      module, _, name = obj.qualname.rpartition('.')
      return _Global(module, name), (), obj.attrs
    return NotImplemented


def write_torch_zip(path, obj, archive='archive', extra_files=()):
  """torch.save's zip layout: <archive>/data.pkl, data/<key>, version, byteorder."""
  import io
  storages = {}
  buf = io.BytesIO()
  TorchPickler(buf, storages).dump(obj)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
    zf.writestr(f'{archive}/data.pkl', buf.getvalue())
    zf.writestr(f'{archive}/byteorder', 'little')
    for ref in storages.values():
      zf.writestr(f'{archive}/data/{ref.key}', ref.array.tobytes())
    zf.writestr(f'{archive}/version', '3\n')
    for name, data in extra_files:
      zf.writestr(f'{archive}/{name}', data)


def write_legacy_torch(path, obj):
  """torch.save(..., _use_new_zipfile_serialization=False): pickles, then raw storages."""
  storages = {}
  with open(path, 'wb') as f:
    for header in (torch_pickle.LEGACY_MAGIC_NUMBER, torch_pickle.LEGACY_PROTOCOL_VERSION,
                   {'protocol_version': 1001, 'little_endian': True,
                    'type_sizes': {'short': 2, 'int': 4, 'long': 4}}):
      pickle.dump(header, f, protocol=2)
    TorchPickler(f, storages, legacy=True).dump(obj)
    refs = list(storages.values())
    pickle.dump([r.key for r in refs], f, protocol=2)
    for ref in refs:
      f.write(struct.pack('<q', ref.array.size))
      f.write(ref.array.tobytes())


def script_tree(tensors, qualname='__torch__.model.CLIP', extra_attrs=None):
  """Nested ScriptModules from dotted keys (a TorchScript archive's module objects)."""
  root = {}
  for key, value in tensors.items():
    node = root
    *mods, leaf = key.split('.')
    for m in mods:
      node = node.setdefault(m, {})
    node[leaf] = value

  def build(node, name):
    attrs = {'training': False}
    for k, v in node.items():
      attrs[k] = build(v, f'{name}.{k}') if isinstance(v, dict) else v
    return ScriptModule(f'__torch__.{name}', attrs)

  tree = build(root, qualname.rpartition('.')[2])
  tree.qualname = qualname
  if extra_attrs:
    tree.attrs.update(extra_attrs)
  return tree


# =============================================================================================
# Source-layout weights of a tiny ZegFormer (official key names, written independently of
# the key mapping in zegformer_jax.weights).


def tiny_model_config():
  c = ml_collections.ConfigDict(shapesworld.get_config().model.to_dict())
  c.backbone.block_counts = (1, 2, 1, 1)
  c.backbone.stem_width = 8
  c.backbone.bottleneck = True
  c.pixel_decoder.conv_dim = 32
  c.pixel_decoder.mask_dim = 32
  c.pixel_decoder.gn_groups = 8
  c.decoder.hidden_dim = 32
  c.decoder.num_heads = 4
  c.decoder.ffn_dim = 64
  c.decoder.num_layers = 2
  c.decoder.dropout = 0.0
  c.decoder.num_queries = 6
  c.decoder.in_feature = 'res5'   # every official checkpoint's decoder reads res5
  c.decoder.masked_attention = False   # MaskFormer's decoder, as in every official checkpoint
  c.embed_dim = 16
  return c


def resnet_shapes(block_counts, stem, bottleneck=True):
  """detectron2 ResNet keys (no 'backbone.' prefix) -> shapes."""
  out = {}

  def conv(name, o, i, k):
    out[f'{name}.weight'] = (o, i, k, k)
    for leaf in ('weight', 'bias', 'running_mean', 'running_var'):
      out[f'{name}.norm.{leaf}'] = (o,)

  conv('stem.conv1', stem, 3, 7)
  cin = stem
  for s, n in enumerate(block_counts):
    width = stem * 2**s
    cout = 4 * width if bottleneck else width
    for i in range(n):
      p = f'res{s + 2}.{i}'
      if i == 0 and (cin != cout or s > 0):
        conv(f'{p}.shortcut', cout, cin, 1)
      if bottleneck:
        conv(f'{p}.conv1', width, cin, 1)
        conv(f'{p}.conv2', width, width, 3)
        conv(f'{p}.conv3', cout, width, 1)
      else:
        conv(f'{p}.conv1', cout, cin, 3)
        conv(f'{p}.conv2', cout, cout, 3)
      cin = cout
  return out


def zegformer_shapes(cfg, num_train_classes=5):
  """Official MaskFormer/ZegFormer state_dict keys -> shapes for a model config."""
  b = cfg.backbone
  out = {f'backbone.{k}': v for k, v in resnet_shapes(b.block_counts, b.stem_width).items()}
  chans = [4 * b.stem_width * 2**s for s in range(4)]
  pd, cd, md = 'sem_seg_head.pixel_decoder.', cfg.pixel_decoder.conv_dim, cfg.pixel_decoder.mask_dim
  for idx in (1, 2, 3):
    out[f'{pd}adapter_{idx}.weight'] = (cd, chans[idx - 1], 1, 1)
    out[f'{pd}layer_{idx}.weight'] = (cd, cd, 3, 3)
  out[f'{pd}layer_4.weight'] = (cd, chans[3], 3, 3)
  for name in ('adapter_1', 'adapter_2', 'adapter_3', 'layer_1', 'layer_2', 'layer_3',
               'layer_4'):
    out[f'{pd}{name}.norm.weight'] = out[f'{pd}{name}.norm.bias'] = (cd,)
  out[f'{pd}mask_features.weight'] = (md, cd, 3, 3)
  out[f'{pd}mask_features.bias'] = (md,)
  pr, d, ffn = 'sem_seg_head.predictor.', cfg.decoder.hidden_dim, cfg.decoder.ffn_dim
  for l in range(cfg.decoder.num_layers):
    t = f'{pr}transformer.decoder.layers.{l}.'
    for attn in ('self_attn', 'multihead_attn'):
      out[f'{t}{attn}.in_proj_weight'] = (3 * d, d)
      out[f'{t}{attn}.in_proj_bias'] = (3 * d,)
      out[f'{t}{attn}.out_proj.weight'] = (d, d)
      out[f'{t}{attn}.out_proj.bias'] = (d,)
    out[f'{t}linear1.weight'], out[f'{t}linear1.bias'] = (ffn, d), (ffn,)
    out[f'{t}linear2.weight'], out[f'{t}linear2.bias'] = (d, ffn), (d,)
    for n in ('norm1', 'norm2', 'norm3'):
      out[f'{t}{n}.weight'] = out[f'{t}{n}.bias'] = (d,)
  out[f'{pr}transformer.decoder.norm.weight'] = (d,)
  out[f'{pr}transformer.decoder.norm.bias'] = (d,)
  out[f'{pr}query_embed.weight'] = (cfg.decoder.num_queries, d)
  out[f'{pr}input_proj.weight'] = (d, chans[3], 1, 1)
  out[f'{pr}input_proj.bias'] = (d,)
  for i in range(cfg.mask_embed_layers):
    o = md if i == cfg.mask_embed_layers - 1 else d
    out[f'{pr}mask_embed.layers.{i}.weight'] = (o, d)
    out[f'{pr}mask_embed.layers.{i}.bias'] = (o,)
  out[f'{pr}projection_layer.weight'] = (cfg.embed_dim, d)
  out[f'{pr}projection_layer.bias'] = (cfg.embed_dim,)
  out[f'{pr}bg_feature'] = (1, cfg.embed_dim)
  out[f'{pr}logit_scale'] = ()
  out['criterion.empty_weight'] = (num_train_classes + 1,)
  return out


def random_state(shapes, seed):
  """Random float32 tensors, scaled per kind so activations stay O(1) through the net."""
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if key.endswith('running_var'):
      v = rng.uniform(0.5, 1.5, shape)
    elif key.endswith('running_mean') or key.endswith('.bias'):
      v = 0.1 * rng.standard_normal(shape)
    elif '.norm' in key or key.endswith('ln_1.weight') or key.endswith('ln_2.weight'):
      v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif key.endswith('logit_scale'):
      v = np.full(shape, math.log(100.0))
    elif key.endswith('empty_weight'):
      v = np.concatenate([np.ones(shape[0] - 1), [0.1]])
    elif key.endswith('bg_feature'):
      v = 0.3 * rng.standard_normal(shape)
    elif key.endswith('query_embed.weight'):
      v = rng.standard_normal(shape)
    elif len(shape) == 4:   # conv: He init on fan_in
      v = rng.standard_normal(shape) * math.sqrt(2.0 / np.prod(shape[1:]))
    elif len(shape) == 2:   # linear / in_proj
      v = rng.standard_normal(shape) / math.sqrt(shape[1])
    else:
      v = rng.standard_normal(shape)
    out[key] = np.asarray(v, np.float32)
  return out


# =============================================================================================
# Numpy forward passes from SOURCE-layout arrays (float64, NCHW, batch-first sequences).


def np_conv(x, w, stride=1, bias=None):
  """PyTorch Conv2d: x [B, C, H, W], w [O, I, kh, kw] (OIHW), padding k // 2."""
  _, _, h, wd = x.shape
  _, _, kh, kw = w.shape
  p = kh // 2
  xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
  ho, wo = (h + 2 * p - kh) // stride + 1, (wd + 2 * p - kw) // stride + 1
  out = np.zeros((x.shape[0], w.shape[0], ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, :, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += np.einsum('bchw,oc->bohw', patch, w[:, :, i, j])
  if bias is not None:
    out += bias[None, :, None, None]
  return out


def np_frozen_bn(x, sd, name):
  c = lambda v: v[None, :, None, None]
  scale = sd[f'{name}.norm.weight'] / np.sqrt(sd[f'{name}.norm.running_var'] + 1e-5)
  return (x - c(sd[f'{name}.norm.running_mean'])) * c(scale) + c(sd[f'{name}.norm.bias'])


def np_maxpool(x):
  """3x3, stride 2, padding 1 (padded with -inf)."""
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  ho, wo = (x.shape[2] - 1) // 2 + 1, (x.shape[3] - 1) // 2 + 1
  out = np.full(x.shape[:2] + (ho, wo), -np.inf)
  for i in range(3):
    for j in range(3):
      out = np.maximum(out, xp[:, :, i:i + 2 * (ho - 1) + 1:2, j:j + 2 * (wo - 1) + 1:2])
  return out


def np_resnet(sd, x, block_counts, prefix=''):
  """detectron2 ResNet (basic stem, bottlenecks, stride in the 3x3) -> {res2..res5} NCHW."""
  relu = lambda v: np.maximum(v, 0)
  sd = {k[len(prefix):]: np.asarray(v, np.float64) for k, v in sd.items()
        if k.startswith(prefix)}
  x = np_maxpool(relu(np_frozen_bn(np_conv(x, sd['stem.conv1.weight'], 2), sd, 'stem.conv1')))
  feats = {}
  for s, n in enumerate(block_counts):
    for i in range(n):
      p = f'res{s + 2}.{i}'
      stride = 2 if (i == 0 and s > 0) else 1
      y = relu(np_frozen_bn(np_conv(x, sd[f'{p}.conv1.weight']), sd, f'{p}.conv1'))
      y = relu(np_frozen_bn(np_conv(y, sd[f'{p}.conv2.weight'], stride), sd, f'{p}.conv2'))
      y = np_frozen_bn(np_conv(y, sd[f'{p}.conv3.weight']), sd, f'{p}.conv3')
      if f'{p}.shortcut.weight' in sd:
        x = np_frozen_bn(np_conv(x, sd[f'{p}.shortcut.weight'], stride), sd, f'{p}.shortcut')
      x = relu(y + x)
    feats[f'res{s + 2}'] = x
  return feats


def np_group_norm(x, groups, w, b):
  bsz, c, h, wd = x.shape
  g = x.reshape(bsz, groups, c // groups, h, wd)
  g = (g - g.mean(axis=(2, 3, 4), keepdims=True)) / np.sqrt(
      g.var(axis=(2, 3, 4), keepdims=True) + 1e-5)
  return g.reshape(x.shape) * w[None, :, None, None] + b[None, :, None, None]


def np_nearest(x, size):
  """F.interpolate(mode='nearest'): source index floor(dst * in / out)."""
  ys = (np.arange(size[0]) * x.shape[2]) // size[0]
  xs = (np.arange(size[1]) * x.shape[3]) // size[1]
  return x[:, :, ys][:, :, :, xs]


def np_pixel_decoder(sd, feats, groups):
  """MaskFormer BasePixelDecoder.forward_features from official keys -> mask features."""
  p = 'sem_seg_head.pixel_decoder.'
  g = lambda k: np.asarray(sd[p + k], np.float64)
  relu = lambda v: np.maximum(v, 0)
  conv_gn = lambda x, name: np_group_norm(np_conv(x, g(f'{name}.weight')), groups,
                                          g(f'{name}.norm.weight'), g(f'{name}.norm.bias'))
  y = relu(conv_gn(feats['res5'], 'layer_4'))
  for idx, level in ((3, 'res4'), (2, 'res3'), (1, 'res2')):
    cur = conv_gn(feats[level], f'adapter_{idx}')
    y = relu(conv_gn(cur + np_nearest(y, cur.shape[2:]), f'layer_{idx}'))
  return np_conv(y, g('mask_features.weight'), bias=g('mask_features.bias'))


def np_position_sine(h, w, f):
  """DETR PositionEmbeddingSine(f, 1e4, normalize=True) of an unmasked h x w map -> [hw, 2f]."""
  y = np.cumsum(np.ones((h, w)), 0)
  x = np.cumsum(np.ones((h, w)), 1)
  y = y / (y[-1:, :] + 1e-6) * 2 * math.pi
  x = x / (x[:, -1:] + 1e-6) * 2 * math.pi
  dim_t = 10000.0 ** (2 * (np.arange(f) // 2) / f)

  def enc(c):
    p = c[..., None] / dim_t
    return np.stack([np.sin(p[..., 0::2]), np.cos(p[..., 1::2])], -1).reshape(h, w, f)

  return np.concatenate([enc(y), enc(x)], -1).reshape(h * w, 2 * f)


def np_layer_norm(x, w, b):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b


def np_mha_packed(sd, prefix, q_in, k_in, v_in, heads, mask=None):
  """nn.MultiheadAttention from packed in_proj_weight [3d, d] / in_proj_bias, batch-first."""
  w = np.asarray(sd[f'{prefix}in_proj_weight'], np.float64)
  b = np.asarray(sd[f'{prefix}in_proj_bias'], np.float64)
  d = w.shape[1]
  q = q_in @ w[:d].T + b[:d]
  k = k_in @ w[d:2 * d].T + b[d:2 * d]
  v = v_in @ w[2 * d:].T + b[2 * d:]
  bsz, nq, _ = q.shape
  dh = d // heads
  split = lambda t: t.reshape(bsz, t.shape[1], heads, dh).transpose(0, 2, 1, 3)
  logits = split(q) @ split(k).transpose(0, 1, 3, 2) / math.sqrt(dh)
  if mask is not None:
    logits = logits + mask
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  out = (att @ split(v)).transpose(0, 2, 1, 3).reshape(bsz, nq, d)
  return (out @ np.asarray(sd[f'{prefix}out_proj.weight'], np.float64).T +
          np.asarray(sd[f'{prefix}out_proj.bias'], np.float64))


def np_zegformer(sd, images, text, cfg):
  """The whole official forward (eval) -> dict of intermediate and final outputs."""
  sd64 = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  g = lambda k: sd64['sem_seg_head.predictor.' + k]
  lin = lambda x, name: x @ g(f'{name}.weight').T + g(f'{name}.bias')
  feats = np_resnet(sd64, images, cfg.backbone.block_counts, prefix='backbone.')
  mask_features = np_pixel_decoder(sd64, feats, cfg.pixel_decoder.gn_groups)
  res5 = feats['res5']
  bsz, _, h, w = res5.shape
  d, heads = cfg.decoder.hidden_dim, cfg.decoder.num_heads
  memory = np_conv(res5, g('input_proj.weight'), bias=g('input_proj.bias'))
  memory = memory.reshape(bsz, d, h * w).transpose(0, 2, 1)
  pos = np_position_sine(h, w, d // 2)[None]
  qpos = g('query_embed.weight')[None]
  tgt = np.zeros((bsz, qpos.shape[1], d))
  outs = []
  for l in range(cfg.decoder.num_layers):
    t = f'sem_seg_head.predictor.transformer.decoder.layers.{l}.'
    ln = lambda x, n: np_layer_norm(x, sd64[f'{t}{n}.weight'], sd64[f'{t}{n}.bias'])
    q = tgt + qpos
    tgt = ln(tgt + np_mha_packed(sd64, t + 'self_attn.', q, q, tgt, heads), 'norm1')
    tgt = ln(tgt + np_mha_packed(sd64, t + 'multihead_attn.', tgt + qpos, memory + pos,
                                 memory, heads), 'norm2')
    ffn = (np.maximum(tgt @ sd64[t + 'linear1.weight'].T + sd64[t + 'linear1.bias'], 0) @
           sd64[t + 'linear2.weight'].T + sd64[t + 'linear2.bias'])
    tgt = ln(tgt + ffn, 'norm3')
    outs.append(np_layer_norm(tgt, g('transformer.decoder.norm.weight'),
                              g('transformer.decoder.norm.bias')))
  hs = np.stack(outs)                                          # [L, B, Q, d]
  m = hs
  for i in range(cfg.mask_embed_layers):
    m = lin(m, f'mask_embed.layers.{i}')
    if i < cfg.mask_embed_layers - 1:
      m = np.maximum(m, 0)
  masks = np.einsum('lbqc,bchw->lbqhw', m, mask_features)
  sem = lin(hs, 'projection_layer')
  sem = sem / np.linalg.norm(sem, axis=-1, keepdims=True)
  scale = np.exp(g('logit_scale').reshape(-1)[0])
  logits = scale * np.concatenate([sem @ text.T, sem @ g('bg_feature').T], -1)
  return {'features': feats, 'mask_features': mask_features, 'segment_embeddings': hs,
          'pred_masks': masks, 'pred_logits': logits, 'semantic_embeddings': sem}


# ---------------------------------------------------------------------------- OpenAI CLIP


def openai_clip_shapes(vocab, ctx=16, text_width=128, text_layers=2, vision_width=64,
                       vision_layers=2, patch=8, grid=4, embed=32):
  out = {'token_embedding.weight': (vocab, text_width),
         'positional_embedding': (ctx, text_width), 'ln_final.weight': (text_width,),
         'ln_final.bias': (text_width,), 'text_projection': (text_width, embed),
         'logit_scale': (),
         'visual.class_embedding': (vision_width,),
         'visual.positional_embedding': (grid * grid + 1, vision_width),
         'visual.conv1.weight': (vision_width, 3, patch, patch),
         'visual.ln_pre.weight': (vision_width,), 'visual.ln_pre.bias': (vision_width,),
         'visual.ln_post.weight': (vision_width,), 'visual.ln_post.bias': (vision_width,),
         'visual.proj': (vision_width, embed)}
  for prefix, width, layers in (('transformer.resblocks.', text_width, text_layers),
                                ('visual.transformer.resblocks.', vision_width, vision_layers)):
    for i in range(layers):
      p = f'{prefix}{i}.'
      out.update({f'{p}attn.in_proj_weight': (3 * width, width),
                  f'{p}attn.in_proj_bias': (3 * width,),
                  f'{p}attn.out_proj.weight': (width, width),
                  f'{p}attn.out_proj.bias': (width,),
                  f'{p}ln_1.weight': (width,), f'{p}ln_1.bias': (width,),
                  f'{p}ln_2.weight': (width,), f'{p}ln_2.bias': (width,),
                  f'{p}mlp.c_fc.weight': (4 * width, width), f'{p}mlp.c_fc.bias': (4 * width,),
                  f'{p}mlp.c_proj.weight': (width, 4 * width),
                  f'{p}mlp.c_proj.bias': (width,)})
  return out


def random_clip_state(shapes, seed):
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if key == 'logit_scale':
      v = np.full(shape, math.log(1 / 0.07))
    elif key.endswith('.weight') and 'ln_' in key:               # LayerNorm scales
      v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif key.endswith('bias'):
      v = 0.05 * rng.standard_normal(shape)
    elif len(shape) == 4:                                         # patch conv
      v = rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))
    elif key in ('text_projection', 'visual.proj'):               # [in, out], used as x @ P
      v = rng.standard_normal(shape) / math.sqrt(shape[0])
    elif key.endswith('weight') and len(shape) == 2 and 'embedding' not in key:
      v = rng.standard_normal(shape) / math.sqrt(shape[1])        # Linear [out, in]
    else:                                                         # embeddings
      v = 0.5 * rng.standard_normal(shape)
    # OpenAI's archive stores fp16: convert, and the reference uses the same rounded values.
    out[key] = np.asarray(v, np.float16)
  return out


def np_clip_transformer(sd, prefix, x, layers, heads, mask=None):
  f = lambda k: np.asarray(sd[k], np.float64)
  for i in range(layers):
    p = f'{prefix}{i}.'
    h = np_layer_norm(x, f(p + 'ln_1.weight'), f(p + 'ln_1.bias'))
    x = x + np_mha_packed(sd, p + 'attn.', h, h, h, heads, mask)
    h = np_layer_norm(x, f(p + 'ln_2.weight'), f(p + 'ln_2.bias'))
    h = h @ f(p + 'mlp.c_fc.weight').T + f(p + 'mlp.c_fc.bias')
    h = h * (1.0 / (1.0 + np.exp(-1.702 * h)))                   # QuickGELU
    x = x + h @ f(p + 'mlp.c_proj.weight').T + f(p + 'mlp.c_proj.bias')
  return x


def np_clip_text(sd, ids, layers, heads):
  """OpenAI CLIP encode_text (argmax pooling), L2-normalised."""
  f = lambda k: np.asarray(sd[k], np.float64)
  ctx = ids.shape[1]
  x = f('token_embedding.weight')[ids] + f('positional_embedding')[:ctx]
  mask = np.triu(np.full((ctx, ctx), -np.inf), 1)
  x = np_clip_transformer(sd, 'transformer.resblocks.', x, layers, heads, mask)
  x = np_layer_norm(x, f('ln_final.weight'), f('ln_final.bias'))
  x = x[np.arange(len(ids)), ids.argmax(-1)] @ f('text_projection')
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def np_clip_image(sd, images_nchw, layers, heads):
  """OpenAI CLIP VisionTransformer, L2-normalised projected class token."""
  f = lambda k: np.asarray(sd[k], np.float64)
  w = f('visual.conv1.weight')
  width, _, p, _ = w.shape
  b, c, s, _ = images_nchw.shape
  g = s // p
  patches = images_nchw.reshape(b, c, g, p, g, p)
  x = np.einsum('bcipjq,wcpq->bijw', patches, w).reshape(b, g * g, width)
  cls = np.broadcast_to(f('visual.class_embedding'), (b, 1, width))
  x = np.concatenate([cls, x], 1) + f('visual.positional_embedding')
  x = np_layer_norm(x, f('visual.ln_pre.weight'), f('visual.ln_pre.bias'))
  x = np_clip_transformer(sd, 'visual.transformer.resblocks.', x, layers, heads)
  x = np_layer_norm(x[:, 0], f('visual.ln_post.weight'), f('visual.ln_post.bias'))
  x = x @ f('visual.proj')
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# =============================================================================================
# Fixtures


@pytest.fixture(scope='module')
def tiny():
  """(model config, official state dict of the tiny ZegFormer)."""
  cfg = tiny_model_config()
  return cfg, random_state(zegformer_shapes(cfg), seed=0)


@pytest.fixture(scope='module')
def tokenizer_dir(tmp_path_factory):
  """A small CLIP BPE tokenizer in the Hugging Face layout (vocab.json, merges.txt, ...)."""
  from transformers import CLIPTokenizerFast
  from zegformer_jax.modeling import clip
  path = tmp_path_factory.mktemp('tokenizer')
  vocab, merges = clip._train_bpe(['a photo of a cat', 'a dog in the scene', 'grass'])
  with open(path / 'vocab.json', 'w', encoding='utf-8') as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
  with open(path / 'merges.txt', 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n')
    f.writelines(f'{a} {b}\n' for a, b in merges)
  CLIPTokenizerFast(vocab_file=str(path / 'vocab.json'), merges_file=str(path / 'merges.txt'),
                    model_max_length=16).save_pretrained(str(path))
  return str(path), len(vocab)


@pytest.fixture(scope='module')
def clip_state(tokenizer_dir):
  _, vocab = tokenizer_dir
  return random_clip_state(openai_clip_shapes(vocab), seed=3)


def _abstract_variables(cfg):
  model = zegformer.build_model(cfg)
  return model, jax.eval_shape(lambda: zegformer.init_variables(model, jax.random.key(0)))


def _filled(abstract, value):
  """Numpy leaves of a constant value: recognisable 'initial values'."""
  return jax.tree_util.tree_map(lambda s: np.full(s.shape, value, np.float32), abstract)


# =============================================================================================
# Layout changes, one by one.


def test_layout_transforms():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((5, 3, 2, 4)).astype(np.float32)       # O, I, kh, kw
  k = accounting.oihw_to_hwio(w)
  assert k.shape == (2, 4, 3, 5)
  for o, i, y, x in np.ndindex(*w.shape):
    assert k[y, x, i, o] == w[o, i, y, x]

  lin = rng.standard_normal((6, 4)).astype(np.float32)            # out, in
  x = rng.standard_normal((3, 4))
  np.testing.assert_allclose(x @ accounting.linear_to_dense(lin), x @ lin.T)
  assert accounting.linear_to_dense(lin).shape == (4, 6)

  d = 4
  packed = rng.standard_normal((3 * d, d)).astype(np.float32)
  bias = rng.standard_normal(3 * d).astype(np.float32)
  for i in range(3):
    kernel = accounting.in_proj_part(i, True)(packed)
    np.testing.assert_array_equal(kernel, packed[i * d:(i + 1) * d].T)
    np.testing.assert_array_equal(accounting.in_proj_part(i, False)(bias), bias[i * d:(i + 1) * d])
    # x @ kernel + b equals the i-th projection of F.linear(x, in_proj_weight, in_proj_bias).
    full = x @ packed.T + bias
    np.testing.assert_allclose(x @ kernel + bias[i * d:(i + 1) * d], full[:, i * d:(i + 1) * d],
                               rtol=1e-6, atol=1e-6)
  with pytest.raises(accounting.ConversionError, match='thirds'):
    accounting.in_proj_part(0, True)(np.zeros((7, 4)))

  bg = rng.standard_normal((1, 8)).astype(np.float32)
  np.testing.assert_array_equal(accounting.squeeze_row(bg), bg[0])
  with pytest.raises(accounting.ConversionError, match=r'\[1, D\]'):
    accounting.squeeze_row(np.zeros((2, 8)))

  # The name mapping in one place: a few representative keys.
  targets = zegformer_keys.official_to_flax(
      'sem_seg_head.predictor.transformer.decoder.layers.3.multihead_attn.in_proj_weight',
      (768, 256))
  assert targets == [
      ('params', ('transformer', 'layers_3', 'multihead_attn', n, 'kernel'), (256, 256))
      for n in ('query', 'key', 'value')]
  assert zegformer_keys.official_to_flax('backbone.res3.0.shortcut.norm.running_var', (512,)) == [
      ('frozen', ('backbone', 'res3_0', 'shortcut', 'norm', 'var'), (512,))]
  assert zegformer_keys.official_to_flax('sem_seg_head.predictor.bg_feature', (1, 512)) == [
      ('params', ('no_object_embedding',), (512,))]
  assert zegformer_keys.official_to_flax('criterion.empty_weight', (157,)) == []
  assert resnet_keys.torchvision_to_d2('layer3.5.downsample.1.running_mean') == (
      'res4.5.shortcut.norm.running_mean')
  assert resnet_keys.torchvision_to_d2('bn1.weight') == 'stem.conv1.norm.weight'
  assert resnet_keys.torchvision_to_d2('layer1.0.bn3.bias') == 'res2.0.conv3.norm.bias'


# =============================================================================================
# Full-size key accounting (shapes only).


def _reference_keys(name):
  path = os.path.join(REFERENCE, f'zegformer_{name}_state_dict_keys.json')
  if not os.path.isfile(path):  # ../shared is beside the checkout only in the workspace
    pytest.skip(f'{os.path.normpath(path)} is absent')
  with open(path) as f:
    keys = json.load(f)['keys']
  # criterion.empty_weight's size depends on the dataset (documented as text in the file).
  return {e['key']: tuple(157 if isinstance(s, str) else s for s in e['shape']) for e in keys}


def _placeholders(shapes):
  return {k: np.broadcast_to(np.zeros((), np.float32), s) for k, s in shapes.items()}


def test_full_size_official_keys_account_exactly():
  """R-50 and R-101 official key lists convert onto every variable, nothing left over; an
  R-101 checkpoint into an R-50 config and a wrong width are errors naming keys/shapes."""
  shapes = {}
  for name, module in (('R50', coco_stuff_r50), ('R101', coco_stuff_r101)):
    shapes[name] = accounting.model_shapes(module.get_config().model)
    conv = zegformer_keys.convert_zegformer_format(
        'zegformer', _placeholders(_reference_keys(name)), shapes[name])
    assert conv.unused == conv.missing == conv.mismatched == []
    assert set(conv.skipped) == {'criterion.empty_weight', 'sem_seg_head.predictor.logit_scale'}
    assert set(conv.variables) == set(shapes[name])
    assert {k: tuple(v.shape) for k, v in conv.variables.items()} == shapes[name]

  conv = zegformer_keys.convert_zegformer_format(
      'zegformer', _placeholders(_reference_keys('R101')), shapes['R50'])
  with pytest.raises(accounting.ConversionError,
                     match=r'R101\.pth: 255 source keys are not used: backbone\.res4\.6\.conv1'
                     r'.*another depth, e\.g\. R-101 weights for an R-50 config'):
    accounting.check_conversion(conv, (), 'R101.pth')
  ignored, absent = accounting.check_conversion(conv, ['backbone.res4.*'], 'R101.pth')
  assert len(ignored) == 255 and absent == []

  narrow = coco_stuff_r50.get_config().model
  narrow.unlock()
  narrow.embed_dim = 256
  conv = zegformer_keys.convert_zegformer_format(
      'zegformer', _placeholders(_reference_keys('R50')), accounting.model_shapes(narrow))
  with pytest.raises(accounting.ConversionError, match=re.escape(
      'R50.pth: sem_seg_head.predictor.bg_feature -> params/no_object_embedding has shape '
      '(512,) but the model wants (256,) (and 2 more: params/semantic_proj/kernel, '
      'params/semantic_proj/bias); is the checkpoint for another model size?')):
    accounting.check_conversion(conv, (), 'R50.pth')


# =============================================================================================
# torch_pickle: formats, dtypes, strides, safety.


def _ml_bf16(x):
  import ml_dtypes
  return np.asarray(x, ml_dtypes.bfloat16)


def test_torch_zip_and_legacy_roundtrip(tmp_path):
  rng = np.random.default_rng(1)
  base = rng.standard_normal(36).astype(np.float32)
  sd = collections.OrderedDict(
      f32=rng.standard_normal((3, 4)).astype(np.float32),
      f16=rng.standard_normal((2, 5)).astype(np.float16),
      bf16=_ml_bf16(rng.standard_normal(7)),
      i64=np.arange(9, dtype=np.int64).reshape(3, 3),
      scalar=np.asarray(2.5, np.float32),
      empty=np.zeros((0, 3), np.float32),
      # Views of one shared storage: offset, transposed (non-contiguous) strides.
      rows=TensorView(base, 6, (2, 6), (6, 1)),
      transposed=TensorView(base, 0, (6, 6), (1, 6)),
      column=TensorView(base, 2, (6,), (6,)))
  want = {'rows': base.reshape(6, 6)[1:3], 'transposed': base.reshape(6, 6).T,
          'column': base.reshape(6, 6)[:, 2]}
  obj = {'model': sd, 'iteration': 7, 'note': ('a', 1.5, None, True)}
  write_torch_zip(tmp_path / 'zip.pth', obj)
  write_legacy_torch(tmp_path / 'legacy.pth', obj)
  for name in ('zip.pth', 'legacy.pth'):
    got = torch_pickle.load(str(tmp_path / name))
    assert got['iteration'] == 7 and got['note'] == ('a', 1.5, None, True)
    tensors, where = torch_pickle.tensor_dict(got)
    assert where == "['model']"
    for key, value in sd.items():
      expect = want.get(key, value)
      assert tensors[key].dtype == np.asarray(expect).dtype, (name, key)
      np.testing.assert_array_equal(np.asarray(tensors[key], np.float64),
                                    np.asarray(expect, np.float64), err_msg=f'{name}:{key}')
  # A view reaching past its storage is malformed, not silently clipped.
  write_torch_zip(tmp_path / 'bad.pth', {'x': TensorView(base, 30, (2, 6), (6, 1))})
  with pytest.raises(torch_pickle.TorchFileError, match='exceeds its storage'):
    torch_pickle.load(str(tmp_path / 'bad.pth'))


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_plain_numpy_pickles(tmp_path, protocol):
  """detectron2 .pkl files: numpy's own pickling (protocol 2 uses _codecs.encode)."""
  rng = np.random.default_rng(2)
  model = {'stem.conv1.weight': rng.standard_normal((4, 3, 7, 7)).astype(np.float32),
           'res2.0.conv1.norm.running_var': rng.uniform(size=4)}
  with open(tmp_path / 'm.pkl', 'wb') as f:
    pickle.dump({'model': model, '__author__': 'torchvision', 'matching_heuristics': True},
                f, protocol=protocol)
  got = torch_pickle.load(str(tmp_path / 'm.pkl'))
  assert got['__author__'] == 'torchvision'
  for k, v in model.items():
    np.testing.assert_array_equal(got['model'][k], v)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


class _EvilEval:
  def __reduce__(self):
    return eval, ("__import__('os').getcwd()",)


def test_malicious_pickles_are_refused(tmp_path):
  marker = tmp_path / 'pwned'
  evil = _Evil(marker)
  cases = {}
  with open(tmp_path / 'plain.pkl', 'wb') as f:
    pickle.dump({'model': {'w': np.zeros(2)}, 'x': evil}, f)
  cases['plain.pkl'] = os.system.__module__ + '.system'
  with open(tmp_path / 'eval.pkl', 'wb') as f:
    pickle.dump(_EvilEval(), f)
  cases['eval.pkl'] = 'builtins.eval'
  # Inside the torch zip layout: data.pkl of a real-looking checkpoint plus the payload.
  with zipfile.ZipFile(tmp_path / 'evil2.pth', 'w') as zf:
    zf.writestr('archive/data.pkl', pickle.dumps({'model': {}, 'x': evil}, protocol=2))
    zf.writestr('archive/version', '3\n')
  cases['evil2.pth'] = os.system.__module__ + '.system'
  # The payload as the "storage type" of a persistent id.
  class EvilPid(TorchPickler):
    def persistent_id(self, obj):
      if isinstance(obj, _StorageRef):
        return ('storage', _Global(os.system.__module__, 'system'), 'touch ' + str(marker),
                'cpu', 2)
      return None

  import io
  buf = io.BytesIO()
  EvilPid(buf, {}).dump({'model': {'w': np.zeros(2, np.float32)}})
  with zipfile.ZipFile(tmp_path / 'evil3.pth', 'w') as zf:
    zf.writestr('archive/data.pkl', buf.getvalue())
    zf.writestr('archive/data/0', np.zeros(2, np.float32).tobytes())
  cases['evil3.pth'] = os.system.__module__ + '.system'
  # __torch__ classes only resolve inside a TorchScript archive (with code/).
  write_torch_zip(tmp_path / 'script_outside.pth',
                  script_tree({'w': np.zeros(2, np.float32)}))
  cases['script_outside.pth'] = '__torch__.model.CLIP'
  # Legacy stream: a valid header, the payload as the object.
  with open(tmp_path / 'legacy_evil.pth', 'wb') as f:
    for header in (torch_pickle.LEGACY_MAGIC_NUMBER, torch_pickle.LEGACY_PROTOCOL_VERSION, {}):
      pickle.dump(header, f, protocol=2)
    pickle.dump(evil, f, protocol=2)
  cases['legacy_evil.pth'] = os.system.__module__ + '.system'

  for name, culprit in cases.items():
    with pytest.raises(torch_pickle.UnsafePickleError) as e:
      torch_pickle.load(str(tmp_path / name))
    assert culprit in str(e.value) and name in str(e.value), (name, str(e.value))
    # ... and the CLI path says the same, without a traceback.
  assert not marker.exists()
  with pytest.raises(torch_pickle.UnsafePickleError):
    accounting.read_tensors(str(tmp_path / 'evil2.pth'))
  assert not marker.exists()
  # Control: the payload is live; the standard unpickler does run it.
  control = tmp_path / 'control'
  pickle.loads(pickle.dumps(_Evil(control)))
  assert control.exists()


def test_torchscript_archive_attributes(tmp_path, clip_state):
  """TorchScript module objects (__torch__.* + BUILD state) -> dotted tensor names."""
  write_torch_zip(tmp_path / 'ViT.pt', script_tree(clip_state, extra_attrs={'ctx': 16}),
                  archive='ViT', extra_files=[('code/__torch__/model.py', 'class CLIP: ...'),
                                              ('constants.pkl', b'\x80\x02).')])
  assert torch_pickle.is_torchscript(str(tmp_path / 'ViT.pt'))
  obj = torch_pickle.load(str(tmp_path / 'ViT.pt'))
  assert isinstance(obj, torch_pickle.ScriptObject) and obj.qualname == '__torch__.model.CLIP'
  tensors, _ = torch_pickle.tensor_dict(obj)
  assert set(tensors) == set(clip_state)
  for k, v in clip_state.items():
    assert tensors[k].dtype == np.float16
    np.testing.assert_array_equal(tensors[k], v)


# =============================================================================================
# Backbone formats.


def _tiny_backbone_state(tiny):
  _, sd = tiny
  d2 = {k[len('backbone.'):]: v for k, v in sd.items() if k.startswith('backbone.')}
  d2['stem.fc.weight'] = np.zeros((10, 256), np.float32)   # as convert-torchvision-to-d2.py
  d2['stem.fc.bias'] = np.zeros((10,), np.float32)
  return d2


def _to_torchvision(d2):
  """detectron2 names back to torchvision's (the inverse of convert-torchvision-to-d2.py)."""
  out = {}
  for key, value in d2.items():
    k = key.replace('stem.fc', 'fc').replace('stem.conv1.norm', 'bn1').replace('stem.', '')
    m = re.match(r'res(\d)\.(\d+)\.(.*)$', k)
    if m:
      rest = re.sub(r'conv(\d)\.norm', r'bn\1', m.group(3))
      rest = rest.replace('shortcut.norm', 'downsample.1').replace('shortcut', 'downsample.0')
      k = f'layer{int(m.group(1)) - 1}.{m.group(2)}.{rest}'
    out[k] = value
    if k.endswith('running_var'):
      out[k.replace('running_var', 'num_batches_tracked')] = np.asarray(1000, np.int64)
  return out


def test_d2_resnet_parity_and_backbone_only_checkpoint(tmp_path, tiny):
  cfg, _ = tiny
  d2 = _tiny_backbone_state(tiny)
  with open(tmp_path / 'R-tiny.pkl', 'wb') as f:
    pickle.dump({'model': d2, '__author__': 'torchvision', 'matching_heuristics': True}, f)
  meta = convert.convert('d2-resnet', str(tmp_path / 'R-tiny.pkl'), str(tmp_path / 'out'),
                         model_config=cfg)
  assert meta['covers'] == ['params/backbone', 'frozen/backbone'] and meta['absent'] == []
  assert set(meta['skipped']) == {'stem.fc.weight', 'stem.fc.bias'}
  assert '__author__: torchvision' in meta['notes']

  _, abstract = _abstract_variables(cfg)
  init = _filled(abstract, 7.0)
  params, frozen = store.load_params(str(tmp_path / 'out'), init['params'], init['frozen'])
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(init['params'])
  # Outside the backbone: the given initial values, untouched.
  for name in ('pixel_decoder', 'transformer', 'query_embed', 'no_object_embedding'):
    for leaf in jax.tree_util.tree_leaves(params[name]):
      np.testing.assert_array_equal(leaf, 7.0)
  np.testing.assert_array_equal(params['backbone']['res3_1']['conv2']['kernel'],
                                d2['res3.1.conv2.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(frozen['backbone']['res2_0']['shortcut']['norm']['var'],
                                d2['res2.0.shortcut.norm.running_var'])

  # Forward: res2..res5 against numpy on the source arrays (NCHW, OIHW).
  net = resnet.ResNet(tuple(cfg.backbone.block_counts), cfg.backbone.stem_width, True)
  x = np.random.default_rng(5).standard_normal((2, 3, 64, 64)).astype(np.float32)
  got = jax.jit(net.apply)({'params': params['backbone'], 'frozen': frozen['backbone']},
                           jnp.asarray(x.transpose(0, 2, 3, 1)))
  want = np_resnet(d2, x.astype(np.float64), cfg.backbone.block_counts)
  for level in ('res2', 'res3', 'res4', 'res5'):
    _report(f'd2-resnet {level}', np.asarray(got[level]).transpose(0, 3, 1, 2), want[level])


def test_torchvision_resnet_zip_npz_safetensors(tmp_path, tiny):
  """torchvision names (conv1/bn1/layerK/downsample, fc, num_batches_tracked) in three
  containers give exactly the d2-resnet variables."""
  from safetensors.numpy import save_file
  cfg, _ = tiny
  d2 = _tiny_backbone_state(tiny)
  tv = _to_torchvision(d2)
  assert 'layer1.0.downsample.1.running_mean' in tv and 'bn1.weight' in tv
  write_torch_zip(tmp_path / 'resnet.pth', collections.OrderedDict(tv))
  np.savez(tmp_path / 'resnet.npz', **tv)
  save_file({k: np.ascontiguousarray(v) for k, v in tv.items()},
            str(tmp_path / 'resnet.safetensors'))
  shapes = accounting.model_shapes(cfg)
  reference = zegformer_keys.convert_zegformer_format('d2-resnet', d2, shapes)
  for name in ('resnet.pth', 'resnet.npz', 'resnet.safetensors'):
    tensors, _ = accounting.read_tensors(str(tmp_path / name))
    conv = zegformer_keys.convert_zegformer_format('torchvision-resnet', tensors, shapes)
    assert accounting.check_conversion(conv) == ([], [])
    assert set(conv.variables) == set(reference.variables)
    for k, v in reference.variables.items():
      np.testing.assert_array_equal(conv.variables[k], v, err_msg=f'{name}:{k}')
    assert sum(r.startswith('BatchNorm') for r in conv.skipped.values()) == sum(
        k.endswith('running_var') for k in tv)
    assert conv.skipped['fc.weight'].startswith('ImageNet classifier')


def test_caffe2_msra_pickle_is_refused(tmp_path):
  with open(tmp_path / 'R-101.pkl', 'wb') as f:
    pickle.dump({'blobs': {'res2_0_branch2a_w': np.zeros((64, 64, 1, 1), np.float32)}}, f)
  with pytest.raises(accounting.ConversionError, match='Caffe2/Detectron1.*BGR'):
    accounting.read_tensors(str(tmp_path / 'R-101.pkl'))


def test_key_accounting_unknown_missing_and_allow_missing(tmp_path, tiny):
  cfg, _ = tiny
  d2 = dict(_tiny_backbone_state(tiny))
  d2['res2.0.conv4.weight'] = np.zeros((3, 3, 1, 1), np.float32)      # unknown
  del d2['res3.1.conv2.norm.running_mean']                            # missing
  with open(tmp_path / 'x.pkl', 'wb') as f:
    pickle.dump({'model': d2}, f)
  with pytest.raises(accounting.ConversionError) as e:
    convert.convert('d2-resnet', str(tmp_path / 'x.pkl'), str(tmp_path / 'out'),
                    model_config=cfg)
  msg = str(e.value)
  assert 'x.pkl' in msg and 'res2.0.conv4.weight' in msg
  assert 'frozen/backbone/res3_1/conv2/norm/mean' in msg and '--allow_missing' in msg
  assert not (tmp_path / 'out').exists()

  meta = convert.convert(
      'd2-resnet', str(tmp_path / 'x.pkl'), str(tmp_path / 'out'), model_config=cfg,
      allow_missing=['res2.0.conv4.*', 'frozen/backbone/res3_1/conv2/norm/mean'])
  assert meta['ignored'] == ['res2.0.conv4.weight']
  assert meta['absent'] == ['frozen/backbone/res3_1/conv2/norm/mean']
  # Given jax arrays replicated over the (8 simulated) devices, as train.py holds them:
  # loaded leaves come back with the same sharding, absent ones are the given arrays.
  _, abstract = _abstract_variables(cfg)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  init = jax.device_put(_filled(abstract, 3.0), replicated)
  params, frozen = store.load_params(str(tmp_path / 'out'), init['params'], init['frozen'])
  kept = frozen['backbone']['res3_1']['conv2']['norm']['mean']
  assert kept is init['frozen']['backbone']['res3_1']['conv2']['norm']['mean']
  loaded = params['backbone']['res3_1']['conv2']['kernel']
  assert loaded.sharding == replicated and len(loaded.sharding.device_set) == len(jax.devices())
  np.testing.assert_array_equal(loaded, d2['res3.1.conv2.weight'].transpose(2, 3, 1, 0))

  # Without the 'absent' entry the same gap is an error naming the path.
  meta_file = tmp_path / 'out' / store.META_NAME
  meta = json.loads(meta_file.read_text())
  meta['absent'] = []
  meta_file.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match='lacks frozen/backbone/res3_1/conv2/norm/mean'):
    store.load_params(str(tmp_path / 'out'), init['params'], init['frozen'])


def test_load_params_rejects_other_model_sizes(tmp_path, tiny):
  """Converted by name only, then loaded into models of another size."""
  cfg, _ = tiny
  with open(tmp_path / 'r.pkl', 'wb') as f:
    pickle.dump({'model': _tiny_backbone_state(tiny)}, f)
  meta = convert.convert('d2-resnet', str(tmp_path / 'r.pkl'), str(tmp_path / 'out'))
  assert any('no --config' in n for n in meta['notes'])

  wide = tiny_model_config()
  wide.backbone.stem_width = 16
  _, abstract = _abstract_variables(wide)
  with pytest.raises(ValueError, match=re.escape(
      'params/backbone/res2_0/conv1/kernel has shape (1, 1, 8, 8) in the checkpoint but the '
      'model wants (1, 1, 16, 16) (and 99 more)')):
    store.load_params(str(tmp_path / 'out'), abstract['params'], abstract['frozen'])

  shallow = tiny_model_config()
  shallow.backbone.block_counts = (1, 1, 1, 1)
  _, abstract = _abstract_variables(shallow)
  with pytest.raises(ValueError, match=r'the model has no variable frozen/backbone/res3_1/'):
    store.load_params(str(tmp_path / 'out'), abstract['params'], abstract['frozen'])


# =============================================================================================
# The official ZegFormer checkpoint (+ its embedded CLIP).


def test_zegformer_checkpoint_parity(tmp_path, tiny, clip_state, tokenizer_dir):
  """Official-layout tiny checkpoint (torch zip, with clip_model.* in fp16) -> DIR; the Flax
  forward equals a numpy forward on the source arrays: res2..res5, mask features, decoder
  outputs, masks and Eq. 1 logits."""
  from zegformer_jax.training import state as state_lib
  cfg, sd = tiny
  checkpoint = dict(sd)
  checkpoint.update({zegformer_keys.CLIP_PREFIX + k: v for k, v in clip_state.items()})
  write_torch_zip(tmp_path / 'zeg.pth', {'model': collections.OrderedDict(checkpoint),
                                         'iteration': 59999})
  meta = convert.convert('zegformer', str(tmp_path / 'zeg.pth'), str(tmp_path / 'imported'),
                         model_config=cfg, tokenizer_dir=tokenizer_dir[0],
                         clip_vision_heads=2)
  assert meta['covers'] == ['params', 'frozen'] and meta['absent'] == []
  assert meta['clip'] == 'clip'
  assert {'criterion.empty_weight', 'sem_seg_head.predictor.logit_scale'} <= set(meta['skipped'])
  assert os.path.isfile(tmp_path / 'imported' / 'clip' / 'flax_model.msgpack')
  assert os.path.isfile(tmp_path / 'imported' / 'clip' / 'vocab.json')

  model, abstract = _abstract_variables(cfg)
  state = state_lib.init_from(str(tmp_path / 'imported'),
                              {'step': 0, 'params': abstract['params'],
                               'frozen': abstract['frozen']})
  variables = {'params': state['params'], 'frozen': state['frozen']}
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(variables))
  np.testing.assert_array_equal(variables['params']['no_object_embedding'],
                                sd['sem_seg_head.predictor.bg_feature'][0])

  rng = np.random.default_rng(7)
  images = rng.standard_normal((2, 3, 64, 64)).astype(np.float32)
  text = rng.standard_normal((5, cfg.embed_dim))
  text = (text / np.linalg.norm(text, axis=-1, keepdims=True)).astype(np.float32)
  capture = lambda mdl, _: mdl.name in ('backbone', 'pixel_decoder', 'transformer')
  fwd = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False, capture_intermediates=capture,
                                            mutable=['intermediates']))
  out, inter = fwd(variables, jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(text))
  inter = inter['intermediates']
  want = np_zegformer(sd, images.astype(np.float64), text.astype(np.float64), cfg)

  feats = inter['backbone']['__call__'][0]
  for level in ('res2', 'res3', 'res4', 'res5'):
    _report(f'zegformer {level}', np.asarray(feats[level]).transpose(0, 3, 1, 2),
            want['features'][level])
  _report('zegformer mask_features',
          np.asarray(inter['pixel_decoder']['__call__'][0]).transpose(0, 3, 1, 2),
          want['mask_features'])
  _report('zegformer decoder outputs', inter['transformer']['__call__'][0],
          want['segment_embeddings'])
  _report('zegformer pred_masks', out['pred_masks'], want['pred_masks'])
  _report('zegformer semantic embeddings', out['semantic_embeddings'],
          want['semantic_embeddings'])
  _report('zegformer Eq.1 logits', out['pred_logits'], want['pred_logits'])

  # The embedded CLIP equals a stand-alone openai-clip conversion of the same tensors.
  from flax import serialization
  convert.convert('openai-clip', _write_clip_archive(tmp_path, clip_state),
                  str(tmp_path / 'clip_alone'), tokenizer_dir=tokenizer_dir[0],
                  clip_vision_heads=2)
  read = lambda p: serialization.msgpack_restore((p / 'flax_model.msgpack').read_bytes())
  a, b = read(tmp_path / 'imported' / 'clip'), read(tmp_path / 'clip_alone')
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert json.loads((tmp_path / 'imported' / 'clip' / 'config.json').read_text()) == \
      json.loads((tmp_path / 'clip_alone' / 'config.json').read_text())


def test_load_model_runs_a_converted_checkpoint(tmp_path, tiny):
  """store.load_model(config, DIR): the model of the config with the checkpoint's weights;
  its forward equals the numpy forward of the source arrays. A backbone-only DIR keeps the
  seed's initial values elsewhere."""
  cfg, sd = tiny
  write_torch_zip(tmp_path / 'zeg.pth', {'model': collections.OrderedDict(sd)})
  convert.convert('zegformer', str(tmp_path / 'zeg.pth'), str(tmp_path / 'imported'),
                  model_config=cfg)
  # An experiment config or its model sub-config, as the README shows.
  config = ml_collections.ConfigDict({'model': cfg.to_dict()})
  model, variables = store.load_model(config, str(tmp_path / 'imported'))
  assert isinstance(model, zegformer.ZegFormer) and set(variables) == {'params', 'frozen'}
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(variables))
  rng = np.random.default_rng(8)
  images = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
  text = rng.standard_normal((4, cfg.embed_dim))
  text = (text / np.linalg.norm(text, axis=-1, keepdims=True)).astype(np.float32)
  out = jax.jit(lambda v, x, t: model.apply(v, x, t, train=False))(
      variables, jnp.asarray(images.transpose(0, 2, 3, 1)), jnp.asarray(text))
  want = np_zegformer(sd, images.astype(np.float64), text.astype(np.float64), cfg)
  _report('load_model pred_masks', out['pred_masks'], want['pred_masks'])
  _report('load_model Eq.1 logits', out['pred_logits'], want['pred_logits'])

  # Backbone only: the backbone from the file, everything else the seed's initial values.
  d2 = _tiny_backbone_state(tiny)
  with open(tmp_path / 'R-tiny.pkl', 'wb') as f:
    pickle.dump({'model': d2}, f)
  convert.convert('d2-resnet', str(tmp_path / 'R-tiny.pkl'), str(tmp_path / 'backbone'),
                  model_config=cfg)
  _, partial = store.load_model(cfg, str(tmp_path / 'backbone'), seed=3)
  initial = zegformer.init_variables(zegformer.build_model(cfg), jax.random.key(3))
  np.testing.assert_array_equal(partial['params']['backbone']['stem']['conv1']['kernel'],
                                d2['stem.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(partial['frozen']['backbone']['res2_0']['conv1']['norm']['var'],
                                d2['res2.0.conv1.norm.running_var'])
  np.testing.assert_array_equal(partial['params']['transformer']['norm']['scale'],
                                initial['params']['transformer']['norm']['scale'])
  np.testing.assert_array_equal(partial['params']['no_object_embedding'],
                                initial['params']['no_object_embedding'])

  # Not a store, or a store of another model size: one error naming the directory.
  with pytest.raises(FileNotFoundError, match='no convert_meta.json'):
    store.load_model(cfg, str(tmp_path))
  other = ml_collections.ConfigDict(cfg.to_dict())
  other.decoder.hidden_dim = 48
  with pytest.raises(ValueError, match='imported: .* has shape .* was it converted for another'):
    store.load_model(other, str(tmp_path / 'imported'))


def _write_clip_archive(tmp_path, clip_state):
  """OpenAI's ViT archive layout: TorchScript objects, fp16, attn_mask attributes."""
  path = tmp_path / 'ViT-tiny.pt'
  if not path.exists():
    tensors = dict(clip_state)
    ctx = clip_state['positional_embedding'].shape[0]
    for i in range(2):
      tensors[f'transformer.resblocks.{i}.attn_mask'] = np.triu(
          np.full((ctx, ctx), -np.inf, np.float32), 1)
    write_torch_zip(path, script_tree(tensors, extra_attrs={'input_resolution': 32}),
                    archive='ViT-tiny', extra_files=[('code/__torch__/model.py', '#'),
                                                     ('constants.pkl', b'\x80\x02).')])
  return str(path)


# =============================================================================================
# OpenAI CLIP -> Hugging Face Flax CLIP.


def test_openai_clip_parity(tmp_path, clip_state, tokenizer_dir):
  """TorchScript-layout tiny CLIP (fp16) -> HF Flax directory -> load_clip; text and image
  features against numpy transformers computed from the OpenAI-layout arrays."""
  from zegformer_jax.modeling import clip
  out = tmp_path / 'hf_clip'
  meta = convert.convert('openai-clip', _write_clip_archive(tmp_path, clip_state), str(out),
                         tokenizer_dir=tokenizer_dir[0], clip_vision_heads=2)
  summary = meta['clip']
  assert summary['text'] == {'width': 128, 'layers': 2, 'heads': 2, 'context': 16,
                             'vocab': tokenizer_dir[1]}
  assert summary['vision'] == {'width': 64, 'layers': 2, 'heads': 2, 'image_size': 32,
                               'patch_size': 8}
  assert any('attn_mask' in k for k in summary['skipped'])
  model, tokenizer = clip.load_clip(str(out))

  prompts = ['a photo of a cat.', 'a dog in the scene', 'grass']
  got = clip.prompt_features(model, tokenizer, prompts)
  ids, _ = clip.tokenize(tokenizer, prompts, clip.context_length(model))
  want = np_clip_text(clip_state, ids.astype(np.int64), layers=2, heads=2)
  _report('openai-clip text features', got, want)

  images = np.random.default_rng(9).standard_normal((3, 32, 32, 3)).astype(np.float32)
  got = clip.image_embeddings(model, images)
  want = np_clip_image(clip_state, images.transpose(0, 3, 1, 2).astype(np.float64),
                       layers=2, heads=2)
  _report('openai-clip image features', got, want)
  np.testing.assert_allclose(float(clip.clip_logit_scale(model)), 1 / 0.07, rtol=1e-3)

  # An unknown key is an error naming it, unless allowed; a missing one too.
  bad = dict(clip_state)
  bad['visual.extra_bias'] = np.zeros(3, np.float16)
  del bad['ln_final.bias']
  with pytest.raises(accounting.ConversionError) as e:
    openai_clip.openai_clip_to_hf(bad, vision_heads=2, source='bad.pt')
  assert 'visual.extra_bias' in str(e.value) and 'bad.pt' in str(e.value)
  with pytest.raises(accounting.ConversionError, match='final_layer_norm/bias'):
    openai_clip.openai_clip_to_hf(bad, vision_heads=2, allow_missing=['visual.extra_bias'])


class _OpenAIBPE:
  """OpenAI CLIP's SimpleTokenizer (clip/simple_tokenizer.py), re-implemented as the oracle:
  vocabulary, merge ranks and byte-level BPE over `bpe_path` (ftfy's fix_text left out: the
  texts here are clean)."""

  def __init__(self, bpe_path):
    import gzip
    bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('\u00a1'), ord('\u00ac') + 1)) +
          list(range(ord('\u00ae'), ord('\u00ff') + 1)))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
      if b not in bs:
        bs.append(b)
        cs.append(2 ** 8 + n)
        n += 1
    self.byte_encoder = dict(zip(bs, [chr(c) for c in cs]))
    merges = gzip.open(bpe_path).read().decode('utf-8').split('\n')
    merges = merges[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges if m]   # (a tiny file ends with its newline)
    vocab = list(self.byte_encoder.values())
    vocab = vocab + [v + '</w>' for v in vocab]
    for merge in merges:
      vocab.append(''.join(merge))
    vocab.extend(['<|startoftext|>', '<|endoftext|>'])
    self.encoder = dict(zip(vocab, range(len(vocab))))
    self.bpe_ranks = dict(zip(merges, range(len(merges))))

  def bpe(self, token):
    word = tuple(token[:-1]) + (token[-1] + '</w>',)
    while len(word) > 1:
      pairs = {(a, b) for a, b in zip(word[:-1], word[1:])}
      bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float('inf')))
      if bigram not in self.bpe_ranks:
        break
      first, second = bigram
      new_word, i = [], 0
      while i < len(word):
        try:
          j = word.index(first, i)
        except ValueError:
          new_word.extend(word[i:])
          break
        new_word.extend(word[i:j])
        i = j
        if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
          new_word.append(first + second)
          i += 2
        else:
          new_word.append(word[i])
          i += 1
      word = tuple(new_word)
    return word

  def encode(self, text):
    import html
    import regex
    text = html.unescape(html.unescape(text)).strip()
    text = regex.sub(r'\s+', ' ', text).strip().lower()
    pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                        r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
    ids = []
    for token in regex.findall(pat, text):
      token = ''.join(self.byte_encoder[b] for b in token.encode('utf-8'))
      ids.extend(self.encoder[t] for t in self.bpe(token))
    return ([self.encoder['<|startoftext|>']] + ids + [self.encoder['<|endoftext|>']])


def _write_openai_bpe_file(path, texts):
  """A tiny bpe_simple_vocab_16e6.txt.gz: OpenAI's header line, then merges "a b"."""
  import gzip
  from zegformer_jax.modeling import clip
  _, merges = clip._train_bpe(texts)
  made, kept = set(), []
  for a, b in merges:   # OpenAI's vocabulary lists every merge's token: keep them distinct
    if a + b not in made:
      made.add(a + b)
      kept.append((a, b))
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n')
    f.writelines(f'{a} {b}\n' for a, b in kept)
  return kept


def test_openai_bpe_vocab_file_makes_the_tokenizer(tmp_path):
  """--bpe_vocab bpe_simple_vocab_16e6.txt.gz: vocab.json + merges.txt that CLIPTokenizerFast,
  loaded by load_clip, turns into the ids of OpenAI's own SimpleTokenizer."""
  from zegformer_jax.modeling import clip
  bpe = tmp_path / 'bpe_simple_vocab_16e6.txt.gz'
  merges = _write_openai_bpe_file(bpe, ['a photo of a cat', 'a red circle in the sand',
                                        "the sky's colour", 'photographs of cats'])
  oracle = _OpenAIBPE(str(bpe))
  vocab = len(oracle.encoder)
  assert vocab == 512 + len(merges) + 2
  state = random_clip_state(openai_clip_shapes(vocab), seed=4)
  out = tmp_path / 'hf_clip'
  meta = convert.convert('openai-clip', _write_clip_archive(tmp_path, state), str(out),
                         bpe_vocab=str(bpe), clip_vision_heads=2)
  assert meta['clip']['tokenizer_files'] == ['vocab.json', 'merges.txt']
  assert not any('no tokenizer' in n for n in meta['notes'])
  assert json.loads((out / 'vocab.json').read_text(encoding='utf-8')) == oracle.encoder
  config = json.loads((out / 'config.json').read_text())['text_config']
  assert (config['bos_token_id'], config['eos_token_id']) == (vocab - 2, vocab - 1)

  model, tokenizer = clip.load_clip(str(out))
  texts = ['a photo of a cat.', 'A  red circle, in the SAND!', "the sky's colour",
           'photographs of 2 cats', 'caf\u00e9 au lait', 'zebra']
  ids, mask = clip.tokenize(tokenizer, texts, clip.context_length(model))
  for row, text in enumerate(texts):
    want = oracle.encode(text)
    assert ids[row][mask[row] == 1].tolist() == want, text
  # Merged tokens are used (not only byte characters): 'photo</w>' is one token.
  assert oracle.encoder['photo</w>'] in ids[0]

  # Errors: a vocabulary of another size than the checkpoint's, not a merges file, both.
  other = tmp_path / 'other.txt.gz'
  _write_openai_bpe_file(other, ['a photo of a dog'])
  with pytest.raises(accounting.ConversionError, match='the BPE vocabulary has .* tokens but '
                     f'token_embedding has {vocab} rows'):
    convert.convert('openai-clip', _write_clip_archive(tmp_path, state), str(tmp_path / 'o2'),
                    bpe_vocab=str(other), clip_vision_heads=2)
  html_page = tmp_path / 'page.txt.gz'
  html_page.write_bytes(b'<!DOCTYPE html>\n<html><body>moved</body></html>\n')
  with pytest.raises(accounting.ConversionError, match='page.txt.gz is not a BPE merges file '
                     'like bpe_simple_vocab_16e6.txt.gz: it looks like an HTML page'):
    openai_clip.openai_bpe_vocab(str(html_page))
  text = tmp_path / 'notes.txt'
  text.write_text('header\nthese are three\n')
  with pytest.raises(accounting.ConversionError, match="line 2 is 'these are three', not a merge"):
    openai_clip.openai_bpe_vocab(str(text))
  with pytest.raises(ValueError, match='not both'):
    convert.convert('openai-clip', _write_clip_archive(tmp_path, state), str(tmp_path / 'o3'),
                    bpe_vocab=str(bpe), tokenizer_dir=str(out), clip_vision_heads=2)


# =============================================================================================
# The CLI, once, in a subprocess.


@pytest.mark.slow
def test_cli_subprocess_d2_resnet_into_shapesworld(tmp_path):
  """configs/shapesworld.py uses BasicBlocks: a detectron2 BasicBlock pickle for it."""
  cfg = shapesworld.get_config().model
  b = cfg.backbone
  d2 = random_state(resnet_shapes(b.block_counts, b.stem_width, bottleneck=False), seed=11)
  with open(tmp_path / 'R-18.pkl', 'wb') as f:
    pickle.dump({'model': d2, '__author__': 'torchvision', 'matching_heuristics': True}, f)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  cmd = [sys.executable, '-m', 'zegformer_jax.weights.convert', '--from', 'd2-resnet', '--input',
         str(tmp_path / 'R-18.pkl'), '--output', str(tmp_path / 'out'), '--config',
         os.path.join(REPO, 'configs', 'shapesworld.py')]
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert 'wrote' in run.stdout
  meta = json.loads((tmp_path / 'out' / store.META_NAME).read_text())
  assert meta['config'].endswith('shapesworld.py') and meta['covers'] == list(
      resnet_keys.BACKBONE_COVERS)

  _, abstract = _abstract_variables(cfg)
  params, frozen = store.load_params(str(tmp_path / 'out'), abstract['params'],
                                     abstract['frozen'])
  np.testing.assert_array_equal(params['backbone']['stem']['conv1']['kernel'],
                                d2['stem.conv1.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(frozen['backbone']['res5_0']['conv2']['norm']['scale'],
                                d2['res5.0.conv2.norm.weight'])
  # Not covered: handed back as given (here abstract shapes).
  assert isinstance(params['transformer']['norm']['scale'], jax.ShapeDtypeStruct)

  # Errors are one line on stderr, exit status 1: the output exists now.
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert run.returncode == 1 and run.stderr.startswith('error: ') and 'exists' in run.stderr
  assert run.stderr.count('\n') == 1


def _bad_checkpoints(tmp_path):
  """{file name: (contents, the error line the command prints)} of files that are not
  checkpoints or are cut short; every line names the file as the user gave it."""
  rng = np.random.default_rng(5)
  sd = {'stem.conv1.weight': rng.standard_normal((8, 3, 7, 7)).astype(np.float32),
        'res2.0.conv1.weight': rng.standard_normal((8, 8, 1, 1)).astype(np.float32)}
  write_torch_zip(tmp_path / 'full.pth', {'model': sd})
  write_legacy_torch(tmp_path / 'full_legacy.pth', {'model': sd})
  zipped = (tmp_path / 'full.pth').read_bytes()
  legacy = (tmp_path / 'full_legacy.pth').read_bytes()
  plain = pickle.dumps({'model': sd}, protocol=2)
  garbage = bytes([7]) + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes()
  html = (b'<!DOCTYPE html>\n<html lang="en"><head><title>Sign in</title></head>\n'
          b'<body><form action="/login">...</form></body></html>\n')
  redo = '(an interrupted download or copy? fetch the file again)'
  page = ('it looks like an HTML page (a web page saved instead of the file: a login, error '
          'or redirect page?)')
  # The legacy file ends with the raw bytes of its last storage, key '1' (TorchPickler
  # numbers storages in pickling order): 64 float32 values, of which 100 bytes are cut off.
  return {
      'garbage.pth': (garbage, 'error: garbage.pth is not a PyTorch checkpoint: it looks like '
                               'binary data of an unknown format'),
      'model.pth': (html, f'error: model.pth is not a PyTorch checkpoint: {page}'),
      'model.safetensors': (html, f'error: model.safetensors is not a safetensors file: {page}'),
      'lfs.pth': (b'version https://git-lfs.github.com/spec/v1\noid sha256:' + b'0' * 64 +
                  b'\nsize 102400\n',
                  'error: lfs.pth is not a PyTorch checkpoint: it looks like a Git LFS pointer '
                  '(the file itself was never fetched: run `git lfs pull`)'),
      'cut_zip.pth': (zipped[:len(zipped) // 2],
                      f'error: cut_zip.pth is truncated: a zip archive (the PyTorch checkpoint '
                      f'format) without its end, {len(zipped) // 2} bytes {redo}'),
      'cut_legacy.pth': (legacy[:-100], 'error: cut_legacy.pth is truncated: storage 1 has '
                                        f'156 of its 256 bytes {redo}'),
      'cut_plain.pkl': (plain[:200], 'error: cut_plain.pkl is truncated: its pickle data stops '
                                     f'early, at 200 bytes {redo}'),
      'empty.pth': (b'', f'error: empty.pth is empty (0 bytes), not a PyTorch checkpoint {redo}'),
  }


def test_cli_not_a_checkpoint_or_truncated_is_one_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop('XLA_FLAGS', None)
  for name, (data, line) in _bad_checkpoints(tmp_path).items():
    (tmp_path / name).write_bytes(data)
    # In-process: a ValueError with the message (the command prints it after 'error: ').
    with pytest.raises(ValueError) as e:
      accounting.read_tensors(str(tmp_path / name))
    assert f'error: {e.value}'.replace(str(tmp_path) + '/', '') == line, name
  for name in ('model.pth', 'cut_zip.pth', 'cut_legacy.pth', 'garbage.pth'):
    run = subprocess.run(
        [sys.executable, '-m', 'zegformer_jax.weights.convert', '--from', 'd2-resnet',
         '--input', name, '--output', 'out'], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120)
    assert run.returncode == 1, run.stderr
    assert run.stderr.splitlines() == [_bad_checkpoints(tmp_path)[name][1]], run.stderr
    assert not (tmp_path / 'out').exists()


# =============================================================================================
# Optional cross-checks against real torch files (skipped without torch).


def test_torch_files_cross_check(tmp_path):
  torch = pytest.importorskip('torch')
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 6, generator=g)
  sd = collections.OrderedDict(
      f32=torch.randn(3, 4, generator=g), t=torch.randn(4, 5, generator=g).t(),
      f16=torch.randn(2, 3, generator=g).half(), bf16=torch.randn(5, generator=g).bfloat16(),
      i64=torch.arange(7), rows=base[1:3], col=base[:, 2],
      param=torch.nn.Parameter(torch.randn(2, 2, generator=g)))
  torch.save({'model': sd}, tmp_path / 'zip.pth')
  torch.save({'model': sd}, tmp_path / 'legacy.pth', _use_new_zipfile_serialization=False)
  for name in ('zip.pth', 'legacy.pth'):
    tensors, _ = torch_pickle.tensor_dict(torch_pickle.load(str(tmp_path / name)))
    for k, v in sd.items():
      np.testing.assert_array_equal(np.asarray(tensors[k], np.float64),
                                    v.detach().double().numpy(), err_msg=f'{name}:{k}')

  class Block(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.attn = torch.nn.MultiheadAttention(8, 2)
      self.ln_1 = torch.nn.LayerNorm(8)

    def forward(self, x):
      return self.attn(self.ln_1(x), x, x, need_weights=False)[0]

  scripted = torch.jit.script(torch.nn.Sequential(Block(), Block()))
  torch.jit.save(scripted, str(tmp_path / 'ts.pt'))
  tensors, _ = torch_pickle.tensor_dict(torch_pickle.load(str(tmp_path / 'ts.pt')))
  want = scripted.state_dict()
  assert set(tensors) == set(want)
  for k, v in want.items():
    np.testing.assert_array_equal(tensors[k], v.numpy())


def test_numpy_reference_layers_match_torch():
  """The numpy oracles above agree with torch's own layers (PyTorch semantics)."""
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  rng = np.random.default_rng(12)
  x = rng.standard_normal((2, 4, 13, 11))
  w = rng.standard_normal((6, 4, 7, 7))
  b = rng.standard_normal(6)
  t = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  np.testing.assert_allclose(np_conv(x, w, 2, b), F.conv2d(t(x), t(w), t(b), 2, 3).numpy(),
                             rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(np_maxpool(x), F.max_pool2d(t(x), 3, 2, 1).numpy())
  gw, gb = rng.standard_normal(4), rng.standard_normal(4)
  np.testing.assert_allclose(np_group_norm(x, 2, gw, gb),
                             F.group_norm(t(x), 2, t(gw), t(gb), 1e-5).numpy(), atol=1e-10)
  np.testing.assert_allclose(np_nearest(x, (26, 22)),
                             F.interpolate(t(x), size=(26, 22), mode='nearest').numpy())
  np.testing.assert_allclose(np_layer_norm(x, 1.5, 0.2),
                             F.layer_norm(t(x), (11,), t(np.full(11, 1.5)),
                                          t(np.full(11, 0.2))).numpy(), atol=1e-10)
  mha = torch.nn.MultiheadAttention(8, 2, batch_first=True).double()
  sd = {k: v.detach().numpy() for k, v in mha.state_dict().items()}
  q, k = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 5, 8))
  mask = np.triu(np.full((3, 5), -np.inf), 3)
  want = mha(t(q), t(k), t(k), need_weights=False, attn_mask=t(mask))[0].detach().numpy()
  np.testing.assert_allclose(np_mha_packed(sd, '', q, k, k, 2, mask), want, atol=1e-10)


# =============================================================================================
# ZegCLIP: a tiny model written in its mmcv checkpoint layout (weights/zegclip.py), checked
# against a float64 numpy forward pass of that layout.


def tiny_zegclip_config():
  c = ml_collections.ConfigDict(shapesworld.get_config('zegclip').model.to_dict())
  z = c.zegclip
  z.input_resolution = 48          # a 6 x 6 position table, as ZegCLIP's 32 x 32 at 512 px
  z.num_prompts, z.prompt_depth = 3, 2
  z.num_layers, z.num_heads, z.ffn_dim = 2, 4, 64
  return c


def zegclip_state(cfg, num_classes=4, seed=0):
  """{key: array} in ZegCLIP's state-dict layout (the keys its mmcv checkpoints hold)."""
  z, e = cfg.zegclip, cfg.embed_dim
  d, layers = z.vision.hidden_size, z.vision.num_hidden_layers
  grid = z.input_resolution // z.vision.patch_size
  clip = random_clip_state(openai_clip_shapes(50, vision_width=d, vision_layers=layers,
                                              patch=z.vision.patch_size, grid=grid,
                                              embed=e), seed)
  rng = np.random.default_rng(seed + 1)
  r = lambda *shape, s=0.2: np.asarray(s * rng.standard_normal(shape), np.float32)
  sd = {'backbone.' + k[len('visual.'):]: v for k, v in clip.items() if k.startswith('visual.')}
  sd['backbone.prompt_embeddings'] = r(1, z.num_prompts, d)
  sd['backbone.deep_prompt_embeddings'] = r(z.prompt_depth - 1, z.num_prompts, d)
  sd.update({'backbone.prompt_proj.weight': r(d, d), 'backbone.prompt_proj.bias': r(d),
             'backbone.prompt_norm.weight': 1 + r(d), 'backbone.prompt_norm.bias': r(d)})
  sd.update({f'text_encoder.{k}': v for k, v in clip.items() if not k.startswith('visual.')})
  for i in range(z.num_layers):
    p = f'decode_head.decoder_1.layers.{i}.'
    sd.update({p + 'self_attn.in_proj_weight': r(3 * e, e),
               p + 'self_attn.in_proj_bias': r(3 * e), p + 'self_attn.out_proj.weight': r(e, e),
               p + 'self_attn.out_proj.bias': r(e),
               p + 'linear1.weight': r(z.ffn_dim, e), p + 'linear1.bias': r(z.ffn_dim),
               p + 'linear2.weight': r(e, z.ffn_dim), p + 'linear2.bias': r(e)})
    for n in ('norm1', 'norm2', 'norm3'):
      sd.update({f'{p}{n}.weight': 1 + r(e), f'{p}{n}.bias': r(e)})
    for n in 'qkvp':
      name = 'proj' if n == 'p' else n
      sd.update({f'{p}multihead_attn.{name}.weight': r(e, e),
                 f'{p}multihead_attn.{name}.bias': r(e)})
  sd.update({'decode_head.q_proj.weight': r(e, 2 * e), 'decode_head.q_proj.bias': r(e)})
  sd['decode_head.loss_decode.criterion.empty_weight'] = np.r_[np.ones(num_classes), 0.1]
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def np_zegclip(sd, images_nchw, text, cfg):
  """ZegCLIP's forward pass (img_encoder.py, decode_seg.py) in float64 from its own layout:
  mask logits [B, g, g, C]."""
  z = cfg.zegclip
  f = lambda k: np.asarray(sd[k], np.float64)
  w = f('backbone.conv1.weight')
  width, _, p, _ = w.shape
  b, c, s, _ = images_nchw.shape
  g = s // p
  x = np.einsum('bcipjq,wcpq->bijw', images_nchw.reshape(b, c, g, p, g, p), w)
  x = x.reshape(b, g * g, width)
  cls = f('backbone.class_embedding')
  pos = f('backbone.positional_embedding').copy()
  pos[0] += cls                                            # its cls_pos: the class embedding again
  x = np.concatenate([np.broadcast_to(cls, (b, 1, width)), x], 1) + pos
  x = np_layer_norm(x, f('backbone.ln_pre.weight'), f('backbone.ln_pre.bias'))
  prompts = np.concatenate([f('backbone.prompt_embeddings'),
                            f('backbone.deep_prompt_embeddings')], 0)
  prompts = prompts @ f('backbone.prompt_proj.weight').T + f('backbone.prompt_proj.bias')
  for i in range(z.vision.num_hidden_layers):
    x = np.concatenate([x[:, :1], np.broadcast_to(prompts[i], (b,) + prompts[i].shape),
                        x[:, -g * g:]], 1)
    pre = f'backbone.transformer.resblocks.{i}.'
    block = {'blk.0.' + k[len(pre):]: v for k, v in sd.items() if k.startswith(pre)}
    x = np_clip_transformer(block, 'blk.', x, 1, z.vision.num_attention_heads)
  mu = x.mean(-1, keepdims=True)
  x = ((x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
       * f('backbone.prompt_norm.weight') + f('backbone.prompt_norm.bias'))
  x = np_layer_norm(x, f('backbone.ln_post.weight'), f('backbone.ln_post.bias'))
  x = x @ f('backbone.proj')
  x /= np.linalg.norm(x, axis=-1, keepdims=True)
  glob, tokens = x[:, 0], x[:, -g * g:]
  q = np.concatenate([text[None] * glob[:, None], np.broadcast_to(text, (b,) + text.shape)], -1)
  q = q @ f('decode_head.q_proj.weight').T + f('decode_head.q_proj.bias')
  heads, e = z.num_heads, q.shape[-1]
  hd = e // heads
  for i in range(z.num_layers):
    pre = f'decode_head.decoder_1.layers.{i}.'
    lin = lambda t, n: t @ f(pre + n + '.weight').T + f(pre + n + '.bias')
    split = lambda t: t.reshape(b, t.shape[1], heads, hd).transpose(0, 2, 1, 3)
    logits = (split(lin(q, 'multihead_attn.q')) @ split(lin(tokens, 'multihead_attn.k'))
              .transpose(0, 1, 3, 2)) / math.sqrt(hd)                     # [B, h, C, T]
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    out = (att @ split(lin(tokens, 'multihead_attn.v'))).transpose(0, 2, 1, 3).reshape(q.shape)
    q = np_layer_norm(q + lin(out, 'multihead_attn.proj'), f(pre + 'norm2.weight'),
                      f(pre + 'norm2.bias'))
    q = np_layer_norm(q + lin(np.maximum(lin(q, 'linear1'), 0), 'linear2'),
                      f(pre + 'norm3.weight'), f(pre + 'norm3.bias'))
  return logits.mean(1).transpose(0, 2, 1).reshape(b, g, g, -1)


def test_zegclip_checkpoint_imports_and_matches_its_forward_pass(tmp_path):
  """A tiny ZegCLIP in its mmcv checkpoint ({'meta', 'state_dict', 'optimizer'}, torch zip
  written without torch): every key converted or skipped with its reason, every variable
  covered, and the imported model's mask logits equal the float64 numpy forward pass of
  the checkpoint's own layout."""
  from zegformer_jax.modeling import methods
  cfg = tiny_zegclip_config()
  sd = zegclip_state(cfg)
  ckpt = {'meta': {'mmseg_version': '0.20.2', 'CLASSES': ('a', 'b', 'c', 'd'), 'iter': 20000},
          'state_dict': collections.OrderedDict(sd),
          'optimizer': {'state': {}, 'param_groups': [{'lr': 2e-5, 'params': [0, 1]}]}}
  write_torch_zip(tmp_path / 'iter_20000.pth', ckpt)
  meta = convert.convert('zegclip', str(tmp_path / 'iter_20000.pth'), str(tmp_path / 'out'),
                         model_config=cfg)
  skipped = meta['skipped']
  assert sum(k.startswith('text_encoder.') for k in skipped) == sum(
      k.startswith('text_encoder.') for k in sd)
  assert sorted(k for k in skipped if k.startswith('decode_head.')) == sorted(
      [f'decode_head.decoder_1.layers.{i}.{n}' for i in range(2)
       for n in ('self_attn.in_proj_weight', 'self_attn.in_proj_bias',
                 'self_attn.out_proj.weight', 'self_attn.out_proj.bias', 'norm1.weight',
                 'norm1.bias')] + ['decode_head.loss_decode.criterion.empty_weight'])
  assert meta['ignored'] == [] and meta['absent'] == []

  model = methods.build_model(cfg)
  abstract = methods.variable_shapes(cfg, image_hw=(48, 48), num_classes=3)
  params, frozen = store.load_params(str(tmp_path / 'out'), abstract['params'],
                                     abstract['frozen'])
  np.testing.assert_array_equal(
      params['image_encoder']['deep_prompts'],
      np.concatenate([sd['backbone.prompt_embeddings'], sd['backbone.deep_prompt_embeddings']]))
  rng = np.random.default_rng(3)
  images = rng.standard_normal((2, 48, 48, 3)).astype(np.float32)
  text = rng.standard_normal((3, cfg.embed_dim))
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  got = model.apply({'params': params, 'frozen': frozen}, jnp.asarray(images),
                    jnp.asarray(text, jnp.float32))['mask_logits']
  want = np_zegclip(sd, images.transpose(0, 3, 1, 2).astype(np.float64), text, cfg)
  assert got.shape == want.shape == (2, 6, 6, 3)
  _report('zegclip mask logits', np.asarray(got), want)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


def test_zegclip_import_names_a_missing_prompt_table_and_a_zegformer_config(tmp_path):
  cfg = tiny_zegclip_config()
  sd = zegclip_state(cfg)
  del sd['backbone.prompt_embeddings']
  write_torch_zip(tmp_path / 'bad.pth', {'state_dict': sd})
  with pytest.raises(accounting.ConversionError,
                     match='backbone.deep_prompt_embeddings without backbone.prompt_embeddings'):
    convert.convert('zegclip', str(tmp_path / 'bad.pth'), str(tmp_path / 'out'),
                    model_config=cfg)
  with pytest.raises(ValueError, match="--from zegclip with a config of model.name 'zegformer'"):
    convert.convert('zegclip', str(tmp_path / 'bad.pth'), str(tmp_path / 'out2'),
                    model_config=tiny_model_config())
