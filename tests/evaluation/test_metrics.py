"""Tests of zegformer_jax.metrics: confusion matrix on device, detectron2-style metrics, JSON.

The expected values are derived by hand or by an independent numpy transcription of the
formulas of detectron2's SemSegEvaluator (acc / IoU over classes with ground truth, mIoU's
denominator counting every class with ground truth or prediction).
"""
import json
import os
import stat

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zegformer_jax.evaluation import metrics

SCHEMA = {'dataset', 'variant', 'num_images', 'mIoU', 'mIoU_seen', 'mIoU_unseen', 'hIoU',
          'pAcc', 'mAcc', 'fwIoU', 'per_class'}


def _hand_conf():
  """K=4 (A, B seen; C, D unseen). D has no ground truth but is predicted twice.

  Rows = prediction, columns = ground truth, index 4 = excluded bin (ignore pixels).
  """
  conf = np.zeros((5, 5), np.int64)
  conf[:4, :4] = [[7, 1, 0, 0],
                  [1, 4, 1, 0],
                  [0, 0, 3, 0],
                  [2, 0, 0, 0]]
  conf[:4, 4] = [3, 0, 1, 0]   # ignore pixels, by prediction: must change nothing
  return conf


def _d2_reference(conf_kk):
  """detectron2 SemSegEvaluator.evaluate re-derived in numpy (NaN where undefined)."""
  conf_kk = conf_kk.astype(np.float64)
  tp = np.diag(conf_kk)
  pos_gt = conf_kk.sum(0)
  pos_pred = conf_kk.sum(1)
  acc_valid = pos_gt > 0
  iou_valid = pos_gt + pos_pred > 0
  acc = np.where(acc_valid, tp / np.maximum(pos_gt, 1), np.nan)
  iou = np.where(acc_valid, tp / np.maximum(pos_gt + pos_pred - tp, 1), np.nan)
  weights = pos_gt / pos_gt.sum()
  return dict(
      acc=acc, iou=iou,
      mAcc=np.nanmean(acc) * 100,
      mIoU=np.nansum(iou) / iou_valid.sum() * 100,
      fwIoU=np.nansum(iou * weights) * 100,
      pAcc=tp.sum() / pos_gt.sum() * 100)


def test_hand_made_values():
  conf = _hand_conf()
  names = ['A', 'B', 'C', 'D']
  seen = np.array([True, True, False, False])
  m = metrics.compute_metrics(conf, names, seen, dataset='toy', variant='full',
                              num_images=3)
  assert set(m) == SCHEMA
  iou = {'A': 7 / 11, 'B': 4 / 7, 'C': 3 / 4}
  acc = {'A': 0.7, 'B': 0.8, 'C': 0.75}
  for entry in m['per_class']:
    assert set(entry) == {'name', 'split', 'IoU', 'Acc'}
    if entry['name'] == 'D':
      assert entry['IoU'] is None and entry['Acc'] is None
    else:
      assert entry['IoU'] == pytest.approx(100 * iou[entry['name']])
      assert entry['Acc'] == pytest.approx(100 * acc[entry['name']])
  assert [e['split'] for e in m['per_class']] == ['seen', 'seen', 'unseen', 'unseen']
  # D (predicted, no ground truth) counts in mIoU's denominator: 4 classes, not 3.
  assert m['mIoU'] == pytest.approx(100 * (7 / 11 + 4 / 7 + 3 / 4) / 4)
  assert m['mAcc'] == pytest.approx(100 * 0.75)
  assert m['pAcc'] == pytest.approx(100 * 14 / 19)
  assert m['fwIoU'] == pytest.approx(100 * (10 * 7 / 11 + 5 * 4 / 7 + 4 * 3 / 4) / 19)
  s = 100 * (7 / 11 + 4 / 7) / 2
  u = 100 * 3 / 4          # D has no ground truth: excluded from the unseen mean
  assert m['mIoU_seen'] == pytest.approx(s)
  assert m['mIoU_unseen'] == pytest.approx(u)
  assert m['hIoU'] == pytest.approx(2 * s * u / (s + u))
  assert (m['dataset'], m['variant'], m['num_images']) == ('toy', 'full', 3)
  # The same matrix without the excluded bin gives the same numbers.
  assert metrics.compute_metrics(conf[:4, :4], names, seen, 'toy', 'full', 3) == m


