"""Tests of zegformer_jax.clip_pretrain: the miniature CLIP of ShapesWorld.

Oracles are independent of the code under test: shapesworld.render_class_crop for the
pictures, inference.subimages / mask_boxes (the evaluation's own sub-images) for the
cropmask crops, a loop-by-loop numpy InfoNCE for the loss, models.clip.load_clip for the
saved directory. Pretraining runs are tiny (a few steps, a handful of examples per class):
they check the plumbing, not the accuracy.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from configs import shapesworld as shapesworld_config
from zegformer_jax.projects.shapesworld import world as sw
from zegformer_jax.projects.shapesworld import clip_pretrain as cp
from zegformer_jax.modeling import inference
from zegformer_jax.projects.shapesworld import prepare
from zegformer_jax.modeling import clip

# A run small enough for tests: 32-px images, 16 steps of 8 pairs.
TINY = dict(world_split='default', seed=3, steps=16, batch_size=8, lr=3e-3, image_size=32,
            pool_per_class=4, eval_per_class=1)


@pytest.fixture(scope='module')
def smoke_clip(tmp_path_factory):
  """(config, workdir, stats) after prepare.clip_dir with the smoke config."""
  config = shapesworld_config.get_config('smoke')
  workdir = str(tmp_path_factory.mktemp('clip_run'))
  path = prepare.mini_clip_dir(config, workdir)
  assert path == os.path.join(workdir, 'clip')
  return config, workdir, cp.read_stats(path)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """(path, stats) of a TINY pretraining."""
  path = str(tmp_path_factory.mktemp('tiny') / 'clip')
  return path, cp.pretrain_mini_clip(path, **TINY)


# ---------------------------------------------------------------------------- rendering


@pytest.mark.parametrize('name', ['red star', 'blue ring', 'yellow cross', 'brick wall', 'sky'])
def test_class_example_is_render_class_crop_with_its_mask(name):
  image, mask = cp.render_class_example(name, np.random.default_rng(7), 48)
  want = sw.render_class_crop(name, np.random.default_rng(7), 48)
  np.testing.assert_array_equal(image, want)
  assert mask.shape == (48, 48) and mask.dtype == bool
  assert 0.05 < mask.mean() < 0.97
  if name in sw.THINGS:
    # The thing is painted exactly where the mask is: its colour dominates inside only.
    rgb = np.asarray(sw.COLOURS[name.split(' ')[0]], np.float32)
    dist = np.linalg.norm(image.astype(np.float32) - rgb, axis=-1)
    assert np.median(dist[mask]) < np.median(dist[~mask])


def test_perturbed_mask_stays_close_and_non_empty():
  rng = np.random.default_rng(0)
  mask = np.zeros((20, 20), bool)
  mask[5:9, 6:12] = True
  grown = np.zeros((20, 20), bool)
  grown[4:10, 5:13] = True   # one 8-neighbourhood step, a superset of one 4-step dilation
  for _ in range(20):
    out = cp.perturb_mask(mask, rng)
    assert out.any() and not (out & ~grown).any()
    assert (out & mask).sum() >= (mask.sum() - 2 * (4 + 6))   # at most one ring eroded
  single = np.zeros((5, 5), bool)
  single[2, 2] = True
  for _ in range(10):   # eroding a single pixel would empty it: kept instead
    assert cp.perturb_mask(single, rng).any()


# ---------------------------------------------------------------------------- sub-images


def test_mask_box_matches_inference():
  rng = np.random.default_rng(1)
  masks = rng.uniform(size=(6, 12, 10)) > 0.93
  masks[3] = False                      # empty: the whole image
  masks[4] = False
  masks[4, 5, 2:7] = True               # a single row: the whole image
  want = np.asarray(inference.mask_boxes(jnp.asarray(masks)))
  got = np.asarray([cp.mask_box(m) for m in masks], np.float32)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('style', ['cropmask', 'crop'])
def test_subimages_match_inference(style):
  rng = np.random.default_rng(2)
  n, h, w, out = 5, 24, 20, 16
  images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
  masks = np.zeros((n, h, w), bool)
  masks[0, 3:10, 4:15] = True
  masks[1, 12:23, 1:6] = True
  masks[2] = rng.uniform(size=(h, w)) > 0.7
  masks[3, 5, 5] = True                 # degenerate box
  masks[4, 2:22:3, 2:18:4] = True       # scattered pixels
  norm = cp.normalize(images)
  logits = np.where(masks, 10.0, -10.0).astype(np.float32)[:, None]   # [N, 1, H, W]
  want = np.asarray(inference.subimages(jnp.asarray(norm), jnp.asarray(logits), style, out))
  got = cp.subimages(images, masks, out, style == 'cropmask', chunk=2)
  np.testing.assert_allclose(got, want[:, 0], atol=1e-4)
  # The uint8 form is the same picture, denormalised (CLIP mean colour outside the mask).
  as_uint8 = cp.subimages(images, masks, out, style == 'cropmask', as_uint8=True)
  np.testing.assert_allclose(cp.normalize(as_uint8), got, atol=0.51 / 66)


def test_render_pool_is_balanced_and_deterministic():
  kw = dict(seed=5, stream=99, image_size=32, mix=(1, 1, 1, 1))
  names = ['red star', 'green ring', 'sand', 'sky']
  pool = cp.render_pool(names, 8, **kw)
  assert pool['images'].shape == (32, 32, 32, 3) and pool['images'].dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(pool['labels']), [8] * 4)
  np.testing.assert_array_equal(np.bincount(pool['kinds']), [8] * 4)
  again = cp.render_pool(names, 8, **kw)
  for k in pool:
    np.testing.assert_array_equal(pool[k], again[k])


def test_batches_hold_each_class_at_most_once_when_they_can():
  k, t, length = 5, 3, 4
  pool = {'images': np.zeros((k * 2, 8, 8, 3), np.uint8),
          'labels': np.repeat(np.arange(k, dtype=np.int32), 2), 'kinds': np.zeros(k * 2)}
  ids = np.arange(k * t * length, dtype=np.int32).reshape(k, t, length)
  sampler = cp.BatchSampler(pool, ids, np.ones_like(ids), np.random.default_rng(0))
  for _ in range(5):
    images, bids, _, labels = sampler(4)
    assert len(set(labels.tolist())) == 4 and images.shape == (4, 8, 8, 3)
    # Each caption belongs to its example's class.
    assert all(row[0] // (t * length) == c for row, c in zip(bids, labels))
  _, _, _, labels = sampler(12)   # 12 > 5 classes: counts differ by at most one
  counts = np.bincount(labels, minlength=k)
  assert counts.max() - counts.min() <= 1


# ---------------------------------------------------------------------------- loss


def _infonce_numpy(img, txt, logit_scale, labels):
  """Loop-by-loop symmetric InfoNCE; same-class pairs share the target mass."""
  img, txt = np.asarray(img, np.float64), np.asarray(txt, np.float64)
  logits = np.exp(logit_scale) * img @ txt.T
  b = len(labels)
  total = 0.0
  for direction in (logits, logits.T):
    for i in range(b):
      row = direction[i]
      log_p = row - (row.max() + np.log(np.exp(row - row.max()).sum()))
      positives = [j for j in range(b) if labels[j] == labels[i]]
      total += -sum(log_p[j] for j in positives) / len(positives) / b
  return total / 2


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_contrastive_loss_against_numpy():
  rng = np.random.default_rng(0)
  img = _unit(rng.normal(size=(7, 5)))
  txt = _unit(rng.normal(size=(7, 5)))
  for labels in ([0, 1, 2, 3, 4, 5, 6], [0, 1, 0, 2, 1, 0, 3]):
    got = cp.contrastive_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                              jnp.float32(2.3), jnp.asarray(labels))
    np.testing.assert_allclose(float(got), _infonce_numpy(img, txt, 2.3, labels), rtol=1e-5)
  # Distinct labels: CLIP's own loss (one-hot targets on the diagonal).
  logits = np.exp(2.3) * img @ txt.T
  lse = lambda x, ax: np.log(np.exp(x).sum(ax))
  clip_loss = 0.5 * (np.mean(lse(logits, 1) - np.diag(logits)) +
                     np.mean(lse(logits, 0) - np.diag(logits)))
  got = cp.contrastive_loss(jnp.asarray(img), jnp.asarray(txt), jnp.float32(2.3),
                            jnp.arange(7))
  np.testing.assert_allclose(float(got), clip_loss, rtol=1e-5)


def test_loss_decreases_on_a_fixed_batch(tiny_run):
  path, _ = tiny_run
  model, tokenizer = clip.load_clip(path)
  names = ['red star', 'green ring', 'blue square', 'yellow circle', 'sand', 'wood']
  pool = cp.render_pool(names, 1, seed=0, stream=50, image_size=32, mix=(1, 0, 0, 0))
  ids, mask = cp._caption_tokens(tokenizer, names, cp.caption_templates()[:2], 32)
  images = jnp.asarray(cp.normalize(pool['images']))
  labels = jnp.asarray(pool['labels'])
  ids, mask = jnp.asarray(ids[:, 0]), jnp.asarray(mask[:, 0])
  params = cp.clip_init(model.params, model.config, 0)
  tx = cp.make_optimizer(params, 3e-3, 40, 4)
  step = cp.make_train_step(model, tx)
  opt_state = tx.init(params)
  losses = []
  for _ in range(40):
    params, opt_state, metrics = step(params, opt_state, images, ids, mask, labels)
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.25 * losses[0], losses
  assert np.mean(losses[-5:]) < 0.25 * np.mean(losses[:5]), losses
  assert float(jnp.exp(params['logit_scale'])) <= 100.0 + 1e-3


# ---------------------------------------------------------------------------- saved model


def test_pretraining_saves_a_loadable_clip_with_stats(tiny_run):
  path, stats = tiny_run
  model, tokenizer = clip.load_clip(path)
  assert model.config.vision_config.image_size == 32
  emb = clip.image_embeddings(model, np.zeros((2, 32, 32, 3), np.float32))
  assert emb.shape == (2, model.config.projection_dim)
  text = clip.text_embeddings(model, tokenizer, ['red star', 'brick wall'],
                              clip.prompt_templates('select_clip'))
  assert text.shape == (2, model.config.projection_dim)
  assert json.load(open(os.path.join(path, cp.STATS_FILE))) == json.loads(json.dumps(stats))
  assert stats['settings']['steps'] == TINY['steps'] and len(stats['classes']) == 32
  for kind in cp.EVAL_KINDS:
    acc = stats['zero_shot_accuracy'][kind]
    assert acc['n'] == 32 and all(0.0 <= acc[s] <= 1.0 for s in ('all', 'seen', 'unseen'))
  # Nothing is left beside the model directory.
  assert os.listdir(os.path.dirname(path)) == ['clip']


def test_pretraining_is_deterministic(tiny_run, tmp_path):
  path, stats = tiny_run
  again = cp.pretrain_mini_clip(str(tmp_path / 'clip'), **TINY)
  assert again['zero_shot_accuracy'] == stats['zero_shot_accuracy']
  assert again['history'] == stats['history']
  a = flatten_dict(clip.load_clip(path)[0].params)
  b = flatten_dict(clip.load_clip(str(tmp_path / 'clip'))[0].params)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))


def test_clip_dir_pretrains_once_then_reuses(smoke_clip, monkeypatch):
  config, workdir, stats = smoke_clip
  path = os.path.join(workdir, 'clip')
  assert stats['settings']['steps'] == config.shapesworld.clip_pretrain.steps
  assert stats['settings']['image_size'] == config.shapesworld.clip_pretrain.image_size
  clip.load_clip(path)
  mtime = os.stat(os.path.join(path, clip.FLAX_WEIGHTS_NAME)).st_mtime_ns

  def fail(*args, **kwargs):
    raise AssertionError('pretrained again')

  monkeypatch.setattr(cp, 'pretrain_mini_clip', fail)
  assert prepare.mini_clip_dir(config, workdir) == path
  assert os.stat(os.path.join(path, clip.FLAX_WEIGHTS_NAME)).st_mtime_ns == mtime
  # Other settings for the same directory are refused, not silently reused.
  other = shapesworld_config.get_config('smoke')
  with other.unlocked():
    other.shapesworld.clip_pretrain.steps = config.shapesworld.clip_pretrain.steps + 1
  with pytest.raises(ValueError, match='other settings'):
    prepare.mini_clip_dir(other, workdir)


# ------------------------------------------------------- CLIP and backbone side by side


def _concurrent_config():
  """The smoke config (its CLIP settings: smoke_clip's) with a tiny 'classify' backbone."""
  config = shapesworld_config.get_config('smoke')
  b = config.shapesworld.backbone_pretrain
  b.task, b.image_size, b.steps, b.batch_size = 'classify', 32, 3, 8
  b.pool_per_class, b.eval_per_class = 1, 1
  return config


def _backbone_arrays(path):
  """{('params'|'frozen', ...): array} of a pretrained backbone directory."""
  from flax.traverse_util import unflatten_dict
  from zegformer_jax.weights import store
  shapes = unflatten_dict({k: np.zeros(s, np.float32)
                           for k, s in store.checkpoint_shapes(path).items()})
  params, frozen = store.load_params(path, shapes['params'], shapes['frozen'])
  return flatten_dict({'params': params, 'frozen': frozen})


@pytest.mark.slow
def test_concurrent_pretraining_equals_the_sequential_one(smoke_clip, tmp_path, monkeypatch):
  from zegformer_jax.projects.shapesworld import backbone_pretrain as bp
  config = _concurrent_config()
  workdir = str(tmp_path / 'run')
  assert prepare.pretrain_concurrently(config, workdir)
  # (a) both artefacts are finished; nothing is left beside them.
  assert sorted(os.listdir(workdir)) == ['backbone', 'clip']
  assert cp.is_complete(os.path.join(workdir, 'clip'))
  assert os.path.isfile(os.path.join(workdir, 'backbone', bp.STATS_FILE))
  # (b) the child's CLIP is byte for byte the one clip_dir pretrains in this process.
  _, sequential, _ = smoke_clip
  for name in (clip.FLAX_WEIGHTS_NAME, 'config.json', 'vocab.json', 'merges.txt'):
    with open(os.path.join(sequential, 'clip', name), 'rb') as f:
      want = f.read()
    with open(os.path.join(workdir, 'clip', name), 'rb') as f:
      assert f.read() == want, name
  # ... and the backbone the one ensure_backbone makes on its own.
  bp.ensure_backbone(str(tmp_path / 'alone'), bp.settings_from_config(config))
  a, b = _backbone_arrays(str(tmp_path / 'alone')), _backbone_arrays(
      os.path.join(workdir, 'backbone'))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))

  # Afterwards the sequential path reuses both, and a second call does nothing.
  def fail(*args, **kwargs):
    raise AssertionError('pretrained again')

  monkeypatch.setattr(cp, 'pretrain_mini_clip', fail)
  monkeypatch.setattr(bp, 'pretrain_backbone', fail)
  assert not prepare.pretrain_concurrently(config, workdir)
  assert prepare.mini_clip_dir(config, workdir) == os.path.join(workdir, 'clip')
  assert prepare.backbone_dir(config, workdir) == os.path.join(workdir, 'backbone')


