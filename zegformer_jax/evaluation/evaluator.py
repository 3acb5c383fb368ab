"""Evaluation: the segmenter over a split, confusion matrices, metrics JSON.

Each batch goes through `segmenter.make_scores_fn` (every requested variant from one forward
pass), its argmax is accumulated into a confusion matrix per variant on device, summed over
the whole split; the sharded sum also reduces across processes, so every process ends with
the same matrices, and process 0 writes `metrics_<variant>.json`.

`Evaluator` is what the training loop is handed for periodic evaluation (big_vision's
`config.evals`): the loop only asks it whether it is due and runs it.
"""
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from zegformer_jax.data import datasets_meta
from zegformer_jax.data import input_pipeline
from zegformer_jax.data import tfrecord
from zegformer_jax.evaluation import boundary
from zegformer_jax.evaluation import metrics as metrics_lib
from zegformer_jax.evaluation import oracles
from zegformer_jax.evaluation import plots
from zegformer_jax.modeling import clip
from zegformer_jax.modeling import methods
from zegformer_jax.modeling import segmenter
from zegformer_jax.modeling import tta
from zegformer_jax.training import metric_writers
from zegformer_jax.training import sharding
from zegformer_jax.training import state as state_lib


def make_eval_step(config, model, variants, num_classes, label_hw_static, clip_model=None,
                   view_shapes=None, ignore_value=None):
  """Jitted ((confs, n), params, frozen, batch, text, seen, clip_params, clip_text) -> (confs, n).

  confs maps each variant to its [K+1, K+1] confusion matrix (metrics.confusion_matrix); n
  counts the valid (non-padding) images, summed over every process by the sharded
  reduction. Label pixels beyond each label's own size hold the ignore value, so they never
  count. `ignore_value` defaults to config.dataset.ignore_value.
  """
  oracles_on, boundary_on = bool(config.eval.oracles), bool(config.eval.boundary)
  grouping_on = oracles_on and methods.has_segments(config.model)
  scores = segmenter.make_scores_fn(config, model, variants, label_hw_static, clip_model,
                                    view_shapes, with_masks=grouping_on)
  ignore = config.dataset.ignore_value if ignore_value is None else ignore_value

  def step(acc, params, frozen, batch, *args):
    confs, count = acc
    new, preds = {}, {}
    out = scores(params, frozen, batch, *args)
    valid = batch['example_valid']
    for v in variants:
      preds[v] = jnp.argmax(out[v], axis=1).astype(jnp.int32)
      new[v] = confs[v] + metrics_lib.confusion_matrix(preds[v], batch['label'], num_classes,
                                                       ignore, valid)
      if oracles_on:   # predicted classes on ground-truth segments
        key = f'{ORACLE_CLASSIFICATION}_{v}'
        new[key] = confs[key] + oracles.classification_oracle_confusion(
            out[v], batch['label'], num_classes, ignore, valid)
    if grouping_on:    # ground-truth classes on predicted segments (no variant involved)
      new[ORACLE_GROUPING] = confs[ORACLE_GROUPING] + oracles.grouping_oracle_confusion(
          out['masks'], batch['label'], num_classes, ignore, valid)
    acc = (new, count + jnp.sum(valid.astype(jnp.int32)))
    return (acc, preds) if boundary_on else acc

  return jax.jit(step, donate_argnums=(0,))


ORACLE_GROUPING = 'oracle_grouping'
ORACLE_CLASSIFICATION = 'oracle_classification'


def confusion_keys(config, variants) -> list:
  """The confusion matrices an evaluation accumulates: one per variant, plus the oracles'."""
  keys = list(variants)
  if config.eval.oracles:
    keys += [f'{ORACLE_CLASSIFICATION}_{v}' for v in variants]
    keys += [ORACLE_GROUPING] if methods.has_segments(config.model) else []
  return keys


def _add_boundaries(accumulators, preds, batch):
  """Host side of eval.boundary: each valid image's prediction against its label."""
  preds = jax.device_get(preds)
  for i in np.flatnonzero(batch['example_valid']):
    h, w = (int(x) for x in batch['label_hw'][i])
    for v, acc in accumulators.items():
      acc.add(np.asarray(preds[v][i, :h, :w]), np.asarray(batch['label'][i, :h, :w]))


