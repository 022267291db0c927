"""``python -m tune.search --cluster slurm --nodes 2`` on the local 2-node SLURM: the job starts Ray on both
nodes, trials run on both, and a job interrupted midway requeues itself and resumes the search without
training finished trials again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_slurm_shard import sacct_states
from tests.test_slurm_train import NODE_ADDRESSES, job_ended, rank_addresses, two_node_slurm, wait_for  # noqa: F401
from tests.test_train import tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def epochs_in(metrics: Path) -> int:
    try:
        return pq.read_table(metrics).num_rows
    except (OSError, ValueError):
        return 0


def test_a_two_node_search_runs_trials_on_both_nodes_and_resumes_after_a_requeue(two_node_slurm, synthetic_shards,
                                                                                  tmp_path: Path) -> None:
    # A trial is its driver (1 CPU) and one worker (1 CPU): the 2 x 2 CPUs hold two trials at a time.
    training = tiny_overrides(synthetic_shards, tmp_path, "unused", "max_epochs=3", "data.loader_workers=0")
    search = ["--num-samples", "3", "--scheduler", "fifo", "--seed", "0", "--name", "on-slurm",
              "--runs-dir", str(tmp_path), "--cluster", "slurm", "--nodes", "2", "--cpus-per-node", "2", "--time", "30"]
    submitted = subprocess.run([sys.executable, "-m", "tune.search", *training, *search], cwd=REPO, capture_output=True,
                               text=True, timeout=120, env={**os.environ, "FACEMTL_RAY_LOG_LEVEL": "INFO"})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", submitted.stdout).group(1)
    search_dir = tmp_path / "on-slurm"
    log = search_dir / "slurm" / f"{job_id}.out"
    assert f"output:      {log}" in submitted.stdout and f"tensorboard --logdir {search_dir}" in submitted.stdout

    def a_trial_done_and_another_under_way() -> bool:
        epochs = [epochs_in(path) for path in search_dir.glob("*/train/metrics.parquet")]
        return 3 in epochs and any(0 < count < 3 for count in epochs)

    wait_for(a_trial_done_and_another_under_way, 400, "no trial finished while another trained", log)
    finished = {path: path.stat().st_mtime for path in search_dir.glob("*/train/metrics.parquet")
                if epochs_in(path) == 3}
    # What SLURM sends 120 s before the time limit (#SBATCH --signal=B:USR1@120): the job requeues itself.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
    wait_for(lambda: job_ended(job_id, 1, log), 500, "the requeued job did not finish", log)

    output = log.read_text()
    assert sacct_states(job_id) == ["COMPLETED"], output[-4000:]
    assert output.count(f"Ray cluster up: 2 node(s) {NODE_ADDRESSES}") == 2 and "Ray dashboard at http://" in output
    assert "USR1: stopping; the job requeues itself" in output and "resuming search" in output
    assert all(path.stat().st_mtime == mtime for path, mtime in finished.items())  # not trained again
    rows = pq.read_table(search_dir / "trials.parquet").to_pylist()
    epochs: dict[str, list[int]] = {}
    for row in rows:
        epochs.setdefault(row["trial_id"], []).append(row["epoch"])
    assert sorted(epochs.values()) == [[0, 1, 2]] * 3
    assert (search_dir / "best_config.yaml").exists()
    # Trials on both nodes: their drivers (Tune's records) and their workers (Ray Train's, at INFO).
    drivers = {json.loads(line)["node_ip"] for path in search_dir.glob("*/result.json")
               for line in path.read_text().splitlines()}
    assert drivers | set(rank_addresses(output).values()) == set(NODE_ADDRESSES), (drivers, rank_addresses(output))
    # Ray's files went to the job's own folder: the machine's /tmp/ray does not name this job's head.
    record = Path("/tmp/ray/ray_current_cluster")
    assert Path(f"/tmp/ray-{job_id}").is_dir()
    assert not (record.exists() and record.read_text().strip().endswith(f":{20000 + int(job_id) % 20000}"))
