"""Class lists and seen/unseen splits of the real datasets, from package data (assets/).

The JSON files in zegformer_jax/assets/ are copied as data from the official ZegFormer split
files (see docs/reference.md, section 5):

  coco_stuff_classes.json   171 classes in the ZegFormer "all" order: 156 seen, then 15 unseen
  voc_classes.json          20 classes (ids 1..20), seen 1-15, unseen 16-20
  voc_train_list.json       the 10,582 train image names of voc12/split/train_list.npy
  voc_test_list.json        the 1,449 val image names of voc12/split/test_list.npy
  ade20k_full_classes.json  847 classes in the frequency-list order; seen = frequent + common
                            (572), unseen = rare (275)

Cross-dataset evaluation sets (train on COCO-Stuff, evaluate elsewhere; every class is
evaluated, so every entry has split 'all' and the seen flags of their splits are false):

  ade150_classes.json       ADE20k-150 (objectInfo150.txt order), splits train and val_all
  pcontext59_classes.json   PASCAL Context 59 (ids are the 459-class ids), split val_all
  pcontext459_classes.json  PASCAL Context 459 (labels.txt order), split val_all
  voc21_classes.json        PASCAL VOC background + 20 classes, split val_all

Their assets list the splits they have ("splits"); every split is labelled in trainId order.

Every class entry has: name; id (the class's value in the raw label files: stuffthingmaps
value = COCO id - 1, VOC id, ADE (R // 10) * 256 + G); trainId (its label in val_all, i.e.
its position in the "all" order); split ('seen' | 'unseen'); trainId_seen (label in train and
val_seen, or None); trainId_unseen (label in val_unseen, or None); plus per-dataset extras
(coco_id, isthing, color, frequency, image_count).

The converted splits (data_prep/<dataset>.py) use these label orders:
  train, val_seen  seen classes in trainId_seen order
  val_unseen       unseen classes in trainId_unseen order
  val_all          all classes in trainId order
"""
from __future__ import annotations

import functools
import importlib.resources
import json

import numpy as np

# ZS3Net's PASCAL VOC benchmarks (Bucher et al. 2019; valeoai/ZS3 train_pascal.py): K = 2,
# 4, 6, 8, 10 unseen classes, cumulative, background a seen class (21 classes). Dataset
# 'voc_zs3_k<K>'; its class entries are made from voc21_classes.json (`_voc_zs3_meta`).
ZS3NET_VOC_UNSEEN = ('cow', 'motorbike', 'aeroplane', 'sofa', 'cat', 'tvmonitor', 'train',
                     'bottle', 'chair', 'potted plant')
ZS3NET_VOC_K = (2, 4, 6, 8, 10)
VOC_ZS3 = tuple(f'voc_zs3_k{k}' for k in ZS3NET_VOC_K)

DATASETS = ('coco_stuff', 'voc', 'ade20k_full', 'ade150', 'pcontext59', 'pcontext459',
            'voc21') + VOC_ZS3
SPLITS = ('train', 'val_seen', 'val_unseen', 'val_all')
_CLASS_FILES = {d: f'{d}_classes.json' for d in DATASETS if d not in VOC_ZS3}


def _asset_text(name: str) -> str:
  return importlib.resources.files('zegformer_jax').joinpath('assets', name).read_text(
      encoding='utf-8')


@functools.lru_cache(maxsize=None)
def _load(name: str) -> dict:
  return json.loads(_asset_text(name))


def _check_dataset(dataset: str) -> None:
  if dataset not in DATASETS:
    raise ValueError(f'unknown dataset {dataset!r}; known: {list(DATASETS)}')


def dataset_meta(dataset: str) -> dict:
  """The whole asset of `dataset`: {'dataset', 'description', 'ignore_value', 'classes', ...}."""
  _check_dataset(dataset)
  if dataset in VOC_ZS3:
    return _voc_zs3_meta(int(dataset[len('voc_zs3_k'):]))
  return _load(_CLASS_FILES[dataset])


