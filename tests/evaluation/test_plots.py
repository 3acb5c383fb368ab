"""The per-class IoU chart (evaluation/plots.py): written as a PNG, bars equal to the metrics."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from zegformer_jax.evaluation import metrics as metrics_lib
from zegformer_jax.evaluation import plots


def _metrics(k=6, seen=4, no_gt=(2,), seed=0):
  """compute_metrics of a random confusion matrix; classes in no_gt have no ground truth."""
  rng = np.random.default_rng(seed)
  conf = rng.integers(0, 50, (k, k)) + np.diag(rng.integers(20, 400, k))
  for c in no_gt:
    conf[:, c] = 0
  names = [f'class {i}' for i in range(k)]
  m = metrics_lib.compute_metrics(conf, names, np.arange(k) < seen, 'toyset', 'full', 12)
  m.update(split='val_all', setting='gzs3')
  return m


def _bars(fig):
  ax = fig.axes[0]
  bars = list(ax.containers[0])
  ys = [b.get_y() + b.get_height() / 2 for b in bars]
  labels = [t.get_text() for t in ax.get_yticklabels()]
  return ax, bars, ys, labels


def test_bars_equal_the_metrics_sorted_by_iou():
  m = _metrics()
  fig = plots.metrics_figure(m)
  ax, bars, ys, labels = _bars(fig)
  expected = sorted((c for c in m['per_class'] if c['IoU'] is not None), key=lambda c: -c['IoU'])
  assert len(bars) == len(expected) == 5                    # class 2 has no ground truth
  assert ys == list(range(5))                               # one row per class, in order
  assert ax.get_ylim()[0] > ax.get_ylim()[1]                # first row drawn at the top
  np.testing.assert_allclose([b.get_width() for b in bars], [c['IoU'] for c in expected])
  assert [b.get_width() for b in bars] == sorted([b.get_width() for b in bars], reverse=True)
  assert labels == [c['name'] for c in expected]
  colour = {'seen': plots.SEEN_COLOUR, 'unseen': plots.UNSEEN_COLOUR}
  for b, c in zip(bars, expected):
    assert b.get_facecolor()[:3] == pytest.approx(
        tuple(int(colour[c['split']][i:i + 2], 16) / 255 for i in (1, 3, 5)))
  # The mean lines sit at the metrics' values and the legend names them with their values.
  lines = {l.get_label(): l.get_xdata()[0] for l in ax.get_lines()}
  assert lines == {f'mIoU seen {m["mIoU_seen"]:.2f}': pytest.approx(m['mIoU_seen']),
                   f'mIoU unseen {m["mIoU_unseen"]:.2f}': pytest.approx(m['mIoU_unseen']),
                   f'mIoU {m["mIoU"]:.2f}': pytest.approx(m['mIoU'])}
  legend = [t.get_text() for t in fig.legends[0].get_texts()]
  assert legend[:2] == ['seen class', 'unseen class'] and set(lines) <= set(legend)
  title = ax.get_title()
  for part in ('toyset', 'val_all', 'variant full', 'setting gzs3', f'hIoU {m["hIoU"]:.2f}'):
    assert part in title
  assert '1 class without ground truth left out: class 2' in ax.get_xlabel()


def test_chart_is_a_png_growing_with_the_classes(tmp_path):
  few, many = _metrics(k=6), _metrics(k=60, seen=45, no_gt=())
  p_few = plots.metrics_chart(few, str(tmp_path / 'sub' / 'few.png'))
  p_many = plots.metrics_chart(many, str(tmp_path / 'many.png'))
  assert p_few == str(tmp_path / 'sub' / 'few.png')
  with Image.open(p_few) as a, Image.open(p_many) as b:
    assert a.format == b.format == 'PNG'
    width = plots.WIDTH_INCHES * plots.DPI
    assert a.size[0] == b.size[0] == width
    assert 0.35 * width < a.size[1] < width                 # few classes: landscape
    assert b.size[1] > 1.5 * width                          # 60 classes: tall, ~0.22 in each
    assert b.size[1] - a.size[1] == pytest.approx((60 - 5) * plots.ROW_INCHES * plots.DPI, abs=2)
    assert np.asarray(b.convert('L')).std() > 10            # something is drawn


def test_hundreds_of_classes_show_the_best_and_worst():
  m = _metrics(k=300, seen=250, no_gt=(5, 6, 7, 8, 9))
  fig = plots.metrics_figure(m, max_rows=40)
  ax, bars, ys, labels = _bars(fig)
  ious = sorted((c['IoU'] for c in m['per_class'] if c['IoU'] is not None), reverse=True)
  assert len(bars) == 40 and len(labels) == 41
  np.testing.assert_allclose([b.get_width() for b in bars], ious[:20] + ious[-20:])
  assert ys == list(range(20)) + list(range(21, 41))      # row 20 is the gap
  assert labels[20] == '... 255 classes not shown ...'
  assert 'showing the 20 best and 20 worst of 295' in ax.get_xlabel()
  assert '5 classes without ground truth left out' in ax.get_xlabel()
  assert fig.get_size_inches()[1] < 2.6 + 42 * plots.ROW_INCHES  # capped by max_rows


def test_missing_means_and_no_ground_truth():
  m = _metrics(k=3, seen=3, no_gt=(0, 1, 2))
  assert m['mIoU_seen'] is None and m['mIoU_unseen'] is None
  fig = plots.metrics_figure(m)
  ax, bars, _, _ = _bars(fig)
  assert len(bars) == 0 and 'no class has ground truth' in ax.get_xlabel()
  zs3 = _metrics(k=4, seen=0, no_gt=())
  zs3['setting'] = 'zs3'
  fig = plots.metrics_figure(zs3)
  ax = fig.axes[0]
  assert [t.get_text() for t in fig.legends[0].get_texts()][0] == 'unseen class'  # no seen bars
  assert [l.get_label() for l in ax.get_lines()] == [f'mIoU unseen {zs3["mIoU_unseen"]:.2f}',
                                                     f'mIoU {zs3["mIoU"]:.2f}']


def test_matplotlib_is_imported_only_when_drawing():
  code = ('import sys; import zegformer_jax.evaluation.plots; '
          'assert "matplotlib" not in sys.modules, "imported at module level"')
  subprocess.run([sys.executable, '-c', code], check=True)
