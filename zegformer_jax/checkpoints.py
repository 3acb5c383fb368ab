"""Training checkpoints with orbax: train state plus the data-iterator state.

A checkpoint is a step directory `<workdir>/checkpoints/<step>/` holding two items:
- `state`: the train-state pytree (step, params, FrozenBN statistics, optimiser state);
- `data`: the grain iterator state, one JSON per process (grain's own orbax handler), so a
  resumed run draws exactly the batches an uninterrupted run would.
orbax writes each step into a temporary directory and renames it when complete, so a crash
during a save leaves the previous checkpoint as the latest.
"""
import os
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import traverse_util


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model built from the current config."""


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for the train loop."""

  def __init__(self, workdir: str, keep: int, every: int):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False),
        # Handlers named up front so metadata can be read before any save in this process.
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
    """Saves when `step` is a multiple of `every` (or `force`)."""
    if not force and (self.every <= 0 or step % self.every):
      return False
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    self.manager.wait_until_finished()
    return saved

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None) -> Any:
    """Restores `state` (shapes/shardings from `abstract_state`) and the iterator in place."""
    check_compatible(self.state_shapes(step), abstract_state, f'{self.directory}/{step}')
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
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


def _to_dict(tree):
  if isinstance(tree, dict):
    return {k: _to_dict(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return {str(i): _to_dict(v) for i, v in enumerate(tree)}
  return tree


def check_compatible(saved_shapes: dict, abstract_state: Any, where: str) -> None:
  """Raises CheckpointMismatchError naming the first parameter paths that differ.

  Only `params` and `frozen` are compared: the optimiser state mirrors `params`, so a
  mismatch there is always reported through the parameter it belongs to.
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
  lines = [f'checkpoint {where} does not match the model of this config:']
  for k in wrong[:10]:
    lines.append(f'  {k}: checkpoint shape {saved_shapes[k]} vs model {expected[k]}')
  for k in missing[:10]:
    lines.append(f'  {k}: missing from the checkpoint')
  for k in unexpected[:10]:
    lines.append(f'  {k}: in the checkpoint but not in the model')
  raise CheckpointMismatchError('\n'.join(lines))


def params_fingerprint(params) -> dict:
  """Sum of squares per top-level module: a cheap identity of a parameter tree."""
  return {k: float(sum(np.sum(np.square(np.asarray(x, np.float64)))
                       for x in jax.tree.leaves(v)))
          for k, v in params.items()}
