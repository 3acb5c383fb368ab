"""Helpers for the tests that run `python -m zegformer_jax.main` in subprocesses.

Not a test module. The runs use the ShapesWorld smoke config with:
  * one ShapesWorld smoke dataset, miniature CLIP and text-embedding cache per test session,
    shared by every run (--config.dataset.data_dir / --config.clip.model_path), generated
    once under a file lock (pytest-xdist workers share it);
  * no backbone pretraining (--config.shapesworld.backbone_pretrain.steps=0; tests/test_backbone_pretrain.py
    covers it): the runs start from random weights;
  * a persistent XLA compilation cache shared by every run (the train step itself is never
    cached: it holds a host callback, the Hungarian matching);
  * XLA CPU backend optimisation off (--xla_backend_optimization_level=0): the train step
    compiles in ~7 s instead of ~20 s on 2 cores. Runs compared with each other always use
    the same flags.
"""
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = 'configs/shapesworld.py:smoke'
LAUNCHER = os.path.join(ROOT, 'launch', 'local_multiprocess.sh')


def _session_root(tmp_path_factory) -> str:
  """A directory shared by all xdist workers of this session (else the session's own)."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base
  return str(root)


def shared_resources(tmp_path_factory) -> str:
  """<dir> with data/, clip/ and text_embeddings/ for the smoke config (made once)."""
  root = os.path.join(_session_root(tmp_path_factory), 'shapes_smoke_resources')
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, '.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(root, 'ready')):
      from configs import shapesworld
      from zegformer_jax.data import input_pipeline
      from zegformer_jax.training import train
      config = shapesworld.get_config('smoke')
      with config.unlocked():
        config.dataset.data_dir = os.path.join(root, 'data')
        config.clip.model_path = os.path.join(root, 'clip')
      from zegformer_jax.projects.shapesworld import world as world
      from zegformer_jax.modeling import clip
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
      open(os.path.join(root, 'ready'), 'w').close()
  return root


def cached_run(tmp_path_factory, name: str, overrides, devices: int = 1) -> str:
  """Workdir of a complete 1-process smoke run, made once per session (under a lock)."""
  resources = shared_resources(tmp_path_factory)
  workdir = os.path.join(_session_root(tmp_path_factory), 'cached_runs', name)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  with open(workdir + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(workdir + '.ready'):
      shutil.rmtree(workdir, ignore_errors=True)
      result = run(main_args(workdir, resources, *overrides), compile_cache(tmp_path_factory),
                   devices=devices)
      assert result.returncode == 0, tail(result.stdout + result.stderr)
      open(workdir + '.ready', 'w').close()
  return workdir


def compile_cache(tmp_path_factory) -> str:
  """One persistent XLA cache per xdist worker: the two workers never write it at once."""
  worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  return os.path.join(_session_root(tmp_path_factory), f'jax_compilation_cache_{worker}')


def env(cache_dir: str, devices: int = 1, **extra) -> dict:
  e = {k: v for k, v in os.environ.items()
       if not k.startswith(('ZEGFORMER_', 'XLA_FLAGS', 'JAX_', 'PYTEST_'))}
  e.update(
      JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='3', TOKENIZERS_PARALLELISM='false',
      XLA_FLAGS=(f'--xla_force_host_platform_device_count={devices} '
                 '--xla_backend_optimization_level=0'),
      JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
      PYTHONPATH=ROOT, PYTHONFAULTHANDLER='1')
  e.update({k: str(v) for k, v in extra.items()})
  return e


def main_args(workdir: str, resources: str, *overrides: str, mode: str = 'train') -> list:
  """Arguments of zegformer_jax.main for a smoke run in `workdir` (text cache pre-seeded)."""
  cache = os.path.join(workdir, 'text_embeddings')
  if not os.path.exists(cache):
    shutil.copytree(os.path.join(resources, 'text_embeddings'), cache)
  return ['--config', SMOKE, '--workdir', workdir, '--mode', mode,
          f'--config.dataset.data_dir={resources}/data',
          f'--config.clip.model_path={resources}/clip',
          # Backbone pretraining has its own tests; these runs start from random weights.
          '--config.shapesworld.backbone_pretrain.steps=0', *overrides]


def command(args: list, processes: int = 1, devices: int = 1) -> list:
  if processes == 1:
    return [sys.executable, '-m', 'zegformer_jax.main', *args]
  return ['bash', LAUNCHER, str(processes), str(devices), '--', *args]


def run(args: list, cache_dir: str, processes: int = 1, devices: int = 1, timeout: int = 400,
        **extra_env) -> subprocess.CompletedProcess:
  """Runs main to completion; stdout/stderr captured as text.

  On timeout every process of the run gets SIGABRT, so faulthandler prints where each
  thread was stuck, and the test fails with that output.
  """
  e = env(cache_dir, devices, PYTHON=sys.executable, **extra_env)
  cmd = command(args, processes, devices)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    for sig in (signal.SIGABRT, signal.SIGKILL):
      try:
        os.killpg(proc.pid, sig)
      except ProcessLookupError:
        break
      time.sleep(5)
    out, err = proc.communicate()
    raise AssertionError(f'timed out after {timeout} s: {cmd}\n{tail(out + err, 20000)}')
  return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def start(args: list, cache_dir: str, log_path: str, devices: int = 1,
          **extra_env) -> subprocess.Popen:
  """Starts main in the background (one process), stdout+stderr to `log_path`."""
  e = env(cache_dir, devices, **extra_env)
  log = open(log_path, 'w')
  return subprocess.Popen(command(args), cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, what: str = ''):
  """Polls `predicate` every 50 ms until true; fails if `proc` ends first."""
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    if proc.poll() is not None:
      raise AssertionError(f'process ended (rc {proc.returncode}) before {what}')
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f'timed out waiting for {what}')


def kill(proc: subprocess.Popen, sig=signal.SIGKILL, timeout: float = 120) -> int:
  proc.send_signal(sig)
  return proc.wait(timeout)


def checkpoint_steps(workdir: str) -> list:
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def losses(workdir: str) -> dict:
  """{step: loss} from metrics.jsonl (a resumed run's later entry for a step wins)."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      out[r['step']] = r['loss']
  return out


def summary(workdir: str) -> dict:
  with open(os.path.join(workdir, 'train_summary.json')) as f:
    return json.load(f)


def max_rel_diff(a: dict, b: dict) -> float:
  assert set(a) == set(b), (sorted(a), sorted(b))
  return max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-30) for k in a)


_NOISE = ('Event loop is closed', '_check_closed', 'call_soon_threadsafe',
          'Traceback (most recent call last)', 'asyncio/base_events.py')


def tail(text: str, n: int = 3000) -> str:
  """The end of a run's output without the asyncio shutdown noise of background threads,
  plus every `error:` line, so an assertion message shows why a run failed."""
  lines = [l for l in text.splitlines() if l.strip() and not any(x in l for x in _NOISE)]
  errors = [l for l in lines if 'error' in l.lower()]
  return '\n'.join(errors[-10:]) + '\n---\n' + '\n'.join(lines)[-n:]
