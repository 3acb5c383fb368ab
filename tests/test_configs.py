"""Every official experiment config carries its reference recipe; overrides are checked."""
import importlib
import os
import subprocess
import sys

import pytest

from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name, arg=None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


@pytest.mark.parametrize('name,depth,steps,crop,test_size,ignore,variant,gamma,test_prompts', [
    ('coco_stuff_r50', 50, 60000, 640, (640, 2560), 255, 'full', 0.1, 'imagenet_select'),
    ('coco_stuff_r101', 101, 60000, 640, (640, 2560), 255, 'full', 0.1, 'single'),
    ('voc_r50', 50, 10000, 512, (512, 2048), 255, 'img', 0.0, 'single'),
    ('voc_r101', 101, 10000, 512, (512, 2048), 255, 'full', 0.1, 'single'),
    ('ade20k_full_r50', 50, 60000, 512, (512, 2048), 65535, 'full', 0.0, 'imagenet_select'),
])
def test_official_recipes(name, depth, steps, crop, test_size, ignore, variant, gamma,
                          test_prompts):
  c = load(name)
  assert c.model.backbone.block_counts == common.RESNET_BLOCKS[depth]
  assert c.train.total_steps == steps
  assert c.input.crop_size == crop
  assert (c.input.min_size_test, c.input.max_size_test) == test_size
  assert c.dataset.ignore_value == ignore
  assert (c.eval.variant, c.eval.gamma, c.clip.test_prompts) == (variant, gamma, test_prompts)
  # Common recipe (reference section 4).
  assert c.input.global_batch_size == 32
  assert (c.optim.lr, c.optim.weight_decay, c.optim.backbone_multiplier) == (1e-4, 1e-4, 0.1)
  assert (c.optim.poly_power, c.optim.clip_norm) == (0.9, 0.01)
  assert (c.loss.mask_weight, c.loss.dice_weight, c.loss.no_object_weight) == (20.0, 1.0, 0.1)
  assert (c.model.decoder.num_layers, c.model.decoder.num_heads, c.model.decoder.ffn_dim) == (6, 8, 2048)
  assert (c.model.decoder.num_queries, c.model.decoder.dropout, c.model.temperature) == (100, 0.1, 0.01)


def test_train_sizes():
  assert load('coco_stuff_r50').input.min_size_train == tuple(range(320, 961, 64))
  assert load('voc_r50').input.min_size_train == (
      256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024)
  assert load('ade20k_full_r50').input.min_size_train == load('voc_r50').input.min_size_train


def test_config_args():
  assert load('voc_r50', '30k').train.total_steps == 30000
  assert load('voc_r101', '30k').train.total_steps == 30000
  with pytest.raises(ValueError, match='10k, 30k'):
    load('voc_r50', '40k')
  smoke = load('shapesworld', 'smoke')
  assert smoke.train.total_steps < 20


def test_locked():
  c = load('coco_stuff_r50')
  with pytest.raises(AttributeError, match='lrr'):
    c.optim.lrr = 1.0


def _main(*args):
  return subprocess.run([sys.executable, '-m', 'zegformer_jax.main', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))


@pytest.mark.slow
def test_cli_unknown_key_is_one_line_error():
  r = _main('--config', 'configs/voc_r50.py', '--config.optim.lrr=1', '--mode', 'summary')
  assert r.returncode != 0
  assert "unknown config key 'lrr' (from --config.optim.lrr=1)" in r.stderr
  assert 'Did you mean "lr"' in r.stderr
  assert 'Traceback' not in r.stderr


@pytest.mark.slow
def test_cli_wrong_type_is_one_line_error():
  r = _main('--config', 'configs/voc_r50.py', '--config.optim.lr=abc', '--mode', 'summary')
  assert r.returncode != 0
  assert '--config.optim.lr=abc' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize('spec,line', [
    ('nope.py', "error: cannot load config 'nope.py': config file nope.py does not exist"),
    ('configs/common.py', "error: cannot load config 'configs/common.py': config file "
                          'configs/common.py has no get_config(arg) function'),
    ('configs/shapesworld.py:bad', "error: cannot load config 'configs/shapesworld.py:bad': "
                                   'shapesworld config argument must be a comma-separated list '
                                   "of ('smoke', 'zegformer', 'spnet_fpn', 'zs3net', "
                                   "'zegclip'); got 'bad'")])
def test_cli_config_file_errors_are_one_line(spec, line):
  r = _main('--config', spec, '--mode', 'summary')
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == line
  assert 'Traceback' not in r.stderr


@pytest.mark.slow
def test_cli_eval_without_checkpoint_stops_before_the_project_prepares(tmp_path):
  r = _main('--config', 'configs/shapesworld.py', '--workdir', str(tmp_path), '--mode', 'eval')
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      f'error: no checkpoint in {tmp_path}/checkpoints: train first (--mode train) or set '
      '--config.train.init_from')
  assert os.listdir(tmp_path) == []   # no world generated, no CLIP pretrained


@pytest.mark.parametrize('name,arg,method,dataset,steps', [
    ('coco_stuff_spnet_r50', None, 'spnet_fpn', 'coco_stuff', 60000),
    ('voc_spnet_r50', '30k', 'spnet_fpn', 'voc', 30000),
    ('coco_stuff_zs3net_r50', None, 'zs3net', 'coco_stuff', 60000),
    ('voc_zs3net_r50', 'k6', 'zs3net', 'voc_zs3_k6', 10000),
    ('voc_zs3net_r50', None, 'zs3net', 'voc', 10000),
])
def test_baseline_configs_keep_zegformers_recipe(name, arg, method, dataset, steps):
  """A baseline config differs from its ZegFormer recipe only in the method's own keys."""
  import importlib
  c = importlib.import_module(f'configs.{name}').get_config(arg)
  experiment = f'voc_zs3net_{arg}_r50' if name == 'voc_zs3net_r50' and arg else name
  assert (c.experiment, c.model.name, c.dataset.name, c.train.total_steps) == (
      experiment, method, dataset, steps)
  assert c.eval.variant == 'seg' and tuple(c.evals.val_seen.variants) == ('seg',)
  base = importlib.import_module('configs.' + name.replace(f'_{method.split("_")[0]}', '')
                                 .replace('_fpn', '')).get_config(
                                     '30k' if arg and '30k' in arg else None)
  for key in ('input', 'optim', 'clip'):
    want = base[key].to_dict()
    got = c[key].to_dict()
    if name.startswith('voc_zs3net') and arg and key == 'input':
      want.pop('max_masks'), got.pop('max_masks')
    assert got == want, key
  assert c.model.backbone.to_dict() == base.model.backbone.to_dict()
  assert ('zs3net' in c) == (method == 'zs3net')


def test_spnet_parameter_count():
  """SPNet-FPN R-50 = ZegFormer's backbone + pixel decoder + the 1x1 projection 256 -> 512."""
  from configs import coco_stuff_spnet_r50
  from zegformer_jax.tools import summary
  _, total, _ = summary.parameter_summary(coco_stuff_spnet_r50.get_config().model)
  assert total == 31_180_096
  shapes = summary.methods.variable_shapes(coco_stuff_spnet_r50.get_config().model)
  assert shapes['params']['projection']['kernel'].shape == (1, 1, 256, 512)
