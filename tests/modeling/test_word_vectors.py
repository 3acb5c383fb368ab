"""Word-vector class embeddings (.json / .npz), the alternative to CLIP text embeddings."""
import json

import ml_collections
import numpy as np
import pytest

from zegformer_jax.modeling import clip
from zegformer_jax.modeling import word_vectors


def test_json_and_npz_give_the_same_normalised_rows(tmp_path):
  table = {'cat': [3.0, 4.0, 0.0], 'building': [0.0, 0.0, 2.0], 'dog': [1.0, 1.0, 1.0]}
  (tmp_path / 'v.json').write_text(json.dumps(table))
  np.savez(tmp_path / 'v.npz', names=np.asarray(list(table)), vectors=np.asarray(list(table.values())))
  names = ['building, edifice', 'cat']
  want = np.array([[0, 0, 1], [0.6, 0.8, 0]], np.float32)
  for f in ('v.json', 'v.npz'):
    np.testing.assert_allclose(word_vectors.class_vectors(str(tmp_path / f), names), want)


def test_errors_name_the_file_and_class(tmp_path):
  (tmp_path / 'v.json').write_text(json.dumps({'cat': [1, 0]}))
  with pytest.raises(ValueError, match=r"v.json: no vector for class 'cow'"):
    word_vectors.class_vectors(str(tmp_path / 'v.json'), ['cat', 'cow'])
  (tmp_path / 'bad.json').write_text('[1, 2]')
  with pytest.raises(ValueError, match='bad.json: not a word-vector file'):
    word_vectors.class_vectors(str(tmp_path / 'bad.json'), ['cat'])
  with pytest.raises(FileNotFoundError, match='class_embeddings_file'):
    word_vectors.class_vectors(str(tmp_path / 'none.npz'), ['cat'])
  (tmp_path / 'p.npz').write_bytes(b'PK-not-really')
  with pytest.raises(ValueError, match='p.npz: not a word-vector file'):
    word_vectors.class_vectors(str(tmp_path / 'p.npz'), ['cat'])


def test_config_switches_the_class_embeddings(tmp_path):
  (tmp_path / 'v.json').write_text(json.dumps({'a': [2.0, 0.0], 'b': [0.0, -1.0]}))
  config = ml_collections.ConfigDict({'clip': {'class_embeddings_file': str(tmp_path / 'v.json')}})
  got = clip.class_embeddings(config, str(tmp_path), ['b', 'a'], 'single')
  np.testing.assert_array_equal(got, [[0.0, -1.0], [1.0, 0.0]])
