"""jobs/experiment.sh as a real SLURM array: its tasks share one experiment and every run trains exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.test_slurm_shard import sacct_states
from tests.test_train import tiny_overrides

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def test_the_tasks_of_an_array_share_an_experiment_and_train_each_run_once(
        slurm_cluster, synthetic_shards, tmp_path: Path) -> None:
    overrides = tiny_overrides({"utk": synthetic_shards["utk"]}, tmp_path, "unused", "data.tasks=[age,gender]",
                               "max_epochs=1", "data.loader_workers=0")
    command = ["weighting", "--config", str(REPO / "configs" / "demo.yaml"), *overrides, "--weightings", "dwa",
               "--seeds", "3", "--name", "shared", "--local"]
    env = {**os.environ, "FACEMTL_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--array=0-2", "--cpus-per-task=1", f"--output={tmp_path}/slurm-%A_%a.out",
         str(REPO / "jobs" / "experiment.sh"), *command],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    logs = [path.read_text() for path in sorted(tmp_path.glob("slurm-*.out"))]
    assert result.returncode == 0, result.stderr + "\n".join(logs)
    assert sacct_states(result.stdout.strip().split(";")[0], tasks=3) == ["COMPLETED"] * 3
    assert all("facemtl experiment: array task" in log for log in logs)

    experiment = tmp_path / "shared"
    runs = [f"{arm}-seed{seed}" for arm in ("equal", "dwa") for seed in range(3)]
    for run in runs:  # trained once: one start, one epoch, and one task says it trained it
        assert len((experiment / run / "starts.jsonl").read_text().splitlines()) == 1, run
        assert len(pq.read_table(experiment / run / "metrics.parquet")) == 1, run
        assert sum(f"{run}: trained 1 epoch(s)" in log for log in logs) == 1, run
    assert sum(log.count("trained 1 epoch(s)") for log in logs) == len(runs)
    results = pq.read_table(experiment / "results.parquet").to_pylist()  # written by the task that finished last
    assert sorted((r["arm"], r["seed"]) for r in results) == sorted((a, s) for a in ("equal", "dwa") for s in range(3))
    assert "| dwa | " in (experiment / "table.md").read_text()
    assert len([json.loads(line) for line in (experiment / "invocations.jsonl").read_text().splitlines()]) == 3
