#!/usr/bin/env bash
# The benchmark set on this machine's accelerator (or CPU): train step and inference per
# image of each method at the recipes' sizes, float32 and bfloat16, random weights.
#
#   bash launch/benchmarks.sh OUT_DIR [PEAK_TFLOPS_F32] [PEAK_TFLOPS_BF16]
#
# Writes OUT_DIR/results.jsonl (one JSON line per measurement: times, images/s, XLA's FLOP
# count, MFU for the peaks given) and OUT_DIR/table.md. Environment: STEP_ARGS (extra
# bench_step flags, e.g. "--config.input.global_batch_size=8"), INFER_ARGS, STEPS (default
# 20), IMAGES (default 5), CONFIGS (default: the COCO-Stuff configs of every method),
# ONE_PASS_CONFIG (default configs/coco_stuff_r50.py; empty: skip the one-pass row),
# DTYPES (default "float32 bfloat16"), ATTENTION_TOKENS (below).
# H100/H200 dense peaks: 67 (float32, no TF32) and 989 (bfloat16) TFLOP/s.
set -euo pipefail
out=${1:?usage: launch/benchmarks.sh OUT_DIR [PEAK_TFLOPS_F32] [PEAK_TFLOPS_BF16]}
peak_f32=${2:-0}
peak_bf16=${3:-0}
steps=${STEPS:-20}
images=${IMAGES:-5}
configs=${CONFIGS:-"configs/coco_stuff_r50.py configs/coco_stuff_spnet_r50.py configs/coco_stuff_zegclip_vitb16.py"}
py=${PYTHON:-python}
mkdir -p "$out"
results="$out/results.jsonl"
: > "$results"
for config in $configs; do
  for dtype in ${DTYPES:-float32 bfloat16}; do
    peak=$peak_f32; [ "$dtype" = bfloat16 ] && peak=$peak_bf16
    echo "== $config $dtype" >&2
    "$py" -m zegformer_jax.tools.bench_step --config "$config" --config.model.dtype=$dtype \
      --num_classes 156 --steps "$steps" --warmup 2 --peak_tflops "$peak" \
      --output "$results" ${STEP_ARGS:-} >&2
    "$py" -m zegformer_jax.tools.bench_infer --config "$config" --config.model.dtype=$dtype \
      --images "$images" --warmup 1 --peak_tflops "$peak" --output "$results" \
      ${INFER_ARGS:-} >&2
  done
done
# ZegFormer's image branch: 100 crops (the default above) against one pass.
one_pass=${ONE_PASS_CONFIG-configs/coco_stuff_r50.py}
if [ -n "$one_pass" ]; then
  "$py" -m zegformer_jax.tools.bench_infer --config "$one_pass" \
    --config.eval.image_branch=one_pass --images "$images" --warmup 1 \
    --peak_tflops "$peak_f32" --output "$results" ${INFER_ARGS:-} >&2
fi
# The one pass's attention, all heads at once against one at a time (modeling/attention.py):
# OUT_DIR/attention.jsonl. ATTENTION_TOKENS (default 901,1001; empty: skip).
attention_tokens=${ATTENTION_TOKENS-901,1001}
if [ -n "$attention_tokens" ]; then
  : > "$out/attention.jsonl"
  "$py" -m zegformer_jax.tools.bench_attention --tokens "$attention_tokens" \
    --output "$out/attention.jsonl" >&2
fi
"$py" -m zegformer_jax.tools.benchmarking "$results" > "$out/table.md"
cat "$out/table.md"
