"""ZS3Net's VOC benchmarks (K = 2..10 unseen, background seen): class tables and conversion."""
import glob
import io
import os

import numpy as np
from PIL import Image
import pytest

from data_prep import voc
from zegformer_jax.data import datasets_meta
from zegformer_jax.data import input_pipeline
from zegformer_jax.data import tfrecord

I = 255
# ZS3Net's cumulative unseen lists (valeoai/ZS3 train_pascal.py), by VOC id.
UNSEEN_IDS = {2: [10, 14], 4: [10, 14, 1, 18], 6: [10, 14, 1, 18, 8, 20],
              8: [10, 14, 1, 18, 8, 20, 19, 5], 10: [10, 14, 1, 18, 8, 20, 19, 5, 9, 16]}


@pytest.mark.parametrize('k', sorted(UNSEEN_IDS))
def test_split_tables(k):
  ds = f'voc_zs3_k{k}'
  names, seen = datasets_meta.split_names(ds, 'val_all')
  assert len(names) == 21 and names[0] == 'background'
  assert sorted(np.flatnonzero(~seen).tolist()) == sorted(UNSEEN_IDS[k])
  train, train_seen = datasets_meta.split_names(ds, 'train')
  assert len(train) == 21 - k and train_seen.all() and train[0] == 'background'
  unseen, _ = datasets_meta.split_names(ds, 'val_unseen')
  assert unseen == [names[i] for i in sorted(UNSEEN_IDS[k])]
  lut = datasets_meta.split_label_lut(ds, 'train', 256)
  keep = [i for i in range(21) if i not in UNSEEN_IDS[k]]
  assert lut[keep].tolist() == list(range(21 - k))
  assert (lut[UNSEEN_IDS[k]] == -1).all() and lut[255] == -1


def _write_tree(root):
  """Two train and one val image; label stripes of ids 0 (background), 10 (cow), 1, 255."""
  stripes = np.array([0, 10, 1, 255, 15, 0])[None].repeat(4, 0)
  for n in ('a', 'b', 'v'):
    os.makedirs(os.path.join(root, 'JPEGImages'), exist_ok=True)
    os.makedirs(os.path.join(root, 'SegmentationClassAug'), exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(np.full((4, 6, 3), 90, np.uint8)).save(buf, 'JPEG')
    with open(os.path.join(root, 'JPEGImages', f'{n}.jpg'), 'wb') as f:
      f.write(buf.getvalue())
    Image.fromarray(stripes.astype(np.uint8)).save(
        os.path.join(root, 'SegmentationClassAug', f'{n}.png'))
  split = os.path.join(root, 'split')
  os.makedirs(split)
  np.save(os.path.join(split, 'train_list.npy'), np.asarray(['/x/train/a.png', '/x/train/b.png']))
  np.save(os.path.join(split, 'test_list.npy'), np.asarray(['/x/val/v.png']))
  return split


def test_convert_k2(tmp_path):
  raw = str(tmp_path / 'raw')
  split_dir = _write_tree(raw)
  out = str(tmp_path / 'out')
  voc.main(['--input_dir', raw, '--output_dir', out, '--split_dir', split_dir,
            '--workers', '0', '--zs3net_unseen', '2'])
  info = tfrecord.read_dataset_info(out)
  assert info['dataset'] == 'voc_zs3_k2'
  names, seen = input_pipeline.dataset_classes(out, 'val_all')
  assert names[10] == 'cow' and not seen[10] and seen[0]
  shards = {s: sorted(glob.glob(os.path.join(out, f'{s}.tfrecord-*'))) for s in
            ('train', 'val_all', 'val_unseen')}
  labels = {}
  for s, files in shards.items():
    recs = [tfrecord.decode_example(r) for f in files for r in tfrecord.read_records(f)]
    labels[s] = recs[0]['label'][0].tolist()
  # train: background 0, cow (unseen) ignored, aeroplane 1, ignore, person 15 -> 13 (ids 10
  # and 14 removed below it), background 0.
  assert labels['train'] == [0, I, 1, I, 13, 0]
  assert labels['val_all'] == [0, 10, 1, I, 15, 0]
  assert labels['val_unseen'] == [I, 0, I, I, I, I]


def test_bad_k_is_refused(tmp_path):
  with pytest.raises(ValueError, match='zs3net_unseen must be one of'):
    voc.convert(str(tmp_path), str(tmp_path / 'o'), zs3net_unseen=3)
