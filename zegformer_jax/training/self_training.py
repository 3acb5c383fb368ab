"""Self-training, the transductive setting (ZS3Net's ZS5Net; STRICT, Pastore et al. 2021).

Transductive: the unlabelled pixels of the training images may hold unseen classes, and
the method may look at them (never at their labels). A trained run (the *source*, config
self_training.source_workdir) labels them; the most confident of its unseen-class
predictions become pseudo-labels, and a new run starts from the source's weights and trains
on the seen ground truth plus those pseudo-labels, with the text embeddings of all classes.
Its numbers are reported separately from the inductive ones (the run's metrics JSON holds
`self_training` in its config.json; tools.compare labels it "+ self-training").

Pseudo-labels (`pseudo_labels`): a pixel is a candidate for unseen class c when its ground
truth is unlabelled (the ignore value: COCO-Stuff's unseen pixels, ShapesWorld's with
`unseen_in_train='ignored'`) and the source's calibrated argmax over all classes is c;
per image and class, the top `fraction` of the candidates by score are kept (ZS3Net's
"top p% by image" pseudo-label sets: 25 % on VOC, 75 % on Context). Seen-class ground
truth is kept; everything else stays ignored.

The pseudo-labelled training split is written once to <workdir>/self_training_data (the
other splits are links to the source dataset's shards), and training reads it from there.
Only methods whose parameters do not depend on the number of classes (ZegFormer,
SPNet-FPN, ZegCLIP) can continue from the source's weights with more classes.

ZegCLIP's own transductive training relabels, at every step, the pixels whose ground truth
is an unseen class with the argmax over the unseen classes; that needs to know which
pixels are unseen, which the converted training splits do not keep (they are ignore
pixels, like every unlabelled one). Its transductive mode here is this offline one.
"""
import json
import logging
import os

import jax
import numpy as np

from zegformer_jax.data import input_pipeline
from zegformer_jax.data import tfrecord
from zegformer_jax.modeling import clip
from zegformer_jax.modeling import methods
from zegformer_jax.modeling import segmenter

DATA_DIR = 'self_training_data'


def enabled(config) -> bool:
  return bool(config.get('self_training', {}) and config.self_training.source_workdir)


def pseudo_labels(label: np.ndarray, pred: np.ndarray, score: np.ndarray,
                  unseen: np.ndarray, ignore_value: int, fraction: float) -> np.ndarray:
  """One image's training label with unseen-class pseudo-labels (module docstring).

  Args:
    label: [H, W] ground truth in the all-class label space, ignore_value where unlabelled.
    pred: [H, W] the source's argmax class (all-class space).
    score: [H, W] its score.
    unseen: [K] bool, the unseen classes.
    ignore_value: the unlabelled value.
    fraction: the share of each class's candidates kept, highest scores first.
  Returns:
    [H, W] label: ground truth where labelled, pseudo-labels, else ignore_value.
  """
  out = label.copy()
  candidate = (label == ignore_value) & unseen[np.clip(pred, 0, len(unseen) - 1)]
  for c in np.unique(pred[candidate]):
    where = candidate & (pred == c)
    scores = score[where]
    keep = max(1, int(round(fraction * scores.size))) if fraction > 0 else 0
    if keep == 0:
      continue
    threshold = np.sort(scores)[-keep]
    out[where & (score >= threshold)] = c
  return out


def _source_config(config):
  """`config` as the source run was evaluated: its own data, one view (no TTA)."""
  c = config.copy_and_resolve_references()
  with c.unlocked():
    c.eval.aug_min_sizes = ()
    c.eval.aug_flip = False
    c.eval.sliding_window = False
    c.eval.max_images = 0
  return c


