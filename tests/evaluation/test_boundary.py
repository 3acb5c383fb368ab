"""Tests of zegformer_jax.evaluation.boundary: seg2bmap, the tolerance matching, P / R / F.

Hand-made partitions with P, R, F worked out by hand, a direct transcription of BSDS's
seg2bmap (MATLAB, 1-based in the comments), and a brute-force oracle for the matching:
all pairs within the tolerance by double loops, maximum matching by Kuhn's augmenting paths
(networkx is not installed in this venv).
"""
import sys
import time

import numpy as np
import pytest

from zegformer_jax.evaluation import boundary

IGN = 255


def _seg2bmap_matlab(seg):
  """Line-by-line transcription of BSDS seg2bmap (width/height = the seg's own)."""
  seg = np.asarray(seg, np.float64)
  h, w = seg.shape
  e = np.zeros_like(seg); s = np.zeros_like(seg); se = np.zeros_like(seg)
  e[:, :-1] = seg[:, 1:]            # e(:,1:end-1) = seg(:,2:end)
  s[:-1, :] = seg[1:, :]            # s(1:end-1,:) = seg(2:end,:)
  se[:-1, :-1] = seg[1:, 1:]        # se(1:end-1,1:end-1) = seg(2:end,2:end)
  b = (seg != e) | (seg != s) | (seg != se)
  b[-1, :] = seg[-1, :] != e[-1, :]  # b(end,:) = (seg(end,:)~=e(end,:))
  b[:, -1] = seg[:, -1] != s[:, -1]  # b(:,end) = (seg(:,end)~=s(:,end))
  b[-1, -1] = False
  return b


def _brute_matching(b1, b2, max_dist):
  p1 = np.argwhere(b1)
  p2 = np.argwhere(b2)
  d2 = np.sum((p1[:, None, :] - p2[None, :, :]) ** 2, axis=-1)  # all pairs
  adj = [np.nonzero(row <= max_dist ** 2)[0].tolist() for row in d2]
  owner = [-1] * len(p2)

  def augment(i, seen):
    for j in adj[i]:
      if not seen[j]:
        seen[j] = True
        if owner[j] < 0 or augment(owner[j], seen):
          owner[j] = i
          return True
    return False

  return sum(augment(i, [False] * len(p2)) for i in range(len(p1)))


def _halves(col, h=100, w=100, a=0, b=1):
  """Left (columns < col) = a, right = b; the boundary is column col - 1."""
  x = np.full((h, w), b, np.int32)
  x[:, :col] = a
  return x


# 100 x 100: maxDist = 0.0075 * sqrt(2) * 100 = 1.06 px: a 1-pixel shift is within, 2 not.


def test_seg2bmap_matches_bsds_transcription():
  rng = np.random.default_rng(0)
  for shape in [(1, 1), (1, 5), (5, 1), (7, 9), (16, 16)]:
    seg = rng.integers(0, 3, shape)
    np.testing.assert_array_equal(boundary.boundary_map(seg), _seg2bmap_matlab(seg))


def test_boundary_map_hand():
  # A vertical edge between columns 1 and 2: column 1 is the boundary (also on the last
  # row, by the east rule); the last column and bottom-right never are.
  seg = _halves(2, 4, 4)
  expect = np.zeros((4, 4), bool)
  expect[:, 1] = True
  np.testing.assert_array_equal(boundary.boundary_map(seg), expect)
  # A single pixel of another label at (1, 1): itself (east/south/SE differ), (0, 0) by SE,
  # (0, 1) by south, (1, 0) by east.
  seg = np.zeros((4, 4), int)
  seg[1, 1] = 1
  expect = np.zeros((4, 4), bool)
  expect[[1, 0, 0, 1], [1, 0, 1, 0]] = True
  np.testing.assert_array_equal(boundary.boundary_map(seg), expect)


def test_identical_partitions():
  rng = np.random.default_rng(1)
  gt = np.kron(rng.integers(0, 4, (10, 10)), np.ones((10, 10), int))
  counts = boundary.match_counts(gt, gt, IGN)
  assert counts[0] == counts[1] == counts[2] == counts[3] > 0
  assert boundary.prf(*counts) == {'F_b': 100.0, 'P_b': 100.0, 'R_b': 100.0}
  # Relabelling the prediction does not matter (class-agnostic).
  assert boundary.match_counts((gt + 7) * 3, gt, IGN) == counts


def test_shift_within_and_beyond_tolerance():
  gt = _halves(50)
  assert boundary.match_counts(_halves(51), gt, IGN) == (100, 100, 100, 100)
  assert boundary.match_counts(_halves(49), gt, IGN) == (100, 100, 100, 100)
  assert boundary.match_counts(_halves(52), gt, IGN) == (0, 100, 0, 100)
  assert boundary.prf(0, 100, 0, 100) == {'F_b': 0.0, 'P_b': 0.0, 'R_b': 0.0}
  # A larger tolerance reaches 2 pixels: 2 / (0.0075 * 141.42) = 1.886 -> use 0.015.
  assert boundary.match_counts(_halves(52), gt, IGN, tolerance=0.015) == (100, 100, 100, 100)


def test_extra_boundary():
  gt = _halves(50)
  pred = gt.copy()
  pred[50:, :50] = 2  # a horizontal boundary on row 49, columns 0..48 (49 new pixels)
  assert boundary.match_counts(pred, gt, IGN) == (100, 149, 100, 100)
  r = boundary.prf(100, 149, 100, 100)
  assert r['P_b'] == pytest.approx(100 * 100 / 149)
  assert r['R_b'] == 100.0
  assert r['F_b'] == pytest.approx(100 * 200 / 249)


