"""ZS3Net's generative stage: MMD, generator training, classifier refit, feature sampling."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from zegformer_jax.modeling import gmmn
from zegformer_jax.training import generative

SIGMAS = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


def _mmd_np(x, y, sigmas):
  """sqrt(sum_v MMD_v^2), biased, float64, written from the definition (pairwise loops)."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)

  def mean_k(a, b, v):
    return np.mean([[np.exp(-np.sum((p - q) ** 2) / (2 * v)) for q in b] for p in a])

  return np.sqrt(sum(mean_k(x, x, v) + mean_k(y, y, v) - 2 * mean_k(x, y, v)
                     for v in sigmas))


def test_mmd_matches_float64_definition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(7, 5))
  y = rng.normal(loc=0.7, size=(9, 5)) * 1.5
  got = float(gmmn.mmd(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), SIGMAS))
  assert got == pytest.approx(_mmd_np(x, y, SIGMAS), rel=1e-4)


def test_mmd_weights_select_samples():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(6, 3))
  y = rng.normal(size=(8, 3))
  wx = np.array([1, 1, 0, 1, 0, 1], np.float32)
  got = float(gmmn.mmd(jnp.asarray(x), jnp.asarray(y), SIGMAS, real_weights=jnp.asarray(wx)))
  assert got == pytest.approx(_mmd_np(x[wx > 0], y, SIGMAS), rel=1e-4)


def test_mmd_of_a_sample_with_itself_is_zero():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 4)), jnp.float32)
  assert float(gmmn.mmd(x, x, SIGMAS)) < 1e-3


def test_class_conditional_mmd_averages_valid_classes():
  rng = np.random.default_rng(3)
  real = rng.normal(size=(3, 6, 2))
  fake = rng.normal(size=(3, 6, 2)) + 1
  valid = np.array([True, False, True])
  got = float(gmmn.class_conditional_mmd(jnp.asarray(real), jnp.asarray(fake),
                                         jnp.asarray(valid), SIGMAS))
  want = np.mean([_mmd_np(real[i], fake[i], SIGMAS) for i in (0, 2)])
  assert got == pytest.approx(want, rel=1e-4)


def _config(**zs3):
  c = ml_collections.ConfigDict({'seed': 0, 'zs3net': common.zs3net_config()})
  c.zs3net.update(zs3)
  return c


def _mixture(rng, num_classes=4, per_class=200, dim=8):
  """Class k: a Gaussian around mean_k; embeddings are noisy codes of the means."""
  means = rng.normal(size=(num_classes, dim)) * 3
  feats = means[:, None] + rng.normal(size=(num_classes, per_class, dim)) * 0.5
  emb = np.concatenate([means / 3, rng.normal(size=(num_classes, 4)) * 0.1], axis=1)
  return feats.astype(np.float32), emb.astype(np.float32), means


def test_generator_training_reduces_mmd_on_a_gaussian_mixture():
  rng = np.random.default_rng(4)
  feats, emb, _ = _mixture(rng)
  counts = np.full(4, feats.shape[1])
  config = _config(generator_steps=300, generator_batch=64, generator_classes=4,
                   generator_lr=3e-3, noise_dim=8, hidden_dim=64, dropout=0.0)
  params, stats = generative.train_generator(config, feats, counts, emb, seed=0)
  assert stats['steps'] == 300
  assert stats['mmd_last'] < 0.5 * stats['mmd_first']
  fake = generative.generate(config, params, emb, 64, feats.shape[-1], seed=1)
  # Each class's samples sit closer (MMD) to their own class than to any other.
  d = np.array([[_mmd_np(feats[i, :64], fake[j], SIGMAS[:3]) for j in range(4)]
                for i in range(4)])
  assert (np.argmin(d, axis=1) == np.arange(4)).all()


