"""Cross-dataset evaluation sets: data_prep/ade150.py, pcontext.py, voc.py --background class.

Tiny fake raw trees of each release are converted and read back through the CRC-checking
readers; every label is compared pixel by pixel with a numpy mapping of the raw ids written
here from the datasets' definitions (not from the converters' lookup tables). The class
assets are checked against the facts of the official releases they come from.
"""
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

from data_prep import ade150
from data_prep import common
from data_prep import pcontext
from data_prep import voc
from zegformer_jax.data import data_source
from zegformer_jax.data import datasets_meta
from zegformer_jax.data import input_pipeline
from zegformer_jax.data import tfrecord

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
H, W = 6, 8

# The 59 PASCAL Context classes as the Detail-API conversion lists their 459-class ids
# (unsorted, as written there; 0 = background is left out) ...
PC59_IDS = [2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416,
            33, 162, 420, 454, 295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354,
            424, 68, 326, 72, 458, 34, 207, 80, 355, 85, 347, 220, 349, 360, 98, 187, 104,
            105, 366, 189, 368, 113, 115]
# ... and the names of the release's 59_labels.txt, in its order (VOC classes first).
PC59_OFFICIAL = [
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'table', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
    'tvmonitor', 'bag', 'bed', 'bench', 'book', 'building', 'cabinet', 'ceiling', 'cloth',
    'computer', 'cup', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground',
    'keyboard', 'light', 'mountain', 'mouse', 'curtain', 'platform', 'sign', 'plate', 'road',
    'rock', 'shelves', 'sidewalk', 'sky', 'snow', 'bedclothes', 'track', 'tree', 'truck',
    'wall', 'water', 'window', 'wood']


# ----------------------------------------------------------------------------- helpers


def _jpeg(path, h=H, w=W, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  img = rng.uniform(40, 200, 3) + 10 * np.sin(xx / 3.0 + yy / 5.0)[..., None]
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(img.astype(np.uint8)).save(path, quality=90)


def _png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.asarray(array)).save(path)


def _mat(path, label_map=None, **other):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  data = dict(other)
  if label_map is not None:
    data['LabelMap'] = np.asarray(label_map)
  scipy.io.savemat(path, data)


def _grid(values, k, dtype, h=H, w=W):
  """[h, w]: pixel (y, x) holds values[(k + y * w + x) % len(values)] (every value occurs)."""
  idx = (k + np.arange(h * w)) % len(values)
  return np.asarray(values, np.int64)[idx].reshape(h, w).astype(dtype)


def _records(out, split):
  """{filename: (features, decoded example)} of a split, read with CRC checks."""
  src, _ = data_source.open_split(out, split)
  return {src[i]['filename']: (tfrecord.parse_example(src.records[i]), src[i])
          for i in range(len(src))}


def _original_bytes(path):
  with open(path, 'rb') as f:
    return f.read()


# ----------------------------------------------------------------------------- assets


def test_ade150_asset():
  cls = datasets_meta.classes('ade150')
  names = [c['name'] for c in cls]
  assert len(names) == 150 == len(set(names))
  assert [c['id'] for c in cls] == list(range(1, 151))
  assert [c['trainId'] for c in cls] == list(range(150))
  assert {c['split'] for c in cls} == {'all'}
  # objectInfo150.txt: Name column, surrounding spaces stripped ('bed ' in the release).
  assert names[:9] == ['wall', 'building, edifice', 'sky', 'floor, flooring', 'tree', 'ceiling',
                       'road, route', 'bed', 'windowpane, window']
  assert names[12] == 'person, individual, someone, somebody, mortal, soul'
  assert names[127] == 'bicycle, bike, wheel, cycle'
  assert names[-3:] == ['glass, drinking glass', 'clock', 'flag']
  assert all(n == n.strip() and n for n in names)
  assert datasets_meta.ignore_value('ade150') == 255


