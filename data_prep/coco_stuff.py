r"""COCO-Stuff 171 (156 seen / 15 unseen) -> TFRecords, as ZegFormer prepares it.

  python -m data_prep.coco_stuff --input_dir RAW --output_dir OUT [--num_shards N] \
      [--workers W] [--skip_bad]

Raw layout (COCO 2017 images and the stuffthingmaps_trainval2017 PNGs):

  RAW/images/{train2017,val2017}/<name>.jpg
  RAW/annotations/{train2017,val2017}/<name>.png   value = COCO id - 1 (0..181), 255 unlabelled

Splits written (docs/reference.md section 5; class lists in assets/coco_stuff_classes.json):

  train       train2017; the 156 seen classes -> 0..155 in canonical COCO order, every other
              value -> 255. Images holding unseen classes are kept, their pixels ignored.
  val_seen    val2017; seen -> 0..155
  val_unseen  val2017; the 15 unseen classes -> 0..14
  val_all     val2017; all 171 -> 0..170 in the ZegFormer "all" order (seen, then unseen)

Images are stored as their original JPEG bytes; labels as 8-bit PNG with ignore 255. Raw
values 0..181 that are no class (the 11 COCO ids unused in 2017) map to 255 like unlabelled
pixels, as the reference's lookup does; any other value (182..254) is a bad label file.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags
import numpy as np

from data_prep import common
from zegformer_jax import cli

DATASET = 'coco_stuff'
IGNORE_VALUE = 255
RAW_MAX = 181  # stuffthingmaps: COCO id - 1 for ids 1..182
SOURCES = {'train': 'train2017', 'val_seen': 'val2017', 'val_unseen': 'val2017',
           'val_all': 'val2017'}


def read_example(input_dir: str, image_rel: str, label_rel: str) -> common.Example:
  """The original JPEG and the raw stuffthingmaps ids of one image."""
  return common.read_pair_8bit(input_dir, image_rel, label_rel)


def list_pairs(input_dir: str, folder: str):
  """((image, label) relative paths, problems) of one COCO folder (train2017 | val2017)."""
  img_dir = os.path.join(input_dir, 'images', folder)
  lab_dir = os.path.join(input_dir, 'annotations', folder)
  images = {os.path.splitext(os.path.basename(p))[0]: p
            for p in common.list_files(img_dir, r'.+\.jpe?g')}
  labels = {os.path.splitext(os.path.basename(p))[0]: p
            for p in common.list_files(lab_dir, r'.+\.png')}
  pairs, problems = common.pair_by_key(images, labels)
  return [(common.rel(i, input_dir), common.rel(l, input_dir)) for i, l in pairs], problems


def spec() -> common.DatasetSpec:
  valid = np.zeros(256, bool)
  valid[:RAW_MAX + 1] = True
  valid[IGNORE_VALUE] = True
  return common.DatasetSpec(
      name=DATASET, reader_module='data_prep.coco_stuff', ignore_value=IGNORE_VALUE,
      label_dtype='uint8', raw_valid=valid, raw_range=f'0..{RAW_MAX} or {IGNORE_VALUE}')


def convert(input_dir: str, output_dir: str, *, num_shards: int | None = None,
            workers: int = 1, skip_bad: bool = False) -> dict:
  """Converts a raw COCO-Stuff tree (module docstring); returns the dataset_info."""
  listed = {f: list_pairs(input_dir, f) for f in sorted(set(SOURCES.values()))}
  plans = []
  for split, folder in SOURCES.items():
    names, seen, lut = common.class_lut(DATASET, split, 256)
    plans.append(common.SplitPlan(split, listed[folder][0], names, seen, lut))
  problems = [(path, reason, [s for s, f in SOURCES.items() if f == folder])
              for folder, (_, probs) in listed.items() for path, reason in probs]
  all_names, all_seen = common.class_lut(DATASET, 'val_all', 256)[:2]
  return common.convert(
      spec(), plans, input_dir=input_dir, output_dir=output_dir, num_shards=num_shards,
      workers=workers, skip_bad=skip_bad, problems=problems,
      extra_info={'seen_classes': [n for n, s in zip(all_names, all_seen) if s],
                  'unseen_classes': [n for n, s in zip(all_names, all_seen) if not s]})


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The converter's flags: the shared ones (common.define_flags)."""
  common.define_flags(flag_values, __name__)


def main(argv: Sequence[str]) -> None:
  """The entry point (cli.run), or from Python main(['--input_dir', RAW, '--output_dir', OUT]).

  The dataset_info is not returned (absl's app.run would take it for an exit status); it is
  OUT/dataset_info.json, or what convert() returns.
  """
  common.run(convert, common.parse_flags(argv, define_flags))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
