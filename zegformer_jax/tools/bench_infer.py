r"""Inference time per image of a config's model at its test setting, from random weights.

  python -m zegformer_jax.tools.bench_infer --config configs/coco_stuff_zegclip_vitb16.py \
      [--config.key=value ...] [--size 512] [--num_classes 171] [--images 3] [--warmup 1] \
      [--peak_tflops 989] [--output R.jsonl]

What evaluation runs for one image (segmenter.make_scores_fn: normalisation, the model,
every variant of config.eval.variant, sliding windows and test views as configured, the
resize to the label and Eq. 2), jitted, on a random `size` x `size` image, with
`num_classes` random unit text embeddings (171: COCO-Stuff's seen + unseen). The weights
are random initialisations of the config's shapes, CLIP's included (a ViT-B/16-shaped
FlaxCLIPModel for ZegFormer's image branch; ZegCLIP's frozen tower is its own), so nothing
is read from disk and any two configs compare at the recipe's sizes. The first (compiling)
call is reported apart; the time is the median over `images` calls after `warmup` more,
with its range, images/s, the compiled program's FLOPs (XLA's count) and, given the
device's peak, the MFU (benchmarking.py). It prints one JSON line.
"""
from __future__ import annotations

import statistics
import time

from absl import flags
from ml_collections import config_flags
import numpy as np

from zegformer_jax import cli
from zegformer_jax.tools import benchmarking

FLAGS = flags.FLAGS

# openai/clip-vit-base-patch16 (config.json): the image branch's CLIP when no weights are read.
VIT_B16 = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
               num_attention_heads=12, image_size=224, patch_size=16)


def define_flags():
  cli.define_config_flag(cli.bundled_config('coco_stuff_zegclip_vitb16.py'))
  flags.DEFINE_integer('size', 512, 'Side of the square test image (pixels).')
  flags.DEFINE_integer('num_classes', 171, 'Classes scored (COCO-Stuff: 156 seen + 15 unseen).')
  flags.DEFINE_integer('num_seen', 156, 'The first num_seen classes are seen (Eq. 2).')
  flags.DEFINE_integer('images', 3, 'Timed calls (one image each).')
  flags.DEFINE_integer('warmup', 1, 'Untimed calls after the first (compiling) one.')
  flags.DEFINE_float('peak_tflops', 0.0, 'Device peak TFLOP/s for the MFU (0: not reported).')
  flags.DEFINE_string('output', None, 'Also append the JSON line to this file.')


def random_clip_model(seed: int = 0):
  """A FlaxCLIPModel of ViT-B/16's shapes with random weights (text tower at its defaults)."""
  from transformers import CLIPConfig, FlaxCLIPModel
  config = CLIPConfig(vision_config=VIT_B16, projection_dim=512)
  return FlaxCLIPModel(config, seed=seed)


def measure(config, size: int, num_classes: int, num_seen: int, images: int,
            warmup: int, peak_tflops: float = 0.0) -> dict:
  """{'compile_s', 'first_s', 'per_image_s' (median), 'per_image_all_s', per-image ms
  median/min/max, 'images_per_s', 'flops_per_image', 'tflops_per_s', 'mfu', 'variants',
  'views'}."""
  import jax
  import jax.numpy as jnp
  from zegformer_jax.modeling import methods
  from zegformer_jax.modeling import segmenter
  from zegformer_jax.modeling import tta

  variants = segmenter.check_variants(str(config.eval.variant).split(','), config.model)
  model = methods.build_model(config.model)
  variables = methods.init_variables(model, jax.random.key(config.seed),
                                     image_hw=(config.input.crop_size,) * 2,
                                     num_classes=num_classes)
  rng = np.random.default_rng(1)

  def unit(n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return jnp.asarray(x / np.linalg.norm(x, axis=1, keepdims=True))

  text = unit(num_classes, config.model.embed_dim)
  seen = jnp.arange(num_classes) < num_seen
  clip_model = clip_params = clip_text = None
  if any(v != 'seg' for v in variants):
    clip_model = random_clip_model()
    clip_params = clip_model.params
    clip_text = unit(num_classes, clip_model.config.projection_dim)
  hw = np.asarray([[size, size]], np.int32)
  view_shapes = None
  batch = {'image': None, 'image_hw': hw, 'label_hw': hw}
  if tta.enabled(config.eval, config.input):
    view_shapes = tta.padded_view_shapes(config.eval, config.input, [(size, size)])
    batch['view_hw'] = tta.view_sizes(config.eval, config.input, hw)
  scores = jax.jit(segmenter.make_scores_fn(config, model, variants, (size, size), clip_model,
                                            view_shapes))
  padded = -(-size // config.input.size_divisibility) * config.input.size_divisibility
  image = rng.uniform(0, 255, (1, padded, padded, 3)).astype(np.float32)
  batch['image'] = jnp.asarray(image)

  args = (variables['params'], variables['frozen'], batch, text, seen, clip_params, clip_text)

  def run():
    jax.block_until_ready(scores(*args))

  t = time.perf_counter()
  flops = benchmarking.compiled_flops(scores.lower(*args).compile())
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  run()
  first = time.perf_counter() - t
  for _ in range(warmup):
    run()
  times = benchmarking.call_times(run, images)
  median = statistics.median(times)
  return {'compile_s': round(compile_s, 2), 'first_s': round(first, 2),
          'per_image_s': round(median, 3), 'per_image_all_s': [round(x, 3) for x in times],
          **benchmarking.time_stats(times, 'per_image_ms'),
          'images_per_s': round(1 / median, 3), 'flops_per_image': flops,
          **benchmarking.throughput(flops, median, peak_tflops), 'variants': list(variants),
          'image_branch': str(config.eval.get('image_branch', 'crops')),
          'views': len(tta.views(config.eval, config.input)) if view_shapes else 1}


def main(argv) -> None:
  del argv
  config = FLAGS.config
  result = measure(config, FLAGS.size, FLAGS.num_classes, FLAGS.num_seen, FLAGS.images,
                   FLAGS.warmup, FLAGS.peak_tflops)
  import jax
  benchmarking.emit(dict(tool='bench_infer',
                         config=config_flags.get_config_filename(FLAGS['config']),
                         device=jax.devices()[0].device_kind, dtype=config.model.dtype,
                         method=config.model.name, size=FLAGS.size,
                         num_classes=FLAGS.num_classes, **result), FLAGS.output)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
