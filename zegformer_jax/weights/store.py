"""The on-disk parameter store: a directory of imported (or pretrained) model variables.

A store directory holds `convert_meta.json` (what the variables cover and which covered ones
are intentionally absent) and `params/`, an orbax checkpoint of {'params', 'frozen'}.
Training reads one with `load_params` (`--config.train.init_from=DIR`), Python code with
`load_model(config, DIR)` -> (model, variables); the importers of
zegformer_jax.weights.convert and ShapesWorld backbone pretraining write one. This module
knows nothing of the source formats, so training does not load them. Layout: docs/weights.md.
"""
import json
import os
from typing import Any, Dict, Iterable, Mapping, Sequence, Tuple

import numpy as np

META_NAME = 'convert_meta.json'
# The value written since the first version; keep it so that existing directories load.
META_FORMAT = 'zegformer_jax.convert'
META_VERSION = 1
PARAMS_DIR = 'params'

Path = Tuple[str, ...]            # ('params', 'backbone', 'stem', 'conv1', 'kernel')


def path_str(path: Path) -> str:
  return '/'.join(path)


def flat_shapes(tree: Mapping[str, Any]) -> Dict[Path, Tuple[int, ...]]:
  """{path: shape} of a nested dict of arrays / ShapeDtypeStructs."""
  from flax import traverse_util
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(tree)).items()}


def covered(path: str, covers: Iterable[str]) -> bool:
  """Whether the path string lies in one of the subtrees `covers` ('params/backbone', ...)."""
  return any(path == c or path.startswith(c + '/') for c in covers)


def listing(items: Sequence[str], limit: int = 12) -> str:
  """The first `limit` items, comma-separated, and how many there are in all."""
  shown = ', '.join(items[:limit])
  return shown + (f', ... ({len(items)} in all)' if len(items) > limit else '')


def save_params(directory: str, variables: Mapping[Path, np.ndarray]) -> None:
  """Writes {'params': ..., 'frozen': ...} (flat paths) with orbax to `directory`."""
  import orbax.checkpoint as ocp
  from flax import traverse_util
  tree = traverse_util.unflatten_dict(
      {k: np.array(v, dtype=np.float32, order='C') for k, v in variables.items()})
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(directory), tree)
  checkpointer.wait_until_finished()
  checkpointer.close()


def read_meta(directory: str) -> Dict[str, Any]:
  file = os.path.join(os.fspath(directory), META_NAME)
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f'{directory}: no {META_NAME}; init_from expects a directory written by '
        '`python -m zegformer_jax.weights.convert`')
  with open(file, encoding='utf-8') as f:
    meta = json.load(f)
  if meta.get('format') != META_FORMAT or meta.get('version') != META_VERSION:
    raise ValueError(f'{file}: not a {META_FORMAT} v{META_VERSION} metadata file')
  return meta


def checkpoint_shapes(directory: str) -> Dict[Path, Tuple[int, ...]]:
  """{path: shape} of DIR/params, from orbax metadata only."""
  import orbax.checkpoint as ocp
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(os.path.abspath(os.path.join(directory, PARAMS_DIR)))
  checkpointer.close()
  tree = getattr(meta, 'item_metadata', meta)
  tree = getattr(tree, 'tree', tree)
  return flat_shapes(_plain(tree))


def _plain(tree):
  if isinstance(tree, Mapping):
    return {k: _plain(v) for k, v in tree.items() if not (isinstance(v, Mapping) and not v)}
  return tree