def test_matches_detectron2_formulas_on_random_matrices():
  rng = np.random.default_rng(0)
  k = 9
  for trial in range(5):
    conf = np.zeros((k + 1, k + 1), np.int64)
    conf[:k, :k] = rng.integers(0, 50, (k, k)) * (rng.random((k, k)) < 0.5)
    conf[:k, k] = rng.integers(0, 20, k)
    conf[:, 2] = 0                     # class 2: no ground truth
    if trial % 2:
      conf[5, :] = 0                   # class 5: never predicted
      conf[:, 5] = 0                   # ... and no ground truth: neither valid
    seen = rng.random(k) < 0.6
    seen[0], seen[1] = True, False
    m = metrics.compute_metrics(conf, [f'c{i}' for i in range(k)], seen, 'd', 'seg', 1)
    ref = _d2_reference(conf[:k, :k])
    for key in ('mIoU', 'mAcc', 'fwIoU', 'pAcc'):
      assert m[key] == pytest.approx(ref[key], rel=1e-12), key
    for c, entry in enumerate(m['per_class']):
      if np.isnan(ref['iou'][c]):
        assert entry['IoU'] is None and entry['Acc'] is None
      else:
        assert entry['IoU'] == pytest.approx(100 * ref['iou'][c])
        assert entry['Acc'] == pytest.approx(100 * ref['acc'][c])
    has_gt = conf[:k, :k].sum(0) > 0
    s = 100 * np.mean(ref['iou'][seen & has_gt])
    u = 100 * np.mean(ref['iou'][~seen & has_gt])
    assert m['mIoU_seen'] == pytest.approx(s)
    assert m['mIoU_unseen'] == pytest.approx(u)
    assert m['hIoU'] == pytest.approx(2 * s * u / (s + u))


def test_undefined_values_are_none():
  names = ['a', 'b']
  empty = metrics.compute_metrics(np.zeros((3, 3), np.int64), names,
                                  np.array([True, False]), 'd', 'seg', 0)
  for key in ('mIoU', 'mIoU_seen', 'mIoU_unseen', 'hIoU', 'pAcc', 'mAcc', 'fwIoU'):
    assert empty[key] is None, key
  # No unseen classes (seen-only evaluation): unseen mean and harmonic mean are undefined.
  conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
  m = metrics.compute_metrics(conf, names, np.array([True, True]), 'd', 'seg', 1)
  assert m['mIoU_unseen'] is None and m['hIoU'] is None
  assert m['mIoU_seen'] == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)
  # Both split means 0 -> harmonic mean 0 (not 0/0).
  conf = np.array([[0, 2, 0], [3, 0, 0], [0, 0, 0]])
  m = metrics.compute_metrics(conf, names, np.array([True, False]), 'd', 'seg', 1)
  assert m['mIoU_seen'] == 0.0 and m['mIoU_unseen'] == 0.0 and m['hIoU'] == 0.0


def test_bad_labels_or_predictions_raise():
  conf = _hand_conf()
  conf[4, 4] = 1                       # a label outside [0, K) that is not ignore
  with pytest.raises(ValueError, match='labels outside'):
    metrics.compute_metrics(conf, list('ABCD'), np.ones(4, bool), 'd', 'seg', 1)
  conf = _hand_conf()
  conf[4, 0] = 2                       # a prediction outside [0, K)
  with pytest.raises(ValueError):
    metrics.compute_metrics(conf, list('ABCD'), np.ones(4, bool), 'd', 'seg', 1)
  with pytest.raises(ValueError):
    metrics.compute_metrics(_hand_conf(), list('ABC'), np.ones(3, bool), 'd', 'seg', 1)


