"""Parameter counts of a ZegFormer config, from shapes only (jax.eval_shape: no compile).

Two conventions are reported:
- `total params` (the one we quote): trainable parameters plus the FrozenBN affine
  scale and bias of the backbone, i.e. every parameter-like tensor of the official
  state_dict except running statistics, the fixed logit_scale and criterion.empty_weight.
  R-50: 41,401,152; R-101: 60,393,280.
- trainable only (FrozenBN scale and bias excluded): R-50: 41,348,032; R-101: 60,287,936.
FrozenBN running mean and variance are never counted.

ZegCLIP's frozen variables are CLIP's image tower (weights, not statistics): its second
column counts all of them, and `trainable only` is its learnable count (ZegCLIP's README:
13.8M on VOC, which also counts 3.15M of decoder self-attention that is never called;
tests/modeling/test_zegclip.py).
"""
from typing import Tuple

import jax
import ml_collections
import numpy as np

from zegformer_jax.modeling import methods


def _count(tree) -> int:
  return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def parameter_summary(model_config: ml_collections.ConfigDict,
                      image_hw: Tuple[int, int] = (64, 64)) -> Tuple[str, int, int]:
  """Per-top-level-module parameter table.

  Args:
    model_config: the `model` sub-config.
    image_hw: dummy input size for shape tracing (multiples of 32; counts do not depend
      on it).

  Returns:
    (table, total including FrozenBN scale+bias, total trainable only). The table's
    penultimate line is `total params: N` (N with FrozenBN scale+bias), the last line gives
    the trainable-only count.
  """
  shapes = methods.variable_shapes(model_config, image_hw)
  params, frozen = shapes['params'], shapes.get('frozen', {})
  frozen_clip = methods.method_name(model_config) == 'zegclip'
  names = list(params) + [k for k in frozen if k not in params]
  rows = []
  for name in names:
    trainable = _count(params.get(name, {}))
    affine = _count([leaf for path, leaf in
                     jax.tree_util.tree_leaves_with_path(frozen.get(name, {}))
                     if frozen_clip or getattr(path[-1], 'key', None) in ('scale', 'bias')])
    rows.append((name, trainable, affine))
  total_trainable = sum(r[1] for r in rows)
  total_affine = sum(r[2] for r in rows)
  width = max(len('module'), *(len(r[0]) for r in rows))
  second = 'frozen (CLIP)' if frozen_clip else 'FrozenBN affine'
  lines = [f'{"module":<{width}}  {"trainable":>12}  {second:>15}  {"total":>12}']
  for name, trainable, affine in rows:
    lines.append(f'{name:<{width}}  {trainable:>12,}  {affine:>15,}  {trainable + affine:>12,}')
  lines.append(f'{"(all)":<{width}}  {total_trainable:>12,}  {total_affine:>15,}  '
               f'{total_trainable + total_affine:>12,}')
  lines.append(f'total params: {total_trainable + total_affine}')
  without = 'the frozen CLIP' if frozen_clip else 'FrozenBN scale+bias'
  lines.append(f'trainable params only (without {without}): {total_trainable}')
  return '\n'.join(lines), total_trainable + total_affine, total_trainable
