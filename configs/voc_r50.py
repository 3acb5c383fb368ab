r"""ZegFormer R-50 on PASCAL VOC 15 seen / 5 unseen (official pascal_voc R50 recipe).

Background is ignored in training and evaluation (20 classes). 10k iterations as in the
paper; `--config configs/voc_r50.py:30k` gives the 30k schedule the official README
recommends. The official R50 gzss_eval config classifies with CLIP only (ENSEMBLING False,
no calibration), so the evaluation variant here is 'img' with gamma 0.
"""
from configs import common


def get_config(arg=None):
  steps = {None: 10000, '': 10000, '10k': 10000, '30k': 30000}
  if arg not in steps:
    raise ValueError(f'voc config argument must be one of 10k, 30k; got {arg!r}')
  c = common.base_config()
  c.experiment = 'voc_r50'
  c.dataset.name = 'voc'
  c.dataset.data_dir = 'data/voc'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'val_all'
  c.dataset.ignore_value = 255

  c.input.global_batch_size = 32
  c.input.min_size_train = common.min_sizes(512, 5, 20)   # 256..1024
  c.input.max_size_train = 2048
  c.input.crop_size = 512
  c.input.min_size_test = 512
  c.input.max_size_test = 2048
  c.input.max_masks = 16           # at most 15 seen classes present

  c.model.backbone.block_counts = common.RESNET_BLOCKS[50]

  c.clip.model_path = 'weights/clip-vit-base-patch16'
  c.clip.train_prompts = 'single'
  c.clip.test_prompts = 'single'

  c.train.total_steps = steps[arg]
  c.evals.val_seen.every = steps[arg]
  c.train.checkpoint_every = 1000

  c.eval.variant = 'img'
  c.eval.gamma = 0.0
  return common.lock(c)
