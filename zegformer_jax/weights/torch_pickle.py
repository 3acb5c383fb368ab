"""Reads PyTorch checkpoints and plain pickles into numpy arrays, without torch and safely.

Unpickling runs whatever the file names: a pickle can call `os.system` as easily as it can
rebuild a tensor. Every file here goes through `SafeUnpickler`, whose `find_class` resolves
only the handful of globals that tensor and ndarray reconstruction need, mapped to this
module's own numpy functions; anything else raises `UnsafePickleError` naming the global
(e.g. `posix.system`), before anything of the file's choosing has run.

Allowed globals (module.attr -> what it becomes here):

  torch._utils._rebuild_tensor[_v2|_v3]     _rebuild_tensor*: an ndarray view of a storage
  torch._utils._rebuild_parameter[_with_state], torch._tensor._rebuild_from_type_v2
                                            unwrap to the tensor (subclass/state dropped)
  torch[.cuda].<Type>Storage, torch.UntypedStorage, torch.<dtype>
                                            dtype markers; the storage bytes come from
                                            persistent_load, never from pickled code
  torch.Tensor, torch.nn.parameter.Parameter  inert markers (for _rebuild_from_type_v2)
  torch.jit._pickle.build_*list, restore_type_tag   identity functions (TorchScript lists)
  collections.OrderedDict, builtins.{set, frozenset, complex, slice, bytearray}
  numpy[._]core.multiarray._reconstruct / scalar, numpy.ndarray, numpy.dtype
                                            numpy's own array reconstruction;
  numpy[._]core.numeric._frombuffer          the protocol-5 variant (np.frombuffer)
  _codecs.encode                            latin-1 str -> bytes only (Python 3 protocol-2
                                            pickles of bytes, e.g. ndarray raw data)
  __torch__.*  (TorchScript archives only)  `ScriptObject` placeholders that only store
                                            their attribute dict (see `script_tensors`)

Formats (`load` picks by content, not by file name):

- torch zip (torch.save since 1.6, and TorchScript archives from torch.jit.save): a zip
  with `<name>/data.pkl` (protocol 2; tensors are `_rebuild_tensor_v2(storage, offset,
  size, stride, ...)` with persistent ids `('storage', torch.FloatStorage, key, location,
  numel)`), `<name>/data/<key>` raw little-endian storage bytes, `<name>/version` and, since
  torch 2.1, `<name>/byteorder`. A TorchScript archive adds `code/` and `constants.pkl`;
  its data.pkl holds `__torch__.*` module objects (NEWOBJ + BUILD with an attribute dict).
- legacy torch.save (before 1.6): consecutive pickles: magic number, protocol version,
  system info, the object (persistent ids `('storage', type, key, location, numel,
  view_metadata)`), the list of storage keys, then per key an int64 element count and the
  raw bytes.
- plain pickle (detectron2 `.pkl`: a dict of numpy arrays; read with encoding latin-1 like
  detectron2 does, so Python 2 pickles work too).

Supported storage dtypes: float16/32/64, bfloat16 (as ml_dtypes.bfloat16), int8/16/32/64,
uint8, bool. Strides and storage offsets are honoured (views are copied only when not
contiguous); every view is bounds-checked against its storage.
"""
import collections
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, Dict, Optional, Tuple

import numpy as np

try:  # numpy >= 2 keeps the implementation in numpy._core
  from numpy._core import multiarray as _np_multiarray
except ImportError:  # pragma: no cover - numpy 1.x
  from numpy.core import multiarray as _np_multiarray

# torch.serialization's magic number and protocol version of the legacy (non-zip) format.
LEGACY_MAGIC_NUMBER = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL_VERSION = 1001


class UnsafePickleError(pickle.UnpicklingError, ValueError):
  """The pickle references a global outside the tensor/ndarray allow-list (a bad input
  file: a ValueError too, so the CLIs report it in one line)."""


class TorchFileError(ValueError):
  """The file is not a readable torch checkpoint (malformed, truncated, unsupported)."""


