"""TFRecord files and tf.train.Example records, written and read without TensorFlow.

Framing (identical to TensorFlow's, so tf.data.TFRecordDataset reads these files):

  uint64 length (little endian) | uint32 masked_crc32c(length bytes) |
  data[length]                  | uint32 masked_crc32c(data)

with masked_crc(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32).

CRC32C (Castagnoli) comes from google-crc32c's C extension (a declared dependency).

Examples use the tf.train.Example protobuf as shipped by tensorflow_datasets
(`tensorflow_datasets.proto.tf_example_generated_pb2`), which needs no TensorFlow. The
segmentation schema (docs/reference.md, section 7, "TFRecord schema") is:

  image/encoded  bytes  PNG or JPEG          image/format  bytes  b'png' | b'jpeg'
  image/filename bytes  original file name   image/height  int64, image/width int64
  label/encoded  bytes  PNG, 8 or 16 bit     label/format  bytes  b'png'

`dataset_info.json` sits beside the shards of a dataset directory and describes every split
written there (`write_dataset_info` / `read_dataset_info`; layout in `write_dataset_info`).
"""
from __future__ import annotations

import io
import json
import os
import struct
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
# tf.train.Example as shipped by tensorflow_datasets (no TensorFlow). Imported with this
# module, never on first use: tensorflow_datasets imports itself inside etils'
# `lazy_imports()`, which swaps builtins.__import__ for the whole process while it runs, so
# an import made meanwhile by another thread (an orbax restore thread, a grain reader) gets
# a LazyModule; a checkpoint restore failed that way once ("'LazyModule' object is not
# callable" in humanize), and two reader threads importing it at once could deadlock.
from tensorflow_datasets.proto import tf_example_generated_pb2 as example_pb2

DATASET_INFO_FILE = 'dataset_info.json'
DATASET_INFO_VERSION = 1

_MASK_DELTA = 0xA282EAD8
_HEADER = struct.Struct('<QI')
_FOOTER = struct.Struct('<I')


class TFRecordError(ValueError):
  """A TFRecord file is corrupt or truncated; the message names file, record and offset."""


# ----------------------------------------------------------------------------- CRC32C


def _google_crc32c():
  """google_crc32c's value function (a declared dependency)."""
  import google_crc32c  # pylint: disable=g-import-not-at-top
  if google_crc32c.implementation != 'c':  # a platform without its wheel: pure Python, slow
    import logging  # pylint: disable=g-import-not-at-top
    logging.getLogger(__name__).warning(
        'google-crc32c runs without its C extension: TFRecord CRCs are slow; reinstall it '
        'with a compiler available (pip install --force-reinstall google-crc32c)')
  return google_crc32c.value


_crc32c_value = _google_crc32c()


def crc32c(data: bytes) -> int:
  """CRC32C (Castagnoli) of `data`: crc32c(b'123456789') == 0xE3069283."""
  return int(_crc32c_value(bytes(data)))


