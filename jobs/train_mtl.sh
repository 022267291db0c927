#!/usr/bin/env bash
# Train facemtl on a SLURM allocation: a Ray head on the first node, a Ray worker on every other node,
# then `python -m pipeline.train` against that cluster, then Ray is stopped.
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
#   RAY_PORT                head port (default derived from the job id, so jobs sharing a node do not clash)
#
# No GPU is requested here: ask with sbatch options (--gpus-per-node) so the same script runs on CPU nodes.
# Preemption: SIGTERM (scancel, preemption) stops Ray and training cleanly; resubmitting, or the requeue
# SLURM does for a --requeue job, resumes from the last checkpoint because the run keeps its name.
# 120 s before the time limit SLURM sends USR1 (below): the job requeues itself and stops the same way.
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
RAY="$(dirname "$PYTHON")/ray"
[ -x "$RAY" ] || RAY=ray
CONFIG="${FACEMTL_CONFIG:-configs/demo.yaml}"
JOB_ID="${SLURM_JOB_ID:?run this with sbatch}"
PORT="${RAY_PORT:-$((20000 + JOB_ID % 20000))}"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD="${NODES[0]}"
HEAD_IP="$(getent hosts "$HEAD" | awk '{print $1; exit}')"
HEAD_IP="${HEAD_IP:-127.0.0.1}"
CPUS="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}"   # nproc sees the whole machine, not the allocation
GPUS="${SLURM_GPUS_ON_NODE:-0}"
if [ "$GPUS" = 0 ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  GPUS=$(awk -F, '{print NF}' <<<"$CUDA_VISIBLE_DEVICES")
fi
if [ "$GPUS" -gt 0 ]; then USE_GPU=true; PER_NODE="${TRAIN_WORKERS_PER_NODE:-$GPUS}"; else USE_GPU=false; PER_NODE="${TRAIN_WORKERS_PER_NODE:-1}"; fi
NUM_WORKERS=$(( PER_NODE * ${#NODES[@]} ))
echo "facemtl: job $JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${#NODES[*]} node(s) [${NODES[*]}], head $HEAD_IP:$PORT," \
     "$CPUS CPUs and $GPUS GPUs per node, $NUM_WORKERS Ray Train workers"

# Ray >= 2.59 authenticates cluster traffic with a token: one random token per job, passed to every
# `ray start` (srun inherits the environment) and to the driver, never written to disk.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN="$("$PYTHON" -c 'import secrets; print(secrets.token_hex(32))')"
export RAY_AUTH_TOKEN

# Nothing here serves traffic: a stopped Ray node need not drain first (Ray waits 30 s for that by default).
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0

RAY_STEPS=()
TRAIN_PID=""
stop_all() {
  if [ -n "$TRAIN_PID" ]; then
    kill -TERM "$TRAIN_PID" 2>/dev/null || true
    wait "$TRAIN_PID" 2>/dev/null || true
  fi
  # Stop this job's Ray nodes by ending their job steps; never `ray stop`, which would also stop the Ray
  # nodes of other jobs sharing the machine.
  for pid in "${RAY_STEPS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # `ray start --head` records its address for `address="auto"` look-ups; a head stopped by a signal leaves
  # the record behind, and later local Ray runs on the node would wait on this dead head.
  # Ray records the address it detected, which may differ from HEAD_IP; the port says whether it is ours.
  if [ "$(cat /tmp/ray/ray_current_cluster 2>/dev/null | sed 's/.*://')" = "$PORT" ]; then
    rm -f /tmp/ray/ray_current_cluster
  fi
}
# shellcheck disable=SC2317  # called through trap
on_term() { echo "facemtl: SIGTERM: stopping; the run resumes from its last checkpoint when resubmitted"; stop_all; exit 143; }
# shellcheck disable=SC2317
on_timelimit() { echo "facemtl: time limit near: requeueing job $JOB_ID"; stop_all; scontrol requeue "$JOB_ID"; exit 0; }
trap on_term TERM
trap on_timelimit USR1

ray_node() {  # ray_node NODE ARGS...: a blocking `ray start` as its own job step on NODE
  local node=$1; shift
  srun --nodes=1 --ntasks=1 --overlap -w "$node" \
    "$RAY" start --block --num-cpus="$CPUS" --num-gpus="$GPUS" --disable-usage-stats "$@" &
  RAY_STEPS+=("$!")
}
ray_node "$HEAD" --head --node-ip-address="$HEAD_IP" --port="$PORT" \
  --dashboard-host=0.0.0.0 --dashboard-port=$((PORT + 1)) --ray-client-server-port=$((PORT + 2)) \
  --include-dashboard="${FACEMTL_DASHBOARD:-false}"
export RAY_ADDRESS="$HEAD_IP:$PORT"
wait_for_nodes() {  # wait_for_nodes N: until N Ray nodes are alive (180 s at most)
  "$PYTHON" - "$1" <<'EOF'
import sys, time, ray
want, deadline = int(sys.argv[1]), time.time() + 180
while True:
    try:
        ray.init(address="auto", logging_level="ERROR")
        break
    except Exception:
        if time.time() > deadline:
            sys.exit("facemtl: the Ray head did not come up in 180 s")
        time.sleep(1)
while (alive := sum(node["Alive"] for node in ray.nodes())) < want:
    if time.time() > deadline:
        sys.exit(f"facemtl: only {alive} of {want} Ray nodes joined in 180 s")
    time.sleep(1)
print(f"facemtl: Ray cluster up: {alive} node(s), {ray.cluster_resources()}", flush=True)
EOF
}
wait_for_nodes 1
for node in "${NODES[@]:1}"; do
  ray_node "$node" --address="$HEAD_IP:$PORT"
done
wait_for_nodes "${#NODES[@]}"

# shellcheck disable=SC2086  # FACEMTL_OVERRIDES is a list of key=value words
"$PYTHON" -m pipeline.train --config "$CONFIG" num_workers="$NUM_WORKERS" use_gpu="$USE_GPU" ${FACEMTL_OVERRIDES:-} &
TRAIN_PID=$!
set +e
wait "$TRAIN_PID"
STATUS=$?
set -e
TRAIN_PID=""
stop_all
echo "facemtl: training exited with status $STATUS"
exit "$STATUS"
