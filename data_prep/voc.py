r"""PASCAL VOC 2012 zero-shot (15 seen / 5 unseen, SBD-augmented "VOCZERO") -> TFRecords.

  python -m data_prep.voc --input_dir RAW --output_dir OUT [--split_dir DIR] \
      [--background ignore|class] [--num_shards N] [--workers W] [--skip_bad]

Raw layout (VOC 2012 + SBD augmentation, as in SegmentationClassAug releases):

  RAW/JPEGImages/<name>.jpg
  RAW/SegmentationClassAug/<name>.png   0 background, 1..20 classes, 255 ignore

Image lists: the official SPNet/CaGNet lists, train_list (10,582) and test_list (1,449).
By default the copies packaged in zegformer_jax/assets/voc_{train,test}_list.json are used;
--split_dir DIR reads DIR/train_list.npy and DIR/test_list.npy instead (the reference's
format: absolute paths like .../SBD/dataset/annotations/train/<name>.png, of which only the
file stem is used).

Splits written (docs/reference.md section 5; classes in assets/voc_classes.json).
Background (0) becomes 255 in every split, so there is no background class:

  train       train_list only; seen ids 1..15 -> 0..14, unseen pixels -> 255
  val_seen    test_list only; seen ids 1..15 -> 0..14
  val_unseen  all val files (below); ids 16..20 -> 0..4
  val_all     all val files; ids 1..20 -> 0..19

The reference builds val_unseen and val_all from every file of its annotations/val folder,
without filtering by test_list. In this flat layout the val folder is every label of
SegmentationClassAug that is not in train_list (for the standard 12,031-file release these
are exactly the 1,449 test_list images, so all three val splits hold the same images).

--zs3net_unseen K (2, 4, 6, 8 or 10) writes ZS3Net's VOC benchmark instead (dataset
'voc_zs3_k<K>', classes from datasets_meta.ZS3NET_VOC_UNSEEN; use another OUT): background
is a seen class (21 classes), the first K of cow, motorbike, aeroplane, sofa, cat, tvmonitor,
train, bottle, chair, potted plant are unseen, and the four splits are as above with
background kept. Training images that hold unseen pixels keep them as ignore (this project's
train-split rule, as COCO-Stuff); ZS3Net's own code drops those images from training.

--background class writes PASCAL VOC 21 for cross-dataset evaluation instead (dataset
'voc21', classes in assets/voc21_classes.json; use another OUT): the one split

  val_all     all val files; background 0 -> 0, ids 1..20 -> 1..20, 255 -> 255

with every seen flag false (every class is evaluated). The default, --background ignore,
writes the four splits above (its val_all is VOC 20, background ignored).

JPEGImages also holds images without annotations; those are not an error. A listed name
without its label or image, or a label without its image, is a bad file (see --skip_bad).
Images are stored as their original JPEG bytes; labels as 8-bit PNG with ignore 255.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags
import numpy as np

from data_prep import common
from zegformer_jax import cli
from zegformer_jax.data import datasets_meta

DATASET = 'voc'
DATASET_21 = 'voc21'  # --background class
BACKGROUND = ('ignore', 'class')
IGNORE_VALUE = 255
RAW_MAX = 20
IMAGE_DIR, LABEL_DIR = 'JPEGImages', 'SegmentationClassAug'


def read_example(input_dir: str, image_rel: str, label_rel: str) -> common.Example:
  """The original JPEG and the raw VOC ids (0 background, 1..20, 255) of one image."""
  return common.read_pair_8bit(input_dir, image_rel, label_rel)


def read_lists(split_dir: str | None) -> dict[str, list[str]]:
  """{'train_list': names, 'test_list': names} from the assets or from split_dir/*.npy."""
  out = {}
  for which in ('train_list', 'test_list'):
    if not split_dir:
      out[which] = datasets_meta.voc_image_list(which)
      continue
    path = os.path.join(split_dir, f'{which}.npy')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path} not found (--split_dir must hold train_list.npy and '
                              'test_list.npy)')
    try:
      entries = np.load(path, allow_pickle=False).reshape(-1)
    except ValueError as e:
      raise ValueError(f'{path}: not an array of file names ({e})') from e
    out[which] = [os.path.splitext(os.path.basename(str(p)))[0] for p in entries]
  return out


def plan_items(input_dir: str, lists: dict[str, list[str]]):
  """({split: [(image, label)]}, problems [(path, reason, splits)])."""
  img_dir, lab_dir = os.path.join(input_dir, IMAGE_DIR), os.path.join(input_dir, LABEL_DIR)
  images = {os.path.splitext(os.path.basename(p))[0]
            for p in common.list_files(img_dir, r'.+\.jpg')}
  labels = {os.path.splitext(os.path.basename(p))[0]
            for p in common.list_files(lab_dir, r'.+\.png')}
  train_names = set(lists['train_list'])
  names = {
      'train': sorted(train_names),
      'val_seen': sorted(set(lists['test_list'])),
      'val_unseen': sorted(labels - train_names),
      'val_all': sorted(labels - train_names),
  }
  items, problems = {}, {}
  for split, split_names in names.items():
    items[split] = []
    for n in split_names:
      image = os.path.join(img_dir, f'{n}.jpg')
      label = os.path.join(lab_dir, f'{n}.png')
      if n not in labels:
        problems.setdefault((label, 'label file missing (the name is in the image list)'),
                            []).append(split)
      elif n not in images:
        problems.setdefault((image, 'label has no image file'), []).append(split)
      else:
        items[split].append((common.rel(image, input_dir), common.rel(label, input_dir)))
  return items, [(p, r, s) for (p, r), s in sorted(problems.items())]


def spec(dataset: str = DATASET) -> common.DatasetSpec:
  valid = np.zeros(256, bool)
  valid[:RAW_MAX + 1] = True
  valid[IGNORE_VALUE] = True
  return common.DatasetSpec(
      name=dataset, reader_module='data_prep.voc', ignore_value=IGNORE_VALUE,
      label_dtype='uint8', raw_valid=valid, raw_range=f'0..{RAW_MAX} or {IGNORE_VALUE}')


def convert(input_dir: str, output_dir: str, *, split_dir: str | None = None,
            num_shards: int | None = None, workers: int = 1, skip_bad: bool = False,
            background: str = 'ignore', zs3net_unseen: int = 0) -> dict:
  """Converts a raw VOCZERO tree (module docstring); returns the dataset_info."""
  if background not in BACKGROUND:
    raise ValueError(f'background must be one of {list(BACKGROUND)}, got {background!r}')
  if zs3net_unseen and zs3net_unseen not in datasets_meta.ZS3NET_VOC_K:
    raise ValueError(f'zs3net_unseen must be one of {list(datasets_meta.ZS3NET_VOC_K)}, '
                     f'got {zs3net_unseen}')
  if zs3net_unseen and background == 'class':
    raise ValueError('--zs3net_unseen writes its own splits (background a seen class); it '
                     'does not combine with --background class')
  lists = read_lists(split_dir)
  items, problems = plan_items(input_dir, lists)
  if background == 'class':
    return _convert_voc21(input_dir, output_dir, split_dir, items['val_all'], problems,
                          num_shards=num_shards, workers=workers, skip_bad=skip_bad)
  dataset = f'voc_zs3_k{zs3net_unseen}' if zs3net_unseen else DATASET
  plans = []
  for split, split_items in items.items():
    # DATASET: id 0 (background) -> ignore; voc_zs3_k<K>: background is class 0.
    names, seen, lut = common.class_lut(dataset, split, 256)
    plans.append(common.SplitPlan(split, split_items, names, seen, lut))
  all_names, all_seen = common.class_lut(dataset, 'val_all', 256)[:2]
  return common.convert(
      spec(dataset), plans, input_dir=input_dir, output_dir=output_dir, num_shards=num_shards,
      workers=workers, skip_bad=skip_bad, problems=problems,
      extra_info={'seen_classes': [n for n, s in zip(all_names, all_seen) if s],
                  'unseen_classes': [n for n, s in zip(all_names, all_seen) if not s],
                  'image_lists': os.path.abspath(split_dir) if split_dir else
                                 'zegformer_jax/assets/voc_{train,test}_list.json'})


def _convert_voc21(input_dir, output_dir, split_dir, items, problems, **kw) -> dict:
  """val_all with background as class 0 (PASCAL VOC 21, --background class)."""
  names, seen, lut = common.class_lut(DATASET_21, 'val_all', 256)  # 0 -> 0, 255 -> ignore
  return common.convert(
      spec(DATASET_21), [common.SplitPlan('val_all', items, names, seen, lut)],
      input_dir=input_dir, output_dir=output_dir,
      problems=[(p, r, ['val_all']) for p, r, s in problems if 'val_all' in s],
      extra_info={'cross_dataset': True, 'background': 'class',
                  'image_lists': os.path.abspath(split_dir) if split_dir else
                                 'zegformer_jax/assets/voc_{train,test}_list.json'}, **kw)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The converter's flags: the shared ones (common.define_flags), --split_dir and
  --background."""
  common.define_flags(flag_values, __name__)
  kw = dict(flag_values=flag_values, module_name=common.flag_module_name(__name__))
  flags.DEFINE_string('split_dir', None,
                      'Directory with the reference train_list.npy / test_list.npy '
                      '(default: the packaged copies).', **kw)
  flags.DEFINE_enum('background', 'ignore', list(BACKGROUND),
                    'ignore: the zero-shot splits, background ignored (VOC 20); class: only '
                    'val_all with background as class 0 (dataset voc21, 21 classes).', **kw)
  flags.DEFINE_integer('zs3net_unseen', 0,
                       "ZS3Net's VOC benchmark with K = 2, 4, 6, 8 or 10 unseen classes "
                       '(dataset voc_zs3_k<K>, background a seen class); 0: the 15/5 split.',
                       **kw)


def main(argv: Sequence[str]) -> None:
  """The entry point (cli.run), or from Python main(['--input_dir', RAW, '--output_dir', OUT]).

  The dataset_info is not returned (absl's app.run would take it for an exit status); it is
  OUT/dataset_info.json, or what convert() returns.
  """
  a = common.parse_flags(argv, define_flags)
  common.run(convert, a, split_dir=a.split_dir, background=a.background,
             zs3net_unseen=a.zs3net_unseen)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