def _conf_reference(pred, label, k, ignore, valid):
  """Pixel-by-pixel loop over the documented layout."""
  conf = np.zeros((k + 1, k + 1), np.int64)
  for b in range(pred.shape[0]):
    if not valid[b]:
      continue
    for p, g in zip(pred[b].ravel(), label[b].ravel()):
      if g == ignore:
        if 0 <= p < k:
          conf[p, k] += 1
      elif not 0 <= g < k:
        conf[k, k] += 1
      elif 0 <= p < k:
        conf[p, g] += 1
      else:
        conf[k, g] += 1
  return conf


@pytest.mark.parametrize('ignore', [255, 65535])
def test_confusion_matrix_against_loop(ignore):
  rng = np.random.default_rng(1)
  k, b, h, w = 5, 4, 6, 7
  pred = rng.integers(0, k, (b, h, w)).astype(np.int32)
  label = rng.integers(0, k, (b, h, w)).astype(np.int32)
  label[rng.random((b, h, w)) < 0.2] = ignore
  label[0, 0, :3] = [k, 17, -1]        # bad labels in a valid example
  label[2, 1, 1] = k + 3               # bad label in an invalid example: not counted
  pred[1, 2, :2] = [k, -2]             # bad predictions on labelled pixels
  label[1, 2, :2] = [0, 3]
  label[1, 3, 0], pred[1, 3, 0] = ignore, k   # bad prediction on an ignore pixel: dropped
  valid = np.array([True, True, False, True])
  fn = jax.jit(metrics.confusion_matrix, static_argnums=(2, 3))
  conf = np.asarray(fn(jnp.asarray(pred), jnp.asarray(label), k, ignore, jnp.asarray(valid)))
  assert conf.dtype == np.int32 and conf.shape == (k + 1, k + 1)
  np.testing.assert_array_equal(conf, _conf_reference(pred, label, k, ignore, valid))
  assert conf[k, k] == 3 and conf[k, :k].sum() == 2
  # Every pixel of a valid example is accounted for, except the dropped one.
  assert conf.sum() == valid.sum() * h * w - 1
  with pytest.raises(ValueError):
    metrics.check_confusion(conf)
  # valid=None counts every example; a batch of clean labels passes the check.
  clean = np.where((label >= 0) & (label < k), label, ignore).astype(np.int32)
  conf = np.asarray(metrics.confusion_matrix(jnp.asarray(np.clip(pred, 0, k - 1)),
                                             jnp.asarray(clean), k, ignore))
  assert conf.sum() == b * h * w
  metrics.check_confusion(conf)
  # Ignore pixels never reach the counted block.
  assert conf[:k, :k].sum() == int(np.sum(clean != ignore))


def test_write_metrics_json_atomic(tmp_path):
  m = metrics.compute_metrics(_hand_conf(), list('ABCD'),
                              np.array([True, True, False, False]), 'toy', 'seg', 3)
  path = tmp_path / 'sub' / 'metrics_seg.json'
  metrics.write_metrics_json(m, str(path))
  metrics.write_metrics_json(m, str(path))  # overwrite in place
  loaded = json.loads(path.read_text())
  assert set(loaded) == SCHEMA
  assert loaded == json.loads(json.dumps(m))
  assert loaded['per_class'][3]['IoU'] is None       # JSON null, not NaN
  assert os.listdir(path.parent) == ['metrics_seg.json']   # no temporary file left
  assert os.stat(path).st_mode & stat.S_IROTH
  with pytest.raises(ValueError):                    # NaN is refused, nothing written
    metrics.write_metrics_json({'mIoU': float('nan')}, str(tmp_path / 'nan.json'))
  assert not (tmp_path / 'nan.json').exists()
  assert os.listdir(tmp_path) == ['sub']
