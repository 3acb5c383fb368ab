"""The training loop, top to bottom.

  config -> mesh (data x fsdp, every device of every process) -> data (grain, this
  process's share of each global batch) -> seen-class text embeddings (CLIP, cached)
  -> model + optimiser -> restore the newest intact checkpoint (state, data iterator) if any
  -> loop: jitted train step (forward, Hungarian matching on the host, losses, AdamW)
  -> numerics guard, logs (JSONL, TensorBoard, console; process 0) and checkpoints
  -> train_summary.json (process 0)

The train step is compiled once: the batch has a static shape (targets padded to
`input.max_masks`), the state is donated, and in/out shardings are explicit (state
replicated, or split over `fsdp` with config.mesh.fsdp > 1; batch split over data x fsdp).

Stopping early:
  * SIGTERM (or, on multi-process jobs, JAX's preemption sync point) finishes the current
    step, saves a checkpoint and returns with summary['preempted'] = True; the CLI exits 0.
  * A non-finite loss or gradient is never applied (the step keeps the old state) and raises
    NonFiniteError naming the step and the terms; nothing is saved after it, so the latest
    checkpoint is the last good state.
The host reads each step's metrics one step late, so it can queue step n+1 while step n
runs; before any checkpoint the current step's metrics are checked first.
"""
import json
import logging
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zegformer_jax.data import input_pipeline
from zegformer_jax.modeling import clip
from zegformer_jax.modeling import criterion
from zegformer_jax.modeling import methods
from zegformer_jax.modeling import per_pixel
from zegformer_jax.modeling import preprocess
from zegformer_jax.modeling import zegclip_loss
from zegformer_jax.training import checkpoints
from zegformer_jax.training import generative
from zegformer_jax.training import metric_writers
from zegformer_jax.training import optim
from zegformer_jax.training import self_training
from zegformer_jax.training import sharding
from zegformer_jax.training import state as state_lib


def make_loss_fn(config, model, mesh):
  """loss_fn(params, frozen, batch, text_embeddings, rng, step) -> (loss, terms): the
  method's training loss of a batch (forward pass, matching, losses), not jitted."""
  mean, std = config.model.pixel_mean, config.model.pixel_std
  nan_step = int(config.train.get('debug_nan_step', 0))
  pixel_level = methods.is_pixel_method(config.model)
  one_stage = methods.method_name(config.model) == 'zegclip'

  def loss_fn(params, frozen, batch, text_embeddings, rng, step):
    images = preprocess.normalize(batch['image'], mean, std)
    outputs = model.apply({'params': params, 'frozen': frozen}, images, text_embeddings,
                          train=True, rngs={'dropout': rng})
    if nan_step > 0:  # testing hook (config.train.debug_nan_step): a diverged mask head
      key = 'pred_masks' if methods.has_segments(config.model) else 'sem_seg_logits'
      poison = jnp.where(step + 1 == nan_step, jnp.nan, 0.0).astype(outputs[key].dtype)
      outputs = dict(outputs, **{key: outputs[key].at[-1].add(poison)})
    if pixel_level:   # SPNet-FPN, ZS3Net: per-pixel cross-entropy on the seen classes
      loss, terms = per_pixel.pixel_cross_entropy(outputs['sem_seg_logits'], batch['label'],
                                                  config.dataset.ignore_value)
      return loss, {'loss_sem_seg': terms['loss_sem_seg']}
    if one_stage:     # ZegCLIP: per-class sigmoid focal + dice at the input's resolution
      loss, terms = zegclip_loss.zegclip_loss(
          outputs['sem_seg_logits'], batch['label'], text_embeddings.shape[0],
          config.dataset.ignore_value, focal_weight=config.loss.mask_weight,
          dice_weight=config.loss.dice_weight, alpha=config.loss.focal_alpha,
          gamma=config.loss.focal_gamma)
      return loss, {k: terms[k] for k in ('loss_focal', 'loss_dice')}
    targets = dict(batch, target_masks=criterion.masks_from_label(
        batch['label'], batch['target_classes'], batch['target_valid']))
    return criterion.compute_loss(outputs, targets, config.loss, mesh)

  return loss_fn


