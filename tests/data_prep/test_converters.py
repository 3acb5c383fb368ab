"""Dataset converters (data_prep/coco_stuff.py, voc.py, ade20k_full.py) and their assets.

Tiny fake raw trees in each layout are converted and read back through the CRC-checking
readers; labels are compared pixel by pixel with hand-written expectations. The tests that
run a converter's CLI in a subprocess are marked `slow`.
"""
import glob
import hashlib
import io
import json
import os
import subprocess
import sys

from absl import flags
import numpy as np
import pytest
from PIL import Image

from data_prep import ade20k_full
from data_prep import coco_stuff
from data_prep import common
from data_prep import voc
from zegformer_jax.data import data_source
from zegformer_jax.data import datasets_meta
from zegformer_jax.data import input_pipeline
from zegformer_jax.data import tfrecord

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))  # the repository root
REF = os.path.join(ROOT, '..', 'shared', 'reference', 'data')
needs_ref = pytest.mark.skipif(
    not os.path.isdir(REF), reason=f'reference data directory {os.path.normpath(REF)} is absent')
SPLITS = ('train', 'val_seen', 'val_unseen', 'val_all')
H, W = 6, 8
I = 255  # ignore value of COCO and VOC
J = 65535  # ignore value of ADE


def _ref_json(*parts):
  with open(os.path.join(REF, *parts)) as f:
    return json.load(f)


# ----------------------------------------------------------------------------- assets


def test_split_counts_and_masks():
  counts = {'coco_stuff': (156, 15), 'voc': (15, 5), 'ade20k_full': (572, 275)}
  for d, (s, u) in counts.items():
    names, seen = datasets_meta.split_names(d, 'val_all')
    assert len(names) == s + u and seen.sum() == s and len(set(names)) == s + u
    for split, want in (('train', s), ('val_seen', s), ('val_unseen', u)):
      n, m = datasets_meta.split_names(d, split)
      assert len(n) == want and m.all() == (split != 'val_unseen') and m.any() == m.all()
    unseen, _ = datasets_meta.split_names(d, 'val_unseen')
    assert [n for n, sm in zip(names, seen) if not sm] == unseen
  with pytest.raises(ValueError, match='unknown dataset'):
    datasets_meta.classes('cityscapes')
  with pytest.raises(ValueError, match='unknown split'):
    datasets_meta.split_names('voc', 'test')


@needs_ref
def test_coco_asset_matches_reference():
  split_dir = ('datasets', 'coco', 'coco_stuff', 'split')
  cls = datasets_meta.classes('coco_stuff')
  names = [c['name'] for c in cls]
  assert names == _ref_json(*split_dir, 'all_classnames.json')
  assert [c['id'] for c in cls] == _ref_json(*split_dir, 'all_indexes.json')
  assert names[:156] == _ref_json(*split_dir, 'seen_classnames.json')
  unseen = ['cow', 'giraffe', 'suitcase', 'frisbee', 'skateboard', 'carrot', 'scissors',
            'cardboard', 'clouds', 'grass', 'playingfield', 'river', 'road', 'tree',
            'wall-concrete']
  assert names[156:] == unseen == _ref_json(*split_dir, 'unseen_classnames.json')
  assert all(c['split'] == ('seen' if i < 156 else 'unseen') for i, c in enumerate(cls))
  # stuffthingmaps value = COCO id - 1; the SPNet npy files hold those values.
  assert all(c['id'] == c['coco_id'] - 1 for c in cls)
  novel = np.load(os.path.join(REF, *split_dir, 'novel_cls.npy')).tolist()
  assert [c['id'] for c in cls[156:]] == novel
  seen_ids = set(np.load(os.path.join(REF, *split_dir, 'seen_cls.npy')).tolist())
  seen_ids |= set(np.load(os.path.join(REF, *split_dir, 'val_cls.npy')).tolist())
  assert {c['id'] for c in cls[:156]} == seen_ids & {c['id'] for c in cls}
  assert [c['id'] for c in cls[:156]] == sorted(c['id'] for c in cls[:156])  # canonical order
  derived = _ref_json('derived', 'coco_stuff_171_categories_zegformer_order.json')
  assert [(d['name'], d['stuffthingmaps_value'], d['trainId_all171']) for d in derived] == \
      [(c['name'], c['id'], c['trainId']) for c in cls]


