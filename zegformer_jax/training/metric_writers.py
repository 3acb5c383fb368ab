"""Training logs: a JSONL file, TensorBoard event files and a console line.

Only process 0 writes (every process computes the same replicated scalars). The JSONL file
is appended to, so a resumed run continues the same log.
"""
import json
import logging
import os
import time
from typing import Mapping

import jax


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard `<workdir>/tb`."""

  def __init__(self, workdir: str, total_steps: int):
    self.total_steps = total_steps
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._last_time = None
    self._last_step = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      from tensorboardX import SummaryWriter  # imported lazily: slow import
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def write(self, step: int, scalars: Mapping[str, float]) -> dict:
    """Logs `scalars` at `step`; adds step time (s) and ETA from the previous call."""
    now = time.time()
    scalars = {k: float(v) for k, v in scalars.items()}
    if self._last_time is not None and step > self._last_step:
      step_time = (now - self._last_time) / (step - self._last_step)
      scalars['step_time'] = step_time
      scalars['eta_s'] = step_time * max(self.total_steps - step, 0)
    self._last_time, self._last_step = now, step
    if not self.enabled:
      return scalars
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)
    self._tb.flush()
    logging.info('%s', format_console(step, self.total_steps, scalars))
    print(format_console(step, self.total_steps, scalars), flush=True)
    return scalars

  def reset_timer(self):
    """Call after slow non-training work (compile, checkpoint, eval) so ETA stays honest."""
    self._last_time = None

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def format_console(step: int, total: int, s: Mapping[str, float]) -> str:
  parts = [f'step {step}/{total}']
  for k in ('loss', 'loss_ce', 'loss_mask', 'loss_dice', 'grad_norm', 'lr'):
    if k in s:
      parts.append(f'{k} {s[k]:.4g}')
  if 'step_time' in s:
    parts.append(f'step_time {s["step_time"]*1e3:.1f} ms')
    eta = int(s['eta_s'])
    parts.append(f'eta {eta // 3600:d}:{eta % 3600 // 60:02d}:{eta % 60:02d}')
  return ' | '.join(parts)
