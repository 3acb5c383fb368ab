"""The one command-line stack of every entry point: absl flags, ml_collections configs.

Each program (`python -m zegformer_jax.main`, `...tools.bench_step`, `...weights.convert`,
`data_prep.<dataset>`, the ShapesWorld demo, ...) defines its flags with absl, takes its
experiment config with `define_config_flag` (big_vision's `--config file.py[:arg]` and
`--config.key=value` overrides) and starts with `run(main)`, which gives every program the
same behaviour on errors a user can fix: one line `error: <message>` on stderr and exit
status 1; `--debug` (or ZEGFORMER_DEBUG=1) shows the traceback instead.
"""
import errno
import importlib.util
import logging as std_logging
import os
import re
import sys
import traceback
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

# OSErrors the user can fix, whatever raised them: a full disk or quota, a read-only file
# system, a file too big for it, no permission, a path through a regular file or into a
# directory, an I/O error of the output device. Printed as one line like EXPECTED_ERRORS; the
# writers of metrics, checkpoints and config.json raise them as `cannot write <path>:
# <reason>` (metric_writers.CannotWriteError).
USER_OS_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES,
                            errno.EPERM, errno.ENOTDIR, errno.EISDIR, errno.EIO})
# Errnos that only a write gives.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def is_user_error(e: BaseException) -> bool:
  """Whether `e` is shown as one line `error: ...` (not a traceback): EXPECTED_ERRORS, an
  OSError of USER_OS_ERRNOS, or an exception that says so (a true `user_error` attribute)."""
  return (isinstance(e, EXPECTED_ERRORS) or getattr(e, 'user_error', False) is True
          or (isinstance(e, OSError) and e.errno in USER_OS_ERRNOS))


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


def _raised_by_os(e: BaseException) -> bool:
  """An OSError as the OS raised it: `[Errno N] <strerror>: '<filename>'`."""
  return (isinstance(e, OSError) and e.errno is not None and bool(e.strerror)
          and e.filename is not None and str(e).startswith('[Errno'))


def _raised_in_makedirs(e: BaseException) -> bool:
  frames = traceback.extract_tb(e.__traceback__) if e.__traceback__ else []
  return bool(frames) and frames[-1].name in ('makedirs', 'mkdir')


def message_of(e: BaseException) -> str:
  """The one-line message of `e`; an OSError of a write the OS refused (full disk,
  read-only file system, a directory that cannot be made) reads `cannot write <path>:
  <reason>`."""
  if _raised_by_os(e) and (e.errno in WRITE_ERRNOS or _raised_in_makedirs(e)):
    return f'cannot write {e.filename}: {e.strerror}'
  return one_line(e)


def error_line(e: BaseException) -> str:
  """`error: <message>` on one line (plus the process, on multi-process jobs)."""
  message = message_of(e)
  jax = sys.modules.get('jax')  # only when the program has started JAX
  if jax is not None and jax.process_count() > 1:
    message += f' (process {jax.process_index()} of {jax.process_count()})'
  return f'error: {message}'


def run(main: Callable, argv=None) -> None:
  """app.run(main) with one-line errors for bad flags, bad configs and EXPECTED_ERRORS."""

  def guarded(args):
    try:
      apply_xla_cpu_flags()
      return main(args)
    except Exception as e:  # pylint: disable=broad-except  (re-raised unless a user error)
      if debug_requested() or not is_user_error(e):
        raise
      sys.exit(error_line(e))

  std_logging.getLogger('absl').setLevel(std_logging.INFO)
  quiet_libraries()
  app.run(guarded, argv=argv, flags_parser=parse_flags)


def merged_xla_flags(current: str, extra: str) -> str:
  """XLA_FLAGS `current` plus the flags of `extra` whose names it does not set (the user's
  environment wins a conflict)."""
  name = lambda flag: flag.split('=', 1)[0]
  have = {name(f) for f in current.split()}
  added = [f for f in extra.split() if name(f) not in have]
  return ' '.join(current.split() + added)


