"""Weight import: ResNet, official ZegFormer, ZegCLIP and OpenAI CLIP checkpoints.

  python -m zegformer_jax.weights.convert --from FORMAT --input FILE --output DIR \\
      [--config configs/x.py[:arg]] [--allow_missing PATTERN,...]
      [--tokenizer_dir HF_CLIP | --bpe_vocab bpe_simple_vocab_16e6.txt.gz]

`convert` reads the source file, maps its keys with the per-format modules (resnet,
zegformer, openai_clip), enforces the key accounting and writes DIR: a parameter store
(store.py) or a Hugging Face CLIP directory. Formats, layout and a walk-through are in
docs/weights.md.
"""
import json
import os
import shutil
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Sequence

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags
import numpy as np

from zegformer_jax.weights import accounting
from zegformer_jax.weights import openai_clip
from zegformer_jax.weights import store
from zegformer_jax.weights import zegclip
from zegformer_jax.weights import zegformer

FORMATS = ('d2-resnet', 'torchvision-resnet', 'zegformer', 'zegclip', 'openai-clip')
CLIP_DIR = 'clip'   # DIR/clip: the CLIP of an eval-config ZegFormer checkpoint


def _prepare_output(output: str, overwrite: bool) -> str:
  """A fresh temporary directory next to `output` (renamed into place at the end)."""
  output = os.path.abspath(output)
  if os.path.exists(output) and (not os.path.isdir(output) or os.listdir(output)):
    if not overwrite:
      raise FileExistsError(f'{output} exists and is not empty (pass --overwrite)')
  parent = os.path.dirname(output)
  os.makedirs(parent, exist_ok=True)
  return tempfile.mkdtemp(dir=parent, prefix='.tmp-convert-')


def _finish_output(tmp: str, output: str) -> None:
  output = os.path.abspath(output)
  os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
  if os.path.isdir(output):
    shutil.rmtree(output)
  os.replace(tmp, output)


def _skipped_summary(skipped: Mapping[str, str]) -> List[str]:
  by_reason: Dict[str, List[str]] = {}
  for key, reason in skipped.items():
    by_reason.setdefault(reason, []).append(key)
  return [f'skipped {len(keys)} ({reason}): {accounting.listing(keys, 3)}'
          for reason, keys in by_reason.items()]


def convert(source_format: str, input_path: str, output: str, *, config_spec: str = '',
            model_config=None, config_overrides: Optional[Mapping[str, Any]] = None,
            allow_missing: Sequence[str] = (), tokenizer_dir: Optional[str] = None,
            bpe_vocab: Optional[str] = None, clip_text_heads: Optional[int] = None,
            clip_vision_heads: Optional[int] = None, overwrite: bool = False) -> Dict[str, Any]:
  """Reads, converts, checks and writes DIR (the command's work). Returns the metadata.

  The model to check names and shapes against is `model_config` (the `model` sub-config)
  or else the config file `config_spec` ('configs/x.py[:arg]', read with cli.load_config);
  with neither, conversion is by name only and load_params checks shapes later.
  `config_spec` and `config_overrides` ({'model.x': value}, as --config.model.x=value) are
  recorded in the metadata ('config' and 'notes'). The CLIP tokenizer files come from the
  Hugging Face CLIP `tokenizer_dir` or are built from OpenAI's `bpe_vocab`
  (bpe_simple_vocab_16e6.txt.gz, as its SimpleTokenizer reads it).
  """
  if source_format not in FORMATS:
    raise ValueError(f'unknown format {source_format!r}; expected one of {", ".join(FORMATS)}')
  tensors, info = accounting.read_tensors(input_path)
  allow_missing = [p for p in allow_missing if p]
  notes = [f'read {len(tensors)} tensors from {info.get("container")}']
  if info.get('author'):
    notes.append(f'__author__: {info["author"]}')
  if info.get('stripped_prefix'):
    notes.append(f'stripped the {info["stripped_prefix"]!r} prefix of every key')
  if config_overrides:
    notes.append('config overrides: ' +
                 ', '.join(f'{k}={v!r}' for k, v in sorted(config_overrides.items())))

  tmp = _prepare_output(output, overwrite)
  try:
    if source_format == 'openai-clip':
      summary = openai_clip.write_hf_clip(
          tmp, tensors, tokenizer_dir=tokenizer_dir, bpe_vocab=bpe_vocab,
          text_heads=clip_text_heads,
          vision_heads=clip_vision_heads, allow_missing=allow_missing, source=input_path)
      notes += _skipped_summary(summary['skipped'])
      if not summary['tokenizer_files']:
        notes.append('no tokenizer: pass --bpe_vocab bpe_simple_vocab_16e6.txt.gz (OpenAI '
                     'CLIP\'s) or --tokenizer_dir, or copy vocab.json and merges.txt of a '
                     'Hugging Face CLIP (openai/clip-vit-base-patch16) into '
                     f'{os.path.abspath(output)}')
      meta = dict(_base_meta(source_format, input_path), clip=summary, notes=notes)
      _write_meta(tmp, meta)
      _finish_output(tmp, output)
      return meta

    shapes = None
    if model_config is None and config_spec:
      from zegformer_jax import cli  # here, not at import: it defines an absl flag
      model_config = cli.load_config(config_spec).model
    if model_config is not None:
      name = model_config.get('name', 'zegformer')
      if (source_format == 'zegclip') != (name == 'zegclip'):
        raise ValueError(f'--from {source_format} with a config of model.name {name!r}: '
                         'ZegCLIP checkpoints need a ZegCLIP config (configs/'
                         '*_zegclip_vitb16.py), the other formats a ZegFormer one')
      shapes = accounting.model_shapes(model_config)
    else:
      notes.append('no --config: converted by name only; shapes are checked by load_params')
    if source_format == 'zegclip':
      conv = zegclip.convert_zegclip(tensors, shapes)
    else:
      conv = zegformer.convert_zegformer_format(source_format, tensors, shapes)
    ignored, absent = accounting.check_conversion(conv, allow_missing, input_path)
    if not conv.variables:
      raise accounting.ConversionError(
          f'{input_path}: no tensor converted (is --from {source_format} right?)')
    logit_scale = tensors.get('sem_seg_head.predictor.logit_scale')
    if logit_scale is not None:
      scale = float(np.exp(np.asarray(logit_scale, np.float64).reshape(-1)[0]))
      notes.append(f'exp(logit_scale) = {scale:.4g} in the checkpoint (the model uses '
                   '1 / config.model.temperature)')
    store.save_params(os.path.join(tmp, store.PARAMS_DIR), conv.variables)
    clip_summary = None
    if conv.clip:
      clip_summary = openai_clip.write_hf_clip(
          os.path.join(tmp, CLIP_DIR), conv.clip, tokenizer_dir=tokenizer_dir,
          bpe_vocab=bpe_vocab, text_heads=clip_text_heads, vision_heads=clip_vision_heads,
          allow_missing=allow_missing, source=input_path, key_prefix=zegformer.CLIP_PREFIX)
      conv.skipped.update(clip_summary.pop('skipped'))
      ignored += clip_summary['ignored']
      if not clip_summary['tokenizer_files']:
        notes.append(f'{CLIP_DIR}/ has no tokenizer: copy vocab.json and merges.txt of a '
                     'Hugging Face CLIP into it (or pass --tokenizer_dir or --bpe_vocab)')
    elif source_format == 'zegformer':
      notes.append('no clip_model.* tensors (a training-config checkpoint): use a Hugging '
                   'Face CLIP ViT-B/16 directory or an --from openai-clip conversion')
    notes += _skipped_summary(conv.skipped)
    meta = dict(_base_meta(source_format, input_path), config=config_spec or None,
                covers=list(conv.covers), absent=absent, skipped=conv.skipped,
                ignored=ignored, num_variables=len(conv.variables),
                clip=CLIP_DIR if conv.clip else None, clip_summary=clip_summary, notes=notes)
    _write_meta(tmp, meta)
    _finish_output(tmp, output)
    return meta
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def _base_meta(source_format: str, input_path: str) -> Dict[str, Any]:
  return {'format': store.META_FORMAT, 'version': store.META_VERSION,
          'source_format': source_format, 'input': os.path.abspath(input_path),
          'input_sha256': accounting.sha256_file(input_path)}


