"""ShapesWorld generator: class splits, determinism, idempotence, label invariants."""
import os

import numpy as np
import pytest

from zegformer_jax.projects.shapesworld import world as sw
from zegformer_jax.data import tfrecord

SMALL = dict(num_train=40, num_val=12, image_size=64, num_shards=2)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sw'))
  info = sw.generate(out, seed=3, split='default', unseen_in_train='ignored', **SMALL)
  return out, info


def _labels(data_dir, split):
  info = tfrecord.read_dataset_info(data_dir)
  out = []
  for sh in info['splits'][split]['shards']:
    for rec in tfrecord.read_records(os.path.join(data_dir, sh['file'])):
      out.append(tfrecord.decode_example(rec))
  return out


@pytest.mark.parametrize('split', sorted(sw.UNSEEN))
def test_class_splits(split):
  seen, unseen = sw.class_names(split)
  assert len(seen) + len(unseen) == len(sw.CANONICAL_CLASSES) == 32
  assert not set(seen) & set(unseen)
  seen_things = [c for c in seen if c in sw.THINGS]
  assert {c.split()[0] for c in seen_things} == set(sw.COLOURS)
  assert {c.split()[1] for c in seen_things} == set(sw.SHAPES)
  assert any(c in sw.STUFF for c in unseen) and any(c in sw.THINGS for c in unseen)
  assert seen == [c for c in sw.CANONICAL_CLASSES if c in seen]  # canonical order


def test_split_lists_and_lut():
  seen, unseen = sw.class_names('default')
  names, flags = sw.split_class_names('default', 'val_all')
  assert names == seen + unseen and flags == [True] * len(seen) + [False] * len(unseen)
  lut = sw.label_lut('default', 'train')
  for i, c in enumerate(sw.CANONICAL_CLASSES):
    assert lut[i] == (seen.index(c) if c in seen else 255)
  with pytest.raises(ValueError, match='unknown ShapesWorld split'):
    sw.class_names('nope')


def test_scene_and_crops():
  image, label = sw.render_scene(sw.example_rng(0, 'train', 5), 64)
  assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
  assert label.dtype == np.uint8 and label.shape == (64, 64) and label.max() < 32
  for i, c in enumerate(sw.CANONICAL_CLASSES):
    crop = sw.render_class_crop(c, np.random.default_rng(i), 48)
    assert crop.shape == (48, 48, 3) and crop.dtype == np.uint8
  with pytest.raises(ValueError, match='unknown ShapesWorld class'):
    sw.render_class_crop('purple unicorn', np.random.default_rng(0), 32)


def test_determinism_and_idempotence(world, tmp_path):
  out, info = world
  again = str(tmp_path / 'again')
  # The fixture rendered in this process (a small job); two worker processes write the
  # same bytes.
  sw.generate(again, seed=3, split='default', unseen_in_train='ignored', workers=2, **SMALL)
  files = sorted(f for f in os.listdir(out) if '.tfrecord-' in f)
  assert files == sorted(f for f in os.listdir(again) if '.tfrecord-' in f)
  for f in files:
    with open(os.path.join(out, f), 'rb') as a, open(os.path.join(again, f), 'rb') as b:
      assert a.read() == b.read(), f
  mtime = os.path.getmtime(os.path.join(again, files[0]))
  assert sw.generate(again, seed=3, split='default', unseen_in_train='ignored',
                     **SMALL)['generator'] == info['generator']
  assert os.path.getmtime(os.path.join(again, files[0])) == mtime  # not regenerated
  with pytest.raises(ValueError, match=r"different ShapesWorld.*'seed': \(3, 4\)"):
    sw.generate(again, seed=4, split='default', unseen_in_train='ignored', **SMALL)
  other = str(tmp_path / 'other')
  sw.generate(other, seed=4, split='default', unseen_in_train='ignored', **SMALL)
  with open(os.path.join(out, files[0]), 'rb') as a, open(os.path.join(other, files[0]),
                                                          'rb') as b:
    assert a.read() != b.read()


def test_label_invariants(world):
  out, info = world
  seen, unseen = sw.class_names('default')
  s, k = len(seen), len(seen) + len(unseen)
  assert set(info['splits']) == {'train', 'val_all', 'val_seen', 'val_unseen'}
  assert info['splits']['train']['class_names'] == seen
  train = _labels(out, 'train')
  assert len(train) == SMALL['num_train']
  ignored = 0
  for ex in train:
    vals = np.unique(ex['label'])
    assert ((vals < s) | (vals == 255)).all()
    ignored += (ex['label'] == 255).sum()
  assert ignored > 0  # unseen objects/stuff occur in training images, ignored
  val_all, val_seen, val_unseen = (_labels(out, x) for x in ('val_all', 'val_seen',
                                                             'val_unseen'))
  assert len(val_all) == SMALL['num_val']
  for a, vs, vu in zip(val_all, val_seen, val_unseen):
    np.testing.assert_array_equal(a['image'], vs['image'])
    assert a['filename'] == vs['filename'] == vu['filename']
    la = a['label']
    assert la.max() < k  # every pixel labelled in val_all
    np.testing.assert_array_equal(vs['label'], np.where(la < s, la, 255))
    np.testing.assert_array_equal(vu['label'], np.where(la >= s, la - s, 255))
  assert any((a['label'] >= s).any() for a in val_all)


def test_unseen_absent_from_training_images(tmp_path):
  """unseen_in_train='absent': no training pixel is ignored (every class drawn is seen); the
  validation images are byte-identical to those of the 'ignored' world."""
  absent = str(tmp_path / 'absent')
  info = sw.generate(absent, seed=3, split='default', unseen_in_train='absent', **SMALL)
  assert info['generator']['unseen_in_train'] == 'absent'
  seen, _ = sw.class_names('default')
  labels = np.stack([ex['label'] for ex in _labels(absent, 'train')])
  assert labels.max() < len(seen)              # no 255: nothing unseen was drawn
  assert len(np.unique(labels)) > len(seen) // 2
  ignored = str(tmp_path / 'ignored')
  sw.generate(ignored, seed=3, split='default', unseen_in_train='ignored', **SMALL)
  ign = np.stack([ex['label'] for ex in _labels(ignored, 'train')])
  assert (ign == 255).any()                    # the COCO protocol keeps unseen objects
  for f in sorted(os.listdir(absent)):
    if f.startswith('val_'):
      with open(os.path.join(absent, f), 'rb') as a, open(os.path.join(ignored, f), 'rb') as b:
        assert a.read() == b.read(), f
  with pytest.raises(ValueError, match='unseen_in_train'):
    sw.generate(str(tmp_path / 'bad'), unseen_in_train='sometimes', **SMALL)
  with pytest.raises(ValueError, match='at least two stuff'):
    sw.render_scene(sw.example_rng(0, 'train', 0), 64, ['sand', 'red star'])
