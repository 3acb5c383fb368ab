"""The evaluation protocols end to end on the smoke model: GZS3 and ZS3, cross-dataset
targets, boundary F and the oracles, all through `evaluator.evaluate_settings`."""
import json
import os

import numpy as np
import pytest

from zegformer_jax.data import input_pipeline
from zegformer_jax.evaluation import evaluator
from zegformer_jax.projects.shapesworld import world

pytestmark = pytest.mark.slow


def _with(config, **fields):
  c = config.copy_and_resolve_references()
  with c.unlocked():
    for key, value in fields.items():
      node = c
      *parents, leaf = key.split('.')
      for p in parents:
        node = node[p]
      node[leaf] = value
  return c


def test_settings_are_parsed_and_checked():
  assert evaluator.check_settings('gzs3') == ('gzs3',)
  assert evaluator.check_settings('gzs3, zs3,gzs3') == ('gzs3', 'zs3')
  with pytest.raises(ValueError, match="one or more of \\('gzs3', 'zs3'\\)"):
    evaluator.check_settings('zs4')


def test_seen_by_name_matches_synonyms():
  got = evaluator.seen_by_name(['building, edifice', 'sky', 'red star', 'tree'],
                               ['sky', 'edifice', 'red circle'])
  np.testing.assert_array_equal(got, [True, True, False, False])


def test_gzs3_and_zs3_with_boundaries_and_oracles(smoke_run, tmp_path):
  config, workdir = smoke_run
  out = str(tmp_path)
  for f in os.listdir(os.path.join(workdir, 'text_embeddings')):   # reuse the cached embeddings
    os.makedirs(os.path.join(out, 'text_embeddings'), exist_ok=True)
    os.link(os.path.join(workdir, 'text_embeddings', f), os.path.join(out, 'text_embeddings', f))
  config = _with(config, **{'eval.setting': 'gzs3,zs3', 'eval.boundary': True,
                            'eval.oracles': True})
  _, state = evaluator.load_trained_state(config, workdir)
  results = evaluator.evaluate_settings(config, out, ('seg', 'full'), state=state)
  data_dir = config.dataset.data_dir
  all_names, all_seen = input_pipeline.dataset_classes(data_dir, 'val_all')
  unseen_names = [n for n, s in zip(all_names, all_seen) if not s]

  gzs3, zs3 = results['gzs3'], results['zs3']
  # ZS3: the vocabulary is the unseen classes only; no seen mean, no harmonic mean.
  for v in ('seg', 'full'):
    assert [c['name'] for c in zs3[v]['per_class']] == unseen_names
    assert zs3[v]['mIoU_seen'] is None and zs3[v]['hIoU'] is None
    assert zs3[v]['setting'] == 'zs3' and gzs3[v]['setting'] == 'gzs3'
    assert zs3[v]['mIoU'] == zs3[v]['mIoU_unseen']
    with open(os.path.join(out, f'metrics_{v}_zs3.json')) as f:
      assert json.load(f)['mIoU'] == zs3[v]['mIoU']
    assert os.path.isfile(os.path.join(out, f'metrics_{v}_zs3.png'))
    for r in (gzs3[v], zs3[v]):
      b = r['boundary']
      assert 0 <= b['R_b'] <= 100
      if b['P_b'] is None:   # a (barely trained) model that predicts no boundary at all
        assert b['R_b'] == 0 and b['F_b'] == 0
      elif b['P_b'] + b['R_b'] > 0:
        assert b['F_b'] == pytest.approx(2 * b['P_b'] * b['R_b'] / (b['P_b'] + b['R_b']))
  # With Eq. 3 fusion and without calibration, 'full' changes classes, not the grouping.
  assert gzs3['seg']['oracles']['grouping'] == gzs3['full']['oracles']['grouping']
  for r in (gzs3['seg'], zs3['seg']):
    for oracle in ('grouping', 'classification'):
      assert 0 <= r['oracles'][oracle]['mIoU'] <= 100


def test_cross_dataset_on_the_training_world_reproduces_gzs3(smoke_run, tmp_path):
  """eval.data_dir at the training world itself: the same numbers as the default path."""
  config, workdir = smoke_run
  out = str(tmp_path)
  _, state = evaluator.load_trained_state(config, workdir)
  base = evaluator.evaluate_variants(config, out, ('seg',), state=state)['seg']
  cross = evaluator.evaluate_variants(
      _with(config, **{'eval.data_dir': config.dataset.data_dir, 'eval.name': 'same'}),
      out, ('seg',), state=state)['seg']
  assert os.path.isfile(os.path.join(out, 'metrics_seg_same.json'))
  for key in ('mIoU', 'mIoU_seen', 'mIoU_unseen', 'pAcc', 'per_class'):
    assert cross[key] == base[key], key


def test_trained_on_one_split_evaluated_with_another_splits_classes(smoke_run, tmp_path):
  config, workdir = smoke_run
  alt = str(tmp_path / 'alt_world')
  world.generate(alt, seed=5, split='alt', num_train=8, num_val=8, image_size=64,
                 unseen_in_train='absent')
  _, state = evaluator.load_trained_state(config, workdir)
  result = evaluator.evaluate_variants(
      _with(config, **{'eval.data_dir': alt}), str(tmp_path), ('seg',), state=state)['seg']
  alt_names, _ = input_pipeline.dataset_classes(alt, 'val_all')
  trained, _ = input_pipeline.dataset_classes(config.dataset.data_dir, 'train')
  assert [c['name'] for c in result['per_class']] == alt_names
  # Seen means "a class the model was trained on", not the other world's own split.
  assert [c['split'] == 'seen' for c in result['per_class']] == [n in trained for n in alt_names]
  assert result['trained_on'] == 'shapesworld' and result['num_images'] == 8
  assert os.path.isfile(os.path.join(str(tmp_path), 'metrics_seg_shapesworld.json'))