@needs_ref
def test_voc_asset_matches_reference():
  cls = datasets_meta.classes('voc')
  assert [c['name'] for c in cls] == _ref_json('VOCZERO', 'all_classnames.json')
  assert [c['id'] for c in cls] == list(range(1, 21))
  seen = [c['name'] for c in cls if c['split'] == 'seen']
  unseen = [c['name'] for c in cls if c['split'] == 'unseen']
  assert seen == _ref_json('VOCZERO', 'seen_classnames.json')
  assert unseen == _ref_json('VOCZERO', 'unseen_classnames.json') == \
      ['potted plant', 'sheep', 'sofa', 'train', 'tvmonitor']
  split_dir = os.path.join(REF, 'datasets', 'voc12', 'split')
  assert [c['id'] for c in cls if c['split'] == 'seen'] == \
      np.load(os.path.join(split_dir, 'seen_cls.npy')).tolist() == list(range(1, 16))
  assert [c['id'] for c in cls if c['split'] == 'unseen'] == \
      np.load(os.path.join(split_dir, 'novel_cls.npy')).tolist() == list(range(16, 21))
  for which, n in (('train_list', 10582), ('test_list', 1449)):
    names = datasets_meta.voc_image_list(which)
    assert len(names) == n == len(set(names))
    assert voc.read_lists(split_dir)[which] == names


@needs_ref
def test_ade_asset_matches_reference():
  cls = datasets_meta.classes('ade20k_full')
  names = [c['name'] for c in cls]
  assert names == _ref_json('ADE20K_2021_17_01', 'ADE20K_847_pure_class.json')
  assert [c['name'] for c in cls if c['split'] == 'seen'] == \
      _ref_json('ADE20K_2021_17_01', 'ADE20K_572_pure_class.json')
  assert [c['name'] for c in cls if c['split'] == 'unseen'] == \
      _ref_json('ADE20K_2021_17_01', 'ADE20K_275_pure_class.json')
  freq = {f: sum(c['frequency'] == f for c in cls) for f in ('frequent', 'common', 'rare')}
  assert freq == {'frequent': 212, 'common': 360, 'rare': 275}
  assert all((c['split'] == 'unseen') == (c['frequency'] == 'rare') == (c['image_count'] <= 10)
             for c in cls)
  assert [c['trainId'] for c in cls] == list(range(847))
  derived = _ref_json('derived', 'ade20k_full_847_categories.json')
  assert [(d['name'], d['id'], d['image_count']) for d in derived] == \
      [(c['name'], c['id'], c['image_count']) for c in cls]
  assert len({c['id'] for c in cls}) == 847


# ----------------------------------------------------------------------------- helpers


def _jpeg(path, h=H, w=W, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  img = (rng.uniform(40, 200, 3) + 10 * np.sin(xx / 3.0 + yy / 5.0)[..., None])
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(img.astype(np.uint8)).save(path, quality=90)


def _png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array)).save(path)


def _stripes(values, h=H, w=W):
  """uint8 [h,w]: column x holds values[x % len(values)] (every value on every row)."""
  return np.asarray([values[x % len(values)] for x in range(w)], np.uint8)[None].repeat(h, 0)


def _records(out, split):
  """{filename: (features, decoded example)} of a split, read with CRC checks."""
  src, _ = data_source.open_split(out, split)
  out_map = {}
  for i in range(len(src)):
    feats = tfrecord.parse_example(src.records[i])
    out_map[src[i]['filename']] = (feats, src[i])
  return out_map


