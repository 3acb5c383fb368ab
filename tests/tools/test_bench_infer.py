"""bench_infer: one image through the evaluation's scores fn, timed, with XLA's FLOPs; the
markdown table of benchmark results."""
import json

import pytest

from configs import shapesworld
from zegformer_jax.tools import bench_infer
from zegformer_jax.tools import benchmarking


@pytest.mark.slow
@pytest.mark.parametrize('arg,size', [('zegclip,smoke', 128), ('smoke', 64)])
def test_measure_one_image(arg, size):
  config = shapesworld.get_config(arg)
  with config.unlocked():
    config.eval.variant = 'seg'
  r = bench_infer.measure(config, size, num_classes=32, num_seen=26, images=2, warmup=0,
                          peak_tflops=1.0)
  assert r['per_image_ms_min'] <= r['per_image_ms_median'] <= r['per_image_ms_max']
  assert r['views'] == 4 and r['variants'] == ['seg']           # the world's test views
  assert r['flops_per_image'] > 1e8
  assert r['mfu'] == pytest.approx(r['tflops_per_s'], rel=1e-2)  # peak 1 TFLOP/s
  assert r['images_per_s'] == pytest.approx(1e3 / r['per_image_ms_median'], rel=1e-2)


def test_table_from_both_tools(tmp_path):
  rows = [{'tool': 'bench_step', 'config': 'a.py', 'dtype': 'bfloat16', 'batch': 8,
           'crop': 64, 'step_ms_median': 41.0, 'images_per_s': 195.1,
           'flops_per_step': 1.84e9, 'tflops_per_s': 0.0448, 'mfu': 0.5},
          {'tool': 'bench_infer', 'config': 'b.py', 'dtype': 'float32', 'size': 512,
           'per_image_ms_median': 2622.0, 'images_per_s': 0.38, 'flops_per_image': 2.3e11,
           'tflops_per_s': 0.088}]
  path = tmp_path / 'r.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\nnot json\n')
  lines = benchmarking.table([json.loads(l) for l in path.read_text().splitlines()
                              if l.startswith('{')]).splitlines()
  assert lines[0].startswith('| tool | config | dtype | batch | size | step / image ms')
  assert lines[2] == '| bench_step | a.py | bfloat16 | 8 | 64 | 41.0 | 195.1 | 1.8 | 0.0448 | 0.5 |'
  assert lines[3] == '| bench_infer | b.py | float32 | 1 | 512 | 2622.0 | 0.38 | 230.0 | 0.088 |  |'


@pytest.mark.slow
def test_launch_benchmarks_writes_the_table(tmp_path):
  """launch/benchmarks.sh on a small config: a train step and an inference row (float32 only:
  the bfloat16 path is the same command with another --config.model.dtype)."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  small = '--config.model.decoder.num_layers=1 '
  env = dict(os.environ, CONFIGS='configs/shapesworld.py:smoke', STEPS='1', IMAGES='1',
             ONE_PASS_CONFIG='', DTYPES='float32', ATTENTION_TOKENS='16', PYTHON=sys.executable, JAX_PLATFORMS='cpu', PYTHONPATH=root,
             STEP_ARGS=small,
             INFER_ARGS=small + '--config.eval.variant=seg --size 64 --num_classes 32 '
             '--num_seen 26')
  r = subprocess.run(['bash', 'launch/benchmarks.sh', str(tmp_path / 'out'), '2', '4'],
                     cwd=root, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  rows = [json.loads(l) for l in open(tmp_path / 'out' / 'results.jsonl')]
  assert [(x['tool'], x['dtype']) for x in rows] == [('bench_step', 'float32'),
                                                     ('bench_infer', 'float32')]
  assert [x['mfu'] > 0 for x in rows] == [True] * 2
  table = (tmp_path / 'out' / 'table.md').read_text().splitlines()
  assert len(table) == 4 and table[2].startswith('| bench_step | configs/shapesworld.py')
  attention = [json.loads(l) for l in open(tmp_path / 'out' / 'attention.jsonl')]
  assert [(x['tool'], x['tokens'], x['masked']) for x in attention] == [
      ('bench_attention', 16, False), ('bench_attention', 16, True)]


def test_throughput_keeps_four_significant_figures():
  # 1.8e9 FLOP in 0.8371 s on a 1 TFLOP/s peak: 2.1503e-3, which four decimals would make 0.0022.
  r = benchmarking.throughput(1.8e9, 0.8371, peak_tflops=1.0)
  assert r == {'tflops_per_s': 0.00215, 'mfu': 0.00215}
  r = benchmarking.throughput(3.0e12, 0.5, peak_tflops=989.0)
  assert r == {'tflops_per_s': 6.0, 'mfu': 0.006067}
  assert benchmarking.throughput(None, 1.0) == {} and 'mfu' not in benchmarking.throughput(1e9, 1.0)
