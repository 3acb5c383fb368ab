r"""ZegFormer R-101 on PASCAL VOC 15/5 (official pascal_voc R101 10k and 30k recipes).

`--config configs/voc_r101.py:30k` selects the 30k schedule. Evaluation follows the R101
gzss_eval configs: full ZegFormer (fusion on) with gamma 0.1.
"""
from configs import common
from configs import voc_r50


def get_config(arg=None):
  c = voc_r50.get_config(arg)
  c.unlock()
  c.experiment = 'voc_r101'
  c.model.backbone.block_counts = common.RESNET_BLOCKS[101]
  c.eval.variant = 'full'
  c.eval.gamma = 0.1
  return common.lock(c)
