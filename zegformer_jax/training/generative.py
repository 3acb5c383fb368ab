"""ZS3Net's generative stage: after the segmentation network has trained on the seen classes,
learn to generate pixel features from class embeddings and refit the final classifier.

  1. `collect_features`: real pixel features of each seen class (the stride-4 features the
     classifier reads, `per_pixel.PerPixelSegmenter`'s 'pixel_features'), from the training
     split at the test resize, labels sampled at the feature grid's cell centres (nearest);
     a seeded reservoir keeps `features_per_class` per class.
  2. `train_generator`: the GMMN (modeling/gmmn.py) on those features, class-conditional
     multi-kernel MMD, Adam.
  3. Both are saved in <workdir>/zs3net/generator.npz (plain arrays, read back with
     allow_pickle=False) with a JSON description.
  4. `eval_params` (evaluation, prediction): for a vocabulary, the classifier is refit on real
     features of the classes the network was trained on and generated features of the
     others (`fit_classifier`), cached per vocabulary, and put in place of the network's
     seen-class classifier. The GZS3 vocabulary of the dataset gives ZS3Net's own final
     classifier; another vocabulary (ZS3, cross-dataset) gets its own, as ZS3Net would
     retrain for it.

Departures from the public code (valeoai/ZS3), each because its form depends on ground
truth this project does not use, or on its DeepLab training loop:
  * the public code takes one Adam step per (image, present class) pair; here one step
    averages the MMD of `generator_classes` random seen classes, `generator_batch` real
    samples each (drawn with replacement, as there);
  * the public classifier stage replaces the features of training images that contain
    unseen classes by generated ones following their ground-truth masks (so it needs
    unseen-class masks of training images); here each unseen class gets
    `generated_per_class` generated features and each seen class its real ones, a
    balanced set, and the linear classifier is fit with Adam from zero (the public code:
    SGD at 0.07 with poly decay from uniform [0, 1) weights, unseen classes weighted 100);
  * features are read with the network in inference mode (the public code runs it in
    training mode, with dropout).
"""
import hashlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from zegformer_jax.data import input_pipeline
from zegformer_jax.modeling import clip
from zegformer_jax.modeling import gmmn
from zegformer_jax.modeling import preprocess

ARTIFACT_DIR = 'zs3net'
GENERATOR_FILE = 'generator.npz'


def artifact_path(workdir: str) -> str:
  return os.path.join(workdir, ARTIFACT_DIR, GENERATOR_FILE)


# ---------------------------------------------------------------------------- features