def _bfloat16():
  import ml_dtypes  # a jax dependency; only needed for bfloat16 storages
  return np.dtype(ml_dtypes.bfloat16)


# torch storage class name -> numpy dtype name ('bfloat16' resolved lazily).
_STORAGE_DTYPES = {
    'DoubleStorage': 'float64', 'FloatStorage': 'float32', 'HalfStorage': 'float16',
    'BFloat16Storage': 'bfloat16', 'LongStorage': 'int64', 'IntStorage': 'int32',
    'ShortStorage': 'int16', 'CharStorage': 'int8', 'ByteStorage': 'uint8',
    'BoolStorage': 'bool', 'UntypedStorage': 'uint8',
}
# torch.<dtype> attribute -> numpy dtype name (for _rebuild_tensor_v3).
_TORCH_DTYPES = {
    'float64': 'float64', 'double': 'float64', 'float32': 'float32', 'float': 'float32',
    'float16': 'float16', 'half': 'float16', 'bfloat16': 'bfloat16', 'int64': 'int64',
    'long': 'int64', 'int32': 'int32', 'int': 'int32', 'int16': 'int16', 'short': 'int16',
    'int8': 'int8', 'uint8': 'uint8', 'bool': 'bool',
}


def _np_dtype(name: str) -> np.dtype:
  return _bfloat16() if name == 'bfloat16' else np.dtype(name)


class _DType:
  """Stands for a torch storage class or torch dtype: only its numpy dtype matters."""

  def __init__(self, qualname: str, dtype_name: str):
    self.qualname = qualname
    self.dtype = _np_dtype(dtype_name)

  def __repr__(self):
    return f'<{self.qualname} -> {self.dtype}>'


class _Storage:
  """A flat storage: `array` is a 1-D ndarray of the storage dtype, or None until the data
  is read (legacy format, where the bytes follow the object pickle)."""

  def __init__(self, dtype: np.dtype, numel: int, array: Optional[np.ndarray] = None):
    self.dtype = dtype
    self.numel = numel
    self.array = array


class _PendingTensor:
  """A tensor whose storage bytes are not read yet (legacy format); see `_resolve`."""

  def __init__(self, storage, offset, size, stride, dtype=None):
    self.args = (storage, offset, size, stride, dtype)


class _Marker:
  """Inert stand-in for a torch class that only appears as an argument (torch.Tensor)."""

  def __init__(self, qualname):
    self.qualname = qualname


class ScriptObject:
  """Placeholder for a TorchScript object (`__torch__.*` class) in a TorchScript archive.

  NEWOBJ creates it without arguments and BUILD hands it its state, normally the dict of
  the module's attributes (parameters, buffers, submodules, plain attributes). Nothing of
  the archive's code runs; `qualname` records the class it stands for.
  """
  qualname = '__torch__'

  def __init__(self, *args):
    self.args = args
    self.state = None

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f'<ScriptObject {self.qualname}>'


def _script_class(qualname: str):
  return type(qualname.rsplit('.', 1)[-1], (ScriptObject,), {'qualname': qualname})


def _view(storage: _Storage, offset: int, size, stride, dtype=None) -> np.ndarray:
  """The tensor (size, stride in elements, offset) over `storage` as an ndarray."""
  base = storage.array
  if dtype is not None and dtype != base.dtype:  # _rebuild_tensor_v3 over untyped bytes
    if base.dtype != np.uint8:
      raise TorchFileError(f'cannot view a {base.dtype} storage as {dtype}')
    usable = base.size - base.size % dtype.itemsize
    base = base[:usable].view(dtype)
  size = tuple(int(s) for s in size)
  stride = tuple(int(s) for s in stride)
  offset = int(offset)
  if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise TorchFileError(f'invalid tensor geometry size={size} stride={stride}')
  if 0 in size:
    return np.zeros(size, base.dtype)
  extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
  if offset < 0 or extent > base.size:
    raise TorchFileError(f'tensor size={size} stride={stride} offset={offset} exceeds its '
                         f'storage of {base.size} elements')
  contiguous = tuple(int(np.prod(size[i + 1:], dtype=np.int64)) for i in range(len(size)))
  numel = int(np.prod(size, dtype=np.int64))
  if all(n == 1 or s == c for n, s, c in zip(size, stride, contiguous)):
    return base[offset:offset + numel].reshape(size)
  item = base.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(base[offset:], shape=size,
                                         strides=tuple(s * item for s in stride),
                                         writeable=False)
  return np.array(view)  # a contiguous copy, independent of the storage


