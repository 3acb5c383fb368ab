r"""ADE20k-Full 847 (572 seen / 275 unseen, frequency split) -> TFRecords, as ZegFormer does.

  python -m data_prep.ade20k_full --input_dir RAW --output_dir OUT [--num_shards N] \
      [--workers W] [--skip_bad] [--max_class_id 3688]

Raw layout (the ADE20K_2021_17_01 release; RAW is the ADE20K_2021_17_01 directory):

  RAW/images/ADE/{training,validation}/**/<name>.jpg
  RAW/images/ADE/{training,validation}/**/<name>_seg.png   beside its image

Other files there (*_parts_N.png, *.json, instance folders) are ignored. The class of a pixel
is decoded from the _seg.png as (R // 10) * 256 + G (the reference's (R / 10).astype(int32));
it equals the `id` of assets/ade20k_full_classes.json. Ids that are not among the 847
classes (and 0, unlabelled) map to the ignore value 65535. An id above --max_class_id
(default 3688, the number of object names of the 2021_17_01 index) cannot come from a valid
_seg.png and makes the file bad.

Resizing (official prepare script): when the short side is > 512 the image and label are
resized so that the short side is 512 and the long side round(long / short * 512) (Python
round); images bilinear, labels nearest, with OpenCV's sampling (INTER_LINEAR: pixel centres
(d + 0.5) * s - 0.5, clamped at the borders; INTER_NEAREST: floor(d * s)) reimplemented in
numpy (`resize_linear_cv2`, `resize_nearest_cv2`; image values can differ from cv2's
fixed-point arithmetic by 1). Resized images are stored as JPEG quality 100, as the
reference saves them; images that need no resize keep their original bytes.

Splits written (labels: 16-bit PNG, ignore 65535):

  train       training/; seen (frequent + common) -> 0..571, rare pixels -> 65535
  val_seen    validation/; seen -> 0..571
  val_unseen  validation/; unseen (rare) -> 0..274
  val_all     validation/; all 847 -> 0..846 in the frequency-list order
"""
from __future__ import annotations

import io
import os
from typing import Sequence

from absl import flags
import numpy as np

from data_prep import common
from zegformer_jax import cli

DATASET = 'ade20k_full'
IGNORE_VALUE = 65535
MAX_SHORT = 512
DEFAULT_MAX_CLASS_ID = 3688
DECODABLE = 26 * 256  # (255 // 10) * 256 + 255 < 26 * 256
SOURCES = {'train': 'training', 'val_seen': 'validation', 'val_unseen': 'validation',
           'val_all': 'validation'}
JPEG_QUALITY = 100


# ----------------------------------------------------------------------------- resizing


def reference_resize_shape(h: int, w: int, max_size: int = MAX_SHORT) -> tuple[int, int] | None:
  """(h', w') of the official preprocessing, or None when the short side is <= max_size."""
  if w >= h > max_size:
    return max_size, round(w / float(h) * max_size)
  if h >= w > max_size:
    return round(h / float(w) * max_size), max_size
  return None


def _linear_taps(src: int, dst: int):
  """cv2 INTER_LINEAR source indices and weights along one axis."""
  x = (np.arange(dst, dtype=np.float64) + 0.5) * (src / dst) - 0.5
  x0 = np.floor(x).astype(np.int64)
  frac = x - x0
  frac[x0 < 0] = 0.0
  x0 = np.maximum(x0, 0)
  at_end = x0 >= src - 1
  frac[at_end] = 0.0
  x0[at_end] = src - 1
  return x0, np.minimum(x0 + 1, src - 1), frac


def resize_linear_cv2(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """uint8 [H,W,C] -> uint8 [h,w,C] like cv2.resize(..., INTER_LINEAR) (no antialiasing)."""
  h, w = hw
  y0, y1, fy = _linear_taps(image.shape[0], h)
  x0, x1, fx = _linear_taps(image.shape[1], w)
  img = image.astype(np.float32)
  fx = fx.astype(np.float32)[None, :, None]
  rows = img[:, x0] * (1 - fx) + img[:, x1] * fx
  fy = fy.astype(np.float32)[:, None, None]
  out = rows[y0] * (1 - fy) + rows[y1] * fy
  return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)


