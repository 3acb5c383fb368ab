"""Shared machinery of the dataset converters (coco_stuff.py, voc.py, ade20k_full.py).

A converter lists its raw files, pairs images with labels, and describes every output split
(`SplitPlan`: its (image, label) files, class names, seen flags and the lookup table from raw
label values to the split's label ids). `convert()` then does the rest:

  sharding      each split's files, sorted by path, go into contiguous shards
                `<split>.tfrecord-XXXXX-of-YYYYY` (--num_shards per split, capped at the
                split's size; default one shard per DEFAULT_EXAMPLES_PER_SHARD files).
  parallelism   one task per shard, run by `--workers` spawned processes (0 or 1: in this
                process). Spawn rather than fork: the caller may hold threads (JAX, grain).
  resume        a finished shard leaves `.progress/<shard>.done` (JSON: record count, file
                size, and a fingerprint of the shard's source files and of the conversion
                settings), in a subdirectory so that `<split>.tfrecord-*` matches only
                shards (`.done` files beside the shards, from older versions, are moved
                there). A shard whose .done matches, whose file has that size and whose
                record headers
                (CRC-checked) count as many records is not rewritten. Shards are written to a
                temporary file and renamed (tfrecord.TFRecordWriter), so a crash never
                leaves a half shard under the final name. The fingerprint covers file names,
                not contents: after editing raw files in place, delete `.progress/`.
  bad files     a missing partner (image without label or the reverse), an unreadable file,
                an image whose size differs from its label's, or a label value outside the
                dataset's raw range raises BadFileError naming the file. With skip_bad the
                file is left out instead and listed under `skipped` in dataset_info.json
                (with the reason and the splits it was dropped from).
  dataset_info  ONE dataset_info.json for all splits (tfrecord.write_dataset_info layout),
                with per split: class_names, seen, ignore_value, num_examples, shards
                (examples per shard), image_shapes (distinct stored [h, w]),
                num_source_files and source_files_sha256 (sha256 of the sorted
                "image<TAB>label" relative paths, one per line).

Readers (`read_example` in each converter module) return an `Example` with the stored image
bytes and the raw label map; the raw -> split mapping is done here.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Sequence

from absl import flags
import numpy as np

from zegformer_jax.data import datasets_meta
from zegformer_jax.data import tfrecord

CONVERTER_VERSION = 1
DEFAULT_EXAMPLES_PER_SHARD = 1000
DONE_SUFFIX = '.done'
PROGRESS_DIR = '.progress'   # the .done markers, out of the shards' `<split>.tfrecord-*`


def done_marker(out_dir: str, shard_file: str) -> str:
  """Path of the progress marker of shard `shard_file` of `out_dir`."""
  return os.path.join(out_dir, PROGRESS_DIR, shard_file + DONE_SUFFIX)


class BadFileError(ValueError):
  """A raw file that cannot be converted; str() is '<path>: <reason>'."""

  def __init__(self, path: str, reason: str):
    super().__init__(path, reason)  # args match __init__, so the error pickles across workers
    self.path = path
    self.reason = reason

  def __str__(self) -> str:
    return f'{self.path}: {self.reason}'


@dataclasses.dataclass
class Example:
  """What a reader returns: the bytes to store and the raw label ids at the stored size."""
  image: bytes
  image_format: str          # 'jpeg' | 'png'
  raw_label: np.ndarray      # int [H,W], values in the dataset's raw label space
  height: int
  width: int


@dataclasses.dataclass
class SplitPlan:
  """One output split: its files and its label mapping."""
  name: str
  items: list[tuple[str, str]]  # (image, label) paths relative to input_dir
  class_names: list[str]
  seen: list[bool]
  lut: np.ndarray               # int64 [R]: raw value -> label id, -1 -> ignore value


@dataclasses.dataclass
class DatasetSpec:
  """What convert() needs to know about a dataset besides its splits."""
  name: str                     # datasets_meta name, e.g. 'coco_stuff'
  reader_module: str            # module with read_example(input_dir, image_rel, label_rel, **opt)
  ignore_value: int
  label_dtype: str              # 'uint8' | 'uint16'
  raw_valid: np.ndarray         # bool [R]: raw label values that may occur
  raw_range: str                # the valid raw values in words, for error messages
  reader_options: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- raw files


def rel(path: str, root: str) -> str:
  """`path` relative to `root`, with forward slashes (stable across machines)."""
  return os.path.relpath(path, root).replace(os.sep, '/')


def list_files(root: str, pattern: str, recursive: bool = False) -> list[str]:
  """Sorted paths relative to `root` of files under it whose name matches regex `pattern`."""
  if not os.path.isdir(root):
    return []
  rx = re.compile(pattern)
  out = []
  if recursive:
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames.sort()
      out.extend(os.path.join(dirpath, f) for f in filenames if rx.fullmatch(f))
  else:
    out = [os.path.join(root, f) for f in os.listdir(root)
           if rx.fullmatch(f) and os.path.isfile(os.path.join(root, f))]
  return sorted(out)


def pair_by_key(images: dict[str, str], labels: dict[str, str]
                ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
  """Pairs image and label paths that share a key.

  Returns (pairs sorted by image path, problems [(path, reason)] for the unpaired files).
  """
  pairs = sorted((images[k], labels[k]) for k in images.keys() & labels.keys())
  problems = [(images[k], 'image has no label file') for k in images.keys() - labels.keys()]
  problems += [(labels[k], 'label has no image file') for k in labels.keys() - images.keys()]
  return pairs, sorted(problems)


def _open_pil(path: str):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise BadFileError(path, f'cannot read the file ({e.strerror or e})') from e
  try:
    img = Image.open(io.BytesIO(data))
    img.load()  # decode fully: a truncated file fails here, not during training
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
    raise BadFileError(path, f'cannot decode the image ({e})') from e
  return data, img


def read_image(path: str) -> tuple[bytes, str, Any]:
  """(original bytes, 'jpeg' | 'png', decoded PIL image) of an image file."""
  data, img = _open_pil(path)
  fmt = {'JPEG': 'jpeg', 'PNG': 'png'}.get(img.format)
  if fmt is None:
    raise BadFileError(path, f'image format {img.format!r} is neither JPEG nor PNG')
  return data, fmt, img


def read_label(path: str, modes: Sequence[str] = ('L', 'P')) -> np.ndarray:
  """The pixel array of a label image whose PIL mode is one of `modes`."""
  _, img = _open_pil(path)
  if img.mode not in modes:
    raise BadFileError(path, f'label image mode {img.mode!r} is not one of {list(modes)}')
  return np.asarray(img)


def check_same_size(image_path: str, image_hw, label_path: str, label_hw) -> None:
  if tuple(image_hw) != tuple(label_hw):
    raise BadFileError(image_path, f'image is {tuple(image_hw)} (h, w) but its label '
                                   f'{label_path} is {tuple(label_hw)}')


def read_pair_8bit(input_dir: str, image_rel: str, label_rel: str) -> Example:
  """An image stored as its original bytes plus an 8-bit single-channel label PNG."""
  image_path = os.path.join(input_dir, image_rel)
  label_path = os.path.join(input_dir, label_rel)
  data, fmt, img = read_image(image_path)
  label = read_label(label_path)
  h, w = img.height, img.width
  check_same_size(image_path, (h, w), label_path, label.shape)
  return Example(image=data, image_format=fmt, raw_label=label, height=h, width=w)


# ----------------------------------------------------------------------------- label mapping


def class_lut(dataset: str, split: str, size: int) -> tuple[list[str], list[bool], np.ndarray]:
  """(class names, seen flags, raw -> label LUT of `size` entries) of a split (datasets_meta)."""
  names, seen = datasets_meta.split_names(dataset, split)
  return names, [bool(s) for s in seen], datasets_meta.split_label_lut(dataset, split, size)


def map_label(raw: np.ndarray, lut: np.ndarray, raw_valid: np.ndarray, ignore_value: int,
              dtype: str, label_path: str, raw_range: str) -> np.ndarray:
  """Raw label ids -> the split's label ids (unmapped -> ignore_value), range-checked."""
  raw = np.asarray(raw)
  if raw.size:
    lo, hi = int(raw.min()), int(raw.max())
    bad = lo < 0 or hi >= raw_valid.size or not raw_valid[raw].all()
    if bad:
      values = np.unique(raw)
      ok = (values >= 0) & (values < raw_valid.size)
      ok[ok] = raw_valid[values[ok]]
      raise BadFileError(label_path, f'label values {values[~ok][:8].tolist()} are outside '
                                     f'the dataset\'s range ({raw_range})')
  out = lut[raw]
  out[out < 0] = ignore_value
  return out.astype(dtype)


