"""The training loop in one process: run folder contents, resume, Early Freeze inside the loop."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.run_records import load_checkpoint
from pipeline.train import main as train_main

TINY = ["model.shared_dims=[32]", "model.head_hidden=16", "data.image_size=32", "data.batch_size=24",
        "data.loader_workers=1", "data.steps_per_epoch=3", "optim.lr=0.001"]


def tiny_overrides(shards: dict[str, Path], runs: Path, name: str, *extra: str) -> list[str]:
    datasets = "[" + ",".join(str(p) for p in shards.values()) + "]"
    return [f"data.datasets={datasets}", f"runs_dir={runs}", f"name={name}", *TINY, *extra]


def metric_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


def test_local_run_writes_checkpoint_metrics_tensorboard_and_resumes(synthetic_shards, tmp_path: Path) -> None:
    args = tiny_overrides(synthetic_shards, tmp_path, "r", "max_epochs=2", "freeze.mode=none")
    assert train_main(["--local", *args]) == 0
    run = tmp_path / "r"
    rows = metric_rows(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    for task in ("age", "gender", "race", "smile", "young", "emotion"):
        assert all(r[f"val/{task}/count"] > 0 for r in rows)
        assert all(torch.isfinite(torch.tensor(r[f"val/{task}/loss"])) for r in rows)
    assert sum(rows[0][f"weights/{t}"] for t in ("age", "gender", "race", "smile", "young", "emotion")) == pytest.approx(1)
    assert rows[0]["train/emotion/labelled_per_batch"] == pytest.approx(8.0)  # quota 8 of 24 from the FER-like set
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").exists() and (run / "best_model.pt").exists()
    first = load_checkpoint(run / "checkpoint.pt")
    assert first["run_state"]["epoch"] == 2

    assert train_main(["--local", *args[:-2], "max_epochs=3", "freeze.mode=none"]) == 0  # same name: resume
    rows = metric_rows(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert load_checkpoint(run / "checkpoint.pt")["run_state"]["epoch"] == 3


def test_early_freeze_in_the_loop_freezes_the_trunk_then_every_head_and_ends_early(synthetic_shards, tmp_path: Path) -> None:
    # min_delta 1e9: after a task's first epoch nothing counts as an improvement. Patience 1: at epoch 1 age
    # (first in order) freezes the trunk, restoring epoch 0; emotion's watch restarts on the frozen trunk
    # (best at epoch 2), and at epoch 3 emotion freezes its head, restoring epoch 2.
    args = tiny_overrides(synthetic_shards, tmp_path, "f", "max_epochs=6", "freeze.patience=1", "freeze.min_delta=1e9",
                          "data.tasks=[age,emotion]", "data.datasets=[" + f"{synthetic_shards['utk']},{synthetic_shards['fer']}" + "]")
    assert train_main(["--local", *args]) == 0
    rows = metric_rows(tmp_path / "f")
    events = [json.loads(r["freeze/events"]) for r in rows]
    assert events[0] == [] and events[1] == ["freeze_trunk:age@1->0"]
    assert events[2] == [] and events[3] == ["freeze_head:emotion@3->2"]
    assert len(rows) == 4  # every task frozen: training ends before max_epochs
    checkpoint = load_checkpoint(tmp_path / "f" / "checkpoint.pt")
    assert checkpoint["frozen_parts"] == {"trunk": True, "heads": ["age", "emotion"]}


def test_a_bad_config_is_refused_before_training(tmp_path: Path, capsys) -> None:
    assert train_main(["--local", "optim.lr=-1", f"runs_dir={tmp_path}"]) == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err


def test_early_stop_baseline_stops_tasks_without_restoring_and_keeps_the_trunk_training(synthetic_shards, tmp_path: Path) -> None:
    args = tiny_overrides(synthetic_shards, tmp_path, "s", "max_epochs=5", "freeze.mode=early-stop", "freeze.patience=1",
                          "freeze.min_delta=1e9", "data.tasks=[age,emotion]",
                          "data.datasets=[" + f"{synthetic_shards['utk']},{synthetic_shards['fer']}" + "]")
    assert train_main(["--local", *args]) == 0
    rows = metric_rows(tmp_path / "s")
    assert json.loads(rows[1]["freeze/events"]) == ["stop:age@1->None", "stop:emotion@1->None"]
    assert len(rows) == 2
    checkpoint = load_checkpoint(tmp_path / "s" / "checkpoint.pt")
    assert checkpoint["frozen_parts"] == {"trunk": False, "heads": ["age", "emotion"]}


def test_a_missing_dataset_or_an_unlabelled_task_is_refused_before_ray_starts(synthetic_shards, tmp_path: Path, capsys) -> None:
    import ray

    missing = tmp_path / "no-such-shards"
    assert train_main([f"data.datasets=[{missing}]", f"runs_dir={tmp_path}", "name=m"]) == 2
    assert f"{missing} is not a shard folder" in capsys.readouterr().err
    fer_only = f"data.datasets=[{synthetic_shards['fer']}]"
    assert train_main([fer_only, "data.tasks=[age]", f"runs_dir={tmp_path}", "name=m"]) == 2
    assert "task 'age' has no labelled training sample in any dataset (fer)" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_task_without_validation_labels_is_refused(synthetic_shards, tmp_path: Path, capsys) -> None:
    """Its NaN validation loss would keep every epoch from being the best and confuse Early Freeze."""
    from pipeline.shard import main as shard_main

    no_val = tmp_path / "no-val"
    assert shard_main(["synthetic", "--name", "noval", "--tasks", "smile", "--num-samples", "40", "--size", "32",
                       "--val-fraction", "0", "--out", str(no_val)]) == 0
    assert train_main([f"data.datasets=[{no_val},{synthetic_shards['utk']}]", f"runs_dir={tmp_path}", "name=m"]) == 2
    assert "task 'smile' has no labelled validation sample in any dataset (noval, utk)" in capsys.readouterr().err
