"""pipeline/cluster.py without SLURM: what a run needs against what the cluster has, and the refusal's words."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cluster import ClusterTooSmall, check_fits, main, runs_that_fit

REPO = Path(__file__).resolve().parents[1]
TWO_NODES_OF_2_CPUS = [{"CPU": 2.0, "GPU": 0.0}, {"CPU": 2.0, "GPU": 0.0}]


def test_a_worker_never_spans_nodes_so_two_half_free_nodes_do_not_hold_one() -> None:
    assert runs_that_fit(TWO_NODES_OF_2_CPUS, {"CPU": 3}, workers=1) == 0
    assert runs_that_fit(TWO_NODES_OF_2_CPUS, {"CPU": 2}, workers=2) == 1
    assert runs_that_fit(TWO_NODES_OF_2_CPUS, {"CPU": 1}, workers=2) == 2
    # A trial: its driver (1 CPU) and its workers, all placed at once.
    assert runs_that_fit(TWO_NODES_OF_2_CPUS, {"CPU": 1}, workers=1, driver={"CPU": 1}) == 2
    assert runs_that_fit(TWO_NODES_OF_2_CPUS, {"CPU": 2}, workers=2, driver={"CPU": 1}) == 0
    assert runs_that_fit([{"CPU": 8, "GPU": 0}], {"CPU": 1, "GPU": 1}, workers=1) == 0


def test_workers_that_cannot_be_placed_are_refused_with_the_numbers_and_each_fix() -> None:
    """The allocation that hung until cancelled: 2 nodes of 2 CPUs, 2 workers of 1 + 2 loader CPUs each."""
    with pytest.raises(ClusterTooSmall) as refused:
        check_fits(TWO_NODES_OF_2_CPUS, {"CPU": 3}, workers=2, loader_workers=2)
    message = str(refused.value)
    assert ("2 worker(s) of 3 CPU each; the cluster has 2 node(s): 2 CPU (holds 0 worker(s)); "
            "2 CPU (holds 0 worker(s))") in message
    assert "1 CPU for the loop + data.loader_workers=2" in message
    assert "fewer loader workers (data.loader_workers=1: a worker then needs 2 CPUs)" in message
    assert "more CPUs per node (sbatch --cpus-per-task=3 holds 1 worker(s) per node)" in message
    assert "fewer workers per node" in message
    check_fits(TWO_NODES_OF_2_CPUS, {"CPU": 2}, workers=2, loader_workers=1)  # the first fix fits


def test_gpu_workers_on_nodes_without_gpus_are_told_to_ask_for_them() -> None:
    with pytest.raises(ClusterTooSmall, match=r"GPUs on every node \(sbatch --gpus-per-node=1\), or use_gpu=false"):
        check_fits(TWO_NODES_OF_2_CPUS, {"CPU": 1, "GPU": 1}, workers=2, loader_workers=0)


def test_the_launcher_outside_a_slurm_job_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    before = dict(os.environ)
    with pytest.raises(SystemExit, match="runs inside a SLURM job"):
        main(["--", "true"])
    assert dict(os.environ) == before  # no Ray token left behind for what runs next in this process


def test_the_launcher_needs_a_command() -> None:
    result = subprocess.run([sys.executable, "-m", "pipeline.cluster"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2 and "give the command to run after --" in result.stderr
