"""bench_step: the synthetic batches are valid training targets, and the step runs."""
import numpy as np
import pytest

from configs import shapesworld
from zegformer_jax.tools import bench_step
from zegformer_jax.modeling import criterion


def test_synthetic_batches_are_consistent_targets():
  config = shapesworld.get_config('smoke')
  batches = bench_step.synthetic_batches(config, num_classes=26, n=4)
  b, size, m = config.input.global_batch_size, config.input.crop_size, config.input.max_masks
  counts = set()
  for batch in batches:
    assert batch['image'].shape == (b, size, size, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].shape == (b, size, size)
    assert batch['target_classes'].shape == batch['target_valid'].shape == (b, m)
    masks = np.asarray(criterion.masks_from_label(batch['label'], batch['target_classes'],
                                               batch['target_valid']))
    for i in range(b):
      valid = batch['target_valid'][i]
      k = int(valid.sum())
      counts.add(k)
      assert valid[:k].all() and not valid[k:].any()
      classes = batch['target_classes'][i, :k]
      assert len(set(classes.tolist())) == k and classes.max() < 26
      # Every pixel belongs to exactly one valid target, and every target has pixels.
      assert set(np.unique(batch['label'][i]).tolist()) == set(classes.tolist())
      np.testing.assert_array_equal(masks[i, :k].sum(0), 1)
      assert (masks[i, :k].sum((1, 2)) > 0).all() and masks[i, k:].sum() == 0
  assert len(counts) > 1   # the number of regions varies


@pytest.mark.slow
def test_measure_runs_the_train_step_on_a_fixed_batch(tmp_path):
  """The step runs; XLA's FLOP count and the MFU are reported; a saved batch read back
  gives the same losses (same weights: the config's seed)."""
  config = shapesworld.get_config('smoke')
  with config.unlocked():   # small: five programs are compiled
    config.model.decoder.num_layers = 1
  path = str(tmp_path / 'batch.npz')
  # steps=1, warmup=0: both steps of `a` run its first batch, the one saved.
  a = bench_step.measure(config, num_classes=26, steps=1, warmup=0, save_batch=path,
                         peak_tflops=1.0, split=True)
  assert a['forward_ms'] > 0 and a['backward_ms'] > 0     # the time split was measured
  assert set(a) >= {'matching_and_losses_ms', 'optimiser_and_rest_ms'}
  assert a['step_ms_min'] <= a['step_ms'] <= a['step_ms_max'] and a['first_step_s'] > 0
  assert np.isfinite(a['final_loss']) and a['final_loss'] > 0
  assert a['flops_per_step'] > 1e8                # ~0.4 GFLOP for this model
  assert a['mfu'] == pytest.approx(a['flops_per_step'] / (a['step_ms'] / 1e3) / 1e12, rel=2e-2)
  b = bench_step.measure(config, num_classes=26, steps=1, warmup=0, batch_file=path)
  assert b['final_loss'] == a['final_loss']
  assert a['images_per_s'] == pytest.approx(8 / (a['step_ms'] / 1e3), rel=1e-2)


def test_load_batch_names_what_is_wrong(tmp_path):
  config = shapesworld.get_config('smoke')
  path = str(tmp_path / 'b.npz')
  np.savez(path, image=np.zeros((2, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match=r"b.npz: no \['label', 'target_classes', 'target_valid'\]"):
    bench_step.load_batch(path, config)
  np.savez(path, image=np.zeros((2, 64, 64, 3), np.float32), label=np.zeros((2, 64, 64)),
           target_classes=np.zeros((2, 5)), target_valid=np.zeros((2, 5)))
  with pytest.raises(ValueError,
                     match=r"image \(2, 64, 64, 3\), the config wants \(8, 64, 64, 3\)"):
    bench_step.load_batch(path, config)
