r"""Open-vocabulary prediction: segment any images with any list of class names.

  python -m zegformer_jax.main --mode predict --config configs/shapesworld.py \
      --workdir runs/shapesworld --images a.jpg,b.png --classes "red circle,sand,sky"
  ... --images photos/ --class_file names.txt

For every image it writes, under --output_dir (default <workdir>/predict):
  <stem>_labels.png   class index per pixel (8-bit, 16-bit when more than 256 classes)
  <stem>_overlay.png  input | prediction (class colours blended over the image) [| ground
                      truth], small images magnified, and a legend of the classes present
  <stem>.json         per-class pixel counts and shares, largest first
The variant (seg / img / full), gamma and lambda come from config.eval. A class counts as
"seen" (for Eq. 2 calibration and Eq. 3 fusion) when it is one of the training classes.

Compilation and memory: the test-resized image is padded to a size bucket (bucket_size:
4 lengths per octave), with its valid size given as data, so images of any size share the
bucket's compiled program; the calibrated scores at the test-resized size are brought to
the image's own size and arg-maxed in tiles (upsample_argmax), never held as K full-size
score maps. With test-time augmentation the views are averaged at the test-resized size
(evaluation averages them at the label's size).
"""
import collections
import functools
import json
import logging
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageOps

from zegformer_jax.data import augment
from zegformer_jax.evaluation import evaluator
from zegformer_jax.modeling import clip
from zegformer_jax.modeling import inference
from zegformer_jax.modeling import segmenter
from zegformer_jax.modeling import tta
from zegformer_jax.training import state as state_lib

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')


def parse_classes(classes: str | None, class_file: str | None) -> list[str]:
  """Class names from a comma-separated string or a file with one name per line."""
  if bool(classes) == bool(class_file):
    raise ValueError('give exactly one of --classes or --class_file')
  if class_file:
    if not os.path.isfile(class_file):
      raise FileNotFoundError(f'class file {class_file} does not exist')
    with open(class_file) as f:
      entries = [(f'{class_file}:{i + 1}', line.strip()) for i, line in enumerate(f)
                 if line.strip() or line.strip('\n')]
  else:
    entries = [(f'--classes item {i + 1}', n.strip()) for i, n in enumerate(classes.split(','))]
  names, where = [], {}
  for loc, name in entries:
    if not name:
      raise ValueError(f'empty class name at {loc}')
    if name in where:
      raise ValueError(f'duplicate class name {name!r} at {loc} (first at {where[name]})')
    where[name] = loc
    names.append(name)
  return names


