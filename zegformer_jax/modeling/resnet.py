"""ResNet backbone in the detectron2 layout, with frozen batch norm.

ZegFormer's backbone is detectron2's `build_resnet_backbone` (see
docs/reference.md, section 1):

- basic stem: 7x7 stride-2 conv (no bias), FrozenBN, ReLU, 3x3 stride-2 max-pool, padding 1;
- bottleneck blocks with the stride on the 3x3 conv (STRIDE_IN_1X1 False, torchvision style);
- a 1x1 projection shortcut (conv + FrozenBN) where the block changes width or stride, i.e.
  on the first block of every stage of a bottleneck ResNet;
- outputs res2..res5 at strides 4/8/16/32 (256/512/1024/2048 channels for R-50/101).

`bottleneck=False` selects detectron2's BasicBlock (two 3x3 convs) with stage widths
stem_width * 2**i: the small variant used by tests and ShapesWorld.

Layout: NHWC activations, HWIO kernels. All convs have explicit symmetric padding k // 2,
as PyTorch does (flax 'SAME' padding would be asymmetric for stride 2 and shift features).

Parameter naming (official detectron2 key -> this module, relative to `backbone`):

  ============================================  ==============================================
  official (`backbone.` prefix)                  flax path (collection)
  ============================================  ==============================================
  stem.conv1.weight [O,I,7,7]                   stem/conv1/kernel [7,7,I,O]        (params)
  stem.conv1.norm.weight / .bias                stem/conv1/norm/scale / bias       (frozen)
  stem.conv1.norm.running_mean / running_var    stem/conv1/norm/mean / var         (frozen)
  res{s}.{i}.conv{1,2,3}.weight                 res{s}_{i}/conv{1,2,3}/kernel      (params)
  res{s}.{i}.conv{1,2,3}.norm.*                 res{s}_{i}/conv{1,2,3}/norm/*      (frozen)
  res{s}.0.shortcut.weight / .norm.*            res{s}_0/shortcut/kernel / norm/*  (params/frozen)
  ============================================  ==============================================

Conv weights convert with `w.transpose(2, 3, 1, 0)` (OIHW -> HWIO).
"""
from typing import Any, Callable, Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]

# detectron2's c2_msra_fill: kaiming_normal_(mode='fan_out', nonlinearity='relu'), bias 0.
c2_msra_fill = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# detectron2's c2_xavier_fill: kaiming_uniform_(a=1), i.e. U(+-sqrt(3 / fan_in)), bias 0.
c2_xavier_fill = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')