def _rebuild_tensor(storage, storage_offset, size, stride, *_, dtype=None):
  if not isinstance(storage, _Storage):
    raise TorchFileError(f'tensor storage is {type(storage).__name__}, not a storage')
  if storage.array is None:
    return _PendingTensor(storage, storage_offset, size, stride, dtype)
  return _view(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
  del requires_grad, backward_hooks, metadata
  if not isinstance(dtype, _DType):
    raise TorchFileError(f'_rebuild_tensor_v3 dtype is {dtype!r}')
  return _rebuild_tensor(storage, storage_offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *state):
  del requires_grad, backward_hooks, state
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  # `func` was resolved through find_class, so it is one of this module's functions.
  del new_type, state
  if func not in _REBUILD_FUNCTIONS:
    raise UnsafePickleError(f'_rebuild_from_type_v2 of {func!r} is not allowed')
  return func(*args)


def _frombuffer(buf, dtype, shape, order):
  """numpy's protocol-5 array reconstruction (numpy._core.numeric._frombuffer)."""
  if not isinstance(dtype, np.dtype) or order not in ('C', 'F'):
    raise UnsafePickleError(f'_frombuffer({type(buf).__name__}, {dtype!r}, ..., {order!r})')
  return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order)


def _identity(x, *_):
  return x


def _latin1_encode(obj, encoding='latin1', errors='strict'):
  """_codecs.encode as protocol-2 pickles of bytes use it: latin-1 str -> bytes only."""
  if not isinstance(obj, str) or encoding.replace('-', '').lower() != 'latin1':
    raise UnsafePickleError(f'_codecs.encode({type(obj).__name__}, {encoding!r}) is not allowed')
  return obj.encode('latin1', errors)


_REBUILD_FUNCTIONS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3,
                      _rebuild_parameter)

_SAFE_GLOBALS = {
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_tensor_v3'): _rebuild_tensor_v3,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('torch._tensor', '_rebuild_from_type_v2'): _rebuild_from_type_v2,
    ('torch', 'Tensor'): _Marker('torch.Tensor'),
    ('torch.nn.parameter', 'Parameter'): _Marker('torch.nn.parameter.Parameter'),
    ('torch.jit._pickle', 'build_intlist'): _identity,
    ('torch.jit._pickle', 'build_tensorlist'): _identity,
    ('torch.jit._pickle', 'build_doublelist'): _identity,
    ('torch.jit._pickle', 'build_boollist'): _identity,
    ('torch.jit._pickle', 'restore_type_tag'): _identity,
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('_codecs', 'encode'): _latin1_encode,
    ('numpy', 'ndarray'): np.ndarray,
    ('numpy', 'dtype'): np.dtype,
}
for _module in ('builtins', '__builtin__'):
  for _name, _obj in (('set', set), ('frozenset', frozenset), ('complex', complex),
                      ('slice', slice), ('bytearray', bytearray)):
    _SAFE_GLOBALS[(_module, _name)] = _obj
for _module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
  _SAFE_GLOBALS[(_module, '_reconstruct')] = _np_multiarray._reconstruct
  _SAFE_GLOBALS[(_module, 'scalar')] = _np_multiarray.scalar
for _module in ('numpy.core.numeric', 'numpy._core.numeric'):
  _SAFE_GLOBALS[(_module, '_frombuffer')] = _frombuffer
for _module in ('torch', 'torch.cuda', 'torch.storage'):
  for _name, _dtype in _STORAGE_DTYPES.items():
    _SAFE_GLOBALS[(_module, _name)] = _DType(f'{_module}.{_name}', _dtype)