# ----------------------------------------------------------------------------- shard tasks


def _sha256_lines(lines: Iterable[str]) -> str:
  h = hashlib.sha256()
  for line in lines:
    h.update(line.encode('utf-8'))
    h.update(b'\n')
  return h.hexdigest()


def source_checksum(items: Sequence[tuple[str, str]]) -> str:
  """sha256 of the sorted 'image<TAB>label' relative paths, one per line."""
  return _sha256_lines(sorted(f'{i}\t{l}' for i, l in items))


def _fingerprint(spec: DatasetSpec, plan: SplitPlan, items: Sequence[tuple[str, str]]) -> str:
  """Identifies what a shard holds: its files, the label mapping and the reader settings."""
  settings = json.dumps({
      'converter_version': CONVERTER_VERSION, 'dataset': spec.name, 'split': plan.name,
      'reader_options': spec.reader_options, 'ignore_value': spec.ignore_value,
      'label_dtype': spec.label_dtype,
      'lut': hashlib.sha256(np.ascontiguousarray(plan.lut, np.int64).tobytes()).hexdigest(),
      'raw_valid': hashlib.sha256(np.packbits(spec.raw_valid).tobytes()).hexdigest(),
  }, sort_keys=True)
  return _sha256_lines([settings] + [f'{i}\t{l}' for i, l in items])


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def _write_json_atomic(path: str, obj) -> None:
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)