def masked_crc32c(data: bytes) -> int:
  """TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2**32)."""
  c = crc32c(data)
  return (((c >> 15) | (c << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- framing


def encode_record(data: bytes) -> bytes:
  """One framed TFRecord: length, length CRC, data, data CRC."""
  length = struct.pack('<Q', len(data))
  return (length + _FOOTER.pack(masked_crc32c(length)) + bytes(data)
          + _FOOTER.pack(masked_crc32c(data)))


class TFRecordWriter:
  """Writes one TFRecord file atomically (temp file, then os.replace on close).

  Use as a context manager; if the block raises, the temporary file is removed and the
  destination is left untouched.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    self._tmp = f'{self.path}.tmp-{os.getpid()}'
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    self._f = open(self._tmp, 'wb')
    self.num_records = 0

  def write(self, data: bytes) -> None:
    if self._f is None:
      raise ValueError(f'TFRecordWriter for {self.path} is closed')
    self._f.write(encode_record(data))
    self.num_records += 1

  def close(self) -> None:
    if self._f is None:
      return
    self._f.flush()
    os.fsync(self._f.fileno())
    self._f.close()
    self._f = None
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self) -> 'TFRecordWriter':
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.close()
    else:
      self.abort()


def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> int:
  """Writes all `records` to one TFRecord file atomically; returns the record count."""
  with TFRecordWriter(path) as w:
    for r in records:
      w.write(r)
    return w.num_records


def _read_exact(f, n: int, path: str, index: int, offset: int, what: str) -> bytes:
  b = f.read(n)
  if len(b) != n:
    raise TFRecordError(
        f'{path}: record {index} at byte offset {offset} is truncated: expected {n} bytes of '
        f'{what}, found {len(b)}')
  return b


def _check_length(path, index, offset, header: bytes) -> int:
  length, stored = _HEADER.unpack(header)
  computed = masked_crc32c(header[:8])
  if stored != computed:
    raise TFRecordError(
        f'{path}: record {index} at byte offset {offset}: length CRC mismatch (stored '
        f'0x{stored:08x}, computed 0x{computed:08x}); the file is corrupt')
  return length


def index_records(path: str | os.PathLike) -> np.ndarray:
  """Scans the record headers of a TFRecord file (verifying the length CRCs).

  Returns:
    int64 [num_records, 2]: (byte offset of the record's header, data length).
  Raises:
    FileNotFoundError if the file is missing; TFRecordError on corruption or truncation.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'TFRecord file not found: {path}')
  size = os.path.getsize(path)
  rows = []
  with open(path, 'rb') as f:
    offset = 0
    while offset < size:
      index = len(rows)
      header = _read_exact(f, _HEADER.size, path, index, offset, 'header')
      length = _check_length(path, index, offset, header)
      end = offset + _HEADER.size + length + _FOOTER.size
      if end > size:
        raise TFRecordError(
            f'{path}: record {index} at byte offset {offset} is truncated: it needs '
            f'{end - offset} bytes but the file ends after {size - offset}')
      rows.append((offset, length))
      offset = end
      f.seek(offset)
  return np.asarray(rows, np.int64).reshape(-1, 2)


def read_record_at(f_or_fd, path: str, index: int, offset: int,
                   length: int | None = None) -> bytes:
  """Reads and CRC-checks the record whose header starts at `offset`.

  Args:
    f_or_fd: an open binary file object, or an OS file descriptor (read with os.pread, which
      is safe to share between threads).
    path, index: used only in error messages.
    offset: byte offset of the record header (from `index_records`).
    length: expected data length (from `index_records`), checked against the header.
  """
  if isinstance(f_or_fd, int):
    header_len = _HEADER.size
    want = header_len + (length if length is not None else 0) + _FOOTER.size
    buf = os.pread(f_or_fd, want, offset)
    if len(buf) < header_len:
      raise TFRecordError(f'{path}: record {index} at byte offset {offset} is truncated: '
                          f'header has {len(buf)} of {header_len} bytes')
    n = _check_length(path, index, offset, buf[:header_len])
    if length is None or n != length:
      if length is not None:
        raise TFRecordError(f'{path}: record {index} at byte offset {offset}: length {n} '
                            f'differs from the index ({length}); the file changed')
      buf = buf[:header_len] + os.pread(f_or_fd, n + _FOOTER.size, offset + header_len)
    body = buf[header_len:]
    if len(body) != n + _FOOTER.size:
      raise TFRecordError(f'{path}: record {index} at byte offset {offset} is truncated: '
                          f'expected {n + _FOOTER.size} bytes of data and CRC, found '
                          f'{len(body)}')
  else:
    f_or_fd.seek(offset)
    header = _read_exact(f_or_fd, _HEADER.size, path, index, offset, 'header')
    n = _check_length(path, index, offset, header)
    if length is not None and n != length:
      raise TFRecordError(f'{path}: record {index} at byte offset {offset}: length {n} '
                          f'differs from the index ({length}); the file changed')
    body = _read_exact(f_or_fd, n + _FOOTER.size, path, index, offset, 'data and CRC')
  data = body[:n]
  (stored,) = _FOOTER.unpack(body[n:])
  computed = masked_crc32c(data)
  if stored != computed:
    raise TFRecordError(
        f'{path}: record {index} at byte offset {offset}: data CRC mismatch (stored '
        f'0x{stored:08x}, computed 0x{computed:08x}); the file is corrupt')
  return data


def read_records(path: str | os.PathLike) -> Iterator[bytes]:
  """Yields the data of every record of a TFRecord file in order, checking both CRCs."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'TFRecord file not found: {path}')
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    offset, index = 0, 0
    while offset < size:
      data = read_record_at(f, path, index, offset)
      offset += _HEADER.size + len(data) + _FOOTER.size
      index += 1
      yield data


def shard_filenames(split: str, num_shards: int) -> list[str]:
  """TFDS-style shard names: '<split>.tfrecord-00000-of-00004', ..."""
  return [f'{split}.tfrecord-{i:05d}-of-{num_shards:05d}' for i in range(num_shards)]


def shard_bounds(num_examples: int, num_shards: int) -> list[tuple[int, int]]:
  """Contiguous [start, end) example ranges of each shard (sizes differ by at most one)."""
  if num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  return [(i * num_examples // num_shards, (i + 1) * num_examples // num_shards)
          for i in range(num_shards)]


def write_sharded(out_dir: str | os.PathLike, split: str, records: Sequence[bytes],
                  num_shards: int) -> list[dict]:
  """Writes `records` to `num_shards` contiguous shards of split `split` in `out_dir`.

  Global record index = position in `records` (shards in order). Returns the shard list for
  dataset_info.json: [{'file': name, 'num_examples': n}, ...].
  """
  shards = []
  for name, (lo, hi) in zip(shard_filenames(split, num_shards),
                            shard_bounds(len(records), num_shards)):
    write_records(os.path.join(out_dir, name), records[lo:hi])
    shards.append({'file': name, 'num_examples': hi - lo})
  return shards


# ----------------------------------------------------------------------------- tf.train.Example


def encode_png(array: np.ndarray, compress_level: int = 6) -> bytes:
  """PNG bytes of uint8 [H,W,3] RGB, uint8 [H,W] grey, or uint16 [H,W] (16-bit grey)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  a = np.asarray(array)
  if (a.dtype == np.uint16 and a.ndim == 2) or (a.dtype == np.uint8 and a.ndim in (2, 3)):
    img = Image.fromarray(np.ascontiguousarray(a))  # uint16 [H,W] -> mode 'I;16'
  else:
    raise ValueError(f'encode_png: unsupported array {a.dtype} {a.shape}; expected uint8 '
                     '[H,W,3], uint8 [H,W] or uint16 [H,W]')
  out = io.BytesIO()
  img.save(out, format='PNG', compress_level=compress_level)
  return out.getvalue()


def encode_example(*, image: bytes, image_format: str, filename: str, height: int, width: int,
                   label: bytes | None = None, label_format: str = 'png') -> bytes:
  """Serialized tf.train.Example with the segmentation schema (module docstring)."""
  pb = example_pb2
  ex = pb.Example()
  feat = ex.features.feature
  feat['image/encoded'].bytes_list.value.append(bytes(image))
  feat['image/format'].bytes_list.value.append(image_format.encode())
  feat['image/filename'].bytes_list.value.append(filename.encode())
  feat['image/height'].int64_list.value.append(int(height))
  feat['image/width'].int64_list.value.append(int(width))
  if label is not None:
    feat['label/encoded'].bytes_list.value.append(bytes(label))
    feat['label/format'].bytes_list.value.append(label_format.encode())
  return ex.SerializeToString(deterministic=True)


def parse_example(serialized: bytes, where: str = 'record') -> dict[str, Any]:
  """Parses a serialized tf.train.Example into {key: bytes | int | list} (first values).

  Single-valued features are unwrapped; `where` names the record in error messages.
  """
  pb = example_pb2
  ex = pb.Example()
  try:
    ex.ParseFromString(serialized)
  except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass
    raise ValueError(f'{where}: not a valid tf.train.Example ({e})') from e
  out = {}
  for key, f in ex.features.feature.items():
    kind = f.WhichOneof('kind')
    values = list(getattr(f, kind).value) if kind else []
    out[key] = values[0] if len(values) == 1 else values
  return out


def decode_image(data: bytes, where: str = 'image') -> np.ndarray:
  """PNG/JPEG bytes -> uint8 [H,W,3] RGB."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as img:
      return np.asarray(img.convert('RGB'), dtype=np.uint8)
  except Exception as e:
    raise ValueError(f'{where}: cannot decode image ({e})') from e


def decode_label(data: bytes, where: str = 'label') -> np.ndarray:
  """8- or 16-bit single-channel PNG bytes -> int32 [H,W] label ids."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as img:
      if img.mode not in ('L', 'P', 'I;16', 'I;16B', 'I', 'I;16L'):
        raise ValueError(f'label PNG mode {img.mode!r} is not single-channel 8/16 bit')
      arr = np.asarray(img)
  except Exception as e:
    raise ValueError(f'{where}: cannot decode label ({e})') from e
  return arr.astype(np.int32)


def decode_example(serialized: bytes, where: str = 'record') -> dict[str, Any]:
  """Serialized segmentation Example -> {'image': uint8 [H,W,3], 'label': int32 [H,W] | None,
  'filename': str, 'height': int, 'width': int}. Errors name `where` and the key."""
  feats = parse_example(serialized, where)
  for key in ('image/encoded', 'image/height', 'image/width'):
    if key not in feats or feats[key] == []:
      raise ValueError(f'{where}: missing feature {key!r} (has {sorted(feats)})')
  filename = feats.get('image/filename', b'')
  filename = filename.decode() if isinstance(filename, bytes) else ''
  image = decode_image(feats['image/encoded'], f'{where} ({filename}) image/encoded')
  h, w = int(feats['image/height']), int(feats['image/width'])
  if image.shape[:2] != (h, w):
    raise ValueError(f'{where} ({filename}): image/encoded is {image.shape[:2]} but '
                     f'image/height, image/width say {(h, w)}')
  label = None
  if feats.get('label/encoded', []) != []:
    label = decode_label(feats['label/encoded'], f'{where} ({filename}) label/encoded')
    if label.shape != (h, w):
      raise ValueError(f'{where} ({filename}): label/encoded is {label.shape} but the image '
                       f'is {(h, w)}')
  return {'image': image, 'label': label, 'filename': filename, 'height': h, 'width': w}


# ----------------------------------------------------------------------------- dataset_info.json

_REQUIRED_SPLIT_KEYS = ('class_names', 'seen', 'num_examples', 'shards')


def write_dataset_info(out_dir: str | os.PathLike, info: dict) -> str:
  """Validates and writes `out_dir/dataset_info.json` atomically; returns its path.

  Layout (one file describes every split of the directory):
    {
      "version": 1, "dataset": "shapesworld", "ignore_value": 255,
      "splits": {
        "<split>": {
          "class_names": [...],          # label id -> name, for this split's label maps
          "seen": [true, false, ...],    # per class of this split: seen in training?
          "num_examples": N,
          "shards": [{"file": "<split>.tfrecord-00000-of-00002", "num_examples": n}, ...],
          "ignore_value": 255,           # optional, overrides the top-level value
          "image_shapes": [[h, w], ...]  # optional: distinct image sizes (static eval shapes)
        }, ...
      },
      ...                                # free-form extras (e.g. generator settings)
    }
  """
  out_dir = os.fspath(out_dir)
  if 'ignore_value' not in info:
    raise ValueError('dataset_info: missing top-level key "ignore_value"')
  splits = info.get('splits')
  if not isinstance(splits, dict) or not splits:
    raise ValueError('dataset_info: "splits" must be a non-empty dict of split name -> info')
  for name, s in splits.items():
    for key in _REQUIRED_SPLIT_KEYS:
      if key not in s:
        raise ValueError(f'dataset_info: split {name!r} is missing key {key!r}')
    if len(s['class_names']) != len(s['seen']):
      raise ValueError(f'dataset_info: split {name!r} has {len(s["class_names"])} class names '
                       f'but {len(s["seen"])} seen flags')
    total = sum(int(sh['num_examples']) for sh in s['shards'])
    if total != int(s['num_examples']):
      raise ValueError(f'dataset_info: split {name!r}: shards hold {total} examples, '
                       f'num_examples says {s["num_examples"]}')
  info = dict(info)
  info.setdefault('version', DATASET_INFO_VERSION)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, DATASET_INFO_FILE)
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(info, f, indent=1)
  os.replace(tmp, path)
  return path


def read_dataset_info(data_dir: str | os.PathLike) -> dict:
  """Reads `data_dir/dataset_info.json` (see `write_dataset_info` for the layout)."""
  data_dir = os.fspath(data_dir)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(f'dataset directory does not exist: {data_dir!r}')
  path = os.path.join(data_dir, DATASET_INFO_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path} not found: {data_dir!r} is not a converted dataset directory (run the '
        'data_prep converter for this dataset first)')
  try:
    with open(path) as f:
      info = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: invalid JSON ({e})') from e
  if 'splits' not in info or 'ignore_value' not in info:
    raise ValueError(f'{path}: missing "splits" or "ignore_value"')
  return info


class SplitNotFoundError(KeyError, ValueError):
  """A split name the dataset does not have (a user error: one line from the CLI)."""

  def __str__(self):
    return str(self.args[0]) if self.args else ''


def split_info(info: dict, split: str, data_dir: str = '') -> dict:
  """The entry of `split` with 'ignore_value' filled in; a clear error if it is absent."""
  splits = info['splits']
  if split not in splits:
    raise SplitNotFoundError(f'split {split!r} not in '
                             f'{os.path.join(data_dir, DATASET_INFO_FILE)}; '
                             f'available: {sorted(splits)}')
  s = dict(splits[split])
  s.setdefault('ignore_value', info['ignore_value'])
  return s
