"""jobs/shard.sh as a real SLURM array on the local cluster: the parts together equal one local run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.shard_helpers import REPO, read_manifest, shard, tar_bytes

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def sacct_states(job_id: str, tasks: int = 1) -> list[str]:
    """States of the ``tasks`` array tasks of a job. Retried for up to 30 s: slurmdbd records the end of a
    job (and of each array task) a moment after it, longer on a loaded machine."""
    for _ in range(60):
        result = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", "JobID,State"],
                                capture_output=True, text=True, check=True)
        states = [line.split("|")[1] for line in result.stdout.split()]
        if len(states) >= tasks and all(s not in ("PENDING", "RUNNING") for s in states):
            return states
        time.sleep(0.5)
    return states


def test_shard_array_job_writes_the_same_shards_as_one_local_run(
        slurm_cluster, utkface_dir: Path, tmp_path: Path) -> None:
    local = tmp_path / "local"
    assert shard("utkface", utkface_dir, "--out", local, "--samples-per-shard", "4") == 0
    out = tmp_path / "array"
    env = {**os.environ, "FACEMTL_PYTHON": sys.executable}
    result = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--array=0-2", f"--output={tmp_path}/slurm-%A_%a.out",
         str(REPO / "jobs" / "shard.sh"), "utkface", str(utkface_dir), "--out", str(out), "--samples-per-shard", "4"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("slurm-*.out")))
    assert result.returncode == 0, result.stderr + logs
    job_id = result.stdout.strip().split(";")[0]
    assert sacct_states(job_id, tasks=3) == ["COMPLETED"] * 3
    assert "part 1 of 3" in logs and "part 3 of 3" in logs
    assert tar_bytes(out) == tar_bytes(local)
    assert read_manifest(out) == read_manifest(local)  # the last part to finish merged