def finished_shard(out_dir: str, shard_file: str, fingerprint: str) -> dict | None:
  """The .done record of a shard that need not be rewritten, else None (module docstring)."""
  path = os.path.join(out_dir, shard_file)
  done = _read_json(done_marker(out_dir, shard_file))
  if not isinstance(done, dict) or done.get('fingerprint') != fingerprint:
    return None
  if not os.path.isfile(path) or os.path.getsize(path) != done.get('bytes'):
    return None
  try:
    count = len(tfrecord.index_records(path))
  except (tfrecord.TFRecordError, OSError):
    return None
  return done if count == done.get('num_examples') else None


def convert_shard(task: dict) -> dict:
  """Writes one shard (run in a worker process); returns its .done record."""
  start = time.time()
  out_dir, input_dir = task['output_dir'], task['input_dir']
  path = os.path.join(out_dir, task['file'])
  marker = done_marker(out_dir, task['file'])
  if os.path.exists(marker):
    os.remove(marker)  # the shard is about to change
  read_example = importlib.import_module(task['reader_module']).read_example
  skipped, shapes = [], set()
  with tfrecord.TFRecordWriter(path) as writer:
    for image_rel, label_rel in task['items']:
      try:
        ex = read_example(input_dir, image_rel, label_rel, **task['reader_options'])
        label = map_label(ex.raw_label, task['lut'], task['raw_valid'], task['ignore_value'],
                          task['label_dtype'], os.path.join(input_dir, label_rel),
                          task['raw_range'])
      except BadFileError as e:
        if not task['skip_bad']:
          raise
        skipped.append({'file': rel(e.path, input_dir), 'reason': e.reason})
        continue
      writer.write(tfrecord.encode_example(
          image=ex.image, image_format=ex.image_format,
          filename=os.path.basename(image_rel), height=ex.height, width=ex.width,
          label=tfrecord.encode_png(label), label_format='png'))
      shapes.add((int(ex.height), int(ex.width)))
    num = writer.num_records
  done = {'file': task['file'], 'num_examples': num, 'bytes': os.path.getsize(path),
          'fingerprint': task['fingerprint'], 'skipped': skipped,
          'image_shapes': sorted([list(s) for s in shapes]),
          'seconds': round(time.time() - start, 2)}
  os.makedirs(os.path.dirname(marker), exist_ok=True)
  _write_json_atomic(marker, done)
  return done


