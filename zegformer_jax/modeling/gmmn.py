"""ZS3Net's generative moment-matching network (Bucher et al., NeurIPS 2019).

The generator maps a class embedding and noise to a pixel feature of that class; it is
trained so that, class by class, its samples match the real pixel features of the seen
classes in maximum mean discrepancy (MMD) under a sum of Gaussian kernels. Then it
generates features of classes that have no training pixels (docs/reference.md, section 9,
has the public code's facts):

  [class embedding e (D), noise z ~ U[0, 1)^noise_dim] -> Dense(hidden) -> LeakyReLU(0.2)
      -> Dropout(0.5) -> Dense(feature_dim) (no output activation)

Initialisation as the public code: Xavier-uniform weights, biases 0.01.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class Generator(nn.Module):
  """GMMN generator (module docstring).

  Attributes:
    feature_dim: C, the width of the pixel features to imitate.
    hidden_dim: hidden width (256); 0 makes the generator one Dense layer, as the public
      code does for a falsy hidden size.
    dropout: dropout rate after the hidden layer (0.5), active with train=True.
  """
  feature_dim: int
  hidden_dim: int = 256
  dropout: float = 0.5

  @nn.compact
  def __call__(self, embeddings: jax.Array, noise: jax.Array, *, train: bool) -> jax.Array:
    """embeddings [N, D], noise [N, Z] -> generated features [N, feature_dim] float32."""
    dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.xavier_uniform(),
                                     bias_init=nn.initializers.constant(0.01), name=name)
    x = jnp.concatenate([embeddings, noise], axis=-1).astype(jnp.float32)
    if self.hidden_dim:
      x = nn.leaky_relu(dense(self.hidden_dim, 'hidden')(x), negative_slope=0.2)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return dense(self.feature_dim, 'out')(x)


def squared_distances(x: jax.Array, y: jax.Array) -> jax.Array:
  """||x_i - y_j||^2 for x [N, C], y [M, C] -> [N, M] (exact f32 products, clamped >= 0)."""
  hi = jax.lax.Precision.HIGHEST
  xx = jnp.sum(x * x, axis=-1)[:, None]
  yy = jnp.sum(y * y, axis=-1)[None, :]
  return jnp.maximum(xx + yy - 2.0 * jnp.matmul(x, y.T, precision=hi), 0.0)


def mmd(real: jax.Array, fake: jax.Array, sigmas: Sequence[float],
        real_weights: jax.Array = None, fake_weights: jax.Array = None) -> jax.Array:
  """ZS3Net's multi-kernel MMD: sqrt(sum_v MMD_v^2), biased (V-statistic) estimates.

  k_v(x, y) = exp(-||x - y||^2 / (2 v)) for each v in `sigmas` (the public code's list is
  2, 5, 10, 20, 40, 80; each v acts as sigma^2). With weights (masks of valid samples, for
  padded batches) every mean is a weighted mean.

  Args:
    real: [N, C] real features of one class.
    fake: [M, C] generated features of that class.
    sigmas: the kernel bandwidths v.
    real_weights, fake_weights: optional [N] / [M] non-negative weights (default 1).
  Returns:
    scalar sqrt(sum_v (E k(r, r') + E k(f, f') - 2 E k(r, f))), 0-clamped inside the root.
  """
  real = real.astype(jnp.float32)
  fake = fake.astype(jnp.float32)
  wr = jnp.ones(real.shape[0]) if real_weights is None else real_weights.astype(jnp.float32)
  wf = jnp.ones(fake.shape[0]) if fake_weights is None else fake_weights.astype(jnp.float32)
  wr = wr / jnp.maximum(jnp.sum(wr), 1e-12)
  wf = wf / jnp.maximum(jnp.sum(wf), 1e-12)
  d_rr = squared_distances(real, real)
  d_ff = squared_distances(fake, fake)
  d_rf = squared_distances(real, fake)
  total = 0.0
  for v in sigmas:
    k = lambda d: jnp.exp(-d / (2.0 * v))
    total = total + (wr @ k(d_rr) @ wr + wf @ k(d_ff) @ wf - 2.0 * wr @ k(d_rf) @ wf)
  # The gradient of sqrt at 0 is infinite: floor the argument (identical samples only).
  return jnp.sqrt(jnp.maximum(total, 1e-12))


def class_conditional_mmd(real: jax.Array, fake: jax.Array, valid: jax.Array,
                          sigmas: Sequence[float]) -> jax.Array:
  """Mean over classes of `mmd` between each class's real and generated features.

  Args:
    real: [G, N, C] real features of G classes (N samples each, drawn with replacement).
    fake: [G, N, C] generated features of the same classes.
    valid: [G] bool, classes that take part (a padded class contributes nothing).
    sigmas: kernel bandwidths.
  Returns:
    scalar.
  """
  per_class = jax.vmap(lambda r, f: mmd(r, f, sigmas))(real, fake)
  w = valid.astype(jnp.float32)
  return jnp.sum(per_class * w) / jnp.maximum(jnp.sum(w), 1.0)
