"""The one command-line stack of every entry point: absl flags, ml_collections configs.

Each program (`python -m zegformer_jax.main`, `...tools.bench_step`, `...weights.convert`,
`data_prep.<dataset>`, the ShapesWorld demo, ...) defines its flags with absl, takes its
experiment config with `define_config_flag` (big_vision's `--config file.py[:arg]` and
`--config.key=value` overrides) and starts with `run(main)`, which gives every program the
same behaviour on errors a user can fix: one line `error: <message>` on stderr and exit
status 1; `--debug` (or ZEGFORMER_DEBUG=1) shows the traceback instead.
"""
import importlib.util
import logging as std_logging
import os
import re
import sys
from typing import Callable, Optional

from absl import app
from absl import flags
from ml_collections import config_flags

flags.DEFINE_bool('debug', False, 'Show the traceback of errors (also ZEGFORMER_DEBUG=1).')

# Errors with a message meant for the user: FileNotFoundError (missing data, CLIP, checkpoint,
# images), FileExistsError (an output directory that holds something else), ValueError and
# its subclasses (corrupt records or images, label values, checkpoint mismatches, invalid
# config values, refused pickles), FloatingPointError (a non-finite loss). Anything else is
# a bug and keeps its traceback.
EXPECTED_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, ValueError,
                   FloatingPointError)


def define_config_flag(default: Optional[str] = None, name: str = 'config'):
  """`--config file.py[:arg]` with `--config.a.b=value` overrides, locked (unknown keys fail)."""
  return config_flags.DEFINE_config_file(
      name, default, 'Experiment config (file.py or file.py:arg).', lock_config=True)


def bundled_config(name: str) -> str:
  """Path of configs/<name> of this checkout (the default --config of the ShapesWorld tools)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
                      name)


def load_config(spec: str):
  """The ConfigDict of `file.py[:arg]`, as `--config` reads it (for Python callers)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist')
  module_spec = importlib.util.spec_from_file_location('_zegformer_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ValueError(f'config file {path} has no get_config(arg) function')
  return module.get_config(arg) if arg else module.get_config()


def _debug_env() -> bool:
  return os.environ.get('ZEGFORMER_DEBUG', '') not in ('', '0')


def debug_requested() -> bool:
  return (flags.FLAGS.is_parsed() and flags.FLAGS['debug'].value) or _debug_env()


def debug_requested_in(argv) -> bool:
  """debug_requested before the flags are parsed."""
  return '--debug' in argv or _debug_env()


def one_line(e: BaseException) -> str:
  """The exception's message with its whitespace (newlines included) collapsed."""
  return ' '.join(str(e).split()) or type(e).__name__


def error_line(e: BaseException) -> str:
  """`error: <message>` on one line (plus the process, on multi-process jobs)."""
  message = one_line(e)
  jax = sys.modules.get('jax')  # only when the program has started JAX
  if jax is not None and jax.process_count() > 1:
    message += f' (process {jax.process_index()} of {jax.process_count()})'
  return f'error: {message}'


def run(main: Callable, argv=None) -> None:
  """app.run(main) with one-line errors for bad flags, bad configs and EXPECTED_ERRORS."""

  def guarded(args):
    try:
      return main(args)
    except EXPECTED_ERRORS as e:
      if debug_requested():
        raise
      sys.exit(error_line(e))

  std_logging.getLogger('absl').setLevel(std_logging.INFO)
  app.run(guarded, argv=argv, flags_parser=parse_flags)


def _config_spec(argv) -> Optional[str]:
  """The value of --config in argv (either spelling), or None."""
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      return a.split('=', 1)[1]
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _check_config_file(argv) -> None:
  """Loads --config once up front, so a missing or broken file is one line, not a traceback.

  (ml_collections reports these with tracebacks of its own, some of them only on first use.)
  """
  spec = _config_spec(argv)
  if spec is None or debug_requested_in(argv):
    return
  try:
    load_config(spec)
  except Exception as e:  # pylint: disable=broad-except  (anything a config file raises)
    sys.exit(f'error: cannot load config {spec!r}: {one_line(e)}')


def parse_flags(argv):
  """absl flag parsing with config errors shown as one line instead of a traceback."""
  if 'config' in flags.FLAGS:
    _check_config_file(argv)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {e}')
  except (AttributeError, KeyError) as e:
    # ml_collections raises AttributeError("'<key>'\nDid you mean ...") for a locked config.
    text = str(e).encode().decode('unicode_escape')
    key = re.search(r"'([^'\\]+)'", text)
    key = key.group(1) if key else '?'
    culprit = [a for a in argv if a.startswith('--config.') and
               a.split('=')[0].split('.')[-1] == key]
    where = f' (from {culprit[0]})' if culprit else ''
    hint = re.search(r'Did you mean[^?]*\?', text)
    sys.exit(f'error: unknown config key {key!r}{where}.' + (f' {hint.group(0)}' if hint else ''))
