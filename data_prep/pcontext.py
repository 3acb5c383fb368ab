r"""PASCAL Context 59 / 459 -> TFRecords, for cross-dataset evaluation.

  python -m data_prep.pcontext --input_dir RAW --output_dir OUT --classes 59|459 \
      [--split_list FILE] [--num_shards N] [--workers W] [--skip_bad]

Raw layout (VOC2010 images plus the official PASCAL Context release, trainval.tar.gz,
unpacked beside them):

  RAW/JPEGImages/<name>.jpg
  RAW/trainval/<name>.mat        MATLAB file with 'LabelMap': [H, W] class ids 1..459 (the ids
                                 of labels.txt), 0 unlabelled
  RAW/labels.txt                 optional: '<id>: <name>' lines, checked (below)
  RAW/59_labels.txt              optional: '<k>: <name>' lines, checked (below)
  RAW/ImageSets/Main/val.txt     optional: the default image list (below)

The .mat files are read with scipy.io.loadmat (MATLAB v5 data, never a pickle). The images
keep their original JPEG bytes.

Image list: --split_list FILE, one image name per line (e.g. VOC2010's ImageSets/Main/val.txt,
the standard 5,105-image validation set of PASCAL Context). Without it, RAW/ImageSets/Main/
val.txt when it exists, else every trainval/*.mat. A listed name without its .mat, or a .mat
without its image, is a bad file (see --skip_bad).

Classes (--classes; packaged in zegformer_jax/assets/pcontext{59,459}_classes.json):

  459  the full set, in the order of labels.txt: ids 1..459 -> 0..458, 0 -> 65535
       (16-bit PNG labels, ignore 65535, as data_prep/ade20k_full.py writes them)
  59   the 59-class subset used for PASCAL Context evaluation, given by its 459-class ids
       (the standard Detail-API conversion's _mapping list, e.g. mmsegmentation's
       tools/dataset_converters/pascal_context.py), labelled in id order (alphabetical):
       those ids -> 0..58, 0 (unlabelled) and every other id -> 255 (8-bit PNG labels)

The 459 names are packaged (they are the official labels.txt, as copied by the detectron2-
based open-vocabulary code); when RAW/labels.txt exists its names must equal them, and when
RAW/59_labels.txt exists it must name the same 59 classes (its own order, the 20 VOC classes
first, is not the label order here). An id above 459 in a LabelMap makes the file bad.

Split written: val_all. Every class is evaluated (cross-dataset: a model trained on
COCO-Stuff), so the seen flags in dataset_info.json are all false; the evaluation decides
which names a model has seen. Convert 59 and 459 into separate output directories.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import flags
import numpy as np

from data_prep import common
from zegformer_jax import cli
from zegformer_jax.data import datasets_meta

IMAGE_DIR, LABEL_DIR = 'JPEGImages', 'trainval'
DEFAULT_LIST = os.path.join('ImageSets', 'Main', 'val.txt')
LABEL_KEY = 'LabelMap'
MAX_ID = 459
LUT_SIZE = MAX_ID + 1
SPLIT = 'val_all'
SETTINGS = {  # --classes -> (dataset, ignore value, label dtype)
    '59': ('pcontext59', 255, 'uint8'),
    '459': ('pcontext459', 65535, 'uint16'),
}


# ----------------------------------------------------------------------------- reading


def read_label_map(path: str) -> np.ndarray:
  """The 'LabelMap' array of a PASCAL Context .mat file (scipy.io.loadmat: no pickle)."""
  import scipy.io  # pylint: disable=g-import-not-at-top
  try:
    mat = scipy.io.loadmat(path, variable_names=[LABEL_KEY])
  except Exception as e:  # pylint: disable=broad-except  (OSError, ValueError, ...)
    raise common.BadFileError(path, f'cannot read the MATLAB file ({e})') from e
  if LABEL_KEY not in mat:
    try:
      held = sorted(name for name, _, _ in scipy.io.whosmat(path))
    except Exception:  # pylint: disable=broad-except
      held = []
    raise common.BadFileError(path, f'no {LABEL_KEY!r} array in the MATLAB file (it holds '
                                    f'{held})')
  label = np.asarray(mat[LABEL_KEY])
  if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
    raise common.BadFileError(path, f'{LABEL_KEY!r} is a {label.dtype} array of shape '
                                    f'{list(label.shape)}, not a 2-D integer array')
  return label


def read_example(input_dir: str, image_rel: str, label_rel: str) -> common.Example:
  """The original JPEG and the raw 459-class ids (0 unlabelled) of one image."""
  image_path = os.path.join(input_dir, image_rel)
  label_path = os.path.join(input_dir, label_rel)
  data, fmt, img = common.read_image(image_path)
  label = read_label_map(label_path)
  h, w = img.height, img.width
  common.check_same_size(image_path, (h, w), label_path, label.shape)
  return common.Example(image=data, image_format=fmt, raw_label=label, height=h, width=w)


# ----------------------------------------------------------------------------- listing


def read_name_list(path: str) -> list[str]:
  """Image names of a list file: one per line (a path or an extension is dropped)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'image list {path} does not exist')
  with open(path, encoding='utf-8') as f:
    names = [os.path.splitext(os.path.basename(line.strip()))[0] for line in f if line.strip()]
  if not names:
    raise ValueError(f'image list {path} names no image')
  return sorted(set(names))


