"""Open-vocabulary prediction and the evaluation entry point on a trained smoke run."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from zegformer_jax.evaluation import evaluator
from zegformer_jax.tools import predict


def test_parse_classes(tmp_path):
  assert predict.parse_classes('cat, grass ,sky', None) == ['cat', 'grass', 'sky']
  f = tmp_path / 'names.txt'
  f.write_text('red circle\nbrick wall\n')
  assert predict.parse_classes(None, str(f)) == ['red circle', 'brick wall']
  with pytest.raises(ValueError, match=r"duplicate class name 'cat' at --classes item 3 \(first at --classes item 1\)"):
    predict.parse_classes('cat,dog,cat', None)
  with pytest.raises(ValueError, match='empty class name at --classes item 2'):
    predict.parse_classes('cat,,dog', None)
  f.write_text('cat\n  \ndog\n')
  with pytest.raises(ValueError, match=f'empty class name at {f}:2'):
    predict.parse_classes(None, str(f))
  with pytest.raises(FileNotFoundError, match='nope.txt'):
    predict.parse_classes(None, str(tmp_path / 'nope.txt'))
  with pytest.raises(ValueError, match='exactly one'):
    predict.parse_classes('a', str(f))


def test_list_and_load_images(tmp_path):
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / 'b.png')
  Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(tmp_path / 'a.jpg')
  (tmp_path / 'notes.txt').write_text('x')
  assert predict.list_images(str(tmp_path)) == [str(tmp_path / 'a.jpg'), str(tmp_path / 'b.png')]
  with pytest.raises(FileNotFoundError, match='missing.png'):
    predict.list_images(str(tmp_path / 'missing.png'))
  bad = tmp_path / 'bad.png'
  bad.write_bytes(b'not a png')
  with pytest.raises(ValueError, match='cannot decode image .*bad.png'):
    predict.load_image(str(bad))


def test_shares():
  labels = np.array([[0, 0, 2], [2, 2, 2]])
  s = predict.shares(labels, ['a', 'b', 'c'])
  assert s == [{'name': 'c', 'pixels': 4, 'share': 4 / 6}, {'name': 'a', 'pixels': 2, 'share': 2 / 6}]
  # The overlay pictures themselves: tests/tools/test_overlay.py.
  assert len({tuple(c) for c in predict.palette(30)}) == 30


@pytest.mark.slow
def test_eval_writes_schema(smoke_run):
  config, workdir = smoke_run
  result = evaluator.evaluate(config, workdir, variant='seg')
  with open(os.path.join(workdir, 'metrics_seg.json')) as f:
    on_disk = json.load(f)
  keys = {'dataset', 'variant', 'num_images', 'mIoU', 'mIoU_seen', 'mIoU_unseen', 'hIoU', 'pAcc',
          'mAcc', 'fwIoU', 'per_class'}
  assert keys <= set(on_disk)
  assert on_disk['num_images'] == config.shapesworld.num_val
  assert on_disk['variant'] == 'seg' and on_disk['dataset'] == 'shapesworld'
  assert {tuple(sorted(c)) for c in on_disk['per_class']} == {('Acc', 'IoU', 'name', 'split')}
  assert 0 <= on_disk['pAcc'] <= 100
  assert on_disk['mIoU'] == pytest.approx(result['mIoU'])


@pytest.mark.slow
def test_variants_in_one_pass_equal_separate_evaluations(smoke_run):
  config, workdir = smoke_run
  together = evaluator.evaluate_variants(config, workdir, ('seg', 'img', 'full'), tag='joint')
  for v in ('seg', 'img', 'full'):
    alone = evaluator.evaluate(config, workdir, variant=v, tag='alone')
    assert together[v]['variant'] == v
    assert [c['IoU'] for c in together[v]['per_class']] == [c['IoU'] for c in alone['per_class']]
    assert together[v]['pAcc'] == alone['pAcc']
  assert together['seg']['pAcc'] != together['img']['pAcc']  # the variants do differ


@pytest.mark.slow
def test_predict_end_to_end(smoke_run, tmp_path):
  config, workdir = smoke_run
  rng = np.random.default_rng(0)
  for name, (h, w) in {'x.png': (64, 64), 'y.jpg': (50, 90)}.items():
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
  out = tmp_path / 'out'
  res = predict.run(config, workdir, images=f'{tmp_path / "x.png"},{tmp_path / "y.jpg"}',
                    classes='red circle,sand,a thing never seen', output_dir=str(out))
  assert len(res) == 2
  labels = np.asarray(Image.open(out / 'y_labels.png'))
  assert labels.shape == (50, 90) and labels.max() < 3
  with open(out / 'y.json') as f:
    rec = json.load(f)
  assert sum(c['pixels'] for c in rec['classes']) == 50 * 90
  assert rec['classes'] == predict.shares(labels, ['red circle', 'sand', 'a thing never seen'])
  assert (out / 'x_overlay.png').exists()


@pytest.mark.slow
def test_eval_and_predict_with_test_time_augmentation(smoke_run, tmp_path):
  """Multi-scale + flip views run end to end (their arithmetic: tests/modeling/test_tta.py)."""
  config, workdir = smoke_run
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.eval.aug_min_sizes = (56, 80)
    config.eval.aug_flip = True
  result = evaluator.evaluate(config, workdir, variant='seg', tag='tta')
  assert result['test_views'] == [{'min_size': 56, 'flip': False}, {'min_size': 56, 'flip': True},
                                  {'min_size': 80, 'flip': False}, {'min_size': 80, 'flip': True}]
  assert result['num_images'] == config.shapesworld.num_val and 0 <= result['pAcc'] <= 100
  assert os.path.exists(os.path.join(workdir, 'metrics_seg_tta.json'))
  Image.fromarray(np.zeros((50, 90, 3), np.uint8)).save(tmp_path / 'z.png')
  predict.run(config, workdir, images=str(tmp_path / 'z.png'), classes='sand,sky',
              output_dir=str(tmp_path / 'out'))
  assert np.asarray(Image.open(tmp_path / 'out' / 'z_labels.png')).shape == (50, 90)
