r"""ShapesWorld: a procedurally generated zero-shot segmentation world.

`generate(DIR, seed=..., split=..., ...)` writes it as TFRecord shards with dataset_info.json,
like the data_prep converters do for the real datasets; `prepare.world_dir` calls it with
the config's shapesworld settings.

Each image has one or two background "stuff" regions (procedural textures: sand, water,
grass, brick wall, wood, sky, snow, carpet) and 1-3 "thing" objects (shape x colour, e.g.
"red triangle"), drawn in order so that later objects may partly occlude earlier ones (a
placement that would hide more than half of an earlier object is redrawn). Every pixel
belongs to exactly one class; there is no unlabelled pixel.

Classes (canonical order: 24 things colour-major, then 8 stuff) are split into seen and
unseen by the named split ('default' or 'alt', `UNSEEN`); every colour and every shape still
occurs among the seen classes. Splits written to DIR (one dataset_info.json describes all):

  train       8000 images, labels of seen classes only: 0..S-1 in seen order. With
              unseen_in_train='ignored' the images contain every class and unseen pixels
              are 255 (ignored), as COCO-Stuff keeps images with unseen classes; with
              'absent' (the default) they are drawn from the seen classes only.
  val_all     the validation images with all classes: seen 0..S-1 then unseen S..K-1
              (the official COCO "all" order).
  val_seen    the same images, seen classes 0..S-1, unseen pixels 255.
  val_unseen  the same images, unseen classes 0..U-1, seen pixels 255.

Generation is deterministic: example i of a stream (train/val) depends only on (seed, stream,
i), so the bytes do not depend on the number of shards, on the number of processes that
render them (`generate(workers=...)`, default: one per CPU) or on the machine's speed.
`generate()` is idempotent: it returns the existing dataset_info when the directory already
holds a dataset generated with the same settings and raises when the settings differ (pass
overwrite=True to regenerate).

`render_class_crop` draws an image-level example of one class (used to pretrain the
miniature CLIP on all classes), and `class_names(split)` returns (seen, unseen).
"""
from __future__ import annotations

import concurrent.futures
import functools
import math
import multiprocessing
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from zegformer_jax.data import tfrecord

GENERATOR_VERSION = 2
IGNORE_VALUE = 255

COLOURS = {  # RGB base colours, saturated so that they stand out from the muted textures
    'red': (215, 35, 35),
    'green': (35, 175, 55),
    'blue': (40, 70, 220),
    'yellow': (235, 205, 30),
}
SHAPES = ('circle', 'square', 'triangle', 'star', 'cross', 'ring')
STUFF = ('sand', 'water', 'grass', 'brick wall', 'wood', 'sky', 'snow', 'carpet')
THINGS = tuple(f'{c} {s}' for c in COLOURS for s in SHAPES)
CANONICAL_CLASSES = THINGS + STUFF

# Unseen classes of each named split.
UNSEEN = {
    'default': ('red star', 'green ring', 'blue triangle', 'yellow cross', 'grass', 'wood'),
    'alt': ('red circle', 'green triangle', 'blue ring', 'yellow star', 'red cross', 'water',
            'carpet'),
}
SPLITS_WRITTEN = ('train', 'val_all', 'val_seen', 'val_unseen')
UNSEEN_IN_TRAIN = ('ignored', 'absent')
_STREAMS = {'train': 1, 'val': 2, 'crop': 3}
# Things have a 'radius' of 20-34% of the image side and there are 1-3 of them. Version 1
# drew 1-4 things of 12-24%: at 64 px those are one res4 token or less, and even a perfect
# stride-4 mask reached only 87.5 mIoU on them (92.4 now), see BENCHMARKS.md.
THING_SCALE = (0.2, 0.34)
MAX_THINGS = 3


# ----------------------------------------------------------------------------- class lists


