"""TFRecord framing, CRC32C, tf.train.Example helpers and dataset_info.json."""
import json
import os
import struct

import numpy as np
import pytest

from zegformer_jax.data import data_source
from zegformer_jax.data import tfrecord


# ----------------------------------------------------------------------------- CRC32C


def _crc32c_bitwise(data: bytes) -> int:
  """Independent reference: CRC-32C bit by bit (reflected polynomial 0x82F63B78)."""
  c = 0xFFFFFFFF
  for byte in data:
    c ^= byte
    for _ in range(8):
      c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
  return c ^ 0xFFFFFFFF


@pytest.mark.parametrize('fn', [tfrecord.crc32c, _crc32c_bitwise])
def test_crc32c_vectors(fn):
  # Check value of the CRC-32C catalogue and the RFC 3720 (iSCSI) vectors.
  assert fn(b'123456789') == 0xE3069283
  assert fn(bytes(32)) == 0x8A9136AA
  assert fn(b'\xff' * 32) == 0x62A8AB43
  assert fn(bytes(range(32))) == 0x46DD794E
  assert fn(bytes(range(31, -1, -1))) == 0x113FDB5C


def test_crc32c_matches_reference_on_random_lengths():
  rng = np.random.default_rng(0)
  for n in [1, 4, 5, 31, 32, 33, 63, 64, 65, 511, 512, 513, 1000, 4097]:
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert tfrecord.crc32c(data) == _crc32c_bitwise(data), n
    assert tfrecord.crc32c(bytearray(data)) == tfrecord.crc32c(memoryview(data)), n
  assert tfrecord.crc32c(b'') == 0


def test_crc32c_is_google_crc32c_a_declared_dependency():
  """CRC32C comes from google-crc32c, declared in pyproject.toml (no numpy fallback)."""
  import re
  import google_crc32c
  with open(os.path.join(os.path.dirname(__file__), '..', '..', 'pyproject.toml')) as f:
    deps = re.search(r'(?ms)^dependencies = \[(.*?)^\]', f.read()).group(1)
  assert re.search(r'"google-crc32c\b', deps), deps
  assert google_crc32c.implementation == 'c'
  assert not hasattr(tfrecord, '_crc32c_numpy') and not hasattr(tfrecord, 'crc32c_python')
  data = os.urandom(1 << 16)
  assert tfrecord.crc32c(data) == int(google_crc32c.value(data))


def test_masked_crc_formula():
  c = tfrecord.crc32c(b'abc')
  assert tfrecord.masked_crc32c(b'abc') == (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- framing


def test_record_layout_is_standard():
  rec = tfrecord.encode_record(b'hello')
  length, length_crc = struct.unpack('<QI', rec[:12])
  assert length == 5 and length_crc == tfrecord.masked_crc32c(rec[:8])
  assert rec[12:17] == b'hello'
  assert struct.unpack('<I', rec[17:])[0] == tfrecord.masked_crc32c(b'hello')


def _write(path, records):
  assert tfrecord.write_records(path, records) == len(records)


def test_round_trip_and_index(tmp_path):
  rng = np.random.default_rng(1)
  records = [b'', b'a', rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), b'xyz' * 100]
  path = str(tmp_path / 'x.tfrecord')
  _write(path, records)
  assert list(tfrecord.read_records(path)) == records
  index = tfrecord.index_records(path)
  assert index.shape == (4, 2)
  assert index[:, 1].tolist() == [len(r) for r in records]
  assert index[0, 0] == 0 and index[1, 0] == 16  # 12 header + 0 data + 4 footer
  src = data_source.TFRecordDataSource([path, path])
  assert len(src) == 8
  assert src[2] == records[2] and src[7] == records[3]
  assert src.locate(5) == (path, 1, 16)
  assert not [f for f in os.listdir(tmp_path) if '.tmp-' in f]


def test_writer_is_atomic(tmp_path):
  path = str(tmp_path / 'y.tfrecord')
  with pytest.raises(RuntimeError):
    with tfrecord.TFRecordWriter(path) as w:
      w.write(b'abc')
      raise RuntimeError('boom')
  assert os.listdir(tmp_path) == []


def test_corrupt_data_byte_names_file_and_record(tmp_path):
  path = str(tmp_path / 'c.tfrecord')
  _write(path, [b'first record', b'second record', b'third'])
  index = tfrecord.index_records(path)
  raw = bytearray(open(path, 'rb').read())
  raw[int(index[1, 0]) + 12 + 3] ^= 0x01  # one byte inside the data of record 1
  open(path, 'wb').write(bytes(raw))
  with pytest.raises(tfrecord.TFRecordError) as e:
    list(tfrecord.read_records(path))
  msg = str(e.value)
  assert path in msg and 'record 1' in msg and f'byte offset {index[1, 0]}' in msg
  assert 'data CRC' in msg
  src = data_source.TFRecordDataSource([path])  # random access path (os.pread)
  assert src[0] == b'first record'
  with pytest.raises(tfrecord.TFRecordError, match='record 1 at byte offset'):
    src[1]


