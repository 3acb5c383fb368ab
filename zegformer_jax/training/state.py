"""The train state: {'step', 'params', 'frozen', 'opt_state'}, created, restored or loaded.

Training, evaluation, prediction and the benchmarks all build the state here, so each of
them restores exactly what training saved.
"""
import functools

import jax
import jax.numpy as jnp

from zegformer_jax.modeling import methods
from zegformer_jax.training import checkpoints
from zegformer_jax.training import optim
from zegformer_jax.training import sharding
from zegformer_jax.weights import store


def make_optimizer_fn(config, total_steps: int):
  """params -> the configured AdamW (optim.make_optimizer with the backbone's freeze_at)."""
  return functools.partial(optim.make_optimizer, config.optim, total_steps,
                           freeze_at=config.model.backbone.get('freeze_at', 0))


def create_train_state(config, model, optimizer_fn, num_classes: int, mesh, rng, *,
                       abstract_only: bool = False):
  """{'step', 'params', 'frozen', 'opt_state'} created directly with its sharding.

  Returns (state, state_sharding). With abstract_only, `state` holds ShapeDtypeStructs
  carrying the shardings (the target of a checkpoint restore) and nothing is computed.
  """
  size = config.input.crop_size

  def init(key):
    variables = methods.init_variables(
        model, key, image_hw=(size, size), num_classes=num_classes)
    params = variables['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'frozen': variables.get('frozen', {}),
            'opt_state': optimizer_fn(params).init(params)}

  abstract = jax.eval_shape(init, rng)
  state_sharding = sharding.state_sharding(abstract, mesh)
  if abstract_only:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, state_sharding), state_sharding
  # Runs once: on CPU compile without backend optimisation (see methods.init_variables).
  options = {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else {}
  init = jax.jit(init, out_shardings=state_sharding).lower(rng).compile(options)
  return init(rng), state_sharding


def with_pretrained_weights(config, state):
  """`state` of a fresh run with the weights its method starts from that are not in the
  config's init_from: ZegCLIP's frozen CLIP image tower, loaded from clip.model_path (the
  Hugging Face directory its text embeddings come from) and checked against
  config.model.zegclip.vision. The other methods start from init_from alone."""
  if methods.method_name(config.model) != 'zegclip':
    return state
  from zegformer_jax.modeling import clip
  from zegformer_jax.modeling import zegclip
  path = clip.clip_dir(config)
  clip_model, _ = clip.load_clip(path)
  zegclip.check_clip(config.model, clip_model, path)
  frozen = zegclip.with_clip_weights(jax.device_get(state['frozen']), clip_model.params)
  frozen = jax.tree.map(lambda new, old: jax.device_put(jnp.asarray(new, old.dtype),
                                                        old.sharding), frozen, state['frozen'])
  return dict(state, frozen=frozen)


def init_from(path: str, state):
  """`state` with params (and FrozenBN statistics) loaded from a weights store (`store`)."""
  params, frozen = store.load_params(path, state['params'], state['frozen'])
  return dict(state, params=params, frozen=frozen)


def load_latest_state(config, workdir: str, num_classes: int):
  """(model, state) restored from the latest checkpoint of `workdir`, for eval/predict.

  Without a checkpoint, config.train.init_from (a weights store) is loaded instead. A
  damaged latest checkpoint is named in one warning line and the newest intact one is
  restored (Checkpointer.restore_latest); none intact is CorruptCheckpointError.
  """
  mesh = sharding.mesh_from_config(config)
  model = methods.build_model(config.model)
  optimizer_fn = make_optimizer_fn(config, config.train.total_steps)
  if not checkpoints.has_checkpoint(workdir):
    if config.train.init_from:
      state, _ = create_train_state(config, model, optimizer_fn, num_classes, mesh,
                                    jax.random.key(config.seed))
      return model, init_from(config.train.init_from, state)
    raise checkpoints.no_checkpoint_error(workdir)
  ckpt = checkpoints.Checkpointer(workdir, config.train.keep_checkpoints,
                                  config.train.checkpoint_every, read_only=True)
  try:
    abstract, _ = create_train_state(config, model, optimizer_fn, num_classes, mesh,
                                     jax.random.key(config.seed), abstract_only=True)
    restored = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  if restored is None:   # no finished step, or every one removed while this reader looked
    raise FileNotFoundError(f'no finished checkpoint in {ckpt.directory}')
  return model, restored[1]