def test_concurrent_pretraining_leaves_other_cases_to_the_sequential_path(
    smoke_clip, tmp_path):
  config = _concurrent_config()
  # The CLIP is there already: only the backbone is left, nothing to overlap.
  _, done, _ = smoke_clip
  assert not prepare.pretrain_concurrently(config, done)
  assert not os.path.exists(os.path.join(done, 'backbone'))
  # Only the CLIP is wanted.
  no_backbone = _concurrent_config()
  no_backbone.shapesworld.backbone_pretrain.steps = 0
  assert not prepare.pretrain_concurrently(no_backbone, str(tmp_path / 'a'))
  given = _concurrent_config()
  given.clip.model_path = '/some/clip'
  assert not prepare.pretrain_concurrently(given, str(tmp_path / 'b'))
  # A run that resumes never reads the backbone.
  (tmp_path / 'c' / 'checkpoints' / '3').mkdir(parents=True)
  assert not prepare.pretrain_concurrently(config, str(tmp_path / 'c'))
  # A directory holding no CLIP is reported at once by clip_dir, as without the overlap.
  junk = tmp_path / 'd' / 'clip'
  junk.mkdir(parents=True)
  (junk / 'x').write_text('')
  assert not prepare.pretrain_concurrently(config, str(tmp_path / 'd'))
  with pytest.raises(FileExistsError, match=f'{junk}.*holds no CLIP'):
    prepare.mini_clip_dir(config, str(tmp_path / 'd'))
  assert sorted(os.listdir(tmp_path)) == ['c', 'd']   # nothing else was made
  # Invalid CLIP settings are refused before anything starts.
  bad = _concurrent_config()
  bad.shapesworld.clip_pretrain.steps = 0
  with pytest.raises(ValueError, match='need steps >= 1'):
    prepare.pretrain_concurrently(bad, str(tmp_path / 'e'))
  assert not os.path.exists(tmp_path / 'e')


