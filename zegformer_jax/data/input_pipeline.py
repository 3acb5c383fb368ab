"""grain input pipelines: training (infinite, shuffled, augmented, checkpointable) and eval.

Training, per process (`make_train_iterator`):

  record order  grain MapDataset.range(N).shuffle(shuffle_seed): a global permutation of the N
                records of the split, a different one each epoch (grain folds the epoch
                into the seed).
  sharding      process p of P takes positions p, p+P, p+2P, ... of each epoch's permutation,
                ceil(N/P) of them (wrapping around), so the processes together see every
                record once per epoch (exactly once when P divides N) and it still works
                with fewer records or files than processes. Records are addressed by index,
                not by file, so the number of shard files does not matter.
  parse+augment TFRecord read with CRC checks, PNG/JPEG decode, the official augmentation
                (augment.train_augment) with np.random.default_rng([seed, salt, record, epoch])
                (the same record gets the same augmentation in the same epoch, whatever the
                process count or worker count), then augment.make_targets.
  batch         local batch = global_batch_size // process_count, on the MapDataset, so a
                batch is one grain element (workers produce whole batches).
  prefetch      config.input.prefetch reader threads / buffered batches; with
                config.input.num_workers > 0, grain multiprocessing (mp_prefetch).

Train batch (numpy, b = local batch, C = crop_size, M = max_masks):
  'image'          uint8 [b,C,C,3]    RGB, padding 128 (normalised on device, in float32)
  'label'          int32   [b,C,C]    train ids, padding and unseen pixels = ignore value
  'target_classes' int32   [b,M]      class id of each target mask (padding 0)
  (target masks, label == target_classes[m], are built on device by the train step:
   losses.masks_from_label)
  'target_valid'   bool    [b,M]
  (+ 'record_index' int64 [b], 'epoch' int64 [b] with include_metadata=True)

The returned object is a grain DatasetIterator: get_state() -> dict (JSON-serialisable),
set_state(state) resumes exactly (the whole pipeline is a function of the element index).
With orbax, grain 0.2.18 provides:
  * orbax.checkpoint.CheckpointManager (args API):
      from grain.checkpoint import CheckpointHandler, CheckpointSave, CheckpointRestore
      mngr = ocp.CheckpointManager(dir, item_handlers={'state': ocp.StandardCheckpointHandler(),
                                                       'data': CheckpointHandler()})
      mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              data=CheckpointSave(train_iter)))
      mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                 data=CheckpointRestore(train_iter)))
    (grain.python.PyGrainCheckpointHandler / PyGrainCheckpointSave / PyGrainCheckpointRestore
    are the same classes under their older names.) Each process writes
    process_<i>-of-<n>.json in the item directory, so restore needs the same process count.
  * orbax.checkpoint.v1: the iterator itself implements the StatefulCheckpointable protocol
    (async save(directory) / load(directory)).

Eval (`make_eval_batches`): every image of the split exactly once across processes (process
p takes records p, p+P, ...), test-time ResizeShortestEdge, padding to ONE static shape for
the whole split so nothing recompiles (`eval_shapes`), and the last local batches padded with
masked examples so that every process yields the same number of batches.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any, Iterator

import grain
import numpy as np

from zegformer_jax.data import augment
from zegformer_jax.data import data_source
from zegformer_jax.data import tfrecord

_AUG_SALT = 0x5EED  # separates the augmentation streams from other uses of shuffle_seed


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return int(process_index), int(process_count)


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
  if global_batch % process_count:
    raise ValueError(f'{what}={global_batch} is not divisible by the process count '
                     f'{process_count}')
  return global_batch // process_count


def data_dir(config) -> str:
  """config.dataset.data_dir, checked: a directory of TFRecord shards and dataset_info.json."""
  path = config.dataset.data_dir
  if not path or not os.path.isdir(path):
    raise FileNotFoundError(
        f'dataset directory {path!r} (config.dataset.data_dir) does not exist; convert the '
        f'raw dataset with `python -m data_prep.{config.dataset.name or "<dataset>"} '
        f'--input_dir RAW --output_dir {path or "DIR"}` or set --config.dataset.data_dir')
  return path


def dataset_classes(data_dir: str, split: str) -> tuple[list[str], np.ndarray]:
  """(class names in label-id order, seen mask bool [K]) of `split`, from dataset_info.json."""
  info = tfrecord.read_dataset_info(data_dir)
  s = tfrecord.split_info(info, split, data_dir)
  return list(s['class_names']), np.asarray(s['seen'], np.bool_)


# ----------------------------------------------------------------------------- training


class _LocalRecord:
  """Local stream index k -> (global record index, epoch) for one process (module doc)."""

  def __init__(self, order: grain.MapDataset, num_records: int, local_len: int,
               process_index: int, process_count: int):
    self.order = order
    self.n = num_records
    self.local_len = local_len
    self.pi = process_index
    self.pc = process_count

  def __call__(self, k: int, _) -> tuple[int, int]:
    epoch, j = divmod(int(k), self.local_len)
    pos = (self.pi + self.pc * j) % self.n
    return int(self.order[epoch * self.n + pos]), epoch


class _TrainTransform:
  """(record, epoch) -> augmented example with targets (numpy)."""

  def __init__(self, source: data_source.SegmentationDataSource, config, seed: int,
               include_metadata: bool):
    inp = config.input
    self.source = source
    self.seed = int(seed)
    self.min_size_train = tuple(int(s) for s in inp.min_size_train)
    self.max_size_train = int(inp.max_size_train)
    self.crop_size = inp.crop_size
    self.color_aug = bool(inp.color_aug_ssd)
    self.max_masks = int(inp.max_masks)
    self.ignore = int(source.ignore_value)
    self.num_classes = int(source.num_classes)
    self.uint8_labels = self.num_classes <= 256 and 0 <= self.ignore < 256
    self.include_metadata = include_metadata

  def __call__(self, item: tuple[int, int]) -> dict[str, Any]:
    record, epoch = item
    ex = self.source[record]
    rng = np.random.default_rng([self.seed, _AUG_SALT, record, epoch])
    label = ex['label']
    if self.uint8_labels:  # the source checked every id: < num_classes or the ignore value
      label = label.astype(np.uint8)
    image, label = augment.train_augment(
        ex['image'], label, rng, min_size_train=self.min_size_train,
        max_size_train=self.max_size_train, crop_size=self.crop_size,
        ignore_value=self.ignore, color_aug=self.color_aug)
    # uint8, not float32: a quarter of the bytes to batch, hold and send to the devices;
    # preprocess.normalize casts on device, to the same float32 values.
    out = {'image': image, 'label': label}
    out.update(augment.make_targets(label, self.num_classes, self.max_masks, self.ignore,
                                    with_masks=False))
    if self.include_metadata:
      out['record_index'] = np.int64(record)
      out['epoch'] = np.int64(epoch)
    return out


def _read_options(config) -> grain.ReadOptions:
  prefetch = max(0, int(config.input.prefetch))
  # Each grain element is a whole batch; `prefetch` threads compute that many batches ahead.
  return grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)


def make_train_dataset(config, data_dir: str, process_index: int | None = None,
                       process_count: int | None = None, *, include_metadata: bool = False
                       ) -> grain.IterDataset:
  """The training grain IterDataset of this process (see the module docstring)."""
  pi, pc = _process(process_index, process_count)
  local_batch = _local_batch(int(config.input.global_batch_size), pc,
                             'input.global_batch_size')
  source, s = data_source.open_split(data_dir, config.dataset.train_split,
                                     cache_mb=config.input.cache_mb)
  if int(s['ignore_value']) != int(config.dataset.ignore_value):
    raise ValueError(f'{data_dir}: split {config.dataset.train_split!r} uses ignore value '
                     f'{s["ignore_value"]}, config.dataset.ignore_value is '
                     f'{config.dataset.ignore_value}')
  n = len(source)
  if n == 0:
    raise ValueError(f'{data_dir}: split {config.dataset.train_split!r} has no records')
  seed = int(config.input.shuffle_seed)
  order = grain.MapDataset.range(n).shuffle(seed=seed)
  local_len = -(-n // pc)
  ds = grain.MapDataset.range(local_len).repeat()
  ds = ds.map_with_index(_LocalRecord(order, n, local_len, pi, pc))
  ds = ds.map(_TrainTransform(source, config, seed, include_metadata))
  ds = ds.batch(local_batch, drop_remainder=True)
  it_ds = ds.to_iter_dataset(_read_options(config))
  workers = int(config.input.num_workers)
  if workers > 0:
    # grain's workers read absl flags; outside an absl.app main (tests, notebooks) nothing
    # parsed them, so take their defaults.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, int(config.input.prefetch))))
  return it_ds


def make_train_iterator(config, data_dir: str, process_index: int | None = None,
                        process_count: int | None = None, *, include_metadata: bool = False
                        ) -> grain.DatasetIterator:
  """Infinite iterator of local training batches (module docstring), checkpointable with
  get_state()/set_state() or grain.checkpoint.CheckpointSave/CheckpointRestore."""
  return iter(make_train_dataset(config, data_dir, process_index, process_count,
                                 include_metadata=include_metadata))


# ----------------------------------------------------------------------------- evaluation


def _round_up(x: int, d: int) -> int:
  return -(-x // d) * d if d > 0 else x


def split_image_shapes(data_dir: str, split: str, s: dict | None = None
                       ) -> list[tuple[int, int]]:
  """The distinct original (height, width) of the images of `split`."""
  if s is None:
    s = tfrecord.split_info(tfrecord.read_dataset_info(data_dir), split, data_dir)
  if s.get('image_shapes'):
    return [tuple(int(v) for v in hw) for hw in s['image_shapes']]
  # Converters that do not record the sizes: read every record's header fields once.
  logging.info('%s: split %r has no image_shapes in dataset_info.json; scanning records',
               data_dir, split)
  src = data_source.TFRecordDataSource([os.path.join(data_dir, sh['file'])
                                        for sh in s['shards']])
  shapes = set()
  for i in range(len(src)):
    f = tfrecord.parse_example(src[i], src.describe(i))
    shapes.add((int(f['image/height']), int(f['image/width'])))
  return sorted(shapes)


def eval_shapes(config, data_dir: str, split: str) -> dict[str, tuple[int, int]]:
  """Static eval shapes of `split`: {'image': (Hp, Wp), 'label': (Hl, Wl)}.

  Hp, Wp: the largest test-resized height and width over the split's distinct image sizes
  (dataset_info 'image_shapes', else a scan of the records), each rounded up to
  input.size_divisibility. ShapesWorld (all 64x64, min_size_test 64): (64, 64).
  Hl, Wl: the largest original height and width (labels stay at original resolution).
  """
  s = tfrecord.split_info(tfrecord.read_dataset_info(data_dir), split, data_dir)
  shapes = split_image_shapes(data_dir, split, s)
  return {'image': padded_resized_shape(shapes, int(config.input.min_size_test),
                                        int(config.input.max_size_test),
                                        int(config.input.size_divisibility)),
          'label': (max(h for h, _ in shapes), max(w for _, w in shapes))}


def padded_resized_shape(shapes, short: int, max_size: int, div: int) -> tuple[int, int]:
  """The largest ResizeShortestEdge(short, max_size) height and width over `shapes`
  (original (h, w) pairs), each rounded up to `div`: one static shape for all of them."""
  resized = [augment.resize_shortest_edge_shape(h, w, short, max_size) for h, w in shapes]
  return (_round_up(max(r[0] for r in resized), div),
          _round_up(max(r[1] for r in resized), div))


class _EvalTransform:
  """Global record index (or -1 for padding) -> one eval example."""

  def __init__(self, source, config, shapes):
    self.source = source
    self.min_size_test = int(config.input.min_size_test)
    self.max_size_test = int(config.input.max_size_test)
    self.image_hw = tuple(shapes['image'])
    self.label_hw = tuple(shapes['label'])
    self.ignore = int(source.ignore_value)

  def __call__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if index < 0:
      return {'image': np.zeros(self.image_hw + (3,), np.float32),
              'image_hw': np.zeros(2, np.int32),
              'label': np.full(self.label_hw, self.ignore, np.int32),
              'label_hw': np.zeros(2, np.int32),
              'example_valid': np.bool_(False), 'filename': ''}
    ex = self.source[index]
    image = augment.test_resize(ex['image'], self.min_size_test, self.max_size_test)
    label = ex['label']
    if image.shape[0] > self.image_hw[0] or image.shape[1] > self.image_hw[1] or \
        label.shape[0] > self.label_hw[0] or label.shape[1] > self.label_hw[1]:
      raise ValueError(f'{self.source.records.describe(index)}: image {image.shape[:2]} / '
                       f'label {label.shape} exceed the static eval shapes {self.image_hw} / '
                       f'{self.label_hw}; dataset_info.json image_shapes is incomplete')
    return {'image': augment.pad_to(image, self.image_hw, 0).astype(np.float32),
            'image_hw': np.asarray(image.shape[:2], np.int32),
            'label': augment.pad_to(label.astype(np.int32), self.label_hw, self.ignore),
            'label_hw': np.asarray(label.shape, np.int32),
            'example_valid': np.bool_(True), 'filename': ex['filename']}


class EvalBatches:
  """Re-iterable sequence of this process's eval batches; len() = number of local batches.

  Batch (b = eval_batch_size // process_count):
    'image'         float32 [b,Hp,Wp,3] RGB 0-255 after test resize, padding 0
    'image_hw'      int32   [b,2]       valid (resized) height, width; 0 for padding examples
    'label'         int32   [b,Hl,Wl]   original-resolution label, padding = ignore value
    'label_hw'      int32   [b,2]       original height, width; 0 for padding examples
    'example_valid' bool    [b]         False for the examples that pad the last batches
    'filename'      np.ndarray of str [b] (host only; '' for padding)
  """

  def __init__(self, dataset: grain.IterDataset, num_batches: int, shapes: dict,
               local_indices: np.ndarray):
    self._ds = dataset
    self.num_batches = num_batches
    self.shapes = shapes
    self.local_indices = local_indices  # [num_batches * b], -1 = padding

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict[str, Any]]:
    it = iter(self._ds)
    for _ in range(self.num_batches):
      yield next(it)


def make_eval_batches(config, data_dir: str, split: str, process_index: int | None = None,
                      process_count: int | None = None) -> EvalBatches:
  """Deterministic eval batches of `split` for this process (see EvalBatches).

  Records p, p+P, ... go to process p; every process yields ceil(ceil(N/P) / b) batches,
  the missing examples being masked padding. config.eval.max_images > 0 evaluates only the
  first max_images records of the split.
  """
  pi, pc = _process(process_index, process_count)
  local_batch = _local_batch(int(config.input.eval_batch_size), pc, 'input.eval_batch_size')
  source, s = data_source.open_split(data_dir, split)
  n = len(source)
  max_images = int(config.eval.get('max_images', 0)) if 'eval' in config else 0
  if max_images > 0:
    n = min(n, max_images)
  shapes = eval_shapes(config, data_dir, split)
  per_process = -(-n // pc)
  num_batches = max(1, math.ceil(per_process / local_batch))
  local = np.full(num_batches * local_batch, -1, np.int64)
  mine = np.arange(pi, n, pc, dtype=np.int64)
  local[:mine.size] = mine
  ds = grain.MapDataset.source(local.tolist()).map(_EvalTransform(source, config, shapes))
  ds = ds.batch(local_batch, drop_remainder=False)
  return EvalBatches(ds.to_iter_dataset(_read_options(config)), num_batches, shapes, local)


def target_slots(max_targets: int, buckets, max_masks: int) -> int:
  """How many target slots a batch needs: the smallest of `buckets` (and max_masks) that
  holds `max_targets`, its largest image's number of targets; at most max_masks.

  The train step is compiled once per slot count, so a few buckets bound the compiled
  shapes while the mask losses, which run over every slot, cost what the targets need
  rather than max_masks (the padded slots add nothing to any loss: they are masked out).
  """
  sizes = sorted({int(b) for b in buckets if 0 < int(b) < max_masks} | {int(max_masks)})
  return next(b for b in sizes if b >= max_targets) if max_targets <= max_masks else max_masks


def trim_targets(batch: dict, slots: int) -> dict:
  """`batch` with its target arrays (target_classes, target_valid, target_masks: [B, M, ...])
  cut to the first `slots` slots; the valid targets come first (augment.make_targets)."""
  if np.any(batch['target_valid'][:, slots:]):
    raise ValueError(f'trim_targets: a batch has valid targets beyond slot {slots}')
  return {k: (v[:, :slots] if k in ('target_classes', 'target_valid', 'target_masks') else v)
          for k, v in batch.items()}
