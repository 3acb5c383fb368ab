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

Testing hook: ZEGFORMER_TEST_SLOW_SAVE=<step>[:<seconds>] makes the save of <step> pause
(default 600 s) after orbax has started writing that step and before it is finalised, and
print `checkpoint save of step <step> paused` to stderr, so a test can kill the process
in the middle of a save.
"""
import dataclasses
import os
import sys
import time
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model built from the current config (or the job)."""


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
    self._data_handler = _DataHandler()
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, enable_async_checkpointing=False,
            # A save killed half-way leaves `<step>.orbax-checkpoint-tmp`; the writer drops
            # it. A reader must not: the training job may be writing that step right now.
            cleanup_tmp_directories=not read_only, read_only=read_only),
        # Handlers named up front so metadata can be read before any save in this process.
        item_handlers={'state': _state_handler(), 'data': self._data_handler})

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
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    self.manager.wait_until_finished()
    return saved

  def _arm_test_pause(self, step: int):
    hook = os.environ.get('ZEGFORMER_TEST_SLOW_SAVE', '')
    want, _, seconds = hook.partition(':')
    armed = bool(want) and int(want) == int(step)
    self._data_handler.pause_step = step
    self._data_handler.pause_s = float(seconds or 600) if armed else 0.0

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restores `state` (shapes/shardings from `abstract_state`) and the iterator in place."""
    where = f'{self.directory}/{step}'
    check_compatible(self.state_shapes(step), abstract_state, where)
    items = {'state': ocp.args.PyTreeRestore(
        item=abstract_state,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))}
    if data_iterator is not None:
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


def _check_process_count(data_dir: str, where: str):
  """The data-iterator state is per process: the job must have as many as the writer."""
  n, i = jax.process_count(), jax.process_index()
  if os.path.exists(os.path.join(data_dir, f'process_{i}-of-{n}.json')):
    return
  written = sorted(f for f in os.listdir(data_dir) if f.startswith('process_')) \
      if os.path.isdir(data_dir) else []
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