def _check_split(split: str) -> None:
  if split not in UNSEEN:
    raise ValueError(f'unknown ShapesWorld split {split!r}; known: {sorted(UNSEEN)}')
  unseen = UNSEEN[split]
  unknown = [c for c in unseen if c not in CANONICAL_CLASSES]
  if unknown:
    raise ValueError(f'split {split!r}: unseen classes {unknown} are not ShapesWorld classes')
  seen_things = [c for c in THINGS if c not in unseen]
  # Zero-shot transfer needs every attribute to be learnable from seen classes.
  for colour in COLOURS:
    assert any(t.split(' ')[0] == colour for t in seen_things), (split, colour)
  for shape in SHAPES:
    assert any(t.split(' ')[1] == shape for t in seen_things), (split, shape)
  assert any(s not in unseen for s in STUFF), split
  assert any(c in THINGS for c in unseen) and any(c in STUFF for c in unseen), split


def class_names(split: str = 'default') -> tuple[list[str], list[str]]:
  """(seen, unseen) class names of a split, each in canonical order."""
  _check_split(split)
  unseen = set(UNSEEN[split])
  return ([c for c in CANONICAL_CLASSES if c not in unseen],
          [c for c in CANONICAL_CLASSES if c in unseen])


def split_class_names(world_split: str, data_split: str) -> tuple[list[str], list[bool]]:
  """Class names (label id order) and seen flags of one written split."""
  seen, unseen = class_names(world_split)
  if data_split in ('train', 'val_seen'):
    return seen, [True] * len(seen)
  if data_split == 'val_all':
    return seen + unseen, [True] * len(seen) + [False] * len(unseen)
  if data_split == 'val_unseen':
    return unseen, [False] * len(unseen)
  raise ValueError(f'unknown ShapesWorld data split {data_split!r}; known: {SPLITS_WRITTEN}')


def label_lut(world_split: str, data_split: str) -> np.ndarray:
  """uint8 [K]: canonical class id -> label id of `data_split` (IGNORE_VALUE if absent)."""
  names, _ = split_class_names(world_split, data_split)
  pos = {n: i for i, n in enumerate(names)}
  return np.asarray([pos.get(c, IGNORE_VALUE) for c in CANONICAL_CLASSES], np.uint8)


# ----------------------------------------------------------------------------- textures


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float,
                  cell_x: float | None = None) -> np.ndarray:
  """Bilinear value noise, float32 [h,w], N(0,1) at grid points `cell` (y) x `cell_x` apart."""
  cell_x = cell if cell_x is None else cell_x
  gh, gw = int(h / cell) + 3, int(w / cell_x) + 3
  grid = rng.standard_normal((gh, gw)).astype(np.float32)
  oy, ox = rng.uniform(0, 1, 2)
  ys = np.arange(h, dtype=np.float32) / cell + oy
  xs = np.arange(w, dtype=np.float32) / cell_x + ox
  y0, x0 = ys.astype(np.int32), xs.astype(np.int32)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  g00 = grid[y0][:, x0]
  g01 = grid[y0][:, x0 + 1]
  g10 = grid[y0 + 1][:, x0]
  g11 = grid[y0 + 1][:, x0 + 1]
  return (g00 * (1 - fy) * (1 - fx) + g01 * (1 - fy) * fx + g10 * fy * (1 - fx)
          + g11 * fy * fx)


def _jitter(rng, rgb, amount=10.0) -> np.ndarray:
  return np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3).astype(np.float32)


