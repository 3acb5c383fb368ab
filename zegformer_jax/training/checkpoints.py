"""Training checkpoints with orbax: train state plus the data-iterator state.

A checkpoint is a step directory `<workdir>/checkpoints/<step>/` holding two items:
- `state`: the train-state pytree (step, params, FrozenBN statistics, optimiser state), each
  array written from the shards its process owns (FSDP-sharded state needs no gather);
- `data`: the grain iterator state, one JSON per process (grain's own orbax handler), so a
  resumed run draws exactly the batches an uninterrupted run would. A checkpoint therefore
  resumes only with the process count that wrote it (the device count may change).
orbax writes each step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a
crash during a save leaves the previous checkpoint as the latest; the leftover temporary
directory is removed when the next run opens the manager.

A damaged checkpoint (a file truncated or deleted, a JSON file inside it malformed) is not
fatal: `Checkpointer.restore_latest` names it in one warning line and restores the newest
intact one instead (training moves the damaged steps aside, to `<workdir>/checkpoints.unreadable/`,
so its next saves do not meet them; readers leave them where they are). Only when no step
restores is it an error (CorruptCheckpointError, naming the directory).

A write the system refuses (a full disk, a read-only file system, `checkpoints` being a
regular file) is metric_writers.CannotWriteError: `cannot write <path>: <reason>`.

Testing hook: ZEGFORMER_TEST_SLOW_SAVE=<step>[:<seconds>] makes the save of <step> pause
(default 600 s) after orbax has started writing that step and before it is finalised, and
print `checkpoint save of step <step> paused` to stderr, so a test can kill the process
in the middle of a save.
"""
import dataclasses
import gc
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util

from zegformer_jax.training import metric_writers


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model built from the current config (or the job)."""


class CorruptCheckpointError(ValueError):
  """A checkpoint step cannot be read: a file truncated, deleted or malformed."""


# When a damaged checkpoint fails to restore, orbax's other parallel array reads are left
# pending: each reports the same error again, with a traceback and tensorstore's spec (a
# thousand lines), through asyncio's log (`... exception was never retrieved`), as an
# unraisable exception of its coroutine, or as `Event loop is closed` when tensorstore
# completes a read after orbax closed its event loop. The restore raises the error once, and
# restore_latest reports it in one line; these hooks drop only those echoes.
_READ_ECHOES = ('Encountered error while reading array index', 'in OCDBT database at',
                'Event loop is closed')


def _is_read_echo(exc: Optional[BaseException], where: str = '') -> bool:
  text = f'{where} {exc!r}' if exc is not None else where
  return any(m in text for m in _READ_ECHOES)


class _OrbaxReadEchoes(logging.Filter):

  def filter(self, record):
    try:
      message = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (message.startswith(('Task exception was never retrieved',
                                    'Future exception was never retrieved'))
                and _is_read_echo(exc, message))


_echo_hooks_installed = False


def _drop_read_echoes() -> None:
  """Installs (once, before the first restore) hooks that drop the echoes of failed reads."""
  global _echo_hooks_installed
  if _echo_hooks_installed:
    return
  _echo_hooks_installed = True
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable(info):
    if not _is_read_echo(info.exc_value, repr(info.object)):
      previous_unraisable(info)

  def excepthook(kind, value, tb):
    if not (isinstance(value, RuntimeError) and _is_read_echo(value)):
      previous_except(kind, value, tb)

  sys.unraisablehook, sys.excepthook = unraisable, excepthook


logging.getLogger('asyncio').addFilter(_OrbaxReadEchoes())


class _DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's iterator handler, plus the testing pause of ZEGFORMER_TEST_SLOW_SAVE."""

  pause_s = 0.0
  pause_step = None

  def save(self, directory, item=None, args=None):
    super().save(directory, item=item, args=args)
    if self.pause_s:
      print(f'checkpoint save of step {self.pause_step} paused for {self.pause_s:g} s '
            '(ZEGFORMER_TEST_SLOW_SAVE)', file=sys.stderr, flush=True)
      time.sleep(self.pause_s)


