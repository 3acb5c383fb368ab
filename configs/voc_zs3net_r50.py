r"""ZS3Net R-50 on PASCAL VOC: its own benchmarks with K = 2, 4, 6, 8, 10 unseen classes
(background a seen class), or the 15/5 split of configs/voc_r50.py.

  python -m data_prep.voc --input_dir RAW --output_dir data/voc_zs3_k4 --zs3net_unseen 4
  python -m zegformer_jax.main --config configs/voc_zs3net_r50.py:k4 --workdir runs/voc_zs3net_k4
  python -m zegformer_jax.main --config configs/voc_zs3net_r50.py --workdir runs/voc_zs3net  # 15/5

The argument is 'k2' .. 'k10' (optionally ',30k' for the longer schedule). The recipe is
voc_r50's (crop 512, batch 32, 10k steps, CLIP text embeddings with the single prompt), the
head ZS3Net's learned classifier, refit after training by the generative stage
(training/generative.py). ZS3Net's benchmarks report plain argmax (no calibration).
"""
from configs import common
from configs import voc_r50

K_ARGS = ('k2', 'k4', 'k6', 'k8', 'k10')


def get_config(arg=None):
  args = [a for a in (arg or '').split(',') if a]
  ks = [a for a in args if a in K_ARGS]
  rest = [a for a in args if a not in K_ARGS]
  if len(ks) > 1 or len(rest) > 1:
    raise ValueError(f'voc_zs3net_r50 argument: at most one of {K_ARGS} and one schedule '
                     f'(10k, 30k); got {arg!r}')
  c = common.as_method(voc_r50.get_config(rest[0] if rest else None), 'zs3net')
  c.experiment = 'voc_zs3net_r50'
  c.eval.gamma = 0.0
  if ks:
    k = ks[0]
    c.experiment = f'voc_zs3net_{k}_r50'
    c.dataset.name = f'voc_zs3_{k}'
    c.dataset.data_dir = f'data/voc_zs3_{k}'
    c.input.max_masks = 21 - int(k[1:]) + 1   # every seen class (background included) + 1
  return c