def _oracle_metrics(conf, class_names, seen_mask) -> dict:
  m = metrics_lib.compute_metrics(np.asarray(conf), class_names, seen_mask, dataset='',
                                 variant='', num_images=0)
  return {k: m[k] for k in ('mIoU', 'mIoU_seen', 'mIoU_unseen', 'hIoU', 'pAcc')}


def load_trained_state(config, workdir):
  """(model, state) of the latest checkpoint in `workdir` (state.load_latest_state)."""
  train_classes, _ = input_pipeline.dataset_classes(input_pipeline.data_dir(config),
                                                    config.dataset.train_split)
  return state_lib.load_latest_state(config, workdir, len(train_classes))


def method_params(config, workdir, state, class_names):
  """The params that classify `class_names`: the trained ones, except for ZS3Net, whose
  final classifier is fit for the vocabulary (training/generative.py)."""
  if methods.method_name(config.model) != 'zs3net':
    return state['params']
  from zegformer_jax.training import generative
  return generative.eval_params(config, workdir, state['params'], class_names,
                                training_class_names(config))


SETTINGS = ('gzs3', 'zs3')


def check_settings(setting: str) -> tuple:
  """config.eval.setting ('gzs3', 'zs3' or 'gzs3,zs3') as a tuple; unknown ones are errors."""
  settings = tuple(dict.fromkeys(s.strip() for s in str(setting).split(',') if s.strip()))
  bad = [s for s in settings if s not in SETTINGS]
  if bad or not settings:
    raise ValueError(f'config.eval.setting must be one or more of {SETTINGS} (comma-separated), '
                     f'got {setting!r}')
  return settings


def training_class_names(config) -> list:
  """The classes the model was trained on (its train split; else the packaged list)."""
  try:
    names, _ = input_pipeline.dataset_classes(input_pipeline.data_dir(config),
                                              config.dataset.train_split)
    return names
  except (FileNotFoundError, ValueError):
    try:
      names, _ = datasets_meta.split_names(config.dataset.name, 'train')
      return list(names)
    except Exception:  # pylint: disable=broad-except  (no packaged list: nothing is seen)
      return []


def _synonyms(name: str) -> set:
  return {w.strip().lower() for w in name.split(',') if w.strip()}


def seen_by_name(names, trained_names) -> np.ndarray:
  """bool [K]: a class is seen when one of its synonyms ("building, edifice") names a class
  the model was trained on (COCO-Stuff 'building-other' is not 'building': names, not
  concepts)."""
  trained = set().union(*(_synonyms(n) for n in trained_names)) if trained_names else set()
  return np.asarray([bool(_synonyms(n) & trained) for n in names], bool)


class Target:
  """What one evaluation reads: data directory, split, class names, seen mask, ignore value.

  GZS3 (the default): the eval split of the training dataset, all of its classes.
  ZS3: its unseen split (config.dataset.zs3_split): the vocabulary is the unseen classes
  only and seen pixels are ignored, as the converters write that split.
  Cross-dataset (config.eval.data_dir set): another dataset's split with its own class
  names; a class counts as seen (Eq. 2, Eq. 3) when the model was trained on that name.
  """

  def __init__(self, config, split=None, setting='gzs3'):
    self.setting = setting
    self.cross_dataset = bool(config.eval.data_dir)
    if self.cross_dataset:
      if setting != 'gzs3':
        raise ValueError('config.eval.data_dir (cross-dataset evaluation) takes '
                         f'config.eval.setting=gzs3, got {setting!r}')
      self.data_dir = config.eval.data_dir
      if not os.path.isdir(self.data_dir):
        raise FileNotFoundError(f'evaluation dataset directory {self.data_dir!r} '
                                '(config.eval.data_dir) does not exist')
      self.split = split or config.eval.split or 'val_all'
    else:
      self.data_dir = input_pipeline.data_dir(config)
      self.split = split or (config.dataset.zs3_split if setting == 'zs3'
                             else config.dataset.eval_split)
    info = tfrecord.read_dataset_info(self.data_dir)
    s = tfrecord.split_info(info, self.split, self.data_dir)
    self.class_names = list(s['class_names'])
    self.ignore_value = int(s['ignore_value'])
    if self.cross_dataset:
      self.seen_mask = seen_by_name(self.class_names, training_class_names(config))
      self.name = config.eval.name or info.get('dataset') or os.path.basename(
          os.path.normpath(self.data_dir))
    else:
      self.seen_mask = np.asarray(s['seen'], np.bool_)
      self.name = config.dataset.name

  def file_tag(self, tag: str) -> str:
    """The part of metrics_<variant>_<...>.json that tells this evaluation from the default."""
    parts = [self.name] if self.cross_dataset else []
    parts += ['zs3'] if self.setting == 'zs3' else []
    return '_'.join(parts + ([tag] if tag else []))

  def data_config(self, config):
    """`config` reading this target's data (for the eval pipeline)."""
    if not self.cross_dataset:
      return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
      config.dataset.data_dir = self.data_dir
      config.dataset.ignore_value = self.ignore_value
    return config