def test_empty_prediction():
  gt = _halves(50)
  counts = boundary.match_counts(np.zeros_like(gt), gt, IGN)
  assert counts == (0, 0, 0, 100)
  assert boundary.prf(*counts) == {'F_b': 0.0, 'P_b': None, 'R_b': 0.0}
  # No GT boundary either: everything undefined; predicted boundaries only: P = 0.
  flat = np.zeros_like(gt)
  assert boundary.prf(*boundary.match_counts(flat, flat, IGN)) == {
      'F_b': None, 'P_b': None, 'R_b': None}
  assert boundary.prf(*boundary.match_counts(gt, flat, IGN)) == {
      'F_b': 0.0, 'P_b': 0.0, 'R_b': None}


def test_one_to_one():
  # A double predicted contour (columns 48 and 49) against a single GT contour (column 49):
  # only one of the two can take each GT pixel.
  gt = _halves(50)
  pred = _halves(50)
  pred[:, 49] = 2
  assert boundary.match_counts(pred, gt, IGN) == (100, 200, 100, 100)


def test_ignore_exclude():
  # GT: 0 | ignore band (columns 48..51) | 1. Class-ignore contours are dropped, so the GT
  # has no boundary; the predicted contour inside the band (column 49) is not counted.
  gt = _halves(50)
  gt[:, 48:52] = IGN
  assert boundary.match_counts(_halves(50), gt, IGN) == (0, 0, 0, 0)
  # A predicted contour on labelled pixels (column 29) counts and is unmatched.
  pred = _halves(50)
  pred[:, :30] = 3
  assert boundary.match_counts(pred, gt, IGN) == (0, 100, 0, 0)
  # A GT class contour on row 19 (columns 0..47 and 52..99; the last column by its south
  # rule), predicted exactly: the prediction's row-19 pixels on the band (48..51) are not
  # counted.
  gt[20:, :] = np.where(gt[20:, :] == IGN, IGN, gt[20:, :] + 5)
  pred = np.zeros_like(gt)
  pred[20:] = 5
  n = 48 + 48
  assert boundary.match_counts(pred, gt, IGN) == (n, n, n, n)
  bp, bg = boundary.boundary_maps(pred, gt, IGN)
  assert int(bp[19].sum()) == int(bg[19].sum()) == n and not bp[19, 48:52].any()


def test_ignore_nearest():
  # Same band: ignore columns 48, 49 fill with 0 (left), 50, 51 with 1: the GT contour is
  # column 49, the band's middle, and the prediction's contour there matches.
  gt = _halves(50)
  gt[:, 48:52] = IGN
  assert boundary.match_counts(_halves(50), gt, IGN, ignore_mode='nearest') == (
      100, 100, 100, 100)
  assert boundary.match_counts(_halves(52), gt, IGN, ignore_mode='nearest') == (
      0, 100, 0, 100)
  with pytest.raises(ValueError):
    boundary.match_counts(gt, gt, IGN, ignore_mode='bogus')


@pytest.mark.parametrize('seed', range(12))
def test_matching_against_brute_force(seed):
  rng = np.random.default_rng(seed)
  h, w = rng.integers(4, 14, 2)
  tol = rng.choice([0.05, 0.1, 0.2])
  max_dist = tol * np.hypot(h, w)
  gt = rng.integers(0, 3, (h, w))
  pred = rng.integers(0, 3, (h, w))
  if seed % 2:
    gt[rng.random((h, w)) < 0.2] = IGN
  bp, bg = boundary.boundary_maps(pred, gt, IGN)
  expect = _brute_matching(bp, bg, max_dist)
  assert expect == _brute_matching(bg, bp, max_dist)
  assert boundary.match_counts(pred, gt, IGN, tolerance=tol) == (
      expect, int(bp.sum()), expect, int(bg.sum()))


def test_layered_blocks_against_brute_force_and_fast():
  # Block partitions give long chain-like boundary graphs, the layered structure on which
  # scipy's maximum_bipartite_matching takes exponential time (scipy issue #26147).
  rng = np.random.default_rng(7)
  sys.setrecursionlimit(max(sys.getrecursionlimit(), 20000))
  for _ in range(2):
    gt = np.kron(rng.integers(0, 6, (12, 12)), np.ones((8, 8), int))
    pred = np.kron(rng.integers(0, 6, (12, 12)), np.ones((8, 8), int))
    bp, bg = boundary.boundary_maps(pred, gt, IGN)
    expect = _brute_matching(bp, bg, 0.03 * np.hypot(96, 96))
    assert boundary.match_counts(pred, gt, IGN, tolerance=0.03)[0] == expect
  gt = np.kron(rng.integers(0, 20, (8, 8)), np.ones((32, 32), int))
  pred = np.kron(rng.integers(0, 20, (8, 8)), np.ones((32, 32), int))
  start = time.perf_counter()
  boundary.match_counts(pred, gt, IGN)
  assert time.perf_counter() - start < 5.0  # ~0.01 s; scipy's Hopcroft-Karp: ~30 s


def test_accumulator_sums_counts():
  acc = boundary.BoundaryAccumulator(IGN)
  gt = _halves(50)
  pred = gt.copy()
  pred[50:, :50] = 2
  assert acc.add(pred, gt) == (100, 149, 100, 100)
  assert acc.add(np.zeros_like(gt), gt) == (0, 0, 0, 100)
  assert acc.num_images == 2
  r = acc.result()
  assert set(r) == {'F_b', 'P_b', 'R_b'}
  p, rec = 100 * 100 / 149, 100 * 100 / 200
  assert r['P_b'] == pytest.approx(p)
  assert r['R_b'] == pytest.approx(rec)
  assert r['F_b'] == pytest.approx(2 * p * rec / (p + rec))
  assert boundary.BoundaryAccumulator(IGN).result() == {'F_b': None, 'P_b': None, 'R_b': None}
