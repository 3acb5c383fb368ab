"""Augmentation, targets, data source and the grain train/eval pipelines."""
import colorsys
import math
import os

import numpy as np
import pytest

from configs import shapesworld as shapesworld_config
from zegformer_jax.projects.shapesworld import world as sw
from zegformer_jax.data import augment
from zegformer_jax.data import data_source
from zegformer_jax.data import input_pipeline
from zegformer_jax.modeling import criterion
from zegformer_jax.data import tfrecord

NUM_TRAIN, NUM_VAL = 48, 18


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sw_pipeline'))
  sw.generate(out, seed=0, split='default', num_train=NUM_TRAIN, num_val=NUM_VAL,
              image_size=64, num_shards=3)
  return out


def _config(**input_overrides):
  c = shapesworld_config.get_config('smoke')
  with c.unlocked():
    c.input.global_batch_size = 8
    c.input.eval_batch_size = 8
    for k, v in input_overrides.items():
      setattr(c.input, k, v)
  return c


# ----------------------------------------------------------------------------- augment


@pytest.mark.parametrize('hw,short,max_size,expected', [
    ((480, 640), 320, 2560, (320, 427)),    # 640 * 320 / 480 = 426.67
    ((640, 480), 320, 2560, (427, 320)),
    ((500, 375), 640, 2560, (853, 640)),    # 500 * 640 / 375 = 853.33
    ((100, 1000), 512, 2048, (205, 2048)),  # 5120 > 2048: scale 2.048 -> 204.8
    ((64, 64), 56, 128, (56, 56)),
    ((64, 64), 80, 128, (80, 80)),
    ((333, 500), 640, 900, (599, 900)),     # 500 * 640 / 333 = 961 > 900 -> 333 * 1.8
])
def test_resize_shortest_edge_shape(hw, short, max_size, expected):
  assert augment.resize_shortest_edge_shape(*hw, short, max_size) == expected


def test_train_augment_shapes_and_padding():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
  label = rng.integers(0, 5, (40, 50)).astype(np.int32)
  for seed in range(6):
    img, lab = augment.train_augment(image, label, np.random.default_rng(seed),
                                     min_size_train=(40,), max_size_train=100, crop_size=64,
                                     ignore_value=255, color_aug=True)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert lab.shape == (64, 64) and lab.dtype == np.int32
    assert (lab[40:] == 255).all() and (lab[:, 50:] == 255).all()
    assert (img[40:] == 128).all() and (img[:, 50:] == 128).all()
    assert (lab[:40, :50] < 5).all()
  # Larger than the crop: a crop of exactly crop_size, no padding.
  big = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)
  img, lab = augment.train_augment(big, np.zeros((100, 120), np.int32),
                                   np.random.default_rng(1), min_size_train=(90,),
                                   max_size_train=200, crop_size=(48, 32), ignore_value=255)
  assert img.shape == (48, 32, 3) and (lab == 0).all()


def test_flip_is_consistent_between_image_and_label():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 20, (32, 32)).astype(np.int32)
  image = np.stack([label * 10, label * 5, 255 - label * 10], -1).astype(np.uint8)
  flips = set()
  for seed in range(12):
    img, lab = augment.train_augment(image, label, np.random.default_rng(seed),
                                     min_size_train=(32,), max_size_train=64, crop_size=32,
                                     ignore_value=255, color_aug=False)
    np.testing.assert_array_equal(img[..., 0], lab * 10)
    flips.add(bool(np.array_equal(lab, label[:, ::-1]) and not np.array_equal(lab, label)))
    assert np.array_equal(lab, label) or np.array_equal(lab, label[:, ::-1])
  assert flips == {True, False}