@pytest.mark.slow
def test_a_failing_child_is_reported(tmp_path):
  # ensure_mini_clip raises FileExistsError in the child (pretrain_concurrently checks for
  # such a directory itself; a child that fails for any reason is reported the same way).
  junk = tmp_path / 'clip'
  junk.mkdir()
  (junk / 'x').write_text('')
  settings = prepare.mini_clip_settings(_concurrent_config())
  process = prepare._start_mini_clip_process(str(junk), settings)
  with pytest.raises(RuntimeError, match=f'miniature CLIP in {junk} failed.*exit code 1'):
    prepare._join_mini_clip_process(process, str(junk))


@pytest.mark.slow
def test_a_stopped_child_cleans_up(tmp_path):
  import glob
  import time
  path = str(tmp_path / 'clip')
  settings = prepare.mini_clip_settings(_concurrent_config())
  process = prepare._start_mini_clip_process(path, settings)
  deadline = time.time() + 60
  while not glob.glob(str(tmp_path / '.tmp-mini-clip-*')):
    assert time.time() < deadline and process.is_alive()
    time.sleep(0.05)
  prepare._stop(process)
  # SIGTERM became SystemExit: pretrain_mini_clip's `finally` removed its directory.
  assert process.exitcode == 128 + 15
  assert os.listdir(tmp_path) == []