for _name, _dtype in _TORCH_DTYPES.items():
  _SAFE_GLOBALS[('torch', _name)] = _DType(f'torch.{_name}', _dtype)


class SafeUnpickler(pickle.Unpickler):
  """pickle.Unpickler restricted to the allow-list above.

  Args:
    file: binary file positioned at the pickle.
    source: name used in error messages (the checkpoint path).
    load_storage: persistent_load callback for torch storages: (dtype, key, numel,
      view_metadata) -> _Storage. None: persistent ids are refused.
    torchscript: resolve `__torch__.*` classes to `ScriptObject` placeholders.
  """

  def __init__(self, file, *, source: str = '<pickle>', load_storage=None,
               torchscript: bool = False):
    super().__init__(file, encoding='latin1')
    self._source = source
    self._load_storage = load_storage
    self._torchscript = torchscript
    self._script_classes = {}

  def find_class(self, module, name):
    obj = _SAFE_GLOBALS.get((module, name))
    if obj is not None:
      return obj
    if self._torchscript and (module == '__torch__' or module.startswith('__torch__.')):
      qualname = f'{module}.{name}'
      if qualname not in self._script_classes:
        self._script_classes[qualname] = _script_class(qualname)
      return self._script_classes[qualname]
    raise UnsafePickleError(
        f'{self._source}: refusing to unpickle {module}.{name}: only tensor and array '
        'reconstruction is allowed (the file may be malicious or not a checkpoint)')

  def persistent_load(self, pid):
    if self._load_storage is None:
      raise UnsafePickleError(f'{self._source}: unexpected persistent id {pid!r} in a plain '
                              'pickle')
    if not isinstance(pid, tuple) or not pid or pid[0] != 'storage':
      raise TorchFileError(f'{self._source}: unsupported persistent id {pid!r}')
    if len(pid) == 5:
      _, storage_type, key, _location, numel = pid
      view = None
    elif len(pid) == 6:
      _, storage_type, key, _location, numel, view = pid
    else:
      raise TorchFileError(f'{self._source}: unsupported persistent id {pid!r}')
    if not isinstance(storage_type, _DType):
      raise TorchFileError(f'{self._source}: storage type {storage_type!r} is not a storage')
    return self._load_storage(storage_type.dtype, str(key), int(numel), view)


# ----------------------------------------------------------------------------- formats


def _zip_prefix(zf: zipfile.ZipFile, path: str) -> str:
  """The archive's top-level folder (`archive/`, or the file stem for older torch)."""
  pkls = [n for n in zf.namelist() if n.endswith('data.pkl') and n.count('/') <= 1]
  if not pkls:
    raise TorchFileError(f'{path}: zip file without data.pkl: not a torch checkpoint')
  if len(pkls) > 1:
    raise TorchFileError(f'{path}: zip file with several data.pkl ({pkls})')
  return pkls[0][:-len('data.pkl')]


