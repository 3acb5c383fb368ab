"""Tests for zegformer_jax.losses (MaskFormer SetCriterion).

Every term is checked against an independent float64 numpy re-derivation with
explicit loops (per query, per matched mask, per pixel), including a direct
transcription of torch's bilinear align_corners=False upsampling rule.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from configs import common
from zegformer_jax.modeling import criterion
from zegformer_jax.modeling import inference

RTOL = 1e-5


def loss_cfg(**overrides):
  cfg = common.base_config().loss
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


# ---------------------------------------------------------------- numpy reference


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_upsample_torch(x, out_h, out_w):
  """torch F.interpolate(bilinear, align_corners=False), per pixel, 2-D input."""
  in_h, in_w = x.shape
  def src(d, n_in, n_out):
    s = (d + 0.5) * (n_in / n_out) - 0.5
    s = max(s, 0.0)                       # torch clamps negative sources to 0
    i0 = int(s)
    i1 = i0 + 1 if i0 < n_in - 1 else i0  # and never reads past the last pixel
    return i0, i1, s - i0
  out = np.zeros((out_h, out_w))
  for y in range(out_h):
    y0, y1, ly = src(y, in_h, out_h)
    for xx in range(out_w):
      x0, x1, lx = src(xx, in_w, out_w)
      out[y, xx] = ((1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1])
                    + ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1]))
  return out


def np_focal(x, t, a=0.25, g=2.0):
  """RetinaNet sigmoid focal loss, mean over pixels (1-D inputs)."""
  p = np_sigmoid(x)
  bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
  p_t = p * t + (1 - p) * (1 - t)
  alpha_t = a * t + (1 - a) * (1 - t)
  return np.mean(alpha_t * (1 - p_t) ** g * bce)


def np_dice(x, t):
  p = np_sigmoid(x)
  return 1 - (2 * np.sum(p * t) + 1) / (np.sum(p) + np.sum(t) + 1)


def np_criterion(outputs, targets, q2t, cfg):
  logits = np.asarray(outputs['pred_logits'], np.float64)
  masks = np.asarray(outputs['pred_masks'], np.float64)
  cls = np.asarray(targets['target_classes'])
  tm = np.asarray(targets['target_masks'], np.float64)
  valid = np.asarray(targets['target_valid'])
  L, B, Q, C = logits.shape
  K = C - 1
  H, W = tm.shape[-2:]
  num_masks = max(float(valid.sum()), 1.0)
  res, total = {}, 0.0
  for l in range(L):
    num = den = focal = dice = 0.0
    for b in range(B):
      for q in range(Q):
        m = q2t[l, b, q]
        label = cls[b, m] if m >= 0 else K
        w = 1.0 if label < K else cfg.no_object_weight
        z = logits[l, b, q]
        logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        num += -w * logp[label]
        den += w
        if m >= 0 and valid[b, m]:
          up = np_upsample_torch(masks[l, b, q], H, W).ravel()
          t = tm[b, m].ravel()
          focal += np_focal(up, t, cfg.focal_alpha, cfg.focal_gamma)
          dice += np_dice(up, t)
    sfx = '' if l == L - 1 else f'_{l}'
    res['loss_ce' + sfx] = num / den
    res['loss_mask' + sfx] = focal / num_masks
    res['loss_dice' + sfx] = dice / num_masks
    if cfg.deep_supervision or l == L - 1:
      total += (cfg.class_weight * res['loss_ce' + sfx]
                + cfg.mask_weight * res['loss_mask' + sfx]
                + cfg.dice_weight * res['loss_dice' + sfx])
  res['loss'] = total
  return res


# ---------------------------------------------------------------- data


def make_batch(rng, L=2, B=2, Q=5, K=3, M=3, h=4, w=4, stride=4):
  outputs = {
      'pred_logits': rng.normal(size=(L, B, Q, K + 1)).astype(np.float32) * 2,
      'pred_masks': rng.normal(size=(L, B, Q, h, w)).astype(np.float32) * 3,
  }
  valid = np.ones((B, M), bool)
  valid[-1, 1:] = False                # images with different mask counts
  targets = {
      'target_classes': rng.integers(0, K, size=(B, M)).astype(np.int32),
      'target_masks': (rng.random((B, M, h * stride, w * stride)) < 0.4
                       ).astype(np.uint8),
      'target_valid': valid,
  }
  return outputs, targets


def random_matches(rng, L, valid, Q):
  """Random injective matching of each image's valid targets, per layer."""
  B, M = valid.shape
  q2t = np.full((L, B, Q), -1, np.int32)
  for l in range(L):
    for b in range(B):
      tgts = np.flatnonzero(valid[b])
      qs = rng.permutation(Q)[:tgts.size]
      q2t[l, b, qs] = tgts
  return q2t


