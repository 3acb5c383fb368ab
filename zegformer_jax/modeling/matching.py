"""Hungarian matching between predicted segments and ground-truth class masks.

This is the JAX counterpart of MaskFormer's `HungarianMatcher`
(`mask_former/modeling/matcher.py`, used unchanged by ZegFormer; see
docs/reference.md section 2):

  * The cost of assigning query q to target m is
        cost_class * (-softmax(pred_logits)[q, class_m])
      + cost_mask  * batch sigmoid focal cost (alpha .25, gamma 2) / (h*w)
      + cost_dice  * batch dice cost (+1 smoothing),
    computed on *full* masks (not sampled points) at the prediction resolution
    (stride 4 of the padded input); target masks are nearest-downsampled to it.
  * The assignment is exact. `loss.matcher = 'host'`: scipy's `linear_sum_assignment`
    (float64), per image, in a host callback, as the reference. `'device'`: the same
    minimum-cost assignment solved on the accelerator (`hungarian_device`, float32 shortest
    augmenting paths), which keeps the step in one XLA program: no device -> host -> device
    round trip (a tenth of a ShapesWorld step on CPU, BENCHMARKS.md; more on a TPU pod).
    The two agree except between assignments whose total costs tie to float32
    precision.

Everything here has static shapes. Targets are padded to M per image and carry a
validity flag; padding targets are removed on the host before the assignment, so
they are never matched.

Representation of matches: `query_to_target` int32 [L, B, Q]; entry [l, b, q] is
the index (0..M-1) of the target that query q of image b was matched to at
decoder layer l, or -1 if the query is unmatched (it then targets no-object).
`target_to_query` converts it to the per-target view [L, B, M] used to gather the
matched predicted masks.

`match` runs the cost computation on device and then either a single `jax.pure_callback`
per device per step (all decoder layers and all local images at once) or the device
solver, inside a `jax.shard_map` over the batch axes of the mesh ('data', and 'fsdp' when
present), so each device / host only solves the assignments for its own shard of the batch.
"""
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from zegformer_jax.training import sharding

# Replacement for non-finite costs on the host. scipy refuses matrices with NaN
# (and rows/columns of +inf can make the problem infeasible); diverged logits
# then show up as a NaN loss instead of an exception inside a host callback.
_NONFINITE_COST = 1e8


def config_value(cfg: Any, name: str):
  """Reads `name` from a ConfigDict / attribute object or a plain mapping."""
  if isinstance(cfg, Mapping):
    return cfg[name]
  return getattr(cfg, name)