def test_pcontext_assets():
  c459 = datasets_meta.classes('pcontext459')
  n459 = [c['name'] for c in c459]
  assert len(n459) == 459 == len(set(n459))
  assert [c['id'] for c in c459] == list(range(1, 460))
  assert [c['trainId'] for c in c459] == list(range(459))
  assert n459[:3] == ['accordion', 'aeroplane', 'air conditioner'] and n459[-1] == 'wool'
  assert n459[207:209] == ['horse-drawn carriage', 'hot-air balloon']
  assert datasets_meta.ignore_value('pcontext459') == 65535
  c59 = datasets_meta.classes('pcontext59')
  assert [c['id'] for c in c59] == sorted(PC59_IDS)  # labelled in id order
  assert [c['trainId'] for c in c59] == list(range(59))
  assert [c['name'] for c in c59] == [n459[i - 1] for i in sorted(PC59_IDS)]
  # The Detail-API ids name exactly the classes of the release's 59_labels.txt.
  assert sorted(c['name'] for c in c59) == sorted(PC59_OFFICIAL)
  assert {c['split'] for c in c59 + c459} == {'all'}
  assert datasets_meta.ignore_value('pcontext59') == 255


def test_voc21_asset_and_meta_splits():
  c21 = datasets_meta.classes('voc21')
  assert [c['name'] for c in c21] == ['background'] + [c['name'] for c in
                                                       datasets_meta.classes('voc')]
  assert [c['id'] for c in c21] == [c['trainId'] for c in c21] == list(range(21))
  for d, splits in (('ade150', ('train', 'val_all')), ('pcontext59', ('val_all',)),
                    ('pcontext459', ('val_all',)), ('voc21', ('val_all',)),
                    ('voc', datasets_meta.SPLITS)):
    assert datasets_meta.dataset_splits(d) == splits
  for d in ('ade150', 'pcontext59', 'pcontext459', 'voc21'):
    assert d in datasets_meta.DATASETS
    for split in datasets_meta.dataset_splits(d):
      names, seen = datasets_meta.split_names(d, split)
      assert names == [c['name'] for c in datasets_meta.classes(d)] and not seen.any()
    with pytest.raises(ValueError, match=f"unknown split 'val_unseen' of {d}"):
      datasets_meta.split_names(d, 'val_unseen')
  lut = datasets_meta.split_label_lut('pcontext59', 'val_all', 460)
  assert lut[0] == lut[1] == -1 and lut[2] == 0 and lut[458] == 58 and (lut >= 0).sum() == 59


# ----------------------------------------------------------------------------- ADE20k-150

ADE_VALUES = [0, 1, 2, 8, 75, 149, 150]  # 0 "other objects", 1..150 classes


def make_ade150_tree(root, train=True, info=True):
  folders = {'validation': ['ADE_val_00000001', 'ADE_val_00000002']}
  if train:
    folders['training'] = ['ADE_train_00000001', 'ADE_train_00000002', 'ADE_train_00000003']
  k = 0
  for folder, names in folders.items():
    for n in names:
      _jpeg(os.path.join(root, 'images', folder, f'{n}.jpg'), seed=k)
      _png(os.path.join(root, 'annotations', folder, f'{n}.png'), _grid(ADE_VALUES, k, np.uint8))
      k += 1
  if info:  # the release's format: header, tab-separated, names with stray spaces
    lines = ['Idx\tRatio\tTrain\tVal\tName']
    for c in datasets_meta.classes('ade150'):
      name = c['name'] + (' ' if c['id'] in (8, 128) else '')
      lines.append(f'{c["id"]}{" " if c["id"] == 22 else ""}\t0.0010\t10\t1\t{name}')
    with open(os.path.join(root, 'objectInfo150.txt'), 'w') as f:
      f.write('\n'.join(lines) + '\n')
  return root, folders


def test_ade150_labels(tmp_path):
  raw, folders = make_ade150_tree(str(tmp_path / 'raw'))
  out = str(tmp_path / 'out')
  ade150.main(['--input_dir', raw, '--output_dir', out, '--workers', '0', '--num_shards', '2'])
  info = tfrecord.read_dataset_info(out)
  assert info['dataset'] == 'ade150' and info['ignore_value'] == 255 and info['skipped'] == []
  assert info['class_file_checked'] == 'objectInfo150.txt'
  assert sorted(info['splits']) == ['train', 'val_all']
  names = [c['name'] for c in datasets_meta.classes('ade150')]
  for split, folder in (('val_all', 'validation'), ('train', 'training')):
    s = info['splits'][split]
    assert s['class_names'] == names and s['seen'] == [False] * 150
    assert s['num_examples'] == len(folders[folder]) and s['image_shapes'] == [[H, W]]
    recs = _records(out, split)
    assert sorted(recs) == [f'{n}.jpg' for n in folders[folder]]
    for fname, (feats, ex) in recs.items():
      stem = fname[:-4]
      assert feats['image/encoded'] == _original_bytes(
          os.path.join(raw, 'images', folder, fname))
      rawlab = np.asarray(Image.open(os.path.join(raw, 'annotations', folder, f'{stem}.png')))
      want = np.where(rawlab == 0, 255, rawlab.astype(np.int64) - 1)
      assert set(np.unique(want).tolist()) == {0, 1, 7, 74, 148, 149, 255}
      np.testing.assert_array_equal(ex['label'], want, err_msg=f'{split} {fname}')
  got_names, seen = input_pipeline.dataset_classes(out, 'val_all')
  assert got_names == names and not seen.any()