def test_color_jitter_keeps_labels_and_is_reproducible():
  rng = np.random.default_rng(3)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  label = rng.integers(0, 7, (32, 32)).astype(np.int32)
  kw = dict(min_size_train=(32,), max_size_train=64, crop_size=32, ignore_value=255)
  changed = 0
  for seed in range(8):
    img, lab = augment.train_augment(image, label, np.random.default_rng(seed), **kw)
    assert np.array_equal(lab, label) or np.array_equal(lab, label[:, ::-1])
    ref = image if np.array_equal(lab, label) else image[:, ::-1]
    changed += not np.array_equal(img, ref)
    img2, lab2 = augment.train_augment(image, label, np.random.default_rng(seed), **kw)
    np.testing.assert_array_equal(img, img2)
    np.testing.assert_array_equal(lab, lab2)
  assert changed >= 5  # each of the four jitters fires with p=.5


def test_hsv_opencv_convention():
  rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [128, 128, 128]],
                 np.uint8)
  hsv = augment.rgb_to_hsv_u8(rgb)
  np.testing.assert_array_equal(hsv, [[0, 255, 255], [60, 255, 255], [120, 255, 255],
                                      [30, 255, 255], [0, 0, 128]])
  np.testing.assert_array_equal(augment.hsv_to_rgb_u8(hsv), rgb)
  shifted = hsv.copy()
  shifted[0, 0] = 60  # hue +120 degrees: red -> green
  np.testing.assert_array_equal(augment.hsv_to_rgb_u8(shifted)[0], [0, 255, 0])
  x = np.random.default_rng(0).integers(0, 256, (5000, 3), dtype=np.uint8)
  err = np.abs(augment.hsv_to_rgb_u8(augment.rgb_to_hsv_u8(x)).astype(int) - x)
  assert err.max() <= 4 and err.mean() < 0.5  # hue is quantised to 2 degrees, as in cv2


def _hsv_oracle(r, g, b):
  """OpenCV's documented 8-bit RGB -> HSV for one pixel, in plain Python."""
  v = max(r, g, b)
  d = v - min(r, g, b)
  s = math.floor(255 * d / v + 0.5) if v else 0
  if d == 0:
    h = 0.0
  elif v == r:
    h = 60 * (g - b) / d
  elif v == g:
    h = 120 + 60 * (b - r) / d
  else:
    h = 240 + 60 * (r - g) / d
  h = math.floor(h / 2 + 0.5) % 180
  return h, s, v


def _rgb_oracle(h, s, v):
  """The inverse (sector formula) for one 8-bit HSV pixel, via colorsys."""
  rgb = colorsys.hsv_to_rgb(h / 180, s / 255, v / 255)
  return tuple(min(255, math.floor(c * 255 + 0.5)) for c in rgb)


def test_hsv_against_scalar_oracles():
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (3000, 3), dtype=np.uint8)
  rgb[:200] = rgb[:200, :1]                      # greys
  rgb[200:400, 1] = rgb[200:400, 0]              # r == g ties
  rgb[400:600, 2] = rgb[400:600, 1]              # g == b ties
  rgb[600:700] = [[255, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 1]] * 25
  hsv = augment.rgb_to_hsv_u8(rgb.reshape(100, 30, 3)).reshape(-1, 3)
  expected = [_hsv_oracle(*map(int, px)) for px in rgb]
  np.testing.assert_array_equal(hsv, expected)
  hsv = np.stack([rng.integers(0, 180, 3000), rng.integers(0, 256, 3000),
                  rng.integers(0, 256, 3000)], -1).astype(np.uint8)
  back = augment.hsv_to_rgb_u8(hsv.reshape(50, 60, 3)).reshape(-1, 3).astype(int)
  expected = np.asarray([_rgb_oracle(*map(int, px)) for px in hsv])
  # float32 against float64: a value within 1e-4 of a .5 boundary may round the other way.
  assert np.abs(back - expected).max() <= 1 and (back != expected).mean() < 0.01