def load_params(directory: str, params: Any, frozen: Any) -> Tuple[Any, Any]:
  """Loads a store directory into the structure of (params, frozen).

  Args:
    directory: DIR written by `python -m zegformer_jax.weights.convert` (or `save_params`
      plus a metadata file).
    params, frozen: the model's current variables (jax arrays, numpy arrays or
      ShapeDtypeStructs): the reference structure, shapes and shardings.

  Returns:
    (params, frozen) with the same tree structure and shapes: every variable the checkpoint
    holds is loaded (restored straight into the given leaf's sharding); variables outside
    the checkpoint's `covers` or listed in its `absent` keep the given values.

  Raises:
    ValueError naming the parameter path: a shape mismatch, a checkpoint variable the
    model does not have, or a covered model variable the checkpoint lacks.
  """
  import jax
  import orbax.checkpoint as ocp
  from flax import traverse_util

  directory = os.fspath(directory)
  meta = read_meta(directory)
  saved = checkpoint_shapes(directory)
  target = traverse_util.flatten_dict({'params': dict(params), 'frozen': dict(frozen or {})})
  covers, absent = meta.get('covers', []), set(meta.get('absent', []))

  mismatched = [(path_str(k), saved[k], tuple(v.shape)) for k, v in target.items()
                if k in saved and saved[k] != tuple(v.shape)]
  if mismatched:
    path, got, want = mismatched[0]
    more = f' (and {len(mismatched) - 1} more)' if len(mismatched) > 1 else ''
    raise ValueError(f'{directory}: {path} has shape {got} in the checkpoint but the model '
                     f'wants {want}{more}; was it converted for another config?')
  extra = sorted(path_str(k) for k in saved if k not in target)
  if extra:
    raise ValueError(f'{directory}: the model has no variable {extra[0]} '
                     f'({len(extra)} such: {listing(extra, 5)}); was it converted for '
                     'another config?')
  lacking = sorted(path_str(k) for k in target if k not in saved and
                   covered(path_str(k), covers) and path_str(k) not in absent)
  if lacking:
    raise ValueError(f'{directory}: lacks {lacking[0]} ({len(lacking)} missing: '
                     f'{listing(lacking, 5)}) and does not list it as intentionally absent')

  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def abstract(leaf):
    sharding = getattr(leaf, 'sharding', None)
    if not isinstance(sharding, jax.sharding.Sharding):
      sharding = default
    return jax.ShapeDtypeStruct(tuple(leaf.shape), np.float32, sharding=sharding)

  restore_target = traverse_util.unflatten_dict(
      {k: abstract(target[k]) for k in saved})
  checkpointer = ocp.StandardCheckpointer()
  restored = traverse_util.flatten_dict(checkpointer.restore(
      os.path.abspath(os.path.join(directory, PARAMS_DIR)), restore_target))
  checkpointer.close()
  merged = {}
  for k, leaf in target.items():
    if k not in restored:
      merged[k] = leaf
      continue
    value = restored[k]
    dtype = getattr(leaf, 'dtype', np.float32)
    if isinstance(leaf, np.ndarray):
      value = np.asarray(value, dtype=dtype)
    elif value.dtype != dtype:
      value = value.astype(dtype)
    merged[k] = value
  tree = traverse_util.unflatten_dict(merged)
  return tree.get('params', {}), tree.get('frozen', {})


def load_model(config, directory: str, *, seed: int = 0,
               num_classes: int = 1) -> Tuple[Any, Dict[str, Any]]:
  """(model, variables) of a config's model with the weights of a store directory.

  The one call that turns a converted directory (`python -m zegformer_jax.weights.convert`)
  into something to run: `model.apply(variables, images, text_embeddings, train=False)`.

  Args:
    config: an experiment config (its `model` is used) or the `model` sub-config itself.
    directory: DIR written by the converter (or by ShapesWorld backbone pretraining).
    seed: initial values of the variables the store does not cover (a backbone-only
      import); when it covers every variable nothing is initialised or compiled.
    num_classes: K of the dummy initialisation (only matters for a method whose parameters
      depend on K).

  Returns:
    (the flax module, {'params': ..., 'frozen': ...} of jax arrays).

  Raises:
    FileNotFoundError / ValueError (load_params) naming the directory and the variable.
  """
  import jax
  from flax import traverse_util
  from zegformer_jax.modeling import methods

  directory = os.fspath(directory)
  read_meta(directory)   # a directory of something else: one clear error before any work
  model_config = config.model if 'model' in config else config
  model = methods.build_model(model_config)

  def init(key):
    return methods.init_variables(model, key, num_classes=num_classes)

  variables = jax.eval_shape(init, jax.random.key(seed))
  saved = checkpoint_shapes(directory)
  if any(k not in saved for k in traverse_util.flatten_dict(dict(variables))):
    variables = init(jax.random.key(seed))   # some variables keep their initial values
  params, frozen = load_params(directory, variables['params'], variables.get('frozen', {}))
  return model, {'params': params, 'frozen': frozen}
