r"""Throughput of the training input pipeline (images/s) per grain worker count.

  python -m zegformer_jax.bench_input --config configs/coco_stuff_r50.py --data_dir DIR \
      [--make_fake N] [--workers 0,1,2] [--batches 20] [--batch_size 8] [--warmup 2]

Without --make_fake, DIR is a converted dataset (dataset_info.json and the TFRecords of the
config's train split). With --make_fake N, a fake COCO-Stuff raw tree of N realistic train
images (640x480 JPEGs of smooth random content, stuffthingmaps-like labels with about 10
classes per image, some of them unseen, and unlabelled seams) plus N // 8 val images is
written to DIR/raw, converted by data_prep.coco_stuff into DIR/converted, and benchmarked
(both steps are skipped when their output already exists).

The pipeline is input_pipeline.make_train_iterator with the config's augmentation (for
coco_stuff_r50: ResizeShortestEdge 320..960, random crop 640, colour jitter, flip, targets);
only the batch size and the worker count are overridden. For each worker count the first
batch (worker start-up) and --warmup batches are not timed; then --batches batches are.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import Sequence

import numpy as np
from PIL import Image

FAKE_SIZE = (480, 640)  # h, w
CLASSES_PER_IMAGE = 10


def load_config(spec: str):
  """configs/<name>.py[:arg] -> the ConfigDict of its get_config(arg)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} not found')
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:  # configs import each other as the package `configs`
    sys.path.insert(0, root)
  mod_spec = importlib.util.spec_from_file_location('_bench_config', path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _smooth(rng: np.random.Generator, n: int, h: int, w: int, cells: int) -> np.ndarray:
  """float32 [n,h,w]: n fields of bilinearly upsampled Gaussian noise on a cells-wide grid."""
  gh, gw = max(2, cells * h // w), cells
  out = np.empty((n, h, w), np.float32)
  for i in range(n):
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    out[i] = np.asarray(Image.fromarray(grid, mode='F').resize((w, h), Image.BILINEAR))
  return out


def fake_example(rng: np.random.Generator, valid_ids: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [480,640,3] image, uint8 [480,640] stuffthingmaps label) of one fake image."""
  h, w = FAKE_SIZE
  ids = rng.choice(valid_ids, CLASSES_PER_IMAGE, replace=False)
  fields = _smooth(rng, CLASSES_PER_IMAGE, h, w, cells=int(rng.integers(3, 7)))
  fields += rng.uniform(0, 1.5, CLASSES_PER_IMAGE)[:, None, None]  # uneven class areas
  order = np.argsort(fields, axis=0)
  region = order[-1]
  label = ids[region].astype(np.uint8)
  # Thin seams between regions are unlabelled (255), as object boundaries often are in COCO.
  top2 = np.take_along_axis(fields, order[-2:], 0)
  label[(top2[1] - top2[0]) < 0.03] = 255
  colours = rng.uniform(30, 225, (CLASSES_PER_IMAGE, 3)).astype(np.float32)
  shade = _smooth(rng, 3, h, w, cells=24) * 12 + rng.standard_normal((3, h, w)) * 10
  image = colours[region] + shade.transpose(1, 2, 0)
  return np.clip(image + 0.5, 0, 255).astype(np.uint8), label


def make_fake_coco(raw_dir: str, num_train: int, seed: int = 0) -> None:
  """Writes images/{train2017,val2017}/*.jpg and annotations/{...}/*.png under raw_dir."""
  from zegformer_jax import datasets_meta  # pylint: disable=g-import-not-at-top
  valid = np.asarray([c['id'] for c in datasets_meta.classes('coco_stuff')])
  for folder, n in (('train2017', num_train), ('val2017', max(2, num_train // 8))):
    os.makedirs(os.path.join(raw_dir, 'images', folder), exist_ok=True)
    os.makedirs(os.path.join(raw_dir, 'annotations', folder), exist_ok=True)
    for i in range(n):
      rng = np.random.default_rng([seed, folder == 'val2017', i])
      image, label = fake_example(rng, valid)
      name = f'{i:012d}'
      # Quality 95 with the fine noise gives ~160 KB files, about COCO's average, so JPEG
      # decoding costs what it costs on the real data.
      Image.fromarray(image).save(os.path.join(raw_dir, 'images', folder, f'{name}.jpg'),
                                  quality=95)
      Image.fromarray(label).save(os.path.join(raw_dir, 'annotations', folder, f'{name}.png'))


def bench(config, data_dir: str, workers: int, batches: int, warmup: int) -> dict:
  """Times `batches` batches of the training pipeline with `workers` grain workers."""
  from zegformer_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config.input.num_workers = workers
  start = time.perf_counter()
  it = input_pipeline.make_train_iterator(config, data_dir, 0, 1)
  next(it)
  first = time.perf_counter() - start
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  images = batches * int(config.input.global_batch_size)
  shape = tuple(batch['image'].shape)
  it.close()  # stops grain's worker processes before the next worker count starts
  del it, batch
  return {'workers': workers, 'first_batch_s': first, 'images_per_s': images / seconds,
          's_per_batch': seconds / batches, 'batch_shape': shape}


def main(argv: Sequence[str] | None = None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__)
  p.add_argument('--config', required=True, help='configs/<name>.py[:arg]')
  p.add_argument('--data_dir', required=True)
  p.add_argument('--make_fake', type=int, default=0,
                 help='N > 0: create and convert a fake COCO-Stuff tree of N train images')
  p.add_argument('--workers', default='0,1,2', help='comma-separated grain worker counts')
  p.add_argument('--batches', type=int, default=20, help='timed batches per worker count')
  p.add_argument('--warmup', type=int, default=2, help='untimed batches after the first')
  p.add_argument('--batch_size', type=int, default=8, help='global batch size')
  p.add_argument('--convert_workers', type=int, default=min(4, os.cpu_count() or 1))
  a = p.parse_args(argv)
  config = load_config(a.config)
  config.input.global_batch_size = a.batch_size
  data_dir = a.data_dir
  if a.make_fake > 0:
    from data_prep import coco_stuff  # pylint: disable=g-import-not-at-top
    raw = os.path.join(a.data_dir, 'raw')
    data_dir = os.path.join(a.data_dir, 'converted')
    if not os.path.isdir(os.path.join(raw, 'images')):
      t = time.perf_counter()
      make_fake_coco(raw, a.make_fake)
      print(f'fake COCO-Stuff raw tree: {a.make_fake} train images in {raw} '
            f'({time.perf_counter() - t:.1f} s)')
    t = time.perf_counter()
    coco_stuff.convert(raw, data_dir, workers=a.convert_workers)  # resumes if already done
    print(f'converted into {data_dir} ({time.perf_counter() - t:.1f} s)')
  inp = config.input
  print(f'config {a.config}: min_size_train {inp.min_size_train[0]}..{inp.min_size_train[-1]}'
        f' (max {inp.max_size_train}), crop {inp.crop_size}, color_aug '
        f'{inp.color_aug_ssd}, max_masks {inp.max_masks}, batch {inp.global_batch_size}, '
        f'prefetch {inp.prefetch}; {os.cpu_count()} CPUs')
  rows = []
  for w in (int(x) for x in a.workers.split(',') if x.strip()):
    rows.append(bench(config, data_dir, w, a.batches, a.warmup))
    r = rows[-1]
    print(f'  workers={w}: {r["images_per_s"]:.1f} images/s', flush=True)
  print(f'\n| workers | images/s | s/batch | first batch s |\n|---|---|---|---|')
  for r in rows:
    print(f'| {r["workers"]} | {r["images_per_s"]:.1f} | {r["s_per_batch"]:.3f} | '
          f'{r["first_batch_s"]:.1f} |')
  return rows


if __name__ == '__main__':
  main()
