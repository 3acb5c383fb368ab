r"""ZS3Net R-50 on COCO-Stuff 156 seen / 15 unseen: the segmentation network of
configs/coco_stuff_r50.py's recipe with a learned per-pixel classifier over the seen classes,
then ZS3Net's generative stage (training/generative.py): a GMMN generates features of the
unseen classes from their CLIP text embeddings, and the classifier is refit on real seen and
generated unseen features.

  python -m zegformer_jax.main --config configs/coco_stuff_zs3net_r50.py --workdir runs/coco_zs3net
"""
from configs import coco_stuff_r50
from configs import common


def get_config(arg=None):
  c = common.as_method(coco_stuff_r50.get_config(arg), 'zs3net')
  c.experiment = 'coco_stuff_zs3net_r50'
  c.zs3net.feature_images = 2000   # of 118k training images: 2000 features per class suffice
  return c