def test_corrupt_length_and_truncation(tmp_path):
  path = str(tmp_path / 'l.tfrecord')
  _write(path, [b'a' * 50, b'b' * 50])
  raw = open(path, 'rb').read()
  bad = bytearray(raw)
  bad[66 + 1] ^= 0x10  # length field of record 1 (record 0 occupies 12 + 50 + 4 bytes)
  open(path, 'wb').write(bytes(bad))
  with pytest.raises(tfrecord.TFRecordError, match='record 1 at byte offset 66: length CRC'):
    tfrecord.index_records(path)
  open(path, 'wb').write(raw[:-10])  # truncated inside record 1
  for fn in (tfrecord.index_records, lambda p: list(tfrecord.read_records(p))):
    with pytest.raises(tfrecord.TFRecordError, match=r'l\.tfrecord: record 1 .*truncated'):
      fn(path)
  open(path, 'wb').write(raw[:70])  # truncated inside the header of record 1
  with pytest.raises(tfrecord.TFRecordError, match='record 1 at byte offset 66 is truncated'):
    tfrecord.index_records(path)
  with pytest.raises(FileNotFoundError, match='missing.tfrecord'):
    tfrecord.index_records(str(tmp_path / 'missing.tfrecord'))


# ----------------------------------------------------------------------------- Example


def test_parse_hand_built_example():
  # Example{features{feature{key:'a' value{bytes_list{value:'x'}}}}}, encoded by hand
  # from the tf.train.Example wire format.
  wire = b'\n\x0c\n\n\n\x01a\x12\x05\n\x03\n\x01x'
  assert tfrecord.parse_example(wire) == {'a': b'x'}


@pytest.mark.parametrize('bits', [8, 16])
def test_example_round_trip(bits):
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  dtype = np.uint8 if bits == 8 else np.uint16
  label = rng.integers(0, 250 if bits == 8 else 60000, (20, 30)).astype(dtype)
  label[0, 0] = 255 if bits == 8 else 65535
  ser = tfrecord.encode_example(image=tfrecord.encode_png(image), image_format='png',
                                filename='img_01.png', height=20, width=30,
                                label=tfrecord.encode_png(label), label_format='png')
  feats = tfrecord.parse_example(ser)
  assert feats['image/format'] == b'png' and feats['label/format'] == b'png'
  assert feats['image/height'] == 20 and feats['image/width'] == 30
  ex = tfrecord.decode_example(ser)
  assert ex['filename'] == 'img_01.png'
  np.testing.assert_array_equal(ex['image'], image)
  assert ex['label'].dtype == np.int32
  np.testing.assert_array_equal(ex['label'], label.astype(np.int32))


def test_example_jpeg_and_errors():
  from PIL import Image
  import io
  image = np.full((16, 16, 3), 100, np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=95)
  ser = tfrecord.encode_example(image=buf.getvalue(), image_format='jpeg', filename='a.jpg',
                                height=16, width=16)
  ex = tfrecord.decode_example(ser)
  assert ex['label'] is None and np.abs(ex['image'].astype(int) - 100).max() <= 2
  bad = tfrecord.encode_example(image=buf.getvalue(), image_format='jpeg', filename='a.jpg',
                                height=17, width=16)
  with pytest.raises(ValueError, match=r'rec 3 \(a.jpg\).*image/height'):
    tfrecord.decode_example(bad, 'rec 3')


# ----------------------------------------------------------------------------- dataset_info


def test_dataset_info_round_trip_and_errors(tmp_path):
  info = {'ignore_value': 255, 'splits': {'train': {
      'class_names': ['a', 'b'], 'seen': [True, False], 'num_examples': 3,
      'shards': [{'file': 'train.tfrecord-00000-of-00001', 'num_examples': 3}]}}}
  tfrecord.write_dataset_info(str(tmp_path), info)
  got = tfrecord.read_dataset_info(str(tmp_path))
  assert got['splits'] == info['splits'] and got['version'] == 1
  assert tfrecord.split_info(got, 'train')['ignore_value'] == 255
  with pytest.raises(KeyError, match="'val'.*available: \\['train'\\]"):
    tfrecord.split_info(got, 'val')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    tfrecord.read_dataset_info(str(tmp_path / 'nope'))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match='dataset_info.json not found'):
    tfrecord.read_dataset_info(str(empty))
  broken = json.loads(json.dumps(info))
  del broken['splits']['train']['seen']
  with pytest.raises(ValueError, match="split 'train' is missing key 'seen'"):
    tfrecord.write_dataset_info(str(tmp_path), broken)
  broken = json.loads(json.dumps(info))
  broken['splits']['train']['num_examples'] = 4
  with pytest.raises(ValueError, match='shards hold 3 examples'):
    tfrecord.write_dataset_info(str(tmp_path), broken)
