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
    assert batch['image'].shape == (b, size, size, 3)
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
def test_measure_runs_the_train_step():
  config = shapesworld.get_config('smoke')
  result = bench_step.measure(config, num_classes=26, steps=2, warmup=1)
  assert result['step_ms'] > 0 and result['first_step_s'] > 0
  assert np.isfinite(result['final_loss']) and result['final_loss'] > 0