def _color_aug_per_pixel(image, rng):
  """The colour jitter as it was before its tables: the HSV formulas evaluated per pixel and
  the float multiply-add per value, the draws in the same order (the oracle of the next test)."""
  def convert(x, alpha=1.0, beta=0.0):
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
  img = image
  if rng.integers(2):
    img = convert(img, beta=rng.uniform(-32, 32))

  def contrast(x):
    return convert(x, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else x

  def saturation(x):
    if rng.integers(2):
      hsv = augment.rgb_to_hsv_u8(x)
      hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
      return augment.hsv_to_rgb_u8(hsv)
    return x

  def hue(x):
    if rng.integers(2):
      hsv = augment.rgb_to_hsv_u8(x)
      hsv[..., 0] = (hsv[..., 0].astype(np.int32) + int(rng.integers(-18, 19))) % 180
      return augment.hsv_to_rgb_u8(hsv)
    return x

  return hue(saturation(contrast(img))) if rng.integers(2) else contrast(hue(saturation(img)))


def test_color_jitter_by_tables_equals_the_per_pixel_formulas():
  rng = np.random.default_rng(11)
  noise = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
  greys = np.repeat(rng.integers(0, 256, (96, 128, 1), dtype=np.uint8), 3, -1)
  every = np.arange(1 << 24, dtype='<u4').view(np.uint8).reshape(4096, 4096, 4)[..., :3]
  for i, image in enumerate([noise, greys] * 16 + [every[::7, ::5]] * 2):
    fast = augment.color_aug_ssd(image, np.random.default_rng([5, i]))
    np.testing.assert_array_equal(fast, _color_aug_per_pixel(image, np.random.default_rng([5, i])))
  # All 2**24 colours through the tables against the formulas: the conversions themselves.
  h, s, v = augment._hsv_planes(every)
  np.testing.assert_array_equal(np.stack([h, s, v], -1), augment.rgb_to_hsv_u8(every))
  hsv = np.stack([rng.integers(0, 180, (512, 512)), rng.integers(0, 256, (512, 512)),
                  rng.integers(0, 256, (512, 512))], -1).astype(np.uint8)
  np.testing.assert_array_equal(augment._rgb_of_planes(hsv[..., 0], hsv[..., 1], hsv[..., 2]),
                                augment.hsv_to_rgb_u8(hsv))


def _train_augment_before(image, label, rng, min_size_train, max_size_train, crop_size,
                          ignore_value):
  """train_augment as it was: int32 labels, the per-pixel colour jitter, flip then pad."""
  from PIL import Image
  h, w = label.shape
  nh, nw = augment.resize_shortest_edge_shape(h, w, int(rng.choice(np.asarray(min_size_train))),
                                              max_size_train)
  image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
  label = np.asarray(Image.fromarray(label.astype(np.int32)).resize((nw, nh), Image.NEAREST))
  y0, x0, ch, cw = augment.random_crop_box(nh, nw, crop_size, rng)
  image, label = image[y0:y0 + ch, x0:x0 + cw], label[y0:y0 + ch, x0:x0 + cw]
  image = _color_aug_per_pixel(image, rng)
  if rng.uniform() < 0.5:
    image, label = image[:, ::-1], label[:, ::-1]
  out_image = np.full((crop_size, crop_size, 3), 128, np.uint8)
  out_label = np.full((crop_size, crop_size), ignore_value, np.int32)
  out_image[:ch, :cw], out_label[:ch, :cw] = image, label
  return out_image, out_label


@pytest.mark.parametrize('label_dtype', [np.uint8, np.int32])
def test_train_augment_equals_the_implementation_before_its_tables(label_dtype):
  rng = np.random.default_rng(4)
  kw = dict(min_size_train=(48, 64, 80, 96, 120), max_size_train=160, crop_size=72,
            ignore_value=255)
  for i in range(24):
    h, w = rng.integers(40, 110, 2)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 30, (h, w))
    label[rng.random((h, w)) < .1] = 255
    got = augment.train_augment(image, label.astype(label_dtype), np.random.default_rng(i), **kw)
    want = _train_augment_before(image, label, np.random.default_rng(i), **kw)
    assert got[0].dtype == np.uint8 and got[1].dtype == np.int32
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_test_resize_and_pad_to_multiple():
  img = np.zeros((30, 45, 3), np.uint8)
  out = augment.test_resize(img, 64, 128)
  assert out.shape == (64, 96, 3)
  padded = augment.pad_to_multiple(out + 1, 32, 0)
  assert padded.shape == (64, 96, 3)
  padded = augment.pad_to_multiple(np.ones((33, 65, 3), np.uint8), 32, 0)
  assert padded.shape == (64, 96, 3) and padded[33:].sum() == 0


