r"""ZegCLIP ViT-B/16 on COCO-Stuff 156 seen / 15 unseen (its
vpt_seg_zero_vit-b_512x512_80k_12_100_multi).

  python -m zegformer_jax.main --config configs/coco_stuff_zegclip_vitb16.py \
      --workdir runs/coco_zegclip

As configs/voc_zegclip_vitb16.py (docs/reference.md §10) with 100 deep prompts per layer,
80k steps, and text embeddings averaged over 15 templates ('zegclip_multi'); crop 512, short
side 512 at test, 512 windows every 426 pixels. ':transductive' (reported apart): the
project's self-training from an inductive run, 40k steps, no seen-class penalty.
"""
from configs import common
from configs import coco_stuff_r50

ARGS = ('', 'transductive')


def get_config(arg=None):
  arg = arg or ''
  if arg not in ARGS:
    raise ValueError(f'coco_stuff_zegclip_vitb16 argument must be one of {ARGS[1:]}; '
                     f'got {arg!r}')
  c = common.as_method(coco_stuff_r50.get_config(), 'zegclip')
  c.experiment = 'coco_stuff_zegclip_vitb16'
  c.model.zegclip.num_prompts = 100
  c.input.min_size_train = common.min_sizes(512, 5, 20)    # 256..1024: ratio 0.5-2 of 512
  c.input.max_size_train = 2048
  c.input.crop_size = 512
  c.input.min_size_test = 512
  c.input.max_size_test = 2048
  c.clip.train_prompts = 'zegclip_multi'
  c.clip.test_prompts = 'zegclip_multi'
  return common.zegclip_schedule(c, 80000, 40000, arg == 'transductive')
