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


# ----------------------------------------------------------------------------- text sizes, fonts


def _text_sizes(fig):
  leg = fig.legends[0]
  return ({t.get_fontsize() for t in leg.get_texts()}, leg.get_title().get_fontsize(),
          fig.axes[0].title.get_fontsize())


def test_text_grows_with_the_panels():
  """The legend and titles keep their size relative to the picture: 12 pt on 384-px panels,
  proportionally more on larger ones (capped at 3x)."""
  sizes = {}
  for h, w in ((64, 64), (600, 800), (1024, 1000), (2000, 3000)):
    labels = _labels(h, w, [1, 2])
    fig = predict.overlay_figure(np.full((h, w, 3), WHITE, np.uint8), labels, NAMES)
    texts, legend_title, panel_title = _text_sizes(fig)
    panel = fig.axes[1].images[0].get_array().shape[:2]
    assert len(texts) == 1 and legend_title == next(iter(texts))
    sizes[(h, w)] = (next(iter(texts)), panel_title, panel)
  assert sizes[(64, 64)][:2] == (12, 13) and sizes[(64, 64)][2] == (384, 384)
  assert sizes[(600, 800)][0] == pytest.approx(12 * 600 / 384)          # short side 600 px
  assert sizes[(1024, 1000)][0] == pytest.approx(12 * 1000 / 384)
  assert sizes[(2000, 3000)][2] == (683, 1024)                         # shrunk to the display
  assert sizes[(2000, 3000)][0] == pytest.approx(12 * 683 / 384)
  # Text height in pixels relative to the panel: the same for small and large panels.
  ratio = [sizes[k][0] / min(sizes[k][2]) for k in ((64, 64), (600, 800), (1024, 1000))]
  assert max(ratio) == pytest.approx(min(ratio))


def test_large_images_are_shrunk_before_blending():
  """A 3000 x 2000 photo is blended at display size (1024 px long side), 1:1 on screen; the
  legend still counts full-resolution pixels, so a class of a few pixels is listed."""
  h, w = 2000, 3000
  labels = _labels(h, w, [4, 9])
  labels[5:7, 5:7] = 13                                            # 4 pixels: gone when shrunk
  image = np.full((h, w, 3), WHITE, np.uint8)
  fig = predict.overlay_figure(image, labels, NAMES)
  panel = fig.axes[1].images[0].get_array()
  assert panel.shape == (683, 1024, 3)
  bbox = fig.axes[1].get_window_extent()
  assert (bbox.width, bbox.height) == pytest.approx((1024, 683), abs=1)
  assert _legend(fig)[0] == ['class 4', 'class 9', 'class 13']
  colours = predict.palette(len(NAMES))
  np.testing.assert_array_equal(panel[300, 200], colours[4])
  assert fig.axes[0].get_title() == 'input (3000x2000 px, shown x0.341333)'


def _cjk_test_font(path, chars, family):
  """A TrueType font with one glyph (a filled bar) for each of `chars`."""
  from fontTools.fontBuilder import FontBuilder
  from fontTools.pens.ttGlyphPen import TTGlyphPen
  names = ['.notdef'] + [f'uni{ord(c):04X}' for c in chars]
  fb = FontBuilder(1000, isTTF=True)
  fb.setupGlyphOrder(names)
  fb.setupCharacterMap({ord(c): n for c, n in zip(chars, names[1:])})
  glyphs = {}
  for n in names:
    pen = TTGlyphPen(None)
    pen.moveTo((100, 300))
    pen.lineTo((900, 300))
    pen.lineTo((900, 500))
    pen.lineTo((100, 500))
    pen.closePath()
    glyphs[n] = pen.glyph()
  fb.setupGlyf(glyphs)
  fb.setupHorizontalMetrics({n: (1000, 100) for n in names})
  fb.setupHorizontalHeader(ascent=880, descent=-120)
  fb.setupNameTable({'familyName': family, 'styleName': 'Regular'})
  fb.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
  fb.setupPost()
  fb.save(str(path))


@pytest.fixture
def cjk_font(tmp_path):
  """A font with 猫 and 犬, installed into matplotlib's font list for the test."""
  from matplotlib import font_manager
  path = tmp_path / 'zeg_test_cjk.ttf'
  _cjk_test_font(path, '猫犬', 'ZegTest CJK')
  before = list(font_manager.fontManager.ttflist)
  font_manager.fontManager.addfont(str(path))
  yield 'ZegTest CJK'
  font_manager.fontManager.ttflist[:] = before
  font_manager.fontManager._findfont_cached.cache_clear()   # pylint: disable=protected-access


def _glyph_warnings(fig):
  import warnings
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    fig.canvas.draw()
  return [str(w.message) for w in caught if 'missing from font' in str(w.message)]


def test_cjk_class_names_use_a_font_that_has_them(cjk_font, caplog):
  names = ['cat 猫', 'dog 犬', 'sky']
  labels = _labels(64, 64, [0, 1, 2])
  assert predict.font_families(names) == ['DejaVu Sans', cjk_font]
  fig = predict.overlay_figure(np.full((64, 64, 3), WHITE, np.uint8), labels, names)
  texts = fig.legends[0].get_texts()
  assert [t.get_text() for t in texts] == names
  assert all(t.get_fontfamily() == ['DejaVu Sans', cjk_font] for t in texts)
  assert _glyph_warnings(fig) == []                 # matplotlib found every glyph
  assert not [r for r in caplog.records if 'no installed font' in r.getMessage()]
  # Without the fallback, the same names are drawn as boxes (matplotlib says so).
  for t in texts:
    t.set_fontfamily(['DejaVu Sans'])
  assert len(_glyph_warnings(fig)) == 2


def test_names_no_font_can_show_are_warned_about_once(caplog, tmp_path):
  from matplotlib import font_manager
  rare = '\U0002A6A5'   # a CJK Extension B ideograph few fonts have
  if any(0x2A6A5 in predict._font_codepoints(e.fname) for e in font_manager.fontManager.ttflist
         if not e.name.startswith('Last Resort')):   # (matplotlib's placeholder boxes)
    pytest.skip('an installed font has U+2A6A5')
  names = [f'dragon {rare}', 'sea']
  labels = _labels(64, 64, [0, 1])
  with caplog.at_level('WARNING'):
    for _ in range(2):
      predict.overlay(np.full((64, 64, 3), WHITE, np.uint8), labels, names,
                      str(tmp_path / 'o.png'))
  warned = [r.getMessage() for r in caplog.records if 'no installed font' in r.getMessage()]
  assert warned == [f"no installed font has glyphs for {rare}: 'dragon {rare}' show as boxes "
                    'in the overlays; install a font that has them (e.g. Noto Sans CJK: '
                    'apt-get install fonts-noto-cjk)']
