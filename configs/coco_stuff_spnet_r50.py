r"""SPNet-FPN R-50 on COCO-Stuff 156 seen / 15 unseen: the paper's pixel-level baseline (§4.3).

Everything as configs/coco_stuff_r50.py (ZegFormer's recipe: data, crop, batch, schedule,
optimiser, CLIP text embeddings, gamma 0.1), with SPNet's head: each stride-4 pixel of the
FPN's mask features is projected to the text width and classified by cosine (temperature
0.01) against the seen classes' text embeddings, per-pixel cross-entropy
(modeling/per_pixel.py; the official repository's ZeroshotPerPixelBaselineHead).

  python -m zegformer_jax.main --config configs/coco_stuff_spnet_r50.py --workdir runs/coco_spnet
"""
from configs import coco_stuff_r50
from configs import common


def get_config(arg=None):
  c = common.as_method(coco_stuff_r50.get_config(arg), 'spnet_fpn')
  c.experiment = 'coco_stuff_spnet_r50'
  return c
