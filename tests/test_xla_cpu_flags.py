"""config.xla_cpu_flags: merged into XLA_FLAGS by the CLI before anything compiles."""
import os
import subprocess
import sys

from configs import coco_stuff_r50
from configs import shapesworld
from zegformer_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A program on the CLI stack that says whether XLA:CPU gave a 64 x 64 x 256 3x3 convolution
# to YNNPACK (what configs/common.py's xla_cpu_flags turns off).
PROGRAM = '''
import jax, jax.numpy as jnp
from zegformer_jax import cli
cli.define_config_flag()
def main(_):
  x, w = jnp.ones((1, 64, 64, 256)), jnp.ones((3, 3, 256, 256))
  conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
  print('YNN' if '__ynn_fusion' in conv.lower(x, w).compile().as_text() else 'XLA')
cli.run(main)
'''


def _kernel(*args, xla_flags=''):
  env = {k: v for k, v in os.environ.items() if not k.startswith(('XLA_FLAGS', 'JAX_'))}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, XLA_FLAGS=xla_flags)
  out = subprocess.run([sys.executable, '-c', PROGRAM, '--config', 'configs/coco_stuff_r50.py',
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return out.stdout.split()[-1]


def test_merged_xla_flags_add_only_what_the_environment_does_not_set():
  got = cli.merged_xla_flags('--a=1  --b', '--b=2 --c=3 --a=9')
  assert got == '--a=1 --b --c=3'
  assert cli.merged_xla_flags('', '--c=3') == '--c=3'
  assert cli.merged_xla_flags('--a=1', '') == '--a=1'


def test_the_recipes_set_xla_cpu_flags_and_the_demo_does_not():
  assert 'ynn_fusion_type' in coco_stuff_r50.get_config().xla_cpu_flags
  assert shapesworld.get_config().xla_cpu_flags == ''


def test_config_xla_cpu_flags_reach_the_compiler_and_the_environment_wins():
  assert _kernel() == 'XLA'                                    # the recipe's flags
  assert _kernel('--config.xla_cpu_flags=') == 'YNN'           # XLA:CPU's default
  # The user's own setting of the same flag is kept.
  assert _kernel(xla_flags='--xla_cpu_experimental_ynn_fusion_type=individual_convolution') \
      == 'YNN'
