#!/usr/bin/env bash
# Shard one dataset as a SLURM array: every array task encodes every K-th shard of the same plan,
# and whichever task finishes last writes manifest.parquet, rejected.parquet and the wids indices.
#
#   sbatch --array=0-7 jobs/shard.sh utkface /data/UTKFace --split-csv /data/coral --out shards/utkface
#   sbatch --array=0-3 --cpus-per-task=4 jobs/shard.sh celeba /data/celeba --out shards/celeba
#
# The arguments are those of `python -m pipeline.shard`; --task-index/--num-tasks come from
# SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT. Re-submitting the same array resumes: complete shards
# are skipped. To merge explicitly (e.g. after a failed task was re-run by hand):
#   sbatch jobs/shard.sh merge shards/utkface
#
#SBATCH --job-name=facemtl-shard
#SBATCH --output=slurm-%A_%a.out
#SBATCH --cpus-per-task=2
#SBATCH --time=02:00:00
set -euo pipefail

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
PYTHON="${FACEMTL_PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

if [ "${1:-}" = "merge" ]; then
  exec "$PYTHON" -m pipeline.shard "$@"
fi

workers="${SLURM_CPUS_PER_TASK:-1}"
# Array ids need not start at 0 (--array=1-8): the part index is the offset from the first id.
task_index=$(( ${SLURM_ARRAY_TASK_ID:-0} - ${SLURM_ARRAY_TASK_MIN:-0} ))
num_tasks="${SLURM_ARRAY_TASK_COUNT:-1}"
echo "facemtl shard: part $((task_index + 1)) of $num_tasks on $(hostname), $workers workers"
exec "$PYTHON" -m pipeline.shard "$@" --task-index "$task_index" --num-tasks "$num_tasks" --workers "$workers"
