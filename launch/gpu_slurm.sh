#!/usr/bin/env bash
# GPU cluster with SLURM: one process per GPU (default) or one per node.
#
#   sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh \
#       --config configs/coco_stuff_r50.py --workdir /shared/runs/coco_r50
#   PER_NODE=1 sbatch --nodes=4 --gpus-per-node=8 launch/gpu_slurm.sh ...   # one process per node
#
# jax.distributed.initialize() reads SLURM_* itself (coordinator = first node); the workdir
# must be on storage every node can reach (checkpoints are written by all processes).
# SLURM sends SIGTERM 120 s before the time limit: every process stops at the same step
# (JAX's preemption sync point), saves a checkpoint and exits 0; submitting the same command
# again resumes it (same number of processes). If one task fails, srun stops the others.
#SBATCH --job-name=zegformer
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --signal=TERM@120
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-.}"
PY=${PYTHON:-python}
if [ "${PER_NODE:-0}" = "1" ]; then
  srun --kill-on-bad-exit=1 --ntasks-per-node=1 --gpus-per-task="${SLURM_GPUS_PER_NODE:-8}" \
    "$PY" -m zegformer_jax.main "$@"
else
  srun --kill-on-bad-exit=1 "$PY" -m zegformer_jax.main "$@"
fi