def is_torchscript(path: str) -> bool:
  """True for a TorchScript archive (torch.jit.save): a torch zip with code/."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    prefix = _zip_prefix(zf, path)
    names = zf.namelist()
  return f'{prefix}constants.pkl' in names or any(n.startswith(f'{prefix}code/')
                                                  for n in names)


def _load_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as zf:
    prefix = _zip_prefix(zf, path)
    names = set(zf.namelist())
    torchscript = (f'{prefix}constants.pkl' in names or
                   any(n.startswith(f'{prefix}code/') for n in names))
    order = '<'
    if f'{prefix}byteorder' in names:
      mark = zf.read(f'{prefix}byteorder').decode('ascii').strip()
      if mark not in ('little', 'big'):
        raise TorchFileError(f'{path}: unknown byteorder {mark!r}')
      order = '<' if mark == 'little' else '>'
    storages: Dict[str, _Storage] = {}

    def load_storage(dtype, key, numel, view):
      if view is not None:
        raise TorchFileError(f'{path}: storage views are not used by the zip format')
      if key not in storages:
        name = f'{prefix}data/{key}'
        if name not in names:
          raise TorchFileError(f'{path}: storage {name} is missing')
        raw = zf.read(name)
        if len(raw) < numel * dtype.itemsize:
          raise TorchFileError(f'{path}: storage {name} holds {len(raw)} bytes, '
                               f'{numel} x {dtype.itemsize} expected')
        file_dtype = dtype.newbyteorder(order) if dtype.itemsize > 1 else dtype
        array = np.frombuffer(raw, dtype=file_dtype, count=numel)
        if file_dtype != dtype:  # stored in the other byte order than this machine's
          array = array.astype(dtype)
        storages[key] = _Storage(dtype, numel, array)
      storage = storages[key]
      if storage.dtype != dtype:  # one storage read as two dtypes: not written by torch
        raise TorchFileError(f'{path}: storage {key} used as {storage.dtype} and {dtype}')
      return storage

    with zf.open(f'{prefix}data.pkl') as f:
      unpickler = SafeUnpickler(f, source=path,
                                load_storage=load_storage, torchscript=torchscript)
      return unpickler.load()


def _load_pickle_stream(path: str) -> Any:
  """A legacy torch.save file or a plain pickle."""
  with open(path, 'rb') as f:
    storages: Dict[str, _Storage] = {}

    def load_storage(dtype, key, numel, view):
      if key not in storages:
        storages[key] = _Storage(dtype, numel)
      root = storages[key]
      if view is None:
        return root
      view_key, offset, view_size = view
      # A view shares the root's bytes; materialised after the data is read.
      return _StorageView(root, str(view_key), int(offset), int(view_size))

    first = SafeUnpickler(f, source=path, load_storage=load_storage).load()
    if not (isinstance(first, int) and first == LEGACY_MAGIC_NUMBER):
      return first  # a plain pickle: the first object is the content
    protocol = SafeUnpickler(f, source=path).load()
    if protocol != LEGACY_PROTOCOL_VERSION:
      raise TorchFileError(f'{path}: legacy torch protocol {protocol!r} is not supported')
    SafeUnpickler(f, source=path).load()  # sys_info: byte order and type sizes
    obj = SafeUnpickler(f, source=path, load_storage=load_storage).load()
    keys = SafeUnpickler(f, source=path).load()
    if not isinstance(keys, list):
      raise TorchFileError(f'{path}: malformed legacy storage list')
    for key in keys:
      storage = storages.get(str(key))
      if storage is None:
        raise TorchFileError(f'{path}: storage {key} is listed but not used')
      header = f.read(8)
      if len(header) != 8:
        raise TorchFileError(f'{path} is truncated: it ends before storage {key} '
                             f'({_REDOWNLOAD})')
      (numel,) = struct.unpack('<q', header)
      nbytes = numel * storage.dtype.itemsize
      raw = f.read(nbytes)
      if numel == storage.numel and len(raw) < nbytes:
        raise TorchFileError(f'{path} is truncated: storage {key} has {len(raw)} of its '
                             f'{nbytes} bytes ({_REDOWNLOAD})')
      if numel != storage.numel or len(raw) != nbytes:
        raise TorchFileError(f'{path}: storage {key} has {len(raw)} bytes, {numel} elements '
                             f'announced, {storage.numel} expected')
      storage.array = np.frombuffer(raw, dtype=storage.dtype)
    missing = [k for k, s in storages.items() if s.array is None]
    if missing:
      raise TorchFileError(f'{path}: storages {missing[:5]} have no data')
    return _resolve(obj)


class _StorageView(_Storage):
  """Legacy storage view: elements [offset, offset + size) of a root storage."""

  def __init__(self, root: _Storage, key: str, offset: int, size: int):
    super().__init__(root.dtype, size)
    self.root, self.key, self.offset = root, key, offset

  @property
  def array(self):
    if self.root.array is None:
      return None
    return self.root.array[self.offset:self.offset + self.numel]

  @array.setter
  def array(self, value):
    if value is not None:
      raise AttributeError('a storage view has no data of its own')


def _resolve(obj, _depth=0):
  """Replaces every _PendingTensor in containers (and ScriptObject states) by its array."""
  if _depth > 200:
    raise TorchFileError('object nesting too deep')
  if isinstance(obj, _PendingTensor):
    storage, offset, size, stride, dtype = obj.args
    return _view(storage, offset, size, stride, dtype)
  if isinstance(obj, dict):
    for k in list(obj):
      obj[k] = _resolve(obj[k], _depth + 1)
    return obj
  if isinstance(obj, list):
    obj[:] = [_resolve(v, _depth + 1) for v in obj]
    return obj
  if isinstance(obj, tuple):
    return type(obj)(_resolve(v, _depth + 1) for v in obj) if type(obj) is tuple else obj
  if isinstance(obj, ScriptObject):
    obj.state = _resolve(obj.state, _depth + 1)
  return obj


# What unpickling garbage can raise (besides UnpicklingError): the opcodes are read from the
# file, so any of these can come out of a damaged or foreign file.
_DAMAGED = (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, OverflowError, MemoryError, RecursionError, struct.error)
_ZIP_DAMAGED = _DAMAGED + (zipfile.BadZipFile, zlib.error, NotImplementedError)
_ZIP_LOCAL_HEADER = b'PK\x03\x04'
_REDOWNLOAD = 'an interrupted download or copy? fetch the file again'


def looks_like(head: bytes) -> Optional[str]:
  """What a file that starts with `head` (its first few KB) looks like, when that is a
  format other than a checkpoint: 'an HTML page', 'a Git LFS pointer ...', ...; else None."""
  text = head.lstrip(b'\xef\xbb\xbf \t\r\n').lower()
  if text.startswith((b'<!doctype html', b'<html')) or (
      text.startswith(b'<') and b'<html' in text):
    return 'an HTML page (a web page saved instead of the file: a login, error or redirect page?)'
  if text.startswith(b'version https://git-lfs'):
    return 'a Git LFS pointer (the file itself was never fetched: run `git lfs pull`)'
  if text.startswith(b'<?xml') or text.startswith(b'<'):
    return 'an XML document'
  if text[:1] in (b'{', b'['):
    return 'JSON text'
  signatures = ((b'\x1f\x8b', 'gzip-compressed data (decompress it first)'),
                (b'\x89HDF', 'an HDF5 file (Keras / TensorFlow weights)'),
                (b'\x93NUMPY', 'a single numpy .npy array'),
                (b'\x89PNG', 'a PNG image'), (b'\xff\xd8\xff', 'a JPEG image'),
                (b'%PDF', 'a PDF document'), (b'BZh', 'bzip2-compressed data'),
                (b'\xfd7zXZ', 'xz-compressed data'), (b'7z\xbc\xaf', 'a 7-zip archive'),
                (b'Rar!', 'a RAR archive'))
  for magic, kind in signatures:
    if head.startswith(magic):
      return kind
  if len(head) >= 10 and head[8:10] == b'{"':
    return 'a safetensors file (give it the .safetensors extension)'
  if len(head) > 262 and head[257:262] == b'ustar':
    return 'a tar archive (extract it first)'
  try:
    decoded = head.decode('utf-8')
  except UnicodeDecodeError:
    # A cut in the middle of a multi-byte character at the end of `head` is still text.
    try:
      decoded = head[:-3].decode('utf-8')
    except UnicodeDecodeError:
      return None
  if decoded and all(c.isprintable() or c in '\t\r\n\f' for c in decoded):
    return 'a text file'
  return None


def _not_a_checkpoint(path: str, head: bytes) -> TorchFileError:
  kind = looks_like(head) or 'binary data of an unknown format'
  return TorchFileError(f'{path} is not a PyTorch checkpoint: it looks like {kind}')


def load(path: str) -> Any:
  """Loads a torch checkpoint (zip, TorchScript archive or legacy) or a plain pickle.

  Tensors come back as numpy arrays (float16/bfloat16 kept as stored), TorchScript modules
  as `ScriptObject`s (see `script_tensors`). Raises UnsafePickleError for any global outside
  the allow-list, TorchFileError for a malformed file: one naming the file and what it is
  instead (an HTML page, a Git LFS pointer, text, ...), or saying that it is truncated.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  if size == 0:
    raise TorchFileError(f'{path} is empty (0 bytes), not a PyTorch checkpoint ({_REDOWNLOAD})')
  with open(path, 'rb') as f:
    head = f.read(4096)
  if zipfile.is_zipfile(path):
    try:
      return _load_zip(path)
    except (UnsafePickleError, TorchFileError):
      raise
    except _ZIP_DAMAGED as e:
      raise TorchFileError(f'{path} is a damaged PyTorch zip checkpoint ({type(e).__name__}: '
                           f'{e}; {_REDOWNLOAD})') from None
  if head.startswith(_ZIP_LOCAL_HEADER):
    raise TorchFileError(f'{path} is truncated: a zip archive (the PyTorch checkpoint format) '
                         f'without its end, {size} bytes ({_REDOWNLOAD})')
  # Protocol 2+ pickles start with PROTO; older ones (protocol 0 is ASCII) are tried too.
  pickled = len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5
  try:
    return _load_pickle_stream(path)
  except (UnsafePickleError, TorchFileError):
    raise
  except _DAMAGED as e:
    truncated = isinstance(e, EOFError) or 'truncated' in str(e)
    if pickled and truncated:
      raise TorchFileError(f'{path} is truncated: its pickle data stops early, at {size} bytes '
                           f'({_REDOWNLOAD})') from None
    if pickled:
      raise TorchFileError(f'{path} is not a readable PyTorch checkpoint: damaged pickle data '
                           f'({type(e).__name__}: {e})') from None
    raise _not_a_checkpoint(path, head) from None