def list_images(images: str) -> list[str]:
  """A comma-separated list of files, or every image file of a folder (sorted)."""
  if not images:
    raise ValueError('--images is required for --mode predict')
  if os.path.isdir(images):
    paths = sorted(os.path.join(images, f) for f in os.listdir(images)
                   if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
      raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in folder {images}')
    return paths
  paths = [p.strip() for p in images.split(',') if p.strip()]
  for p in paths:
    if not os.path.isfile(p):
      raise FileNotFoundError(f'image {p} does not exist')
  return paths


def load_image(path: str) -> np.ndarray:
  """uint8 [H, W, 3] RGB, upright: an EXIF orientation tag (camera photos) is applied, as
  image viewers do; an undecodable file is an error naming it."""
  try:
    with Image.open(path) as im:
      return np.asarray(ImageOps.exif_transpose(im).convert('RGB'))
  except Exception as e:  # PIL raises several types for bad files
    raise ValueError(f'cannot decode image {path}: {e}') from None


MIN_SHORT_SIDE = 384    # label maps are upscaled (nearest neighbour) to at least this
MAX_LONG_SIDE = 1024    # larger images are shown scaled down to this
OVERLAY_DPI = 100
LEGEND_FONT = 12        # points, for panels whose short side is MIN_SHORT_SIDE px
MAX_FONT_SCALE = 3.0    # the fonts grow with the panels up to this factor

_WARNED_UNRENDERABLE: set = set()   # texts named once in the 'no font has glyphs' warning


def font_size(panel_h: float, panel_w: float) -> float:
  """The overlay's text size in points: LEGEND_FONT for panels of MIN_SHORT_SIDE px on
  their short side, proportionally larger for larger panels (up to MAX_FONT_SCALE), so the
  legend and titles keep their size relative to the picture."""
  factor = min(panel_h, panel_w) / MIN_SHORT_SIDE
  return float(LEGEND_FONT * np.clip(factor, 1.0, MAX_FONT_SCALE))


@functools.lru_cache(maxsize=None)
def _font_codepoints(path: str) -> frozenset:
  """The characters a font file has glyphs for (its best cmap; first face of a .ttc)."""
  from fontTools.ttLib import TTFont
  try:
    with TTFont(path, fontNumber=0, lazy=True) as font:
      return frozenset(font.getBestCmap() or {})
  except Exception:  # pylint: disable=broad-except  (an unreadable font covers nothing)
    return frozenset()


def font_families(texts) -> list[str]:
  """Font families for the overlay's texts, for matplotlib's per-character font fallback:
  the default sans-serif font first, then installed fonts with the glyphs it lacks (CJK
  class names, ...), each chosen for covering the most of what is still missing. Texts
  with characters that no installed font has are named in one warning (once per text)."""
  from matplotlib import font_manager
  default = font_manager.findfont(font_manager.FontProperties(family=['sans-serif']))
  families = [font_manager.get_font(default).family_name]
  missing = {ord(c) for t in texts for c in t if not c.isspace()} - _font_codepoints(default)
  if not missing:
    return families
  # Not matplotlib's "Last Resort": it maps every character to a placeholder box.
  fonts = sorted({(e.name, e.fname) for e in font_manager.fontManager.ttflist
                  if not e.name.startswith('Last Resort')})
  while missing:
    name, path = max(fonts, key=lambda f: len(missing & _font_codepoints(f[1])))
    gained = missing & _font_codepoints(path)
    if not gained:
      break
    families.append(name)
    missing -= gained
  unrenderable = [t for t in texts if any(ord(c) in missing for c in t)]
  new = [t for t in dict.fromkeys(unrenderable) if t not in _WARNED_UNRENDERABLE]
  if new:
    _WARNED_UNRENDERABLE.update(new)
    logging.getLogger(__name__).warning(
        'no installed font has glyphs for %s: %s show as boxes in the overlays; install a '
        'font that has them (e.g. Noto Sans CJK: apt-get install fonts-noto-cjk)',
        ' '.join(sorted({c for t in new for c in t if ord(c) in missing})),
        ', '.join(repr(t) for t in new))
  return families


def palette(n: int) -> np.ndarray:
  """[n, 3] uint8 RGB class colours: colour i is base[i % 54]. base holds matplotlib's
  qualitative maps without their grey hue groups (54 distinct colours), read hue by hue so
  that neighbouring class indices get different hues: tab20's 9 dark shades, then their 9
  light ones (indices 0-17), then for each shade of tab20b / tab20c, darkest first, the 5
  tab20b hues followed by the 4 tab20c hues (18-26, 27-35, 36-44, 45-53). A class keeps its
  colour across images for a fixed class list."""
  from matplotlib import colormaps

  def hue_groups(name, shades):   # [hues, shades, 3], greys left out
    groups = np.asarray(colormaps[name].colors)[:, :3].reshape(-1, shades, 3)
    return groups[np.ptp(groups, axis=2).max(axis=1) > 1e-6]

  tab20, tab20b, tab20c = hue_groups('tab20', 2), hue_groups('tab20b', 4), hue_groups('tab20c', 4)
  base = [tab20[:, 0], tab20[:, 1]]
  for shade in range(4):
    base += [tab20b[:, shade], tab20c[:, shade]]
  base = np.round(np.concatenate(base) * 255).astype(np.uint8)
  return base[np.arange(n) % len(base)].reshape(n, 3)


def blend(image: np.ndarray, labels: np.ndarray, colours: np.ndarray,
          shade: float = 0.4) -> np.ndarray:
  """uint8 [H, W, 3]: each pixel in its class colour, darkened by the image's luminance g
  (0..1) as colour * (1 - shade + shade * g), so the colour keeps its hue (it matches the
  legend; a white pixel shows the colour exactly) and the image's shapes and texture stay
  visible; labels outside [0, len(colours)) (ignore pixels) show the grey image."""
  grey = np.asarray(image, np.float32) @ np.asarray([0.299, 0.587, 0.114], np.float32) / 255
  valid = (labels >= 0) & (labels < len(colours))
  tint = colours[np.where(valid, labels, 0)].astype(np.float32)
  out = tint * (1 - shade + shade * grey)[..., None]
  plain = np.repeat(255 * grey[..., None], 3, axis=-1)
  return np.clip(np.round(np.where(valid[..., None], out, plain)), 0, 255).astype(np.uint8)


def outline(panel: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Darkens the pixels of `panel` where `labels` changes to the right or below (a 1-px
  boundary between segments; both arrays at display resolution)."""
  edge = np.zeros(labels.shape, bool)
  edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
  edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
  out = panel.copy()
  out[edge] = (out[edge] * 0.25).astype(np.uint8)
  return out


def display_scale(h: int, w: int) -> float:
  """How much an h x w image is magnified on screen: an integer >= 1 bringing the short side
  to at least MIN_SHORT_SIDE px (nearest neighbour), or < 1 for images whose long side
  exceeds MAX_LONG_SIDE (and short side MIN_SHORT_SIDE)."""
  if min(h, w) < MIN_SHORT_SIDE:
    return float(int(np.ceil(MIN_SHORT_SIDE / min(h, w))))
  if max(h, w) > MAX_LONG_SIDE:
    return max(MIN_SHORT_SIDE / min(h, w), MAX_LONG_SIDE / max(h, w))
  return 1.0


def overlay_figure(image: np.ndarray, labels: np.ndarray, names: list[str],
                   ground_truth: np.ndarray | None = None, title: str = '',
                   shade: float = 0.4):
  """The overlay as a matplotlib Figure (Agg canvas): panels input | prediction [| ground
  truth], each magnified by display_scale (integer factors by pixel repetition, so every
  panel shows the upscaled arrays 1:1), and to their right a legend of the classes present
  in the prediction or the ground truth (largest in the prediction first; then
  '(not labelled)' when the ground truth has ignore pixels). Colours: palette(len(names)),
  shaded by the image's luminance (blend), with 1-px dark segment boundaries (outline).
  Images larger than the display are shrunk first (the image bilinearly with antialiasing,
  label maps by nearest neighbour), so panels are always shown 1:1 and nothing is blended
  at full resolution. Text sizes follow the panels (font_size); fonts fall back to ones
  with the glyphs of the class names (font_families: CJK, ...).
  fig.axes[1].images[0] holds the prediction panel's array; fig.legends[0] the legend."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch

  image = np.asarray(image)
  labels = np.asarray(labels)
  h, w = labels.shape
  if image.shape[:2] != (h, w):
    raise ValueError(f'overlay: image {image.shape[:2]} and labels {(h, w)} differ in size')
  if ground_truth is not None:
    ground_truth = np.asarray(ground_truth)
    if ground_truth.shape != (h, w):
      raise ValueError(f'overlay: ground truth {ground_truth.shape} and labels {(h, w)} '
                       'differ in size')
  k = len(names)
  colours = palette(k)
  scale = display_scale(h, w)
  rep = int(scale) if scale >= 1 else 1
  full_hw = (h, w)
  counts = np.bincount(labels.ravel(), minlength=k)[:k]   # the legend: full resolution
  unlabelled = False
  if ground_truth is not None:
    gt_valid = (ground_truth >= 0) & (ground_truth < k)
    unlabelled = bool((~gt_valid).any())
    gt_counts = np.bincount(ground_truth[gt_valid].ravel(), minlength=k)[:k]
    del gt_valid
  if scale < 1:   # shrunk to the display size first: never blended at full resolution
    h, w = max(1, round(h * scale)), max(1, round(w * scale))
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))  # antialiased
    labels = augment.resize_label(labels, (h, w))
    if ground_truth is not None:
      ground_truth = augment.resize_label(ground_truth, (h, w))

  def up(a):
    return np.repeat(np.repeat(a, rep, axis=0), rep, axis=1) if rep > 1 else a

  def coloured(label_map):   # blended at display resolution, segment boundaries outlined
    return outline(up(blend(image, label_map, colours, shade)), up(label_map))

  panels = [(f'input ({full_hw[1]}x{full_hw[0]} px' +
             (f', shown x{scale:g})' if scale != 1 else ')'), up(image)),
            ('prediction', coloured(labels))]
  present = [int(c) for c in np.argsort(-counts, kind='stable') if counts[c]]
  if ground_truth is not None:
    panels.append(('ground truth', coloured(ground_truth)))
    present += [int(c) for c in np.argsort(-gt_counts, kind='stable')
                if gt_counts[c] and not counts[c]]

  # Layout in pixels (dpi OVERLAY_DPI): panels side by side, titles above, legend right.
  # Fonts grow with the panels; the families fall back to fonts with CJK (...) glyphs.
  pw, ph = w * rep, h * rep
  font = font_size(ph, pw)
  grow = font / LEGEND_FONT
  families = font_families([names[c] for c in present] + [title, '(not labelled)'])

  def props(size):
    from matplotlib.font_manager import FontProperties
    return FontProperties(family=families, size=size)

  pad, title_h = 16, round(34 * grow)
  top = title_h + (round(40 * grow) if title else 0)
  fig_w = pad + len(panels) * (pw + pad)
  fig_h = top + ph + pad
  fig = Figure(figsize=(fig_w / OVERLAY_DPI, fig_h / OVERLAY_DPI), dpi=OVERLAY_DPI)
  FigureCanvasAgg(fig)
  for i, (name, array) in enumerate(panels):
    ax = fig.add_axes(((pad + i * (pw + pad)) / fig_w, pad / fig_h, pw / fig_w, ph / fig_h))
    ax.imshow(array, interpolation='nearest')   # 1:1 (magnified or shrunk beforehand)
    ax.set_title(name, fontproperties=props(font + grow))
    ax.set_xticks([])
    ax.set_yticks([])
  if title:
    fig.suptitle(title, fontproperties=props(font + 2 * grow), y=1 - 8 / fig_h, va='top')

  handles = [Patch(facecolor=colours[c] / 255, edgecolor='0.25', label=names[c])
             for c in present]
  if unlabelled:
    handles.append(Patch(facecolor='white', edgecolor='0.25', hatch='//',
                         label='(not labelled)'))
  row_px = 1.65 * font * OVERLAY_DPI / 72   # one legend row (patch + spacing)
  rows = max(1, int(ph // row_px) - 1)              # below the legend's title
  fig.legend(handles=handles, loc='upper left', bbox_to_anchor=(1 - pad / 2 / fig_w,
                                                                (pad + ph) / fig_h),
             ncols=max(1, -(-len(handles) // rows)), prop=props(font), frameon=False,
             borderaxespad=0, handlelength=1.6, handleheight=1.1, title='classes present',
             title_fontproperties=props(font), alignment='left')
  return fig


def overlay(image: np.ndarray, labels: np.ndarray, names: list[str], path: str,
            ground_truth: np.ndarray | None = None, title: str = '',
            shade: float = 0.4) -> str:
  """Writes the overlay figure (overlay_figure) as a PNG at path; returns path. The PNG's
  bounding box is the figure's plus the legend (bbox_inches='tight'), panels stay 1:1."""
  fig = overlay_figure(image, labels, names, ground_truth, title, shade)
  with warnings.catch_warnings():   # font_families named the texts no font can show
    warnings.filterwarnings('ignore', message='Glyph .* missing from font')
    fig.savefig(path, dpi=OVERLAY_DPI, bbox_inches='tight', pad_inches=0.15, format='png')
  return path


def shares(labels: np.ndarray, names: list[str]) -> list[dict]:
  counts = np.bincount(labels.ravel(), minlength=len(names))
  total = labels.size
  return [{'name': names[c], 'pixels': int(counts[c]), 'share': float(counts[c] / total)}
          for c in np.argsort(-counts, kind='stable') if counts[c]]


def seen_mask_for(config, names: list[str]) -> np.ndarray:
  """True for names among the training classes (evaluator.training_class_names)."""
  return evaluator.seen_by_name(names, evaluator.training_class_names(config))


def output_stems(paths: list[str]) -> dict:
  """{path: stem of its outputs}: the file name without extension, unless two inputs share
  it (a.png and a.jpg, or photos/a.png and more/a.png), which then keep their extension, and
  their folder too when that is not enough, so no output overwrites another."""
  def base(p, with_ext):
    name = os.path.basename(p)
    return name.replace('.', '_') if with_ext else os.path.splitext(name)[0]
  stems = {p: base(p, False) for p in paths}
  for with_ext, with_dir in ((True, False), (True, True)):
    taken = collections.Counter(stems.values())
    for p in paths:
      if taken[stems[p]] > 1:
        stem = base(p, with_ext)
        if with_dir:
          folder = os.path.basename(os.path.dirname(os.path.abspath(p)))
          stem = f'{folder}_{stem}'
        stems[p] = stem
  clashes = collections.Counter(stems.values())
  if any(n > 1 for n in clashes.values()):
    same = sorted(p for p in paths if clashes[stems[p]] > 1)
    raise ValueError('input images with the same name in folders of the same name: '
                     + ', '.join(same))
  return stems


BUCKET_BITS = 2            # 2^2 = 4 padded sizes per octave: padding < 25% of a side
UPSAMPLE_TILE = 256        # output tiles of upsample_argmax (memory ~ K x tile^2 floats)


def bucket_size(n: int, div: int) -> int:
  """The padded length of a side of n > 2^k pixels: the next multiple of 2^(k - BUCKET_BITS)
  (and of div), so only 2^BUCKET_BITS lengths per octave occur."""
  n, div = int(n), max(1, int(div))
  step = 1 << max(0, (n - 1).bit_length() - 1 - BUCKET_BITS)
  step = -(-step // div) * div
  return -(-n // step) * step


def bucket_shape(hw, div: int) -> tuple[int, int]:
  """(H, W) bucket of a test-resized (h, w): each side bucket_size'd."""
  return bucket_size(hw[0], div), bucket_size(hw[1], div)


@jax.jit
def _upsample_argmax_tile(scores, in_hw, out_hw, origin, tile_hw):
  """argmax over K of the scores [K, H, W] (valid [:ih, :iw]) resized bilinearly to (oh, ow)
  (torch F.interpolate(align_corners=False) = inference.postprocess), for the output
  pixels origin + [0, tile) only. One program for every output size: the sizes and the
  tile's place are data."""
  th, tw = tile_hw.shape
  rows = inference.linear_taps(origin[0], th, in_hw[0], out_hw[0])
  cols = inference.linear_taps(origin[1], tw, in_hw[1], out_hw[1])
  out = inference.bilinear_taps(scores, rows, cols)
  return jnp.argmax(out, axis=0).astype(jnp.int32)


def upsample_argmax(scores, in_hw, out_hw, tile: int = UPSAMPLE_TILE) -> np.ndarray:
  """int32 [oh, ow] labels: per-pixel argmax of the class scores [K, H, W] (valid region
  in_hw) resized bilinearly to out_hw, computed in tile x tile pieces: memory K x tile^2,
  never K x oh x ow (as float32 copies of that, a 3072 x 2304 photo cost ~105 MB per
  class). Every call with scores of one shape runs one compiled program."""
  oh, ow = (int(v) for v in out_hw)
  in_hw = jnp.asarray(in_hw, jnp.int32)
  size = jnp.asarray([oh, ow], jnp.int32)
  shape = np.zeros((tile, tile), np.bool_)   # only its (static) shape is used
  labels = np.empty((-(-oh // tile) * tile, -(-ow // tile) * tile), np.int32)
  for r in range(0, oh, tile):
    for c in range(0, ow, tile):
      labels[r:r + tile, c:c + tile] = np.asarray(
          _upsample_argmax_tile(scores, in_hw, size, jnp.asarray([r, c], jnp.int32), shape))
  return labels[:oh, :ow]


def run(config, workdir: str, *, images: str, classes: str | None = None,
        class_file: str | None = None, output_dir: str | None = None,
        ground_truths: dict | None = None) -> list[dict]:
  """Segments `images` with the class list; writes labels PNG, overlay PNG and JSON per
  image. ground_truths: optional {image path: int label map [H, W] in the indices of the
  class list (other values: not labelled)}; those images' overlays add a ground-truth
  panel."""
  names = parse_classes(classes, class_file)
  paths = list_images(images)
  stems = output_stems(paths)
  ground_truths = ground_truths or {}
  output_dir = output_dir or os.path.join(workdir, 'predict')
  os.makedirs(output_dir, exist_ok=True)
  variant = config.eval.variant

  seen = seen_mask_for(config, names)
  # The state tree of the training classes (ZS3Net's classifier has one row per class);
  # method_params then gives the params that classify `names`.
  model, state = state_lib.load_latest_state(
      config, workdir, len(evaluator.training_class_names(config)) or len(names))
  params = evaluator.method_params(config, workdir, state, names)
  text = clip.class_embeddings(config, workdir, names, config.clip.test_prompts)
  clip_model, clip_params, clip_text = segmenter.image_branch(config, workdir, names,
                                                             (variant,))

  results = []
  compiled = {}
  div = int(config.input.size_divisibility)
  for path in paths:
    image = load_image(path)
    h, w = image.shape[:2]
    resized = augment.test_resize(image, config.input.min_size_test, config.input.max_size_test)
    bucket = bucket_shape(resized.shape[:2], div)
    # Scores at the test-resized size: the segmenter's output size is that valid size
    # (given as data) inside the bucket, so one program serves every image of a bucket.
    batch = {'image': jnp.asarray(augment.pad_to(resized, bucket, 0)[None], jnp.float32),
             'image_hw': jnp.asarray([resized.shape[:2]], jnp.int32),
             'label_hw': jnp.asarray([resized.shape[:2]], jnp.int32),
             'view_hw': tta.view_sizes(config.eval, config.input, [[h, w]])}
    view_shapes = {s: bucket_shape(hw, div) for s, hw in
                   tta.padded_view_shapes(config.eval, config.input, [(h, w)]).items()}
    key = (bucket, tuple(sorted(view_shapes.items())))
    if key not in compiled:  # one compilation per bucket (and per TTA view buckets)
      compiled[key] = jax.jit(segmenter.make_scores_fn(config, model, (variant,), bucket,
                                                       clip_model, view_shapes))
    scores = compiled[key](params, state['frozen'], batch, text, seen, clip_params,
                           clip_text)[variant][0]
    labels = upsample_argmax(scores, resized.shape[:2], (h, w))
    stem = stems[path]
    dtype = np.uint8 if len(names) <= 256 else np.uint16
    Image.fromarray(labels.astype(dtype)).save(os.path.join(output_dir, f'{stem}_labels.png'))
    overlay(image, labels, names, os.path.join(output_dir, f'{stem}_overlay.png'),
            ground_truth=ground_truths.get(path),
            title=f'{os.path.basename(path)}: ZegFormer ({variant}), {len(names)} classes')
    record = {'image': path, 'variant': variant, 'classes': shares(labels, names)}
    with open(os.path.join(output_dir, f'{stem}.json'), 'w') as f:
      json.dump(record, f, indent=2)
    results.append(record)
    print(f'{path}: ' + ', '.join(f'{c["name"]} {100 * c["share"]:.1f}%'
                                  for c in record['classes'][:5]), flush=True)
  return results
