"""ResNet backbone keys: detectron2 names -> Flax variables, torchvision names -> detectron2.

Used for `--from d2-resnet` and `--from torchvision-resnet` (backbone-only imports) and for
the `backbone.` keys of official ZegFormer checkpoints.
"""
import re
from typing import List, Optional

from zegformer_jax.weights.accounting import NORM_LEAVES, Target, identity, oihw_to_hwio

# What a backbone-only import is responsible for (load_params keeps the rest).
BACKBONE_COVERS = ('params/backbone', 'frozen/backbone')

_RESNET_KEY = re.compile(r'^(?:(stem)\.(conv1)|res([2-5])\.(\d+)\.(conv[1-3]|shortcut))\.(.+)$')
_TORCHVISION_BLOCK = re.compile(
    r'^layer([1-4])\.(\d+)\.(?:(conv[1-3])\.weight|bn([1-3])\.(.+)|downsample\.0\.weight|'
    r'downsample\.1\.(.+))$')


def backbone_targets(rest: str) -> Optional[List[Target]]:
  """detectron2 ResNet key (without `backbone.`) -> targets under ('backbone', ...).

  stem.conv1 -> stem/conv1, resN.i.convJ / shortcut -> resN_i/convJ / shortcut; conv
  weights become HWIO kernels, `.norm.*` the FrozenBN statistics in 'frozen'.
  """
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
  if leaf.startswith('norm.') and leaf[5:] in NORM_LEAVES:
    return [('frozen', ('backbone',) + module + ('norm', NORM_LEAVES[leaf[5:]]), identity)]
  return None


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
