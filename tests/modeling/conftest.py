"""Fixtures shared by the modeling tests."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import shapesworld
from zegformer_jax.modeling import zegformer


@pytest.fixture
def smoke_zegformer():
  """The ShapesWorld smoke config's ZegFormer (test-time augmentation off), randomly
  initialised for 64 x 64 inputs, with 5 random unit text embeddings [5, D] and a
  numpy Generator (seed 1) for the test's batch."""
  config = shapesworld.get_config('smoke')
  config.eval.aug_min_sizes, config.eval.aug_flip = (), False
  model = zegformer.build_model(config.model)
  variables = zegformer.init_variables(model, jax.random.key(0), image_hw=(64, 64),
                                       num_classes=5)
  rng = np.random.default_rng(1)
  text = rng.normal(size=(5, config.model.embed_dim)).astype(np.float32)
  text = jnp.asarray(text / np.linalg.norm(text, axis=1, keepdims=True))
  return types.SimpleNamespace(config=config, model=model, variables=variables, text=text,
                               rng=rng)
