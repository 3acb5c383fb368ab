#!/usr/bin/env bash
# TPU pod slice: the same command on every worker of a TPU VM.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b launch/tpu_pod.sh \
#       --config configs/coco_stuff_r50.py --workdir /mnt/shared/runs/coco_r50
#
# Each worker needs this repository at the same path ($REPO, default ~/zegformer_jax) and
# `make install` run once (e.g. with --command "cd ~/zegformer_jax && make install").
# The workdir must be a file system path that every worker sees (a gcsfuse mount of a
# bucket, or Filestore/NFS): every process writes its checkpoint shards there, and logs and
# metrics are written with ordinary file I/O by process 0.
# jax.distributed.initialize() discovers the slice from the TPU metadata; the JAX
# preemption sync point turns a maintenance event into a checkpoint and a clean exit, and
# running the same command again resumes.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO=${REPO:-~/zegformer_jax}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO && TF_CPP_MIN_LOG_LEVEL=3 .venv/bin/python -m zegformer_jax.main $ARGS"