def _expect(raw, table):
  return np.vectorize(lambda v: table[int(v)])(raw)


# ----------------------------------------------------------------------------- COCO-Stuff

# raw stuffthingmaps value -> (train, val_seen, val_unseen, val_all), by hand from the assets:
# person 0 (seen 0), motorcycle 3 (seen 3), COCO id 12 (value 11, no class), cow 20 (unseen 0,
# all 156), grass 123 (unseen 9, all 165), wall-concrete 171 (unseen 14, all 170), wood 181
# (seen 155), unlabelled 255.
COCO_TABLE = {0: (0, 0, I, 0), 3: (3, 3, I, 3), 11: (I, I, I, I), 20: (I, I, 0, 156),
              123: (I, I, 9, 165), 171: (I, I, 14, 170), 181: (155, 155, I, 155),
              255: (I, I, I, I)}


def make_coco_tree(root, n_train=3, n_val=2):
  values = list(COCO_TABLE)
  for folder, n in (('train2017', n_train), ('val2017', n_val)):
    for k in range(n):
      name = f'{folder[:-4]}_{k:04d}'
      _jpeg(os.path.join(root, 'images', folder, f'{name}.jpg'), seed=k)
      _png(os.path.join(root, 'annotations', folder, f'{name}.png'),
           _stripes(np.roll(values, k)))
  return root


@pytest.fixture(scope='module')
def coco_converted(tmp_path_factory):
  raw = make_coco_tree(str(tmp_path_factory.mktemp('coco_raw')))
  out = str(tmp_path_factory.mktemp('coco_out'))
  coco_stuff.main(['--input_dir', raw, '--output_dir', out, '--num_shards', '2',
                   '--workers', '2'])
  return raw, out, tfrecord.read_dataset_info(out)


def test_coco_labels_and_info(coco_converted):
  raw, out, info = coco_converted
  assert info['dataset'] == 'coco_stuff' and info['ignore_value'] == 255
  assert info['skipped'] == []
  for col, split in enumerate(SPLITS):
    s = info['splits'][split]
    names, seen = datasets_meta.split_names('coco_stuff', split)
    assert s['class_names'] == names and s['seen'] == seen.tolist()
    assert s['ignore_value'] == 255 and s['image_shapes'] == [[H, W]]
    folder = 'train2017' if split == 'train' else 'val2017'
    assert s['num_examples'] == (3 if split == 'train' else 2)
    assert [sh['file'] for sh in s['shards']] == tfrecord.shard_filenames(split, 2)
    stems = sorted(f[:-4] for f in os.listdir(os.path.join(raw, 'images', folder)))
    listing = ''.join(f'images/{folder}/{n}.jpg\tannotations/{folder}/{n}.png\n' for n in stems)
    assert s['source_files_sha256'] == hashlib.sha256(listing.encode()).hexdigest()
    recs = _records(out, split)
    assert sorted(recs) == [f'{n}.jpg' for n in stems]
    for fname, (feats, ex) in recs.items():
      stem = fname[:-4]
      # Original JPEG bytes, not re-encoded.
      with open(os.path.join(raw, 'images', folder, fname), 'rb') as f:
        assert feats['image/encoded'] == f.read() and feats['image/format'] == b'jpeg'
      rawlab = np.asarray(Image.open(os.path.join(raw, 'annotations', folder, f'{stem}.png')))
      want = _expect(rawlab, {k: v[col] for k, v in COCO_TABLE.items()})
      np.testing.assert_array_equal(ex['label'], want, err_msg=f'{split} {fname}')
  assert info['unseen_classes'][0] == 'cow' and len(info['seen_classes']) == 156