def resize_nearest_cv2(label: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """[H,W] -> [h,w] like cv2.resize(..., INTER_NEAREST): source index floor(d * src / dst)."""
  h, w = hw
  sy = np.minimum(np.floor(np.arange(h) * (1.0 / (h / label.shape[0]))).astype(np.int64),
                  label.shape[0] - 1)
  sx = np.minimum(np.floor(np.arange(w) * (1.0 / (w / label.shape[1]))).astype(np.int64),
                  label.shape[1] - 1)
  return label[sy[:, None], sx[None, :]]


# ----------------------------------------------------------------------------- reading


def decode_seg(seg: np.ndarray) -> np.ndarray:
  """uint8 [H,W,3+] _seg.png pixels -> int32 [H,W] class ids, (R // 10) * 256 + G."""
  return (seg[..., 0].astype(np.int32) // 10) * 256 + seg[..., 1].astype(np.int32)


def read_example(input_dir: str, image_rel: str, label_rel: str,
                 max_short: int = MAX_SHORT) -> common.Example:
  """The stored image and the raw class ids of one ADE image, resized as the reference."""
  image_path = os.path.join(input_dir, image_rel)
  label_path = os.path.join(input_dir, label_rel)
  data, fmt, img = common.read_image(image_path)
  seg = common.read_label(label_path, modes=('RGB', 'RGBA'))
  h, w = img.height, img.width
  common.check_same_size(image_path, (h, w), label_path, seg.shape[:2])
  raw = decode_seg(seg)
  new = reference_resize_shape(h, w, max_short)
  if new is not None:
    rgb = resize_linear_cv2(np.asarray(img.convert('RGB')), new)
    raw = resize_nearest_cv2(raw, new)
    from PIL import Image  # pylint: disable=g-import-not-at-top
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format='JPEG', quality=JPEG_QUALITY)
    data, fmt, (h, w) = buf.getvalue(), 'jpeg', new
  return common.Example(image=data, image_format=fmt, raw_label=raw, height=h, width=w)


# ----------------------------------------------------------------------------- listing


def list_pairs(input_dir: str, folder: str):
  """((image, label) relative paths, problems) under images/ADE/<folder>."""
  root = os.path.join(input_dir, 'images', 'ADE', folder)
  images = {p[:-len('.jpg')]: p for p in common.list_files(root, r'.+\.jpg', recursive=True)}
  labels = {p[:-len('_seg.png')]: p
            for p in common.list_files(root, r'.+_seg\.png', recursive=True)}
  pairs, problems = common.pair_by_key(images, labels)
  return [(common.rel(i, input_dir), common.rel(l, input_dir)) for i, l in pairs], problems


def spec(max_class_id: int = DEFAULT_MAX_CLASS_ID) -> common.DatasetSpec:
  if not 3156 <= max_class_id < DECODABLE:  # 3156: the largest id among the 847 classes
    raise ValueError(f'max_class_id must be in [3156, {DECODABLE - 1}], got {max_class_id}')
  valid = np.zeros(DECODABLE, bool)
  valid[:max_class_id + 1] = True
  return common.DatasetSpec(
      name=DATASET, reader_module='data_prep.ade20k_full', ignore_value=IGNORE_VALUE,
      label_dtype='uint16', raw_valid=valid, raw_range=f'class ids 0..{max_class_id}',
      reader_options={'max_short': MAX_SHORT})


def convert(input_dir: str, output_dir: str, *, num_shards: int | None = None,
            workers: int = 1, skip_bad: bool = False,
            max_class_id: int = DEFAULT_MAX_CLASS_ID) -> dict:
  """Converts a raw ADE20K_2021_17_01 tree (module docstring); returns the dataset_info."""
  s = spec(max_class_id)
  listed = {f: list_pairs(input_dir, f) for f in sorted(set(SOURCES.values()))}
  plans = []
  for split, folder in SOURCES.items():
    names, seen, lut = common.class_lut(DATASET, split, DECODABLE)
    plans.append(common.SplitPlan(split, listed[folder][0], names, seen, lut))
  problems = [(path, reason, [sp for sp, f in SOURCES.items() if f == folder])
              for folder, (_, probs) in listed.items() for path, reason in probs]
  all_names, all_seen = common.class_lut(DATASET, 'val_all', DECODABLE)[:2]
  return common.convert(
      s, plans, input_dir=input_dir, output_dir=output_dir, num_shards=num_shards,
      workers=workers, skip_bad=skip_bad, problems=problems,
      extra_info={'seen_classes': [n for n, v in zip(all_names, all_seen) if v],
                  'unseen_classes': [n for n, v in zip(all_names, all_seen) if not v],
                  'max_class_id': max_class_id})


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The converter's flags: the shared ones (common.define_flags) and --max_class_id."""
  common.define_flags(flag_values, __name__)
  flags.DEFINE_integer('max_class_id', DEFAULT_MAX_CLASS_ID,
                       'Largest class id a _seg.png may hold (larger ids: bad file).',
                       flag_values=flag_values, module_name=common.flag_module_name(__name__))


def main(argv: Sequence[str]) -> None:
  """The entry point (cli.run), or from Python main(['--input_dir', RAW, '--output_dir', OUT]).

  The dataset_info is not returned (absl's app.run would take it for an exit status); it is
  OUT/dataset_info.json, or what convert() returns.
  """
  a = common.parse_flags(argv, define_flags)
  common.run(convert, a, max_class_id=a.max_class_id)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
