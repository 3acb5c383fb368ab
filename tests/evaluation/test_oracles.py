"""Tests of zegformer_jax.evaluation.oracles against plain numpy loops and hand-made cases.

The references re-derive each oracle pixel by pixel / segment by segment with Python loops
and np.bincount (float64 sums), independent of the bincount / segment_sum formulation.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zegformer_jax.evaluation import metrics, oracles

IGN = 255
# Jitted once per module (num_classes, ignore_value static), as the evaluator would call them.
_group = jax.jit(oracles.grouping_oracle_labels, static_argnums=(2, 3))
_group_conf = jax.jit(oracles.grouping_oracle_confusion, static_argnums=(2, 3))
_cls = jax.jit(oracles.classification_oracle_labels, static_argnums=(2, 3))
_cls_conf = jax.jit(oracles.classification_oracle_confusion, static_argnums=(2, 3))


def _grouping_ref(mask_logits, label, k, ignore, query_scores=None):
  b, q, h, w = mask_logits.shape
  out = np.zeros((b, h, w), np.int64)
  for i in range(b):
    weight = mask_logits[i] if query_scores is None else (
        1 / (1 + np.exp(-mask_logits[i].astype(np.float64))) * query_scores[i][:, None, None])
    seg = np.argmax(weight, axis=0)
    for j in range(q):
      pix = seg == j
      lab = label[i][pix]
      lab = lab[(lab >= 0) & (lab < k)]
      out[i][pix] = np.bincount(lab, minlength=k).argmax() if lab.size else ignore
  return out


def _classification_ref(scores, label, k, ignore):
  b = scores.shape[0]
  out = np.full(label.shape, ignore, np.int64)
  for i in range(b):
    for g in range(k):
      pix = label[i] == g
      if pix.any():
        out[i][pix] = int(np.argmax(scores[i][:, pix].astype(np.float64).sum(axis=1)))
  return out


def _random_label(rng, shape, k, p_ignore=0.2):
  label = rng.integers(0, k, shape)
  label[rng.random(shape) < p_ignore] = IGN
  return label


@pytest.mark.parametrize('seed', range(6))
def test_grouping_matches_loops(seed):
  rng = np.random.default_rng(seed)
  b, q, k, h, w = 2, int(rng.integers(2, 7)), int(rng.integers(2, 6)), 9, 11
  # Smooth-ish masks: per-query logits on a coarse grid, so segments are blobs.
  logits = np.kron(rng.normal(size=(b, q, 3, 4)), np.ones((3, 3)))[..., :h, :w]
  logits = (logits + 0.3 * rng.normal(size=(b, q, h, w))).astype(np.float32)
  label = _random_label(rng, (b, h, w), k)
  got = np.asarray(_group(jnp.asarray(logits), jnp.asarray(label), k, IGN))
  assert got.dtype == np.int32 and got.shape == (b, h, w)
  np.testing.assert_array_equal(got, _grouping_ref(logits, label, k, IGN))
  qs = rng.random((b, q)).astype(np.float32)
  got = np.asarray(_group(jnp.asarray(logits), jnp.asarray(label), k, IGN,
                          query_scores=jnp.asarray(qs)))
  np.testing.assert_array_equal(got, _grouping_ref(logits, label, k, IGN, qs))


@pytest.mark.parametrize('seed', range(6))
def test_classification_matches_loops(seed):
  rng = np.random.default_rng(100 + seed)
  b, k, h, w = 3, int(rng.integers(2, 7)), 8, 13
  scores = rng.random((b, k, h, w)).astype(np.float32)
  label = _random_label(rng, (b, h, w), k)
  label[0] = IGN  # an image without labelled pixels
  got = np.asarray(_cls(jnp.asarray(scores), jnp.asarray(label), k, IGN))
  assert got.dtype == np.int32 and got.shape == (b, h, w)
  np.testing.assert_array_equal(got, _classification_ref(scores, label, k, IGN))
  assert (got[0] == IGN).all()


def _hand_case():
  """One 10 x 10 image, K = 3: rows 0-3 class 0 (40 px), 4-6 class 1, 7-9 class 2 (30 px
  each); row 0, columns 0-1 ignore (so class 0 has 38 labelled pixels)."""
  label = np.zeros((1, 10, 10), np.int32)
  label[0, 4:7] = 1
  label[0, 7:] = 2
  label[0, 0, :2] = IGN
  return label


def _miou(conf, k=3):
  return metrics.compute_metrics(np.asarray(conf), [str(c) for c in range(k)],
                                 np.ones(k, bool), 'hand', 'oracle', 1)


def test_perfect_masks_wrong_classes():
  label = _hand_case()
  gt = np.where(label == IGN, 0, label)[0]
  # Perfect masks: query g is high exactly on class g's rows; query 3 never wins. Whatever
  # classes the model gives the queries, the grouping oracle is perfect.
  logits = np.full((1, 4, 10, 10), -5.0, np.float32)
  for g in range(3):
    logits[0, g][gt == g] = 5.0
  conf = _group_conf(jnp.asarray(logits), jnp.asarray(label), 3, IGN)
  r = _miou(conf)
  assert r['mIoU'] == 100.0 and r['pAcc'] == 100.0
  pred = np.asarray(_group(jnp.asarray(logits), jnp.asarray(label), 3, IGN))
  np.testing.assert_array_equal(pred[0], gt)
  # Scores that call segment 2 class 1. Segment 0 has 10 pixels whose own argmax is class 2
  # (0.6 vs 0.4), the rest 0.9 for class 0: the summed vote still picks class 0.
  scores = np.zeros((1, 3, 10, 10), np.float32)
  scores[0, 0][gt == 0] = 0.9
  scores[0, 1][gt == 0] = 0.05
  scores[0, 2][gt == 0] = 0.05
  scores[0, :, 2, :] = np.array([0.4, 0.0, 0.6])[:, None]
  scores[0, 1][gt == 1] = 0.8
  scores[0, 1][gt == 2] = 0.7
  scores[0, 2][gt == 2] = 0.3
  conf = np.asarray(_cls_conf(jnp.asarray(scores), jnp.asarray(label), 3, IGN))
  # Predictions: segment 0 -> 0 (38 px), 1 -> 1 (30), 2 -> 1 (30).
  expect = np.zeros((4, 4), np.int64)
  expect[0, 0], expect[1, 1], expect[1, 2] = 38, 30, 30
  # The two ignore pixels get the ignore value, which confusion_matrix drops: the excluded
  # column stays empty.
  np.testing.assert_array_equal(conf, expect)
  r = _miou(conf)
  # IoU: class 0 = 1, class 1 = 30 / 60, class 2 = 0 -> mIoU 50; pAcc = 68 / 98.
  assert r['mIoU'] == pytest.approx(50.0)
  assert r['pAcc'] == pytest.approx(100 * 68 / 98)
  # The per-pixel argmax would get row 2 wrong; the oracle does not.
  assert (np.argmax(scores[0], axis=0)[2] == 2).all()


def test_query_without_labelled_pixels_and_valid():
  label = _hand_case()
  logits = np.full((1, 3, 10, 10), -5.0, np.float32)
  logits[0, 0] = 0.0                      # query 0 wins everywhere ...
  logits[0, 1, 0, :2] = 5.0               # ... except the two ignore pixels (query 1)
  pred = np.asarray(_group(jnp.asarray(logits), jnp.asarray(label), 3, IGN))
  # Query 0's majority is class 0 (38 of 98); query 1 holds only ignore pixels.
  expect = np.zeros((10, 10), np.int64)
  expect[0, :2] = IGN
  np.testing.assert_array_equal(pred[0], expect)
  conf = _group_conf(jnp.asarray(logits), jnp.asarray(label), 3, IGN,
                     valid=jnp.array([False]))
  assert int(np.asarray(conf).sum()) == 0


def test_confusions_sum_over_batches():
  rng = np.random.default_rng(5)
  k, b = 4, 4
  scores = rng.random((b, k, 6, 7)).astype(np.float32)
  logits = rng.normal(size=(b, 5, 6, 7)).astype(np.float32)
  label = _random_label(rng, (b, 6, 7), k)
  for f, x in ((_cls_conf, scores), (_group_conf, logits)):
    whole = np.asarray(f(jnp.asarray(x), jnp.asarray(label), k, IGN))
    parts = sum(np.asarray(f(jnp.asarray(x[i:i + 1]), jnp.asarray(label[i:i + 1]), k, IGN))
                for i in range(b))
    # Per-image oracles: a batch's matrix is the sum of its images' matrices.
    np.testing.assert_array_equal(whole, parts)
    assert whole[:k, :k].sum() == int(np.sum(label != IGN))


def test_class_count_mismatch():
  with pytest.raises(ValueError):
    oracles.classification_oracle_labels(jnp.zeros((1, 3, 2, 2)), jnp.zeros((1, 2, 2), int),
                                         4, IGN)
