"""SPNet-FPN, ZS3Net and ZegCLIP through `main` (train, evaluate, metrics JSON) and the
comparison table."""
import json
import os
import shutil

import pytest

import cli_runs
from zegformer_jax.tools import compare


def _method_run(workdir, resources, cache, method, *overrides, mode='train_and_eval'):
  args = cli_runs.main_args(workdir, resources, *overrides, mode=mode)
  args[args.index(cli_runs.SMOKE)] = f'configs/shapesworld.py:{method},smoke'
  return cli_runs.run(args, cache)


@pytest.fixture(scope='module')
def method_runs(tmp_path_factory, smoke_resources, compile_cache):
  root = tmp_path_factory.mktemp('methods')
  runs = {}
  for method in ('spnet_fpn', 'zs3net', 'zegclip'):
    workdir = str(root / method)
    result = _method_run(workdir, smoke_resources, compile_cache, method)
    assert result.returncode == 0, cli_runs.tail(result.stdout + result.stderr)
    runs[method] = (workdir, result.stdout)
  return runs


@pytest.mark.slow
def test_pixel_methods_train_and_evaluate_through_main(method_runs, smoke_resources,
                                                       compile_cache):
  for method, (workdir, stdout) in method_runs.items():
    m = json.load(open(os.path.join(workdir, 'metrics_seg.json')))
    assert m['variant'] == 'seg' and m['num_images'] == 16 and len(m['per_class']) == 32
    assert 0 <= m['mIoU_unseen'] <= 100 and m['mIoU_seen'] is not None
    config = json.load(open(os.path.join(workdir, 'config.json')))
    assert config['model']['name'] == method
    summary = cli_runs.summary(workdir)
    assert summary['final_step'] == 6
    assert set(summary['final_loss_terms']) == (
        {'loss', 'loss_focal', 'loss_dice'} if method == 'zegclip' else {'loss', 'loss_sem_seg'})
  # ZS3Net's generative stage ran after training and its classifier covers all 32 classes.
  zs3 = method_runs['zs3net'][0]
  assert 'ZS3Net generator: MMD' in method_runs['zs3net'][1]
  stats = cli_runs.summary(zs3)['zs3net']
  assert stats['steps'] == 20 and stats['mmd_last'] > 0
  assert any(f.startswith('classifier_') for f in os.listdir(os.path.join(zs3, 'zs3net')))
  # img / full need segments: a one-line error, nothing evaluated.
  spnet = method_runs['spnet_fpn'][0]
  result = _method_run(spnet, smoke_resources, compile_cache, 'spnet_fpn', mode='eval')
  assert result.returncode == 0
  args = cli_runs.main_args(spnet, smoke_resources, mode='eval') + ['--variants', 'seg,full']
  args[args.index(cli_runs.SMOKE)] = 'configs/shapesworld.py:spnet_fpn,smoke'
  result = cli_runs.run(args, compile_cache)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == (
      "error: variant 'full' needs segments: method 'spnet_fpn' has only ('seg',)")


@pytest.mark.slow
def test_zegclip_trains_prompts_and_head_and_keeps_clip(method_runs, smoke_resources):
  """After training through main, the checkpoint's CLIP image tower is the miniature CLIP's
  (its position table resized once to the 128-px input); prompts and head are the params."""
  import jax
  import numpy as np
  from configs import shapesworld
  from zegformer_jax.modeling import clip
  from zegformer_jax.modeling import prompted_vit
  from zegformer_jax.projects.shapesworld import prepare
  from zegformer_jax.training import state as state_lib
  workdir = method_runs['zegclip'][0]
  config = shapesworld.get_config('zegclip,smoke')
  with config.unlocked():
    config.dataset.data_dir = os.path.join(smoke_resources, 'data')
    config.clip.model_path = os.path.join(smoke_resources, 'clip')
  config = prepare.prepare(config, workdir, for_training=False)   # as main does
  _, state = state_lib.load_latest_state(config, workdir, 26)
  frozen = jax.device_get(state['frozen'])['image_encoder']
  vision = clip.load_clip(config.clip.model_path)[0].params
  np.testing.assert_array_equal(frozen['encoder']['layers']['1']['mlp']['fc2']['kernel'],
                                vision['vision_model']['encoder']['layers']['1']['mlp']['fc2']
                                ['kernel'])
  np.testing.assert_array_equal(frozen['visual_projection']['kernel'],
                                vision['visual_projection']['kernel'])
  table = vision['vision_model']['embeddings']['position_embedding']['embedding']
  assert table.shape[0] == 65   # the smoke CLIP's 8 x 8 grid -> 16 x 16 at 128 px
  np.testing.assert_allclose(frozen['embeddings']['position_embedding']['embedding'],
                             prompted_vit.resize_position_table(np.asarray(table), 257),
                             rtol=1e-6, atol=1e-7)
  params = jax.device_get(state['params'])
  assert sorted(params['image_encoder']) == ['deep_prompts', 'prompt_norm', 'prompt_proj']
  assert params['image_encoder']['deep_prompts'].shape == (2, 10, 64)
  assert state['step'] == 6


