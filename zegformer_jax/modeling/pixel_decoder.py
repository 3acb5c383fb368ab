"""MaskFormer's BasePixelDecoder: a light FPN that produces the per-pixel mask features.

ZegFormer uses it unchanged (docs/reference.md, section 1, "Pixel decoder"):

- res5: 3x3 conv (no bias) + GroupNorm + ReLU (`layer_4`);
- res4, res3, res2, top-down: lateral 1x1 conv (no bias) + GroupNorm (`adapter_3/2/1`),
  add the nearest-upsampled coarser level, 3x3 conv (no bias) + GroupNorm + ReLU
  (`layer_3/2/1`);
- `mask_features`: 3x3 conv with bias, no norm, no activation, at stride 4.

All convs use c2_xavier_fill (kaiming_uniform with a=1: U(+-sqrt(3 / fan_in))), bias 0.

Parameter naming (official key -> flax path, relative to `pixel_decoder`):

  ===============================================  ==========================================
  official (`sem_seg_head.pixel_decoder.` prefix)   flax path
  ===============================================  ==========================================
  adapter_{1,2,3}.weight [O,I,1,1]                 adapter_{1,2,3}/kernel [1,1,I,O]
  adapter_{1,2,3}.norm.weight / .bias              adapter_{1,2,3}/norm/scale / bias
  layer_{1,2,3,4}.weight [O,I,3,3]                 layer_{1,2,3,4}/kernel [3,3,I,O]
  layer_{1,2,3,4}.norm.weight / .bias              layer_{1,2,3,4}/norm/scale / bias
  mask_features.weight / .bias                     mask_features/kernel / bias
  ===============================================  ==========================================
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from zegformer_jax.modeling.resnet import Conv2d, ResNet, c2_xavier_fill


def resize_nearest(x: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """PyTorch F.interpolate(mode='nearest'): source index floor(dst * in / out).

  x: [B, h, w, C] -> [B, size[0], size[1], C]. For the exact 2x steps of the FPN this is a
  plain repeat; the general rule keeps odd sizes identical to the reference too.
  """
  h, w = x.shape[1:3]
  ys = (jnp.arange(size[0]) * h) // size[0]
  xs = (jnp.arange(size[1]) * w) // size[1]
  return x[:, ys][:, :, xs]


class BasePixelDecoder(nn.Module):
  """FPN pixel decoder over the backbone's res2..res5.

  Attributes:
    conv_dim: FPN width (CONVS_DIM, 256).
    mask_dim: mask feature width (MASK_DIM, 256); equals the mask embedding width.
    gn_groups: GroupNorm groups (32).
  """
  conv_dim: int = 256
  mask_dim: int = 256
  gn_groups: int = 32
  conv1x1_as_matmul: bool = False   # the lateral 1x1 convs (resnet.Conv2d)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: Dict[str, jax.Array]) -> jax.Array:
    """features: {'res2': [B, H/4, W/4, C2], ..., 'res5': [B, H/32, W/32, C5]}.

    Returns:
      mask features [B, H/4, W/4, mask_dim].
    """
    conv = lambda *a, **kw: Conv2d(*a, kernel_init=c2_xavier_fill, gn_groups=self.gn_groups,
                                   conv1x1_as_matmul=self.conv1x1_as_matmul, dtype=self.dtype,
                                   **kw)
    y = conv(self.conv_dim, 3, norm='GN', activation=True, name='layer_4')(features['res5'])
    for idx, level in ((3, 'res4'), (2, 'res3'), (1, 'res2')):
      lateral = conv(self.conv_dim, 1, norm='GN', name=f'adapter_{idx}')(features[level])
      y = lateral + resize_nearest(y, lateral.shape[1:3])
      y = conv(self.conv_dim, 3, norm='GN', activation=True, name=f'layer_{idx}')(y)
    return conv(self.mask_dim, 3, use_bias=True, name='mask_features')(y)


def conv1x1_as_matmul(cfg) -> bool:
  """config.model.conv1x1_as_matmul (resnet.Conv2d); False for configs saved before it."""
  return bool(cfg.get('conv1x1_as_matmul', False))


def resnet_fpn(cfg, images: jax.Array, dtype: Any) -> Tuple[Dict[str, jax.Array], jax.Array]:
  """The backbone and pixel decoder every method shares, as submodules of the caller.

  Call from inside a compact `__call__`: the modules are named 'backbone' and
  'pixel_decoder' in the caller's scope, so every method has the same parameter paths (and
  loads the same converted backbone).

  Args:
    cfg: a `model` sub-config (backbone, pixel_decoder).
    images: [B, H, W, 3] normalised, H and W multiples of 32.
    dtype: compute dtype.
  Returns:
    (features {'res2'..'res5'}, mask features [B, H/4, W/4, mask_dim]).
  """
  matmul = conv1x1_as_matmul(cfg)
  features = ResNet(block_counts=tuple(cfg.backbone.block_counts),
                    stem_width=cfg.backbone.stem_width, bottleneck=cfg.backbone.bottleneck,
                    norm=cfg.backbone.get('norm', 'FrozenBN'),
                    gn_groups=cfg.backbone.get('gn_groups', 32),
                    freeze_at=cfg.backbone.get('freeze_at', 0), conv1x1_as_matmul=matmul,
                    dtype=dtype, name='backbone')(images)
  mask_features = BasePixelDecoder(
      conv_dim=cfg.pixel_decoder.conv_dim, mask_dim=cfg.pixel_decoder.mask_dim,
      gn_groups=cfg.pixel_decoder.gn_groups, conv1x1_as_matmul=matmul, dtype=dtype,
      name='pixel_decoder')(features)
  return features, mask_features