def test_make_targets_hand_made():
  label = np.array([[0, 0, 3],
                    [255, 3, 3],
                    [5, 5, 255]])
  t = augment.make_targets(label, num_classes=6, max_masks=4, ignore_value=255)
  np.testing.assert_array_equal(t['target_classes'], [0, 3, 5, 0])
  np.testing.assert_array_equal(t['target_valid'], [True, True, True, False])
  assert t['target_classes'].dtype == np.int32 and t['target_masks'].dtype == np.uint8
  np.testing.assert_array_equal(t['target_masks'][0], [[1, 1, 0], [0, 0, 0], [0, 0, 0]])
  np.testing.assert_array_equal(t['target_masks'][1], [[0, 0, 1], [0, 1, 1], [0, 0, 0]])
  np.testing.assert_array_equal(t['target_masks'][2], [[0, 0, 0], [0, 0, 0], [1, 1, 0]])
  assert t['target_masks'][3].sum() == 0
  before = dict(augment.TRUNCATION_STATS)
  crowded = np.array([[1, 1, 4],
                      [1, 1, 4],
                      [2, 255, 4]])  # areas: 1 -> 4 px, 4 -> 3 px, 2 -> 1 px
  t = augment.make_targets(crowded, num_classes=6, max_masks=2, ignore_value=255)
  np.testing.assert_array_equal(t['target_classes'], [1, 4])  # the two largest, id order
  assert t['target_valid'].all()
  assert augment.TRUNCATION_STATS['examples'] == before['examples'] + 1
  assert augment.TRUNCATION_STATS['dropped_classes'] == before['dropped_classes'] + 1
  with pytest.raises(ValueError, match=r'label values \[7\]'):
    augment.make_targets(np.array([[7, 0]]), num_classes=6, max_masks=4, ignore_value=255)


# ----------------------------------------------------------------------------- data source


def test_data_source_rejects_out_of_range_label(tmp_path):
  image = tfrecord.encode_png(np.zeros((8, 8, 3), np.uint8))
  good = np.zeros((8, 8), np.uint8)
  bad = good.copy()
  bad[2, 3] = 9
  recs = [tfrecord.encode_example(image=image, image_format='png', filename=f'im{i}.png',
                                  height=8, width=8, label=tfrecord.encode_png(lab))
          for i, lab in enumerate([good, good, bad])]
  shards = tfrecord.write_sharded(str(tmp_path), 'val', recs, 2)
  tfrecord.write_dataset_info(str(tmp_path), {'ignore_value': 255, 'splits': {'val': {
      'class_names': ['a', 'b', 'c'], 'seen': [True, True, False], 'num_examples': 3,
      'shards': shards}}})
  src, _ = data_source.open_split(str(tmp_path), 'val')
  assert src[1]['filename'] == 'im1.png' and src[1]['label'].dtype == np.int32
  with pytest.raises(ValueError) as e:
    src[2]
  msg = str(e.value)
  assert 'val.tfrecord-00001-of-00002: record 1' in msg and 'im2.png' in msg
  assert '[9]' in msg and '[0, 3)' in msg
  with pytest.raises(KeyError, match="split 'train' not in"):
    data_source.open_split(str(tmp_path), 'train')
  # No image_shapes in dataset_info.json: the static eval shapes come from a record scan.
  assert input_pipeline.eval_shapes(_config(), str(tmp_path), 'val') == {
      'image': (64, 64), 'label': (8, 8)}


