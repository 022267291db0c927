"""``python -m tune.search --cluster slurm`` on the local SLURM: the job starts Ray, runs the search, and a
job interrupted midway requeues itself and resumes the search without training finished trials again."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import submitit

from tests.test_slurm_shard import sacct_states
from tests.test_train import tiny_overrides
from tune.slurm import head_port

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def wait_for(condition, seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {seconds} s; job output:\n{log.read_text()[-4000:] if log.exists() else '(none)'}")
        time.sleep(0.5)


def epochs_in(metrics: Path) -> int:
    try:
        return pq.read_table(metrics).num_rows
    except (OSError, ValueError):
        return 0


def test_a_slurm_search_interrupted_midway_requeues_and_resumes(slurm_cluster, synthetic_shards, tmp_path: Path) -> None:
    training = tiny_overrides(synthetic_shards, tmp_path, "unused", "max_epochs=3", "data.loader_workers=0")
    search = ["--num-samples", "3", "--scheduler", "fifo", "--max-concurrent", "1", "--seed", "0", "--name", "on-slurm",
              "--runs-dir", str(tmp_path), "--cluster", "slurm", "--cpus-per-node", "4", "--time", "30"]
    submitted = subprocess.run([sys.executable, "-m", "tune.search", *training, *search], cwd=REPO,
                               capture_output=True, text=True, timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = re.search(r"submitted SLURM job (\d+)", submitted.stdout).group(1)
    search_dir = tmp_path / "on-slurm"
    log = search_dir / "slurm" / f"{job_id}_0_log.out"
    assert f"output:      {log}" in submitted.stdout and f"tensorboard --logdir {search_dir}" in submitted.stdout

    def first_trial_done_and_second_started() -> bool:
        first = list(search_dir.glob("*_00000/train/metrics.parquet"))
        return bool(first) and epochs_in(first[0]) == 3 and bool(list(search_dir.glob("*_00001/train/checkpoint_*")))

    wait_for(first_trial_done_and_second_started, 300, "the first trial did not finish", log)
    first_metrics = next(search_dir.glob("*_00000/train/metrics.parquet"))
    finished_at = first_metrics.stat().st_mtime
    # What submitit does before a time limit: USR2, on which rank 0 requeues the job.
    submitit.SlurmJob(folder=search_dir / "slurm", job_id=job_id)._interrupt(timeout=True)

    wait_for(lambda: (search_dir / "slurm" / f"{job_id}.1.done").exists(), 400, "the requeued job did not finish", log)
    assert sacct_states(job_id) == ["COMPLETED"]
    output = log.read_text()
    assert "Ray cluster up: 1 node(s)" in output and "Ray dashboard at http://" in output
    assert "resuming search" in output  # the requeued job restored the Tuner
    assert first_metrics.stat().st_mtime == finished_at  # the finished trial was not trained again
    rows = pq.read_table(search_dir / "trials.parquet").to_pylist()
    epochs: dict[str, list[int]] = {}
    for row in rows:
        epochs.setdefault(row["trial_id"], []).append(row["epoch"])
    assert sorted(epochs.values()) == [[0, 1, 2]] * 3
    assert (search_dir / "best_config.yaml").exists()
    record = Path("/tmp/ray/ray_current_cluster")  # the stopped head forgot its address
    assert not (record.exists() and record.read_text().strip().endswith(f":{head_port(job_id)}"))


def test_a_stopped_head_forgets_only_its_own_cluster_address(tmp_path: Path) -> None:
    from tune.slurm import forget_cluster_address

    record = tmp_path / "ray_current_cluster"
    record.write_text("10.1.2.3:20054\n")
    forget_cluster_address(20099, record)
    assert record.exists()  # another cluster's address stays
    forget_cluster_address(20054, record)
    assert not record.exists()
    forget_cluster_address(20054, record)  # already gone: nothing to do