def test_coco_dataset_classes_and_train_pipeline(coco_converted):
  _, out, _ = coco_converted
  names, seen = input_pipeline.dataset_classes(out, 'val_all')
  assert names == [c['name'] for c in datasets_meta.classes('coco_stuff')]
  assert seen.tolist() == [True] * 156 + [False] * 15
  from configs import coco_stuff_r50  # pylint: disable=g-import-not-at-top
  c = coco_stuff_r50.get_config()
  c.input.crop_size = 64
  c.input.min_size_train = (64,)
  c.input.global_batch_size = 2
  c.input.max_masks = 8
  c.input.num_workers = 0
  it = input_pipeline.make_train_iterator(c, out, 0, 1)
  batch = next(it)
  assert batch['image'].shape == (2, 64, 64, 3) and batch['label'].shape == (2, 64, 64)
  labels = set(np.unique(batch['label']).tolist())
  assert labels <= {0, 3, 155, 255} and labels & {0, 3, 155}
  assert batch['target_classes'].shape == (2, 8) and batch['target_valid'].shape == (2, 8)
  for b in range(2):  # the valid targets are exactly the classes present in the crop
    present = sorted(set(np.unique(batch['label'][b]).tolist()) - {255})
    assert batch['target_classes'][b][batch['target_valid'][b]].tolist() == present


def test_coco_resume(tmp_path):
  raw = make_coco_tree(str(tmp_path / 'raw'), n_train=4, n_val=2)
  out = str(tmp_path / 'out')
  args = dict(num_shards=2, workers=0)
  info1 = coco_stuff.convert(raw, out, **args)
  shards = sorted(f for f in os.listdir(out) if '.tfrecord-' in f)
  assert len(shards) == 8 and all(
      os.path.isfile(os.path.join(out, common.PROGRESS_DIR, f + '.done')) for f in shards)
  # The shard patterns readers use match shards only (the markers live in .progress/).
  for split in sorted(info1['splits']):
    found = sorted(glob.glob(os.path.join(out, f'{split}.tfrecord-*')))
    assert found == [os.path.join(out, f) for f in shards if f.startswith(split + '.')], found
    assert len(found) == 2 and all(tfrecord.index_records(f).size for f in found)
  mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in shards}
  info2 = coco_stuff.convert(raw, out, **args)
  assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in shards} == mtimes
  assert info2['splits'] == info1['splits']
  # A deleted shard and a truncated shard are rebuilt; the others stay untouched.
  os.remove(os.path.join(out, 'train.tfrecord-00001-of-00002'))
  with open(os.path.join(out, 'val_all.tfrecord-00000-of-00002'), 'r+b') as f:
    f.truncate(10)
  info3 = coco_stuff.convert(raw, out, **args)
  assert info3['splits'] == info1['splits']
  rebuilt = {'train.tfrecord-00001-of-00002', 'val_all.tfrecord-00000-of-00002'}
  for f in shards:
    same = os.stat(os.path.join(out, f)).st_mtime_ns == mtimes.get(f)
    assert same == (f not in rebuilt), f
  assert len(_records(out, 'val_all')) == 2 and len(_records(out, 'train')) == 4
  # Markers beside the shards (written by older versions) are moved and resumed from.
  progress = os.path.join(out, common.PROGRESS_DIR)
  for f in shards:
    os.replace(os.path.join(progress, f + '.done'), os.path.join(out, f + '.done'))
  mtimes = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in shards}
  coco_stuff.convert(raw, out, **args)
  assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in shards} == mtimes
  assert sorted(os.listdir(progress)) == sorted(f + '.done' for f in shards)
  assert not glob.glob(os.path.join(out, '*.done'))
  # Another shard count replaces the old shard files; a killed run's temp file goes too.
  open(os.path.join(out, 'train.tfrecord-00000-of-00002.tmp-12345'), 'wb').close()
  coco_stuff.convert(raw, out, num_shards=1, workers=0)
  assert not [f for f in os.listdir(out) if f.startswith('train.') and '-of-00002' in f]
  assert not [f for f in os.listdir(progress) if f.startswith('train.') and '-of-00002' in f]
  assert glob.glob(os.path.join(out, 'train.tfrecord-*')) == [
      os.path.join(out, 'train.tfrecord-00000-of-00001')]
  assert len(_records(out, 'train')) == 4


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize('kind', ['missing_label', 'missing_image', 'size', 'value',
                                  'unreadable'])
