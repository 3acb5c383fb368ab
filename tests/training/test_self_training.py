"""Self-training (the transductive setting): pseudo-labels by hand, and a run through main."""
import json
import os

import numpy as np
import pytest

import cli_runs
from configs import shapesworld
from zegformer_jax.data import input_pipeline
from zegformer_jax.data import tfrecord
from zegformer_jax.modeling import methods
from zegformer_jax.projects.shapesworld import world
from zegformer_jax.training import self_training

I = 255


def test_pseudo_labels_by_hand():
  # Classes 0, 1 seen; 2, 3 unseen. Row 0 is labelled (kept as it is); rows 1-2 unlabelled.
  label = np.array([[0, 1, 0, 1],
                    [I, I, I, I],
                    [I, I, I, I]])
  pred = np.array([[2, 2, 3, 3],      # predictions on labelled pixels never count
                   [2, 2, 2, 2],
                   [3, 3, 1, 0]])     # seen predictions on unlabelled pixels: no label
  score = np.array([[9, 9, 9, 9],
                    [0.1, 0.4, 0.3, 0.2],
                    [0.5, 0.7, 0.9, 0.9]])
  unseen = np.array([False, False, True, True])
  got = self_training.pseudo_labels(label, pred, score, unseen, I, fraction=0.5)
  # Class 2: candidates score 0.1, 0.4, 0.3, 0.2 -> the top half (0.4, 0.3) kept.
  # Class 3: candidates 0.5, 0.7 -> top half = the 0.7 one.
  want = np.array([[0, 1, 0, 1],
                   [I, 2, 2, I],
                   [I, 3, I, I]])
  np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(
      self_training.pseudo_labels(label, pred, score, unseen, I, fraction=1.0)[1:],
      [[2, 2, 2, 2], [3, 3, I, I]])
  np.testing.assert_array_equal(
      self_training.pseudo_labels(label, pred, score, unseen, I, fraction=0.0), label)


@pytest.mark.slow
@pytest.mark.parametrize('method', ['spnet_fpn', 'zegclip'])
def test_self_training_run_through_main(tmp_path, smoke_resources, compile_cache, method):
  """A source (SPNet-FPN; ZegCLIP, whose transductive mode this is) on a world whose training
  images hold unseen objects (ignored), then a self-training run from it: pseudo-labelled
  data, more classes, evaluation as usual."""
  data = str(tmp_path / 'data')
  world.generate(data, seed=0, num_train=64, num_val=16, unseen_in_train='ignored')
  config = f'configs/shapesworld.py:{method},smoke'

  def args(workdir, *overrides, mode='train_and_eval'):
    a = cli_runs.main_args(workdir, smoke_resources, f'--config.dataset.data_dir={data}',
                           *overrides, mode=mode)
    a[a.index(cli_runs.SMOKE)] = config
    return a

  source = str(tmp_path / 'source')
  r = cli_runs.run(args(source, mode='train'), compile_cache)
  assert r.returncode == 0, cli_runs.tail(r.stdout + r.stderr)
  target = str(tmp_path / 'self_trained')
  r = cli_runs.run(args(target, f'--config.self_training.source_workdir={source}',
                        '--config.self_training.fraction=0.5'), compile_cache)
  assert r.returncode == 0, cli_runs.tail(r.stdout + r.stderr)
  assert 'unseen-class pseudo-labels in 64 training images' in r.stdout
  st_dir = os.path.join(target, self_training.DATA_DIR)
  info = tfrecord.read_dataset_info(st_dir)
  names, seen = input_pipeline.dataset_classes(st_dir, 'train')
  assert len(names) == 32 and seen.sum() == 26          # the training vocabulary is all classes
  stats = info['self_training']
  assert stats['images'] == 64 and stats['source_workdir'] == source
  # Every pseudo-label sits on a pixel the ground truth leaves unlabelled; every seen label
  # is the ground truth's, mapped to the all-class ids.
  orig_names, _ = input_pipeline.dataset_classes(data, 'train')
  to_all = {i: names.index(n) for i, n in enumerate(orig_names)}
  pseudo = 0
  for sh_new, sh_old in zip(sorted(os.listdir(st_dir)), sorted(os.listdir(data))):
    if not sh_new.startswith('train.tfrecord'):
      continue
    for a, b in zip(tfrecord.read_records(os.path.join(st_dir, sh_new)),
                    tfrecord.read_records(os.path.join(data, sh_old))):
      new, old = tfrecord.decode_example(a)['label'], tfrecord.decode_example(b)['label']
      labelled = old != I
      np.testing.assert_array_equal(new[labelled], np.vectorize(to_all.get)(old[labelled]))
      p = (~labelled) & (new != I)
      assert not seen[new[p]].any()
      pseudo += int(p.sum())
  assert pseudo == stats['pseudo_pixels']
  assert os.path.islink(os.path.join(st_dir, sorted(
      f for f in os.listdir(st_dir) if f.startswith('val_all'))[0]))
  m = json.load(open(os.path.join(target, 'metrics_seg.json')))
  assert len(m['per_class']) == 32
  assert json.load(open(os.path.join(target, 'config.json')))['self_training'][
      'source_workdir'] == source


def test_a_method_with_class_sized_params_is_refused(tmp_path):
  config = shapesworld.get_config('zs3net,smoke')
  with pytest.raises(ValueError, match="method 'zs3net' has class-sized params"):
    self_training.make_pseudo_labelled_data(config, str(tmp_path))
  assert [methods.has_class_sized_params(shapesworld.get_config(m).model)
          for m in methods.METHODS] == [False, False, True, False]
