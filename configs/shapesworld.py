r"""ShapesWorld: the embedded, CPU-sized default.

  python -m zegformer_jax.main --config configs/shapesworld.py --workdir runs/shapesworld
  python -m zegformer_jax.main --config configs/shapesworld.py:smoke ...   # a few steps, tests
  python -m zegformer_jax.main --config configs/shapesworld.py:spnet_fpn ... # another method

The argument is a comma-separated list: at most one method of modeling/methods.py
(zegformer, the default; spnet_fpn; zs3net; zegclip) and 'smoke', e.g. `:zs3net,smoke`.

The world, its miniature CLIP and its pretrained backbone are made under the workdir by the
ShapesWorld project (zegformer_jax/projects/shapesworld, `config.shapesworld`); another
world seed or split is a config override (--config.shapesworld.split=alt). The model keeps
the ZegFormer structure (ResNet, FPN pixel decoder, DETR decoder with deep supervision,
Eq. 1 head) at a width that trains in minutes on 2 CPU cores. BENCHMARKS.md has the runs
behind each choice.
"""
import ml_collections

from configs import common


ARGS = ('smoke',) + common.METHODS


def get_config(arg=None):
  args = [a.strip() for a in (arg or '').split(',') if a.strip()]
  bad = [a for a in args if a not in ARGS]
  if bad:
    raise ValueError(f'shapesworld config argument must be a comma-separated list of {ARGS}; '
                     f'got {arg!r}')
  method = ([a for a in args if a in common.METHODS] or ['zegformer'])[-1]
  c = common.base_config()
  c.experiment = 'shapesworld'
  c.project = 'zegformer_jax.projects.shapesworld.prepare'
  c.dataset.name = 'shapesworld'
  c.dataset.data_dir = ''          # '' -> <workdir>/data (generated on first use)
  c.dataset.train_split = 'train'
  c.dataset.eval_split = 'val_all'
  c.dataset.ignore_value = 255

  # ---------------------------------------------------------------- the world and its stand-ins
  w = c.shapesworld = ml_collections.ConfigDict()
  w.seed = 0
  w.split = 'default'              # 'default' (6 unseen) | 'alt' (7 unseen)
  # "Training sees only seen classes": training images hold seen classes only ('ignored':
  # unseen objects present with their pixels ignored, as COCO-Stuff).
  w.unseen_in_train = 'absent'
  w.num_train = 8000               # the model overfits 2000
  w.num_val = 200
  w.image_size = 64
  # The miniature CLIP, pretrained contrastively on renders of all classes into
  # <workdir>/clip when clip.model_path is empty (projects/shapesworld/clip_pretrain.py).
  w.clip_pretrain = ml_collections.ConfigDict()
  w.clip_pretrain.steps = 3000
  w.clip_pretrain.batch_size = 64
  w.clip_pretrain.lr = 3e-3
  w.clip_pretrain.image_size = 32              # CLIP input side (vision_config.image_size)
  w.clip_pretrain.pool_per_class = 384         # pre-rendered training examples per class
  w.clip_pretrain.eval_per_class = 32          # held-out examples per class and kind (stats)
  # The stand-in for ImageNet weights: the ResNet trained with BatchNorm to label every pixel
  # of seen-class scenes, folded into FrozenBN and loaded as train.init_from (steps > 0, no
  # init_from given). Dense pretraining, because single-object classification did not
  # carry shape knowledge over to occluded objects at stride 4.
  w.backbone_pretrain = ml_collections.ConfigDict()
  w.backbone_pretrain.task = 'dense'           # 'classify' single objects | 'dense' scenes
  w.backbone_pretrain.steps = 6000
  w.backbone_pretrain.batch_size = 16
  w.backbone_pretrain.lr = 5e-3
  w.backbone_pretrain.image_size = 64          # the scenes' own size
  w.backbone_pretrain.pool_per_class = 200     # 'classify': pictures per class
  w.backbone_pretrain.eval_per_class = 20
  w.backbone_pretrain.pool_scenes = 8000       # 'dense': pre-rendered scenes
  w.backbone_pretrain.eval_scenes = 200

  # Batch 8 is the 2-core CPU's sweet spot (a batch of 16 takes more than twice as long).
  c.input.global_batch_size = 8
  c.input.eval_batch_size = 16
  c.input.min_size_train = (56, 64, 72, 80)
  c.input.max_size_train = 128
  c.input.crop_size = 64
  c.input.min_size_test = 64
  c.input.max_size_test = 128
  c.input.max_masks = 5              # at most 2 stuff regions + 3 things per image
  # The decoded training scenes (229 MiB) stay in memory: decoding took CPU time from the
  # train step's two cores.
  c.input.cache_mb = 256

  # The world's small backbone has few 1x1 convolutions (three shortcuts, the FPN laterals),
  # and the convolution's own filter gradient keeps the demo's numbers bit for bit.
  c.model.conv1x1_as_matmul = False
  c.xla_cpu_flags = ''        # XLA's default kernels: the demo's numbers stay bit for bit
  c.eval.resize_impl = 'matmul'   # the resizes its published metrics were measured with
  c.model.backbone.block_counts = (1, 1, 1, 1)
  c.model.backbone.stem_width = 16
  c.model.backbone.bottleneck = False
  c.model.pixel_decoder.conv_dim = 64
  c.model.pixel_decoder.mask_dim = 64
  c.model.pixel_decoder.gn_groups = 8
  c.model.decoder.hidden_dim = 64
  c.model.decoder.num_heads = 4
  c.model.decoder.ffn_dim = 128
  c.model.decoder.num_layers = 3
  c.model.decoder.dropout = 0.0
  c.model.decoder.num_queries = 8      # a scene has at most 5 segments (3 things, 2 stuff)
  # At 64 px res5 is a 2x2 grid, smaller than a thing; the decoder reads the stride-4 pixel
  # embedding (MaskFormer's 'pixel_embedding' option, 16x16 tokens) instead.
  c.model.decoder.in_feature = 'pixel_embedding'
  # Mask2Former's masked cross-attention: a deviation from ZegFormer's decoder that helped
  # seen and unseen mIoU here.
  c.model.decoder.masked_attention = True
  c.model.embed_dim = 64
  # Fine-tuned at 0.1x the learning rate, as every official config (BACKBONE_MULTIPLIER).
  c.model.backbone.freeze_at = 0
  c.optim.backbone_multiplier = 0.1

  c.clip.model_path = ''           # '' -> <workdir>/clip (pretrained on first use)
  c.clip.train_prompts = 'single'
  c.clip.test_prompts = 'single'
  c.clip.text_batch_size = 64

  c.optim.lr = 1e-3
  c.optim.clip_norm = 1.0          # the reference's 0.01 is tuned for batch 32 at full size
  # Shape, unlike colour, is learnt slowly by the set-prediction loss: the classification
  # term and matching cost weigh 2, as in Mask2Former (MaskFormer: 1).
  c.loss.class_weight = 2.0
  c.loss.cost_class = 2.0
  # Mask quality capped every variant: the mask terms weigh as in Mask2Former, focal 5 and
  # dice 5 (MaskFormer: 20 and 1), loss and matching.
  c.loss.mask_weight = 5.0
  c.loss.cost_mask = 5.0
  c.loss.dice_weight = 5.0
  c.loss.cost_dice = 5.0
  # The exact assignment solved on device: no host round trip, the same assignments.
  c.loss.matcher = 'device'

  c.train.total_steps = 7000
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.evals.val_seen.every = 0       # no periodic evaluation

  c.eval.variant = 'full'          # the fused ZegFormer (Eq. 3); seg and img via --variants
  c.eval.gamma = 0.0
  # Test-time augmentation (detectron2 TEST.AUG; off in every official config): the test
  # size and the largest training size, each also flipped, per-pixel scores averaged.
  c.eval.aug_min_sizes = (64, 80)
  c.eval.aug_flip = True
  # --config.eval.image_branch=one_pass reads the scene at 128 px: the miniature CLIP was
  # trained on 32-px crops of one object (4 x 4 patches); at 64 px a thing covers 2-3.
  c.eval.one_pass_size = 128
  c.eval.one_pass_mask_from = 0    # the miniature CLIP has 2 layers: both masked
  # MAFT's fine-tuning (`--mode mask_aware`) of the miniature CLIP, trained at lr 3e-3: the
  # same ratio to it as MAFT's 1e-5 to CLIP's, and enough steps to see every scene twice.
  c.mask_aware.steps = 1000
  c.mask_aware.lr = 1e-4

  # The pixel-level baselines: the same backbone, FPN, data, text embeddings, optimiser,
  # schedule and test views; their own head and per-pixel cross-entropy.
  c = common.as_method(c, method)
  if method == 'zs3net':
    # The 8000 training scenes give ~2M seen-class feature cells; 2000 per class are kept.
    c.zs3net.feature_images = 0

  if 'smoke' in args:
    w.num_train = 64
    w.num_val = 16
    c.input.global_batch_size = 8
    c.input.eval_batch_size = 8
    c.train.total_steps = 6
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    w.clip_pretrain.steps = 20       # a barely trained CLIP: same code path, seconds
    w.clip_pretrain.batch_size = 32
    w.clip_pretrain.pool_per_class = 8
    w.clip_pretrain.eval_per_class = 2
    w.backbone_pretrain.steps = 20
    c.mask_aware.steps = 4
    c.mask_aware.batch_size = 8
    c.mask_aware.checkpoint_every = 2
    w.backbone_pretrain.pool_scenes = 16
    w.backbone_pretrain.eval_scenes = 4
    if method == 'zs3net':
      c.zs3net.generator_steps = 20
      c.zs3net.classifier_steps = 20
      c.zs3net.features_per_class = 64
  if method == 'zegclip':
    _zegclip_on_the_mini_clip(c)
  return common.lock(c)


