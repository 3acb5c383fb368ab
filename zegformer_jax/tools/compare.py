r"""One table of several trained workdirs: method, variant, seen / unseen mIoU, hIoU, pAcc,
train-step time and inference time per image.

  python -m zegformer_jax.tools.compare --workdirs runs/a,runs/b,runs/c \
      [--tag single_view] [--output runs/compare]   # writes runs/compare.md and .json

Each workdir is a run of `python -m zegformer_jax.main` (or the ShapesWorld demo): its
config.json names the method (config.model.name), the dataset and the seeds, its
metrics_<variant>[_<tag>].json files hold the evaluation, metrics.jsonl the step times.
Runs that differ only in their training seed (config.seed) are grouped: the summary table
gives the mean and the range (min-max) over them, the per-run table every run.

Times: `step ms` is the median logged train-step time (the logger's mean over each
logging window, compilation excluded); `eval s/img` is the evaluation's wall time over
its number of images, for every variant evaluated in that pass together (a ZegFormer
evaluation of seg, img and full runs one forward pass and one image branch for all three).
"""
import glob
import json
import os
import re
import statistics

from absl import flags

from zegformer_jax import cli

FLAGS = flags.FLAGS

DISPLAY = {'zegformer': 'ZegFormer', 'spnet_fpn': 'SPNet-FPN', 'zs3net': 'ZS3Net',
           'zegclip': 'ZegCLIP'}
VARIANT_NAMES = {('zegformer', 'seg'): 'ZegFormer-seg', ('zegformer', 'img'): 'ZegFormer-img',
                 ('zegformer', 'full'): 'ZegFormer'}
VARIANT_ORDER = ('seg', 'img', 'full')
METHOD_ORDER = ('spnet_fpn', 'zs3net', 'zegformer', 'zegclip')
NUMBERS = ('mIoU_seen', 'mIoU_unseen', 'hIoU', 'pAcc')


def define_flags():
  flags.DEFINE_list('workdirs', None, 'Comma-separated workdirs of trained runs.')
  flags.DEFINE_string('tag', '', 'Read metrics_<variant>_<tag>.json (e.g. single_view, zs3).')
  flags.DEFINE_string('output', None,
                      'Write <output>.md and <output>.json (default: print the markdown).')
  flags.mark_flag_as_required('workdirs')


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from e


def method_label(method: str, variant: str) -> str:
  return VARIANT_NAMES.get((method, variant), DISPLAY.get(method, method))


def setting_label(config: dict) -> str:
  """What the run was trained and evaluated on: the dataset, and for a project that makes
  its data (config.project = '<package>.<project>.prepare') the project's world settings."""
  name = config.get('dataset', {}).get('name', '?')
  project = config.get('project') or ''
  world = config.get(project.split('.')[-2]) if project.count('.') >= 1 else None
  if isinstance(world, dict) and 'split' in world:
    return f'{name}/{world.get("split", "default")} (world seed {world.get("seed", 0)})'
  return name


