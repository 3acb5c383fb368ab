r"""ZegFormer R-101 on COCO-Stuff 156/15 (official coco-stuff R101 recipe).

Identical to coco_stuff_r50 except for the backbone and, at evaluation, the prompt set: the
official R101 gzss_eval config switches the segment branch to the single template
(docs/reference.md, section 8, item 9) although training used imagenet_select.
"""
from configs import common
from configs import coco_stuff_r50


def get_config(arg=None):
  c = coco_stuff_r50.get_config(arg)
  c.unlock()
  c.experiment = 'coco_stuff_r101'
  c.model.backbone.block_counts = common.RESNET_BLOCKS[101]
  c.clip.test_prompts = 'single'
  return common.lock(c)