# ----------------------------------------------------------------------------
# Nearest downsampling of target masks.


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of torch `F.interpolate(mode='nearest')` along one axis.

  PyTorch (given an output `size`) uses scale = float32(in_size) / out_size and
  src = min(floor(dst * scale), in_size - 1), with the product in float32. The
  result is a static numpy array (shapes are static), [out_size] int32.
  """
  if in_size == out_size:
    return np.arange(out_size, dtype=np.int32)
  scale = np.float32(in_size) / np.float32(out_size)
  src = np.floor(np.arange(out_size, dtype=np.float32) * scale)
  return np.minimum(src.astype(np.int64), in_size - 1).astype(np.int32)


def nearest_downsample(masks: jnp.ndarray, out_hw: Sequence[int]) -> jnp.ndarray:
  """Nearest resize of the last two axes, as torch F.interpolate(mode='nearest').

  Args:
    masks: [..., H, W] any dtype.
    out_hw: (h, w) output size.
  Returns:
    [..., h, w], same dtype (pure index selection, no arithmetic).
  """
  h_in, w_in = masks.shape[-2:]
  iy = nearest_indices(h_in, int(out_hw[0]))
  ix = nearest_indices(w_in, int(out_hw[1]))
  return jnp.take(jnp.take(masks, iy, axis=-2), ix, axis=-1)


# ----------------------------------------------------------------------------
# Pairwise cost terms (MaskFormer matcher's batch_sigmoid_focal_loss and
# batch_dice_loss).

_HI = jax.lax.Precision.HIGHEST


def batch_sigmoid_focal_cost(logits: jnp.ndarray, targets: jnp.ndarray,
                             alpha: float = 0.25,
                             gamma: float = 2.0) -> jnp.ndarray:
  """Pairwise sigmoid focal cost, mean over pixels.

  Args:
    logits: [N, P] predicted mask logits (P = flattened pixels).
    targets: [M, P] float {0, 1} target masks.
    alpha: positive-class weight; < 0 disables alpha weighting (as the reference).
    gamma: focusing exponent.
  Returns:
    [N, M]: cost[n, m] = mean_p focal(logits[n, p], targets[m, p]).
  """
  num_pixels = logits.shape[-1]
  prob = jax.nn.sigmoid(logits)
  # BCE-with-logits against all-ones / all-zeros targets: softplus(-x), softplus(x).
  focal_pos = (1.0 - prob) ** gamma * jax.nn.softplus(-logits)
  focal_neg = prob ** gamma * jax.nn.softplus(logits)
  if alpha >= 0:
    focal_pos = focal_pos * alpha
    focal_neg = focal_neg * (1.0 - alpha)
  # Splitting positives and negatives turns the pairwise loss into two matmuls.
  cost = (jnp.einsum('np,mp->nm', focal_pos, targets, precision=_HI)
          + jnp.einsum('np,mp->nm', focal_neg, 1.0 - targets, precision=_HI))
  return cost / num_pixels


def batch_dice_cost(logits: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
  """Pairwise dice cost 1 - (2 p.t + 1) / (sum p + sum t + 1).

  Args:
    logits: [N, P] predicted mask logits.
    targets: [M, P] float {0, 1} target masks.
  Returns:
    [N, M] dice cost.
  """
  prob = jax.nn.sigmoid(logits)
  numerator = 2.0 * jnp.einsum('np,mp->nm', prob, targets, precision=_HI)
  denominator = prob.sum(-1)[:, None] + targets.sum(-1)[None, :]
  return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def match_cost(pred_logits: jnp.ndarray, pred_masks: jnp.ndarray,
               tgt_classes: jnp.ndarray, tgt_masks_small: jnp.ndarray,
               loss_cfg: Any) -> jnp.ndarray:
  """Matching cost matrix for a batch of images (one decoder layer).

  Args:
    pred_logits: [B, Q, K+1] class logits, no-object last.
    pred_masks: [B, Q, h, w] mask logits.
    tgt_classes: [B, M] int target class ids in 0..K-1 (padding: anything).
    tgt_masks_small: [B, M, h, w] float {0, 1} target masks already at the
      prediction resolution (see `nearest_downsample`).
    loss_cfg: has cost_class, cost_mask, cost_dice, focal_alpha, focal_gamma.
  Returns:
    [B, Q, M] float32 cost; padding columns hold finite garbage that `hungarian`
    ignores.
  """
  num_classes = pred_logits.shape[-1]
  prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)     # [B,Q,K+1]
  # Padding targets may hold any id; clip so the gather stays in range.
  cls = jnp.clip(tgt_classes.astype(jnp.int32), 0, num_classes - 1)
  # -prob[b, q, cls[b, m]]; the constant 1 of (1 - p) is dropped, as the reference.
  cost_class = -jnp.take_along_axis(prob, cls[:, None, :], axis=-1)   # [B,Q,M]

  b, q = pred_masks.shape[:2]
  m = tgt_masks_small.shape[1]
  logits = pred_masks.astype(jnp.float32).reshape(b, q, -1)
  targets = tgt_masks_small.astype(jnp.float32).reshape(b, m, -1)
  alpha = float(config_value(loss_cfg, 'focal_alpha'))
  gamma = float(config_value(loss_cfg, 'focal_gamma'))
  cost_mask = jax.vmap(
      lambda x, t: batch_sigmoid_focal_cost(x, t, alpha, gamma))(logits, targets)
  cost_dice = jax.vmap(batch_dice_cost)(logits, targets)
  return (float(config_value(loss_cfg, 'cost_class')) * cost_class
          + float(config_value(loss_cfg, 'cost_mask')) * cost_mask
          + float(config_value(loss_cfg, 'cost_dice')) * cost_dice)


# ----------------------------------------------------------------------------
# Host-side assignment.


def hungarian(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Optimal query -> target assignment for N independent problems.

  Args:
    cost: [N, Q, M] cost matrices (numpy, any float dtype).
    valid: [N, M] bool; False columns (padding targets) are never matched.
  Returns:
    np.int32 [N, Q]: matched target index per query, -1 for unmatched queries.
    With Q >= number of valid targets every valid target gets exactly one query
    (scipy's rectangular assignment); otherwise Q targets are matched.
  """
  cost = np.asarray(cost, dtype=np.float64)
  valid = np.asarray(valid, dtype=bool)
  n, q, _ = cost.shape
  out = np.full((n, q), -1, dtype=np.int32)
  for i in range(n):
    cols = np.flatnonzero(valid[i])
    if cols.size == 0:
      continue
    c = np.nan_to_num(cost[i][:, cols], nan=_NONFINITE_COST,
                      posinf=_NONFINITE_COST, neginf=-_NONFINITE_COST)
    rows, sel = scipy.optimize.linear_sum_assignment(c)
    out[i, rows] = cols[sel]
  return out


