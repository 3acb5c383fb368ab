"""Masked softmax attention, all heads at once against one head at a time (modeling/attention.py).

  python -m zegformer_jax.tools.bench_attention --tokens 901,1001 --calls 15

(`--config` only lends its `xla_cpu_flags`; the default is the COCO-Stuff R-50 recipe's.)

For each token count, without and with a [T, T] mask: both schedules compiled in one
process and called alternately, A B A B, so the machine's drift falls on both alike. Prints
one JSON line per case: each schedule's median and range (ms), XLA's FLOP count and
GFLOP/s, and batched / by-head per pair. The one pass's ViT-B/16 at 480 px has 1001 tokens
(900 patches, [CLS], 100 mask queries) in its masked layers and 901 before them.
"""
import statistics

from absl import flags
import numpy as np

from zegformer_jax import cli
from zegformer_jax.tools import benchmarking

FLAGS = flags.FLAGS


def define_flags():
  # Only for its xla_cpu_flags, which the CLI puts into XLA_FLAGS as for the other benchmarks.
  cli.define_config_flag(cli.bundled_config('coco_stuff_r50.py'))
  flags.DEFINE_list('tokens', ['901', '1001'], 'Token counts T (queries = keys = T).')
  flags.DEFINE_integer('heads', 12, 'Attention heads (ViT-B/16: 12).')
  flags.DEFINE_integer('head_dim', 64, 'Width of a head (ViT-B/16: 64).')
  flags.DEFINE_integer('calls', 15, 'Timed calls of each schedule, alternated.')
  flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Inputs dtype.')
  flags.DEFINE_string('output', None, 'Also append the JSON lines to this file.')


def measure(tokens: int, heads: int, head_dim: int, calls: int, masked: bool,
            dtype: str = 'float32') -> dict:
  """Both schedules of attention.softmax_attention on one [1, T, H, d] input, alternated."""
  import jax
  import jax.numpy as jnp
  from zegformer_jax.modeling import attention

  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((1, tokens, heads, head_dim)), dtype)
             for _ in range(3))
  mask = None
  if masked:   # 90 % of the pairs open, and every token sees itself
    mask = jnp.asarray((rng.random((1, tokens, tokens)) < 0.9) | np.eye(tokens, dtype=bool))
  fns, flops, outs = {}, {}, {}
  for name, by_head in (('batched', False), ('by_head', True)):
    fn = jax.jit(lambda q, k, v, m, b=by_head: attention.softmax_attention(q, k, v, m, b))
    compiled = fn.lower(q, k, v, mask).compile()
    flops[name] = benchmarking.compiled_flops(compiled)
    outs[name] = np.asarray(jax.block_until_ready(compiled(q, k, v, mask)), np.float32)
    fns[name] = lambda c=compiled: jax.block_until_ready(c(q, k, v, mask))
  times = {name: [] for name in fns}
  for i in range(calls):
    order = list(fns) if i % 2 == 0 else list(fns)[::-1]
    for name in order:
      times[name] += benchmarking.call_times(fns[name], 1)
  record = {'tokens': tokens, 'heads': heads, 'head_dim': head_dim, 'masked': masked,
            'dtype': dtype, 'max_abs_diff': float(np.abs(outs['batched'] - outs['by_head']).max())}
  for name in fns:
    record[f'{name}_flops'] = flops[name]
    record.update(benchmarking.time_stats(times[name], f'{name}_ms'))
    if flops[name]:
      record[f'{name}_gflops_per_s'] = round(flops[name] / statistics.median(times[name]) / 1e9, 1)
  ratios = [a / b for a, b in zip(times['batched'], times['by_head'])]
  record['batched_over_by_head_median'] = round(statistics.median(ratios), 3)
  return record


def main(argv) -> None:
  del argv
  import jax
  for tokens in FLAGS.tokens:
    for masked in (False, True):
      record = measure(int(tokens), FLAGS.heads, FLAGS.head_dim, FLAGS.calls, masked, FLAGS.dtype)
      benchmarking.emit(dict(tool='bench_attention', device=jax.devices()[0].device_kind,
                             **record), FLAGS.output)


if __name__ == '__main__':
  define_flags()
  cli.run(main)
