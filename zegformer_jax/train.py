"""The training loop, top to bottom.

  config -> mesh -> data (grain) -> seen-class text embeddings (CLIP, cached)
  -> model + optimiser -> restore latest checkpoint (state and data iterator) if any
  -> loop: jitted train step (forward, Hungarian matching on the host, losses, AdamW)
  -> logs (JSONL, TensorBoard, console) and checkpoints -> train_summary.json

The train step is compiled once: the batch has a static shape (targets padded to
`input.max_masks`), the state is donated, and in/out shardings are explicit (state
replicated, batch split over the `data` axis of the mesh).
"""
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zegformer_jax import checkpoints
from zegformer_jax import input_pipeline
from zegformer_jax import losses
from zegformer_jax import metric_writers
from zegformer_jax import optim
from zegformer_jax import preprocess
from zegformer_jax import resources
from zegformer_jax import sharding
from zegformer_jax.models import clip
from zegformer_jax.models import zegformer


def class_text_embeddings(config, workdir: str, class_names, prompt_set: str) -> np.ndarray:
  """[K, D] L2-normalised CLIP text embeddings of `class_names` (cached in the workdir)."""
  path = resources.clip_dir(config, workdir)
  return clip.cached_text_embeddings(
      os.path.join(workdir, 'text_embeddings'), path, list(class_names),
      clip.prompt_templates(prompt_set), batch_size=config.clip.text_batch_size)


def create_train_state(config, model, optimizer_fn, num_classes: int, mesh, rng):
  """Initialises {'step', 'params', 'frozen', 'opt_state'} directly with replicated sharding."""
  size = config.input.crop_size

  def init():
    variables = zegformer.init_variables(
        model, rng, image_hw=(size, size), num_classes=num_classes)
    params = variables['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'frozen': variables.get('frozen', {}),
            'opt_state': optimizer_fn(params).init(params)}

  abstract = jax.eval_shape(init)
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=state_sharding)()
  return state, state_sharding


