"""Training logs: a JSONL file, TensorBoard event files and a console line.

Only process 0 writes (every process computes the same replicated scalars). The JSONL file
is appended to, so a resumed run continues the same log: a run resumed from step S first
drops the entries of steps after S (written by the interrupted run after its last
checkpoint; the file is rewritten atomically), and its TensorBoard writer purges them
(`purge_step`), so every step is logged once.

Also here: the evaluation scalars of TensorBoard (`write_eval_scalars`), the config history
of a workdir (`record_config`), one-line warnings (`warn`) and `CannotWriteError`, which
every writer of the run's outputs raises, through `writing(path)`, for a write the system
refused (the CLI prints it as `error: cannot write <path>: <reason>`).
"""
import contextlib
import errno
import json
import logging
import os
import re
import time
from typing import Mapping, Optional

import jax


class CannotWriteError(OSError):
  """An output could not be written: `cannot write <path>: <reason>`.

  An OSError with the cause's errno (EIO when it has none); `user_error` makes cli.py show it
  as one line `error: ...` whatever the errno.
  """

  user_error = True

  def __init__(self, path: str, cause: BaseException):
    code = getattr(cause, 'errno', None)
    reason = getattr(cause, 'strerror', None)
    if code is None:   # tensorstore (orbax) reports the OS error inside its message
      found = re.search(r"os_error_code='?(\d+)", str(cause))
      code = int(found.group(1)) if found else None
      reason = os.strerror(code) if code else None
    if code == errno.EEXIST:   # makedirs meeting a regular file of the directory's name
      code, reason = errno.ENOTDIR, os.strerror(errno.ENOTDIR)
    super().__init__(code or errno.EIO, reason or ' '.join(str(cause).split())[:300], path)

  def __str__(self):
    return f'cannot write {self.filename}: {self.strerror}'


def is_write_failure(e: BaseException) -> bool:
  """An OSError, or orbax/tensorstore's report of one (`[os_error_code=N]`)."""
  return isinstance(e, OSError) or "os_error_code=" in str(e)


@contextlib.contextmanager
def writing(path: str):
  """A write the system refuses inside the block (is_write_failure) becomes
  CannotWriteError(path); a CannotWriteError from further in passes as it is."""
  try:
    yield
  except CannotWriteError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (orbax wraps OS errors)
    if is_write_failure(e):
      raise CannotWriteError(path, e) from e
    raise


def warn(message: str) -> None:
  """One warning line: logged (every process) and printed as `warning: ...` on process 0."""
  logging.warning('%s', message)
  if jax.process_index() == 0:
    print(f'warning: {message}', flush=True)