def jit_criterion(outputs, targets, q2t, cfg):
  """set_criterion under jit (eager op-by-op dispatch is slow on CPU)."""
  return jax.jit(lambda o, t, m: criterion.set_criterion(o, t, m, cfg))(
      outputs, targets, q2t)


def assert_losses_close(got, want):
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(float(got[k]), want[k], rtol=RTOL, atol=1e-7,
                               err_msg=k)


# ---------------------------------------------------------------- elementary


@pytest.mark.parametrize('in_hw,out_hw', [((4, 4), (16, 16)), ((3, 5), (7, 11)),
                                          ((1, 1), (2, 2)), ((4, 3), (4, 3))])
def test_upsample_matches_torch_bilinear(in_hw, out_hw):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2,) + in_hw).astype(np.float32)
  got = np.asarray(inference.upsample_bilinear(jnp.asarray(x), out_hw))
  want = np.stack([np_upsample_torch(xi, *out_hw) for xi in x])
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=1e-6)


def test_focal_and_dice_against_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 50)) * 4
  t = (rng.random((3, 50)) < 0.3).astype(np.float64)
  @jax.jit
  def terms(x, t):
    return (criterion.sigmoid_focal_loss(x, t), criterion.dice_loss(x, t),
            criterion.sigmoid_focal_loss(x[0], t[0], 0.6, 1.5))

  got_f, got_d, got_other = terms(jnp.asarray(x, jnp.float32),
                                  jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(got_f, [np_focal(a, b) for a, b in zip(x, t)],
                             rtol=RTOL)
  np.testing.assert_allclose(got_d, [np_dice(a, b) for a, b in zip(x, t)],
                             rtol=RTOL)
  # Other alpha / gamma are honoured.
  np.testing.assert_allclose(float(got_other), np_focal(x[0], t[0], 0.6, 1.5),
                             rtol=RTOL)
  # Saturated logits stay finite (stable BCE), gradients too.
  big = jnp.array([[-60.0, 60.0, 60.0, -60.0]])
  tt = jnp.array([[1.0, 0.0, 1.0, 0.0]])
  val, grad = jax.jit(jax.value_and_grad(
      lambda z: criterion.sigmoid_focal_loss(z, tt).sum()))(big)
  assert np.isfinite(float(val)) and np.isfinite(np.asarray(grad)).all()


def test_weighted_cross_entropy_against_numpy():
  rng = np.random.default_rng(2)
  z = rng.normal(size=(4, 6, 5)) * 3
  y = rng.integers(0, 5, size=(4, 6))
  w = np.array([1.0, 1.0, 1.0, 1.0, 0.1])
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, y[..., None], -1)[..., 0]
  want = (w[y] * ce).sum() / w[y].sum()
  got = criterion.weighted_cross_entropy(jnp.asarray(z, jnp.float32),
                                      jnp.asarray(y), jnp.asarray(w))
  np.testing.assert_allclose(float(got), want, rtol=RTOL)


# ---------------------------------------------------------------- criterion


def test_set_criterion_against_numpy():
  rng = np.random.default_rng(3)
  cfg = loss_cfg()
  outputs, targets = make_batch(rng, L=2, B=2, Q=5, K=3, M=3)
  q2t = random_matches(rng, 2, targets['target_valid'], 5)
  got = jit_criterion(outputs, targets, q2t, cfg)
  assert set(got) == {'loss', 'loss_ce', 'loss_mask', 'loss_dice', 'loss_ce_0',
                      'loss_mask_0', 'loss_dice_0'}
  assert_losses_close(got, np_criterion(outputs, targets, q2t, cfg))


