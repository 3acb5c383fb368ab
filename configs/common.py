"""Shared defaults for every experiment config.

Each experiment file (coco_stuff_r50.py, voc_r101.py, shapesworld.py, ...) calls
`base_config()` and overrides what its recipe changes. Values are the official ZegFormer
settings (docs/reference.md) unless a comment says otherwise. The returned ConfigDict is
locked: assigning a key that does not exist raises an error naming the key, so a misspelt `--config.optim.lr=...` cannot pass silently.
"""
import ml_collections

# detectron2 / torchvision ImageNet statistics, RGB, 0-255 scale.
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

RESNET_BLOCKS = {18: (2, 2, 2, 2), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}

# config.model.name values (zegformer_jax/modeling/methods.py; kept here so that loading a
# config does not import JAX).
METHODS = ('zegformer', 'spnet_fpn', 'zs3net', 'zegclip')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.experiment = ''
  c.seed = 0
  # A module with prepare(config, workdir, *, for_training) -> config that makes what the
  # config's paths point at (ShapesWorld: 'zegformer_jax.projects.shapesworld.prepare');
  # main calls it first. '' for real datasets: the paths are used as given.
  c.project = ''

  # XLA:CPU options, put into XLA_FLAGS before anything compiles (cli.apply_xla_cpu_flags;
  # the environment's own XLA_FLAGS win). XLA:CPU hands convolutions and matmuls to YNNPACK
  # by default, whose 3x3 filter gradient at 64 x 64 x 256 takes 62 ms against 35 ms for
  # XLA's own (Eigen) kernel on the 2-core machine; the COCO-Stuff R-50 train step gained
  # 8 % in one interleaved run and stayed within the machine's noise in another
  # (BENCHMARKS.md). Rounding differs, so the demo keeps the default ('').
  c.xla_cpu_flags = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-dot'

  # ---------------------------------------------------------------- dataset
  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = ''                # 'coco_stuff' | 'voc' | 'ade20k_full' | 'shapesworld'
  c.dataset.data_dir = ''            # directory with <split>.tfrecord-* and dataset_info.json
  c.dataset.train_split = 'train'    # seen classes only (labels 0..K_seen-1, rest ignored)
  c.dataset.eval_split = 'val_all'   # all classes, GZS3 setting
  c.dataset.ignore_value = 255
  c.dataset.zs3_split = 'val_unseen'  # unseen classes only, seen pixels ignored (ZS3 setting)

  # ---------------------------------------------------------------- input
  c.input = ml_collections.ConfigDict()
  c.input.global_batch_size = 32
  c.input.eval_batch_size = 8        # global; padded with masked examples at the end
  c.input.min_size_train = (320,)    # ResizeShortestEdge "choice"
  c.input.max_size_train = 2560
  c.input.crop_size = 640            # absolute random crop, then pad to exactly this size
  c.input.min_size_test = 640
  c.input.max_size_test = 2560
  c.input.size_divisibility = 32
  c.input.max_masks = 32             # target masks per image, padded (static shapes)
  # Each batch's targets are cut to the smallest of these slot counts (or max_masks) that
  # holds them: the mask losses run over every slot, so a batch of 4-5 segments per image
  # costs 8 slots, not max_masks. One compiled train step per size used; () = max_masks.
  c.input.target_buckets = (8, 16, 32, 64)
  c.input.color_aug_ssd = True
  c.input.num_workers = 0            # grain worker processes (0: in the main process)
  c.input.shuffle_seed = 0
  c.input.prefetch = 2
  # MiB of decoded training examples kept in memory per process (data_source; 0: none).
  c.input.cache_mb = 0

  # ---------------------------------------------------------------- device mesh
  # Mesh ('data', 'fsdp') over every device of every process (training/sharding.py):
  # the batch is split over both axes; fsdp > 1 also splits parameters and optimiser state
  # over groups of `fsdp` devices (largest dimension divisible by fsdp, else replicated).
  c.mesh = ml_collections.ConfigDict()
  c.mesh.fsdp = 1

  # ---------------------------------------------------------------- model
  c.model = ml_collections.ConfigDict()
  # The method (modeling/methods.py): 'zegformer', or the pixel-level baselines 'spnet_fpn'
  # (SPNet with the same FPN) and 'zs3net' (ZS3Net: + config.zs3net, the generative stage).
  c.model.name = 'zegformer'
  c.model.pixel_mean = PIXEL_MEAN
  c.model.pixel_std = PIXEL_STD
  c.model.backbone = ml_collections.ConfigDict()
  c.model.backbone.block_counts = RESNET_BLOCKS[50]
  c.model.backbone.stem_width = 64          # res2 bottleneck width; channels out = 4x
  c.model.backbone.bottleneck = True        # False: BasicBlock (small test variants)
  c.model.backbone.norm = 'FrozenBN'        # RESNETS.NORM: 'FrozenBN' | 'GN' (from scratch)
  c.model.backbone.gn_groups = 32
  c.model.backbone.freeze_at = 0            # BACKBONE.FREEZE_AT (0 in the official configs)
  c.model.pixel_decoder = ml_collections.ConfigDict()
  c.model.pixel_decoder.conv_dim = 256
  c.model.pixel_decoder.mask_dim = 256
  c.model.pixel_decoder.gn_groups = 32
  c.model.decoder = ml_collections.ConfigDict()
  c.model.decoder.hidden_dim = 256
  c.model.decoder.num_heads = 8
  c.model.decoder.ffn_dim = 2048
  c.model.decoder.num_layers = 6
  c.model.decoder.dropout = 0.1
  c.model.decoder.num_queries = 100
  c.model.decoder.pre_norm = False
  # TRANSFORMER_IN_FEATURE: res2..res5, or 'pixel_embedding' (the mask features).
  c.model.decoder.in_feature = 'res5'
  # Mask2Former's masked cross-attention (each layer reads the foreground of the previous
  # layer's mask prediction). Not in ZegFormer/MaskFormer; off in every official config.
  c.model.decoder.masked_attention = False
  c.model.mask_embed_layers = 3
  c.model.embed_dim = 512                   # CLIP text embedding width (semantic embedding)
  c.model.temperature = 0.01                # Eq. 1 tau; logit scale 1/tau = 100, fixed
  c.model.dtype = 'float32'                 # compute dtype; params stay float32
  # 1x1 convolutions as matmuls: same outputs, a filter gradient 2-7x faster on XLA:CPU
  # (resnet.Conv2d); the gradients' last bits differ from the convolution's.
  c.model.conv1x1_as_matmul = True

  # ---------------------------------------------------------------- CLIP
  c.clip = ml_collections.ConfigDict()
  # A local Hugging Face directory (the openai/clip-vit-base-patch16 layout).
  c.clip.model_path = ''
  c.clip.train_prompts = 'imagenet_select'  # prompt set for seen-class text embeddings
  c.clip.test_prompts = 'imagenet_select'   # prompt set for the segment branch at evaluation
  c.clip.image_prompts = 'select_clip'      # 32 templates: the image branch always uses these
  c.clip.text_batch_size = 256
  # Word vectors (e.g. fastText + word2vec, 600-d) in place of CLIP text embeddings for the
  # segment branch, SPNet and ZS3Net: a local .json / .npz file (modeling/word_vectors.py);
  # model.embed_dim must match. '' = CLIP.
  c.clip.class_embeddings_file = ''

  # ---------------------------------------------------------------- loss / matching
  c.loss = ml_collections.ConfigDict()
  c.loss.class_weight = 1.0
  c.loss.mask_weight = 20.0                 # sigmoid focal
  c.loss.dice_weight = 1.0
  c.loss.no_object_weight = 0.1
  c.loss.focal_alpha = 0.25
  c.loss.focal_gamma = 2.0
  c.loss.cost_class = 1.0
  c.loss.cost_mask = 20.0
  c.loss.cost_dice = 1.0
  c.loss.deep_supervision = True
  # Where the Hungarian assignment is solved (modeling/matching.py): 'host' is scipy in
  # a callback, as the reference; 'device' (the same assignments; needs input.max_masks <=
  # model.decoder.num_queries) keeps the train step one XLA program, no host round trip.
  c.loss.matcher = 'host'

  # ---------------------------------------------------------------- optimiser
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.weight_decay = 1e-4
  c.optim.weight_decay_norm = 0.0           # GroupNorm / LayerNorm
  c.optim.weight_decay_embed = 0.0          # query embedding (nn.Embedding in the reference)
  c.optim.backbone_multiplier = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.poly_power = 0.9
  # mmcv's PolyLrUpdaterHook extras (ZegCLIP; 0 in every ZegFormer config): the poly decay
  # ends at min_lr, after warmup_steps of linear warm-up from warmup_ratio x the lr.
  c.optim.min_lr = 0.0
  c.optim.warmup_steps = 0
  c.optim.warmup_ratio = 1e-6
  c.optim.clip_norm = 0.01                  # full-model gradient L2-norm clipping (0: none)

  # ---------------------------------------------------------------- training loop
  c.train = ml_collections.ConfigDict()
  c.train.total_steps = 60000
  c.train.log_every = 20
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3
  c.train.init_from = ''                    # params checkpoint/dir to start from (weights import)
  # Testing hook: > 0 puts a NaN into the final decoder layer's mask logits at that (1-based)
  # step, so the numerics guard can be exercised. Never set it in a real run.
  c.train.debug_nan_step = 0

  # ---------------------------------------------------------------- evaluation
  # Mask-aware fine-tuning of CLIP's image encoder for the one-pass image branch (MAFT's
  # IP-CLIP training, training/mask_aware.py; `--mode mask_aware`): MAFT's COCO-Stuff solver
  # (mask2former_maft.yaml: AdamW, lr 1e-5, poly, 1000 iterations of 16 images, clipping
  # 0.01) and its self-distillation weight 0.1.
  c.mask_aware = ml_collections.ConfigDict()
  c.mask_aware.steps = 1000
  c.mask_aware.batch_size = 16
  c.mask_aware.lr = 1e-5
  c.mask_aware.weight_decay = 1e-4          # LayerNorms 0
  c.mask_aware.poly_power = 0.9
  c.mask_aware.clip_norm = 0.01
  c.mask_aware.distill_weight = 0.1
  c.mask_aware.trainable = 'maft'           # attention + LayerNorms (MAFT) | 'all'
  c.mask_aware.checkpoint_every = 200

  c.eval = ml_collections.ConfigDict()
  c.eval.variant = 'seg'                    # 'seg' | 'img' | 'full'
  c.eval.gamma = 0.0                        # Eq. 2 calibration factor; 0 disables
  c.eval.fusion_lambda = 2.0 / 3.0          # Eq. 3 lambda
  c.eval.clip_style = 'cropmask'            # 'crop' | 'mask' | 'cropmask'
  c.eval.clip_top_k = 0                     # 0: all queries go through the image branch
  # The image branch: 'crops' (the paper's: CLIP on each segment's sub-image) or
  # 'one_pass' (one CLIP pass per image, a mask query per segment; modeling/one_pass.py) at
  # a short side of one_pass_size pixels (0: the model's input as it is); its queries see
  # only their segment from layer one_pass_mask_from on (0: every layer). 480 px and the
  # last 4 of ViT-B/16's 12 layers are MAFT's IP-CLIP. one_pass_clip_path: the CLIP of the
  # one pass ('' -> clip.model_path's); `--mode mask_aware` tunes one for it (MAFT,
  # training/mask_aware.py) into <workdir>/mask_aware/clip.
  c.eval.image_branch = 'crops'
  c.eval.one_pass_size = 480
  c.eval.one_pass_mask_from = 8
  c.eval.one_pass_clip_path = ''
  # The bilinear resizes of inference (mask logits to the input, score maps to the label
  # size; torch F.interpolate's): 'taps' reads torch's two source pixels per axis, 'matmul'
  # multiplies by jax.image's dense kernel matrices, 92 GFLOP for 171 score maps at 512 x
  # 512 against 0.4 (BENCHMARKS.md). They agree to float32 rounding (modeling/inference.py).
  c.eval.resize_impl = 'taps'
  c.eval.max_images = 0                     # 0: the whole split
  # 'gzs3' (all classes of dataset.eval_split), 'zs3' (the unseen classes only, on
  # dataset.zs3_split), or both: 'gzs3,zs3' (metrics_<variant>_zs3.json).
  c.eval.setting = 'gzs3'
  # Cross-dataset open vocabulary: another converted dataset evaluated with its own class
  # names (metrics_<variant>_<name>.json); a class is seen when it was a training class.
  c.eval.data_dir = ''
  c.eval.split = ''                         # '' -> 'val_all'
  c.eval.name = ''                          # '' -> the dataset's name in its dataset_info
  c.eval.charts = True                      # metrics_<variant>.png beside each metrics JSON
  # Diagnostics, off by default. Boundary F / P / R of the predicted partition (class-agnostic,
  # matched within tolerance x image diagonal; evaluation/boundary.py), and the two oracles
  # (ground-truth classes on predicted segments: grouping quality alone; predicted classes on
  # ground-truth segments: classification quality alone; evaluation/oracles.py).
  c.eval.boundary = False
  c.eval.boundary_tolerance = 0.0075
  c.eval.boundary_ignore = 'exclude'        # 'exclude' unlabelled regions | 'nearest' (void bands)
  c.eval.oracles = False
  # Sliding-window inference for large images (mmsegmentation's slide mode): windows of
  # window_size (0: input.crop_size) every window_stride (0: 2/3 of the window) pixels over
  # the resized image, scores averaged where they overlap. Off in every official config.
  c.eval.sliding_window = False
  c.eval.window_size = 0
  c.eval.window_stride = 0
  # Test-time augmentation (detectron2 TEST.AUG; modeling/tta.py), off as in every
  # official config: () and False = the single test view at input.min_size_test.
  c.eval.aug_min_sizes = ()                 # TEST.AUG.MIN_SIZES, e.g. (512, 768); 0: min_size_test
  c.eval.aug_max_size = 0                   # TEST.AUG.MAX_SIZE; 0: input.max_size_test
  c.eval.aug_flip = False                   # TEST.AUG.FLIP

  # ---------------------------------------------------------------- periodic evaluation
  # big_vision's config.evals: name -> {every, split, variants}; the training loop runs each
  # every `every` steps (0: never). The reference evaluates seen classes only during training.
  c.evals = ml_collections.ConfigDict()
  c.evals.val_seen = ml_collections.ConfigDict()
  c.evals.val_seen.every = 5000
  c.evals.val_seen.split = 'val_seen'
  c.evals.val_seen.variants = ('seg',)

  # ---------------------------------------------------------------- self-training
  # The transductive setting (training/self_training.py), off unless source_workdir names a
  # trained run: its confident unseen-class predictions on the unlabelled pixels of the
  # training images become pseudo-labels, and this run continues from its weights. Report
  # such runs apart from the inductive ones.
  c.self_training = ml_collections.ConfigDict()
  c.self_training.source_workdir = ''
  c.self_training.fraction = 0.25           # top share of each class's candidates per image
  c.self_training.variant = 'seg'           # the source's scores that label

  # Mode-specific options from the command line (main.py); listed so they can be overridden.
  c.predict = ml_collections.ConfigDict()
  c.predict.images = ''
  c.predict.classes = ''
  c.predict.class_file = ''
  return c


