#!/usr/bin/env bash
# One experiment shared by the tasks of a SLURM array: every task runs the same `pipeline.experiments` command,
# trains the runs no other task holds (each run is claimed while it trains) and moves on; the task that finishes
# the last run writes the table. The tasks must see the same runs folder (a shared file system with flock).
#
#   sbatch --array=0-3 --cpus-per-task=4 jobs/experiment.sh weighting --config configs/utkface.yaml --seeds 3
#   sbatch --array=0-8 --gres=gpu:1 jobs/experiment.sh freeze --config configs/celeba.yaml --seeds 3 use_gpu=true
#
# The arguments are those of `python -m pipeline.experiments`. Each task trains through a Ray of its own on its
# allocation (or in its own process with --local). More tasks than runs is harmless: a task with nothing left to
# claim ends. Submitting the array again resumes the runs a killed task left; `--status` shows who trains what.
#
#SBATCH --job-name=facemtl-experiment
#SBATCH --output=slurm-%A_%a.out
#SBATCH --cpus-per-task=4
#SBATCH --time=24:00:00
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON="${FACEMTL_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

echo "facemtl experiment: array task ${SLURM_ARRAY_TASK_ID:-0} on $(hostname)"
exec "$PYTHON" -m pipeline.experiments "$@"