def drop_entries_after(path: str, step: int) -> int:
  """Removes the entries of steps > `step` (and unreadable lines) from the JSONL file.

  Rewritten atomically (a temporary file renamed over it); returns how many were dropped.
  Only a regular file is read (a special file such as /dev/full is left alone).
  """
  if not os.path.isfile(path):
    return 0
  keep, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        entry = json.loads(line)
        late = int(entry['step']) > step
      except (ValueError, KeyError, TypeError):   # e.g. a line cut short by the crash
        late = True
      if late:
        dropped += 1
      else:
        keep.append(line if line.endswith('\n') else line + '\n')
  if dropped:
    tmp = path + '.tmp'
    with writing(path):
      with open(tmp, 'w') as f:
        f.writelines(keep)
      os.replace(tmp, path)
  return dropped


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard `<workdir>/tb`."""

  def __init__(self, workdir: str, total_steps: int, resume_step: Optional[int] = None):
    """resume_step: the step training starts from (its checkpoint's; 0 or None for a fresh
    start): what the file holds for later steps is dropped, TensorBoard purges it."""
    self.total_steps = total_steps
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._last_time = None
    self._last_step = None
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if self.enabled:
      start = int(resume_step or 0)
      with writing(workdir):
        os.makedirs(workdir, exist_ok=True)
      dropped = drop_entries_after(self.path, start)
      if dropped:
        logging.info('%s: dropped %d entries after step %d (logged by the interrupted run '
                     'after its last checkpoint)', self.path, dropped, start)
      with writing(self.path):
        self._jsonl = open(self.path, 'a')
      from tensorboardX import SummaryWriter  # imported lazily: slow import
      self._tb_dir = os.path.join(workdir, 'tb')
      with writing(self._tb_dir):
        self._tb = SummaryWriter(self._tb_dir, purge_step=start + 1)

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
    with writing(self.path):
      self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
      self._jsonl.flush()
    with writing(self._tb_dir):
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._tb.flush()
    print(format_console(step, self.total_steps, scalars), flush=True)   # once: no log line
    return scalars

  def reset_timer(self):
    """Call after slow non-training work (compile, checkpoint, eval) so ETA stays honest."""
    self._last_time = None

  def close(self):
    """Closes the files; a write that fails here (a full disk) is not raised again."""
    if self._jsonl:
      try:
        self._jsonl.close()
      except OSError:
        pass
      self._jsonl = None
    if self._tb:
      try:
        self._tb.close()
      except OSError:
        pass
      self._tb = None


EVAL_METRICS = ('mIoU', 'mIoU_seen', 'mIoU_unseen', 'hIoU', 'pAcc')


def eval_tag(result: Mapping, metric: str) -> str:
  """TensorBoard tag of one evaluation metric: `eval/<split>/<variant>/<metric>`.

  The split part is `<dataset>_<split>` for a cross-dataset evaluation and ends in `_zs3` for
  the ZS3 setting, so evaluations of different data never share a curve.
  """
  split = str(result.get('split', ''))
  if result.get('eval_data_dir'):
    split = f"{result.get('dataset', '')}_{split}"
  if result.get('setting') == 'zs3':
    split += '_zs3'
  return f"eval/{split}/{result.get('variant', '')}/{metric}"


_eval_writers = 0


def write_eval_scalars(workdir: str, step: int, results: Mapping[str, Mapping]) -> None:
  """Writes mIoU, mIoU_seen, mIoU_unseen, hIoU, pAcc of each variant's evaluation result
  ({variant: metrics}) to TensorBoard `<workdir>/tb` at `step` (process 0; tags `eval_tag`).

  Each call writes its own event file (`*.eval.<pid>.<n>`) beside the training's; metrics
  that are None (no unseen class) are left out.
  """
  global _eval_writers
  if jax.process_index() != 0:
    return
  from tensorboardX import SummaryWriter  # imported lazily: slow import
  tb = os.path.join(workdir, 'tb')
  _eval_writers += 1
  with writing(tb):
    writer = SummaryWriter(tb, filename_suffix=f'.eval.{os.getpid()}.{_eval_writers}')
    try:
      for result in results.values():
        for metric in EVAL_METRICS:
          value = result.get(metric)
          if value is not None:
            writer.add_scalar(eval_tag(result, metric), float(value), int(step))
    finally:
      writer.close()


def record_config(workdir: str, config_json: str, resuming: bool) -> Optional[str]:
  """Writes `<workdir>/config.json` (process 0 of a training run), keeping the history.

  A config.json of an earlier run that differs from `config_json` is kept as
  `config.<n>.json` (n = 1, 2, ... in the order the configs were replaced), so every config
  the workdir was trained with stays on disk; an identical one is just rewritten. When
  `resuming` and train.total_steps differs from the previous config's, one warning line says
  so (the learning-rate schedule follows total_steps). The write is atomic. Returns the
  name the previous config was kept under, or None.
  """
  path = os.path.join(workdir, 'config.json')
  kept = None
  with writing(path):
    previous_text = None
    if os.path.isfile(path):
      with open(path) as f:
        previous_text = f.read()
    if previous_text is not None and previous_text != config_json:
      n = 1
      while os.path.exists(os.path.join(workdir, f'config.{n}.json')):
        n += 1
      kept = f'config.{n}.json'
      os.replace(path, os.path.join(workdir, kept))
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(config_json)
    os.replace(tmp, path)
  if resuming and kept:
    before, after = _total_steps(previous_text), _total_steps(config_json)
    if before != after:
      warn(f'config.train.total_steps is {after}, the run being resumed in {workdir} had '
           f'{before} (its config is kept as {kept}); the learning-rate schedule changes')
  return kept


def _total_steps(config_json: str):
  try:
    return json.loads(config_json)['train']['total_steps']
  except (ValueError, KeyError, TypeError):
    return None


def format_console(step: int, total: int, s: Mapping[str, float]) -> str:
  parts = [f'step {step}/{total}']
  for k in ('loss', 'loss_ce', 'loss_mask', 'loss_focal', 'loss_sem_seg', 'loss_dice',
            'grad_norm', 'lr'):
    if k in s:
      parts.append(f'{k} {s[k]:.4g}')
  if 'step_time' in s:
    parts.append(f'step_time {s["step_time"]*1e3:.1f} ms')
    eta = int(s['eta_s'])
    parts.append(f'eta {eta // 3600:d}:{eta % 3600 // 60:02d}:{eta % 60:02d}')
  return ' | '.join(parts)