def _hungarian_layers(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Host callback body: [L, b, Q, M] costs, [b, M] valid -> int32 [L, b, Q]."""
  cost = np.asarray(cost)
  num_layers, b, q, m = cost.shape
  valid = np.broadcast_to(np.asarray(valid)[None], (num_layers, b, m))
  out = hungarian(cost.reshape(num_layers * b, q, m),
                  valid.reshape(num_layers * b, m))
  return out.reshape(num_layers, b, q)


# ----------------------------------------------------------------------------
# Device-side assignment.


def _assign_targets(cost: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """Minimum-cost assignment of the valid targets to distinct queries, one problem.

  Shortest augmenting paths with row / column potentials (the O(M^2 Q) Hungarian method,
  Jonker-Volgenant style): targets are inserted one at a time, each by a Dijkstra-like
  search over the queries on reduced costs, which stay >= 0, so the result is optimal.
  Queries are columns 1..Q, column 0 is the search's virtual start; invalid targets are
  skipped.

  Args:
    cost: [M, Q] float32 (target x query), finite; M <= Q.
    valid: [M] bool.
  Returns:
    int32 [Q]: 1 + the target of each query, 0 for unmatched queries.
  """
  m, q = cost.shape
  a = jnp.pad(cost, ((1, 0), (1, 0)))                    # [M+1, Q+1], row/col 0 unused
  inf = jnp.float32(jnp.inf)
  row = jnp.zeros_like(a[0])                             # [Q+1] float32 zeros
  cols = jnp.arange(q + 1)
  rows = jnp.arange(m + 1)
  # Single-element updates are selects over the (short) rows / columns, not scatters.

  def insert_target(i, carry):
    u, v, owner = carry                                  # owner[j]: 1 + target of query j
    owner = jnp.where(cols == 0, i, owner)

    def search_step(s):
      j0, minv, way, used, u, v, owner = s
      used = used | (cols == j0)
      i0 = owner[j0]
      reduced = a[i0] - u[i0] - v                       # [Q+1]
      better = ~used & (reduced < minv)
      minv = jnp.where(better, reduced, minv)
      way = jnp.where(better, j0, way)
      j1 = jnp.argmin(jnp.where(used, inf, minv))       # first minimum, as the loop form
      delta = minv[j1]
      # Keep the reduced costs of the search tree at zero and the others' slack current.
      u = u + jnp.where((owner[:, None] == rows) & used[:, None], delta, 0.0).sum(0)
      v = jnp.where(used, v - delta, v)
      minv = jnp.where(used, minv, minv - delta)
      return j1, minv, way, used, u, v, owner

    start = (jnp.zeros_like(owner[0]), row + inf, jnp.zeros_like(owner), row != 0, u, v,
             owner)
    j0, _, way, _, u, v, owner = jax.lax.while_loop(
        lambda s: s[6][s[0]] != 0, search_step, start)

    def augment(s):                                       # flip the path back to column 0
      j0, owner = s
      j1 = way[j0]
      return j1, jnp.where(cols == j0, owner[j1], owner)

    _, owner = jax.lax.while_loop(lambda s: s[0] != 0, augment, (j0, owner))
    return u, v, owner

  def maybe_insert(i, carry):
    return jax.lax.cond(valid[i - 1], insert_target, lambda _, c: c, i, carry)

  init = (jnp.zeros_like(a[:, 0]), row, row.astype(jnp.int32))
  _, _, owner = jax.lax.fori_loop(1, m + 1, maybe_insert, init)
  return owner[1:]


def hungarian_device(cost: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """`hungarian` in JAX: optimal query -> target assignment for N problems, on device.

  Args:
    cost: [N, Q, M] cost matrices.
    valid: [N, M] bool; False columns (padding targets) are never matched.
  Returns:
    int32 [N, Q]: matched target index per query, -1 for unmatched queries. Every valid
    target gets exactly one query, so M <= Q is required (checked statically).
  """
  n, q, m = cost.shape
  if m > q:
    raise ValueError(f'the device matcher needs at most as many targets as queries; got '
                     f'{m} targets (input.max_masks) for {q} queries '
                     f'(model.decoder.num_queries): use loss.matcher="host"')
  # As on the host: non-finite costs become large finite ones, so the search stays finite.
  cost = jnp.nan_to_num(cost.astype(jnp.float32), nan=_NONFINITE_COST,
                        posinf=_NONFINITE_COST, neginf=-_NONFINITE_COST)
  owner = jax.vmap(_assign_targets)(jnp.swapaxes(cost, 1, 2), valid.astype(bool))
  return owner - 1


# ----------------------------------------------------------------------------
# Device entry point.


def _local_match(pred_logits, pred_masks, tgt_classes, tgt_masks, tgt_valid,
                 loss_cfg):
  """Costs for all layers of the local images, then one host callback or device solve.

  Shapes (local to one device): pred_logits [L, b, Q, K+1], pred_masks
  [L, b, Q, h, w], tgt_classes [b, M], tgt_masks [b, M, H, W], tgt_valid
  [b, M]. Returns int32 [L, b, Q].
  """
  num_layers, b, q = pred_logits.shape[:3]
  h, w = pred_masks.shape[-2:]
  # Index selection on the raw (uint8) masks first, cast afterwards: cheaper.
  tgt_small = nearest_downsample(tgt_masks, (h, w)).astype(jnp.float32)
  cost_fn = lambda lg, mk: match_cost(lg, mk, tgt_classes, tgt_small, loss_cfg)
  cost = jax.vmap(cost_fn)(pred_logits, pred_masks)             # [L, b, Q, M]
  matcher = config_value(loss_cfg, 'matcher')
  if matcher == 'device':
    m = cost.shape[-1]
    valid = jnp.broadcast_to(tgt_valid[None], (num_layers, b, m))
    return hungarian_device(cost.reshape(num_layers * b, q, m),
                            valid.reshape(num_layers * b, m)).reshape(num_layers, b, q)
  if matcher != 'host':
    raise ValueError(f'loss.matcher must be "host" or "device"; got {matcher!r}')
  result = jax.ShapeDtypeStruct((num_layers, b, q), jnp.int32)
  return jax.pure_callback(_hungarian_layers, result, cost, tgt_valid,
                           vmap_method='sequential')


def match(outputs: Mapping[str, jnp.ndarray], targets: Mapping[str, jnp.ndarray],
          loss_cfg: Any, mesh: Optional[jax.sharding.Mesh]) -> jnp.ndarray:
  """Hungarian matching for every decoder layer (MaskFormer matcher).

  Args:
    outputs: {'pred_logits': [L, B, Q, K+1], 'pred_masks': [L, B, Q, h, w]}.
    targets: {'target_classes': [B, M] int, 'target_masks': [B, M, H, W] uint8,
      'target_valid': [B, M] bool}.
    loss_cfg: the `loss` sub-config (cost_* and focal_* fields).
    mesh: Mesh with an axis named 'data' (and optionally 'fsdp') over which B
      is sharded jointly (B must be divisible by their product); the other
      inputs' axes are replicated. None: no shard_map, a single callback for
      the whole batch (single device only).
  Returns:
    query_to_target int32 [L, B, Q] (-1: unmatched), under stop_gradient and
    sharded like P(None, ('data', 'fsdp')).
  """
  # The matcher is a no-grad computation in the reference, and pure_callback has
  # no differentiation rule: cut the graph before the costs.
  args = (jax.lax.stop_gradient(outputs['pred_logits']),
          jax.lax.stop_gradient(outputs['pred_masks']),
          targets['target_classes'], targets['target_masks'],
          targets['target_valid'])
  fn = lambda *a: _local_match(*a, loss_cfg=loss_cfg)
  if mesh is not None:
    # The batch is split over 'data' and, on an FSDP mesh (sharding.py), 'fsdp' too.
    axes = sharding.batch_axes(mesh)
    layer_spec = jax.sharding.PartitionSpec(None, axes)
    batch_spec = jax.sharding.PartitionSpec(axes)
    # Under shard_map the device solver's loops stay local to each device (sharded by the
    # SPMD partitioner instead, every iteration of the batched while_loop would all-reduce
    # its condition). Its carries mix varying inputs with unvarying loop indices, which
    # the varying-manual-axes check rejects, so that check is off for it.
    fn = jax.shard_map(
        fn, mesh=mesh,
        in_specs=(layer_spec, layer_spec, batch_spec, batch_spec, batch_spec),
        out_specs=layer_spec, check_vma=config_value(loss_cfg, 'matcher') != 'device')
  return jax.lax.stop_gradient(fn(*args))


def target_to_query(query_to_target: jnp.ndarray,
                    num_targets: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Inverts the matching to a per-target view with static shapes.

  Args:
    query_to_target: int [..., Q], target index per query or -1.
    num_targets: M.
  Returns:
    (target_to_query int32 [..., M], matched bool [..., M]): the query matched
    to each target (0 where unmatched, so it is a safe gather index) and
    whether the target is matched at all.
  """
  onehot = query_to_target[..., :, None] == jnp.arange(num_targets)  # [...,Q,M]
  matched = onehot.any(axis=-2)
  t2q = jnp.argmax(onehot, axis=-2).astype(jnp.int32)
  return t2q, matched
