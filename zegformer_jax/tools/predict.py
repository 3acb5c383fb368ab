r"""Open-vocabulary prediction: segment any images with any list of class names.

  python -m zegformer_jax.main --mode predict --config configs/shapesworld.py \
      --workdir runs/shapesworld --images a.jpg,b.png --classes "red circle,sand,sky"
  ... --images photos/ --class_file names.txt

For every image it writes, under --output_dir (default <workdir>/predict):
  <stem>_labels.png   class index per pixel (8-bit, 16-bit when more than 256 classes)
  <stem>_overlay.png  the image blended with class colours, with a legend of the classes present
  <stem>.json         per-class pixel counts and shares, largest first
The variant (seg / img / full), gamma and lambda come from config.eval. A class counts as
"seen" (for Eq. 2 calibration and Eq. 3 fusion) when it is one of the training classes.
"""
import colorsys
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from zegformer_jax.data import augment
from zegformer_jax.evaluation import evaluator
from zegformer_jax.modeling import clip
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
  """uint8 [H, W, 3] RGB; an undecodable file is an error naming it."""
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert('RGB'))
  except Exception as e:  # PIL raises several types for bad files
    raise ValueError(f'cannot decode image {path}: {e}') from None


def palette(n: int) -> np.ndarray:
  """n distinct, deterministic RGB colours (golden-ratio hue steps)."""
  cols = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.75, 0.95) for i in range(n)]
  return (np.asarray(cols) * 255).astype(np.uint8).reshape(n, 3)


def overlay(image: np.ndarray, labels: np.ndarray, names: list[str], alpha=0.5) -> Image.Image:
  """The image blended with class colours, and a legend of the classes present on the right."""
  colours = palette(len(names))
  blend = (image * (1 - alpha) + colours[labels] * alpha).astype(np.uint8)
  present = [int(c) for c in np.argsort(-np.bincount(labels.ravel(), minlength=len(names)))
             if np.any(labels == c)]
  row = 14
  legend_w = 12 + 7 * max([len(names[c]) for c in present] + [4]) + 8
  h = max(image.shape[0], row * len(present) + 8)
  canvas = Image.new('RGB', (image.shape[1] + legend_w, h), (255, 255, 255))
  canvas.paste(Image.fromarray(blend), (0, 0))
  draw = ImageDraw.Draw(canvas)
  x0 = image.shape[1] + 4
  for i, c in enumerate(present):
    y = 4 + i * row
    draw.rectangle([x0, y, x0 + 9, y + 9], fill=tuple(int(v) for v in colours[c]))
    draw.text((x0 + 13, y - 1), names[c], fill=(0, 0, 0))
  return canvas


def shares(labels: np.ndarray, names: list[str]) -> list[dict]:
  counts = np.bincount(labels.ravel(), minlength=len(names))
  total = labels.size
  return [{'name': names[c], 'pixels': int(counts[c]), 'share': float(counts[c] / total)}
          for c in np.argsort(-counts, kind='stable') if counts[c]]


def seen_mask_for(config, names: list[str]) -> np.ndarray:
  """True for names among the training classes (evaluator.training_class_names)."""
  trained = set(evaluator.training_class_names(config))
  return np.asarray([n in trained for n in names], bool)


def run(config, workdir: str, *, images: str, classes: str | None = None,
        class_file: str | None = None, output_dir: str | None = None) -> list[dict]:
  names = parse_classes(classes, class_file)
  paths = list_images(images)
  output_dir = output_dir or os.path.join(workdir, 'predict')
  os.makedirs(output_dir, exist_ok=True)
  variant = config.eval.variant

  seen = seen_mask_for(config, names)
  # No parameter depends on the number of classes, so any K builds the same state tree.
  model, state = state_lib.load_latest_state(config, workdir, len(names))
  text = clip.class_text_embeddings(config, workdir, names, config.clip.test_prompts)
  clip_model, clip_params, clip_text = segmenter.image_branch(config, workdir, names,
                                                             (variant,))

  results = []
  compiled = {}
  for path in paths:
    image = load_image(path)
    h, w = image.shape[:2]
    resized = augment.test_resize(image, config.input.min_size_test, config.input.max_size_test)
    padded = augment.pad_to_multiple(resized, config.input.size_divisibility, 0)
    batch = {'image': jnp.asarray(padded[None], jnp.float32),
             'image_hw': jnp.asarray([resized.shape[:2]], jnp.int32),
             'label_hw': jnp.asarray([[h, w]], jnp.int32),
             'view_hw': tta.view_sizes(config.eval, config.input, [[h, w]])}
    key = (padded.shape, (h, w))
    if key not in compiled:  # one compilation per distinct (padded size, output size)
      view_shapes = tta.padded_view_shapes(config.eval, config.input, [(h, w)])
      compiled[key] = jax.jit(segmenter.make_segment_fn(config, model, variant, (h, w),
                                                       clip_model, view_shapes))
    labels = np.asarray(compiled[key](state['params'], state['frozen'], batch, text, seen,
                                      clip_params, clip_text))[0]
    stem = os.path.splitext(os.path.basename(path))[0]
    dtype = np.uint8 if len(names) <= 256 else np.uint16
    Image.fromarray(labels.astype(dtype)).save(os.path.join(output_dir, f'{stem}_labels.png'))
    overlay(image, labels, names).save(os.path.join(output_dir, f'{stem}_overlay.png'))
    record = {'image': path, 'variant': variant, 'classes': shares(labels, names)}
    with open(os.path.join(output_dir, f'{stem}.json'), 'w') as f:
      json.dump(record, f, indent=2)
    results.append(record)
    print(f'{path}: ' + ', '.join(f'{c["name"]} {100 * c["share"]:.1f}%'
                                  for c in record['classes'][:5]), flush=True)
  return results
