"""sbatch jobs/train_mtl.sh on the local 2-node SLURM: one Ray node per SLURM node, each on its own address,
one DDP rank on each; a requeue resumes the run; an allocation too small for the workers stops at once."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.test_slurm_shard import sacct_states
from tests.test_train import TINY

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
NODE_ADDRESSES = ["127.0.0.2", "127.0.0.3"]  # node1, node2 of tests/slurm/up.sh with SLURM_TEST_NODES=2


@pytest.fixture(scope="session")
def two_node_slurm(slurm_cluster) -> None:
    """The test SLURM with two nodes (switching node counts cancels every job: nothing else runs now)."""
    result = subprocess.run(["bash", str(REPO / "tests" / "slurm" / "up.sh")], capture_output=True, text=True,
                            env={**os.environ, "SLURM_TEST_NODES": "2"}, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def write_config(path: Path, shards: dict[str, Path], runs: Path, name: str, *overrides: str) -> Path:
    document: dict = {"name": name, "runs_dir": str(runs), "freeze": {"mode": "none"}}
    for override in [*TINY, *overrides]:
        key, value = override.split("=", 1)
        *sections, last = key.split(".")
        node = document
        for section in sections:
            node = node.setdefault(section, {})
        node[last] = yaml.safe_load(value)
    document["data"]["datasets"] = [str(p) for p in shards.values()]
    path.write_text(yaml.safe_dump(document))
    return path


def submit(config: Path, log: Path, *sbatch_options: str) -> str:
    # INFO: Ray Train's controller then names the node of every rank.
    env = {**os.environ, "FACEMTL_CONFIG": str(config), "FACEMTL_PYTHON": sys.executable,
           "FACEMTL_RAY_LOG_LEVEL": "INFO"}
    script = str(REPO / "jobs" / "train_mtl.sh")
    result = subprocess.run(["sbatch", "--parsable", f"--output={log}", *sbatch_options, script],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def wait_for(condition, seconds: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            output = log.read_text()[-4000:] if log.exists() else "(none)"
            pytest.fail(f"{what} within {seconds} s; job output:\n{output}")
        time.sleep(0.5)


def job_ended(job_id: str, restarts: int, log: Path) -> bool:
    queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip()
    return not queued and log.exists() and f"(restart {restarts})" in log.read_text()


def rank_addresses(log_text: str) -> dict[int, str]:
    """The node address of each DDP rank, as Ray Train's controller reports the worker group it started."""
    return {int(rank): address for address, rank in re.findall(r"\(ip=([\d.]+), pid=\d+\) world_rank=(\d+)", log_text)}


def test_two_nodes_train_one_rank_each_and_a_requeued_job_resumes(two_node_slurm, synthetic_shards,
                                                                   tmp_path: Path) -> None:
    # One CPU per node and one per worker (no loader processes): each node holds exactly one rank.
    config = write_config(tmp_path / "c.yaml", synthetic_shards, tmp_path / "runs", "two-nodes", "max_epochs=4",
                          "data.steps_per_epoch=6", "data.loader_workers=0")
    log = tmp_path / "slurm.out"
    job_id = submit(config, log, "--nodes=2", "--cpus-per-task=1")
    metrics = tmp_path / "runs" / "two-nodes" / "metrics.parquet"
    wait_for(metrics.exists, 400, "no epoch was recorded", log)  # written once the epoch's checkpoint is persisted
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    wait_for(lambda: job_ended(job_id, 1, log), 600, "the requeued job did not finish", log)

    text = log.read_text()
    assert sacct_states(job_id) == ["COMPLETED"], text[-4000:]
    assert "2 Ray Train workers (1 per node)" in text
    assert text.count(f"Ray cluster up: 2 node(s) {NODE_ADDRESSES}") == 2, text[-4000:]  # each node on its own address
    ranks = rank_addresses(text)
    assert sorted(ranks) == [0, 1] and sorted(ranks.values()) == NODE_ADDRESSES, ranks
    assert re.search(r"resuming from \S+ at epoch [1-3]\b", text), text[-4000:]  # continued, not from scratch
    assert [row["epoch"] for row in pq.read_table(metrics).to_pylist()] == [0, 1, 2, 3]


def test_workers_the_allocation_cannot_hold_stop_the_job_at_once_with_the_numbers(two_node_slurm, synthetic_shards,
                                                                                  tmp_path: Path) -> None:
    """Each worker needs 1 + 2 loader CPUs and each node has 2: Ray would wait for them forever."""
    config = write_config(tmp_path / "c.yaml", synthetic_shards, tmp_path / "runs", "too-small", "max_epochs=1",
                          "data.loader_workers=2")
    log = tmp_path / "slurm.out"
    job_id = submit(config, log, "--nodes=2", "--cpus-per-task=2")
    wait_for(lambda: job_ended(job_id, 0, log), 300, "the job did not stop", log)
    text = log.read_text()
    assert sacct_states(job_id) == ["FAILED"], text[-4000:]
    assert "the Ray cluster cannot hold this run: 2 worker(s) of 3 CPU each" in text, text[-4000:]
    assert "data.loader_workers=1" in text and "--cpus-per-task=3" in text
    assert not (tmp_path / "runs" / "too-small" / "metrics.parquet").exists()