def test_ade150_without_training_and_bad_files(tmp_path):
  raw, _ = make_ade150_tree(str(tmp_path / 'raw'), train=False, info=False)
  info = ade150.convert(raw, str(tmp_path / 'first'), workers=0)
  assert list(info['splits']) == ['val_all'] and info['class_file_checked'] is None
  # A label value above 150 (a new output directory: shards remember file names only).
  out = str(tmp_path / 'out')
  bad = os.path.join(raw, 'annotations', 'validation', 'ADE_val_00000002.png')
  _png(bad, _grid([3, 151], 0, np.uint8))
  with pytest.raises(common.BadFileError) as e:
    ade150.main(['--input_dir', raw, '--output_dir', out, '--workers', '0'])
  assert str(e.value) == (f"{bad}: label values [151] are outside the dataset's range (0..150) "
                          '(pass --skip_bad to leave such files out)')
  info = ade150.convert(raw, out, workers=0, skip_bad=True)
  assert info['skipped'] == [{'file': 'annotations/validation/ADE_val_00000002.png',
                              'reason': "label values [151] are outside the dataset's range "
                                        '(0..150)', 'splits': ['val_all']}]
  assert sorted(_records(out, 'val_all')) == ['ADE_val_00000001.jpg']
  # An image without its label.
  _jpeg(os.path.join(raw, 'images', 'validation', 'ADE_val_00000003.jpg'))
  with pytest.raises(common.BadFileError, match='ADE_val_00000003.jpg: image has no label'):
    ade150.convert(raw, out, workers=0)
  # Another release's class list.
  make_ade150_tree(str(tmp_path / 'raw2'), train=False)
  path = os.path.join(str(tmp_path / 'raw2'), 'objectInfo150.txt')
  with open(path) as f:
    text = f.read().replace('\tflag\n', '\tbanner\n')
  with open(path, 'w') as f:
    f.write(text)
  with pytest.raises(ValueError, match="class 150 is 'banner' there but 'flag'"):
    ade150.convert(str(tmp_path / 'raw2'), str(tmp_path / 'out2'), workers=0)


# ----------------------------------------------------------------------------- PASCAL Context

# Raw 459-class ids: unlabelled, accordion (not in the 59), aeroplane (first of the 59),
# table, person, wood (last of the 59), wool (the last id, not in the 59).
PC_VALUES = [0, 1, 2, 397, 284, 458, 459]
PC_VAL = ['2008_000002', '2008_000003', '2010_005000']
PC_TRAIN = ['2008_000008']  # annotated, not in val.txt


def _pc59_expect(raw):
  """The 59-class labels of raw 459-class ids, from PC59_IDS alone."""
  rank = {i: k for k, i in enumerate(sorted(PC59_IDS))}
  return np.vectorize(lambda v: rank.get(int(v), 255))(raw)


def _pc459_expect(raw):
  raw = np.asarray(raw, np.int64)
  return np.where(raw == 0, 65535, raw - 1)


def make_pcontext_tree(root, val_list=True, class_files=True):
  for k, n in enumerate(PC_VAL + PC_TRAIN + ['2009_000001']):
    _jpeg(os.path.join(root, 'JPEGImages', f'{n}.jpg'), seed=k)
    if n != '2009_000001':  # VOC2010 JPEGImages holds images without Context labels too
      _mat(os.path.join(root, 'trainval', f'{n}.mat'), _grid(PC_VALUES, k, np.uint16))
  if val_list:
    os.makedirs(os.path.join(root, 'ImageSets', 'Main'))
    with open(os.path.join(root, 'ImageSets', 'Main', 'val.txt'), 'w') as f:
      f.write(''.join(f'{n}\n' for n in PC_VAL))
  if class_files:
    with open(os.path.join(root, 'labels.txt'), 'w') as f:
      f.write(''.join(f'{c["id"]}: {c["name"]}\n' for c in datasets_meta.classes('pcontext459')))
    with open(os.path.join(root, '59_labels.txt'), 'w') as f:
      f.write(''.join(f'{k}: {n}\n' for k, n in enumerate(PC59_OFFICIAL, 1)))
  return root


