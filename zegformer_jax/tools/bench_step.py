r"""Time of one training step of a config's model, on synthetic batches.

  python -m zegformer_jax.tools.bench_step [--config configs/shapesworld.py[:arg]] \
      [--config.key=value ...] [--steps 150] [--warmup 5] [--num_classes 26]

The step is the one training runs (train.make_train_step: forward, Hungarian matching on the
host or on device as config.loss.matcher says, the set losses, AdamW), on the config's
global batch at its crop size, from a random initialisation. Batches are synthetic: each
image holds a random number of regions (1 to input.max_masks) of distinct random classes, so
matching and losses see real target masks; the text embeddings are random unit vectors.
Nothing is read from disk.

It doubles as a speed probe of the machine: ShapesWorld demo times are only comparable at
the same step time (BENCHMARKS.md gives the figure next to each demo run).
"""
from __future__ import annotations

import json
import time

from absl import flags
from ml_collections import config_flags
import numpy as np

from zegformer_jax import cli

FLAGS = flags.FLAGS


def define_flags():
  cli.define_config_flag(cli.bundled_config('shapesworld.py'))
  flags.DEFINE_integer('steps', 150, 'Timed steps.')
  flags.DEFINE_integer('warmup', 5, 'Untimed steps after the first (compiling) one.')
  flags.DEFINE_integer('num_classes', 26, 'Training classes (ShapesWorld default split: 26).')


def synthetic_batches(config, num_classes: int, n: int, seed: int = 0) -> list:
  """n train batches {'image', 'label', 'target_classes', 'target_valid'} (numpy)."""
  rng = np.random.default_rng(seed)
  b, size, m = config.input.global_batch_size, config.input.crop_size, config.input.max_masks
  batches = []
  for _ in range(n):
    image = rng.uniform(0, 255, (b, size, size, 3)).astype(np.float32)
    classes = np.zeros((b, m), np.int32)
    valid = np.zeros((b, m), bool)
    label = np.empty((b, size, size), np.int32)
    for i in range(b):
      k = int(rng.integers(1, m + 1))
      classes[i, :k] = rng.choice(num_classes, k, replace=False)
      valid[i, :k] = True
      # k vertical bands, each of one class.
      edges = np.sort(rng.choice(np.arange(1, size), k - 1, replace=False))
      band = np.searchsorted(edges, np.arange(size), side='right')
      label[i] = classes[i, band][None, :]
    batches.append({'image': image, 'label': label, 'target_classes': classes,
                    'target_valid': valid})
  return batches


def measure(config, num_classes: int, steps: int, warmup: int) -> dict:
  """{'first_step_s' (compilation included), 'step_ms', 'final_loss'}."""
  import jax
  from zegformer_jax.modeling import methods
  from zegformer_jax.training import sharding
  from zegformer_jax.training import state as state_lib
  from zegformer_jax.training import train

  mesh = sharding.mesh_from_config(config)
  model = methods.build_model(config.model)
  optimizer_fn = state_lib.make_optimizer_fn(config, max(steps, 1))
  state, state_sharding = state_lib.create_train_state(
      config, model, optimizer_fn, num_classes, mesh, jax.random.key(config.seed))
  step = train.make_train_step(config, model, optimizer_fn(state['params']), mesh,
                               state_sharding)
  rng = np.random.default_rng(1)
  text = rng.normal(size=(num_classes, config.model.embed_dim)).astype(np.float32)
  text = sharding.replicate(text / np.linalg.norm(text, axis=1, keepdims=True), mesh)
  dropout = sharding.replicate(jax.random.key_data(jax.random.key(2)), mesh)
  batches = synthetic_batches(config, num_classes, 16)
  t = time.time()
  state, metrics = step(state, batches[0], text, dropout)
  jax.block_until_ready(metrics)
  first = time.time() - t
  for i in range(warmup):
    state, metrics = step(state, batches[i % len(batches)], text, dropout)
  jax.block_until_ready(metrics)
  t = time.time()
  for i in range(steps):
    state, metrics = step(state, batches[i % len(batches)], text, dropout)
  jax.block_until_ready(metrics)
  return {'first_step_s': round(first, 2),
          'step_ms': round((time.time() - t) / max(steps, 1) * 1e3, 2),
          'final_loss': float(metrics['loss'])}


def main(argv) -> None:
  del argv
  config = FLAGS.config
  result = measure(config, FLAGS.num_classes, FLAGS.steps, FLAGS.warmup)
  print(json.dumps(dict(config=config_flags.get_config_filename(FLAGS['config']),
                        batch=config.input.global_batch_size, crop=config.input.crop_size,
                        **result)))


if __name__ == '__main__':
  define_flags()
  cli.run(main)
