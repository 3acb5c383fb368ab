"""The official ZegFormer optimiser in optax.

detectron2's `build_optimizer` in the reference `train_net.py` (docs/reference.md section 4):
AdamW (torch defaults betas 0.9/0.999, eps 1e-8), base lr 1e-4, weight decay 1e-4 except on
GroupNorm/LayerNorm (`WEIGHT_DECAY_NORM` 0) and the query embedding (`nn.Embedding`, 0);
modules whose name contains "backbone" get lr x 0.1; `WarmupPolyLR` with power 0.9, no
warm-up; gradients clipped by their full-model L2 norm at 0.01 before the step.

torch's AdamW decays decoupled from Adam and scales the decay by the (group) learning rate:
  p <- p - lr_g * (adam_update + wd_g * p).
The chain below computes exactly that: clip -> adam -> add wd_g * p -> scale by -lr(t) ->
multiply the backbone's updates by the multiplier.

BACKBONE.FREEZE_AT (`model.backbone.freeze_at`, 0 in every official config): detectron2
sets requires_grad False on the stem (>= 1) and res2..res{k}, so the optimiser never
touches them, weight decay included. Here the ResNet stops their gradients and their
multiplier is 0, so their update (decay included) is exactly zero.
"""
import re

import optax
import jax
import jax.numpy as jnp
from flax import traverse_util


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def is_backbone(path: str) -> bool:
  return path.split('/')[0] == 'backbone'


def has_no_weight_decay(path: str) -> bool:
  """Norm layers (GroupNorm/LayerNorm: 'norm' in a module name) and the query embedding."""
  parts = path.split('/')
  return any('norm' in p for p in parts[:-1]) or any('query_embed' in p for p in parts)


def weight_decay_mask(params):
  """True where weight decay applies (pytree of bools shaped like `params`)."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: not has_no_weight_decay(_path_str(p)), params)


def is_frozen(path: str, freeze_at: int) -> bool:
  """Whether FREEZE_AT = freeze_at freezes the parameter: the stem (>= 1), res2..res{k}."""
  parts = path.split('/')
  if freeze_at < 1 or len(parts) < 2 or not is_backbone(path):
    return False
  if parts[1] == 'stem':
    return True
  stage = re.fullmatch(r'res(\d+)_\d+', parts[1])
  return stage is not None and int(stage.group(1)) <= freeze_at


def lr_multiplier(path: str, backbone_multiplier: float, freeze_at: int = 0) -> float:
  if is_frozen(path, freeze_at):
    return 0.0
  return backbone_multiplier if is_backbone(path) else 1.0


def lr_multipliers(params, backbone_multiplier: float, freeze_at: int = 0):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: lr_multiplier(_path_str(p), backbone_multiplier, freeze_at), params)


def poly_schedule(base_lr: float, total_steps: int, power: float, min_lr: float = 0.0,
                  warmup_steps: int = 0, warmup_ratio: float = 1e-6) -> optax.Schedule:
  """Poly decay: (lr - min_lr) * (1 - t / T) ** power + min_lr, min_lr after T.

  min_lr 0 and no warm-up is detectron2's WarmupPolyLR of the ZegFormer configs. With
  warmup_steps > 0 the first steps scale it by 1 - (1 - t / warmup_steps)(1 - warmup_ratio)
  (mmcv's linear warm-up of the regular lr, as ZegCLIP trains).
  """
  def schedule(step):
    frac = jnp.clip(step / total_steps, 0.0, 1.0)
    lr = (base_lr - min_lr) * (1.0 - frac) ** power + min_lr
    if warmup_steps > 0:
      k = (1.0 - jnp.minimum(step, warmup_steps) / warmup_steps) * (1.0 - warmup_ratio)
      lr = lr * (1.0 - k)
    return lr
  return schedule


def schedule_from_config(optim_cfg, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule of `config.optim`."""
  return poly_schedule(optim_cfg.lr, total_steps, optim_cfg.poly_power,
                       optim_cfg.get('min_lr', 0.0), optim_cfg.get('warmup_steps', 0),
                       optim_cfg.get('warmup_ratio', 1e-6))


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
  """Multiplies each update leaf by a fixed per-leaf factor (the backbone lr multiplier)."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(init_fn, update_fn)


def keep_where(apply, new, old):
  """`new` where the scalar `apply` is True, else `old`, leaf by leaf (the train step's
  guard against a non-finite step, for the optimiser's state and the parameters)."""
  return jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformationExtraArgs:
  """optax.scale_by_adam, value for value and with its state, plus the extra argument
  `apply` (a scalar bool, default True): where it is False the state stays as it was.

  The moments are kept (or not) before the update is computed from them, and a barrier
  makes XLA read the update from the new moments. Without it XLA recomputes the moments
  inside the parameter update from the old ones, so the old moments are read after their
  in-place replacement and XLA copies all of them first: 2 x 4 bytes per parameter each
  step, 40 of the optimiser's 115 ms at COCO-Stuff R-50 on 2 CPU cores (BENCHMARKS.md).
  """
  base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

  def update_fn(updates, state, params=None, *, apply=True, **unused_extra_args):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)
    mu, nu = jax.lax.optimization_barrier(keep_where(apply, (mu, nu), (state.mu, state.nu)))
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    nu_hat = optax.tree.bias_correction(nu, b2, count)
    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + 0.0) + eps), mu_hat, nu_hat)
    return updates, optax.ScaleByAdamState(count=keep_where(apply, count, state.count), mu=mu,
                                           nu=nu)

  return optax.GradientTransformationExtraArgs(base.init, update_fn)


def keep_state_unless_applied(inner: optax.GradientTransformation
                              ) -> optax.GradientTransformationExtraArgs:
  """`inner` whose new state is kept only where the extra argument `apply` is True."""

  def update_fn(updates, state, params=None, *, apply=True, **unused_extra_args):
    updates, new_state = inner.update(updates, state, params)
    return updates, keep_where(apply, new_state, state)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def make_optimizer(optim_cfg, total_steps: int, params,
                   freeze_at: int = 0) -> optax.GradientTransformationExtraArgs:
  """AdamW as configured by `config.optim` for the parameter tree `params`.

  freeze_at: `config.model.backbone.freeze_at`; its stages get no update at all.
  `update(grads, state, params, apply=finite)` returns the state unchanged where `finite`
  is False (the train step's guard against a non-finite loss or gradient); the caller
  keeps its parameters the same way.
  """
  schedule = schedule_from_config(optim_cfg, total_steps)
  clip = (optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0
          else optax.identity())
  return optax.chain(
      clip,          # clip, decay and multipliers have no state to keep
      scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
      optax.add_decayed_weights(optim_cfg.weight_decay, mask=weight_decay_mask(params)),
      keep_state_unless_applied(optax.scale_by_schedule(lambda t: -schedule(t))),
      scale_by_multipliers(lr_multipliers(params, optim_cfg.backbone_multiplier, freeze_at)),
  )


def describe(params, backbone_multiplier: float, freeze_at: int = 0) -> dict:
  """{path: (lr multiplier, decays)} for logging and tests."""
  flat = traverse_util.flatten_dict(params, sep='/')
  return {k: (lr_multiplier(k, backbone_multiplier, freeze_at), not has_no_weight_decay(k))
          for k in flat}