@functools.lru_cache(maxsize=None)
def _voc_zs3_meta(k: int) -> dict:
  """ZS3Net's VOC split with the first k of ZS3NET_VOC_UNSEEN unseen: background and the
  20 classes (ids 0..20 of SegmentationClassAug, trainId = id), background seen."""
  base = _load(_CLASS_FILES['voc21'])
  unseen = set(ZS3NET_VOC_UNSEEN[:k])
  classes, n_seen, n_unseen = [], 0, 0
  for c in base['classes']:
    is_seen = c['name'] not in unseen
    classes.append({'name': c['name'], 'id': c['id'], 'trainId': c['trainId'],
                    'split': 'seen' if is_seen else 'unseen',
                    'trainId_seen': n_seen if is_seen else None,
                    'trainId_unseen': None if is_seen else n_unseen})
    n_seen += is_seen
    n_unseen += not is_seen
  return {'dataset': f'voc_zs3_k{k}',
          'description': f'PASCAL VOC 2012 (SBD-augmented) with background, ZS3Net benchmark '
                         f'with {k} unseen classes: {", ".join(ZS3NET_VOC_UNSEEN[:k])}.',
          'ignore_value': base['ignore_value'], 'raw_ignore_value': base['raw_ignore_value'],
          'num_seen': n_seen, 'num_unseen': n_unseen, 'classes': classes}


def classes(dataset: str) -> list[dict]:
  """The class entries of `dataset` in the "all" order (copies; see the module docstring)."""
  return [dict(c) for c in dataset_meta(dataset)['classes']]


def ignore_value(dataset: str) -> int:
  """Ignore label of the converted splits (255, or 65535 for ADE20k-Full)."""
  return int(dataset_meta(dataset)['ignore_value'])


def dataset_splits(dataset: str) -> tuple[str, ...]:
  """The splits of `dataset`: SPLITS, or the asset's "splits" (cross-dataset sets)."""
  return tuple(dataset_meta(dataset).get('splits', SPLITS))


def split_classes(dataset: str, split: str) -> list[dict]:
  """The class entries whose label ids form `split`, in label-id order."""
  cls = dataset_meta(dataset)['classes']
  if 'splits' in dataset_meta(dataset):  # a cross-dataset set: every split has all classes
    if split not in dataset_splits(dataset):
      raise ValueError(f'unknown split {split!r} of {dataset}; known: '
                       f'{list(dataset_splits(dataset))}')
    key = 'trainId'
  elif split in ('train', 'val_seen'):
    key = 'trainId_seen'
  elif split == 'val_unseen':
    key = 'trainId_unseen'
  elif split == 'val_all':
    key = 'trainId'
  else:
    raise ValueError(f'unknown split {split!r} of {dataset}; known: {list(SPLITS)}')
  chosen = sorted((c for c in cls if c[key] is not None), key=lambda c: c[key])
  if [c[key] for c in chosen] != list(range(len(chosen))):
    raise ValueError(f'classes of {dataset}: {key} is not 0..{len(chosen) - 1}')
  return [dict(c) for c in chosen]


def split_names(dataset: str, split: str) -> tuple[list[str], np.ndarray]:
  """(class names in label-id order, seen mask bool [K]) of a converted split."""
  chosen = split_classes(dataset, split)
  return [c['name'] for c in chosen], np.asarray([c['split'] == 'seen' for c in chosen],
                                                  np.bool_)


def split_label_lut(dataset: str, split: str, size: int) -> np.ndarray:
  """int64 [size]: raw label value (class `id`) -> label id of `split`; -1 where unmapped."""
  lut = np.full(size, -1, np.int64)
  for label, c in enumerate(split_classes(dataset, split)):
    lut[int(c['id'])] = label
  return lut


def voc_image_list(which: str) -> list[str]:
  """Image names of the official VOC list `which` ('train_list' | 'test_list')."""
  if which not in ('train_list', 'test_list'):
    raise ValueError(f'unknown VOC list {which!r}; known: train_list, test_list')
  return list(_load(f'voc_{which}.json')['names'])
