"""Test set-up: 8 simulated CPU devices so sharded code paths run as on a pod slice.

The tests mirror the package: tests/<package>/test_*.py for zegformer_jax/<package>/
(modeling, data, training, evaluation, weights, tools, projects/shapesworld) and
tests/data_prep/ for the dataset converters; the cross-cutting ones (layout, configs, bad
input) sit at the top. Test file names are unique across the folders (pytest's default
`prepend` import mode imports each test file by its base name; there are no __init__.py
files), so a new test file must not reuse a name from another folder.

Running them:

  JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q -n 2 tests               # everything (make test)
  JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q -n 2 -m "not slow" tests  # the quick subset
  JAX_PLATFORMS=cpu .venv/bin/python -m pytest -q -m slow tests              # only the slow ones

Tests marked `slow` run entry programs in subprocesses (`python -m zegformer_jax.main`, the
converters' and tools' CLIs, launch/local_multiprocess.sh) or child processes, or train for
tens of seconds (the smoke model end to end, a pretraining, the benchmarked train step); the
default run includes them. `-m "not slow"` runs the rest in a fraction of the time.

Fixtures defined here (session-scoped):
  smoke_run        (config, workdir) of a ShapesWorld smoke training, trained in-process once
                   per test worker;
  smoke_resources  directory with data/, clip/ and text_embeddings/ of the smoke config,
                   made once per session under a file lock (pytest-xdist workers share it);
  compile_cache    the persistent XLA compilation cache directory of this worker's
                   subprocess runs;
  tiny_vit_clip    a tiny FlaxCLIPModel (2-layer ViT, 32 px, 8-px patches, seed 0) loaded by
                   clip.load_clip from the directory create_tiny_clip wrote;
  cached_run       factory: cached_run(name, overrides, devices=1) -> the workdir of a
                   complete 1-process smoke run of `main`, made once per session (under a
                   lock) and shared by every test and worker that asks for the same name.
The plain helpers for subprocess runs (main_args, run, start, wait_for, kill, losses,
summary, tail, ...) are functions in tests/cli_runs.py.
"""
import fcntl
import os
import shutil
import sys

# Must happen before jax is imported anywhere.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
# The repository root (configs, data_prep, zegformer_jax) and tests/ (cli_runs) importable
# from every test folder, whatever the import mode.
sys.path.insert(0, TESTS)
sys.path.insert(0, ROOT)

import pytest

import cli_runs


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory):
  """(config, workdir) of a ShapesWorld smoke training run, trained once per test worker.

  The config is the prepared one: its data, CLIP and init paths point into the workdir.
  """
  from configs import shapesworld
  from zegformer_jax.projects.shapesworld import prepare
  from zegformer_jax.training import train
  workdir = str(tmp_path_factory.mktemp('smoke_run'))
  config = prepare.prepare(shapesworld.get_config('smoke'), workdir)
  train.train(config, workdir)
  return config, workdir


def _session_root(tmp_path_factory) -> str:
  """A directory shared by all xdist workers of this session (else the session's own)."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  return str(root)


def _make_smoke_resources(root: str) -> None:
  """Writes data/, clip/ and text_embeddings/ of the smoke config into `root`."""
  from configs import shapesworld
  from zegformer_jax.data import input_pipeline
  from zegformer_jax.modeling import clip
  from zegformer_jax.projects.shapesworld import world
  config = shapesworld.get_config('smoke')
  with config.unlocked():
    config.dataset.data_dir = os.path.join(root, 'data')
    config.clip.model_path = os.path.join(root, 'clip')
  world.generate(config.dataset.data_dir, seed=config.shapesworld.seed,
                 split=config.shapesworld.split, num_train=config.shapesworld.num_train,
                 num_val=config.shapesworld.num_val, image_size=config.shapesworld.image_size,
                 unseen_in_train=config.shapesworld.unseen_in_train)
  if not os.path.exists(os.path.join(config.clip.model_path, 'config.json')):
    seen, unseen = world.class_names(config.shapesworld.split)
    words = sorted({w for name in seen + unseen for w in name.replace(',', ' ').split()})
    clip.create_tiny_clip(config.clip.model_path, vocab_words=words, seed=config.seed)
  names, _ = input_pipeline.dataset_classes(config.dataset.data_dir, 'train')
  clip.class_text_embeddings(config, root, names, config.clip.train_prompts)


@pytest.fixture(scope='session')
def smoke_resources(tmp_path_factory) -> str:
  """<dir> with data/, clip/ and text_embeddings/ for the smoke config.

  Made once per session under a file lock: every xdist worker gets the same directory.
  Tests pass it to cli_runs.main_args (or read its data/ directly) and must not modify it.
  """
  root = os.path.join(_session_root(tmp_path_factory), 'shapes_smoke_resources')
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, '.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(root, 'ready')):
      _make_smoke_resources(root)
      open(os.path.join(root, 'ready'), 'w').close()
  return root


@pytest.fixture(scope='session')
def tiny_vit_clip(tmp_path_factory):
  from zegformer_jax.modeling import clip
  path = str(tmp_path_factory.mktemp('clip') / 'tiny')
  clip.create_tiny_clip(path, vocab_words=['cat'], vision_layers=2, image_size=32,
                        patch_size=8, seed=0)
  return clip.load_clip(path)[0]


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory) -> str:
  """One persistent XLA cache per xdist worker: the two workers never write it at once."""
  worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  return os.path.join(_session_root(tmp_path_factory), f'jax_compilation_cache_{worker}')


@pytest.fixture(scope='session')
def cached_run(tmp_path_factory, smoke_resources, compile_cache):
  """Factory: cached_run(name, overrides, devices=1) -> workdir of a complete smoke run.

  The 1-process run of `main` with `overrides` is made once per session under a lock; every
  test (on any xdist worker) asking for `name` gets the same workdir, which it must not
  modify. A name stands for one set of overrides.
  """
  runs = os.path.join(_session_root(tmp_path_factory), 'cached_runs')
  os.makedirs(runs, exist_ok=True)

  def make(name: str, overrides, devices: int = 1) -> str:
    workdir = os.path.join(runs, name)
    with open(workdir + '.lock', 'w') as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      if not os.path.exists(workdir + '.ready'):
        shutil.rmtree(workdir, ignore_errors=True)
        result = cli_runs.run(cli_runs.main_args(workdir, smoke_resources, *overrides),
                              compile_cache, devices=devices)
        assert result.returncode == 0, cli_runs.tail(result.stdout + result.stderr)
        open(workdir + '.ready', 'w').close()
    return workdir

  return make
