"""bench_attention: both attention schedules alternated in one process, with XLA's FLOPs."""
import json
import subprocess
import sys

import pytest

from zegformer_jax.tools import bench_attention


@pytest.mark.parametrize('masked', [False, True])
def test_measure_reports_both_schedules(masked):
  r = bench_attention.measure(tokens=16, heads=2, head_dim=8, calls=3, masked=masked)
  assert (r['tokens'], r['heads'], r['head_dim'], r['masked']) == (16, 2, 8, masked)
  assert r['max_abs_diff'] < 1e-6                  # the same attention, two schedules
  products = 2 * 2 * 2 * 16 * 16 * 8               # QK^T and PV, multiply-adds count two
  for name in ('batched', 'by_head'):
    assert products <= r[f'{name}_flops'] <= 2 * products
    assert 0 < r[f'{name}_ms_min'] <= r[f'{name}_ms_median'] <= r[f'{name}_ms_max']
  assert r['batched_over_by_head_median'] > 0


def test_command_line_prints_a_json_line_per_case(tmp_path):
  out = tmp_path / 'r.jsonl'
  proc = subprocess.run(
      [sys.executable, '-m', 'zegformer_jax.tools.bench_attention', '--tokens', '8,12',
       '--heads', '2', '--head_dim', '4', '--calls', '2', '--output', str(out)],
      capture_output=True, text=True, timeout=300, check=True)
  rows = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r['tokens'], r['masked']) for r in rows] == [(8, False), (8, True), (12, False),
                                                        (12, True)]
  assert all(r['tool'] == 'bench_attention' for r in rows)
  assert proc.stdout.count('"tool": "bench_attention"') == 4
