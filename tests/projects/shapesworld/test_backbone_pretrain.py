"""ShapesWorld's ImageNet stand-in: backbone pretraining (classify, dense), BN folding, init_from."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import shapesworld
from zegformer_jax.projects.shapesworld import backbone_pretrain
from zegformer_jax.weights import store
from zegformer_jax.projects.shapesworld import prepare
from zegformer_jax.modeling import zegformer


def _settings(steps=30):
  c = shapesworld.get_config('smoke')
  c.shapesworld.backbone_pretrain.task = 'classify'
  c.shapesworld.backbone_pretrain.image_size = 32
  c.shapesworld.backbone_pretrain.steps = steps
  c.shapesworld.backbone_pretrain.batch_size = 16
  c.shapesworld.backbone_pretrain.pool_per_class = 4
  c.shapesworld.backbone_pretrain.eval_per_class = 2
  return c, backbone_pretrain.settings_from_config(c)


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  c, s = _settings()
  path = str(tmp_path_factory.mktemp('bb') / 'backbone')
  stats = backbone_pretrain.pretrain_backbone(path, s, log_every=10)
  return c, s, path, stats


def test_pretraining_learns_and_writes_a_convert_directory(pretrained):
  c, s, path, stats = pretrained
  assert sorted(os.listdir(path)) == ['convert_meta.json', 'params', 'pretrain_stats.json']
  losses = [h['loss'] for h in stats['history']]
  assert len(losses) == 3 and losses[-1] < losses[0] < 2 * math.log(26)
  assert 0.0 <= stats['held_out_accuracy'] <= 1.0
  assert len(stats['classes']) == 26 and 'red star' not in stats['classes']  # seen only
  meta = store.read_meta(path)
  assert meta['source_format'] == 'shapesworld-pretrain'
  assert meta['covers'] == ['params/backbone', 'frozen/backbone']


def test_init_from_loads_the_pretrained_backbone_into_zegformer(pretrained):
  c, s, path, _ = pretrained
  model = zegformer.build_model(c.model)
  v = zegformer.init_variables(model, jax.random.key(0), (64, 64), 26)
  params, frozen = store.load_params(path, v['params'], v['frozen'])
  saved = store.checkpoint_shapes(path)
  assert all(k[1] == 'backbone' for k in saved)
  # Every backbone variable came from the checkpoint; the rest kept its initial value.
  mean = np.asarray(frozen['backbone']['stem']['conv1']['norm']['mean'])
  assert np.abs(mean).max() > 0 and not np.allclose(
      np.asarray(params['backbone']['stem']['conv1']['kernel']),
      np.asarray(v['params']['backbone']['stem']['conv1']['kernel']))
  np.testing.assert_array_equal(np.asarray(params['query_embed']),
                                np.asarray(v['params']['query_embed']))
  n_backbone = sum(1 for k in traverse_util.flatten_dict(
      {'params': v['params'], 'frozen': v['frozen']}) if k[1] == 'backbone')
  assert len(saved) == n_backbone


def test_ensure_reuses_and_refuses_other_settings(pretrained, tmp_path):
  c, s, path, stats = pretrained
  stamp = os.path.getmtime(os.path.join(path, 'pretrain_stats.json'))
  assert backbone_pretrain.ensure_backbone(path, s) == json.loads(json.dumps(stats))
  assert os.path.getmtime(os.path.join(path, 'pretrain_stats.json')) == stamp
  with pytest.raises(ValueError, match='other settings.*steps'):
    backbone_pretrain.ensure_backbone(path, dict(s, steps=31))
  junk = tmp_path / 'junk'
  junk.mkdir()
  (junk / 'x').write_text('')
  with pytest.raises(FileExistsError, match='pretrain_stats.json'):
    backbone_pretrain.ensure_backbone(str(junk), s)


def test_init_from_resolution(tmp_path):
  c, _ = _settings(steps=0)
  c.dataset.data_dir, c.clip.model_path = '/given/data', '/given/clip'   # nothing to make
  assert prepare.prepare(c, str(tmp_path)).train.init_from == ''
  assert not os.path.exists(tmp_path / 'backbone')
  c.train.init_from = '/some/converted/dir'
  resolved = prepare.prepare(c, str(tmp_path))
  assert resolved.train.init_from == '/some/converted/dir'
  assert (resolved.dataset.data_dir, resolved.clip.model_path) == ('/given/data', '/given/clip')


# ---------------------------------------------------------------- task 'dense' (scenes)


def _dense_settings(steps=30):
  c = shapesworld.get_config('smoke')
  c.shapesworld.backbone_pretrain.task = 'dense'
  c.shapesworld.backbone_pretrain.steps = steps
  c.shapesworld.backbone_pretrain.batch_size = 8
  c.shapesworld.backbone_pretrain.image_size = 64
  c.shapesworld.backbone_pretrain.pool_scenes = 16
  c.shapesworld.backbone_pretrain.eval_scenes = 4
  return c, backbone_pretrain.settings_from_config(c)


def test_scene_pool_labels_index_the_seen_classes():
  from zegformer_jax.projects.shapesworld import world as sw
  seen, unseen = sw.class_names('default')
  images, labels = backbone_pretrain.render_scene_pool('default', 6, seed=3, stream=21, size=64,
                                                       workers=2)
  assert images.shape == (6, 64, 64, 3) and images.dtype == np.uint8
  assert labels.shape == (6, 64, 64) and labels.dtype == np.int32
  for j in range(6):  # the same scene rendered directly, in canonical ids
    image, canonical = sw.render_scene(np.random.default_rng([3, 21, j]), 64, classes=seen)
    np.testing.assert_array_equal(images[j], image)
    names = np.asarray(sw.CANONICAL_CLASSES)[canonical]
    np.testing.assert_array_equal(np.asarray(seen)[labels[j]], names)
  assert labels.min() >= 0 and labels.max() < len(seen)
  assert not set(np.asarray(seen)[np.unique(labels)]) & set(unseen)


def test_dense_augment_moves_labels_with_pixels():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 26, (4, 16, 16)).astype(np.int32)
  x = np.stack([y, -y, 2 * y], axis=-1).astype(np.float32)
  moved = 0
  for seed in range(6):
    xa, ya = backbone_pretrain._augment(jax.random.key(seed), jnp.asarray(x), jnp.asarray(y))
    xa, ya = np.asarray(xa), np.asarray(ya)
    np.testing.assert_array_equal(xa[..., 0], ya)   # same flip and shift for both
    np.testing.assert_array_equal(xa[..., 1], -ya)
    moved += int((ya != y).any())
  assert moved >= 5   # a zero shift and no flip for every image is rare
  # Image-level labels are left alone.
  labels = jnp.arange(4)
  _, la = backbone_pretrain._augment(jax.random.key(1), jnp.asarray(x), labels)
  np.testing.assert_array_equal(np.asarray(la), np.arange(4))


@pytest.mark.slow
def test_dense_pretraining_learns_and_loads_into_zegformer(tmp_path):
  c, s = _dense_settings()
  path = str(tmp_path / 'backbone')
  stats = backbone_pretrain.pretrain_backbone(path, s, log_every=10)
  losses = [h['loss'] for h in stats['history']]
  assert len(losses) == 3 and losses[-1] < losses[0] < 2 * math.log(26)
  assert stats['settings']['task'] == 'dense'
  assert 0.0 < stats['held_out_accuracy'] <= 1.0   # per pixel, through the folded network
  saved = store.checkpoint_shapes(path)
  assert saved and all(k[1] == 'backbone' for k in saved)   # the dense head is not kept
  model = zegformer.build_model(c.model)
  v = zegformer.init_variables(model, jax.random.key(0), (64, 64), 26)
  params, frozen = store.load_params(path, v['params'], v['frozen'])
  assert not np.allclose(np.asarray(params['backbone']['stem']['conv1']['kernel']),
                         np.asarray(v['params']['backbone']['stem']['conv1']['kernel']))
  with pytest.raises(ValueError, match='other settings.*task'):
    backbone_pretrain.ensure_backbone(path, dict(s, task='classify'))
  # The other task's pool sizes are not part of a dense pretraining's settings.
  c.shapesworld.backbone_pretrain.pool_per_class = 7
  assert backbone_pretrain.settings_from_config(c) == s and 'pool_per_class' not in s


def test_dense_classifier_head_shapes():
  m = backbone_pretrain.DenseClassifier(
      backbone=dict(block_counts=(1, 1, 1, 1), stem_width=8, bottleneck=False, gn_groups=8),
      num_classes=5)
  x = jnp.zeros((2, 64, 48, 3))
  v = m.init(jax.random.key(0), x)
  assert m.apply(v, x, mutable=['batch_stats'])[0].shape == (2, 64, 48, 5)
  assert set(v['params']) == {'backbone', 'lateral_res2', 'lateral_res3', 'lateral_res4',
                              'lateral_res5', 'head_conv', 'head'}


def test_unknown_pretraining_task_is_an_error():
  c = shapesworld.get_config('smoke')
  c.shapesworld.backbone_pretrain.task = 'segment'
  with pytest.raises(ValueError, match="backbone_pretrain.task.*'segment'"):
    backbone_pretrain.settings_from_config(c)
