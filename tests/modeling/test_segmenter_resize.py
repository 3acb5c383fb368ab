"""config.eval.resize_impl: the scores of a whole forward pass with either resize."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zegformer_jax.modeling import segmenter


def test_taps_and_matmul_give_the_same_scores(smoke_zegformer):
  z = smoke_zegformer
  config, model, variables, text = z.config, z.model, z.variables, z.text
  assert config.eval.resize_impl == 'matmul'   # the demo's numbers
  # Mask logits at stride 4 up to 64 x 64; then the valid 48 x 60 region up to a 70 x 75
  # label, and a whole image down to 40 x 50 (the padded label batch is 70 x 75).
  batch = {'image': jnp.asarray(z.rng.uniform(0, 255, (2, 64, 64, 3)), jnp.float32),
           'image_hw': jnp.asarray([[48, 60], [64, 64]], jnp.int32),
           'label_hw': jnp.asarray([[70, 75], [40, 50]], jnp.int32)}
  out = {}
  for impl in ('matmul', 'taps'):
    config.eval.resize_impl = impl
    fn = segmenter.make_scores_fn(config, model, ('seg',), (70, 75), with_masks=True)
    out[impl] = jax.jit(fn)(variables['params'], variables['frozen'], batch, text,
                            jnp.ones(5, bool), None, None)
  for key in ('seg', 'masks'):
    a, b = np.asarray(out['matmul'][key]), np.asarray(out['taps'][key])
    assert a.shape == b.shape == (2,) + a.shape[1:2] + (70, 75)
    for i, (lh, lw) in enumerate([(70, 75), (40, 50)]):
      scale = np.abs(a[i, :, :lh, :lw]).max()
      np.testing.assert_allclose(b[i, :, :lh, :lw], a[i, :, :lh, :lw], rtol=0,
                                 atol=2e-6 * scale)
      assert np.isfinite(b[i]).all()
  config.eval.resize_impl = 'nearest'
  with pytest.raises(ValueError, match="config.eval.resize_impl must be one of .*'nearest'"):
    segmenter.make_scores_fn(config, model, ('seg',), (70, 75))