@pytest.mark.slow
def test_zs3net_zs3_setting_uses_a_classifier_of_the_unseen_classes(method_runs,
                                                                   smoke_resources,
                                                                   compile_cache):
  zs3 = method_runs['zs3net'][0]
  before = set(os.listdir(os.path.join(zs3, 'zs3net')))
  result = _method_run(zs3, smoke_resources, compile_cache, 'zs3net',
                       '--config.eval.setting=zs3', mode='eval')
  assert result.returncode == 0, cli_runs.tail(result.stdout + result.stderr)
  m = json.load(open(os.path.join(zs3, 'metrics_seg_zs3.json')))
  assert len(m['per_class']) == 6 and m['mIoU_seen'] is None
  new = set(os.listdir(os.path.join(zs3, 'zs3net'))) - before
  assert len(new) == 1 and new.pop().startswith('classifier_')


@pytest.mark.slow
def test_compare_table(method_runs, cached_run, smoke_resources, compile_cache, tmp_path):
  zeg = str(tmp_path / 'zegformer')
  shutil.copytree(cached_run('compare_zegformer', []), zeg)   # the cached run stays as it is
  result = cli_runs.run(cli_runs.main_args(zeg, smoke_resources, mode='eval') +
                        ['--variants', 'seg'], compile_cache)
  assert result.returncode == 0, cli_runs.tail(result.stdout + result.stderr)
  workdirs = [method_runs['spnet_fpn'][0], method_runs['zs3net'][0], zeg,
              method_runs['zegclip'][0]]
  out = str(tmp_path / 'table')
  text = compare.compare(workdirs, output=out)
  rows = json.load(open(out + '.json'))['runs']
  assert [r['label'] for r in rows] == ['SPNet-FPN', 'ZS3Net', 'ZegFormer-seg', 'ZegCLIP']
  for r in rows:
    m = json.load(open(os.path.join(r['workdir'], 'metrics_seg.json')))
    assert r['mIoU_unseen'] == m['mIoU_unseen'] and r['hIoU'] == m['hIoU']
    assert r['eval_s_per_image'] == pytest.approx(m['eval_wall_s'] / m['num_images'])
    assert r['step_ms'] > 0
    assert f'| {r["label"]} |' in text
  assert open(out + '.md').read() == text


def test_summary_groups_seeds_with_mean_and_range():
  rows = [dict(setting='w', method='spnet_fpn', variant='seg', label='SPNet-FPN', seed=s,
               mIoU_seen=a, mIoU_unseen=b, hIoU=None, pAcc=50.0, step_ms=10.0 * (s + 1),
               eval_s_per_image=None) for s, a, b in ((0, 60.0, 10.0), (1, 70.0, 20.0))]
  (s,) = compare.summarise(rows)
  assert s['seeds'] == [0, 1]
  assert s['mIoU_seen'] == {'mean': 65.0, 'min': 60.0, 'max': 70.0}
  assert s['hIoU'] is None and s['step_ms']['mean'] == 15.0
  assert '65.00 (60.00–70.00)' in compare.markdown([dict(r, workdir='x', eval_variants=['seg'],
                                                         test_views=1) for r in rows])


def test_compare_refuses_a_workdir_without_metrics(tmp_path):
  (tmp_path / 'config.json').write_text('{"model": {"name": "spnet_fpn"}}')
  with pytest.raises(FileNotFoundError, match='no metrics_<variant>.json'):
    compare.read_run(str(tmp_path))
  with pytest.raises(FileNotFoundError, match='not a training workdir'):
    compare.read_run(str(tmp_path / 'nope'))