def apply_xla_cpu_flags() -> None:
  """Puts the config's `xla_cpu_flags` into XLA_FLAGS before the program compiles anything.

  XLA reads XLA_FLAGS when its first computation compiles, so this runs before `main`; a
  process that has compiled already (a Python caller) is told that the flags come too late.
  The flags are XLA:CPU options (configs/common.py says which and why); other backends
  ignore them.
  """
  if 'config' not in flags.FLAGS or flags.FLAGS.config is None:
    return
  extra = flags.FLAGS.config.get('xla_cpu_flags', '')
  if not extra:
    return
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top  (only when asked)
  if xla_bridge.backends_are_initialized():
    std_logging.getLogger(__name__).warning(
        'config.xla_cpu_flags %r not applied: JAX has compiled already in this process', extra)
    return
  os.environ['XLA_FLAGS'] = merged_xla_flags(os.environ.get('XLA_FLAGS', ''), extra)


# ------------------------------------------------------------------------ console output
# One line per event: the program's own INFO lines (steps, evaluations, `resuming from`,
# warnings) are shown; the INFO lines of libraries (orbax writes ~20 per checkpoint) are not,
# unless --debug (or ZEGFORMER_DEBUG=1) or -v/--verbosity >= 1 asks for them. Warnings and
# errors of libraries are shown, except the known noise below.

_OWN_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), d)
                  + os.sep for d in ('zegformer_jax', 'data_prep', 'configs'))
# (logger-name prefix, message prefix) of library records that say nothing to the user.
LIBRARY_NOISE = (
    # orbax on every read-only (evaluation, prediction) checkpoint manager.
    ('', 'CheckpointManagerOptions.read_only=True, setting'),
    ('', 'Given directory is read only='),
    # orbax's background threads log an exception (with its traceback) that the main thread
    # then raises itself: the CLI reports it once.
    ('', '[process='),
    # transformers, when a Flax CLIP model is made (FlaxCLIPModel: this project is Flax).
    ('transformers', 'TensorFlow and JAX classes are deprecated and will be removed'),
)


def _verbose() -> bool:
  if debug_requested():
    return True
  return flags.FLAGS.is_parsed() and int(flags.FLAGS['verbosity'].value) >= 1


def _is_noise(record: std_logging.LogRecord) -> bool:
  try:
    message = record.getMessage()
  except Exception:  # pylint: disable=broad-except  (a record that cannot format is shown)
    return False
  for logger, prefix in LIBRARY_NOISE:
    if record.name.startswith(logger) and message.startswith(prefix):
      if prefix == '[process=' and ' raised an exception' not in message:
        continue
      return True
  return False


class LibraryFilter(std_logging.Filter):
  """Drops INFO/DEBUG records of libraries and LIBRARY_NOISE unless verbose."""

  def filter(self, record):
    if _verbose():
      return True
    if _is_noise(record):
      return False
    return record.levelno >= std_logging.WARNING or (record.pathname or '').startswith(
        _OWN_DIRS)


_LIBRARY_FILTER = LibraryFilter()
# Loggers whose records do not reach the absl handler (transformers has its own handler).
_OWN_HANDLER_LOGGERS = ('transformers.modeling_flax_utils', 'transformers.modeling_utils',
                        'transformers.tokenization_utils_base',
                        'transformers.feature_extraction_utils')


def quiet_libraries() -> None:
  """Installs LibraryFilter on the absl handler (every record of absl and Python logging
  that is printed) and on the transformers loggers that print through their own handler."""
  from absl import logging as absl_logging
  handler = absl_logging.get_absl_handler()
  if _LIBRARY_FILTER not in handler.filters:
    handler.addFilter(_LIBRARY_FILTER)
  for name in _OWN_HANDLER_LOGGERS:
    logger = std_logging.getLogger(name)
    if _LIBRARY_FILTER not in logger.filters:
      logger.addFilter(_LIBRARY_FILTER)


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