# ----------------------------------------------------------------------------- pipelines


def test_data_source_cache_of_decoded_examples(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  recs = [tfrecord.encode_example(image=tfrecord.encode_png(im), image_format='png',
                                  filename=f'im{i}.png', height=8, width=8,
                                  label=tfrecord.encode_png(np.full((8, 8), i, np.uint8)))
          for i, im in enumerate(images)]
  shards = tfrecord.write_sharded(str(tmp_path), 'val', recs, 1)
  tfrecord.write_dataset_info(str(tmp_path), {'ignore_value': 255, 'splits': {'val': {
      'class_names': list('abcd'), 'seen': [True] * 4, 'num_examples': 4, 'shards': shards}}})
  per_example = 8 * 8 * 3 + 8 * 8 * 4                 # uint8 image + int32 label
  src, _ = data_source.open_split(str(tmp_path), 'val', cache_mb=2.5 * per_example / 2**20)
  for i in (0, 1, 2):                                  # the third one exceeds the budget
    ex = src[i]
    np.testing.assert_array_equal(ex['image'], images[i])
    assert ex['filename'] == f'im{i}.png' and ex['index'] == i
  assert src._cached_bytes == 2 * per_example          # pylint: disable=protected-access
  ex = src[1]
  assert not ex['image'].flags.writeable and not ex['label'].flags.writeable
  ex['image'] = None                                   # the returned dict is the caller's
  assert src[1]['image'] is not None
  # Cached records are served from memory: zeroing the file leaves them readable, while
  # records read only now (2 was over budget, 3 never read) fail their CRC check.
  plain, _ = data_source.open_split(str(tmp_path), 'val')   # no cache_mb: nothing is kept
  np.testing.assert_array_equal(plain[0]['image'], images[0])
  path = os.path.join(str(tmp_path), shards[0]['file'])
  size = os.path.getsize(path)
  with open(path, 'r+b') as f:
    f.write(bytes(size))
  np.testing.assert_array_equal(src[0]['image'], images[0])
  np.testing.assert_array_equal(src[1]['label'], np.full((8, 8), 1))
  for i in (2, 3):
    with pytest.raises(tfrecord.TFRecordError):
      src[i]
  with pytest.raises(tfrecord.TFRecordError):
    plain[0]


def test_dataset_classes(data_dir):
  names, seen = input_pipeline.dataset_classes(data_dir, 'val_all')
  s, u = sw.class_names('default')
  assert names == s + u and seen.dtype == np.bool_ and seen.sum() == len(s)
  names, seen = input_pipeline.dataset_classes(data_dir, 'train')
  assert names == s and seen.all()


def test_train_batches(data_dir):
  c = _config()
  it = input_pipeline.make_train_iterator(c, data_dir, 0, 1)
  batch = next(it)
  m = c.input.max_masks
  assert set(batch) == {'image', 'label', 'target_classes', 'target_valid'}
  assert batch['image'].dtype == np.uint8 and batch['image'].shape == (8, 64, 64, 3)
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (8, 64, 64)
  assert batch['target_classes'].dtype == np.int32 and batch['target_classes'].shape == (8, m)
  masks = np.asarray(criterion.masks_from_label(batch['label'], batch['target_classes'],
                                             batch['target_valid']))
  assert masks.dtype == np.uint8 and masks.shape == (8, m, 64, 64)
  assert batch['target_valid'].dtype == np.bool_ and batch['target_valid'].shape == (8, m)
  assert 0 <= batch['image'].min() and batch['image'].max() <= 255
  num_seen = len(sw.class_names('default')[0])
  lab = batch['label']
  assert ((lab < num_seen) | (lab == 255)).all() and lab.min() >= 0
  for b in range(8):
    for j in range(m):
      expect = (lab[b] == batch['target_classes'][b, j]) & batch['target_valid'][b, j]
      np.testing.assert_array_equal(masks[b, j], expect)
  with pytest.raises(ValueError, match='not divisible by the process count 3'):
    input_pipeline.make_train_iterator(c, data_dir, 0, 3)


def _same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_train_iterator_resumes_exactly(data_dir):
  c = _config()
  it = input_pipeline.make_train_iterator(c, data_dir, 0, 1, include_metadata=True)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  restored = input_pipeline.make_train_iterator(c, data_dir, 0, 1, include_metadata=True)
  restored.set_state(state)
  for want in expected:
    _same(want, next(restored))
  # A fresh pipeline replays the same stream (everything is a function of the seed).
  fresh = input_pipeline.make_train_iterator(c, data_dir, 0, 1, include_metadata=True)
  for _ in range(3):
    next(fresh)
  _same(expected[0], next(fresh))


def test_per_process_sharding_covers_every_record_once(data_dir):
  c = _config()  # global batch 8 -> 4 per process; 24 records per process per epoch
  per_epoch_batches = NUM_TRAIN // 2 // 4
  seen_by = []
  for p in range(2):
    it = input_pipeline.make_train_iterator(c, data_dir, p, 2, include_metadata=True)
    batches = [next(it) for _ in range(per_epoch_batches + 1)]
    idx = np.concatenate([b['record_index'] for b in batches[:per_epoch_batches]])
    assert (np.concatenate([b['epoch'] for b in batches[:per_epoch_batches]]) == 0).all()
    assert (batches[-1]['epoch'] == 1).all()
    seen_by.append(idx)
  allidx = np.concatenate(seen_by)
  assert sorted(allidx.tolist()) == list(range(NUM_TRAIN))
  assert not np.array_equal(np.sort(seen_by[0]), np.arange(0, NUM_TRAIN, 2))  # shuffled


def test_fewer_records_than_processes():
  import grain
  order = grain.MapDataset.range(2).shuffle(seed=0)
  picks = [input_pipeline._LocalRecord(order, 2, 1, p, 4)(k, None)
           for p in range(4) for k in range(3)]
  assert {r for r, _ in picks} == {0, 1} and {e for _, e in picks} == {0, 1, 2}


def test_eval_batches_cover_every_image_once(data_dir):
  c = _config()
  names = []
  for p in range(2):
    batches = input_pipeline.make_eval_batches(c, data_dir, 'val_all', p, 2)
    # 18 images, 9 per process, local batch 4 -> 3 batches, the last one partly padding.
    assert len(batches) == 3
    got = list(batches)
    assert len(got) == 3
    for b in got:
      assert b['image'].dtype == np.float32 and b['image'].shape == (4, 64, 64, 3)
      assert b['label'].dtype == np.int32 and b['label'].shape == (4, 64, 64)
      assert b['image_hw'].dtype == np.int32 and b['label_hw'].shape == (4, 2)
      assert b['example_valid'].dtype == np.bool_
      v = b['example_valid']
      assert (b['image_hw'][v] == 64).all() and (b['image_hw'][~v] == 0).all()
      assert (b['label'][~v] == 255).all() and (b['image'][~v] == 0).all()
      assert all(f == '' for f in np.asarray(b['filename'])[~v])
      names += [str(f) for f in np.asarray(b['filename'])[v]]
    assert sum(int(b['example_valid'].sum()) for b in got) == 9
  assert sorted(names) == [f'val_{i:06d}.png' for i in range(NUM_VAL)]
  assert input_pipeline.eval_shapes(c, data_dir, 'val_all') == {'image': (64, 64),
                                                                 'label': (64, 64)}
  # Pixels match the stored example (64 px images are not resized at min_size_test 64).
  first = next(iter(input_pipeline.make_eval_batches(c, data_dir, 'val_all', 0, 1)))
  src, _ = data_source.open_split(data_dir, 'val_all')
  np.testing.assert_array_equal(first['image'][1], src[1]['image'].astype(np.float32))
  np.testing.assert_array_equal(first['label'][1], src[1]['label'])