def median_step_ms(workdir: str):
  """Median of the logged step times (ms) in metrics.jsonl; None without any."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return None
  times = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        t = json.loads(line).get('step_time')
        if t is not None:
          times.append(1e3 * float(t))
  return statistics.median(times) if times else None


def read_run(workdir: str, tag: str = '') -> list:
  """One row per variant evaluated in `workdir` (dicts; see the module docstring)."""
  config_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(config_path):
    raise FileNotFoundError(f'{config_path} does not exist: not a training workdir')
  config = _read_json(config_path)
  method = config.get('model', {}).get('name', 'zegformer')
  suffix = f'_{tag}' if tag else ''
  rows = []
  for variant in VARIANT_ORDER:
    path = os.path.join(workdir, f'metrics_{variant}{suffix}.json')
    if not os.path.exists(path):
      continue
    m = _read_json(path)
    images = m.get('num_images') or 0
    rows.append({
        'workdir': workdir, 'method': method, 'variant': variant,
        'label': method_label(method, variant), 'setting': setting_label(config),
        'seed': config.get('seed', 0), 'split': m.get('split'),
        **{k: m.get(k) for k in NUMBERS},
        'step_ms': median_step_ms(workdir),
        'eval_s_per_image': (m['eval_wall_s'] / images) if images and 'eval_wall_s' in m
                            else None,
        'eval_variants': m.get('eval_variants', [variant]),
        'test_views': len(m.get('test_views', [])) or 1,
    })
  if not rows:
    have = sorted(os.path.basename(p) for p in glob.glob(os.path.join(workdir, 'metrics_*.json')))
    raise FileNotFoundError(f'no metrics_<variant>{suffix}.json in {workdir} (has: {have}); '
                            'evaluate it first (--mode eval)')
  return rows


def _order(row):
  return (row['setting'], METHOD_ORDER.index(row['method']) if row['method'] in METHOD_ORDER
          else 99, VARIANT_ORDER.index(row['variant']), row['seed'])


def summarise(rows: list) -> list:
  """Rows grouped by (setting, method, variant): mean, min and max of each number."""
  groups = {}
  for r in sorted(rows, key=_order):
    groups.setdefault((r['setting'], r['method'], r['variant']), []).append(r)
  out = []
  for (setting, method, variant), rs in groups.items():
    entry = {'setting': setting, 'method': method, 'variant': variant,
             'label': rs[0]['label'], 'seeds': [r['seed'] for r in rs]}
    for k in NUMBERS + ('step_ms', 'eval_s_per_image'):
      values = [r[k] for r in rs if r[k] is not None]
      entry[k] = ({'mean': statistics.fmean(values), 'min': min(values), 'max': max(values)}
                  if values else None)
    out.append(entry)
  return out


def _fmt(x, digits=2):
  return '–' if x is None else f'{x:.{digits}f}'


def _spread(s, digits=2):
  if s is None:
    return '–'
  if s['min'] == s['max']:
    return _fmt(s['mean'], digits)
  return f'{s["mean"]:.{digits}f} ({s["min"]:.{digits}f}–{s["max"]:.{digits}f})'


def markdown(rows: list) -> str:
  """The summary table (mean and range over seeds), then every run."""
  lines = ['| setting | method | seeds | seen mIoU | unseen mIoU | hIoU | pAcc | step ms '
           '| eval s/img |', '|---|---|---|---|---|---|---|---|---|']
  for s in summarise(rows):
    lines.append(f'| {s["setting"]} | {s["label"]} | {",".join(map(str, s["seeds"]))} | '
                 + ' | '.join(_spread(s[k]) for k in NUMBERS)
                 + f' | {_spread(s["step_ms"], 1)} | {_spread(s["eval_s_per_image"], 3)} |')
  lines += ['', '| setting | method | seed | seen | unseen | hIoU | pAcc | step ms | '
            'eval s/img (variants together) | workdir |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in sorted(rows, key=_order):
    lines.append(f'| {r["setting"]} | {r["label"]} | {r["seed"]} | '
                 + ' | '.join(_fmt(r[k]) for k in NUMBERS)
                 + f' | {_fmt(r["step_ms"], 1)} | {_fmt(r["eval_s_per_image"], 3)} '
                 f'({"+".join(r["eval_variants"])}, {r["test_views"]} views) | {r["workdir"]} |')
  return '\n'.join(lines) + '\n'


def compare(workdirs, tag: str = '', output: str = None) -> str:
  rows = [row for w in workdirs for row in read_run(w, tag)]
  text = markdown(rows)
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + '.md', 'w') as f:
      f.write(text)
    with open(output + '.json', 'w') as f:
      json.dump({'runs': rows, 'summary': summarise(rows)}, f, indent=1)
  return text


def main(argv):
  del argv
  workdirs = [w for w in FLAGS.workdirs if w]
  if not re.fullmatch(r'[A-Za-z0-9_]*', FLAGS.tag):
    raise ValueError(f'--tag must be a metrics file tag such as single_view, got {FLAGS.tag!r}')
  text = compare(workdirs, FLAGS.tag, FLAGS.output)
  print(text if not FLAGS.output else f'wrote {FLAGS.output}.md and {FLAGS.output}.json\n{text}')


if __name__ == '__main__':
  define_flags()
  cli.run(main)