def script_tensors(obj: Any, prefix: str = '') -> Dict[str, np.ndarray]:
  """{dotted attribute path: array} of every tensor attribute of a TorchScript module tree.

  Parameters and buffers appear under their state_dict names; plain tensor attributes (e.g.
  OpenAI CLIP's `attn_mask`) appear too, and callers decide what they need. The module
  flags (`training`, ...) and other non-tensor attributes are skipped.
  """
  out: Dict[str, np.ndarray] = {}

  def walk(node, name, depth):
    if depth > 100:
      raise TorchFileError(f'module nesting too deep at {name}')
    if isinstance(node, np.ndarray):
      out[name] = node
    elif isinstance(node, ScriptObject):
      state = node.state
      if isinstance(state, dict):
        for key, value in state.items():
          walk(value, f'{name}.{key}' if name else str(key), depth + 1)
    elif isinstance(node, dict) and name:  # a dict attribute: keep its tensors too
      for key, value in node.items():
        walk(value, f'{name}.{key}', depth + 1)

  walk(obj, prefix, 0)
  return out


def describe(obj: Any) -> str:
  """A short description of what `load` returned, for error messages."""
  if isinstance(obj, ScriptObject):
    return f'TorchScript {obj.qualname}'
  if isinstance(obj, dict):
    keys = list(obj)[:6]
    return f'dict with keys {keys}{"..." if len(obj) > 6 else ""}'
  return type(obj).__name__


def tensor_dict(obj: Any, source: str = '<checkpoint>') -> Tuple[Dict[str, np.ndarray], str]:
  """(flat {key: ndarray}, where it was found) of a loaded checkpoint.

  Accepts a state dict, a dict holding one under 'model' (detectron2) or 'state_dict', or a
  TorchScript module. Non-array values inside the state dict are an error.
  """
  if isinstance(obj, ScriptObject):
    return script_tensors(obj), 'TorchScript module attributes'
  if not isinstance(obj, dict):
    raise TorchFileError(f'{source}: expected a state dict, found {describe(obj)}')
  where = 'top level'
  for key in ('model', 'state_dict'):
    if isinstance(obj.get(key), dict):
      obj, where = obj[key], f'[{key!r}]'
      break
  tensors = {}
  for key, value in obj.items():
    if not isinstance(value, np.ndarray):
      raise TorchFileError(f'{source}: {where} entry {key!r} is a {type(value).__name__}, '
                           'not a tensor/array')
    tensors[str(key)] = value
  return tensors, where