def make_train_step(config, model, optimizer, mesh, state_sharding):
  """Returns train_step(state, batch, text_embeddings, rng_data) -> (state, metrics), jitted.

  rng_data is the dropout key as raw bits (jax.random.key_data), replicated.
  """
  schedule = optim.schedule_from_config(config.optim, config.train.total_steps)
  loss_fn = make_loss_fn(config, model, mesh)

  def train_step(state, batch, text_embeddings, rng_data):
    # The dropout key depends only on the step, so a resumed run draws the same masks.
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(rng_data), state['step'])
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state['params'], state['frozen'], batch, text_embeddings, step_rng, state['step'])
    metrics = dict(terms)
    metrics['loss'] = loss
    metrics['grad_norm'] = optax.tree.norm(grads)
    metrics['lr'] = schedule(state['step'])
    # Numerics guard: a step whose loss or gradient is not finite leaves params and
    # optimiser state untouched; the host sees `nonfinite` and stops before saving. The
    # optimiser keeps its own state (optim.scale_by_adam says why it is not done here).
    finite = jnp.isfinite(loss) & jnp.isfinite(metrics['grad_norm'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'],
                                          apply=finite)
    params = optim.keep_where(finite, optax.apply_updates(state['params'], updates),
                              state['params'])
    metrics['nonfinite'] = (~finite).astype(jnp.float32)
    new_state = dict(state, step=state['step'] + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return jax.jit(
      train_step,
      in_shardings=(state_sharding, sharding.data_sharding(mesh), sharding.replicated(mesh),
                    sharding.replicated(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=(0,))


TRAIN_KEYS = ('image', 'label', 'target_classes', 'target_valid')


def bucket_targets(batch: dict, config) -> dict:
  """This process's batch with its target slots cut to the bucket the global batch needs
  (config.input.target_buckets; input_pipeline.target_slots): every process agrees on it,
  since they must run the same program."""
  buckets = tuple(config.input.get('target_buckets', ()))
  if not buckets:
    return batch
  most = int(batch['target_valid'].sum(axis=1).max(initial=0))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    most = int(np.max(multihost_utils.process_allgather(np.int32(most))))
  slots = input_pipeline.target_slots(most, buckets, config.input.max_masks)
  return input_pipeline.trim_targets(batch, slots)


def train(config, workdir: str, evaluators=()) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the summary.

  Every path is read from the config as it is (dataset.data_dir, clip.model_path,
  train.init_from); a project that makes its own data or weights resolves them first
  (see main). `evaluators` (evaluation.evaluator.Evaluator or anything with
  due(step, total_steps) and run(state, step)) are run when due.
  """
  # First, so a SIGTERM during start-up or compilation is honoured after the first step.
  preemption = PreemptionWatch()
  try:
    return _train(config, workdir, preemption, tuple(evaluators))
  finally:
    preemption.close()


def _train(config, workdir: str, preemption: 'PreemptionWatch', evaluators: tuple) -> dict:
  check_train_config(config)
  config = self_training.prepare(config, workdir)   # transductive runs: pseudo-labelled data
  mesh = sharding.mesh_from_config(config)
  sharding.local_batch_size(config.input.global_batch_size, mesh)  # validates divisibility
  data_dir = input_pipeline.data_dir(config)
  class_names, _ = input_pipeline.dataset_classes(data_dir, config.dataset.train_split)
  text_embeddings = clip.class_embeddings(config, workdir, class_names,
                                               config.clip.train_prompts)
  if text_embeddings.shape[1] != config.model.embed_dim:
    raise ValueError(
        f'CLIP text embeddings have width {text_embeddings.shape[1]} but '
        f'config.model.embed_dim is {config.model.embed_dim}')

  model = methods.build_model(config.model)
  total_steps = config.train.total_steps
  rng = jax.random.key(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  optimizer_fn = state_lib.make_optimizer_fn(config, total_steps)
  data_iter = input_pipeline.make_train_iterator(config, data_dir)
  ckpt = checkpoints.Checkpointer(workdir, config.train.keep_checkpoints,
                                  config.train.checkpoint_every)
  start = ckpt.latest_step()
  state, state_sharding = state_lib.create_train_state(
      config, model, optimizer_fn, len(class_names), mesh, init_rng,
      abstract_only=start is not None)
  if start is not None:
    # The newest intact step: a damaged one is named in a warning line and moved aside.
    restored = ckpt.restore_latest(state, data_iter)
    if restored is None:
      raise checkpoints.CorruptCheckpointError(f'no intact checkpoint in {ckpt.directory}')
    start, state = restored
    logging.info('resuming from %s/%d', ckpt.directory, start)
  elif self_training.enabled(config):
    logging.info('self-training: starting from %s', config.self_training.source_workdir)
    state = self_training.init_from_source(config, state)
  elif config.train.init_from:
    state = state_lib.init_from(config.train.init_from, state)
  else:
    state = state_lib.with_pretrained_weights(config, state)   # ZegCLIP: CLIP's weights

  optimizer = optimizer_fn(state['params'])
  train_step = make_train_step(config, model, optimizer, mesh, state_sharding)
  text_embeddings = sharding.replicate(text_embeddings, mesh)
  dropout_rng = sharding.replicate(jax.random.key_data(dropout_rng), mesh)  # raw uint32 bits
  # Resuming from `start`: the log's entries after it (the interrupted run's) are dropped.
  writer = metric_writers.MetricWriter(workdir, total_steps, resume_step=start or 0)

  step = int(state['step'])
  last = {}
  pending = None  # (step, metrics on device) whose host side has not run yet
  preempted = False
  t_start = time.time()

  def finish(step, metrics):
    """Host side of a step: the numerics guard, then logging."""
    nonlocal last
    metrics = jax.device_get(metrics)
    if metrics['nonfinite']:
      check_finite(step, metrics, ckpt.latest_step())  # raises NonFiniteError
    if step % config.train.log_every == 0 or step == total_steps or step == 1:
      last = writer.write(step, {k: float(v) for k, v in metrics.items() if k != 'nonfinite'})
      if step == 1:
        writer.reset_timer()  # the first step includes compilation

  try:
    while step < total_steps:
      batch = sharding.shard_batch(bucket_targets(
          {k: v for k, v in next(data_iter).items() if k in TRAIN_KEYS}, config), mesh)
      state, metrics = train_step(state, batch, text_embeddings, dropout_rng)
      step += 1
      # Step n-1's metrics are read while step n runs: no stall of the dispatch queue, and
      # the host still never runs more than one step ahead of the device.
      if pending:
        finish(*pending)
      pending = (step, metrics)

      preempted = preemption.should_stop(step)
      due = [e for e in evaluators if e.due(step, total_steps)]
      if ckpt.due(step) or step == total_steps or preempted or due:
        finish(*pending)  # a state is saved or evaluated only after its step passed the guard
        pending = None
        if ckpt.due(step) or step == total_steps or preempted:
          ckpt.save(step, state, data_iter, force=True)
          writer.reset_timer()
      if preempted:
        logging.warning('preempted: saved step %d in %s; rerun to resume', step, ckpt.directory)
        if jax.process_index() == 0:
          print(f'preempted at step {step}: checkpoint saved in {ckpt.directory}; rerun the '
              f'same command to resume ({preemption.signalled or "preemption sync point"})',
              flush=True)
        break
      for evaluator in due:
        evaluator.run(state, step)
        writer.reset_timer()
    if pending:
      finish(*pending)
  finally:
    _wind_down(state, ckpt, writer)

  stage = None
  if (methods.method_name(config.model) == 'zs3net' and not preempted
      and step >= total_steps):
    stage = _generative_stage(config, workdir, model, state, mesh)

  summary = {
      'experiment': config.experiment,
      'final_step': step,
      'preempted': preempted,
      'final_loss': last.get('loss'),
      'final_loss_terms': {k: v for k, v in last.items() if k.startswith('loss')},
      'train_wall_s': time.time() - t_start,
      'num_processes': jax.process_count(),
      'num_devices': jax.device_count(),
      'mesh': dict(mesh.shape),
      'params_fingerprint': checkpoints.params_fingerprint(
          sharding.to_host(state['params'], mesh)),
  }
  if stage is not None:
    summary['zs3net'] = {k: stage[k] for k in ('steps', 'mmd_first', 'mmd_last', 'collect_s',
                                              'generator_s') if k in stage}
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'train_summary.json'), summary)
  return summary


def _generative_stage(config, workdir, model, state, mesh) -> dict:
  """ZS3Net's generator and feature bank (training/generative.py), made by process 0 from
  the final state; the other processes wait for it."""
  params = sharding.to_host(state['params'], mesh)
  frozen = sharding.to_host(state['frozen'], mesh)
  stats = None
  if jax.process_index() == 0:
    print('ZS3Net: collecting seen-class features and training the generator', flush=True)
    stats = generative.run_stage(config, workdir, model, params, frozen)
    print(f'ZS3Net generator: MMD {stats["mmd_first"]:.4f} -> {stats["mmd_last"]:.4f} in '
          f'{stats["steps"]} steps', flush=True)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('zs3net_generative_stage')
  return stats


def _wind_down(state, ckpt, writer):
  """End of training, normal or not: wait for the device, close checkpointer and logs.

  After an error the step dispatched last may still be running, and its matching callback
  calls into Python: letting the interpreter shut down under it aborts the process.
  """
  try:
    jax.block_until_ready(state)
  except Exception:  # pylint: disable=broad-except  (e.g. buffers donated to a failed call)
    pass
  ckpt.close()
  writer.close()


class NonFiniteError(FloatingPointError):
  """A loss term or the gradient was NaN/inf; the update was not applied."""


def check_finite(step: int, metrics: dict, last_good_step=None):
  """Stops training on a non-finite loss or gradient, naming the step and the terms."""
  if not float(metrics.get('nonfinite', 0.0)):
    return
  bad = sorted(k for k, v in metrics.items() if k != 'nonfinite' and not np.isfinite(v))
  terms = [k for k in bad if k.startswith('loss_')]  # the culprits; total and grad follow
  rest = [k for k in bad if k not in terms]
  fmt = lambda keys: ', '.join(f'{k}={float(metrics[k])}' for k in keys)
  what = (f'non-finite loss term {fmt(terms)}' + (f' ({fmt(rest)})' if rest else '')
          if terms else f'non-finite {fmt(rest) or "gradient"}')
  where = (f'checkpoint step {last_good_step} is the last good state' if last_good_step
           is not None else 'no checkpoint was written')
  raise NonFiniteError(f'{what} at step {step}; the update was not applied and training '
                       f'stopped ({where})')


class PreemptionWatch:
  """SIGTERM, Ctrl-C (and, on multi-host jobs, JAX's preemption sync point) end training
  cleanly: the current step finishes, a checkpoint is saved, nothing is lost.

  On one process a handler of SIGTERM and SIGINT sets a flag; a second Ctrl-C while the
  first is being honoured raises KeyboardInterrupt as usual (a user who insists). With
  several processes all of them must stop at the same step, which
  `multihost_utils.reached_preemption_sync_point` agrees on (the coordination service turns
  SIGTERM / TPU maintenance notices into that point; launch/ forwards Ctrl-C as SIGTERM).
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.multihost = jax.process_count() > 1
    self.signalled = None   # the first signal's name
    self._previous = {}
    if not self.multihost:
      try:
        for sig in self.SIGNALS:
          self._previous[sig] = signal.signal(sig, self._handler)
      except ValueError:  # not the main thread (e.g. inside a test runner thread)
        pass

  def _handler(self, signum, frame):
    del frame
    name = signal.Signals(signum).name
    if self.signalled and signum == signal.SIGINT:
      raise KeyboardInterrupt   # Ctrl-C twice: stop now, without the checkpoint
    if not self.signalled:
      logging.warning('%s: stopping after this step with a checkpoint%s', name,
                      ' (Ctrl-C again to stop at once)' if signum == signal.SIGINT else '')
      self.signalled = name

  def should_stop(self, step: int) -> bool:
    if self.multihost:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return bool(self.signalled)

  def close(self):
    """Puts back the previous handlers (train() may run inside a longer process)."""
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}


def check_train_config(config) -> None:
  """Refuses, before anything runs, training settings that cannot give a useful run."""
  steps = config.train.total_steps
  if steps < 1:
    raise ValueError(f'config.train.total_steps must be >= 1, got {steps}')
  lr = float(config.optim.lr)
  if not math.isfinite(lr) or lr < 0:
    raise ValueError(f'config.optim.lr must be a finite number >= 0, got {config.optim.lr}')


def _write_json(path: str, obj):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
