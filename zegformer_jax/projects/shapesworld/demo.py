r"""`make demo`: ShapesWorld end to end on CPU.

  generate the world -> pretrain the miniature CLIP on all classes and the backbone on
  seen-class scenes (prepare) -> train ZegFormer on the seen classes -> evaluate
  ZegFormer-seg, ZegFormer-img and the fused ZegFormer on all classes
  (metrics_{seg,img,full}.json) -> prediction overlays of a few validation images.

With the config's test-time augmentation on (ShapesWorld: two sizes, each flipped), the
single-view results are written too (metrics_{seg,img,full}_single_view.json), so one run
shows both. The first steps are what

  python -m zegformer_jax.main --config configs/shapesworld.py --workdir runs/shapesworld \
      --variants seg,img,full

does. Another world or seed is a config override, as for main:

  python -m zegformer_jax.projects.shapesworld.demo --config.shapesworld.split=alt \
      --config.shapesworld.seed=1 --config.seed=1
"""
import os
import time

from absl import flags

from zegformer_jax import cli

FLAGS = flags.FLAGS


def define_flags():
  cli.define_config_flag(cli.bundled_config('shapesworld.py'))
  flags.DEFINE_string('workdir', 'runs/shapesworld', 'Where the demo writes everything.')
  flags.DEFINE_list('variants', ['seg', 'img', 'full'], 'Evaluation variants.')
  flags.DEFINE_integer('num_overlays', 4, 'Validation images to write prediction overlays for.')


def main(argv):
  del argv
  from zegformer_jax.evaluation import evaluator
  from zegformer_jax.modeling import tta
  from zegformer_jax.projects.shapesworld import prepare
  from zegformer_jax.training import train
  t0 = time.time()
  os.makedirs(FLAGS.workdir, exist_ok=True)
  config = prepare.prepare(FLAGS.config, FLAGS.workdir)
  # config.json as `main` writes it, so tools.compare and readers see the demo's run alike.
  from zegformer_jax.training import checkpoints
  from zegformer_jax.training import metric_writers
  metric_writers.record_config(FLAGS.workdir, config.to_json_best_effort(indent=2),
                               resuming=checkpoints.has_checkpoint(FLAGS.workdir))
  summary = train.train(config, FLAGS.workdir)
  _, state = evaluator.load_trained_state(config, FLAGS.workdir)   # once, for both evaluations
  results = evaluator.evaluate_variants(config, FLAGS.workdir, FLAGS.variants, state=state)
  overlays = write_overlays(config, FLAGS.workdir, FLAGS.num_overlays)
  single = {}
  if tta.enabled(config.eval, config.input):
    plain = config.copy_and_resolve_references()
    with plain.unlocked():
      plain.eval.aug_min_sizes, plain.eval.aug_flip, plain.eval.aug_max_size = (), False, 0
    single = evaluator.evaluate_variants(plain, FLAGS.workdir, FLAGS.variants, state=state,
                                         tag='single_view')
  print(f'\nShapesWorld demo finished in {time.time() - t0:.0f} s '
        f'({summary["final_step"]} steps, final loss {summary["final_loss"]:.4f})')
  for tag, res in (('', results), ('_single_view', single)):
    for v, r in res.items():
      views = ', '.join(f'{x["min_size"]}{" flipped" if x["flip"] else ""}'
                        for x in r['test_views'])
      print(f'  {v:4s}  seen mIoU {r["mIoU_seen"]:.2f}  unseen mIoU {r["mIoU_unseen"]:.2f}  '
            f'hIoU {r["hIoU"]:.2f}  (views: {views})  '
            f'-> {os.path.join(FLAGS.workdir, f"metrics_{v}{tag}.json")}')
  if overlays:
    print(f'  overlays: {os.path.dirname(overlays[0])}/*_overlay.png')


def write_overlays(config, workdir, n):
  """Prediction overlays (all classes, config.eval.variant) of the first n val images:
  input | prediction | ground truth (the record's label, in the eval split's class list)."""
  if n <= 0:
    return []
  from PIL import Image
  from zegformer_jax.data import data_source
  from zegformer_jax.data import input_pipeline
  from zegformer_jax.tools import predict
  data_dir = config.dataset.data_dir
  source, _ = data_source.open_split(data_dir, config.dataset.eval_split)
  names, _ = input_pipeline.dataset_classes(data_dir, config.dataset.eval_split)
  inputs = os.path.join(workdir, 'predict_inputs')
  os.makedirs(inputs, exist_ok=True)
  paths, ground_truths = [], {}
  for i in range(min(n, len(source))):
    record = source[i]
    path = os.path.join(inputs, f'val_{i:03d}.png')
    Image.fromarray(record['image']).save(path)
    paths.append(path)
    ground_truths[path] = record['label']
  class_file = os.path.join(workdir, 'predict_inputs', 'classes.txt')
  with open(class_file, 'w') as f:
    f.write('\n'.join(names) + '\n')
  out = os.path.join(workdir, 'predict')
  predict.run(config, workdir, images=','.join(paths), class_file=class_file, output_dir=out,
              ground_truths=ground_truths)
  return [os.path.join(out, os.path.splitext(os.path.basename(p))[0] + '_overlay.png')
          for p in paths]


if __name__ == '__main__':
  define_flags()
  cli.run(main)