def test_refit_classifier_separates_unseen_classes_from_generated_features():
  """Classes 0-1 seen (real features), 2-3 unseen: the generator learnt the embedding ->
  feature map on the seen ones only; the refit classifier labels held-out real features of
  the unseen classes right."""
  rng = np.random.default_rng(5)
  dim = 6
  a = rng.normal(size=(dim, dim))
  emb = rng.normal(size=(4, dim)).astype(np.float32)
  means = emb @ a                                   # a linear embedding -> feature map
  # Many seen classes teach the map; classes 20 and 21 play the unseen ones.
  seen_emb = rng.normal(size=(20, dim)).astype(np.float32)
  seen_feats = (seen_emb @ a)[:, None] + rng.normal(size=(20, 100, dim)) * 0.3
  config = _config(generator_steps=600, generator_batch=64, generator_classes=8,
                   generator_lr=3e-3, noise_dim=4, hidden_dim=64, dropout=0.0)
  params, _ = generative.train_generator(config, seen_feats.astype(np.float32),
                                         np.full(20, 100), seen_emb, seed=0)
  fake = generative.generate(config, params, emb[2:], 200, dim, seed=1)
  real = means[:2, None] + rng.normal(size=(2, 200, dim)) * 0.3
  x = np.concatenate([real[0], real[1], fake[0], fake[1]])
  y = np.repeat(np.arange(4), 200)
  clf = generative.fit_classifier(x, y, 4, steps=500, batch=256, lr=1e-2, seed=0)
  test = means[:, None] + rng.normal(size=(4, 100, dim)) * 0.3
  pred = np.argmax(test @ clf['kernel'] + clf['bias'], axis=-1)
  acc = (pred == np.arange(4)[:, None]).mean(axis=1)
  assert acc[2] > 0.8 and acc[3] > 0.8, acc
  assert acc[0] > 0.9 and acc[1] > 0.9, acc


def test_fit_classifier_learns_a_separable_problem():
  rng = np.random.default_rng(6)
  x = np.concatenate([rng.normal(size=(50, 2)) + [4, 0], rng.normal(size=(50, 2)) - [4, 0]])
  y = np.repeat([0, 1], 50)
  clf = generative.fit_classifier(x, y, 2, steps=200, batch=32, lr=0.05, seed=0)
  assert clf['kernel'].shape == (2, 2) and clf['bias'].shape == (2,)
  assert ((x @ clf['kernel'] + clf['bias']).argmax(-1) == y).mean() > 0.97


def test_feature_cell_labels_by_hand():
  label = np.arange(16 * 16).reshape(16, 16)
  # Image resized from 16 x 16 to 32 x 32 and padded to 40 x 40: grid 10 x 10, cells of the
  # 8 x 8 valid ones at centres 2, 6, ..., 30 -> label rows (2*16)//32 = 1, 3, ..., 15.
  cells = generative.feature_cell_labels(label, (16, 16), (32, 32), (10, 10))
  want_idx = np.arange(1, 16, 2)
  np.testing.assert_array_equal(cells[:8, :8], label[want_idx][:, want_idx])
  assert (cells[8:] == -1).all() and (cells[:, 8:] == -1).all()


def test_reservoir_keeps_a_uniform_sample():
  r = generative.Reservoir(num_classes=2, capacity=100, dim=1, seed=0)
  r.add(0, np.arange(1000, dtype=np.float32)[:, None])
  r.add(1, np.arange(30, dtype=np.float32)[:, None])
  np.testing.assert_array_equal(r.counts(), [100, 30])
  kept = r.data[0, :, 0]
  assert len(set(kept.tolist())) == 100
  assert 350 < kept.mean() < 650             # uniform over 0..999: mean 499.5, sd ~29
  np.testing.assert_array_equal(r.data[1, :30, 0], np.arange(30))


def test_eval_params_before_the_stage(tmp_path):
  params = {'classifier': {'kernel': jnp.arange(12.0).reshape(4, 3),
                           'bias': jnp.asarray([0.0, 1.0, 2.0])}}
  out = generative.eval_params(_config(), str(tmp_path), params, ['c', 'a'], ['a', 'b', 'c'])
  np.testing.assert_array_equal(np.asarray(out['classifier']['kernel']),
                                np.arange(12.0).reshape(4, 3)[:, [2, 0]])
  with pytest.raises(FileNotFoundError, match='generative stage runs at the end of training'):
    generative.eval_params(_config(), str(tmp_path), params, ['a', 'new'], ['a', 'b', 'c'])


def test_load_stage_refuses_garbage(tmp_path):
  d = tmp_path / 'zs3net'
  d.mkdir()
  (d / 'generator.npz').write_bytes(b'<html>not an npz</html>')
  with pytest.raises(ValueError, match='not a readable ZS3Net generator file'):
    generative.load_stage(str(tmp_path))