def test_bad_inputs(tmp_path, kind):
  raw = make_coco_tree(str(tmp_path / 'raw'), n_train=2, n_val=1)
  img = os.path.join(raw, 'images', 'train2017', 'bad.jpg')
  lab = os.path.join(raw, 'annotations', 'train2017', 'bad.png')
  if kind != 'missing_image':
    _jpeg(img)
  if kind == 'unreadable':
    with open(img, 'wb') as f:
      f.write(b'\xff\xd8 not a jpeg')
  if kind != 'missing_label':
    bad = {'size': np.zeros((H, W - 1), np.uint8),
           'value': _stripes([0, 200, 255])}.get(kind, np.zeros((H, W), np.uint8))
    _png(lab, bad)
  named, reason = {'missing_label': (img, 'image has no label file'),
                   'missing_image': (lab, 'label has no image file'),
                   'size': (img, 'but its label'),
                   'value': (lab, 'label values [200] are outside'),
                   'unreadable': (img, 'cannot decode the image')}[kind]
  out = str(tmp_path / 'out')
  with pytest.raises(common.BadFileError) as e:
    coco_stuff.convert(raw, out, workers=0)
  assert str(e.value).startswith(named + ': ') and reason in str(e.value)
  info = coco_stuff.convert(raw, out, workers=0, skip_bad=True)
  assert len(info['skipped']) == 1
  s = info['skipped'][0]
  assert s['file'] == os.path.relpath(named, raw) and reason in s['reason']
  assert s['splits'] == ['train'] and info['splits']['train']['num_examples'] == 2
  assert len(_records(out, 'train')) == 2
  if kind in ('size', 'value', 'unreadable'):  # found by a worker: kept across resumes
    with pytest.raises(common.BadFileError, match='--skip_bad'):
      coco_stuff.convert(raw, out, workers=0)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})


@pytest.mark.slow
def test_converter_flags(tmp_path):
  raw = make_coco_tree(str(tmp_path / 'raw'), n_train=1, n_val=1)
  out = str(tmp_path / 'out')
  # absl flags: a missing or unknown flag is a one-line error.
  for args, want in (((), 'error: flag --input_dir=None: Flag --input_dir must have a value'),
                     (('--input_dir', raw, '--max_class_id', '4000'),
                      "error: Unknown command line flag 'max_class_id'")):
    proc = _cli('data_prep.coco_stuff', '--output_dir', out, *args)
    assert proc.returncode == 1 and proc.stderr.strip().startswith(want), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
  proc = _cli('data_prep.ade20k_full', '--input_dir', raw, '--output_dir', out,
              '--max_class_id', '5')
  assert proc.returncode == 1
  assert proc.stderr.strip() == 'error: max_class_id must be in [3156, 6655], got 5'
  # From Python, main() parses its own flags without absl's global FLAGS.
  with pytest.raises(flags.Error, match='split_dir'):
    coco_stuff.main(['--input_dir', raw, '--output_dir', out, '--split_dir', raw])
  assert 'input_dir' not in flags.FLAGS
  # A bad file found by a worker: main's error says how to skip it.
  _png(os.path.join(raw, 'annotations', 'val2017', 'val_0000.png'), _stripes([0, 200]))
  with pytest.raises(common.BadFileError) as e:
    coco_stuff.main(['--input_dir', raw, '--output_dir', out, '--workers', '0'])
  assert str(e.value).endswith('label values [200] are outside the dataset\'s range '
                               '(0..181 or 255) (pass --skip_bad to leave such files out)')
  coco_stuff.main(['--input_dir', raw, '--output_dir', out, '--workers', '0', '--skip_bad'])
  assert tfrecord.read_dataset_info(out)['skipped'][0]['file'] == 'annotations/val2017/val_0000.png'


