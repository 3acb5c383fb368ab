"""Open-vocabulary prediction and the evaluation entry point on a trained smoke run."""
import json
import logging
import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from zegformer_jax.data import augment
from zegformer_jax.evaluation import evaluator
from zegformer_jax.modeling import inference
from zegformer_jax.tools import predict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


def test_load_image_applies_exif_orientation(tmp_path):
  """Camera photos store pixels as shot and an EXIF Orientation tag (0x0112); viewers show
  them upright, and so must the prediction."""
  rng = np.random.default_rng(3)
  stored = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)   # as written in the file
  # The EXIF specification's transform of each orientation, from stored to upright pixels.
  upright = {1: stored, 2: stored[:, ::-1], 3: stored[::-1, ::-1], 4: stored[::-1],
             5: stored.transpose(1, 0, 2), 6: np.rot90(stored, -1),
             7: stored[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(stored, 1)}
  for orientation, want in upright.items():
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f'o{orientation}.png'
    Image.fromarray(stored).save(path, exif=exif)
    got = predict.load_image(str(path))
    assert got.shape == want.shape, orientation
    np.testing.assert_array_equal(got, want, err_msg=f'orientation {orientation}')
  # A JPEG from a phone held upright: stored landscape, shown (and segmented) portrait.
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / 'phone.jpg', exif=exif)
  assert predict.load_image(str(tmp_path / 'phone.jpg')).shape == (40, 30, 3)


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


# ----------------------------------------------------------------------------- bounded compiles


def test_bucket_sizes():
  assert [predict.bucket_size(n, 32) for n in (1, 64, 65, 640, 641, 853, 1000, 1138, 2560)] == [
      32, 64, 96, 640, 768, 896, 1024, 1280, 2560]
  for div in (1, 32):
    lengths = {predict.bucket_size(n, div) for n in range(1025, 2049)}
    assert lengths == {1280, 1536, 1792, 2048}                    # 4 per octave
    for n in range(1, 3000):
      b = predict.bucket_size(n, div)
      assert b >= n and b % div == 0 and (b - n) < max(div, n / 4), (n, div, b)


def _bilinear_f64(x, out_hw):
  """torch F.interpolate(mode='bilinear', align_corners=False) of [K, h, w] in float64."""
  def weights(n_in, n_out):
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((n_out, n_in))
    np.add.at(m, (np.arange(n_out), lo), 1 - (src - lo))
    np.add.at(m, (np.arange(n_out), hi), src - lo)
    return m
  wy, wx = weights(x.shape[1], out_hw[0]), weights(x.shape[2], out_hw[1])
  return np.einsum('yh,khw,xw->kyx', wy, x.astype(np.float64), wx)


@pytest.mark.parametrize('k,bucket,in_hw,out_hw', [
    (5, (64, 96), (64, 85), (50, 90)),       # downsampling
    (3, (64, 64), (64, 64), (300, 280)),     # upsampling, several tiles, ragged last ones
    (4, (96, 128), (70, 128), (33, 61)),
    (6, (128, 64), (128, 40), (700, 200))])
def test_upsample_argmax_equals_postprocess_then_argmax(k, bucket, in_hw, out_hw):
  """The tiled resize + argmax of predict = evaluation's inference.postprocess + argmax, and
  the float64 bilinear resize's argmax (pixels whose two best scores are within 1e-5 of each
  other may go either way)."""
  rng = np.random.default_rng(k)
  scores = rng.standard_normal((k,) + bucket).astype(np.float32)
  got = predict.upsample_argmax(jnp.asarray(scores), in_hw, out_hw, tile=64)
  assert got.shape == out_hw and got.dtype == np.int32
  ref = np.asarray(inference.postprocess(jnp.asarray(scores[None]), jnp.asarray([in_hw]),
                                         jnp.asarray([out_hw]), out_hw))[0]
  np.testing.assert_array_equal(got, ref.argmax(0))
  exact = _bilinear_f64(scores[:, :in_hw[0], :in_hw[1]], out_hw)
  top2 = np.sort(exact, axis=0)[-2:]
  clear = top2[1] - top2[0] > 1e-5
  np.testing.assert_array_equal(got[clear], exact.argmax(0)[clear])


def _compilations(records):
  pattern = re.compile(r'Finished XLA compilation of jit\((segment|scores|scores_tta|'
                       r'_upsample_argmax_tile)\)')
  return [m.group(1) for m in (pattern.match(r.getMessage()) for r in records) if m]


