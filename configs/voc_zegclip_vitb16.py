r"""ZegCLIP ViT-B/16 on PASCAL VOC 15 seen / 5 unseen (its vpt_seg_zero_vit-b_512x512_20k_12_10).

  python -m zegformer_jax.main --config configs/voc_zegclip_vitb16.py --workdir runs/voc_zegclip
  # transductive (reported apart): continues from an inductive run on pseudo-labels
  python -m zegformer_jax.main --config configs/voc_zegclip_vitb16.py:transductive \
      --config.self_training.source_workdir=runs/voc_zegclip --workdir runs/voc_zegclip_st

Recipe (docs/reference.md §10): CLIP ViT-B/16 frozen at 512 px with 10 deep prompts per
layer, 3-layer text-query decoder, sigmoid focal x100 + dice, AdamW 2e-4 (2e-5 x 10) with
weight decay 0.01, 1500 warm-up steps and poly 0.9 to 1e-6, batch 16, crop 512, 20k
steps; text of the single template "a photo of a {}"; inference on 512 windows every 426
pixels at short side 512, sigmoid scores minus 0.1 on the seen classes. Background is
ignored (20 classes), as in voc_r50. Inductive by default. ':transductive' is the
project's self-training (training/self_training.py) from an inductive run: 10k steps with
the text of all classes and no seen-class penalty, as ZegCLIP's _st config (its online
relabelling is described there).
"""
from configs import common
from configs import voc_r50

ARGS = ('', 'transductive')


def get_config(arg=None):
  arg = arg or ''
  if arg not in ARGS:
    raise ValueError(f'voc_zegclip_vitb16 argument must be one of {ARGS[1:]}; got {arg!r}')
  c = common.as_method(voc_r50.get_config(None), 'zegclip')
  c.experiment = 'voc_zegclip_vitb16'
  c.clip.train_prompts = 'zegclip_single'   # "a photo of a {}" (ZegCLIP's voc12_single)
  c.clip.test_prompts = 'zegclip_single'
  return common.zegclip_schedule(c, 20000, 10000, arg == 'transductive')
