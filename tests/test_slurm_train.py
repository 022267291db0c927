"""sbatch jobs/train_mtl.sh on the local SLURM: a Ray cluster on the allocation trains; a requeue resumes."""

from __future__ import annotations

import json
import os
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
TASKS = ("age", "gender", "race", "smile", "young", "emotion")


def write_config(path: Path, shards: dict[str, Path], runs: Path, name: str, max_epochs: int, steps: int) -> Path:
    document: dict = {"name": name, "runs_dir": str(runs), "max_epochs": max_epochs, "freeze": {"mode": "none"}}
    for override in TINY:
        key, value = override.split("=", 1)
        node = document
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = yaml.safe_load(value)
    document["data"]["datasets"] = [str(p) for p in shards.values()]
    document["data"]["steps_per_epoch"] = steps
    path.write_text(yaml.safe_dump(document))
    return path


def submit(config: Path, log: Path, *sbatch_options: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FACEMTL_CONFIG": str(config), "FACEMTL_PYTHON": sys.executable, "TRAIN_WORKERS_PER_NODE": "2"}
    return subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=4", f"--output={log}", *sbatch_options, str(REPO / "jobs" / "train_mtl.sh")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )


def test_sbatch_train_mtl_trains_with_two_ray_workers(slurm_cluster, synthetic_shards, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", synthetic_shards, tmp_path / "runs", "slurm", max_epochs=2, steps=3)
    log = tmp_path / "slurm.out"
    result = submit(config, log, "--wait")
    assert result.returncode == 0, result.stderr + log.read_text()[-4000:]
    assert sacct_states(result.stdout.strip()) == ["COMPLETED"]
    text = log.read_text()
    assert "2 Ray Train workers" in text and "Ray cluster up: 1 node(s)" in text
    run = tmp_path / "runs" / "slurm"
    assert len(list(run.glob("checkpoint_*/checkpoint.pt"))) == 2  # one per epoch
    rows = pq.read_table(run / "metrics.parquet").to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r[f"val/{t}/count"] > 0 for r in rows for t in TASKS)


def test_a_requeued_training_job_resumes_from_its_last_checkpoint(slurm_cluster, synthetic_shards, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", synthetic_shards, tmp_path / "runs", "requeue", max_epochs=5, steps=8)
    log = tmp_path / "slurm.out"
    result = submit(config, log)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip()
    metrics = tmp_path / "runs" / "requeue" / "metrics.parquet"
    deadline = time.monotonic() + 300
    while not metrics.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metrics.exists(), log.read_text()[-4000:]  # written once the epoch's checkpoint is persisted
    epochs_before = len(pq.read_table(metrics).to_pylist())
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        states = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "State"], capture_output=True, text=True).stdout.split()
        if states and states[-1] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") and "restart 1" in log.read_text():
            break
        time.sleep(1)
    text = log.read_text()
    assert states[-1] == "COMPLETED", text[-4000:]
    assert "restart 1" in text and "resuming from" in text
    rows = pq.read_table(metrics).to_pylist()
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3, 4]
    assert epochs_before >= 1
    resumed_at = json.loads(json.dumps(text.split("resuming from")[1].split("at epoch")[1].split()[0]))
    assert int(resumed_at) >= 1  # continued, not restarted from scratch