@pytest.mark.slow
def test_predict_compiles_per_size_bucket_not_per_image_size(smoke_run, tmp_path, caplog):
  """Six photos of six sizes: one size bucket, so at most one program for the model and one
  for the upsampling (it was one compilation of 12-14 s per distinct image size)."""
  config, workdir = smoke_run
  sizes = [(50, 70), (60, 80), (40, 55), (100, 130), (64, 90), (30, 44)]
  rng = np.random.default_rng(1)
  folder = tmp_path / 'photos'
  folder.mkdir()
  for i, (h, w) in enumerate(sizes):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f'{i}.png')
  buckets = {predict.bucket_shape(augment.resize_shortest_edge_shape(
      h, w, config.input.min_size_test, config.input.max_size_test),
      config.input.size_divisibility) for h, w in sizes}
  assert len(buckets) == 1
  jax.config.update('jax_log_compiles', True)
  try:
    with caplog.at_level(logging.WARNING):
      predict.run(config, workdir, images=str(folder), classes='red circle,sand,sky',
                  output_dir=str(tmp_path / 'out'))
  finally:
    jax.config.update('jax_log_compiles', False)
  compiled = _compilations(caplog.records)
  assert 1 <= len(compiled) <= 2 * len(buckets), compiled
  for i, (h, w) in enumerate(sizes):
    labels = np.asarray(Image.open(tmp_path / 'out' / f'{i}_labels.png'))
    assert labels.shape == (h, w) and labels.max() < 3


# The child's peak resident set. Not getrusage's ru_maxrss here: Linux carries the maxrss of
# the process image an exec replaces into the new one, and subprocess starts the child with
# vfork from pytest's (large) image; VmHWM belongs to the new image alone.
_MAXRSS = """
import pickle, re, sys
config = pickle.load(open(sys.argv[1], 'rb'))
from zegformer_jax.tools import predict
predict.run(config, sys.argv[2], images=sys.argv[3], classes=sys.argv[4], output_dir=sys.argv[5])
with open('/proc/self/status') as f:
  print('MAXRSS_KB', re.search(r'VmHWM:\\s+(\\d+) kB', f.read()).group(1))
"""


@pytest.mark.slow
def test_predict_memory_does_not_grow_with_classes_times_pixels(smoke_run, tmp_path):
  """Peak memory (ru_maxrss of a fresh process) of a 3072 x 2304 photo minus that of a
  64 x 48 one, with 12 classes: it was ~1.3 GB (score maps of K x H x W float32 at the
  photo's resolution, ~105 MB per class), now the tiles and the photo's own arrays."""
  config, workdir = smoke_run
  with open(tmp_path / 'config.pkl', 'wb') as f:
    pickle.dump(config, f)
  rng = np.random.default_rng(2)
  Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(tmp_path / 's.png')
  big = rng.integers(0, 255, (384, 288, 3), dtype=np.uint8)
  Image.fromarray(big).resize((2304, 3072), Image.BILINEAR).save(tmp_path / 'big.jpg')
  names = ','.join(['red circle', 'sand', 'sky', 'grass', 'water', 'blue square', 'wall',
                    'tree', 'road', 'car', 'person', 'a thing'])
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  peak = {}
  for name in ('s.png', 'big.jpg'):
    run = subprocess.run([sys.executable, '-c', _MAXRSS, str(tmp_path / 'config.pkl'), workdir,
                          str(tmp_path / name), names, str(tmp_path / 'out')], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    peak[name] = int(re.search(r'MAXRSS_KB (\d+)', run.stdout).group(1)) / 1024
  assert np.asarray(Image.open(tmp_path / 'out' / 'big_labels.png')).shape == (3072, 2304)
  print(f'peak memory: {peak} MB')
  assert peak['big.jpg'] - peak['s.png'] < 500, peak


# ----------------------------------------------------------------------------- eval progress


@pytest.mark.slow
def test_evaluation_prints_progress(smoke_run, capsys, monkeypatch):
  """A line 'eval <split>: done/total images, N s' at most every EVAL_PROGRESS_S (here 0, so
  the every-tenth-of-the-expected-time rule alone decides), never more than ~10."""
  config, workdir = smoke_run
  monkeypatch.setattr(evaluator, 'EVAL_PROGRESS_S', 0.0)
  evaluator.evaluate(config, workdir, variant='seg', tag='progress')
  lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith('eval ')]
  parsed = [re.fullmatch(r'eval (\S+): (\d+)/(\d+) images, (\d+) s', l) for l in lines]
  assert lines and all(parsed), lines
  done = [int(m.group(2)) for m in parsed]
  assert {int(m.group(3)) for m in parsed} == {config.shapesworld.num_val}
  assert done == sorted(done) and done[-1] < config.shapesworld.num_val and len(lines) <= 11
