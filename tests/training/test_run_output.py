"""What a run shows and records (issue 20, items 6 and 7).

  * One line per event: a smoke train_and_eval run (with a periodic evaluation) prints each
    training step once, no orbax INFO lines, no transformers Flax deprecation warning; the
    project's own INFO lines (`devices`, `wrote ...`) stay.
  * Evaluation metrics reach TensorBoard: mIoU, mIoU_seen, mIoU_unseen, hIoU, pAcc per
    variant as `eval/<split>/<variant>/<metric>` at the step evaluated, from the periodic
    Evaluator and from the final evaluation. The event files are read back with the
    project's TFRecord reader and tensorboardX's Event proto (no TensorBoard install needed).
"""
import glob
import json
import logging
import os
import re

import pytest
from tensorboardX.proto import event_pb2

import cli_runs
from zegformer_jax import cli
from zegformer_jax.data import tfrecord
from zegformer_jax.training import metric_writers

ABSL_LINE = re.compile(r'^[IWEF]\d{4} [\d:.]+ +\d+ ([^:\]]+):\d+\] ')


def tb_scalars(workdir: str) -> dict:
  """{(tag, step): [values]} of every scalar in <workdir>/tb/*tfevents*."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'tb', '*tfevents*'))):
    for record in tfrecord.read_records(path):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        out.setdefault((value.tag, event.step), []).append(value.simple_value)
  return out


def test_eval_scalars_are_written_per_variant(tmp_path):
  results = {
      'seg': {'variant': 'seg', 'split': 'val_all', 'setting': 'gzs3', 'mIoU': 40.0,
              'mIoU_seen': 50.0, 'mIoU_unseen': 20.0, 'hIoU': 28.5, 'pAcc': 70.0},
      'full': {'variant': 'full', 'split': 'val_all', 'setting': 'zs3', 'mIoU': 41.0,
               'mIoU_seen': None, 'mIoU_unseen': 41.0, 'hIoU': None, 'pAcc': 71.0}}
  metric_writers.write_eval_scalars(str(tmp_path), 12, results)
  metric_writers.write_eval_scalars(str(tmp_path), 12, {'seg': dict(results['seg'], mIoU=1.0,
                                                                     split='val_seen')})
  got = tb_scalars(str(tmp_path))
  assert got == {
      ('eval/val_all/seg/mIoU', 12): [40.0], ('eval/val_all/seg/mIoU_seen', 12): [50.0],
      ('eval/val_all/seg/mIoU_unseen', 12): [20.0], ('eval/val_all/seg/hIoU', 12): [28.5],
      ('eval/val_all/seg/pAcc', 12): [70.0],
      ('eval/val_all_zs3/full/mIoU', 12): [41.0], ('eval/val_all_zs3/full/mIoU_unseen', 12): [41.0],
      ('eval/val_all_zs3/full/pAcc', 12): [71.0],
      ('eval/val_seen/seg/mIoU', 12): [1.0], ('eval/val_seen/seg/mIoU_seen', 12): [50.0],
      ('eval/val_seen/seg/mIoU_unseen', 12): [20.0], ('eval/val_seen/seg/hIoU', 12): [28.5],
      ('eval/val_seen/seg/pAcc', 12): [70.0]}
  assert len(os.listdir(tmp_path / 'tb')) == 2   # one file per call, none overwritten


def _record(pathname, level=logging.INFO, msg='x', name='absl'):
  return logging.LogRecord(name, level, pathname, 1, msg, None, None)


def test_library_info_lines_are_filtered_and_ours_kept():
  own = os.path.join(os.path.dirname(cli.__file__), 'training', 'train.py')
  lib = '/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py'
  keep = cli.LibraryFilter().filter
  assert keep(_record(own))
  assert not keep(_record(lib))
  assert keep(_record(lib, logging.WARNING, 'Waiting for previous save took 9 s'))
  assert not keep(_record(lib, logging.WARNING, 'Given directory is read only=/w/checkpoints'))
  assert not keep(_record('/venv/transformers/modeling_flax_utils.py', logging.WARNING,
                          'TensorFlow and JAX classes are deprecated and will be removed in '
                          'Transformers v5. We recommend ...',
                          name='transformers.modeling_flax_utils'))


@pytest.mark.slow
def test_smoke_run_prints_one_line_per_event_and_evaluations_reach_tensorboard(
    tmp_path, smoke_resources, compile_cache):
  workdir = str(tmp_path / 'run')
  result = cli_runs.run(cli_runs.main_args(workdir, smoke_resources,
                                           '--config.evals.val_seen.every=3',
                                           mode='train_and_eval'), compile_cache)
  output = result.stdout + result.stderr
  assert result.returncode == 0, cli_runs.tail(output)
  lines = output.strip().splitlines()
  print(output)
  print(f'{len(lines)} lines')
  # Each training step once (smoke: log_every 2, plus the first step): printed, not logged.
  for step in (1, 2, 4, 6):
    assert sum(l.startswith(f'step {step}/6 |') or f'] step {step}/6 |' in l
               for l in lines) == 1, step
  # No library INFO lines: every log line comes from the project's own modules.
  own = {os.path.basename(p) for p in glob.glob(os.path.join(cli_runs.ROOT, 'zegformer_jax',
                                                             '**', '*.py'), recursive=True)}
  sources = [m.group(1) for m in map(ABSL_LINE.match, lines) if m]
  assert sources and set(sources) <= own, sorted(set(sources) - own)
  assert not any('orbax' in l or 'TensorFlow and JAX classes are deprecated' in l for l in lines)
  assert 'Traceback' not in output
  assert len(lines) <= 16, output   # was 160: ~130 of them orbax's
  # Periodic evaluation (val_seen, seg, step 3) and the final one (val_all, full, step 6).
  scalars = tb_scalars(workdir)
  assert scalars[('eval/val_seen/seg/mIoU', 3)] and scalars[('eval/val_seen/seg/pAcc', 3)]
  with open(os.path.join(workdir, 'metrics_full.json')) as f:
    final = json.load(f)
  for metric in metric_writers.EVAL_METRICS:
    assert scalars[(f'eval/val_all/full/{metric}', 6)] == [pytest.approx(final[metric])], metric
  assert [s for (t, s) in scalars if t == 'loss'] == [1, 2, 4, 6]
