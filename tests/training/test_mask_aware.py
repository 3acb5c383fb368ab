"""MAFT's mask-aware fine-tuning of CLIP for the one-pass branch (training/mask_aware.py).

Oracles: numpy loops for the soft IoU, the min-max targets and both losses (torch's
SmoothL1 by its formula), CLIP's own image embedding for the [CLS] output, an explicit
list of what MAFT trains, and a smoke run whose result is re-derived from its parts
(frozen weights bit for bit, the text tower untouched, an exact resume).
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from zegformer_jax.modeling import clip
from zegformer_jax.modeling import one_pass
from zegformer_jax.modeling import prompted_vit
from zegformer_jax.training import mask_aware


def _np_smooth_l1(d):
  d = np.abs(d)
  return np.where(d < 1.0, 0.5 * d * d, d - 0.5)


def test_smooth_l1_is_torchs_by_hand():
  got = mask_aware.smooth_l1(jnp.asarray([0.5, -2.0, 1.0, 0.0]), jnp.zeros(4))
  np.testing.assert_allclose(got, [0.125, 1.5, 0.5, 0.0], rtol=1e-7)


def test_soft_iou_against_loops():
  rng = np.random.RandomState(0)
  b, n, k, h, w = 2, 3, 4, 5, 6
  p = rng.rand(b, n, h, w).astype(np.float32)
  label = rng.randint(0, k + 1, size=(b, h, w))
  label[label == k] = -1                                  # unlabelled pixels
  label[1][label[1] == 2] = 0                             # class 2 absent from image 1
  got = np.asarray(mask_aware.soft_iou(jnp.asarray(p), jnp.asarray(label), k))
  want = np.zeros((b, n, k))
  for i in range(b):
    for q in range(n):
      for c in range(k):
        g = (label[i] == c).astype(np.float64)
        inter = (p[i, q] * g).sum()
        union = g.sum() + p[i, q].sum() - inter
        want[i, q, c] = inter / union
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert np.all(got[1, :, 2] == 0)


def test_mask_aware_loss_against_loops():
  rng = np.random.RandomState(1)
  b, n, k = 2, 5, 3
  scores = rng.dirichlet(np.ones(k), size=(b, n)).astype(np.float32)
  iou = rng.rand(b, n, k).astype(np.float32)
  present = np.asarray([[True, False, True], [False, True, False]])
  got = float(mask_aware.mask_aware_loss(jnp.asarray(scores), jnp.asarray(iou),
                                         jnp.asarray(present)))
  terms = []
  for i in range(b):
    for c in range(k):
      if present[i, c]:
        t = iou[i, :, c]
        t = (t - t.min()) / (t.max() - t.min())
        terms.extend(_np_smooth_l1(scores[i, :, c] - t))
  assert got == pytest.approx(np.mean(terms), rel=1e-6)
  # An absent class's scores do not count.
  scores2 = scores.copy()
  scores2[0, :, 1] = 0.9
  got2 = float(mask_aware.mask_aware_loss(jnp.asarray(scores2), jnp.asarray(iou),
                                          jnp.asarray(present)))
  assert got2 == pytest.approx(got, rel=1e-7)


def test_distillation_loss_and_its_gradient_reaches_only_the_student():
  s = jnp.asarray([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
  t = jnp.asarray([[0.5, 0.4, 0.1], [0.3, 0.3, 0.4]])
  want = np.mean(_np_smooth_l1(np.asarray(s) - np.asarray(t)))
  assert float(mask_aware.distillation_loss(s, t)) == pytest.approx(want, rel=1e-6)
  g_t = jax.grad(lambda t_: mask_aware.distillation_loss(s, t_))(t)
  assert float(jnp.max(jnp.abs(g_t))) == 0.0
  g_s = jax.grad(lambda s_: mask_aware.distillation_loss(s_, t))(s)
  np.testing.assert_allclose(g_s, (np.asarray(s) - np.asarray(t)) / s.size, rtol=1e-6)


@pytest.fixture(scope='module')
def tiny(tiny_vit_clip):
  return tiny_vit_clip


def test_trainable_parameters_are_mafts(tiny):
  tree = prompted_vit.clip_params(tiny.params)
  trainable, frozen = mask_aware.split_params(tree)
  want = {'post_layernorm/scale', 'post_layernorm/bias'}
  for i in range(2):
    for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      want |= {f'encoder/layers/{i}/self_attn/{proj}/kernel',
               f'encoder/layers/{i}/self_attn/{proj}/bias'}
    for norm in ('layer_norm1', 'layer_norm2'):
      want |= {f'encoder/layers/{i}/{norm}/scale', f'encoder/layers/{i}/{norm}/bias'}
  assert set(trainable) == want
  assert {k.split('/')[0] for k in frozen} == {'embeddings', 'pre_layrnorm', 'encoder',
                                               'visual_projection'}
  assert all('/mlp/' in k for k in frozen if k.startswith('encoder/'))
  merged = mask_aware.merge_params(trainable, frozen)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), merged, tree))


def test_cls_output_is_clips_image_embedding(tiny):
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  logits = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 32, 32)) * 4
  cfg = tiny.config.vision_config
  params = {'params': prompted_vit.clip_params(tiny.params)}
  emb, cls = one_pass.MaskQueryCLIP(cfg, tiny.config.projection_dim, with_cls=True).apply(
      params, images, logits)
  np.testing.assert_allclose(cls, clip.image_embeddings(tiny, images), atol=2e-5)
  plain = one_pass.MaskQueryCLIP(cfg, tiny.config.projection_dim).apply(params, images, logits)
  np.testing.assert_array_equal(emb, plain)


def _flat(tree):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, dict(tree)), sep='/')


@pytest.mark.slow
def test_finetune_on_the_smoke_run_resumes_exactly_and_touches_only_mafts_weights(
    smoke_run, tmp_path):
  from zegformer_jax.modeling import segmenter
  config, trained = smoke_run
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained, workdir)
  summary = mask_aware.finetune(config, workdir)
  out = mask_aware.output_dir(workdir)
  assert summary['output'] == out and summary['steps'] == config.mask_aware.steps == 4
  assert [h['step'] for h in summary['history']][-1] == 4
  assert all(np.isfinite(h['loss']) for h in summary['history'])
  source, _ = clip.load_clip(config.clip.model_path)
  tuned, _ = clip.load_clip(out)
  before, after = _flat(source.params), _flat(tuned.params)
  assert set(before) == set(after)
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed, 'nothing was trained'
  for k in changed:   # vision_model/<MaskQueryCLIP path>: only what MAFT trains moved
    assert k.startswith('vision_model/') and mask_aware.is_trainable(k[len('vision_model/'):]), k
  assert not any(k.startswith(('text_model/', 'text_projection', 'logit_scale'))
                 for k in changed)

  # Resume from the step-2 checkpoint: the same weights bit for bit (data order included).
  ckpts = os.path.join(workdir, mask_aware.SUBDIR, 'checkpoints')
  assert sorted(os.listdir(ckpts)) == ['2', '4']
  shutil.rmtree(os.path.join(ckpts, '4'))
  shutil.rmtree(out)
  os.remove(os.path.join(workdir, mask_aware.SUBDIR, mask_aware.STATS_FILE))
  resumed = mask_aware.finetune(config, workdir)
  assert [h['step'] for h in resumed['history']] == [3, 4]   # it ran steps 3 and 4 only
  again = _flat(clip.load_clip(out)[0].params)
  for k in before:
    np.testing.assert_array_equal(again[k], after[k], err_msg=k)
  with open(os.path.join(workdir, mask_aware.SUBDIR, mask_aware.STATS_FILE)) as f:
    assert json.load(f)['history'][-1]['loss'] == resumed['history'][-1]['loss']

  # A finished result is reused only for the settings it was made with.
  assert mask_aware.finetune(config, workdir) == resumed
  other = config.copy_and_resolve_references()
  with other.unlocked():
    other.mask_aware.lr = 2 * config.mask_aware.lr
  with pytest.raises(ValueError, match='other settings'):
    mask_aware.finetune(other, workdir)

  # Evaluation's one pass reads it; the crops keep config.clip's CLIP.
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.eval.image_branch, c.eval.one_pass_clip_path = 'one_pass', out
  from zegformer_jax.data import input_pipeline
  names, _ = input_pipeline.dataset_classes(c.dataset.data_dir, c.dataset.train_split)
  model, params, _ = segmenter.image_branch(c, workdir, names, ('img',))
  assert model.config.projection_dim == tuned.config.projection_dim
  np.testing.assert_array_equal(
      params['vision_model']['post_layernorm']['scale'],
      tuned.params['vision_model']['post_layernorm']['scale'])
  with c.unlocked():
    c.eval.one_pass_clip_path = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='one_pass_clip_path'):
    segmenter.image_branch(c, workdir, names, ('img',))


def test_methods_without_segments_are_refused():
  from configs import shapesworld
  config = shapesworld.get_config('spnet_fpn,smoke')
  with pytest.raises(ValueError, match='segment proposals'):
    mask_aware.check_config(config)


def test_trainable_all_and_unknown_choices(tiny):
  tree = prompted_vit.clip_params(tiny.params)
  trainable, frozen = mask_aware.split_params(tree, 'all')
  assert not frozen and set(trainable) == set(traverse_util.flatten_dict(tree, sep='/'))
  with pytest.raises(ValueError, match='mask_aware.trainable'):
    mask_aware.split_params(tree, 'mlp')