def make_pseudo_labelled_data(config, workdir: str) -> str:
  """Writes <workdir>/self_training_data (once) and returns its path (module docstring)."""
  out_dir = os.path.join(workdir, DATA_DIR)
  if os.path.exists(os.path.join(out_dir, 'dataset_info.json')):
    return out_dir
  st = config.self_training
  if methods.has_class_sized_params(config.model):
    raise ValueError(f'self-training continues from the source weights with more classes; '
                     f'method {methods.method_name(config.model)!r} has class-sized params')
  source = st.source_workdir
  from zegformer_jax.evaluation import evaluator   # (evaluation imports training)
  data_dir = input_pipeline.data_dir(config)
  info = tfrecord.read_dataset_info(data_dir)
  train = tfrecord.split_info(info, config.dataset.train_split, data_dir)
  all_split = tfrecord.split_info(info, config.dataset.eval_split, data_dir)
  all_names, all_seen = list(all_split['class_names']), np.asarray(all_split['seen'], bool)
  ignore = int(train.get('ignore_value', info['ignore_value']))
  index = {n: i for i, n in enumerate(all_names)}
  missing = [n for n in train['class_names'] if n not in index]
  if missing:
    raise ValueError(f'{data_dir}: training classes {missing[:4]} are not in split '
                     f'{config.dataset.eval_split!r}')
  to_all = np.full(max(ignore + 1, len(train['class_names'])), ignore, np.int64)
  to_all[:len(train['class_names'])] = [index[n] for n in train['class_names']]

  c = _source_config(config)
  model, state = evaluator.load_trained_state(c, source)
  variant = st.variant
  text = clip.class_embeddings(c, workdir, all_names, c.clip.test_prompts)
  clip_model, clip_params, clip_text = segmenter.image_branch(c, workdir, all_names, (variant,))
  batches = input_pipeline.make_eval_batches(c, data_dir, config.dataset.train_split,
                                             process_index=0, process_count=1)
  scores_fn = None
  labels = {}
  for batch in batches:
    if scores_fn is None:
      scores_fn = jax.jit(segmenter.make_scores_fn(c, model, (variant,),
                                                   tuple(batch['label'].shape[1:3]), clip_model))
    arrays = {k: v for k, v in batch.items() if k != 'filename'}
    scores = np.asarray(scores_fn(state['params'], state['frozen'], arrays, text, all_seen,
                                  clip_params, clip_text)[variant])       # [B, K, H, W]
    pred, best = scores.argmax(axis=1), scores.max(axis=1)
    for i in np.flatnonzero(batch['example_valid']):
      h, w = (int(x) for x in batch['label_hw'][i])
      gt = to_all[np.clip(batch['label'][i, :h, :w], 0, len(to_all) - 1)]
      labels[str(batch['filename'][i])] = pseudo_labels(
          gt, pred[i, :h, :w], best[i, :h, :w], ~all_seen, ignore, float(st.fraction))

  os.makedirs(out_dir + '.tmp', exist_ok=True)
  tmp = out_dir + '.tmp'
  shards, stats = [], {'images': 0, 'pseudo_pixels': 0, 'per_class': {}}
  for n, sh in enumerate(train['shards']):
    records = []
    for rec in tfrecord.read_records(os.path.join(data_dir, sh['file'])):
      ex = tfrecord.parse_example(rec)
      name = ex['image/filename'].decode()
      label = labels[name]
      pseudo = (label != ignore) & ~all_seen[np.clip(label, 0, len(all_seen) - 1)]
      stats['images'] += 1
      stats['pseudo_pixels'] += int(pseudo.sum())
      for k in np.unique(label[pseudo]):
        stats['per_class'][all_names[k]] = stats['per_class'].get(all_names[k], 0) + int(
            (label == k).sum())
      records.append(tfrecord.encode_example(
          image=ex['image/encoded'], image_format=ex['image/format'].decode(),
          filename=name, height=ex['image/height'], width=ex['image/width'],
          label=tfrecord.encode_png(label.astype(np.uint8 if ignore < 256 else np.uint16))))
    tfrecord.write_records(os.path.join(tmp, sh['file']), records)
    shards.append({'file': sh['file'], 'num_examples': len(records)})
  new_info = json.loads(json.dumps(info))
  for split, s in new_info['splits'].items():
    if split == config.dataset.train_split:
      continue
    for sh in s['shards']:   # the other splits: links to the source dataset's shards
      link = os.path.join(tmp, sh['file'])
      if not os.path.exists(link):
        os.symlink(os.path.abspath(os.path.join(data_dir, sh['file'])), link)
  new_info['splits'][config.dataset.train_split] = dict(
      train, class_names=all_names, seen=all_seen.tolist(), shards=shards)
  new_info['self_training'] = dict(source_workdir=os.path.abspath(source), variant=variant,
                                   fraction=float(st.fraction), source_data_dir=data_dir,
                                   **stats)
  tfrecord.write_dataset_info(tmp, new_info)
  os.replace(tmp, out_dir)
  logging.info('self-training: %d pseudo-labelled pixels in %d images -> %s',
               stats['pseudo_pixels'], stats['images'], out_dir)
  print(f'self-training: {stats["pseudo_pixels"]} unseen-class pseudo-labels in '
        f'{stats["images"]} training images ({", ".join(sorted(stats["per_class"]))})',
        flush=True)
  return out_dir


def init_from_source(config, state):
  """`state` with the source run's trained params and FrozenBN statistics."""
  from zegformer_jax.training import state as state_lib
  _, source = state_lib.load_latest_state(config, config.self_training.source_workdir, 1)
  return dict(state, params=source['params'], frozen=source['frozen'])


def prepare(config, workdir: str):
  """`config` reading the pseudo-labelled training split (made if needed)."""
  if not enabled(config):
    return config
  out_dir = make_pseudo_labelled_data(config, workdir)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.dataset.data_dir = out_dir
  return config