def _write_meta(directory: str, meta: Mapping[str, Any]) -> None:
  with open(os.path.join(directory, store.META_NAME), 'w', encoding='utf-8') as f:
    json.dump(meta, f, indent=1)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise ValueError(f'unexpected arguments: {" ".join(argv[1:])}')
  f = flags.FLAGS
  if not f['verbosity'].present:
    # orbax logs each step of a save at INFO; the notes printed below say what was done.
    absl_logging.set_verbosity(absl_logging.WARNING)
  config = f.config
  overrides = config_flags.get_override_values(f['config']) if config is not None else {}
  meta = convert(f['from'].value, f.input, f.output,
                 config_spec=f['config'].config_filename if config is not None else '',
                 model_config=config.model if config is not None else None,
                 config_overrides=overrides, allow_missing=f.allow_missing,
                 tokenizer_dir=f.tokenizer_dir, bpe_vocab=f.bpe_vocab,
                 clip_text_heads=f.clip_text_heads, clip_vision_heads=f.clip_vision_heads, overwrite=f.overwrite)
  for note in meta['notes']:
    print(note)
  print(f'wrote {os.path.abspath(f.output)}')


def _run_program() -> None:
  """Defines the flags and runs `main`. The flags are defined here, not at import, so that
  importing this module for `convert` adds nothing to absl's global flags."""
  from zegformer_jax import cli
  flags.DEFINE_enum('from', None, FORMATS, 'Source format.')
  flags.DEFINE_string('input', None, 'Source checkpoint file.')
  flags.DEFINE_string('output', None, 'Output directory DIR.')
  cli.define_config_flag()
  flags.DEFINE_list('allow_missing', [], 'Comma-separated fnmatch patterns of source keys / '
                    'flax paths that may stay unused / missing.')
  flags.DEFINE_string('tokenizer_dir', None,
                      'Hugging Face CLIP directory whose tokenizer files are copied.')
  flags.DEFINE_string('bpe_vocab', None,
                      "OpenAI CLIP's bpe_simple_vocab_16e6.txt.gz: vocab.json and merges.txt "
                      'are built from it (instead of --tokenizer_dir).')
  flags.DEFINE_integer('clip_text_heads', None, 'CLIP text heads (default width // 64).')
  flags.DEFINE_integer('clip_vision_heads', None, 'CLIP vision heads (default width // 64).')
  flags.DEFINE_bool('overwrite', False, 'Replace a non-empty DIR.')
  flags.mark_flags_as_required(['from', 'input', 'output'])
  cli.run(main)


if __name__ == '__main__':
  _run_program()
