r"""ADE20k-150 (SceneParsing, ADEChallengeData2016) -> TFRecords, for cross-dataset evaluation.

  python -m data_prep.ade150 --input_dir RAW --output_dir OUT [--num_shards N] \
      [--workers W] [--skip_bad]

Raw layout (the ADEChallengeData2016 release; RAW is the ADEChallengeData2016 directory):

  RAW/images/validation/<name>.jpg
  RAW/annotations/validation/<name>.png   8-bit: 0 "other objects" (ignored), 1..150 classes
  RAW/images/training/, RAW/annotations/training/   the same, optional
  RAW/objectInfo150.txt                             optional, checked (below)

Classes: the 150 of the release's objectInfo150.txt in its order, packaged in
zegformer_jax/assets/ade150_classes.json (names: its Name column, synonyms separated by
", "). When RAW/objectInfo150.txt exists its names must equal the packaged ones.

Splits written (labels: 8-bit PNG, ignore 255; images keep their original JPEG bytes, at
their original size, as detectron2 evaluates ADE20k-150):

  val_all   validation/; ids 1..150 -> 0..149, 0 -> 255
  train     training/, only when RAW/images/training or RAW/annotations/training exists;
            the same mapping

Every class is evaluated (cross-dataset: a model trained on COCO-Stuff), so the seen flags
in dataset_info.json are all false; the evaluation decides which names a model has seen.
An image without its label PNG (or the reverse) is a bad file, and so is a label value
above 150 (see --skip_bad).
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags
import numpy as np

from data_prep import common
from zegformer_jax import cli
from zegformer_jax.data import datasets_meta

DATASET = 'ade150'
IGNORE_VALUE = 255
NUM_CLASSES = 150
SOURCES = {'train': 'training', 'val_all': 'validation'}
CLASS_FILE = 'objectInfo150.txt'


def read_example(input_dir: str, image_rel: str, label_rel: str) -> common.Example:
  """The original JPEG and the raw ADE20k-150 ids (0 other, 1..150) of one image."""
  return common.read_pair_8bit(input_dir, image_rel, label_rel)


def list_pairs(input_dir: str, folder: str):
  """((image, label) relative paths, problems) of images/<folder> and annotations/<folder>."""
  images = {os.path.basename(p)[:-len('.jpg')]: p for p in
            common.list_files(os.path.join(input_dir, 'images', folder), r'.+\.jpg')}
  labels = {os.path.basename(p)[:-len('.png')]: p for p in
            common.list_files(os.path.join(input_dir, 'annotations', folder), r'.+\.png')}
  pairs, problems = common.pair_by_key(images, labels)
  return [(common.rel(i, input_dir), common.rel(l, input_dir)) for i, l in pairs], problems


def check_class_file(input_dir: str) -> str | None:
  """Compares RAW/objectInfo150.txt (when present) with the packaged names; returns its path.

  Its lines are 'Idx<TAB>Ratio<TAB>Train<TAB>Val<TAB>Name' after a header line.
  """
  path = os.path.join(input_dir, CLASS_FILE)
  if not os.path.isfile(path):
    return None
  want = {c['id']: c['name'] for c in datasets_meta.classes(DATASET)}
  got = {}
  with open(path, encoding='utf-8', errors='replace') as f:
    for n, line in enumerate(f, 1):
      fields = line.rstrip('\r\n').split('\t')
      if n == 1 or not line.strip():
        continue
      try:
        got[int(fields[0])] = fields[-1].strip()
      except ValueError:
        raise ValueError(f'{path}:{n}: expected "Idx<TAB>...<TAB>Name", got '
                         f'{line.strip()!r}') from None
  for idx in sorted(want.keys() | got.keys()):
    if got.get(idx) != want.get(idx):
      raise ValueError(f'{path}: class {idx} is {got.get(idx)!r} there but {want.get(idx)!r} in '
                       f'zegformer_jax/assets/{DATASET}_classes.json; is RAW another release?')
  return path


def spec() -> common.DatasetSpec:
  valid = np.zeros(256, bool)
  valid[:NUM_CLASSES + 1] = True
  return common.DatasetSpec(
      name=DATASET, reader_module='data_prep.ade150', ignore_value=IGNORE_VALUE,
      label_dtype='uint8', raw_valid=valid, raw_range=f'0..{NUM_CLASSES}')


def convert(input_dir: str, output_dir: str, *, num_shards: int | None = None,
            workers: int = 1, skip_bad: bool = False) -> dict:
  """Converts a raw ADEChallengeData2016 tree (module docstring); returns the dataset_info."""
  checked = check_class_file(input_dir)
  plans, problems = [], []
  for split, folder in SOURCES.items():
    if split != 'val_all' and not any(
        os.path.isdir(os.path.join(input_dir, d, folder)) for d in ('images', 'annotations')):
      continue
    items, probs = list_pairs(input_dir, folder)
    names, seen, lut = common.class_lut(DATASET, split, 256)  # id 0 -> ignore
    plans.append(common.SplitPlan(split, items, names, seen, lut))
    problems += [(path, reason, [split]) for path, reason in probs]
  return common.convert(
      spec(), plans, input_dir=input_dir, output_dir=output_dir, num_shards=num_shards,
      workers=workers, skip_bad=skip_bad, problems=problems,
      extra_info={'cross_dataset': True,
                  'class_file_checked': common.rel(checked, input_dir) if checked else None})


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The converter's flags: the shared ones (common.define_flags)."""
  common.define_flags(flag_values, __name__)


def main(argv: Sequence[str]) -> None:
  """The entry point (cli.run), or from Python main(['--input_dir', RAW, '--output_dir', OUT]).

  The dataset_info is not returned (absl's app.run would take it for an exit status); it is
  OUT/dataset_info.json, or what convert() returns.
  """
  a = common.parse_flags(argv, define_flags)
  common.run(convert, a)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
