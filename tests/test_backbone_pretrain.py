"""ShapesWorld's ImageNet stand-in: image-level backbone pretraining, BN folding, init_from."""
import json
import math
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import shapesworld
from zegformer_jax import backbone_pretrain
from zegformer_jax import convert
from zegformer_jax import resources
from zegformer_jax.models import zegformer


def _settings(steps=30):
  c = shapesworld.get_config('smoke')
  c.backbone_pretrain.steps = steps
  c.backbone_pretrain.batch_size = 16
  c.backbone_pretrain.pool_per_class = 4
  c.backbone_pretrain.eval_per_class = 2
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
  meta = convert.read_meta(path)
  assert meta['source_format'] == 'shapesworld-pretrain'
  assert meta['covers'] == ['params/backbone', 'frozen/backbone']


def test_init_from_loads_the_pretrained_backbone_into_zegformer(pretrained):
  c, s, path, _ = pretrained
  model = zegformer.build_model(c.model)
  v = zegformer.init_variables(model, jax.random.key(0), (64, 64), 26)
  params, frozen = convert.load_params(path, v['params'], v['frozen'])
  saved = convert.checkpoint_shapes(path)
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
  assert resources.init_from(c, str(tmp_path)) == ''
  assert not os.path.exists(tmp_path / 'backbone')
  c.train.init_from = '/some/converted/dir'
  assert resources.init_from(c, str(tmp_path)) == '/some/converted/dir'
