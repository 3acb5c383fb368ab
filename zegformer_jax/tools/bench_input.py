r"""Throughput of the training input pipeline (images/s) per grain worker count.

  python -m zegformer_jax.tools.bench_input --config configs/coco_stuff_r50.py --data_dir DIR \
      [--config.input.min_size_train=...] [--make_fake N] [--workers 0,1,2] [--batches 20] \
      [--batch_size 8] [--warmup 2] [--convert_workers 4]

Without --make_fake, DIR is a converted dataset (dataset_info.json and the TFRecords of the
config's train split). With --make_fake N, a fake COCO-Stuff raw tree of N realistic train
images (640x480 JPEGs of smooth random content, stuffthingmaps-like labels with about 10
classes per image, some of them unseen, and unlabelled seams) plus N // 8 val images is
written to DIR/raw, converted by data_prep.coco_stuff into DIR/converted, and benchmarked
(both steps are skipped when their output already exists).

The pipeline is input_pipeline.make_train_iterator with the config's augmentation (for
coco_stuff_r50: ResizeShortestEdge 320..960, random crop 640, colour jitter, flip, targets;
--config.key=value overrides apply); the batch size (--batch_size) and the worker count
(--workers) replace the config's. For each worker count the first
batch (worker start-up) and --warmup batches are not timed; then --batches batches are.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

from absl import flags
from ml_collections import config_flags
import numpy as np
from PIL import Image

from zegformer_jax import cli

FAKE_SIZE = (480, 640)  # h, w
CLASSES_PER_IMAGE = 10


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
  from zegformer_jax.data import datasets_meta  # pylint: disable=g-import-not-at-top
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
  from zegformer_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
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


def run(config, data_dir: str, *, make_fake: int = 0, workers: Sequence[int] = (0, 1, 2),
        batches: int = 20, warmup: int = 2, batch_size: int = 8,
        convert_workers: int = min(4, os.cpu_count() or 1), config_name: str = '') -> list[dict]:
  """The benchmark of the module docstring; prints a table and returns bench()'s rows."""
  config.input.global_batch_size = batch_size
  if make_fake > 0:
    from data_prep import coco_stuff  # pylint: disable=g-import-not-at-top
    raw = os.path.join(data_dir, 'raw')
    data_dir = os.path.join(data_dir, 'converted')
    if not os.path.isdir(os.path.join(raw, 'images')):
      t = time.perf_counter()
      make_fake_coco(raw, make_fake)
      print(f'fake COCO-Stuff raw tree: {make_fake} train images in {raw} '
            f'({time.perf_counter() - t:.1f} s)')
    t = time.perf_counter()
    coco_stuff.convert(raw, data_dir, workers=convert_workers)  # resumes if already done
    print(f'converted into {data_dir} ({time.perf_counter() - t:.1f} s)')
  inp = config.input
  print(f'config {config_name}: min_size_train {inp.min_size_train[0]}..'
        f'{inp.min_size_train[-1]} (max {inp.max_size_train}), crop {inp.crop_size}, color_aug '
        f'{inp.color_aug_ssd}, max_masks {inp.max_masks}, batch {inp.global_batch_size}, '
        f'prefetch {inp.prefetch}; {os.cpu_count()} CPUs')
  rows = []
  for w in workers:
    rows.append(bench(config, data_dir, w, batches, warmup))
    r = rows[-1]
    print(f'  workers={w}: {r["images_per_s"]:.1f} images/s', flush=True)
  print('\n| workers | images/s | s/batch | first batch s |\n|---|---|---|---|')
  for r in rows:
    print(f'| {r["workers"]} | {r["images_per_s"]:.1f} | {r["s_per_batch"]:.3f} | '
          f'{r["first_batch_s"]:.1f} |')
  return rows


def define_flags() -> None:
  """The flags of `python -m zegformer_jax.tools.bench_input`.

  Defined by the entry point only, not on import: bench_step imports this module, and
  --config, --workers or --warmup would clash with the flags of other programs.
  """
  cli.define_config_flag()
  flags.mark_flag_as_required('config')
  flags.DEFINE_string('data_dir', None,
                      'A converted dataset (dataset_info.json and the TFRecords of the '
                      "config's train split); with --make_fake, where the fake tree goes.",
                      required=True)
  flags.DEFINE_integer('make_fake', 0,
                       'N > 0: create and convert a fake COCO-Stuff tree of N train images '
                       'under --data_dir (raw/, converted/), then benchmark it.', lower_bound=0)
  flags.DEFINE_list('workers', ['0', '1', '2'], 'Grain worker counts to time, comma-separated.')
  flags.DEFINE_integer('batches', 20, 'Timed batches per worker count.', lower_bound=1)
  flags.DEFINE_integer('warmup', 2, 'Untimed batches after the first.', lower_bound=0)
  flags.DEFINE_integer('batch_size', 8, 'Global batch size.', lower_bound=1)
  flags.DEFINE_integer('convert_workers', min(4, os.cpu_count() or 1),
                       'Converter processes for --make_fake.', lower_bound=0)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  config_spec = config_flags.get_config_filename(f['config'])
  config_path = config_spec.partition(':')[0]
  if not os.path.isfile(config_path):  # config_flags defers this error to the first access
    raise FileNotFoundError(f'config file {config_path} does not exist')
  try:
    workers = [int(w) for w in f.workers]
  except ValueError:
    raise ValueError(f'--workers must be comma-separated integers, got {",".join(f.workers)!r}'
                     ) from None
  run(f.config, f.data_dir, make_fake=f.make_fake, workers=workers, batches=f.batches,
      warmup=f.warmup, batch_size=f.batch_size, convert_workers=f.convert_workers,
      config_name=config_spec)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