def test_mask_loss_gradient_reaches_only_the_matched_queries():
  """The matched masks are selected by a one-hot matmul: its gradient must be exactly zero
  on unmatched queries and, on a matched one, the gradient of that pair's own focal + dice
  loss (by upsampling the single mask, as numpy's re-derivation does)."""
  rng = np.random.default_rng(9)
  cfg = loss_cfg(class_weight=0.0, mask_weight=20.0, dice_weight=1.0)
  outputs, targets = make_batch(rng, L=1, B=2, Q=5, K=3, M=3)
  q2t = random_matches(rng, 1, targets['target_valid'], 5)
  loss = lambda masks: criterion.set_criterion(
      dict(outputs, pred_masks=masks), targets, q2t, cfg)['loss']
  grad = np.asarray(jax.jit(jax.grad(loss))(jnp.asarray(outputs['pred_masks'])))
  num_masks = float(targets['target_valid'].sum())
  big = targets['target_masks'].shape[-2:]

  def pair_loss(mask, tgt):
    up = inference.upsample_bilinear(mask[None, None], big).reshape(-1)
    t = jnp.asarray(tgt, jnp.float32).reshape(-1)
    return (20.0 * criterion.sigmoid_focal_loss(up, t) + criterion.dice_loss(up, t)) / num_masks

  pair_grad = jax.jit(jax.grad(pair_loss))
  for b in range(2):
    for q in range(5):
      t = q2t[0, b, q]
      if t < 0:
        assert not grad[0, b, q].any(), (b, q)
      else:
        want = pair_grad(jnp.asarray(outputs['pred_masks'][0, b, q]),
                         targets['target_masks'][b, t])
        np.testing.assert_allclose(grad[0, b, q], want, rtol=1e-5, atol=1e-8)


def test_weights_and_deep_supervision():
  rng = np.random.default_rng(4)
  outputs, targets = make_batch(rng, L=3, B=2, Q=5, K=3, M=3)
  q2t = random_matches(rng, 3, targets['target_valid'], 5)
  cfg = loss_cfg(class_weight=2.0, mask_weight=3.0, dice_weight=5.0,
                 no_object_weight=0.3)
  got = jit_criterion(outputs, targets, q2t, cfg)
  assert_losses_close(got, np_criterion(outputs, targets, q2t, cfg))
  total = sum(w * float(got[k + s]) for s in ('', '_0', '_1')
              for k, w in (('loss_ce', 2.0), ('loss_mask', 3.0),
                           ('loss_dice', 5.0)))
  np.testing.assert_allclose(float(got['loss']), total, rtol=RTOL)

  # Without deep supervision only the final layer is reported and summed.
  cfg_final = loss_cfg(class_weight=2.0, mask_weight=3.0, dice_weight=5.0,
                       no_object_weight=0.3, deep_supervision=False)
  final = jit_criterion(outputs, targets, q2t, cfg_final)
  assert set(final) == {'loss', 'loss_ce', 'loss_mask', 'loss_dice'}
  for k in ('loss_ce', 'loss_mask', 'loss_dice'):
    np.testing.assert_allclose(float(final[k]), float(got[k]), rtol=RTOL)
  np.testing.assert_allclose(
      float(final['loss']),
      2 * float(got['loss_ce']) + 3 * float(got['loss_mask'])
      + 5 * float(got['loss_dice']), rtol=RTOL)


def test_num_masks_normalisation():
  rng = np.random.default_rng(5)
  cfg = loss_cfg()
  outputs, targets = make_batch(rng, L=1, B=2, Q=5, K=3, M=3)
  q2t = random_matches(rng, 1, targets['target_valid'], 5)
  base = jit_criterion(outputs, targets, q2t, cfg)
  # 4 valid masks in the batch (3 + 1): mask terms are sum / 4.
  assert targets['target_valid'].sum() == 4
  per_mask_sum = 0.0
  for b in range(2):
    for q in range(5):
      m = q2t[0, b, q]
      if m >= 0:
        up = np_upsample_torch(outputs['pred_masks'][0, b, q].astype(np.float64),
                               16, 16).ravel()
        per_mask_sum += np_focal(up, targets['target_masks'][b, m].ravel()
                                 .astype(np.float64))
  np.testing.assert_allclose(float(base['loss_mask']), per_mask_sum / 4,
                             rtol=RTOL)

  # A batch without any valid target: num_masks clamps to 1, the mask terms
  # are 0 and every query targets no-object (plain mean CE over queries).
  empty = dict(targets, target_valid=np.zeros_like(targets['target_valid']))
  none = np.full_like(q2t, -1)
  got = jit_criterion(outputs, empty, none, cfg)
  assert float(got['loss_mask']) == 0.0 and float(got['loss_dice']) == 0.0
  z = outputs['pred_logits'][0].astype(np.float64)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  np.testing.assert_allclose(float(got['loss_ce']), -logp[..., -1].mean(),
                             rtol=RTOL)
  _, metrics = jax.jit(lambda o, t: criterion.compute_loss(o, t, cfg, None))(
      outputs, empty)
  assert float(metrics['num_masks']) == 1.0


