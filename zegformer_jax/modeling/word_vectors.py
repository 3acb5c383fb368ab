"""Class embeddings from a local word-vector file, in place of CLIP text embeddings.

SPNet, ZS3Net and the paper's Table 1 also use word2vec and fastText vectors (the
concatenation "ft + w2v", 600-d) as class embeddings. Nothing is downloaded: a user who has
the vectors writes them for the class names once, in one of two plain formats:

  <file>.json   {"class name": [v_1, ..., v_D], ...}
  <file>.npz    arrays 'names' [K] (str) and 'vectors' [K, D] (float); read without pickle

A class name is looked up as it is, then by its first synonym ("building, edifice" ->
"building"). Vectors are L2-normalised, as the official code does with its pickles.
Set config.clip.class_embeddings_file; config.model.embed_dim must equal D. The CLIP image
branch (img, full) keeps CLIP's own text embeddings, the only ones in its space.
"""
import json
import os
from typing import Dict, Sequence

import numpy as np


def read_vectors(path: str) -> Dict[str, np.ndarray]:
  """{name: vector} of a .json or .npz word-vector file (module docstring)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'word-vector file {path!r} (config.clip.class_embeddings_file) '
                            'does not exist')
  try:
    if path.endswith('.json'):
      with open(path, encoding='utf-8') as f:
        table = json.load(f)
      if not isinstance(table, dict):
        raise ValueError('expected an object {"class name": [numbers], ...}')
      return {str(k): np.asarray(v, np.float64) for k, v in table.items()}
    if path.endswith('.npz'):
      with np.load(path, allow_pickle=False) as z:
        names, vectors = z['names'], np.asarray(z['vectors'], np.float64)
      if vectors.ndim != 2 or len(names) != len(vectors):
        raise ValueError(f"'names' {names.shape} and 'vectors' {vectors.shape} do not match")
      return {str(n): v for n, v in zip(names, vectors)}
  except (ValueError, KeyError, OSError, TypeError) as e:
    raise ValueError(f'{path}: not a word-vector file ({e})') from e
  raise ValueError(f'{path}: word-vector files are .json or .npz')


def class_vectors(path: str, class_names: Sequence[str]) -> np.ndarray:
  """[K, D] float32 L2-normalised vectors of `class_names` from `path`."""
  table = read_vectors(path)
  rows = []
  for name in class_names:
    key = name if name in table else name.split(',')[0].strip()
    if key not in table:
      raise ValueError(f'{path}: no vector for class {name!r}')
    rows.append(table[key])
  dims = {len(r) for r in rows}
  if len(dims) != 1:
    raise ValueError(f'{path}: vectors of different lengths {sorted(dims)}')
  v = np.stack(rows)
  norm = np.linalg.norm(v, axis=1, keepdims=True)
  if (norm == 0).any():
    raise ValueError(f'{path}: an all-zero vector for {class_names[int(np.argmin(norm))]!r}')
  return (v / norm).astype(np.float32)