FROZEN = 'frozen'  # variable collection of the FrozenBN statistics and affine parameters


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine parameters (detectron2 FrozenBatchNorm2d).

  y = x * scale / sqrt(var + eps) + (bias - mean * scale / sqrt(var + eps)).

  `scale`, `bias`, `mean` and `var` (each [C]) live in the non-trainable collection
  'frozen', not in 'params', so no optimizer ever sees them. Initialised to the identity
  (scale 1, bias 0, mean 0, var 1); real values come from the ImageNet checkpoint.
  """
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] -> [..., C] in `dtype`."""
    c = x.shape[-1]
    scale = self.variable(FROZEN, 'scale', lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable(FROZEN, 'bias', lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable(FROZEN, 'mean', lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable(FROZEN, 'var', lambda: jnp.ones((c,), jnp.float32)).value
    # Fold into one multiply-add, computed in float32 before casting to the compute dtype.
    mult = scale * jax.lax.rsqrt(var + self.epsilon)
    shift = bias - mean * mult
    return x.astype(self.dtype) * mult.astype(self.dtype) + shift.astype(self.dtype)


class Conv2d(nn.Module):
  """detectron2-style Conv2d: conv, then an optional norm child named `norm`, then ReLU.

  Mirrors detectron2's `Conv2d(..., norm=..., activation=...)` so that official keys
  `<name>.weight` / `<name>.norm.*` map onto `<name>/kernel` / `<name>/norm/*`.

  Attributes:
    features: output channels.
    kernel_size: square kernel size k; padding is k // 2 on every side (as in PyTorch).
    strides: square stride.
    use_bias: add a bias (initialised to 0).
    norm: '' (none), 'FrozenBN' or 'GN' (GroupNorm with `gn_groups` groups, eps 1e-5).
    activation: apply ReLU after the norm.
    kernel_init: kernel initialiser (detectron2 default: c2_msra_fill).
    conv1x1_as_matmul: run a 1x1 convolution as one [B*H*W, Cin] x [Cin, Cout] matmul
      (config.model.conv1x1_as_matmul). The output is the same; the filter gradient becomes
      x^T dy, which XLA:CPU otherwise computes as a convolution whose window is the whole
      feature map, 2-7x slower (BENCHMARKS.md, train step). Its rounding differs from that
      convolution's, so a run's numbers change in the last bits.
  """
  features: int
  kernel_size: int
  strides: int = 1
  use_bias: bool = False
  norm: str = ''
  gn_groups: int = 32
  activation: bool = False
  kernel_init: Initializer = c2_msra_fill
  conv1x1_as_matmul: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, ceil(H / s), ceil(W / s), features]."""
    k, p = self.kernel_size, self.kernel_size // 2
    kernel = self.param('kernel', self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    if k == 1 and self.conv1x1_as_matmul:
      y = _matmul_1x1(x.astype(self.dtype), kernel.astype(self.dtype), self.strides)
    else:
      y = jax.lax.conv_general_dilated(
          x.astype(self.dtype), kernel.astype(self.dtype),
          window_strides=(self.strides, self.strides), padding=((p, p), (p, p)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    if self.use_bias:
      bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    if self.norm == 'FrozenBN':
      y = FrozenBatchNorm(dtype=self.dtype, name='norm')(y)
    elif self.norm == 'GN':
      y = nn.GroupNorm(num_groups=self.gn_groups, epsilon=1e-5, dtype=self.dtype,
                       name='norm')(y)
    elif self.norm == 'BN':
      # Batch statistics (pretraining only); the running averages land in 'batch_stats'
      # under the same names FrozenBatchNorm reads, so folding is a collection rename.
      y = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5,
                       dtype=self.dtype, name='norm')(y)
    elif self.norm:
      raise ValueError(f'unknown norm {self.norm!r}; expected "", "FrozenBN", "GN" or "BN"')
    if self.activation:
      y = nn.relu(y)
    return y


def _matmul_1x1(x: jax.Array, kernel: jax.Array, strides: int) -> jax.Array:
  """A 1x1 convolution with stride s as a 2-D matmul: x [B, H, W, Cin], kernel
  [1, 1, Cin, Cout] -> [B, ceil(H / s), ceil(W / s), Cout]."""
  x = x[:, ::strides, ::strides]
  b, h, w, c = x.shape
  y = jax.lax.dot_general(x.reshape(b * h * w, c), kernel[0, 0], (((1,), (0,)), ((), ())))
  return y.reshape(b, h, w, -1)


class BasicStem(nn.Module):
  """7x7/2 conv + norm + ReLU, then 3x3/2 max-pool with padding 1: stride 4 overall."""
  features: int = 64
  norm: str = 'FrozenBN'
  gn_groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, 3] -> [B, H/4, W/4, features]."""
    x = Conv2d(self.features, 7, strides=2, norm=self.norm, gn_groups=self.gn_groups,
               activation=True, dtype=self.dtype, name='conv1')(x)
    return max_pool_3x3_s2(x)


def _pool_size(n: int) -> int:
  """Output length of a 3-wide, stride-2 window over n positions padded by 1 each side."""
  return (n - 1) // 2 + 1


def _pool_taps(x: jax.Array):
  """The 9 window taps of a 3x3/2 max-pool with padding 1: (ky, kx, x[:, 2i+ky-1, 2j+kx-1])
  in the window's row-major order, each [B, Ho, Wo, C]; the padding is -inf, as
  F.max_pool2d pads."""
  b, h, w, c = x.shape
  ho, wo = _pool_size(h), _pool_size(w)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  for ky in range(3):
    for kx in range(3):
      yield ky, kx, jax.lax.slice(xp, (0, ky, kx, 0),
                                  (b, ky + 2 * (ho - 1) + 1, kx + 2 * (wo - 1) + 1, c),
                                  (1, 2, 2, 1))


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """The stem's 3x3 stride-2 max-pool with padding 1 (F.max_pool2d(x, 3, 2, 1)).

  x: [B, H, W, C] -> [B, ceil(H / 2), ceil(W / 2), C]. Values and gradients are those of
  `nn.max_pool` bit for bit (tests/modeling/test_models.py); the gradient is written out as 9
  strided taps because XLA:CPU lowers the generic one (select-and-scatter) to a
  reduce-window over index arrays that is 10x slower here (BENCHMARKS.md, train step).
  """
  return _max_pool_fwd(x)[0]


def _max_pool_fwd(x):
  y = None
  for _, _, tap in _pool_taps(x):
    y = tap if y is None else jnp.maximum(y, tap)
  return y, (x, y)


def _max_pool_bwd(residuals, dy):
  """Each window's gradient goes to its first maximum in row-major order (ties: the
  first, as PyTorch and XLA's select-and-scatter choose). Overlapping windows add up in
  the order of the windows, as select-and-scatter adds them, so the sum rounds the same:
  the taps run backwards because a later window reaches a position through an earlier tap."""
  x, y = residuals
  h, w = x.shape[1:3]
  ho, wo = y.shape[1:3]
  taken = jnp.zeros(y.shape, bool)
  routed = []
  for ky, kx, tap in _pool_taps(x):
    hit = (tap == y) & ~taken
    taken = taken | hit
    routed.append((ky, kx, jnp.where(hit, dy, jnp.zeros_like(dy))))
  dx = jnp.zeros_like(x)
  zero = jnp.zeros((), dy.dtype)
  for ky, kx, g in routed[::-1]:
    # Tap (ky, kx) of window (i, j) is input position (2i + ky - 1, 2j + kx - 1): an
    # interior-padded (dilated) copy of g shifted by ky - 1 (negative padding crops).
    dx = dx + jax.lax.pad(g, zero, ((0, 0, 0), (ky - 1, h - 2 * ho - ky + 2, 1),
                                    (kx - 1, w - 2 * wo - kx + 2, 1), (0, 0, 0)))
  return (dx,)


max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def _shortcut(conv, x: jax.Array, features: int, strides: int) -> jax.Array:
  """Identity, or a 1x1 conv + FrozenBN named `shortcut` when shape or stride changes.

  Called inside a block's compact __call__, so the conv lands in that block's scope.
  """
  if x.shape[-1] != features or strides != 1:
    return conv(features, 1, strides=strides, name='shortcut')(x)
  return x


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (stride here: STRIDE_IN_1X1 False) -> 1x1, FrozenBN after each, residual."""
  features: int            # output channels (4x the bottleneck width for ResNet-50/101)
  bottleneck_features: int
  strides: int = 1
  norm: str = 'FrozenBN'
  gn_groups: int = 32
  conv1x1_as_matmul: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H/s, W/s, features]."""
    conv = lambda *a, **kw: Conv2d(*a, norm=self.norm, gn_groups=self.gn_groups,
                                   conv1x1_as_matmul=self.conv1x1_as_matmul,
                                   dtype=self.dtype, **kw)
    shortcut = _shortcut(conv, x, self.features, self.strides)
    y = conv(self.bottleneck_features, 1, activation=True, name='conv1')(x)
    y = conv(self.bottleneck_features, 3, strides=self.strides, activation=True,
             name='conv2')(y)
    y = conv(self.features, 1, name='conv3')(y)
    return nn.relu(y + shortcut.astype(y.dtype))


class BasicBlock(nn.Module):
  """Two 3x3 convs (stride on the first), FrozenBN after each, residual (ResNet-18/34 style)."""
  features: int
  strides: int = 1
  norm: str = 'FrozenBN'
  gn_groups: int = 32
  conv1x1_as_matmul: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, Cin] -> [B, H/s, W/s, features]."""
    conv = lambda *a, **kw: Conv2d(*a, norm=self.norm, gn_groups=self.gn_groups,
                                   conv1x1_as_matmul=self.conv1x1_as_matmul,
                                   dtype=self.dtype, **kw)
    shortcut = _shortcut(conv, x, self.features, self.strides)
    y = conv(self.features, 3, strides=self.strides, activation=True, name='conv1')(x)
    y = conv(self.features, 3, name='conv2')(y)
    return nn.relu(y + shortcut.astype(y.dtype))


class ResNet(nn.Module):
  """detectron2 ResNet returning the res2..res5 feature maps.

  Attributes:
    block_counts: blocks per stage res2..res5, e.g. (3, 4, 6, 3) for R-50, (3, 4, 23, 3)
      for R-101.
    stem_width: stem output channels; also the res2 bottleneck width (64 for real
      ResNets, whose stage i then has bottleneck width 64 * 2**i and 256 * 2**i outputs).
    bottleneck: True for bottleneck blocks; False for BasicBlocks with stage widths
      stem_width * 2**i (small variants).
    norm: 'FrozenBN' (fine-tuning pretrained weights), 'GN' (from scratch) or 'BN' (batch
      statistics; backbone_pretrain only).
    freeze_at: detectron2's FREEZE_AT: 0 trains everything, 1 stops gradients after the
      stem, k >= 2 after res{k}.
    conv1x1_as_matmul: see Conv2d.
  """
  block_counts: Sequence[int] = (3, 4, 6, 3)
  stem_width: int = 64
  bottleneck: bool = True
  norm: str = 'FrozenBN'
  gn_groups: int = 32
  freeze_at: int = 0
  conv1x1_as_matmul: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> Dict[str, jax.Array]:
    """x: [B, H, W, 3] normalised image, H and W multiples of 32.

    Returns:
      {'res2': [B, H/4, W/4, C2], 'res3': [.., H/8, ..], 'res4': [.., H/16, ..],
       'res5': [B, H/32, W/32, C5]}.
    """
    kw = dict(norm=self.norm, gn_groups=self.gn_groups, dtype=self.dtype)
    x = BasicStem(self.stem_width, name='stem', **kw)(x)
    kw['conv1x1_as_matmul'] = self.conv1x1_as_matmul
    # detectron2's BACKBONE.FREEZE_AT: no gradient reaches the stem (>= 1) and res2..res{k}
    # (k = freeze_at), so the backward pass skips them; optim.make_optimizer gives their
    # parameters a zero multiplier, so weight decay does not move them either.
    x = jax.lax.stop_gradient(x) if self.freeze_at >= 1 else x
    out = {}
    for i, n in enumerate(self.block_counts):
      stage = i + 2
      width = self.stem_width * 2**i
      for j in range(n):
        # res2 keeps the stem's stride 4 (the max-pool already downsampled).
        strides = 2 if (j == 0 and i > 0) else 1
        name = f'res{stage}_{j}'
        if self.bottleneck:
          x = BottleneckBlock(4 * width, width, strides=strides, name=name, **kw)(x)
        else:
          x = BasicBlock(width, strides=strides, name=name, **kw)(x)
      x = jax.lax.stop_gradient(x) if self.freeze_at >= stage else x
      out[f'res{stage}'] = x
    return out