def feature_cell_labels(label: np.ndarray, label_hw, image_hw, grid_hw) -> np.ndarray:
  """The label under each stride-4 feature cell's centre (nearest), or -1 outside the image.

  Args:
    label: [Hl, Wl] label at its own resolution.
    label_hw: (hl, wl) its valid size.
    image_hw: (ih, iw) the resized image's valid size (what the network saw).
    grid_hw: (h, w) the feature grid (the padded image's size / 4).
  Returns:
    int64 [h, w]: the label value at cell (i, j) whose centre (4i + 2, 4j + 2) lies inside
    the image, mapped to label coordinates by the resize factor; -1 elsewhere.
  """
  (hl, wl), (ih, iw), (h, w) = label_hw, image_hw, grid_hw
  cy = 4 * np.arange(h) + 2
  cx = 4 * np.arange(w) + 2
  ys = np.minimum((cy * hl) // ih, hl - 1)
  xs = np.minimum((cx * wl) // iw, wl - 1)
  out = label[ys[:, None], xs[None, :]].astype(np.int64)
  out[cy >= ih, :] = -1
  out[:, cx >= iw] = -1
  return out


class Reservoir:
  """Up to `capacity` uniformly drawn samples per class from a stream (Algorithm R)."""

  def __init__(self, num_classes: int, capacity: int, dim: int, seed: int):
    self.capacity = capacity
    self.data = np.zeros((num_classes, capacity, dim), np.float32)
    self.seen = np.zeros(num_classes, np.int64)
    self.rng = np.random.default_rng(seed)

  def add(self, cls: int, x: np.ndarray) -> None:
    """Offers the rows of x [n, dim], all of class `cls`."""
    for row in x:
      n = self.seen[cls]
      if n < self.capacity:
        self.data[cls, n] = row
      else:
        j = self.rng.integers(0, n + 1)
        if j < self.capacity:
          self.data[cls, j] = row
      self.seen[cls] = n + 1

  def counts(self) -> np.ndarray:
    return np.minimum(self.seen, self.capacity)


def collect_features(config, model, params, frozen, data_dir: str, num_classes: int):
  """(features [K, F, C], counts [K]) of the seen classes of the training split (module doc).

  Runs on this process's devices only with host-resident params.
  """
  zc = config.zs3net
  read_config = config.copy_and_resolve_references()
  with read_config.unlocked():
    read_config.eval.max_images = int(zc.feature_images)
  mean, std = config.model.pixel_mean, config.model.pixel_std

  @jax.jit
  def features_of(image, image_hw):
    images = preprocess.normalize(image, mean, std, image_hw)
    out = model.apply({'params': params, 'frozen': frozen}, images,
                      jnp.zeros((num_classes, 1), jnp.float32), train=False)
    return out['pixel_features']

  reservoir = None
  batches = input_pipeline.make_eval_batches(read_config, data_dir, config.dataset.train_split,
                                             process_index=0, process_count=1)
  for batch in batches:
    feats = np.asarray(features_of(batch['image'], batch['image_hw']))      # [B, h, w, C]
    if reservoir is None:
      reservoir = Reservoir(num_classes, int(zc.features_per_class), feats.shape[-1],
                            seed=config.seed)
    for i in np.flatnonzero(batch['example_valid']):
      cells = feature_cell_labels(batch['label'][i], batch['label_hw'][i],
                                  batch['image_hw'][i], feats.shape[1:3])
      for c in np.unique(cells):
        if 0 <= c < num_classes:
          reservoir.add(int(c), feats[i][cells == c])
  if reservoir is None:
    raise ValueError(f'split {config.dataset.train_split!r} in {data_dir} has no examples')
  return reservoir.data, reservoir.counts()


# ---------------------------------------------------------------------------- generator


def train_generator(config, features: np.ndarray, counts: np.ndarray,
                    embeddings: np.ndarray, seed: int):
  """Trains the GMMN on the real features of the seen classes.

  Args:
    config: the run's config (config.zs3net).
    features: [K, F, C] real features per class (the first counts[k] rows are valid).
    counts: [K] valid rows per class; classes with none are never drawn.
    embeddings: [K, D] class embeddings.
    seed: PRNG seed.
  Returns:
    (generator params, {'mmd_first', 'mmd_last', 'steps'}).
  """
  zc = config.zs3net
  k, _, c = features.shape
  gen = gmmn.Generator(feature_dim=c, hidden_dim=int(zc.hidden_dim), dropout=float(zc.dropout))
  rng = jax.random.key(seed)
  init_rng, rng = jax.random.split(rng)
  params = gen.init({'params': init_rng}, jnp.zeros((1, embeddings.shape[1])),
                    jnp.zeros((1, int(zc.noise_dim))), train=False)['params']
  tx = optax.adam(float(zc.generator_lr))
  opt_state = tx.init(params)
  have = np.flatnonzero(counts > 0)
  if have.size == 0:
    raise ValueError('ZS3Net: no seen-class pixel features were collected')
  g = min(int(zc.generator_classes), have.size)
  n = int(zc.generator_batch)
  sigmas = tuple(float(s) for s in zc.kernel_sigmas)
  feats = jnp.asarray(features)
  counts_j = jnp.asarray(counts)
  emb = jnp.asarray(embeddings, jnp.float32)
  have_j = jnp.asarray(have)

  @jax.jit
  def step(params, opt_state, key):
    k_cls, k_idx, k_noise, k_drop = jax.random.split(key, 4)
    classes = jax.random.choice(k_cls, have_j, (g,), replace=False)
    idx = jax.random.randint(k_idx, (g, n), 0, counts_j[classes][:, None])
    real = feats[classes[:, None], idx]                                     # [g, n, C]
    noise = jax.random.uniform(k_noise, (g * n, int(zc.noise_dim)))

    def loss_fn(p):
      e = jnp.repeat(emb[classes], n, axis=0)
      fake = gen.apply({'params': p}, e, noise, train=True, rngs={'dropout': k_drop})
      return gmmn.class_conditional_mmd(real, fake.reshape(g, n, -1), jnp.ones(g, bool),
                                        sigmas)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(int(zc.generator_steps)):
    params, opt_state, loss = step(params, opt_state, jax.random.fold_in(rng, i))
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses), np.float64)
  window = max(1, min(50, losses.size // 10))
  stats = {'steps': int(losses.size),
           'mmd_first': float(losses[:window].mean()) if losses.size else None,
           'mmd_last': float(losses[-window:].mean()) if losses.size else None}
  return params, stats


def generate(config, params, embeddings: np.ndarray, per_class: int, feature_dim: int,
             seed: int) -> np.ndarray:
  """[K, per_class, C] generated features for each row of embeddings [K, D] (no dropout)."""
  zc = config.zs3net
  gen = gmmn.Generator(feature_dim=feature_dim, hidden_dim=int(zc.hidden_dim),
                       dropout=float(zc.dropout))
  k = embeddings.shape[0]
  noise = jax.random.uniform(jax.random.key(seed), (k * per_class, int(zc.noise_dim)))
  e = jnp.repeat(jnp.asarray(embeddings, jnp.float32), per_class, axis=0)
  out = jax.jit(lambda p, e, z: gen.apply({'params': p}, e, z, train=False))(params, e, noise)
  return np.asarray(out).reshape(k, per_class, feature_dim)


# ---------------------------------------------------------------------------- classifier


def fit_classifier(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                   steps: int, batch: int, lr: float, seed: int) -> dict:
  """A linear softmax classifier on features [N, C] with labels [N] in 0..K-1.

  Mini-batches drawn uniformly with replacement, Adam from zero weights.
  Returns {'kernel': [C, K], 'bias': [K]} float32 (flax Dense layout).
  """
  x = jnp.asarray(features, jnp.float32)
  y = jnp.asarray(labels, jnp.int32)
  params = {'kernel': jnp.zeros((x.shape[1], num_classes), jnp.float32),
            'bias': jnp.zeros((num_classes,), jnp.float32)}
  tx = optax.adam(lr)
  opt_state = tx.init(params)

  def loss_fn(p, xb, yb):
    logits = jnp.matmul(xb, p['kernel'], precision=jax.lax.Precision.HIGHEST) + p['bias']
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def run(params, opt_state, key):
    def body(i, carry):
      params, opt_state = carry
      idx = jax.random.randint(jax.random.fold_in(key, i), (batch,), 0, x.shape[0])
      grads = jax.grad(loss_fn)(params, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    return jax.lax.fori_loop(0, steps, body, (params, opt_state))[0]

  params = run(params, opt_state, jax.random.key(seed))
  return {k: np.asarray(v) for k, v in params.items()}


# ---------------------------------------------------------------------------- the stage


def _embeddings(config, workdir, names):
  """Class embeddings of the generator's input space (the training prompt set, always)."""
  return np.asarray(clip.class_embeddings(config, workdir, names,
                                               config.clip.train_prompts), np.float32)


def _flatten(params) -> dict:
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    flat['gen/' + '/'.join(str(getattr(p, 'key', p)) for p in path)] = np.asarray(leaf)
  return flat


def _unflatten(arrays) -> dict:
  tree = {}
  for key, value in arrays.items():
    if not key.startswith('gen/'):
      continue
    node = tree
    parts = key[len('gen/'):].split('/')
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = jnp.asarray(value)
  return tree


def run_stage(config, workdir: str, model, params, frozen) -> dict:
  """Steps 1-3 of the module docstring; writes <workdir>/zs3net/generator.npz atomically.

  params, frozen: the trained network's variables, on the host. Returns the statistics
  (also in zs3net/generator.json). Does nothing but read them back when the file exists
  (a resumed run whose stage had finished).
  """
  path = artifact_path(workdir)
  meta_path = path[:-len('.npz')] + '.json'
  if os.path.exists(path) and os.path.exists(meta_path):
    with open(meta_path) as f:
      return json.load(f)
  t0 = time.time()
  data_dir = input_pipeline.data_dir(config)
  names, _ = input_pipeline.dataset_classes(data_dir, config.dataset.train_split)
  features, counts = collect_features(config, model, params, frozen, data_dir, len(names))
  t1 = time.time()
  embeddings = _embeddings(config, workdir, names)
  gen_params, stats = train_generator(config, features, counts, embeddings, config.seed)
  stats.update(collect_s=round(t1 - t0, 2), generator_s=round(time.time() - t1, 2),
               features_per_class=[int(c) for c in counts], classes=list(names),
               feature_dim=int(features.shape[-1]),
               prompts=config.clip.train_prompts)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp.npz'
  np.savez(tmp, features=features, counts=counts.astype(np.int64),
           class_names=np.asarray(names, dtype=str), **_flatten(gen_params))
  with open(meta_path + '.tmp', 'w') as f:
    json.dump(stats, f, indent=1)
  os.replace(tmp, path)
  os.replace(meta_path + '.tmp', meta_path)
  logging.info('ZS3Net generator: MMD %.4f -> %.4f in %d steps; written to %s',
               stats['mmd_first'] or 0, stats['mmd_last'] or 0, stats['steps'], path)
  return stats


def load_stage(workdir: str) -> dict:
  """{'features', 'counts', 'class_names', 'generator'} of <workdir>/zs3net/generator.npz."""
  path = artifact_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{path} does not exist: ZS3Net\'s generative stage runs at the end of training; '
        'train to config.train.total_steps first')
  try:
    with np.load(path, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (ValueError, OSError) as e:
    raise ValueError(f'{path}: not a readable ZS3Net generator file ({e})') from e
  missing = [k for k in ('features', 'counts', 'class_names') if k not in arrays]
  if missing:
    raise ValueError(f'{path}: missing arrays {missing}')
  return {'features': arrays['features'], 'counts': arrays['counts'],
          'class_names': [str(n) for n in arrays['class_names']],
          'generator': _unflatten(arrays)}


def vocabulary_classifier(config, workdir: str, class_names, seen_by_training) -> dict:
  """{'kernel': [C, K], 'bias': [K]} for `class_names`, refit as the module doc says, cached.

  seen_by_training: [K] index into the stage's training classes (-1: generate).
  """
  stage_file = artifact_path(workdir)
  zc = config.zs3net
  key = hashlib.sha256(json.dumps({
      'names': list(class_names), 'seen': [int(i) for i in seen_by_training],
      'stage': os.path.getmtime(stage_file) if os.path.exists(stage_file) else None,
      'generated_per_class': int(zc.generated_per_class), 'steps': int(zc.classifier_steps),
      'batch': int(zc.classifier_batch), 'lr': float(zc.classifier_lr),
      'seed': int(config.seed)}, sort_keys=True).encode()).hexdigest()[:16]
  cache = os.path.join(workdir, ARTIFACT_DIR, f'classifier_{key}.npz')
  if os.path.exists(cache):
    with np.load(cache, allow_pickle=False) as z:
      return {'kernel': z['kernel'], 'bias': z['bias']}
  stage = load_stage(workdir)
  feats, counts = stage['features'], stage['counts']
  xs, ys = [], []
  gen_rows = [k for k, i in enumerate(seen_by_training) if i < 0]
  if gen_rows:
    emb = _embeddings(config, workdir, [class_names[k] for k in gen_rows])
    fake = generate(config, stage['generator'], emb, int(zc.generated_per_class),
                    feats.shape[-1], seed=config.seed + 1)
    for row, f in zip(gen_rows, fake):
      xs.append(f)
      ys.append(np.full(len(f), row))
  for k, i in enumerate(seen_by_training):
    if i >= 0:
      if counts[i] == 0:
        logging.warning('ZS3Net: class %r had no training pixels; it gets no features',
                        class_names[k])
        continue
      xs.append(feats[i, :counts[i]])
      ys.append(np.full(int(counts[i]), k))
  classifier = fit_classifier(np.concatenate(xs), np.concatenate(ys), len(class_names),
                              steps=int(zc.classifier_steps), batch=int(zc.classifier_batch),
                              lr=float(zc.classifier_lr), seed=config.seed + 2)
  os.makedirs(os.path.dirname(cache), exist_ok=True)
  tmp = cache + '.tmp.npz'
  np.savez(tmp, **classifier)
  os.replace(tmp, cache)
  return classifier


def eval_params(config, workdir: str, params, class_names, training_names) -> dict:
  """`params` with the classifier ZS3Net uses for the vocabulary `class_names`.

  A class is real-featured when its name is one of `training_names` (the classes the
  network was trained on), else generated. Before the generative stage has run (periodic
  evaluation during training), a vocabulary of training classes only reads the trained
  classifier's rows; anything else needs the stage.
  """
  index = {n: i for i, n in enumerate(training_names)}
  rows = np.asarray([index.get(n, -1) for n in class_names], np.int64)
  if not os.path.exists(artifact_path(workdir)):
    if (rows < 0).any():
      load_stage(workdir)   # raises: the stage has not run
    trained = params['classifier']
    classifier = {'kernel': jnp.asarray(trained['kernel'])[:, rows],
                  'bias': jnp.asarray(trained['bias'])[rows]}
  else:
    classifier = vocabulary_classifier(config, workdir, list(class_names), rows)
  return dict(params, classifier={k: jnp.asarray(v) for k, v in classifier.items()})