def parallel_map(fn: Callable[[Any], Any], tasks: Sequence[Any], workers: int):
  """Yields fn(task) for every task, in completion order, using `workers` processes."""
  if workers <= 1 or len(tasks) <= 1:
    for t in tasks:
      yield fn(t)
    return
  ctx = multiprocessing.get_context('spawn')
  with ctx.Pool(min(workers, len(tasks))) as pool:  # exit terminates the workers, also on error
    yield from pool.imap_unordered(fn, tasks, chunksize=1)


# ----------------------------------------------------------------------------- convert


def _num_shards(n: int, requested: int | None) -> int:
  if requested is not None and requested < 1:
    raise ValueError(f'num_shards must be >= 1, got {requested}')
  want = requested if requested else -(-n // DEFAULT_EXAMPLES_PER_SHARD)
  return max(1, min(want, n))


_SHARD_RE = re.compile(
    r'(?P<shard>(?P<split>.+)\.tfrecord-\d{5}-of-\d{5})(?P<done>\.done)?(?P<tmp>\.tmp-\d+)?')


def _remove_stale_shards(out_dir: str, split: str, keep: set[str]) -> None:
  """Removes files of `split` left by an earlier run: shards of another shard count, and
  temporary files of a run that was killed while writing (shards and their markers).
  Markers beside the shards (older versions) move into PROGRESS_DIR."""
  progress = os.path.join(out_dir, PROGRESS_DIR)
  for f in sorted(os.listdir(out_dir)):
    m = _SHARD_RE.fullmatch(f)
    if not (m and m.group('split') == split):
      continue
    if m.group('tmp') or m.group('shard') not in keep:
      logging.info('removing %s (left by an earlier run)', f)
      os.remove(os.path.join(out_dir, f))
    elif m.group('done'):  # an older version's marker: resume from it, out of the glob
      os.makedirs(progress, exist_ok=True)
      os.replace(os.path.join(out_dir, f), os.path.join(progress, f))
  if os.path.isdir(progress):
    for f in sorted(os.listdir(progress)):
      m = _SHARD_RE.fullmatch(f)
      if m and m.group('split') == split and (m.group('tmp') or m.group('shard') not in keep):
        os.remove(os.path.join(progress, f))


def convert(spec: DatasetSpec, plans: Sequence[SplitPlan], *, input_dir: str, output_dir: str,
            num_shards: int | None = None, workers: int = 1, skip_bad: bool = False,
            problems: Sequence[tuple[str, str, Sequence[str]]] = (),
            extra_info: dict | None = None) -> dict:
  """Converts all splits into output_dir and writes dataset_info.json; returns the info.

  Args:
    spec: the dataset (reader, ignore value, raw range).
    plans: the output splits.
    problems: (absolute path, reason, splits) of files found bad while listing (a missing
      partner file); they raise BadFileError unless skip_bad.
    extra_info: extra top-level keys for dataset_info.json.
  """
  input_dir, output_dir = os.path.abspath(input_dir), os.path.abspath(output_dir)
  if problems and not skip_bad:
    path, reason, _ = problems[0]
    more = f' (and {len(problems) - 1} more files)' if len(problems) > 1 else ''
    raise BadFileError(path, f'{reason}{more}; pass --skip_bad to leave such files out')
  for p in plans:
    if not p.items:
      raise ValueError(f'{spec.name}: split {p.name!r} has no files under {input_dir}; '
                       'check --input_dir and the raw layout (see the converter docstring)')
  os.makedirs(output_dir, exist_ok=True)
  info_path = os.path.join(output_dir, tfrecord.DATASET_INFO_FILE)
  if os.path.exists(info_path):  # invalidate first: a crash must not leave a stale description
    os.remove(info_path)

  tasks, done, order = [], {}, {}
  for p in plans:
    n_sh = _num_shards(len(p.items), num_shards)
    files = tfrecord.shard_filenames(p.name, n_sh)
    _remove_stale_shards(output_dir, p.name, set(files))
    order[p.name] = files
    for file, (lo, hi) in zip(files, tfrecord.shard_bounds(len(p.items), n_sh)):
      items = p.items[lo:hi]
      fp = _fingerprint(spec, p, items)
      rec = finished_shard(output_dir, file, fp)
      if rec is not None:
        if rec['skipped'] and not skip_bad:
          s = rec['skipped'][0]
          raise BadFileError(os.path.join(input_dir, s['file']),
                             f'{s["reason"]}; pass --skip_bad to leave such files out')
        done[file] = rec
        continue
      tasks.append({
          'file': file, 'items': items, 'fingerprint': fp, 'input_dir': input_dir,
          'output_dir': output_dir, 'reader_module': spec.reader_module,
          'reader_options': spec.reader_options, 'lut': p.lut, 'raw_valid': spec.raw_valid,
          'raw_range': spec.raw_range, 'ignore_value': spec.ignore_value,
          'label_dtype': spec.label_dtype, 'skip_bad': skip_bad})
  total = len(tasks) + len(done)
  logging.info('%s: %d shards, %d finished earlier, %d to write with %d workers', spec.name,
               total, len(done), len(tasks), workers)
  start = time.time()
  for k, rec in enumerate(parallel_map(convert_shard, tasks, workers), 1):
    done[rec['file']] = rec
    logging.info('[%d/%d] %s: %d examples%s (%.1f s; %.0f s elapsed)', k, len(tasks),
                 rec['file'], rec['num_examples'],
                 f', {len(rec["skipped"])} skipped' if rec['skipped'] else '',
                 rec['seconds'], time.time() - start)

  splits, skipped = {}, {}
  for p in plans:
    recs = [done[f] for f in order[p.name]]
    shapes = sorted({tuple(s) for r in recs for s in r['image_shapes']})
    splits[p.name] = {
        'class_names': list(p.class_names), 'seen': [bool(s) for s in p.seen],
        'ignore_value': spec.ignore_value,
        'num_examples': sum(r['num_examples'] for r in recs),
        'shards': [{'file': r['file'], 'num_examples': r['num_examples']} for r in recs],
        'image_shapes': [list(s) for s in shapes],
        'num_source_files': len(p.items),
        'source_files_sha256': source_checksum(p.items),
    }
    for r in recs:
      for s in r['skipped']:
        skipped.setdefault((s['file'], s['reason']), []).append(p.name)
  for path, reason, in_splits in problems:
    skipped.setdefault((rel(path, input_dir), reason), []).extend(in_splits)
  info = {
      'dataset': spec.name,
      'ignore_value': spec.ignore_value,
      'converter': {'version': CONVERTER_VERSION, 'input_dir': input_dir,
                    'num_shards': num_shards, 'skip_bad': bool(skip_bad),
                    'reader_options': spec.reader_options},
      'skipped': [{'file': f, 'reason': r, 'splits': sorted(set(s))}
                  for (f, r), s in sorted(skipped.items())],
      'splits': splits,
  }
  info.update(extra_info or {})
  tfrecord.write_dataset_info(output_dir, info)
  return tfrecord.read_dataset_info(output_dir)


# ----------------------------------------------------------------------------- command line


def flag_module_name(name: str) -> str:
  """absl's name of module `name` (`sys.argv[0]` for __main__), so that the shared flags
  are listed with the converter's own under `--helpshort`."""
  return sys.argv[0] if name == '__main__' else name


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, module: str = __name__) -> None:
  """Defines the flags every converter shares in `flag_values`.

  Called by a converter's define_flags(): by its `python -m` entry point (absl's FLAGS) or,
  when main(argv) is called from Python, into a fresh FlagValues (parse_flags). The flags
  are not defined at import time: bench_input imports coco_stuff and has a --workers of its
  own, and tests import all converters into one process.
  """
  kw = dict(flag_values=flag_values, module_name=flag_module_name(module))
  flags.DEFINE_string('input_dir', None,
                      'Root of the raw dataset (its layout: the converter\'s docstring).',
                      required=True, **kw)
  flags.DEFINE_string('output_dir', None,
                      'Where <split>.tfrecord-* and dataset_info.json are written.',
                      required=True, **kw)
  flags.DEFINE_integer('num_shards', None,
                       'Shards per split, capped at the split size (default: one per '
                       f'{DEFAULT_EXAMPLES_PER_SHARD} files).', **kw)
  flags.DEFINE_integer('workers', min(8, os.cpu_count() or 1),
                       'Worker processes, one shard per task (0 or 1: none).', **kw)
  flags.DEFINE_bool('skip_bad', False,
                    'Skip missing/unreadable/mismatched files and list them in '
                    'dataset_info.json under "skipped" instead of stopping.', **kw)