def stuff_texture(name: str, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """float32 [h,w,3] texture of stuff class `name`, 0-255 (unclipped); scale ~ 64 px."""
  u = max(h, w) / 64.0
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  if name == 'sand':
    base = _jitter(rng, (212, 184, 128))
    shade = 14 * _smooth_noise(rng, h, w, 10 * u) + 10 * rng.standard_normal((h, w))
    return base + shade[..., None]
  if name == 'water':
    base = _jitter(rng, (38, 92, 168))
    period = rng.uniform(5, 8) * u
    warp = 2.5 * u * _smooth_noise(rng, h, w, 12 * u)
    waves = np.sin(2 * np.pi * (yy + warp + 1.5 * np.sin(xx / (4 * u))) / period)
    return base + (22 * waves + 4 * rng.standard_normal((h, w)))[..., None] * \
        np.array([0.6, 0.9, 1.0], np.float32)
  if name == 'grass':
    base = _jitter(rng, (64, 138, 48))
    # Blades: noise that varies fast across x and slowly along y.
    blades = _smooth_noise(rng, h, w, 5 * u, 1.2 * u)
    vertical = _smooth_noise(rng, h, w, 6 * u)
    shade = 26 * blades * (0.6 + 0.4 * np.abs(vertical))
    return base + shade[..., None] * np.array([0.5, 1.0, 0.4], np.float32)
  if name == 'brick wall':
    brick = _jitter(rng, (165, 68, 48), 12)
    mortar = _jitter(rng, (205, 200, 188), 8)
    bh, bw = rng.uniform(6, 8) * u, rng.uniform(12, 16) * u
    oy, ox = rng.uniform(0, bh), rng.uniform(0, bw)
    row = np.floor((yy + oy) / bh)
    xs = xx + ox + (row % 2) * bw / 2
    in_mortar = (((yy + oy) % bh) < 1.3 * u) | ((xs % bw) < 1.3 * u)
    # Per-brick brightness so that bricks read as separate blocks.
    brick_id = (row * 131 + np.floor(xs / bw) * 17).astype(np.int64) % 97
    tone = rng.uniform(-18, 18, 97).astype(np.float32)[brick_id]
    out = brick + (tone + 6 * rng.standard_normal((h, w)))[..., None]
    return np.where(in_mortar[..., None], mortar, out)
  if name == 'wood':
    base = _jitter(rng, (150, 98, 52))
    period = rng.uniform(4, 7) * u
    warp = 5 * u * _smooth_noise(rng, h, w, 16 * u)
    angle = rng.uniform(-0.3, 0.3)
    coord = xx * math.cos(angle) + yy * math.sin(angle) + warp
    grain = np.sin(2 * np.pi * coord / period) ** 3
    return base + (-28 * grain + 5 * rng.standard_normal((h, w)))[..., None] * \
        np.array([1.0, 0.8, 0.6], np.float32)
  if name == 'sky':
    top, bottom = _jitter(rng, (100, 160, 232)), _jitter(rng, (175, 208, 245))
    t = (yy / max(h - 1, 1))[..., None]
    sky = top * (1 - t) + bottom * t
    cloud = np.clip(_smooth_noise(rng, h, w, 14 * u) * 1.4 - 0.5, 0, 1)[..., None]
    return sky * (1 - cloud) + np.float32(248) * cloud
  if name == 'snow':
    base = _jitter(rng, (236, 239, 246), 5)
    shade = 7 * _smooth_noise(rng, h, w, 9 * u)
    sparkle = (rng.uniform(size=(h, w)) < 0.04) * rng.uniform(-30, -12)
    return base + (shade + sparkle)[..., None] * np.array([1.0, 1.0, 0.6], np.float32)
  if name == 'carpet':
    a, b = _jitter(rng, (128, 36, 64), 12), _jitter(rng, (62, 118, 126), 12)
    cell = rng.uniform(4, 6) * u
    oy, ox = rng.uniform(0, cell, 2)
    diag = (np.floor((xx + yy + ox) / cell) + np.floor((xx - yy + oy + 1000 * cell) / cell)) % 2
    out = np.where(diag[..., None] > 0, a, b)
    return out + (8 * rng.standard_normal((h, w)))[..., None]
  raise ValueError(f'unknown stuff class {name!r}; known: {STUFF}')


# ----------------------------------------------------------------------------- shapes


def _polygon_mask(px, py, verts) -> np.ndarray:
  """Even-odd point-in-polygon for pixel centres (px, py); verts [(x, y), ...]."""
  inside = np.zeros(px.shape, bool)
  n = len(verts)
  for i in range(n):
    x1, y1 = verts[i]
    x2, y2 = verts[(i + 1) % n]
    if y1 == y2:
      continue
    crosses = (y1 > py) != (y2 > py)
    x_at = (x2 - x1) * (py - y1) / (y2 - y1) + x1
    inside ^= crosses & (px < x_at)
  return inside


def shape_mask(shape: str, h: int, w: int, cx: float, cy: float, r: float,
               angle: float) -> np.ndarray:
  """bool [h,w] mask of a shape of 'radius' r centred at (cx, cy), rotated by angle (rad)."""
  py, px = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  dx, dy = px - cx, py - cy
  if shape == 'circle':
    return dx * dx + dy * dy < r * r
  if shape == 'ring':
    d2 = dx * dx + dy * dy
    return (d2 < r * r) & (d2 > (0.55 * r) ** 2)
  c, s = math.cos(angle), math.sin(angle)
  if shape == 'cross':
    lx, ly = dx * c + dy * s, -dx * s + dy * c
    arm = 0.32 * r
    return ((np.abs(lx) < arm) & (np.abs(ly) < r)) | ((np.abs(lx) < r) & (np.abs(ly) < arm))
  if shape == 'square':
    pts = [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]
  elif shape == 'triangle':
    pts = [(1.15 * math.cos(a), 1.15 * math.sin(a))
           for a in (-math.pi / 2, -math.pi / 2 + 2 * math.pi / 3, -math.pi / 2 + 4 * math.pi / 3)]
    pts = [(x, y + 0.15) for x, y in pts]  # centre the triangle's area on (cx, cy)
  elif shape == 'star':
    pts = []
    for k in range(10):
      a = -math.pi / 2 + k * math.pi / 5
      rad = 1.1 if k % 2 == 0 else 0.48
      pts.append((rad * math.cos(a), rad * math.sin(a)))
  else:
    raise ValueError(f'unknown shape {shape!r}; known: {SHAPES}')
  verts = [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]
  return _polygon_mask(px, py, verts)


def _boundary(mask: np.ndarray) -> np.ndarray:
  """Pixels of `mask` with a 4-neighbour outside it (the object's outline)."""
  m = np.pad(mask, 1)
  interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
  return mask & ~interior


def _paint_thing(canvas: np.ndarray, mask: np.ndarray, colour: str,
                 rng: np.random.Generator) -> None:
  """Paints a thing of `colour` into float canvas [h,w,3] where mask is set (in place)."""
  h, w = mask.shape
  rgb = _jitter(rng, COLOURS[colour], 18)
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  g = rng.uniform(-1, 1, 2)
  shade = 0.9 + 0.12 * ((g[0] * (xx - w / 2) + g[1] * (yy - h / 2)) / max(h, w))
  body = rgb * shade[..., None] + (4 * rng.standard_normal((h, w)))[..., None]
  outline = _boundary(mask)
  body = np.where(outline[..., None], rgb * 0.5, body)
  canvas[mask] = body[mask]


def _random_thing_geometry(rng: np.random.Generator, size: int, scale=THING_SCALE):
  r = rng.uniform(*scale) * size
  cx = rng.uniform(0.6 * r, size - 0.6 * r)
  cy = rng.uniform(0.6 * r, size - 0.6 * r)
  angle = rng.uniform(-0.45, 0.45)  # keep squares square and crosses upright-ish
  return cx, cy, r, angle


# ----------------------------------------------------------------------------- scenes


def render_scene(rng: np.random.Generator, size: int,
                 classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """One ShapesWorld image.

  Args:
    rng: the example's generator (`example_rng`).
    size: image side in pixels.
    classes: the classes it may contain (default: all); it needs two stuff classes and one
      thing among them.
  Returns:
    image uint8 [size,size,3] RGB; label uint8 [size,size] of canonical class ids
    (index into CANONICAL_CLASSES).
  """
  h = w = size
  image = np.zeros((h, w, 3), np.float32)
  label = np.zeros((h, w), np.uint8)
  allowed = set(CANONICAL_CLASSES if classes is None else classes)
  stuff_pool = [i for i, s in enumerate(STUFF) if s in allowed]
  thing_pool = [i for i, t in enumerate(THINGS) if t in allowed]
  if len(stuff_pool) < 2 or not thing_pool or len(allowed) != len(stuff_pool) + len(thing_pool):
    raise ValueError(f'render_scene: classes must be ShapesWorld classes with at least two '
                     f'stuff and one thing class; got {sorted(allowed)}')
  # Background: one or two stuff regions split by a wavy line.
  n_stuff = 1 if rng.uniform() < 0.4 else 2
  stuff_ids = [stuff_pool[i] for i in rng.choice(len(stuff_pool), size=n_stuff, replace=False)]
  region = np.zeros((h, w), bool)
  if n_stuff == 2:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    for _ in range(20):
      phi = rng.uniform(0, 2 * np.pi)
      off = rng.uniform(-0.25, 0.25) * size
      amp, period = rng.uniform(0, 0.04) * size, rng.uniform(0.2, 0.5) * size
      along = -(xx - w / 2) * math.sin(phi) + (yy - h / 2) * math.cos(phi)
      dist = (xx - w / 2) * math.cos(phi) + (yy - h / 2) * math.sin(phi) - off
      region = dist + amp * np.sin(2 * np.pi * along / period) > 0
      if 0.15 < region.mean() < 0.85:
        break
  for k, sid in enumerate(stuff_ids):
    where = region if k == 1 else ~region if n_stuff == 2 else np.ones((h, w), bool)
    tex = stuff_texture(STUFF[sid], rng, h, w)
    image[where] = tex[where]
    label[where] = len(THINGS) + sid
  # Things, drawn back to front.
  n_things = int(rng.integers(1, MAX_THINGS + 1))
  placed = []  # (visible mask of each thing so far)
  owner = np.full((h, w), -1, np.int32)
  for t in range(n_things):
    tid = thing_pool[int(rng.integers(len(thing_pool)))]
    colour, shape = THINGS[tid].split(' ')
    for _ in range(10):
      cx, cy, r, angle = _random_thing_geometry(rng, size)
      mask = shape_mask(shape, h, w, cx, cy, r, angle)
      # Reject placements that would hide more than half of an earlier thing.
      ok = mask.sum() >= 8 and all(
          (owner == j).sum() == 0 or ((owner == j) & mask).sum() <= 0.5 * (owner == j).sum()
          for j in range(t))
      if ok:
        break
    else:
      continue
    _paint_thing(image, mask, colour, rng)
    label[mask] = tid
    owner[mask] = t
    placed.append(tid)
  return np.clip(image + 0.5, 0, 255).astype(np.uint8), label


def render_class_crop(class_name: str, rng: np.random.Generator, size: int) -> np.ndarray:
  """Image-level example of one class: uint8 [size,size,3] RGB.

  A thing is drawn large near the centre on a plain neutral background (p=.5) or on a random
  stuff texture; a stuff class is a patch of its texture.
  """
  if class_name in STUFF:
    return np.clip(stuff_texture(class_name, rng, size, size) + 0.5, 0, 255).astype(np.uint8)
  if class_name not in THINGS:
    raise ValueError(f'unknown ShapesWorld class {class_name!r}; known: {CANONICAL_CLASSES}')
  colour, shape = class_name.split(' ')
  if rng.uniform() < 0.5:
    grey = rng.uniform(90, 170)
    canvas = np.full((size, size, 3), grey, np.float32) + \
        (6 * _smooth_noise(rng, size, size, size / 6))[..., None]
  else:
    canvas = stuff_texture(STUFF[int(rng.integers(len(STUFF)))], rng, size, size)
  r = rng.uniform(0.28, 0.4) * size
  cx, cy = size / 2 + rng.uniform(-0.1, 0.1, 2) * size
  mask = shape_mask(shape, size, size, cx, cy, r, rng.uniform(-0.45, 0.45))
  _paint_thing(canvas, mask, colour, rng)
  return np.clip(canvas + 0.5, 0, 255).astype(np.uint8)


def example_rng(seed: int, stream: str, index: int) -> np.random.Generator:
  """The generator of example `index` of `stream` ('train' | 'val' | 'crop')."""
  return np.random.default_rng([int(seed), _STREAMS[stream], int(index)])


# ----------------------------------------------------------------------------- processes

# Below this many examples per process, starting processes costs more than it saves.
_MIN_PER_WORKER = 256


def default_workers() -> int:
  """The CPUs this process may run on."""
  if hasattr(os, 'sched_getaffinity'):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def parallel_map(fn: Callable[[Any], Any], items: Sequence[Any],
                 workers: int | None = None) -> list:
  """[fn(x) for x in items], computed by `workers` processes (None: one per CPU).

  Rendering is numpy code that holds the GIL, so threads would not help. fn must be a
  module-level function (or a functools.partial of one) and each result must depend on
  its item alone (every example has its own generator), so the output is the same for any
  number of workers. With workers=None, small jobs (< _MIN_PER_WORKER items per process)
  run in this process. The processes are spawned, so a script that ends up here needs the
  usual `if __name__ == '__main__':` guard (as every multiprocessing program does).
  """
  items = list(items)
  if workers is None:
    workers = min(default_workers(), len(items) // _MIN_PER_WORKER)
  workers = min(int(workers), len(items))
  if workers <= 1:
    return [fn(x) for x in items]
  # spawn, not fork: the caller may run JAX, and a forked child inherits its threads' locks
  # in whatever state they were.
  context = multiprocessing.get_context('spawn')
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    return list(pool.map(fn, items, chunksize=max(1, len(items) // (4 * workers))))


def render_keyed_scene(key: Sequence[int], size: int,
                       classes: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """render_scene with the generator np.random.default_rng(key) (for parallel_map)."""
  return render_scene(np.random.default_rng(list(key)), size, classes)


def _example_records(index: int, *, seed: int, stream: str, image_size: int,
                     classes: Sequence[str] | None, split: str,
                     data_splits: Sequence[str]) -> list[bytes]:
  """The serialised tf.train.Example of example `index` of `stream`, one per data split."""
  image, canon = render_scene(example_rng(seed, stream, index), image_size, classes)
  image_png = tfrecord.encode_png(image)
  filename = f'{"train" if stream == "train" else "val"}_{index:06d}.png'
  return [tfrecord.encode_example(
      image=image_png, image_format='png', filename=filename, height=image_size,
      width=image_size, label=tfrecord.encode_png(label_lut(split, s)[canon]),
      label_format='png') for s in data_splits]


# ----------------------------------------------------------------------------- writing


def _settings(seed, split, num_train, num_val, image_size, num_shards,
              unseen_in_train) -> dict:
  return {'generator_version': GENERATOR_VERSION, 'seed': int(seed), 'split': split,
          'num_train': int(num_train), 'num_val': int(num_val),
          'image_size': int(image_size), 'num_shards': int(num_shards),
          'unseen_in_train': unseen_in_train}


def check_settings(path: str, what: str, have: dict, wanted: dict) -> None:
  """Raises ValueError naming every setting of `wanted` that the existing `have` differs in.

  For directories made once and reused (the miniature CLIP, the pretrained backbone): reusing
  one made with other settings would silently change the experiment.
  """
  if have != wanted:
    diff = {k: (have.get(k), v) for k, v in wanted.items() if have.get(k) != v}
    raise ValueError(f'{path} holds {what} with other settings ((existing, requested) = '
                     f'{diff}); remove it or use another workdir')


def _existing(output_dir: str, settings: dict) -> dict | None:
  path = os.path.join(output_dir, tfrecord.DATASET_INFO_FILE)
  if not os.path.isfile(path):
    return None
  info = tfrecord.read_dataset_info(output_dir)
  old = info.get('generator')
  if old != settings:
    diff = {k: (old.get(k) if isinstance(old, dict) else None, v) for k, v in settings.items()
            if not isinstance(old, dict) or old.get(k) != v}
    raise ValueError(
        f'{path} describes a different ShapesWorld (setting: (existing, requested) = {diff}); '
        'use another output directory or generate(..., overwrite=True)')
  missing = [sh['file'] for s in info['splits'].values() for sh in s['shards']
             if not os.path.isfile(os.path.join(output_dir, sh['file']))]
  if missing:
    raise FileNotFoundError(f'{path} lists shards that are missing: {missing[:4]}; '
                            'regenerate with overwrite=True')
  return info


def generate(output_dir: str, *, seed: int = 0, split: str = 'default', num_train: int = 8000,
             num_val: int = 200, image_size: int = 64, num_shards: int = 4,
             unseen_in_train: str = 'absent', overwrite: bool = False,
             workers: int | None = None) -> dict:
  """Generates ShapesWorld TFRecords and dataset_info.json in output_dir; returns the info.

  unseen_in_train: 'ignored' (the COCO-Stuff protocol: training images contain unseen
  classes, whose pixels are labelled IGNORE_VALUE) or 'absent' (training images are drawn
  from the seen classes only, so training never sees an unseen class at all). Validation
  images contain every class either way and do not depend on this setting.

  Idempotent: if output_dir already holds a dataset with these settings, it is returned
  unchanged; different settings raise ValueError unless overwrite=True. `workers`: rendering
  processes (parallel_map; the bytes written do not depend on it).
  """
  _check_split(split)
  if unseen_in_train not in UNSEEN_IN_TRAIN:
    raise ValueError(f'unseen_in_train must be one of {UNSEEN_IN_TRAIN}, '
                     f'got {unseen_in_train!r}')
  if num_train < 1 or num_val < 1 or num_shards < 1 or image_size < 16:
    raise ValueError('generate: need num_train, num_val, num_shards >= 1 and image_size >= 16 '
                     f'(got {num_train}, {num_val}, {num_shards}, {image_size})')
  output_dir = os.fspath(output_dir)
  settings = _settings(seed, split, num_train, num_val, image_size, num_shards,
                       unseen_in_train)
  if not overwrite:
    info = _existing(output_dir, settings)
    if info is not None:
      return info
  os.makedirs(output_dir, exist_ok=True)
  info_path = os.path.join(output_dir, tfrecord.DATASET_INFO_FILE)
  if os.path.exists(info_path):  # invalidate first, so a crash cannot leave a stale match
    os.remove(info_path)
  start = time.time()
  splits = {}
  train_classes = class_names(split)[0] if unseen_in_train == 'absent' else None
  streams = {'train': (num_train, ('train',), train_classes),
             'val': (num_val, ('val_all', 'val_seen', 'val_unseen'), None)}
  for stream, (count, data_splits, classes) in streams.items():
    render = functools.partial(_example_records, seed=seed, stream=stream,
                               image_size=image_size, classes=classes, split=split,
                               data_splits=data_splits)
    per_example = parallel_map(render, range(count), workers)
    records = {s: [r[k] for r in per_example] for k, s in enumerate(data_splits)}
    for s in data_splits:
      names, seen = split_class_names(split, s)
      splits[s] = {
          'class_names': names, 'seen': seen, 'num_examples': count,
          'shards': tfrecord.write_sharded(output_dir, s, records[s], num_shards),
          'image_shapes': [[image_size, image_size]],
      }
  seen_names, unseen_names = class_names(split)
  info = {
      'dataset': 'shapesworld',
      'ignore_value': IGNORE_VALUE,
      'generator': settings,
      'seen_classes': seen_names,
      'unseen_classes': unseen_names,
      'canonical_classes': list(CANONICAL_CLASSES),
      'splits': splits,
      'generation_seconds': round(time.time() - start, 2),
  }
  tfrecord.write_dataset_info(output_dir, info)
  return tfrecord.read_dataset_info(output_dir)
