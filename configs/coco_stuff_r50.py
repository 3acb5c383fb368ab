r"""ZegFormer R-50 on COCO-Stuff 156 seen / 15 unseen (official coco-stuff R50 recipe).

Train: zegformer_R50_bs32_60k_vit16_coco-stuff.yaml. Evaluation: the *_gzss_eval config
(full ZegFormer: fusion on, gamma 0.1, all 171 classes, seen first then unseen).

  python -m zegformer_jax.main --config configs/coco_stuff_r50.py --workdir runs/coco_r50
"""
from configs import common


def get_config(arg=None):
  del arg
  c = common.base_config()
  c.experiment = 'coco_stuff_r50'
  c.dataset.name = 'coco_stuff'
  c.dataset.data_dir = 'data/coco_stuff'
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'val_all'
  c.dataset.ignore_value = 255

  c.input.global_batch_size = 32
  c.input.min_size_train = common.min_sizes(640, 5, 15)   # 320..960 step 64
  c.input.max_size_train = 2560
  c.input.crop_size = 640
  c.input.min_size_test = 640
  c.input.max_size_test = 2560
  c.input.max_masks = 64           # COCO-Stuff crops hold up to ~40 classes

  c.model.backbone.block_counts = common.RESNET_BLOCKS[50]
  # The reference trains COCO with AMP (fp16); set --config.model.dtype=bfloat16 for the
  # JAX equivalent. float32 is the default so parity checks are exact.

  c.clip.model_path = 'weights/clip-vit-base-patch16'
  c.clip.train_prompts = 'imagenet_select'
  c.clip.test_prompts = 'imagenet_select'

  c.train.total_steps = 60000
  c.evals.val_seen.every = 5000
  c.train.checkpoint_every = 1000

  c.eval.variant = 'full'
  c.eval.gamma = 0.1
  return common.lock(c)