def plan_items(input_dir: str, split_list: str | None):
  """((image, label) relative paths, problems [(path, reason, splits)], the list used)."""
  img_dir, lab_dir = os.path.join(input_dir, IMAGE_DIR), os.path.join(input_dir, LABEL_DIR)
  images = {os.path.basename(p)[:-len('.jpg')] for p in common.list_files(img_dir, r'.+\.jpg')}
  labels = {os.path.basename(p)[:-len('.mat')] for p in common.list_files(lab_dir, r'.+\.mat')}
  if split_list is None and os.path.isfile(os.path.join(input_dir, DEFAULT_LIST)):
    split_list = os.path.join(input_dir, DEFAULT_LIST)
  names = read_name_list(split_list) if split_list else sorted(labels)
  items, problems = [], []
  for n in names:
    image = os.path.join(img_dir, f'{n}.jpg')
    label = os.path.join(lab_dir, f'{n}.mat')
    if n not in labels:
      problems.append((label, 'label file missing (the name is in the image list)', [SPLIT]))
    elif n not in images:
      problems.append((image, 'label has no image file', [SPLIT]))
    else:
      items.append((common.rel(image, input_dir), common.rel(label, input_dir)))
  return items, problems, split_list


def _read_id_lines(path: str) -> list[tuple[int, str]]:
  """(number before ':', name after it) of the '<k>: <name>' lines of a file."""
  out = []
  with open(path, encoding='utf-8', errors='replace') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      head, sep, name = line.partition(':')
      if not sep or not head.strip().isdigit():
        raise ValueError(f'{path}:{n}: expected "<id>: <name>", got {line.strip()!r}')
      out.append((int(head), name.strip()))
  return out


def check_class_files(input_dir: str) -> list[str]:
  """Checks RAW/labels.txt and RAW/59_labels.txt (when present) against the packaged lists;
  returns the files checked (relative paths)."""
  checked = []
  path = os.path.join(input_dir, 'labels.txt')
  if os.path.isfile(path):
    want = {c['id']: c['name'] for c in datasets_meta.classes('pcontext459')}
    got = dict(_read_id_lines(path))
    for i in sorted(want.keys() | got.keys()):
      if got.get(i) != want.get(i):
        raise ValueError(f'{path}: class {i} is {got.get(i)!r} there but {want.get(i)!r} in '
                         'zegformer_jax/assets/pcontext459_classes.json; is RAW another '
                         'release?')
    checked.append('labels.txt')
  path = os.path.join(input_dir, '59_labels.txt')
  if os.path.isfile(path):
    want = {c['name'] for c in datasets_meta.classes('pcontext59')}
    got = {name for _, name in _read_id_lines(path)}
    if got != want:
      raise ValueError(f'{path}: names {sorted(got - want)[:8]} are not among the packaged 59 '
                       f'classes and {sorted(want - got)[:8]} are missing '
                       '(zegformer_jax/assets/pcontext59_classes.json)')
    checked.append('59_labels.txt')
  return checked


# ----------------------------------------------------------------------------- convert


def spec(classes: str) -> common.DatasetSpec:
  if classes not in SETTINGS:
    raise ValueError(f'classes must be one of {list(SETTINGS)}, got {classes!r}')
  dataset, ignore, dtype = SETTINGS[classes]
  return common.DatasetSpec(
      name=dataset, reader_module='data_prep.pcontext', ignore_value=ignore,
      label_dtype=dtype, raw_valid=np.ones(LUT_SIZE, bool), raw_range=f'class ids 0..{MAX_ID}')


def convert(input_dir: str, output_dir: str, *, classes: str = '59',
            split_list: str | None = None, num_shards: int | None = None, workers: int = 1,
            skip_bad: bool = False) -> dict:
  """Converts a raw PASCAL Context tree (module docstring); returns the dataset_info."""
  s = spec(str(classes))
  checked = check_class_files(input_dir)
  items, problems, used_list = plan_items(input_dir, split_list)
  names, seen, lut = common.class_lut(s.name, SPLIT, LUT_SIZE)  # unmapped ids -> ignore
  return common.convert(
      s, [common.SplitPlan(SPLIT, items, names, seen, lut)], input_dir=input_dir,
      output_dir=output_dir, num_shards=num_shards, workers=workers, skip_bad=skip_bad,
      problems=problems,
      extra_info={'cross_dataset': True, 'classes': int(classes),
                  'image_list': os.path.abspath(used_list) if used_list else
                                f'every {LABEL_DIR}/*.mat',
                  'class_files_checked': checked})


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The converter's flags: the shared ones (common.define_flags), --classes, --split_list."""
  common.define_flags(flag_values, __name__)
  kw = dict(flag_values=flag_values, module_name=common.flag_module_name(__name__))
  flags.DEFINE_enum('classes', None, list(SETTINGS),
                    'PASCAL Context 59 (subset, 255 ignore) or 459 (full, 16-bit, 65535 '
                    'ignore).', required=True, **kw)
  flags.DEFINE_string('split_list', None,
                      'File of image names, one per line (default: RAW/ImageSets/Main/val.txt '
                      'if present, else every trainval/*.mat).', **kw)


def main(argv: Sequence[str]) -> None:
  """The entry point (cli.run), or from Python main(['--input_dir', RAW, '--output_dir', OUT,
  '--classes', '59']).

  The dataset_info is not returned (absl's app.run would take it for an exit status); it is
  OUT/dataset_info.json, or what convert() returns.
  """
  a = common.parse_flags(argv, define_flags)
  common.run(convert, a, classes=a.classes, split_list=a.split_list)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
