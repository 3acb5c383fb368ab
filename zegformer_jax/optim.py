"""The official ZegFormer optimiser in optax.

detectron2's `build_optimizer` in the reference `train_net.py` (reference section 4):
AdamW (torch defaults betas 0.9/0.999, eps 1e-8), base lr 1e-4, weight decay 1e-4 except on
GroupNorm/LayerNorm (`WEIGHT_DECAY_NORM` 0) and the query embedding (`nn.Embedding`, 0);
modules whose name contains "backbone" get lr x 0.1; `WarmupPolyLR` with power 0.9, no
warm-up; gradients clipped by their full-model L2 norm at 0.01 before the step.

torch's AdamW decays decoupled from Adam and scales the decay by the (group) learning rate:
  p <- p - lr_g * (adam_update + wd_g * p).
The chain below computes exactly that: clip -> adam -> add wd_g * p -> scale by -lr(t) ->
multiply the backbone's updates by the multiplier.
"""
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


def lr_multipliers(params, backbone_multiplier: float):
  return jax.tree_util.tree_map_with_path(
      lambda p, _: backbone_multiplier if is_backbone(_path_str(p)) else 1.0, params)


def poly_schedule(base_lr: float, total_steps: int, power: float) -> optax.Schedule:
  """detectron2 WarmupPolyLR without warm-up: lr * (1 - t / T) ** power, 0 after T."""
  def schedule(step):
    frac = jnp.clip(step / total_steps, 0.0, 1.0)
    return base_lr * (1.0 - frac) ** power
  return schedule


def scale_by_multipliers(multipliers) -> optax.GradientTransformation:
  """Multiplies each update leaf by a fixed per-leaf factor (the backbone lr multiplier)."""
  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optim_cfg, total_steps: int, params) -> optax.GradientTransformation:
  """AdamW as configured by `config.optim` for the parameter tree `params`."""
  schedule = poly_schedule(optim_cfg.lr, total_steps, optim_cfg.poly_power)
  return optax.chain(
      optax.clip_by_global_norm(optim_cfg.clip_norm),
      optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps),
      optax.add_decayed_weights(optim_cfg.weight_decay, mask=weight_decay_mask(params)),
      optax.scale_by_schedule(lambda t: -schedule(t)),
      scale_by_multipliers(lr_multipliers(params, optim_cfg.backbone_multiplier)),
  )


def describe(params, backbone_multiplier: float) -> dict:
  """{path: (lr multiplier, decays)} for logging and tests."""
  flat = traverse_util.flatten_dict(params, sep='/')
  return {k: (backbone_multiplier if is_backbone(k) else 1.0, not has_no_weight_decay(k))
          for k in flat}