def _zegclip_on_the_mini_clip(c) -> None:
  """ZegCLIP on the world's miniature CLIP (2 layers, width 64, 8-px patches on 32-px
  crops; clip_pretrain.model_kwargs). At the scenes' own 64 px its patches form an 8 x 8
  grid, coarser than a thing (~16-24 px); the scenes are therefore read at 128 px (a
  16 x 16 grid, objects at about the scale CLIP was pretrained on), the labels at their own
  size. No ResNet: the backbone pretraining is off."""
  z = c.model.zegclip
  z.vision.hidden_size = 64
  z.vision.intermediate_size = 256
  z.vision.num_hidden_layers = 2
  z.vision.num_attention_heads = 4
  z.vision.image_size = c.shapesworld.clip_pretrain.image_size
  z.vision.patch_size = c.shapesworld.clip_pretrain.image_size // 4
  z.input_resolution = 128         # the training crop, as ZegCLIP's 512
  z.prompt_depth = 2               # every layer, as ZegCLIP
  z.num_heads = 4                  # the head at the world's width (E = 64), as ZegFormer's
  z.ffn_dim = 128                  # decoder here
  c.model.embed_dim = 64
  c.shapesworld.backbone_pretrain.steps = 0
  c.input.min_size_train = (112, 128, 144, 160)   # the ZegFormer recipe's sizes, x2
  c.input.max_size_train = 256
  c.input.crop_size = 128
  c.input.min_size_test = 128
  c.input.max_size_test = 256
  c.eval.aug_min_sizes = (128, 160)
  # The ZegFormer recipe's learning rate here (10x the reference's, for small models and
  # few steps); warm-up scaled with the schedule (ZegCLIP: 1500 of 20k steps).
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 500
