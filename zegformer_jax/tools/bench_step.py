r"""Time of one training step of a config's model, on synthetic batches.

  python -m zegformer_jax.tools.bench_step [--config configs/shapesworld.py[:arg]] \
      [--config.key=value ...] [--steps 150] [--warmup 5] [--num_classes 26] \
      [--batch_file B.npz | --save_batch B.npz] [--peak_tflops 989] [--output R.jsonl]

The step is the one training runs (train.make_train_step: forward, Hungarian matching on the
host or on device as config.loss.matcher says, the set losses, AdamW), on the config's
global batch at its crop size, from a random initialisation. Batches are synthetic: each
image holds a random number of regions (1 to input.max_masks) of distinct random classes, so
matching and losses see real target masks; the text embeddings are random unit vectors.
Nothing is read from disk.

Each step is timed to completion: the median and the range are reported, with images/s,
the compiled step's FLOPs (XLA's count; benchmarking.py) and, given the device's peak
(`--peak_tflops`), the MFU. `--config.model.dtype=bfloat16` measures bfloat16. A fixed
batch (`--batch_file`, an .npz with image, label, target_classes and target_valid, e.g.
written by `--save_batch`) and fixed weights (`--config.train.init_from=DIR`, a weights
store) make two runs or two machines see the same work.

It doubles as a speed probe of the machine: ShapesWorld demo times are only comparable at
the same step time (BENCHMARKS.md gives the figure next to each demo run).
"""
from __future__ import annotations

import time

from absl import flags
from ml_collections import config_flags
import numpy as np

from zegformer_jax import cli
from zegformer_jax.tools import benchmarking

FLAGS = flags.FLAGS


def define_flags():
  cli.define_config_flag(cli.bundled_config('shapesworld.py'))
  flags.DEFINE_integer('steps', 150, 'Timed steps.')
  flags.DEFINE_integer('warmup', 5, 'Untimed steps after the first (compiling) one.')
  flags.DEFINE_integer('num_classes', 26, 'Training classes (ShapesWorld default split: 26).')
  flags.DEFINE_list('regions', [], 'LO,HI: each synthetic image holds LO..HI regions '
                    '(default 1..input.max_masks).')
  flags.DEFINE_bool('split', False, 'Also time the forward pass, forward + matching + '
                    'losses, and the gradient alone: the step\'s time split.')
  flags.DEFINE_string('batch_file', None, 'A fixed batch (.npz) used for every step.')
  flags.DEFINE_string('save_batch', None, 'Write the first synthetic batch to this .npz.')
  flags.DEFINE_float('peak_tflops', 0.0, 'Device peak TFLOP/s for the MFU (0: not reported).')
  flags.DEFINE_string('output', None, 'Also append the JSON line to this file.')


def synthetic_batches(config, num_classes: int, n: int, seed: int = 0, regions=None) -> list:
  """n train batches {'image', 'label', 'target_classes', 'target_valid'} (numpy), each
  image with a number of regions drawn from `regions` = (lo, hi) (default 1..max_masks)."""
  rng = np.random.default_rng(seed)
  b, size, m = config.input.global_batch_size, config.input.crop_size, config.input.max_masks
  lo, hi = regions or (1, m)
  if not 1 <= lo <= hi <= min(m, num_classes):
    raise ValueError(f'regions {lo},{hi}: need 1 <= lo <= hi <= min(max_masks, classes)')
  batches = []
  for _ in range(n):
    # uint8, as the input pipeline's train batches (the step normalises on device).
    image = rng.uniform(0, 256, (b, size, size, 3)).astype(np.uint8)
    classes = np.zeros((b, m), np.int32)
    valid = np.zeros((b, m), bool)
    label = np.empty((b, size, size), np.int32)
    for i in range(b):
      k = int(rng.integers(lo, hi + 1))
      classes[i, :k] = rng.choice(num_classes, k, replace=False)
      valid[i, :k] = True
      # k vertical bands, each of one class.
      edges = np.sort(rng.choice(np.arange(1, size), k - 1, replace=False))
      band = np.searchsorted(edges, np.arange(size), side='right')
      label[i] = classes[i, band][None, :]
    batches.append({'image': image, 'label': label, 'target_classes': classes,
                    'target_valid': valid})
  return batches


BATCH_KEYS = ('image', 'label', 'target_classes', 'target_valid')


def load_batch(path: str, config) -> dict:
  """A fixed batch from an .npz, checked against the config's batch and crop."""
  with np.load(path, allow_pickle=False) as z:
    missing = [k for k in BATCH_KEYS if k not in z.files]
    if missing:
      raise ValueError(f'{path}: no {missing} (a batch holds {BATCH_KEYS})')
    batch = {k: z[k] for k in BATCH_KEYS}
  want = (config.input.global_batch_size, config.input.crop_size, config.input.crop_size, 3)
  if batch['image'].shape != want:
    raise ValueError(f'{path}: image {batch["image"].shape}, the config wants {want}')
  return batch