def evaluate(config, workdir, *, state=None, split=None, variant=None, tag=''):
  """Evaluates one variant (default config.eval.variant); see `evaluate_variants`."""
  variant = variant or config.eval.variant
  return evaluate_variants(config, workdir, (variant,), state=state, split=split,
                           tag=tag)[variant]


def evaluate_settings(config, workdir, variants, *, state=None, tag='') -> dict:
  """evaluate_variants for every setting of config.eval.setting: {setting: {variant: ...}}."""
  settings = check_settings(config.eval.setting)
  if state is None and len(settings) > 1:
    _, state = load_trained_state(config, workdir)   # restored once for all settings
  return {s: evaluate_variants(config, workdir, variants, state=state, tag=tag, setting=s)
          for s in settings}


EVAL_PROGRESS_S = 10.0   # evaluate_variants prints a progress line at most this often


def evaluate_variants(config, workdir, variants, *, state=None, split=None, tag='',
                      setting='gzs3'):
  """Evaluates the latest checkpoint (or `state`) on `split`, all variants in one pass.

  Writes metrics_<variant>[_<tag>].json per variant (with the dataset's name for a
  cross-dataset evaluation and `zs3` for that setting, see `Target`) and returns
  {variant: metrics}. The variants share each batch's forward pass (and the image branch,
  for img and full).
  """
  variants = segmenter.check_variants(variants, config.model)
  check_settings(setting)
  target = Target(config, split, setting)
  split, data_dir = target.split, target.data_dir
  class_names, seen_mask = target.class_names, target.seen_mask
  mesh = sharding.mesh_from_config(config)
  sharding.local_batch_size(int(config.input.eval_batch_size), mesh, 'input.eval_batch_size')
  num_classes = len(class_names)
  text = clip.class_embeddings(config, workdir, class_names, config.clip.test_prompts)
  if state is None:
    model, state = load_trained_state(config, workdir)
  else:
    model = methods.build_model(config.model)

  clip_model, clip_params, clip_text = segmenter.image_branch(config, workdir, class_names,
                                                               variants)
  params = method_params(config, workdir, state, class_names)

  view_shapes = None
  if tta.enabled(config.eval, config.input):
    view_shapes = tta.padded_view_shapes(
        config.eval, config.input, input_pipeline.split_image_shapes(data_dir, split))

  boundaries = None
  if config.eval.boundary:
    if jax.process_count() > 1:
      raise ValueError('config.eval.boundary is computed on the host of a single-process job')
    boundaries = {v: boundary.BoundaryAccumulator(
        target.ignore_value, tolerance=config.eval.boundary_tolerance,
        ignore_mode=config.eval.boundary_ignore) for v in variants}

  t0 = time.time()
  acc = None
  step_fn = None
  text = sharding.replicate(text, mesh)
  seen_dev = sharding.replicate(np.asarray(seen_mask, bool), mesh)
  batches = input_pipeline.make_eval_batches(target.data_config(config), data_dir, split)
  # Progress on process 0: this process's images (dispatched) every EVAL_PROGRESS_S, and at
  # most ~10 lines for a long evaluation.
  total, done, reported = int((batches.local_indices >= 0).sum()), 0, t0
  for batch in batches:
    if view_shapes is not None:
      batch['view_hw'] = tta.view_sizes(config.eval, config.input, batch['label_hw'])
    dev_batch = sharding.shard_batch(batch, mesh)
    if step_fn is None:
      step_fn = make_eval_step(config, model, variants, num_classes,
                               tuple(batch['label'].shape[1:3]), clip_model, view_shapes,
                               ignore_value=target.ignore_value)
      zeros = np.zeros((num_classes + 1, num_classes + 1), np.int32)
      acc = sharding.replicate(({k: zeros for k in confusion_keys(config, variants)},
                                np.zeros((), np.int32)), mesh)
    acc = step_fn(acc, params, state['frozen'], dev_batch, text, seen_dev,
                  clip_params, clip_text)
    if boundaries is not None:
      acc, preds = acc
      _add_boundaries(boundaries, preds, batch)
    done += int(np.sum(batch['example_valid']))
    now = time.time()
    if (jax.process_index() == 0 and done < total and
        now - reported >= max(EVAL_PROGRESS_S, (now - t0) * total / max(done, 1) / 10)):
      reported = now
      print(f'eval {split}: {done}/{total} images'
            f'{" (this process)" if jax.process_count() > 1 else ""}, {now - t0:.0f} s',
            flush=True)
    if config.eval.max_images and int(acc[1]) >= config.eval.max_images:
      break
  if acc is None:
    raise ValueError(f'split {split!r} in {data_dir} has no examples')
  confs, num_images = jax.device_get(acc)
  wall = round(time.time() - t0, 2)
  results = {}
  file_tag = target.file_tag(tag)
  for variant in variants:
    result = metrics_lib.compute_metrics(
        np.asarray(confs[variant]), class_names, np.asarray(seen_mask, bool),
        dataset=target.name, variant=variant, num_images=int(num_images))
    result['split'] = split
    result['setting'] = setting
    if boundaries is not None:   # class-agnostic, on the predicted partition
      result['boundary'] = dict(boundaries[variant].result(),
                                tolerance=config.eval.boundary_tolerance,
                                ignore_mode=config.eval.boundary_ignore)
    if config.eval.oracles:
      result['oracles'] = {
          'grouping': (_oracle_metrics(confs[ORACLE_GROUPING], class_names, seen_mask)
                       if ORACLE_GROUPING in confs else None),
          'classification': _oracle_metrics(confs[f'{ORACLE_CLASSIFICATION}_{variant}'],
                                            class_names, seen_mask)}
    if target.cross_dataset:
      result['eval_data_dir'] = data_dir
      result['trained_on'] = config.dataset.name
    result['test_views'] = [{'min_size': s, 'flip': f}
                            for s, f in tta.views(config.eval, config.input)]
    result['eval_variants'] = list(variants)   # evaluated together in eval_wall_s
    result['eval_wall_s'] = wall
    if jax.process_index() == 0:
      name = f'metrics_{variant}{("_" + file_tag) if file_tag else ""}.json'
      path = os.path.join(workdir, name)
      metrics_lib.write_metrics_json(result, path)
      logging.info('wrote %s', path)
      if config.eval.charts:
        plots.metrics_chart(result, path[:-len('.json')] + '.png')
      print(f'{variant}: mIoU {_fmt(result["mIoU"])} seen {_fmt(result["mIoU_seen"])} '
            f'unseen {_fmt(result["mIoU_unseen"])} hIoU {_fmt(result["hIoU"])} '
            f'pAcc {_fmt(result["pAcc"])} -> {path}', flush=True)
    results[variant] = result
  # TensorBoard scalars eval/<split>/<variant>/<metric> at the state's step (process 0).
  metric_writers.write_eval_scalars(workdir, int(state.get('step', 0)), results)
  return results


