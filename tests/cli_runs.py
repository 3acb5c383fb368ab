"""Plain helpers for the tests that run `python -m zegformer_jax.main` in subprocesses.

Not a test module; the session-wide resources these runs need are fixtures in conftest.py
(`smoke_resources`, `compile_cache`, `cached_run`). The runs use the ShapesWorld smoke config
with:
  * one ShapesWorld smoke dataset, miniature CLIP and text-embedding cache per test session,
    shared by every run (--config.dataset.data_dir / --config.clip.model_path; the
    `smoke_resources` fixture);
  * no backbone pretraining (--config.shapesworld.backbone_pretrain.steps=0;
    tests/projects/shapesworld/test_backbone_pretrain.py covers it): the runs start from
    random weights;
  * a persistent XLA compilation cache (the `compile_cache` fixture, one per xdist worker;
    the train step itself is never cached: it holds a host callback, the Hungarian matching);
  * XLA CPU backend optimisation off (--xla_backend_optimization_level=0): the train step
    compiles in ~7 s instead of ~20 s on 2 cores. Runs compared with each other always use
    the same flags.
"""
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