def _median_time(fn, args, n: int) -> float:
  """Median seconds of fn(*args) to completion over n calls, after one untimed call."""
  import jax
  run = lambda: jax.block_until_ready(fn(*args))
  run()
  return float(np.median(benchmarking.call_times(run, max(n, 1))))


def time_split(config, model, mesh, state, batch, text, rng, n: int, step_s: float) -> dict:
  """The train step's time split (ms): the model's forward pass; matching and losses
  (forward + losses, minus the forward); the backward pass (the gradient, minus forward
  and losses); the optimiser and the rest of the step (the step, minus the gradient)."""
  import jax
  from zegformer_jax.modeling import preprocess
  from zegformer_jax.training import train
  loss_fn = train.make_loss_fn(config, model, mesh)
  mean, std = config.model.pixel_mean, config.model.pixel_std

  def forward(p, f, b, t, r):
    return model.apply({'params': p, 'frozen': f}, preprocess.normalize(b['image'], mean, std),
                       t, train=True, rngs={'dropout': r})

  args = (state['params'], state['frozen'], batch, text, rng)
  fwd = _median_time(jax.jit(forward), args, n)
  loss = _median_time(jax.jit(lambda *a: loss_fn(*a, 0)), args, n)
  grad = _median_time(jax.jit(jax.value_and_grad(lambda p, *a: loss_fn(p, *a, 0),
                                                 has_aux=True)), args, n)
  ms = lambda x: round(1e3 * x, 1)
  return {'forward_ms': ms(fwd), 'matching_and_losses_ms': ms(loss - fwd),
          'backward_ms': ms(grad - loss), 'optimiser_and_rest_ms': ms(step_s - grad)}


def measure(config, num_classes: int, steps: int, warmup: int, batch_file: str = None,
            save_batch: str = None, peak_tflops: float = 0.0, regions=None,
            split: bool = False) -> dict:
  """{'compile_s', 'first_step_s', 'step_ms' (median), its median/min/max,
  'images_per_s', 'flops_per_step', 'tflops_per_s', 'mfu', 'final_loss'}."""
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
  if config.train.init_from:   # fixed weights; otherwise the random initialisation
    state = state_lib.init_from(config.train.init_from, state)
  step = train.make_train_step(config, model, optimizer_fn(state['params']), mesh,
                               state_sharding)
  rng = np.random.default_rng(1)
  text = rng.normal(size=(num_classes, config.model.embed_dim)).astype(np.float32)
  text = sharding.replicate(text / np.linalg.norm(text, axis=1, keepdims=True), mesh)
  dropout = sharding.replicate(jax.random.key_data(jax.random.key(2)), mesh)
  if batch_file:
    batches = [load_batch(batch_file, config)]
  else:
    batches = synthetic_batches(config, num_classes, 16, regions=regions)
  if save_batch:
    np.savez(save_batch, **batches[0])
  # As training does: target slots cut to the batch's bucket (config.input.target_buckets).
  batches = [train.bucket_targets(b, config) for b in batches]
  t = time.perf_counter()
  flops = benchmarking.compiled_flops(step.lower(state, batches[0], text, dropout).compile())
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  state, metrics = step(state, batches[0], text, dropout)
  jax.block_until_ready(metrics)
  first = time.perf_counter() - t
  for i in range(warmup):
    state, metrics = step(state, batches[i % len(batches)], text, dropout)
  jax.block_until_ready(metrics)
  times = []
  for i in range(max(steps, 1)):
    t = time.perf_counter()
    state, metrics = step(state, batches[i % len(batches)], text, dropout)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  median = float(np.median(times))
  extra = {}
  if split:
    rng = jax.random.fold_in(jax.random.key(2), 0)
    extra = time_split(config, model, mesh, state, batches[0], text, rng, min(steps, 5),
                       median)
  return {**extra, 'compile_s': round(compile_s, 2), 'first_step_s': round(first, 2),
          'step_ms': round(median * 1e3, 2),
          **benchmarking.time_stats(times, 'step_ms'),
          'images_per_s': round(config.input.global_batch_size / median, 3),
          'flops_per_step': flops, **benchmarking.throughput(flops, median, peak_tflops),
          'final_loss': float(metrics['loss'])}


def main(argv) -> None:
  del argv
  config = FLAGS.config
  regions = tuple(int(x) for x in FLAGS.regions) if FLAGS.regions else None
  if regions is not None and len(regions) != 2:
    raise ValueError(f'--regions takes LO,HI; got {FLAGS.regions}')
  result = measure(config, FLAGS.num_classes, FLAGS.steps, FLAGS.warmup, FLAGS.batch_file,
                   FLAGS.save_batch, FLAGS.peak_tflops, regions, FLAGS.split)
  import jax
  benchmarking.emit(dict(tool='bench_step', regions=FLAGS.regions or None,
                         target_buckets=list(config.input.get('target_buckets', ())),
                         config=config_flags.get_config_filename(FLAGS['config']),
                         device=jax.devices()[0].device_kind, dtype=config.model.dtype,
                         batch=config.input.global_batch_size, crop=config.input.crop_size,
                         **result), FLAGS.output)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