def make_train_step(config, model, optimizer, mesh, state_sharding):
  """Returns train_step(state, batch, text_embeddings, rng) -> (state, metrics), jitted."""
  mean, std = config.model.pixel_mean, config.model.pixel_std
  schedule = optim.poly_schedule(config.optim.lr, config.train.total_steps,
                                 config.optim.poly_power)

  def loss_fn(params, frozen, batch, text_embeddings, rng):
    images = preprocess.normalize(batch['image'], mean, std)
    outputs = model.apply({'params': params, 'frozen': frozen}, images, text_embeddings,
                          train=True, rngs={'dropout': rng})
    targets = dict(batch, target_masks=losses.masks_from_label(
        batch['label'], batch['target_classes'], batch['target_valid']))
    return losses.compute_loss(outputs, targets, config.loss, mesh)

  def train_step(state, batch, text_embeddings, rng):
    # The dropout key depends only on the step, so a resumed run draws the same masks.
    step_rng = jax.random.fold_in(rng, state['step'])
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['frozen'], batch, text_embeddings, step_rng)
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics = dict(terms)
    metrics['loss'] = loss
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['lr'] = schedule(state['step'])
    # Numerics guard: a step whose loss or gradient is not finite leaves params and
    # optimiser state untouched; the host sees `nonfinite` and stops before saving.
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    params, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old),
        (params, opt_state), (state['params'], state['opt_state']))
    metrics['nonfinite'] = (~finite).astype(jnp.float32)
    new_state = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  batch_sharding = sharding.data_sharding(mesh)
  return jax.jit(
      train_step,
      in_shardings=(state_sharding, batch_sharding, sharding.replicated(mesh),
                    sharding.replicated(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))


TRAIN_KEYS = ('image', 'label', 'target_classes', 'target_valid')


def train(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the summary."""
  mesh = sharding.make_mesh()
  sharding.local_batch_size(config.input.global_batch_size, mesh)  # validates divisibility
  data_dir = resources.data_dir(config, workdir)
  class_names, _ = input_pipeline.dataset_classes(data_dir, config.dataset.train_split)
  text_embeddings = class_text_embeddings(config, workdir, class_names,
                                          config.clip.train_prompts)
  if text_embeddings.shape[1] != config.model.embed_dim:
    raise ValueError(
        f'CLIP text embeddings have width {text_embeddings.shape[1]} but '
        f'config.model.embed_dim is {config.model.embed_dim}')

  model = zegformer.build_model(config.model)
  total_steps = config.train.total_steps
  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  optimizer_fn = functools.partial(optim.make_optimizer, config.optim, total_steps)
  state, state_sharding = create_train_state(
      config, model, optimizer_fn, len(class_names), mesh, init_rng)
  optimizer = optimizer_fn(state['params'])

  data_iter = input_pipeline.make_train_iterator(config, data_dir)
  ckpt = checkpoints.Checkpointer(workdir, config.train.keep_checkpoints,
                                  config.train.checkpoint_every)
  start = ckpt.latest_step()
  if start is not None:
    logging.info('resuming from %s/%d', ckpt.directory, start)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
    state = ckpt.restore(start, abstract, data_iter)
  elif config.train.init_from:
    state = _init_from(config.train.init_from, state)

  train_step = make_train_step(config, model, optimizer, mesh, state_sharding)
  text_embeddings = jax.device_put(text_embeddings, sharding.replicated(mesh))
  dropout_rng = jax.device_put(dropout_rng, sharding.replicated(mesh))
  writer = metric_writers.MetricWriter(workdir, total_steps)

  step = int(state['step'])
  last = {}
  t_start = time.time()
  preemption = PreemptionWatch()
  while step < total_steps:
    batch = sharding.shard_batch({k: v for k, v in next(data_iter).items() if k in TRAIN_KEYS},
                                 mesh)
    state, metrics = train_step(state, batch, text_embeddings, dropout_rng)
    step += 1
    # The guard needs this step's scalars on the host: one small transfer per step, which
    # also bounds how far the host runs ahead of the device.
    metrics = jax.device_get(metrics)
    check_finite(step, metrics)
    if step % config.train.log_every == 0 or step == total_steps or step == 1:
      last = writer.write(step, {k: float(v) for k, v in metrics.items() if k != 'nonfinite'})
      if step == 1:
        writer.reset_timer()  # the first step includes compilation
    stop = preemption.should_stop(step)
    if ckpt.save(step, state, data_iter, force=step == total_steps or stop):
      writer.reset_timer()
    if stop:
      logging.warning('preempted: saved step %d in %s; rerun to resume', step, ckpt.directory)
      print(f'preempted at step {step}: checkpoint saved, rerun the same command to resume',
            flush=True)
      break
    if (config.train.eval_every and step % config.train.eval_every == 0
        and step < total_steps):
      from zegformer_jax import evaluate
      evaluate.evaluate(config, workdir, state=state, split=config.dataset.periodic_eval_split,
                        variant='seg', tag=f'step{step}')
      writer.reset_timer()
  ckpt.close()
  writer.close()

  summary = {
      'experiment': config.experiment,
      'final_step': step,
      'final_loss': last.get('loss'),
      'final_loss_terms': {k: v for k, v in last.items() if k.startswith('loss')},
      'train_wall_s': time.time() - t_start,
      'params_fingerprint': checkpoints.params_fingerprint(jax.device_get(state['params'])),
  }
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'train_summary.json'), summary)
  return summary


class NonFiniteError(FloatingPointError):
  """A loss term or the gradient was NaN/inf; the update was not applied."""


def check_finite(step: int, metrics: dict):
  """Stops training on a non-finite loss or gradient, naming the step and the terms."""
  if not float(metrics.get('nonfinite', 0.0)):
    return
  bad = [k for k, v in metrics.items() if k != 'nonfinite' and not np.isfinite(v)]
  raise NonFiniteError(
      f'non-finite value at step {step}: '
      f'{", ".join(f"{k}={float(metrics[k])}" for k in bad) or "gradient"}; the update was '
      'not applied and the latest checkpoint is the last good state')


class PreemptionWatch:
  """SIGTERM (and, on multi-host jobs, JAX's preemption sync point) ends training cleanly.

  On one process a SIGTERM handler sets a flag. With several processes all of them must
  stop at the same step, which `multihost_utils.reached_preemption_sync_point` agrees on
  (the coordination service turns SIGTERM / TPU maintenance notices into that point).
  """

  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.signalled = False
    if not self.multihost:
      import signal
      try:
        signal.signal(signal.SIGTERM, self._handler)
      except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass

  def _handler(self, signum, frame):
    del signum, frame
    self.signalled = True

  def should_stop(self, step: int) -> bool:
    if self.multihost:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.signalled


def _init_from(path: str, state):
  """Loads params (and FrozenBN statistics) written by `python -m zegformer_jax.convert`."""
  from zegformer_jax import convert
  params, frozen = convert.load_params(path, state['params'], state['frozen'])
  return dict(state, params=params, frozen=frozen)


def _write_json(path: str, obj):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


def load_latest_state(config, workdir: str, num_classes: int):
  """(model, state) restored from the latest checkpoint of `workdir`, for eval/predict."""
  mesh = sharding.make_mesh()
  model = zegformer.build_model(config.model)
  optimizer_fn = functools.partial(optim.make_optimizer, config.optim, config.train.total_steps)
  state, state_sharding = create_train_state(
      config, model, optimizer_fn, num_classes, mesh, jax.random.key(config.seed))
  ckpt = checkpoints.Checkpointer(workdir, config.train.keep_checkpoints,
                                  config.train.checkpoint_every)
  step = ckpt.latest_step()
  if step is None:
    if config.train.init_from:
      return model, _init_from(config.train.init_from, state)
    raise FileNotFoundError(
        f'no checkpoint in {ckpt.directory}: train first (--mode train) or set '
        '--config.train.init_from')
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sharding)
  state = ckpt.restore(step, abstract)
  ckpt.close()
  return model, state