@pytest.mark.parametrize('classes', ['59', '459'])
def test_pcontext_labels(tmp_path, classes):
  raw = make_pcontext_tree(str(tmp_path / 'raw'))
  out = str(tmp_path / 'out')
  pcontext.main(['--input_dir', raw, '--output_dir', out, '--classes', classes,
                 '--workers', '0'])
  info = tfrecord.read_dataset_info(out)
  dataset, ignore = {'59': ('pcontext59', 255), '459': ('pcontext459', 65535)}[classes]
  assert info['dataset'] == dataset and info['ignore_value'] == ignore
  assert info['skipped'] == [] and list(info['splits']) == ['val_all']
  assert info['classes'] == int(classes)
  assert info['image_list'] == os.path.join(raw, 'ImageSets', 'Main', 'val.txt')
  assert info['class_files_checked'] == ['labels.txt', '59_labels.txt']
  s = info['splits']['val_all']
  assert s['class_names'] == [c['name'] for c in datasets_meta.classes(dataset)]
  assert s['seen'] == [False] * int(classes) and s['num_examples'] == len(PC_VAL)
  recs = _records(out, 'val_all')
  assert sorted(recs) == [f'{n}.jpg' for n in PC_VAL]
  for fname, (feats, ex) in recs.items():
    assert feats['image/encoded'] == _original_bytes(os.path.join(raw, 'JPEGImages', fname))
    label_png = Image.open(io.BytesIO(feats['label/encoded']))
    assert label_png.mode.startswith('I;16') if classes == '459' else label_png.mode == 'L'
    rawlab = scipy.io.loadmat(os.path.join(raw, 'trainval', fname[:-4] + '.mat'))['LabelMap']
    want = _pc59_expect(rawlab) if classes == '59' else _pc459_expect(rawlab)
    np.testing.assert_array_equal(ex['label'], want, err_msg=fname)
  values = np.unique(np.concatenate([ex['label'].ravel() for _, ex in recs.values()]))
  assert values.tolist() == ([0, 36, 49, 58, 255] if classes == '59' else
                             [0, 1, 283, 396, 457, 458, 65535])


def test_pcontext_image_lists(tmp_path):
  raw = make_pcontext_tree(str(tmp_path / 'raw'), val_list=False, class_files=False)
  # Without a list: every .mat (with its image).
  info = pcontext.convert(raw, str(tmp_path / 'a'), classes='459', workers=0)
  assert info['image_list'] == 'every trainval/*.mat' and info['class_files_checked'] == []
  assert sorted(_records(str(tmp_path / 'a'), 'val_all')) == \
      sorted(f'{n}.jpg' for n in PC_VAL + PC_TRAIN)
  # --split_list FILE: names, paths or file names, blank lines.
  lst = str(tmp_path / 'list.txt')
  with open(lst, 'w') as f:
    f.write('2008_000003\n\n/data/VOC2010/JPEGImages/2010_005000.jpg\n2008_000003\n')
  pcontext.main(['--input_dir', raw, '--output_dir', str(tmp_path / 'b'), '--classes', '59',
                 '--split_list', lst, '--workers', '0'])
  assert sorted(_records(str(tmp_path / 'b'), 'val_all')) == ['2008_000003.jpg',
                                                              '2010_005000.jpg']
  # A listed name without its .mat.
  with open(lst, 'a') as f:
    f.write('2009_000001\n')
  with pytest.raises(common.BadFileError) as e:
    pcontext.convert(raw, str(tmp_path / 'b'), classes='59', split_list=lst, workers=0)
  assert str(e.value).startswith(os.path.join(raw, 'trainval', '2009_000001.mat') +
                                 ': label file missing (the name is in the image list)')
  with pytest.raises(FileNotFoundError, match='image list .*nope.txt does not exist'):
    pcontext.convert(raw, str(tmp_path / 'b'), classes='59', split_list='nope.txt')


