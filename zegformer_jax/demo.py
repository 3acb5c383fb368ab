r"""`make demo`: ShapesWorld end to end on CPU.

Generates the world, trains ZegFormer on its seen classes, evaluates on all classes, and
prints where the metrics are. Equivalent to

  python -m zegformer_jax.main --config configs/shapesworld.py --workdir runs/shapesworld
"""
import os
import time

from absl import app
from absl import flags

flags.DEFINE_string('workdir', 'runs/shapesworld', 'Where the demo writes everything.')
flags.DEFINE_string('config_arg', '', 'Argument of configs/shapesworld.py (e.g. smoke).')
flags.DEFINE_list('variants', ['seg'], 'Evaluation variants.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from configs import shapesworld
  from zegformer_jax import evaluate
  from zegformer_jax import train
  t0 = time.time()
  config = shapesworld.get_config(FLAGS.config_arg or None)
  os.makedirs(FLAGS.workdir, exist_ok=True)
  summary = train.train(config, FLAGS.workdir)
  results = {v: evaluate.evaluate(config, FLAGS.workdir, variant=v) for v in FLAGS.variants}
  print(f'\nShapesWorld demo finished in {time.time() - t0:.0f} s '
        f'({summary["final_step"]} steps, final loss {summary["final_loss"]:.4f})')
  for v, r in results.items():
    print(f'  {v:4s}  seen mIoU {r["mIoU_seen"]:.2f}  unseen mIoU {r["mIoU_unseen"]:.2f}  '
          f'hIoU {r["hIoU"]:.2f}  -> {os.path.join(FLAGS.workdir, f"metrics_{v}.json")}')


if __name__ == '__main__':
  app.run(main)
