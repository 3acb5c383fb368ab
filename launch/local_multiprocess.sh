#!/usr/bin/env bash
# N processes on this machine, each with D simulated CPU devices, talking over loopback with
# gloo collectives: the multi-host code path without a cluster (used by the tests).
#
#   launch/local_multiprocess.sh N D -- --config configs/shapesworld.py:smoke --workdir /tmp/mp
#
# Every process runs the same command; process 0 writes logs and metrics. SIGTERM/SIGINT to
# this script is forwarded to every process (a preemption: checkpoint, then exit 0). If one
# process fails, the others are killed 10 s later (they could wait forever in collectives)
# and the script exits with the first failure's status. Environment: PYTHON (default python),
# ZEGFORMER_PORT (coordinator port, default random), XLA_FLAGS (kept; the device count is
# set after it).
set -uo pipefail
N=${1:?number of processes}; D=${2:?devices per process}; shift 2
[ "${1:-}" = "--" ] && shift
PORT=${ZEGFORMER_PORT:-$((20000 + RANDOM % 20000))}
PY=${PYTHON:-python}
pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null' TERM INT
for ((i = 0; i < N; i++)); do
  JAX_PLATFORMS=cpu \
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$D" \
  ZEGFORMER_COORDINATOR="127.0.0.1:$PORT" ZEGFORMER_NUM_PROCESSES=$N ZEGFORMER_PROCESS_ID=$i \
    "$PY" -m zegformer_jax.main "$@" &
  pids+=($!)
done
status=0
while [ ${#pids[@]} -gt 0 ]; do
  finished=
  wait -n -p finished "${pids[@]}"; rc=$?
  [ -z "${finished:-}" ] && continue  # interrupted by a forwarded signal: keep waiting
  rest=()
  for pid in "${pids[@]}"; do [ "$pid" != "$finished" ] && rest+=("$pid"); done
  pids=("${rest[@]+"${rest[@]}"}")
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then
    status=$rc
    # The others usually fail the same way at once; give them a moment to say so.
    if [ ${#pids[@]} -gt 0 ]; then
      { sleep 10 && kill -KILL "${pids[@]}"; } >/dev/null 2>&1 &
      reaper=$!
    fi
  fi
done
if [ -n "${reaper:-}" ]; then pkill -P "$reaper" 2>/dev/null; kill "$reaper" 2>/dev/null; fi
exit "$status"