def lock(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  c.lock()
  return c


def min_sizes(base: int, lo: int, hi: int) -> tuple:
  """detectron2's MIN_SIZE_TRAIN recipe: int(x * 0.1 * base) for x in [lo, hi]."""
  return tuple(int(x * 0.1 * base) for x in range(lo, hi + 1))


def zs3net_config() -> ml_collections.ConfigDict:
  """ZS3Net's generative stage (training/generative.py), run after the segmentation network
  has trained on the seen classes. 'public code' marks values of valeoai/ZS3
  (docs/reference.md, section 9); the others are this project's (that code's loop has no
  equivalent of them)."""
  z = ml_collections.ConfigDict()
  # Real pixel features of each seen class, taken from the training split at stride 4
  # (labels at the feature cells' centres), kept for the generator and the classifier.
  z.features_per_class = 2000
  z.feature_images = 0             # training images read for them (0: the whole split)
  # GMMN: [class embedding, noise U[0,1)] -> hidden (LeakyReLU 0.2, dropout) -> feature.
  z.noise_dim = 300                # public code
  z.hidden_dim = 256               # public code
  z.dropout = 0.5                  # public code
  z.kernel_sigmas = (2.0, 5.0, 10.0, 20.0, 40.0, 80.0)   # public code (each acts as sigma^2)
  z.generator_batch = 128          # public code: real (and generated) samples per class
  z.generator_lr = 2e-4            # public code (Adam)
  # Public code: one step per (image, present class) pair for 30 epochs; here each step
  # averages the MMD of `generator_classes` classes.
  z.generator_steps = 2000
  z.generator_classes = 8
  # The final classifier, fit from zero with Adam on real seen + generated other classes.
  z.generated_per_class = 2000     # generated features per class without real ones
  z.classifier_steps = 1000
  z.classifier_batch = 1024
  z.classifier_lr = 1e-3
  return z


def zegclip_model_config() -> ml_collections.ConfigDict:
  """config.model.zegclip: ZegCLIP's VOC recipe on CLIP ViT-B/16 (docs/reference.md §10)."""
  z = ml_collections.ConfigDict()
  z.num_prompts = 10               # deep prompt tokens per layer (100 on COCO-Stuff)
  z.prompt_depth = 12              # every layer of ViT-B/16
  z.prompt_dropout = 0.1
  z.num_layers = 3                 # the text-query decoder
  z.num_heads = 8
  z.ffn_dim = 2048
  z.dropout = 0.1
  # ZegCLIP's img_encoder.py adds CLIP's class embedding to the [CLS] token twice (token
  # and position row); kept, as its released weights were trained so.
  z.class_embedding_twice = True
  # The side its position table is kept for: CLIP's 14 x 14 table resized once to 32 x 32
  # (ZegCLIP's input_resolution; its checkpoints hold the 1025-row table).
  z.input_resolution = 512
  # The architecture of the CLIP at clip.model_path (its config.json's vision_config,
  # checked when the weights load): openai/clip-vit-base-patch16.
  z.vision = ml_collections.ConfigDict(dict(
      hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
      image_size=224, patch_size=16, hidden_act='quick_gelu', layer_norm_eps=1e-5))
  return z


def as_method(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """`c` (a ZegFormer config) for another method of METHODS, everything else kept: the same
  backbone, pixel decoder, data, text embeddings, optimiser, schedule, test views and
  calibration. The pixel-level methods have one variant, their own ('seg'), and no decoder
  or set-loss settings in use; ZS3Net adds config.zs3net."""
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  if method == 'zegformer':
    return c
  with c.unlocked():
    c.experiment = f'{c.experiment}_{method}' if c.experiment else method
    c.model.name = method
    c.eval.variant = 'seg'
    c.evals.val_seen.variants = ('seg',)
    if method == 'zs3net':
      c.zs3net = zs3net_config()
    if method == 'zegclip':
      _zegclip_recipe(c)
  return c


def zegclip_schedule(c: ml_collections.ConfigDict, steps: int, transductive_steps: int,
                     transductive: bool) -> ml_collections.ConfigDict:
  """ZegCLIP's schedule and test setting on a ViT-B/16 config: batch 16, `steps` (or, for
  the transductive run that continues an inductive one, `transductive_steps` without
  warm-up and without the seen-class penalty), 512-px windows every 426 pixels."""
  c.input.global_batch_size = 16
  c.train.total_steps = transductive_steps if transductive else steps
  c.train.checkpoint_every = 2000
  c.evals.val_seen.every = c.train.total_steps
  c.eval.variant = 'seg'
  c.eval.sliding_window = True
  c.eval.window_size = 512
  c.eval.window_stride = 426
  if transductive:
    c.experiment += '_transductive'
    c.optim.warmup_steps = 0        # continues a trained model
    c.eval.gamma = 0.0              # ZegCLIP's transductive models: no seen-class penalty
  return c


def _zegclip_recipe(c: ml_collections.ConfigDict) -> None:
  """ZegCLIP's own model, loss, optimiser and test-time penalty (docs/reference.md §10);
  the data, crops, text embeddings and test views stay those of `c`."""
  c.model.zegclip = zegclip_model_config()
  c.model.embed_dim = 512                  # CLIP's joint width (the text embeddings)
  # Pixels: ZegCLIP normalises with the ImageNet statistics (its dataset configs'
  # img_norm_cfg), not CLIP's, so model.pixel_mean / pixel_std stay those.
  c.loss.mask_weight = 100.0               # sigmoid focal (alpha 0.25, gamma 2)
  c.loss.dice_weight = 1.0
  # AdamW lr 2e-5 with lr_mult 10 on the backbone (whose only trainable names are the
  # prompts) and the head: every trainable parameter at 2e-4.
  c.optim.lr = 2e-4
  c.optim.weight_decay = 0.01              # LayerNorms ('norm' names) 0, as 'norm'/'ln' there
  c.optim.backbone_multiplier = 1.0
  c.optim.min_lr = 1e-6
  c.optim.warmup_steps = 1500
  c.optim.warmup_ratio = 1e-6
  c.optim.clip_norm = 0.0                  # mmseg's default optimizer_config: no clipping
  # Inference: sigmoid scores minus 0.1 on the seen classes (Eq. 2 with gamma 0.1; 0 for
  # transductive models).
  c.eval.gamma = 0.1