def parse_flags(argv: Sequence[str],
                define: Callable[[flags.FlagValues], None]) -> flags.FlagValues:
  """The parsed flags of a converter's main(argv), for both ways it is called.

  `python -m data_prep.<name>` defines the flags in absl's FLAGS and cli.run(main) parses
  them; main then gets argv = [program, positional args...] and the flags are FLAGS. Called
  from Python, argv is the flags themselves (main(['--input_dir', RAW, '--output_dir', OUT]));
  they are parsed into a fresh FlagValues, so absl's global FLAGS is neither needed nor
  changed. Unknown or missing flags raise absl's flags.Error.
  """
  if flags.FLAGS.is_parsed() and 'input_dir' in flags.FLAGS:  # the entry point's FLAGS
    if len(argv) > 1:
      raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}')
    return flags.FLAGS
  fv = flags.FlagValues()
  define(fv)
  rest = fv(['data_prep', *argv])
  if len(rest) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(rest[1:])}')
  return fv


def run(convert_fn: Callable[..., dict], a: flags.FlagValues, **options) -> dict:
  """convert_fn(input_dir, output_dir, num_shards=, workers=, skip_bad=, **options) with the
  parsed flags `a`; prints the summary line and returns the dataset_info.

  A bad file stops it with a BadFileError that says how to skip such files.
  """
  start = time.time()
  try:
    info = convert_fn(a.input_dir, a.output_dir, num_shards=a.num_shards, workers=a.workers,
                      skip_bad=a.skip_bad, **options)
  except BadFileError as e:
    if '--skip_bad' in e.reason:
      raise
    raise BadFileError(e.path, f'{e.reason} (pass --skip_bad to leave such files out)') from e
  print(summary(info, a.output_dir, time.time() - start))
  return info


def summary(info: dict, output_dir: str, seconds: float) -> str:
  parts = ', '.join(f'{s} {v["num_examples"]}' for s, v in info['splits'].items())
  skipped = f'; {len(info["skipped"])} files skipped' if info.get('skipped') else ''
  return f'{info["dataset"]} -> {output_dir}: {parts}{skipped} ({seconds:.1f} s)'
