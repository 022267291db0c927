"""Ray Train for real: 2 DDP workers on CPU (gloo), freezing mid-DDP, resume by name, a killed worker."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import load_config_dict
from pipeline.inference import build_objective
from pipeline.loop import check_digests_agree, state_digest
from pipeline.run_records import checkpoint_folders, load_checkpoint
from pipeline.schema import get_task
from pipeline.train import main as train_main
from tests.test_train import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray]
REPO = Path(__file__).resolve().parents[1]
TASKS = ("age", "gender", "race", "smile", "young", "emotion")


def metric_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


def test_two_workers_freeze_mid_ddp_and_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(
        local_ray, synthetic_shards, tmp_path: Path) -> None:
    """Two gloo ranks: each rank's data, dropout and augmentation come from (seed, rank, epoch), and an
    all-reduce of two addends gives the same sum in either order, so no tolerance is needed."""
    def run(name: str, epochs: int) -> list[str]:
        # patience 1 + a huge min_delta: the trunk freezes at epoch 1 and DDP is rebuilt without it on both ranks
        return tiny_overrides(synthetic_shards, tmp_path, name, "num_workers=2", f"max_epochs={epochs}",
                              "freeze.patience=1", "freeze.min_delta=1e9", "model.dropout=0.3")

    assert train_main(run("straight", 3)) == 0
    straight_dir = tmp_path / "straight"
    straight = metric_rows(straight_dir)
    assert [r["epoch"] for r in straight] == [0, 1, 2]
    assert json.loads(straight[1]["freeze/events"]) == ["freeze_trunk:age@1->0"]
    for row in straight:
        for task in TASKS:
            assert row[f"val/{task}/count"] > 0 and math.isfinite(row[f"val/{task}/loss"])
    # validation counts are all-reduced: both ranks together saw the whole val split exactly once
    summaries = [json.loads((p / "summary.json").read_text()) for p in synthetic_shards.values()]
    assert straight[0]["val/emotion/count"] == sum(s["labelled_per_task"].get("emotion", {}).get("val", 0)
                                                   for s in summaries)
    assert len(list(straight_dir.glob("checkpoint_*/checkpoint.pt"))) == 2  # keep_checkpoints: the 2 newest
    # Both ranks checked each epoch that they hold one state (the run would have failed otherwise), and it
    # is the state rank 0 saved: loss-weight logits, frozen trunk and BatchNorm statistics included.
    newest = load_checkpoint(checkpoint_folders(straight_dir)[0])
    objective = build_objective(load_config_dict(newest["config"]), [get_task(t) for t in newest["tasks"]])
    objective.net.apply_frozen_parts(newest["frozen_parts"])
    objective.load_state_dict(newest["objective"])
    assert state_digest(objective) == straight[-1]["state_digest"]

    assert train_main(run("resumed", 2)) == 0
    assert train_main(run("resumed", 3)) == 0  # the same name: resumed at epoch 2, history kept
    resumed = metric_rows(tmp_path / "resumed")
    timing = ("epoch_seconds", "train/images_per_s")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in straight]
    assert resumed[-1]["state_digest"] == straight[-1]["state_digest"]


def test_ranks_with_different_states_are_an_error_naming_each_rank() -> None:
    check_digests_agree(["ab" * 32, "ab" * 32], "after epoch 3")
    with pytest.raises(RuntimeError,
                       match="ranks hold different model states after epoch 3: rank 0 abab.*, rank 1 cdcd"):
        check_digests_agree(["ab" * 32, "cd" * 32], "after epoch 3")


def _train_worker_pids(ancestor: int) -> list[int]:
    """RayTrainWorker processes started (through its local Ray) by process ``ancestor`` only."""
    parents, names = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                names[int(entry.name)] = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue

    def descends(pid: int) -> bool:
        while pid > 1:
            if pid == ancestor:
                return True
            pid = parents.get(pid, 0)
        return False

    return [pid for pid, cmdline in names.items() if b"RayTrainWorker" in cmdline and descends(pid)]


def test_a_killed_worker_is_restarted_and_training_finishes_all_epochs(synthetic_shards, tmp_path: Path) -> None:
    args = tiny_overrides(synthetic_shards, tmp_path, "kill", "num_workers=2", "max_epochs=4", "freeze.mode=none",
                          "data.steps_per_epoch=6")
    log = tmp_path / "train.log"
    with log.open("w") as handle:
        child = subprocess.Popen([sys.executable, "-m", "pipeline.train", *args], cwd=REPO, stdout=handle,
                                 stderr=subprocess.STDOUT, env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    metrics = tmp_path / "kill" / "metrics.parquet"
    deadline = time.monotonic() + 240
    while not metrics.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.5)
    assert metrics.exists(), log.read_text()[-3000:]
    victims = _train_worker_pids(child.pid)
    assert victims, "no RayTrainWorker process found"
    os.kill(victims[-1], signal.SIGKILL)
    assert child.wait(timeout=400) == 0, log.read_text()[-3000:]
    rows = metric_rows(tmp_path / "kill")
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(r["val/total_loss"]) for r in rows)
    assert "resuming from" in log.read_text()


def test_under_ray_a_diverging_run_is_one_line_and_not_retried(local_ray, synthetic_shards, tmp_path: Path,
                                                               capsys) -> None:
    args = tiny_overrides(synthetic_shards, tmp_path, "nan", "max_epochs=2", "freeze.mode=none", "optim.lr=1e12")
    assert train_main(args) == 1
    captured = capsys.readouterr()
    ours = [line for line in captured.err.strip().splitlines() if line.startswith(("error:", "training failed:"))]
    assert len(ours) == 1 and ours[0].startswith("error: training diverged at epoch 0, step "), captured.err[-2000:]
    assert captured.err.strip().splitlines()[-1] == ours[0]  # the last line, under whatever Ray logged
    assert captured.out.count("run folder:") == 1 and "resuming from" not in captured.out  # no retry
    assert not list((tmp_path / "nan").glob("checkpoint_*"))


def test_the_cause_of_a_failed_run_is_its_last_line() -> None:
    from pipeline.train import failure_line

    error = RuntimeError("Training failed due to worker errors:\n[Rank 0 Error Snippet]:\n"
                         "Traceback (most recent call last):\n"
                         "  File \"x.py\", line 1, in f\nOSError: [Errno 28] No space left on device\n")
    assert failure_line(error) == "OSError: [Errno 28] No space left on device"
    assert failure_line(RuntimeError("")) == "RuntimeError"


def test_famo_under_ddp_keeps_one_state_on_every_rank(local_ray, synthetic_shards, tmp_path: Path) -> None:
    """FAMO's logits are updated from each rank's own losses, all-reduced: the ranks' state digests agree."""
    args = tiny_overrides(synthetic_shards, tmp_path, "famo", "num_workers=2", "max_epochs=2", "freeze.mode=none",
                          "loss.weighting=famo")
    assert train_main(args) == 0
    rows = metric_rows(tmp_path / "famo")
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["weights/age"] != rows[0]["weights/age"]