@pytest.mark.parametrize('kind', ['no_labelmap', 'out_of_range', 'not_mat', 'float', 'size'])
def test_pcontext_bad_mat(tmp_path, kind):
  raw = make_pcontext_tree(str(tmp_path / 'raw'), class_files=False)
  bad = os.path.join(raw, 'trainval', '2008_000003.mat')
  if kind == 'no_labelmap':
    _mat(bad, None, Labels=np.zeros((H, W), np.uint16))
    reason = "no 'LabelMap' array in the MATLAB file (it holds ['Labels'])"
  elif kind == 'out_of_range':
    _mat(bad, _grid([0, 460, 2, 1000], 0, np.uint16))
    reason = "label values [460, 1000] are outside the dataset's range (class ids 0..459)"
  elif kind == 'not_mat':
    with open(bad, 'wb') as f:
      f.write(b'not a MATLAB file at all, just some bytes' * 4)
    reason = 'cannot read the MATLAB file ('
  elif kind == 'float':
    _mat(bad, np.zeros((H, W), np.float64))
    reason = "'LabelMap' is a float64 array of shape [6, 8], not a 2-D integer array"
  else:
    _mat(bad, np.zeros((H + 1, W), np.uint16))
    bad = os.path.join(raw, 'JPEGImages', '2008_000003.jpg')
    reason = f'image is (6, 8) (h, w) but its label {os.path.join(raw, "trainval")}'
  out = str(tmp_path / 'out')
  with pytest.raises(common.BadFileError) as e:
    pcontext.main(['--input_dir', raw, '--output_dir', out, '--classes', '459',
                   '--workers', '0'])
  assert str(e.value).startswith(f'{bad}: {reason}'), str(e.value)
  assert str(e.value).endswith('(pass --skip_bad to leave such files out)')
  info = pcontext.convert(raw, out, classes='459', workers=0, skip_bad=True)
  assert [s['file'] for s in info['skipped']] == [os.path.relpath(bad, raw)]
  assert sorted(_records(out, 'val_all')) == ['2008_000002.jpg', '2010_005000.jpg']


def test_pcontext_class_files_checked(tmp_path):
  raw = make_pcontext_tree(str(tmp_path / 'raw'))
  path = os.path.join(raw, 'labels.txt')
  with open(path) as f:
    text = f.read()
  with open(path, 'w') as f:
    f.write(text.replace('459: wool\n', '459: wool blanket\n'))
  with pytest.raises(ValueError, match="labels.txt: class 459 is 'wool blanket' there but 'wool'"):
    pcontext.convert(raw, str(tmp_path / 'out'), classes='459', workers=0)
  with open(path, 'w') as f:
    f.write(text + 'oops\n')
  with pytest.raises(ValueError, match=r'labels.txt:460: expected "<id>: <name>"'):
    pcontext.convert(raw, str(tmp_path / 'out'), classes='459', workers=0)
  with open(path, 'w') as f:
    f.write(text)
  with open(os.path.join(raw, '59_labels.txt'), 'a') as f:
    f.write('60: accordion\n')
  with pytest.raises(ValueError, match=r"names \['accordion'\] are not among the packaged 59"):
    pcontext.convert(raw, str(tmp_path / 'out'), classes='59', workers=0)


def _cli(*args):
  return subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, 'PYTHONPATH': ROOT})


@pytest.mark.slow
def test_pcontext_cli_errors(tmp_path):
  raw = make_pcontext_tree(str(tmp_path / 'raw'), class_files=False)
  out = str(tmp_path / 'out')
  proc = _cli('data_prep.pcontext', '--input_dir', raw, '--output_dir', out)
  assert proc.returncode == 1
  assert proc.stderr.strip().startswith('error: flag --classes=None: Flag --classes must have')
  bad = os.path.join(raw, 'trainval', '2010_005000.mat')
  _mat(bad, None, Other=np.ones((2, 2), np.uint8))
  proc = _cli('data_prep.pcontext', '--input_dir', raw, '--output_dir', out, '--classes', '59',
              '--workers', '0')
  assert proc.returncode == 1  # one error line, the last (absl's log lines precede it)
  errors = [l for l in proc.stderr.splitlines() if 'error' in l.lower() or 'Traceback' in l]
  assert errors == proc.stderr.strip().splitlines()[-1:] == [
      f"error: {bad}: no 'LabelMap' array in the MATLAB file (it holds ['Other']) "
      '(pass --skip_bad to leave such files out)']


