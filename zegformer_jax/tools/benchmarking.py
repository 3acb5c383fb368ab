"""What the benchmark tools share: compiled FLOPs, timing statistics, MFU, a markdown table.

  python -m zegformer_jax.tools.benchmarking results.jsonl [more.jsonl ...] > table.md

turns the JSON lines that `bench_step` and `bench_infer` print into one markdown table
(launch/benchmarks.sh runs the set on a machine and writes it).

FLOPs are XLA's own count for the compiled program (`Compiled.cost_analysis()['flops']`:
multiply-adds count two); a host callback inside it (the Hungarian matching on the host) is
not counted. MFU = FLOPs / time / peak, for the peak the user gives (the device's dense
float32 or bfloat16 figure).
"""
import json
import statistics
import sys
import time
from typing import Optional, Sequence


def compiled_flops(compiled) -> Optional[float]:
  """XLA's FLOP count of a compiled program (jax.stages.Compiled); None if not reported."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without cost analysis)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = (cost or {}).get('flops')
  return float(flops) if flops is not None and flops >= 0 else None


def call_times(fn, n: int) -> list:
  """Seconds of each of n calls of fn() (fn blocks until its result is ready)."""
  times = []
  for _ in range(n):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def time_stats(seconds: Sequence[float], prefix: str) -> dict:
  """{prefix_median, prefix_min, prefix_max} in milliseconds."""
  ms = [1e3 * s for s in seconds]
  return {f'{prefix}_median': round(statistics.median(ms), 2),
          f'{prefix}_min': round(min(ms), 2), f'{prefix}_max': round(max(ms), 2)}


def throughput(flops: Optional[float], seconds: float, peak_tflops: float = 0.0) -> dict:
  """{'tflops_per_s', 'mfu'} of `flops` done in `seconds` (mfu only with a peak)."""
  if not flops or seconds <= 0:
    return {}
  # Four significant figures, not four decimals: a CPU's MFU is ~1e-3.
  out = {'tflops_per_s': _significant(flops / seconds / 1e12)}
  if peak_tflops > 0:
    out['mfu'] = _significant(flops / seconds / (peak_tflops * 1e12))
  return out


def _significant(x: float, digits: int = 4) -> float:
  return float(f'{x:.{digits}g}')


def emit(record: dict, output: Optional[str] = None) -> None:
  """Prints `record` as one JSON line, and appends it to `output` when given."""
  line = json.dumps(record)
  print(line)
  if output:
    with open(output, 'a') as f:
      f.write(line + '\n')


COLUMNS = (('tool', 'tool'), ('config', 'config'), ('dtype', 'dtype'), ('batch', 'batch'),
           ('size', 'size'), ('step / image ms', 'ms'), ('images/s', 'images_per_s'),
           ('GFLOP', 'gflop'), ('TFLOP/s', 'tflops_per_s'), ('MFU', 'mfu'))


def table(rows: Sequence[dict]) -> str:
  """A markdown table of bench_step / bench_infer results."""
  lines = ['| ' + ' | '.join(c for c, _ in COLUMNS) + ' |',
           '|' + '---|' * len(COLUMNS)]
  for r in rows:
    r = dict(r)
    r['ms'] = r.get('step_ms_median', r.get('per_image_ms_median'))
    r['size'] = r.get('crop', r.get('size'))
    r['batch'] = r.get('batch', 1)
    flops = r.get('flops_per_step', r.get('flops_per_image'))
    r['gflop'] = round(flops / 1e9, 1) if flops else None
    lines.append('| ' + ' | '.join('' if r.get(k) is None else str(r[k]) for _, k in COLUMNS)
                 + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
  rows = []
  for path in argv[1:]:
    with open(path) as f:
      rows += [json.loads(line) for line in f if line.strip().startswith('{')]
  print(table(rows))


if __name__ == '__main__':
  main(sys.argv)
