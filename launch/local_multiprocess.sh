#!/usr/bin/env bash
# N processes on this machine, each with D simulated CPU devices, talking over loopback with
# gloo collectives: the multi-host code path without a cluster (used by the tests).
#
#   launch/local_multiprocess.sh N D -- --config configs/shapesworld.py:smoke --workdir /tmp/mp
#
# Every process runs the same command; process 0 writes logs and metrics.
set -euo pipefail
N=${1:?number of processes}; D=${2:?devices per process}; shift 2
[ "${1:-}" = "--" ] && shift
PORT=${ZEGFORMER_PORT:-$((20000 + RANDOM % 20000))}
PY=${PYTHON:-python}
pids=()
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="--xla_force_host_platform_device_count=$D" \
  ZEGFORMER_COORDINATOR="127.0.0.1:$PORT" ZEGFORMER_NUM_PROCESSES=$N ZEGFORMER_PROCESS_ID=$i \
    "$PY" -m zegformer_jax.main "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
