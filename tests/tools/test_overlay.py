"""Prediction overlays (tools/predict.py overlay / overlay_figure / palette), no model needed."""
import numpy as np
import pytest
from PIL import Image

from zegformer_jax.tools import predict

NAMES = [f'class {i}' for i in range(25)]
WHITE = 255   # on a white image a class is shown in exactly its palette colour (blend)


def _labels(h, w, classes):
  """Vertical stripes of the given classes, widest first (so counts are ordered)."""
  weights = np.arange(len(classes), 0, -1)
  edges = np.concatenate([[0], np.cumsum(weights)]) * w // weights.sum()
  out = np.zeros((h, w), np.int64)
  for c, a, b in zip(classes, edges[:-1], edges[1:]):
    out[:, a:b] = c
  return out


def _legend(fig):
  leg = fig.legends[0]
  return [t.get_text() for t in leg.get_texts()], leg.legend_handles


def _centre_colour(panel, labels, c, scale):
  """Panel colour at the centre of class c's pixels (far from the outlined boundaries)."""
  ys, xs = np.nonzero(labels == c)
  y, x = int(np.median(ys)), int(np.median(xs))
  return panel[y * scale + scale // 2, x * scale + scale // 2]


def test_palette_rule():
  from matplotlib import colormaps
  p = predict.palette(60)
  assert p.dtype == np.uint8 and p.shape == (60, 3)
  assert len({tuple(c) for c in p[:54]}) == 54                      # 54 distinct colours
  np.testing.assert_array_equal(p[54:], p[:6])                      # then it cycles
  np.testing.assert_array_equal(predict.palette(7), p[:7])          # prefix-stable

  def rgb(name, i):
    return np.round(np.asarray(colormaps[name].colors[i][:3]) * 255).astype(np.uint8)

  np.testing.assert_array_equal(p[0], rgb('tab20', 0))              # tab20 dark shades,
  np.testing.assert_array_equal(p[9], rgb('tab20', 1))              # then light ones
  np.testing.assert_array_equal(p[7], rgb('tab20', 16))             # grey pair (14, 15) left out
  np.testing.assert_array_equal(p[18], rgb('tab20b', 0))
  np.testing.assert_array_equal(p[23], rgb('tab20c', 0))
  np.testing.assert_array_equal(p[27], rgb('tab20b', 1))
  assert not any(c[0] == c[1] == c[2] for c in p)                   # no greys
  steps = np.linalg.norm(np.diff(p.astype(float), axis=0), axis=1)
  assert steps.min() > 25                                           # neighbours differ


def test_display_scale():
  assert predict.display_scale(64, 64) == 6                         # 384 / 64
  assert predict.display_scale(50, 90) == 8                         # ceil(384 / 50)
  assert predict.display_scale(400, 600) == 1
  assert predict.display_scale(1000, 3000) == pytest.approx(384 / 1000)


def test_overlay_panels_legend_and_colours(tmp_path):
  h = w = 64
  image = np.full((h, w, 3), WHITE, np.uint8)
  labels = _labels(h, w, [3, 0, 21])
  truth = _labels(h, w, [3, 7, 0])
  truth[:4] = 255                                                   # not labelled
  fig = predict.overlay_figure(image, labels, NAMES, ground_truth=truth, title='t')
  assert [ax.get_title() for ax in fig.axes] == ['input (64x64 px, shown x6)', 'prediction',
                                                 'ground truth']
  panels = [ax.images[0].get_array() for ax in fig.axes]
  assert all(np.shape(p) == (384, 384, 3) for p in panels)         # nearest-neighbour x6
  np.testing.assert_array_equal(panels[0], np.full((384, 384, 3), WHITE))
  # Each panel is shown 1:1: its axes is 384 px wide and high in the figure.
  bbox = fig.axes[1].get_window_extent()
  assert (bbox.width, bbox.height) == pytest.approx((384, 384), abs=1)

  names, handles = _legend(fig)
  # Predicted classes by pixel count, then ground-truth-only ones, then the ignore entry.
  assert names == ['class 3', 'class 0', 'class 21', 'class 7', '(not labelled)']
  colours = predict.palette(len(NAMES))
  for name, handle in zip(names[:-1], handles):
    c = NAMES.index(name)
    assert handle.get_facecolor()[:3] == pytest.approx(tuple(colours[c] / 255))
  for c in (3, 0, 21):
    np.testing.assert_array_equal(_centre_colour(panels[1], labels, c, 6), colours[c])
  for c in (3, 7, 0):
    np.testing.assert_array_equal(_centre_colour(panels[2], truth, c, 6), colours[c])
  np.testing.assert_array_equal(panels[2][2 * 6 + 3, 5], [WHITE] * 3)   # ignore: plain image
  # Segment boundaries are outlined (darker than either side).
  x = np.nonzero(labels[0] != labels[0, 0])[0][0] * 6 - 1
  assert panels[1][100, x].sum() < min(panels[1][100, x - 3].sum(), panels[1][100, x + 3].sum())

  path = predict.overlay(image, labels, NAMES, str(tmp_path / 'o.png'), ground_truth=truth)
  assert path == str(tmp_path / 'o.png')
  with Image.open(path) as im:
    assert im.format == 'PNG'
    assert im.size[0] > 3 * 384 + 100                               # three panels + legend
    assert 384 <= im.size[1] < 384 + 150


def test_overlay_without_ground_truth_and_tall_legend(tmp_path):
  h, w = 50, 90
  labels = _labels(h, w, list(range(25)))
  fig = predict.overlay_figure(np.full((h, w, 3), WHITE, np.uint8), labels, NAMES)
  assert [ax.get_title() for ax in fig.axes] == ['input (90x50 px, shown x8)', 'prediction']
  assert fig.axes[1].images[0].get_array().shape == (400, 720, 3)
  names, _ = _legend(fig)
  present = np.unique(labels)
  assert 15 < len(present) < len(NAMES)
  assert sorted(names) == sorted(NAMES[c] for c in present)        # exactly the classes present
  fig.canvas.draw()
  columns = {round(t.get_window_extent().x0) for t in fig.legends[0].get_texts()}
  assert len(columns) > 1                                           # 20+ rows do not fit 400 px
  assert fig.legends[0].get_window_extent().height <= 400 + 1       # beside the panels
  path = predict.overlay(np.zeros((h, w, 3), np.uint8), labels, NAMES, str(tmp_path / 'p.png'))
  with Image.open(path) as im:
    assert im.size[0] > 2 * 720 and 400 <= im.size[1] < 400 + 150


def test_same_class_same_colour_across_images():
  a_lab = _labels(64, 64, [7, 2])
  b_lab = _labels(40, 100, [11, 7, 5])
  a = predict.overlay_figure(np.full((64, 64, 3), WHITE, np.uint8), a_lab, NAMES)
  b = predict.overlay_figure(np.full((40, 100, 3), WHITE, np.uint8), b_lab, NAMES)
  pa, pb = a.axes[1].images[0].get_array(), b.axes[1].images[0].get_array()
  ca, cb = _centre_colour(pa, a_lab, 7, 6), _centre_colour(pb, b_lab, 7, 10)
  np.testing.assert_array_equal(ca, cb)
  assert not np.array_equal(ca, _centre_colour(pb, b_lab, 11, 10))
  ha = dict(zip(*_legend(a)))['class 7'].get_facecolor()
  hb = dict(zip(*_legend(b)))['class 7'].get_facecolor()
  assert ha == hb


def test_shading_keeps_the_hue_and_rejects_mismatched_sizes():
  colours = predict.palette(3)
  image = np.zeros((2, 2, 3), np.uint8)
  image[0, 0] = 255
  out = predict.blend(image, np.array([[1, 1], [1, 255]]), colours)
  np.testing.assert_array_equal(out[0, 0], colours[1])                # white: the colour
  np.testing.assert_array_equal(out[0, 1], np.round(colours[1] * 0.6))  # black: 60 % of it
  np.testing.assert_array_equal(out[1, 1], [0, 0, 0])                 # ignore: grey image
  with pytest.raises(ValueError, match='ground truth'):
    predict.overlay_figure(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), int), ['a'],
                           ground_truth=np.zeros((4, 5), int))
