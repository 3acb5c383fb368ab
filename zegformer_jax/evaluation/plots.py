"""Pictures of evaluation results (matplotlib, Agg; matplotlib is imported only when drawing).

  metrics_chart(metrics, path)   per-class IoU bar chart of a metrics dict (metrics.py's
                                 compute_metrics / DIR/metrics_<variant>.json) -> PNG at path
  metrics_figure(metrics)        the same chart as a matplotlib Figure (for tests / notebooks)

The chart has one horizontal bar per class, sorted by IoU (highest at the top), seen and
unseen classes told apart by colour, vertical lines at mIoU_seen, mIoU_unseen and mIoU with
their values in the legend, and a title naming dataset, split, variant and setting. Classes
without ground truth (IoU null) are left out and counted in the caption. The figure grows
with the number of classes (ROW_INCHES per bar); beyond `max_rows` classes it shows the
`max_rows // 2` best and worst classes with a row saying how many are not shown.
"""
import os
from typing import Any, Dict

SEEN_COLOUR = '#1f77b4'     # tab:blue
UNSEEN_COLOUR = '#ff7f0e'   # tab:orange
ROW_INCHES = 0.22
MAX_ROWS = 100
WIDTH_INCHES = 8.0
DPI = 120


def _fmt(x) -> str:
  return 'n/a' if x is None else f'{x:.2f}'


def chart_rows(metrics: Dict[str, Any], max_rows: int = MAX_ROWS):
  """(rows, names_without_gt, num_hidden): rows are the per_class entries with ground truth,
  sorted by IoU descending (ties keep the class order); when there are more than max_rows,
  the max_rows // 2 first and last with None between them (the hidden ones)."""
  with_gt = [c for c in metrics.get('per_class', []) if c.get('IoU') is not None]
  missing = [c['name'] for c in metrics.get('per_class', []) if c.get('IoU') is None]
  rows = sorted(with_gt, key=lambda c: -c['IoU'])
  hidden = 0
  if len(rows) > max_rows:
    half = max(1, max_rows // 2)
    hidden = len(rows) - 2 * half
    rows = rows[:half] + [None] + rows[-half:]
  return rows, missing, hidden


def metrics_figure(metrics: Dict[str, Any], max_rows: int = MAX_ROWS):
  """The per-class IoU chart as a matplotlib Figure (Agg canvas, no pyplot state).

  Bars are in ax.containers[0], one per shown class, top to bottom (bar i at y = i, the
  hidden-classes gap row has no bar); y tick labels are the class names.
  """
  from matplotlib import patheffects
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.patches import Patch

  rows, missing, hidden = chart_rows(metrics, max_rows)
  n = max(len(rows), 1)
  fig = Figure(figsize=(WIDTH_INCHES, 2.6 + ROW_INCHES * n), dpi=DPI, layout='constrained')
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()

  ys, widths, colours, ticks, ticklabels = [], [], [], [], []
  for y, c in enumerate(rows):
    ticks.append(y)
    if c is None:
      ticklabels.append(f'... {hidden} classes not shown ...')
      continue
    ys.append(y)
    widths.append(c['IoU'])
    colours.append(SEEN_COLOUR if c['split'] == 'seen' else UNSEEN_COLOUR)
    ticklabels.append(c['name'])
  ax.barh(ys, widths, height=0.75, color=colours)
  # Values at the base of each bar (inside, white), so the mean lines never cross them;
  # bars too short to hold the text get it in black just past their end.
  for y, w in zip(ys, widths):
    inside = w >= 9
    ax.text(0.8 if inside else w + 0.8, y, f'{w:.1f}', va='center', ha='left', fontsize=8,
            color='white' if inside else 'black', fontweight='bold' if inside else 'normal',
            zorder=4)
  ax.set_yticks(ticks, ticklabels, fontsize=9)
  for label, c in zip(ax.get_yticklabels(), rows):
    if c is None:
      label.set_fontstyle('italic')
      label.set_color('0.4')
  ax.set_ylim(n - 0.5, -0.5)   # first row on top
  ax.set_xlim(0, 102)
  ax.set_xticks(range(0, 101, 10))
  ax.grid(axis='x', color='0.9', zorder=0)
  ax.set_axisbelow(True)

  handles = [Patch(color=colour, label=f'{split} class')
             for split, colour in (('seen', SEEN_COLOUR), ('unseen', UNSEEN_COLOUR))
             if any(c is not None and c['split'] == split for c in rows)]
  for key, label, colour, style in (('mIoU_seen', 'mIoU seen', SEEN_COLOUR, '--'),
                                    ('mIoU_unseen', 'mIoU unseen', UNSEEN_COLOUR, '--'),
                                    ('mIoU', 'mIoU', 'black', '-')):
    value = metrics.get(key)
    if value is not None:
      # A white casing keeps a line visible over bars of its own colour.
      handles.append(ax.axvline(value, color=colour, linestyle=style, linewidth=1.8, zorder=3,
                                label=f'{label} {value:.2f}',
                                path_effects=[patheffects.Stroke(linewidth=3.2,
                                                                 foreground='white'),
                                              patheffects.Normal()]))
  fig.legend(handles=handles, loc='outside lower center', ncols=min(len(handles), 5),
             fontsize=9, frameon=False)

  variant = metrics.get('variant', '?')
  parts = [str(metrics.get('dataset', '?')), f'split {metrics.get("split", "?")}',
           f'variant {variant}']
  if metrics.get('setting'):
    parts.append(f'setting {metrics["setting"]}')
  ax.set_title(f'Per-class IoU: {" / ".join(parts)}\n'
               f'mIoU {_fmt(metrics.get("mIoU"))}, seen {_fmt(metrics.get("mIoU_seen"))}, '
               f'unseen {_fmt(metrics.get("mIoU_unseen"))}, hIoU {_fmt(metrics.get("hIoU"))}'
               + (f', {metrics["num_images"]} images' if metrics.get('num_images') else ''),
               fontsize=10)
  notes = []
  if missing:
    notes.append(f'{len(missing)} class{"es" if len(missing) != 1 else ""} without ground '
                 'truth left out' + (f': {", ".join(missing)}' if len(missing) <= 4 else ''))
  if hidden:
    half = (len(rows) - 1) // 2
    notes.append(f'showing the {half} best and {half} worst of {len(rows) - 1 + hidden} '
                 'classes with ground truth')
  if not ys:
    notes.append('no class has ground truth')
  ax.set_xlabel('IoU (%)' + (f'\n({"; ".join(notes)})' if notes else ''), fontsize=9)
  return fig


def metrics_chart(metrics: Dict[str, Any], path: str, max_rows: int = MAX_ROWS) -> str:
  """Writes the per-class IoU chart of `metrics` as a PNG at `path`; returns path."""
  fig = metrics_figure(metrics, max_rows)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=DPI, format='png')
  return path