def test_bad_values_voc_and_ade(tmp_path):
  vraw, split_dir = make_voc_tree(str(tmp_path / 'voc'))
  _png(os.path.join(vraw, 'SegmentationClassAug', 'v0.png'), _stripes([1, 21]))
  with pytest.raises(common.BadFileError, match=r'v0\.png: label values \[21\] are outside'):
    voc.convert(vraw, str(tmp_path / 'vout'), split_dir=split_dir, workers=0)
  araw = make_ade_tree(str(tmp_path / 'ade'))
  seg = os.path.join(araw, 'images', 'ADE', 'training', 'a', 'ADE_train_00000001_seg.png')
  _png(seg, _ade_seg(np.full((H, W), 25 * 256, np.int64)))  # R = 250: id 6400
  with pytest.raises(common.BadFileError, match=r'_seg\.png: label values \[6400\]'):
    ade20k_full.convert(araw, str(tmp_path / 'aout'), workers=0)


# ----------------------------------------------------------------------------- VOC

# raw VOC id -> (train, val_seen, val_unseen, val_all): background 0 ignored, aeroplane 1,
# person 15 (last seen), potted plant 16 (first unseen), tvmonitor 20, ignore 255.
VOC_TABLE = {0: (I, I, I, I), 1: (0, 0, I, 0), 15: (14, 14, I, 14), 16: (I, I, 0, 15),
             20: (I, I, 4, 19), 255: (I, I, I, I)}
VOC_TRAIN, VOC_TEST, VOC_EXTRA = ['t0', 't1', 't2'], ['v0', 'v1'], ['x0']


def make_voc_tree(root):
  values = list(VOC_TABLE)
  for k, n in enumerate(VOC_TRAIN + VOC_TEST + VOC_EXTRA + ['nolabel']):
    _jpeg(os.path.join(root, 'JPEGImages', f'{n}.jpg'), seed=k)
    if n != 'nolabel':  # JPEGImages holds unannotated images too: not an error
      _png(os.path.join(root, 'SegmentationClassAug', f'{n}.png'), _stripes(np.roll(values, k)))
  split_dir = os.path.join(root, 'split')
  os.makedirs(split_dir)
  # The reference stores absolute paths of the annotation PNGs.
  for which, names, folder in (('train_list', VOC_TRAIN, 'train'), ('test_list', VOC_TEST, 'val')):
    np.save(os.path.join(split_dir, f'{which}.npy'),
            np.asarray([f'/home/u/SBD/dataset/annotations/{folder}/{n}.png' for n in names]))
  return root, split_dir