# ----------------------------------------------------------------------------- VOC 21


VOC_VALUES = [0, 1, 15, 16, 20, 255]
VOC_TRAIN, VOC_TEST = ['t0', 't1'], ['v0', 'v1']


def make_voc_tree(root):
  for k, n in enumerate(VOC_TRAIN + VOC_TEST):
    _jpeg(os.path.join(root, 'JPEGImages', f'{n}.jpg'), seed=k)
    _png(os.path.join(root, 'SegmentationClassAug', f'{n}.png'), _grid(VOC_VALUES, k, np.uint8))
  split_dir = os.path.join(root, 'split')
  os.makedirs(split_dir)
  for which, names in (('train_list', VOC_TRAIN), ('test_list', VOC_TEST)):
    np.save(os.path.join(split_dir, f'{which}.npy'),
            np.asarray([f'/x/SBD/dataset/annotations/{n}.png' for n in names]))
  return root, split_dir


def test_voc21_and_voc20(tmp_path):
  raw, split_dir = make_voc_tree(str(tmp_path / 'raw'))
  out20, out21 = str(tmp_path / 'voc'), str(tmp_path / 'voc21')
  voc.main(['--input_dir', raw, '--output_dir', out20, '--split_dir', split_dir,
            '--workers', '0'])
  voc.main(['--input_dir', raw, '--output_dir', out21, '--split_dir', split_dir,
            '--workers', '0', '--background', 'class'])
  info20, info21 = tfrecord.read_dataset_info(out20), tfrecord.read_dataset_info(out21)
  assert info21['dataset'] == 'voc21' and list(info21['splits']) == ['val_all']
  assert info21['background'] == 'class' and info21['skipped'] == []
  assert info20['dataset'] == 'voc' and sorted(info20['splits']) == sorted(datasets_meta.SPLITS)
  assert 'background' not in info20 and 'cross_dataset' not in info20
  s21 = info21['splits']['val_all']
  assert s21['class_names'] == ['background'] + info20['splits']['val_all']['class_names']
  assert s21['seen'] == [False] * 21
  assert s21['source_files_sha256'] == info20['splits']['val_all']['source_files_sha256']
  r20, r21 = _records(out20, 'val_all'), _records(out21, 'val_all')
  assert sorted(r20) == sorted(r21) == ['v0.jpg', 'v1.jpg']
  for fname in r21:
    rawlab = np.asarray(Image.open(os.path.join(raw, 'SegmentationClassAug',
                                                fname[:-4] + '.png'))).astype(np.int64)
    np.testing.assert_array_equal(r21[fname][1]['label'], rawlab)  # VOC 21: ids kept
    want20 = np.where((rawlab == 0) | (rawlab == 255), 255, rawlab - 1)
    np.testing.assert_array_equal(r20[fname][1]['label'], want20)  # VOC 20: background ignored
    assert r21[fname][0]['image/encoded'] == r20[fname][0]['image/encoded']


def test_voc_default_unchanged(tmp_path):
  """--background ignore (the default) writes the same shards and dataset_info as before."""
  raw, split_dir = make_voc_tree(str(tmp_path / 'raw'))
  out_a, out_b = str(tmp_path / 'a'), str(tmp_path / 'b')
  voc.convert(raw, out_a, split_dir=split_dir, workers=0)
  voc.main(['--input_dir', raw, '--output_dir', out_b, '--split_dir', split_dir,
            '--workers', '0', '--background', 'ignore'])
  files = sorted(os.listdir(out_a))
  assert files == sorted(os.listdir(out_b))
  for f in files:
    if f.endswith('.tfrecord-00000-of-00001'):
      assert _original_bytes(os.path.join(out_a, f)) == _original_bytes(os.path.join(out_b, f))
  info_a, info_b = tfrecord.read_dataset_info(out_a), tfrecord.read_dataset_info(out_b)
  for info in (info_a, info_b):
    info['converter'].pop('input_dir')
  assert info_a == info_b
  assert set(info_a) == {'dataset', 'ignore_value', 'converter', 'skipped', 'splits',
                         'seen_classes', 'unseen_classes', 'image_lists', 'version'}
  with pytest.raises(ValueError, match='background must be one of'):
    voc.convert(raw, out_a, split_dir=split_dir, background='keep')