def test_compute_loss_rematches_every_layer():
  """Each layer gets its own matching; the final layer is not reused."""
  B, Q, K, M, h = 8, 5, 3, 3, 4
  rng = np.random.default_rng(6)
  masks = np.zeros((B, M, 4 * h, 4 * h), np.uint8)
  for b in range(B):          # disjoint vertical stripes: target m owns cols
    for m in range(M):
      masks[b, m, :, 4 * m:4 * m + 4] = 1
  classes = rng.integers(0, K, size=(B, M)).astype(np.int32)
  valid = np.ones((B, M), bool)
  valid[3, 2] = False
  # Layer l: query perm[l][m] predicts target m well (mask and class).
  perms = [np.array([4, 0, 2]), np.array([1, 3, 0])]
  logits = rng.normal(size=(2, B, Q, K + 1)).astype(np.float32) * 0.1
  pmasks = np.full((2, B, Q, h, h), -6.0, np.float32)
  want_q2t = np.full((2, B, Q), -1, np.int32)
  for l, perm in enumerate(perms):
    for b in range(B):
      for m in range(M):
        pmasks[l, b, perm[m], :, m] = 6.0
        logits[l, b, perm[m], classes[b, m]] += 5.0
        if valid[b, m]:
          want_q2t[l, b, perm[m]] = m
  outputs = {'pred_logits': logits, 'pred_masks': pmasks}
  targets = {'target_classes': classes, 'target_masks': masks,
             'target_valid': valid}
  cfg = loss_cfg()

  mesh = Mesh(np.array(jax.devices()), ('data',))
  lay, bat = NamedSharding(mesh, P(None, 'data')), NamedSharding(mesh, P('data'))
  out_s = {k: jax.device_put(v, lay) for k, v in outputs.items()}
  tgt_s = {k: jax.device_put(v, bat) for k, v in targets.items()}
  loss, metrics = jax.jit(lambda o, t: criterion.compute_loss(o, t, cfg, mesh))(
      out_s, tgt_s)

  want = np_criterion(outputs, targets, want_q2t, cfg)
  got = {k: v for k, v in metrics.items() if k != 'num_masks'}
  assert_losses_close(got, want)
  np.testing.assert_allclose(float(loss), want['loss'], rtol=RTOL)
  assert float(metrics['num_masks']) == valid.sum()
  # Reusing the final layer's matches for layer 0 would give a different loss.
  reused = np_criterion(outputs, targets, want_q2t[[1, 1]], cfg)
  assert reused['loss_ce_0'] > want['loss_ce_0'] + 0.1


def test_hand_computed_case():
  """B=1, L=1, Q=2, K=1, M=1, 1x1 prediction, 2x2 target (computed by hand).

  Query 0: logits (log 3, 0) -> p(class 0) = 3/4; mask logit 0.
  Query 1: logits (0, 0)     -> p(class 0) = 1/2; mask logit 0.
  Mask costs tie, so query 0 (higher class probability) is matched to the
  target (class 0, mask [[1, 0], [0, 0]]); query 1 targets no-object.
    loss_ce   = (1 * log(4/3) + 0.1 * log 2) / (1 + 0.1)
    loss_mask : upsampled mask is 0 everywhere, p = 1/2, BCE = log 2,
                (1 - p_t)^2 = 1/4; alpha_t = .25 on 1 pixel, .75 on 3 pixels
                -> log2 * 1/4 * (.25 + 3 * .75) / 4 = log2 * 5/32
    loss_dice = 1 - (2 * 1/2 + 1) / (2 + 1 + 1) = 1/2
    loss      = loss_ce + 20 * loss_mask + 1 * loss_dice
  """
  outputs = {
      'pred_logits': np.array([[[[math.log(3.0), 0.0], [0.0, 0.0]]]],
                              np.float32),
      'pred_masks': np.zeros((1, 1, 2, 1, 1), np.float32),
  }
  targets = {
      'target_classes': np.array([[0]], np.int32),
      'target_masks': np.array([[[[1, 0], [0, 0]]]], np.uint8),
      'target_valid': np.array([[True]]),
  }
  loss, m = jax.jit(lambda o, t: criterion.compute_loss(o, t, loss_cfg(), None))(
      outputs, targets)
  ce = (math.log(4 / 3) + 0.1 * math.log(2)) / 1.1
  focal = math.log(2) * 5 / 32
  dice = 0.5
  np.testing.assert_allclose(float(m['loss_ce']), ce, rtol=RTOL)
  np.testing.assert_allclose(float(m['loss_mask']), focal, rtol=RTOL)
  np.testing.assert_allclose(float(m['loss_dice']), dice, rtol=RTOL)
  np.testing.assert_allclose(float(loss), ce + 20 * focal + dice, rtol=RTOL)