@pytest.mark.slow
def test_voc_labels_and_cli(tmp_path):
  raw, split_dir = make_voc_tree(str(tmp_path / 'raw'))
  out = str(tmp_path / 'out')
  proc = subprocess.run(
      [sys.executable, '-m', 'data_prep.voc', '--input_dir', raw, '--output_dir', out,
       '--split_dir', split_dir, '--workers', '2'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.returncode == 0, proc.stderr
  assert 'voc -> ' in proc.stdout and 'val_all 3' in proc.stdout
  info = tfrecord.read_dataset_info(out)
  want_names = {'train': VOC_TRAIN, 'val_seen': VOC_TEST,
                'val_unseen': VOC_TEST + VOC_EXTRA, 'val_all': VOC_TEST + VOC_EXTRA}
  for col, split in enumerate(SPLITS):
    names, seen = datasets_meta.split_names('voc', split)
    assert info['splits'][split]['class_names'] == names
    assert info['splits'][split]['seen'] == seen.tolist()
    recs = _records(out, split)
    assert sorted(recs) == sorted(f'{n}.jpg' for n in want_names[split])
    for fname, (_, ex) in recs.items():
      rawlab = np.asarray(Image.open(os.path.join(raw, 'SegmentationClassAug',
                                                  fname[:-4] + '.png')))
      want = _expect(rawlab, {k: v[col] for k, v in VOC_TABLE.items()})
      np.testing.assert_array_equal(ex['label'], want, err_msg=f'{split} {fname}')
  names, seen = input_pipeline.dataset_classes(out, 'val_all')
  assert names[15:] == ['potted plant', 'sheep', 'sofa', 'train', 'tvmonitor']
  assert seen.tolist() == [True] * 15 + [False] * 5
  # A listed name without its label stops the CLI with a one-line error naming the file.
  os.remove(os.path.join(raw, 'SegmentationClassAug', 't1.png'))
  proc = subprocess.run(
      [sys.executable, '-m', 'data_prep.voc', '--input_dir', raw, '--output_dir', out,
       '--split_dir', split_dir, '--workers', '0'],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': ROOT})
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
      f'error: {os.path.join(raw, "SegmentationClassAug", "t1.png")}: label file missing (the '
      'name is in the image list); pass --skip_bad to leave such files out')
  voc.main(['--input_dir', raw, '--output_dir', out, '--split_dir', split_dir,
            '--workers', '0', '--skip_bad'])
  info = tfrecord.read_dataset_info(out)
  assert info['skipped'] == [{'file': 'SegmentationClassAug/t1.png', 'splits': ['train'],
                              'reason': 'label file missing (the name is in the image list)'}]
  assert sorted(_records(out, 'train')) == ['t0.jpg', 't2.jpg']


# ----------------------------------------------------------------------------- ADE20k-Full

# class id -> (train, val_seen, val_unseen, val_all): wall 2978 (frequent, 0), bed 165
# (frequent, 7), catwalk 432 (rare: unseen 0, all 166), alga 3156 (rare: unseen 21, all 358),
# adding machine 3148 (rare: unseen 274, all 846), unlabelled 0 and id 1 (no class).
ADE_TABLE = {2978: (0, 0, J, 0), 165: (7, 7, J, 7), 432: (J, J, 0, 166),
             3156: (J, J, 21, 358), 3148: (J, J, 274, 846), 0: (J, J, J, J), 1: (J, J, J, J)}


def _ade_seg(ids, seed=0):
  """uint8 [h,w,3] _seg.png pixels encoding class ids as R = (id // 256) * 10, G = id % 256."""
  ids = np.asarray(ids, np.int64)
  b = np.random.default_rng(seed).integers(0, 256, ids.shape)  # instance channel
  return np.stack([(ids // 256) * 10, ids % 256, b], -1).astype(np.uint8)


def _ade_ids(k, h=H, w=W):
  values = np.roll(list(ADE_TABLE), k)
  return np.asarray([values[x % len(values)] for x in range(w)])[None].repeat(h, 0)


def make_ade_tree(root, val_big=False):
  base = os.path.join(root, 'images', 'ADE')
  items = [('training', 'a', 'ADE_train_00000001'), ('training', 'b', 'ADE_train_00000002'),
           ('validation', 'a', 'ADE_val_00000001')]
  for k, (folder, sub, name) in enumerate(items):
    _jpeg(os.path.join(base, folder, sub, f'{name}.jpg'), seed=k)
    _png(os.path.join(base, folder, sub, f'{name}_seg.png'), _ade_seg(_ade_ids(k), k))
    with open(os.path.join(base, folder, sub, f'{name}.json'), 'w') as f:
      f.write('{}')  # the release's per-image annotation: ignored
  if val_big:  # 520 x 600: short side > 512, resized to 512 x 591
    d = os.path.join(base, 'validation', 'c')
    os.makedirs(d)
    img = np.zeros((520, 600, 3), np.uint8)
    img[:, :300] = (200, 40, 40)
    img[:, 300:] = (30, 60, 210)
    Image.fromarray(img).save(os.path.join(d, 'ADE_val_00000002.jpg'), quality=95)
    ids = np.full((520, 600), 2978)
    ids[:, 300:] = 432
    ids[:260, 450:] = 3148
    _png(os.path.join(d, 'ADE_val_00000002_seg.png'), _ade_seg(ids))
  return root


def test_ade_labels(tmp_path):
  raw = make_ade_tree(str(tmp_path / 'raw'), val_big=True)
  out = str(tmp_path / 'out')
  ade20k_full.main(['--input_dir', raw, '--output_dir', out, '--workers', '0'])
  info = tfrecord.read_dataset_info(out)
  assert info['ignore_value'] == 65535 and info['skipped'] == []
  for col, split in enumerate(SPLITS):
    s = info['splits'][split]
    names, seen = datasets_meta.split_names('ade20k_full', split)
    assert s['class_names'] == names and s['seen'] == seen.tolist()
    recs = _records(out, split)
    if split == 'train':
      assert sorted(recs) == ['ADE_train_00000001.jpg', 'ADE_train_00000002.jpg']
      assert s['image_shapes'] == [[H, W]]
    else:
      assert sorted(recs) == ['ADE_val_00000001.jpg', 'ADE_val_00000002.jpg']
      assert s['image_shapes'] == [[H, W], [512, 591]]
    table = {k: v[col] for k, v in ADE_TABLE.items()}
    for fname, (feats, ex) in recs.items():
      label_png = Image.open(io.BytesIO(feats['label/encoded']))
      assert label_png.mode.startswith('I;16')  # 16-bit labels
      if fname == 'ADE_val_00000002.jpg':
        continue
      k = {'ADE_train_00000001.jpg': 0, 'ADE_train_00000002.jpg': 1,
           'ADE_val_00000001.jpg': 2}[fname]
      np.testing.assert_array_equal(ex['label'], _expect(_ade_ids(k), table),
                                    err_msg=f'{split} {fname}')
      sub = {0: 'training/a', 1: 'training/b', 2: 'validation/a'}[k]
      with open(os.path.join(raw, 'images', 'ADE', sub, fname), 'rb') as f:
        assert feats['image/encoded'] == f.read()  # not resized: original bytes
    if split == 'train':
      continue
    # The 520 x 600 image: short side 520 > 512 -> 512 x round(600 / 520 * 512) = 591.
    _, big = recs['ADE_val_00000002.jpg']
    assert big['image'].shape == (512, 591, 3) and big['label'].shape == (512, 591)
    # Nearest as cv2: output pixel (y, x) reads source (floor(y * 520/512), floor(x * 600/591)).
    sy = np.floor(np.arange(512) * (520 / 512)).astype(int)
    sx = np.floor(np.arange(591) * (600 / 591)).astype(int)
    src = np.where(sx[None, :] < 300, 2978, np.where((sy[:, None] < 260) & (sx[None] >= 450),
                                                     3148, 432))
    np.testing.assert_array_equal(big['label'], _expect(src, table), err_msg=split)
    left, right = big["image"][:, :280].reshape(-1, 3), big["image"][:, 310:].reshape(-1, 3)
    assert np.abs(left.astype(int) - (200, 40, 40)).max() <= 4
    assert np.abs(right.astype(int) - (30, 60, 210)).max() <= 4


def test_ade_resize_rule():
  assert ade20k_full.reference_resize_shape(512, 700) is None
  assert ade20k_full.reference_resize_shape(400, 2000) is None
  assert ade20k_full.reference_resize_shape(520, 600) == (512, 591)
  assert ade20k_full.reference_resize_shape(1000, 600) == (853, 512)
  # Python's round: 513 x 1027 -> 1027 / 513 * 512 = 1025.00...
  assert ade20k_full.reference_resize_shape(513, 1027) == (512, round(1027 / 513 * 512))
  # Bilinear with pixel centres: halving a 2-pixel period averages pairs exactly.
  row = np.tile(np.array([0, 100], np.uint8), 4)[None, :, None].repeat(2, 0)
  out = ade20k_full.resize_linear_cv2(row, (1, 4))
  np.testing.assert_array_equal(out[..., 0], [[50, 50, 50, 50]])