def _fmt(x):
  return 'n/a' if x is None else f'{x:.2f}'


class Evaluator:
  """Periodic evaluation during training (one entry of config.evals).

  Every `every` steps (not at the last one: the run's own evaluation follows training) the
  current state is evaluated on `split` with `variants`; the metrics go to
  metrics_<variant>_step<N>.json (metrics_<variant>_<name>_step<N>.json for a second one).
  """

  def __init__(self, config, workdir: str, name: str, *, split: str, variants, every: int,
               tag_prefix: str = ''):
    self.config, self.workdir, self.name = config, workdir, name
    self.split, self.variants, self.every = split, segmenter.check_variants(variants, config.model), every
    self.tag_prefix = tag_prefix

  def due(self, step: int, total_steps: int) -> bool:
    return bool(self.every) and step % self.every == 0 and step < total_steps

  def run(self, state, step: int) -> dict:
    return evaluate_variants(self.config, self.workdir, self.variants, state=state,
                             split=self.split, tag=f'{self.tag_prefix}step{step}')


def evaluators_from_config(config, workdir: str) -> list:
  """The Evaluators of config.evals ({name: {every, split, variants}}), in name order."""
  names = sorted(config.evals)
  return [Evaluator(config, workdir, name, split=e.split, variants=e.variants, every=e.every,
                    tag_prefix='' if len(names) == 1 else f'{name}_')
          for name, e in ((n, config.evals[n]) for n in names)]