# orbax picks an item's handler by the type of its args, so the subclass needs its own.
@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  item: Any


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """PyTree handler; on CPU without orbax's replica-parallel writes.

  Replica-parallel saving splits each replicated array across its replicas, which compiles a
  slicing program per array shape on the first save (about 20 s for this model on 8
  simulated CPU devices). CPU "devices" share one host and one disk, so it buys nothing
  there; on accelerators orbax's default is kept.
  """
  if jax.default_backend() != 'cpu':
    return ocp.PyTreeCheckpointHandler()
  th = ocp.type_handlers
  registry = th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
      (jax.Array, th.ArrayHandler(use_replica_parallel=False)), (str, th.StringHandler()))
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


SUBDIR = 'checkpoints'   # a run's checkpoints: <workdir>/checkpoints/<step>/


def has_checkpoint(workdir: str) -> bool:
  """Whether `workdir` holds a finished checkpoint, read without an orbax manager.

  (A manager cleans up unfinished saves: a reader must not create one beside a running job.)
  Orbax writes `<step>.orbax-checkpoint-tmp` and renames it to `<step>` when it is complete.
  """
  directory = os.path.join(workdir, SUBDIR)
  return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def no_checkpoint_error(workdir: str) -> FileNotFoundError:
  """What a reader (eval, predict) raises for a workdir without a finished checkpoint."""
  return FileNotFoundError(
      f'no checkpoint in {os.path.abspath(os.path.join(workdir, SUBDIR))}: train first '
      '(--mode train) or set --config.train.init_from')


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the train loop."""

  def __init__(self, workdir: str, keep: int, every: int, read_only: bool = False):
    """read_only: for evaluation and prediction, which may run beside the training job
    that owns the directory: nothing is created, cleaned up or deleted."""
    self.directory = os.path.abspath(os.path.join(workdir, SUBDIR))
    self.every = every
    self.read_only = read_only
    self._data_handler = _DataHandler()
    if not read_only:   # here, so a directory that cannot be made is one clear error
      with metric_writers.writing(self.directory):
        os.makedirs(self.directory, exist_ok=True)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=False,
            # A save killed half-way leaves `<step>.orbax-checkpoint-tmp`; the writer drops
            # it. A reader must not: the training job may be writing that step right now.
            cleanup_tmp_directories=not read_only, read_only=read_only),
        # Handlers named up front so metadata can be read before any save in this process.
        item_handlers={'state': _state_handler(), 'data': self._data_handler})
    # A writing manager lists the directory for unfinished saves in a background thread
    # and reports what it met at the first save. Waiting here settles the directory before
    # the caller touches it, and a failure of that scan names the directory now, once.
    # (orbax has no public call for it; without the hook the first save waits as before.)
    await_cleanup = getattr(self.manager, '_maybe_await_cleanup_tmp_directory', None)
    if await_cleanup is not None:
      with metric_writers.writing(self.directory):
        await_cleanup()

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `step` is a regular checkpoint step (a multiple of `every`)."""
    return self.every > 0 and step % self.every == 0

  def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
    """Saves when `step` is due (or `force`); blocks until written."""
    if not (force or self.due(step)):
      return False
    items = {'state': ocp.args.PyTreeSave(state)}
    if data_iterator is not None:
      items['data'] = _DataSave(data_iterator)
    self._arm_test_pause(step)
    with metric_writers.writing(self.step_dir(step)):   # orbax wraps OS errors
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
      self.manager.wait_until_finished()
    return saved

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _arm_test_pause(self, step: int):
    hook = os.environ.get('ZEGFORMER_TEST_SLOW_SAVE', '')
    want, _, seconds = hook.partition(':')
    armed = bool(want) and int(want) == int(step)
    self._data_handler.pause_step = step
    self._data_handler.pause_s = float(seconds or 600) if armed else 0.0

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None):
    """(step, state) of the newest checkpoint that restores, or None without any.

    A damaged step (a truncated or deleted file, malformed JSON) is skipped for the next
    older one; the steps skipped are named in one warning line (`warn`) with the reason of
    each (naming the file where it is known). A step removed while it was being read (the
    training job's max_to_keep, seen from a reader) is skipped silently. A writer (not
    read_only) moves the damaged steps to `<workdir>/checkpoints.unreadable/`. No step
    restoring is CorruptCheckpointError naming the directory; CheckpointMismatchError (a
    checkpoint of another config or process count) is raised as is: older steps of the same
    run would not fit either.

    Multi-process jobs read the same (shared) files, so every process skips the same steps;
    process 0 moves them and the others wait for it.
    """
    # Before the first read, not after a failure: an abandoned read can echo (a traceback of
    # `Event loop is closed`) before the failed restore's exception reaches the except below,
    # as on a loaded 2-core machine in CI (2026-12-03).
    _drop_read_echoes()
    tried, bad = set(), []
    while True:
      steps = sorted((s for s in self.manager.all_steps() if s not in tried), reverse=True)
      if not steps:
        break
      step = steps[0]
      tried.add(step)
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except (CheckpointMismatchError, MemoryError):
        raise
      except Exception as e:  # pylint: disable=broad-except  (any failure to read the step)
        gc.collect()   # orbax's abandoned array reads report now (dropped), not later
        if self._removed_meanwhile(step):   # deleted by the job that owns it (max_to_keep)
          self.manager.reload()
          continue
        bad.append((step, _reason(e)))
        continue
      if bad:
        self._set_aside(bad, step)
      return step, state
    if bad:
      raise CorruptCheckpointError(
          f'no intact checkpoint in {self.directory}: '
          + '; '.join(f'step {s}: {r}' for s, r in bad))
    return None

  def _removed_meanwhile(self, step: int) -> bool:
    """Whether `step` is gone. A reader gives a deletion that has started up to 1 s to end
    (the training job's max_to_keep removing the step it was reading)."""
    deadline = time.time() + (1.0 if self.read_only else 0.0)
    while os.path.isdir(self.step_dir(step)):
      if time.time() >= deadline:
        return False
      time.sleep(0.1)
    return True

  def _set_aside(self, bad, step):
    """Warns about the damaged steps `bad` [(step, reason)]; a writer moves them aside."""
    moved = ''
    if not self.read_only:
      aside = self.directory + '.unreadable'
      if jax.process_index() == 0:
        os.makedirs(aside, exist_ok=True)
        for s, _ in bad:
          target = os.path.join(aside, str(s))
          n = 1
          while os.path.exists(target):
            target, n = os.path.join(aside, f'{s}.{n}'), n + 1
          shutil.move(self.step_dir(s), target)
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices('zegformer_unreadable_checkpoints')
      self.manager.reload()
      moved = f'; moved to {aside}'
    what = '; '.join(f'{self.step_dir(s)} ({r})' for s, r in bad)
    metric_writers.warn(
        f'unreadable checkpoint{"s" if len(bad) > 1 else ""} {what}{moved}; using step '
        f'{step}, the newest intact one')

  def check_readable(self, step: int, item: str = 'state') -> None:
    """Raises CorruptCheckpointError naming a missing item or a malformed JSON file of
    `step`: `item`'s (`state` or `data`, the data-iterator state) and, for `state`, the
    step's own metadata."""
    root = self.step_dir(step)
    if not os.path.isdir(os.path.join(root, item)):
      raise CorruptCheckpointError(f'{os.path.join(root, item)} is missing')
    for folder in ([root] if item == 'state' else []) + [os.path.join(root, item)]:
      for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and (name.endswith('.json') or name in _JSON_FILES):
          try:
            with open(path) as f:
              json.load(f)
          except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(
                f'{path} is not valid JSON ({" ".join(str(e).split())})') from e

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restores `state` (shapes/shardings from `abstract_state`) and the iterator in place."""
    where = f'{self.directory}/{step}'
    self.check_readable(step, 'state')
    check_compatible(self.state_shapes(step), abstract_state, where)
    items = {'state': ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if data_iterator is not None:
      self.check_readable(step, 'data')
      _check_process_count(os.path.join(self.directory, str(step), 'data'), where)
      items['data'] = _DataRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored['state']

  def state_shapes(self, step: int) -> dict:
    """{'a/b/c': shape} of the saved train state, read from metadata only."""
    meta = self.manager.item_metadata(step)['state']
    tree = getattr(meta, 'tree', meta)
    flat = traverse_util.flatten_dict(_to_dict(tree), sep='/')
    return {k: tuple(getattr(v, 'shape', ()) or ()) for k, v in flat.items()}

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# orbax's JSON metadata files (besides *.json): checked by Checkpointer.check_readable.
_JSON_FILES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding')


def _reason(e: BaseException) -> str:
  """One line (at most 300 characters) of why a restore failed: the innermost cause's
  first line (tensorstore's names the file and the entry), without its spec dump."""
  inner = e
  while inner.__cause__ is not None and not isinstance(inner, CorruptCheckpointError):
    inner = inner.__cause__
  text = str(inner).strip().splitlines()[0] if str(inner).strip() else type(inner).__name__
  for cut in (' [tensorstore_spec', '. See full TensorStore details'):
    text = text.split(cut)[0]
  if isinstance(inner, KeyError) or not text:
    text = f'{type(inner).__name__}: {text}'
  text = ' '.join(text.split())
  return text if len(text) <= 300 else text[:297] + '...'


def _check_process_count(data_dir: str, where: str):
  """The data-iterator state is per process: the job must have as many as the writer."""
  n, i = jax.process_count(), jax.process_index()
  if os.path.exists(os.path.join(data_dir, f'process_{i}-of-{n}.json')):
    return
  written = sorted(f for f in os.listdir(data_dir) if f.startswith('process_')) \
      if os.path.isdir(data_dir) else []
  if not written:   # deleted, not written by another job
    raise CorruptCheckpointError(f'{data_dir} holds no data-iterator state (process_*.json)')
  counts = sorted({f.rsplit('-of-', 1)[-1].split('.')[0] for f in written})
  raise CheckpointMismatchError(
      f'checkpoint {where} holds data-iterator state for {"/".join(counts) or "no"} '
      f'process(es), this job has {n}: resume with the same number of processes')


def _to_dict(tree):
  if isinstance(tree, dict):
    return {k: _to_dict(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return {str(i): _to_dict(v) for i, v in enumerate(tree)}
  return tree


def check_compatible(saved_shapes: dict, abstract_state: Any, where: str) -> None:
  """Raises CheckpointMismatchError naming the first parameter paths that differ.

  Only `params` and `frozen` are compared: the optimiser state mirrors `params`, so a
  mismatch there is always reported through the parameter it belongs to. The message is one
  line (the CLI prints it as `error: ...`): up to five differences, then a count.
  """
  model_part = {k: abstract_state[k] for k in ('params', 'frozen') if k in abstract_state}
  expected = traverse_util.flatten_dict(_to_dict(model_part), sep='/')
  expected = {k: tuple(v.shape) for k, v in expected.items()}
  saved_shapes = {k: v for k, v in saved_shapes.items() if k.split('/')[0] in model_part}
  missing = sorted(set(expected) - set(saved_shapes))
  unexpected = sorted(set(saved_shapes) - set(expected))
  wrong = sorted(k for k in set(expected) & set(saved_shapes)
                 if tuple(expected[k]) != tuple(saved_shapes[k]))
  if not (missing or unexpected or wrong):
    return
  diffs = ([f'{k} has shape {tuple(saved_shapes[k])} in the checkpoint, {expected[k]} in the '
            'model' for k in wrong]
           + [f'{k} is missing from the checkpoint' for k in missing]
           + [f'{k} is in the checkpoint but not in the model' for k in unexpected])
  more = f'; and {len(diffs) - 5} more' if len(diffs) > 5 else ''
  raise CheckpointMismatchError(
      f'checkpoint {where} does not match the model of this config: '
      + '; '.join(diffs[:5]) + more)


def params_fingerprint(params) -> dict:
  """Sum of squares per top-level module: a cheap identity of a parameter tree."""
  return {k: float(sum(np.sum(np.square(np.asarray(x, np.float64)))
                       for x in jax.tree.leaves(v)))
          for k, v in params.items()}
