r"""SPNet-FPN R-50 on PASCAL VOC 15 seen / 5 unseen (configs/voc_r50.py's recipe, SPNet's head).

  python -m zegformer_jax.main --config configs/voc_spnet_r50.py[:30k] --workdir runs/voc_spnet
"""
from configs import common
from configs import voc_r50


def get_config(arg=None):
  c = common.as_method(voc_r50.get_config(arg), 'spnet_fpn')
  c.experiment = 'voc_spnet_r50'
  c.eval.gamma = 0.0   # as voc_r50's evaluation (no calibration)
  return c
