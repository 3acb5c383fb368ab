r"""ZegFormer R-50 on ADE20k-Full, 572 seen (frequent + common) / 275 unseen (rare).

Official ade20k-full-847-freq R50 recipe: 60k iterations, batch 32 (the base config's 16 is
overridden), 512 crops, uint16 labels with ignore 65535. Evaluation: fusion on, gamma 0
(calibration disabled), all 847 classes in the frequency-list order.
"""
from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.experiment = 'ade20k_full_r50'
  c.dataset.name = 'ade20k_full'
  c.dataset.data_dir = 'data/ade20k_full'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'val_all'
  c.dataset.ignore_value = 65535

  c.input.global_batch_size = 32
  c.input.min_size_train = common.min_sizes(512, 5, 20)
  c.input.max_size_train = 2048
  c.input.crop_size = 512
  c.input.min_size_test = 512
  c.input.max_size_test = 2048
  c.input.max_masks = 96           # ADE-Full crops can hold many classes

  c.model.backbone.block_counts = common.RESNET_BLOCKS[50]

  c.clip.model_path = 'weights/clip-vit-base-patch16'
  c.clip.train_prompts = 'imagenet_select'
  c.clip.test_prompts = 'imagenet_select'

  c.train.total_steps = 60000
  c.evals.val_seen.every = 5000
  c.train.checkpoint_every = 1000

  c.eval.variant = 'full'
  c.eval.gamma = 0.0
  return common.lock(c)
