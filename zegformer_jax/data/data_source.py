"""Random access over the TFRecord shards of one split (a grain RandomAccessDataSource).

The record index of every shard is scanned once (headers only, `tfrecord.index_records`);
global record i is looked up as (shard, byte offset, length) and read with os.pread, which
holds no file position and is therefore safe under grain's reader threads. Both CRCs are
checked on every read. File descriptors are opened lazily per process, so the source can be
pickled into grain worker processes.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Sequence

import numpy as np

from zegformer_jax.data import tfrecord


class TFRecordDataSource:
  """Serialized records of a list of TFRecord files; source[i] -> bytes (CRC-checked)."""

  def __init__(self, paths: Sequence[str]):
    self._paths = [os.fspath(p) for p in paths]
    if not self._paths:
      raise ValueError('TFRecordDataSource: no files given')
    index = [tfrecord.index_records(p) for p in self._paths]
    self._counts = np.asarray([len(ix) for ix in index], np.int64)
    self._starts = np.concatenate([[0], np.cumsum(self._counts)]).astype(np.int64)
    self._file_of = np.repeat(np.arange(len(self._paths)), self._counts).astype(np.int32)
    self._offsets = (np.concatenate([ix[:, 0] for ix in index]) if index else
                     np.zeros(0, np.int64))
    self._lengths = (np.concatenate([ix[:, 1] for ix in index]) if index else
                     np.zeros(0, np.int64))
    self._fds: dict[int, int] = {}
    self._pid = os.getpid()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __repr__(self) -> str:
    return f'TFRecordDataSource({len(self._paths)} files, {len(self)} records)'

  @property
  def paths(self) -> list[str]:
    return list(self._paths)

  def locate(self, index: int) -> tuple[str, int, int]:
    """(file path, record number within the file, byte offset) of global record `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} out of range [0, {len(self)})')
    f = int(self._file_of[index])
    return self._paths[f], int(index - self._starts[f]), int(self._offsets[index])

  def describe(self, index: int) -> str:
    path, rec, off = self.locate(index)
    return f'{path}: record {rec} (global {index}, byte offset {off})'

  def _fd(self, f: int) -> int:
    if os.getpid() != self._pid:  # forked: descriptors of the parent are not ours to share
      self._fds, self._pid, self._lock = {}, os.getpid(), threading.Lock()
    fd = self._fds.get(f)
    if fd is None:
      with self._lock:
        fd = self._fds.get(f)
        if fd is None:
          fd = os.open(self._paths[f], os.O_RDONLY)
          self._fds[f] = fd
    return fd

  def __getitem__(self, index: int) -> bytes:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} out of range [0, {len(self)})')
    f = int(self._file_of[index])
    return tfrecord.read_record_at(self._fd(f), self._paths[f], int(index - self._starts[f]),
                                   int(self._offsets[index]), int(self._lengths[index]))

  def __getstate__(self):
    state = dict(self.__dict__)
    state['_fds'] = {}
    state['_lock'] = None
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()
    self._pid = os.getpid()

  def close(self) -> None:
    if os.getpid() == self._pid:
      for fd in self._fds.values():
        os.close(fd)
    self._fds = {}

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


class SegmentationDataSource:
  """Decoded examples of one split: source[i] -> dict of numpy arrays.

  source[i] = {'image': uint8 [H,W,3] RGB, 'label': int32 [H,W], 'filename': str,
               'index': int (global record index)}.
  A label value that is neither < num_classes nor the ignore value raises ValueError naming
  the file and record.

  With cache_mb > 0, decoded examples are kept in memory, first come first kept, until their
  arrays fill cache_mb MiB; later reads of a kept record skip the read, both CRCs, the PNG /
  JPEG decode and the label check (tf.data's `cache()` after decoding). A record is still
  checked in full the first time it is read. Cached arrays are read-only, and each grain
  worker process holds its own cache.
  """

  def __init__(self, paths: Sequence[str], num_classes: int, ignore_value: int,
               cache_mb: float = 0):
    self.records = TFRecordDataSource(paths)
    self.num_classes = int(num_classes)
    self.ignore_value = int(ignore_value)
    self.cache_bytes = int(float(cache_mb) * 2**20)
    self._cache: dict[int, dict[str, Any]] = {}
    self._cached_bytes = 0

  def __len__(self) -> int:
    return len(self.records)

  def __repr__(self) -> str:
    return (f'SegmentationDataSource({self.records!r}, num_classes={self.num_classes}, '
            f'ignore={self.ignore_value})')

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    hit = self._cache.get(index)
    if hit is not None:
      return dict(hit)
    ex = self._decode(index)
    size = ex['image'].nbytes + ex['label'].nbytes
    # Under grain's reader threads two threads may decode the same record; both results are
    # equal, and the byte count is only a budget, so no lock is needed.
    if self._cached_bytes + size <= self.cache_bytes:
      for a in (ex['image'], ex['label']):
        a.flags.writeable = False
      self._cache[index] = ex
      self._cached_bytes += size
    return dict(ex)

  def _decode(self, index: int) -> dict[str, Any]:
    where = self.records.describe(index)
    ex = tfrecord.decode_example(self.records[index], where)
    label = ex['label']
    if label is None:
      raise ValueError(f'{where} ({ex["filename"]}): missing feature "label/encoded"')
    bad = (label >= self.num_classes) & (label != self.ignore_value)
    bad |= label < 0
    if bad.any():
      values = np.unique(label[bad])[:8].tolist()
      raise ValueError(f'{where} ({ex["filename"]}): label values {values} are outside the '
                       f'split\'s range [0, {self.num_classes}) and not the ignore value '
                       f'{self.ignore_value}')
    return {'image': ex['image'], 'label': label, 'filename': ex['filename'],
            'index': index}


def open_split(data_dir: str, split: str, cache_mb: float = 0
               ) -> tuple[SegmentationDataSource, dict]:
  """The SegmentationDataSource of `split` in `data_dir` and the split's dataset_info entry
  (cache_mb: SegmentationDataSource's in-memory cache of decoded examples)."""
  info = tfrecord.read_dataset_info(data_dir)
  s = tfrecord.split_info(info, split, data_dir)
  paths = [os.path.join(data_dir, sh['file']) for sh in s['shards']]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'split {split!r} of {data_dir}: shard files missing: {missing[:4]}')
  src = SegmentationDataSource(paths, len(s['class_names']), s['ignore_value'], cache_mb)
  if len(src) != int(s['num_examples']):
    raise ValueError(f'split {split!r} of {data_dir}: shards hold {len(src)} records but '
                     f'dataset_info.json says {s["num_examples"]}')
  return src, s
