#!/usr/bin/env bash
# Train facemtl on a SLURM allocation: `python -m pipeline.cluster` starts a Ray head on the first node and a
# Ray worker on every other node, runs `python -m pipeline.train` against that cluster, then stops Ray.
#
#   sbatch jobs/train_mtl.sh                                        # configs/demo.yaml, 1 node, CPU
#   sbatch --nodes=2 --gpus-per-node=4 --cpus-per-task=32 --partition=gpu \
#          --export=ALL,FACEMTL_CONFIG=configs/utkface.yaml,FACEMTL_OVERRIDES="max_epochs=30" jobs/train_mtl.sh
#
# Environment (all optional):
#   FACEMTL_CONFIG          config file (default configs/demo.yaml)
#   FACEMTL_OVERRIDES       extra key=value overrides, space separated
#   FACEMTL_PYTHON          python with the project installed (default .venv/bin/python, else python3)
#   TRAIN_WORKERS_PER_NODE  Ray Train workers per node (default: GPUs per node, or 1 on CPU-only nodes)
#
# Each worker needs 1 + data.loader_workers CPUs (and a GPU with use_gpu): give --cpus-per-task enough for
# TRAIN_WORKERS_PER_NODE of them; training stops at once, with the numbers, when the allocation is too small.
# No GPU is requested here: ask with sbatch options (--gpus-per-node) so the same script runs on CPU nodes.
# A run resumes from its last checkpoint when resubmitted or requeued: 120 s before the time limit SLURM
# sends USR1 (below), on which the job stops and requeues itself.
#
#SBATCH --job-name=facemtl-train
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON="${FACEMTL_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
GPUS="${SLURM_GPUS_ON_NODE:-0}"
if [ "$GPUS" -gt 0 ]; then USE_GPU=true; else USE_GPU=false; fi
PER_NODE="${TRAIN_WORKERS_PER_NODE:-$(( GPUS > 0 ? GPUS : 1 ))}"
NUM_WORKERS=$(( PER_NODE * SLURM_JOB_NUM_NODES ))
echo "facemtl: $NUM_WORKERS Ray Train workers ($PER_NODE per node), use_gpu=$USE_GPU"

# exec: the launcher receives SLURM's signals itself.
# shellcheck disable=SC2086  # FACEMTL_OVERRIDES is a list of key=value words
exec "$PYTHON" -m pipeline.cluster -- "$PYTHON" -m pipeline.train --config "${FACEMTL_CONFIG:-configs/demo.yaml}" \
  num_workers="$NUM_WORKERS" use_gpu="$USE_GPU" ${FACEMTL_OVERRIDES:-}
