"""The training loop in one process: run folder contents, resume, Early Freeze inside the loop."""

from __future__ import annotations

import json
import math
import os
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.run_records import checkpoint_folders, load_checkpoint
from pipeline.train import main as train_main

# A small backbone: these runs test the machinery; learning is tested with the demo config (resnet18).
TINY = ["model.backbone=shufflenet_v2_x0_5", "model.shared_dims=[32]", "model.head_hidden=16", "data.image_size=32",
        "data.batch_size=24", "data.loader_workers=1", "data.steps_per_epoch=3", "optim.lr=0.001"]


def tiny_overrides(shards: dict[str, Path], runs: Path, name: str, *extra: str) -> list[str]:
    datasets = "[" + ",".join(str(p) for p in shards.values()) + "]"
    return [f"data.datasets={datasets}", f"runs_dir={runs}", f"name={name}", *TINY, *extra]


def metric_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


def newest_checkpoint(run_dir: Path) -> dict:
    return load_checkpoint(checkpoint_folders(run_dir)[0])


TIMING_KEYS = ("epoch_seconds", "train/images_per_s")


def without_timings(rows: list[dict]) -> list[dict]:
    return [{key: value for key, value in row.items() if key not in TIMING_KEYS} for row in rows]


def test_openmp_threads_wait_passively_unless_the_user_chose_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    from pipeline.train import thread_environment

    probe = [sys.executable, "-c", "import os, pipeline; print(os.environ['OMP_WAIT_POLICY'])"]
    unset = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    assert subprocess.run(probe, env=unset, capture_output=True, text=True, check=True).stdout.strip() == "PASSIVE"
    chosen = {**unset, "OMP_WAIT_POLICY": "ACTIVE"}
    assert subprocess.run(probe, env=chosen, capture_output=True, text=True, check=True).stdout.strip() == "ACTIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert thread_environment() == {"OMP_WAIT_POLICY": "ACTIVE"}  # what Ray's workers get
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert thread_environment() == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_local_run_writes_checkpoint_metrics_tensorboard_and_resumes(synthetic_shards, tmp_path: Path) -> None:
    args = tiny_overrides(synthetic_shards, tmp_path, "r", "max_epochs=2", "freeze.mode=none")
    assert train_main(["--local", *args]) == 0
    run = tmp_path / "r"
    rows = metric_rows(run)
    assert [r["epoch"] for r in rows] == [0, 1]
    for task in ("age", "gender", "race", "smile", "young", "emotion"):
        assert all(r[f"val/{task}/count"] > 0 for r in rows)
        assert all(torch.isfinite(torch.tensor(r[f"val/{task}/loss"])) for r in rows)
    assert sum(rows[0][f"weights/{t}"] for t in ("age", "gender", "race", "smile", "young", "emotion")) == \
        pytest.approx(1)
    assert rows[0]["train/emotion/labelled_per_batch"] == pytest.approx(8.0)  # quota 8 of 24 from the FER-like set
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "config.yaml").exists() and (run / "best_model.pt").exists()
    first = newest_checkpoint(run)
    assert first["run_state"]["epoch"] == 2 and first["run_state"]["step"] == 6

    assert train_main(["--local", *args[:-2], "max_epochs=3", "freeze.mode=none"]) == 0  # same name: resume
    rows = metric_rows(run)
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert newest_checkpoint(run)["run_state"]["epoch"] == 3
    assert [folder.name for folder in checkpoint_folders(run)] == ["checkpoint_000003", "checkpoint_000002"]  # keep 2
    starts = [json.loads(line) for line in (run / "starts.jsonl").read_text().splitlines()]  # one line per start
    assert [start["command"].endswith("max_epochs=2 freeze.mode=none") for start in starts] == [True, False]
    assert "max_epochs=3" in starts[1]["command"]
    assert starts[1]["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert starts[1]["cpu"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert starts[1]["cpu"]["model"] not in ("", "unknown") and starts[1]["cpu"]["torch_threads"] >= 1
    assert all(len(start["commit"].removesuffix("+changes")) == 40 or start["commit"] == "unknown" for start in starts)


def test_early_freeze_in_the_loop_freezes_the_trunk_then_every_head_and_ends_early(
        synthetic_shards, tmp_path: Path) -> None:
    # min_delta 1e9: after a task's first epoch nothing counts as an improvement. Patience 1: at epoch 1 age
    # (first in order) freezes the trunk, restoring epoch 0; emotion's watch restarts on the frozen trunk
    # (best at epoch 2), and at epoch 3 emotion freezes its head, restoring epoch 2.
    args = tiny_overrides(synthetic_shards, tmp_path, "f", "max_epochs=6", "freeze.patience=1", "freeze.min_delta=1e9",
                          "data.tasks=[age,emotion]",
                          "data.datasets=[" + f"{synthetic_shards['utk']},{synthetic_shards['fer']}" + "]")
    assert train_main(["--local", *args]) == 0
    rows = metric_rows(tmp_path / "f")
    events = [json.loads(r["freeze/events"]) for r in rows]
    assert events[0] == [] and events[1] == ["freeze_trunk:age@1->0"]
    assert events[2] == [] and events[3] == ["freeze_head:emotion@3->2"]
    assert len(rows) == 4  # every task frozen: training ends before max_epochs
    checkpoint = newest_checkpoint(tmp_path / "f")
    assert checkpoint["frozen_parts"] == {"trunk": True, "heads": ["age", "emotion"]}


def test_a_bad_config_is_refused_before_training(tmp_path: Path, capsys) -> None:
    assert train_main(["--local", "optim.lr=-1", f"runs_dir={tmp_path}"]) == 2
    assert "optim.lr must be > 0" in capsys.readouterr().err


def test_early_stop_baseline_stops_tasks_without_restoring_and_keeps_the_trunk_training(
        synthetic_shards, tmp_path: Path) -> None:
    args = tiny_overrides(synthetic_shards, tmp_path, "s", "max_epochs=5", "freeze.mode=early-stop",
                          "freeze.patience=1", "freeze.min_delta=1e9", "data.tasks=[age,emotion]",
                          "data.datasets=[" + f"{synthetic_shards['utk']},{synthetic_shards['fer']}" + "]")
    assert train_main(["--local", *args]) == 0
    rows = metric_rows(tmp_path / "s")
    assert json.loads(rows[1]["freeze/events"]) == ["stop:age@1->None", "stop:emotion@1->None"]
    assert len(rows) == 2
    checkpoint = newest_checkpoint(tmp_path / "s")
    assert checkpoint["frozen_parts"] == {"trunk": False, "heads": ["age", "emotion"]}


def test_a_missing_dataset_or_an_unlabelled_task_is_refused_before_ray_starts(
        synthetic_shards, tmp_path: Path, capsys) -> None:
    import ray

    missing = tmp_path / "no-such-shards"
    assert train_main([f"data.datasets=[{missing}]", f"runs_dir={tmp_path}", "name=m"]) == 2
    assert f"{missing} is not a shard folder" in capsys.readouterr().err
    fer_only = f"data.datasets=[{synthetic_shards['fer']}]"
    assert train_main([fer_only, "data.tasks=[age]", f"runs_dir={tmp_path}", "name=m"]) == 2
    assert "task 'age' has no labelled training sample in any dataset (fer)" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_trunk_quorum_above_the_tasks_the_datasets_label_is_refused_before_ray_starts(
        synthetic_shards, tmp_path: Path, capsys) -> None:
    """With data.tasks empty the tasks come from the shards: only the driver can count them before workers start."""
    import ray

    fer_only = f"data.datasets=[{synthetic_shards['fer']}]"
    assert train_main([fer_only, "freeze.trunk_quorum=2", f"runs_dir={tmp_path}", "name=m"]) == 2
    assert "freeze.trunk_quorum 2 is more than the 1 task these datasets label (emotion)" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_a_task_without_validation_labels_is_refused(synthetic_shards, tmp_path: Path, capsys) -> None:
    """Its NaN validation loss would keep every epoch from being the best and confuse Early Freeze."""
    from pipeline.shard import main as shard_main

    no_val = tmp_path / "no-val"
    assert shard_main(["synthetic", "--name", "noval", "--tasks", "smile", "--num-samples", "40", "--size", "32",
                       "--val-fraction", "0", "--out", str(no_val)]) == 0
    assert train_main([f"data.datasets=[{no_val},{synthetic_shards['utk']}]", f"runs_dir={tmp_path}", "name=m"]) == 2
    assert "task 'smile' has no labelled validation sample in any dataset (noval, utk)" in capsys.readouterr().err


def freezing_run(shards: dict[str, Path], runs: Path, name: str, epochs: int) -> list[str]:
    """Dropout, augmentation, learned weights and a trunk freeze at epoch 1 (patience 1, nothing improves)."""
    datasets = f"data.datasets=[{shards['utk']},{shards['fer']}]"
    return tiny_overrides(shards, runs, name, datasets, "data.tasks=[age,gender,emotion]", f"max_epochs={epochs}",
                          "freeze.patience=1", "freeze.min_delta=1e9", "model.dropout=0.3")


def test_a_resumed_local_run_is_bit_identical_to_an_uninterrupted_one(synthetic_shards, tmp_path: Path) -> None:
    assert train_main(["--local", *freezing_run(synthetic_shards, tmp_path, "straight", 4)]) == 0
    assert train_main(["--local", *freezing_run(synthetic_shards, tmp_path, "resumed", 3)]) == 0
    assert train_main(["--local", *freezing_run(synthetic_shards, tmp_path, "resumed", 4)]) == 0
    straight, resumed = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "resumed")
    assert json.loads(straight[1]["freeze/events"]) == ["freeze_trunk:age@1->0"]
    assert without_timings(resumed) == without_timings(straight)
    final = [newest_checkpoint(tmp_path / name) for name in ("straight", "resumed")]
    assert final[0]["objective"].keys() == final[1]["objective"].keys()
    for key, tensor in final[0]["objective"].items():
        assert torch.equal(tensor, final[1]["objective"][key]), key
    assert final[0]["optimizer"]["state"].keys() == final[1]["optimizer"]["state"].keys()
    assert final[0]["run_state"]["step"] == final[1]["run_state"]["step"] == 4 * 3


def test_resuming_under_a_config_that_changes_the_maths_is_refused_and_overwrites_nothing(
        synthetic_shards, tmp_path: Path, capsys) -> None:
    args = tiny_overrides(synthetic_shards, tmp_path, "c", "max_epochs=1", "freeze.mode=none")
    assert train_main(["--local", *args]) == 0
    before = {path: path.stat().st_mtime_ns for path in (tmp_path / "c").rglob("*") if path.is_file()}
    assert train_main(["--local", *args, "optim.lr=0.01", "loss.lam=0.5", "max_epochs=2"]) == 2
    error = capsys.readouterr().err
    differences = error.split("another config (")[1].split("); ")[0]
    assert differences == "loss.lam 0.1 -> 0.5, optim.lr 0.001 -> 0.01"  # max_epochs may change
    assert "--restart" in error
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "c").rglob("*") if path.is_file()} == before


def test_unreadable_checkpoints_are_skipped_with_a_warning_or_refused_when_none_is_left(
        synthetic_shards, tmp_path: Path, capsys) -> None:
    args = tiny_overrides(synthetic_shards, tmp_path, "t", "max_epochs=2", "freeze.mode=none")
    assert train_main(["--local", *args]) == 0
    run = tmp_path / "t"
    newest, older = (folder / "checkpoint.pt" for folder in checkpoint_folders(run))
    newest.write_bytes(newest.read_bytes()[:1000])
    capsys.readouterr()
    assert train_main(["--local", *args[:-2], "max_epochs=3", "freeze.mode=none"]) == 0
    out = capsys.readouterr().out
    assert f"warning: skipped unreadable checkpoint(s) {newest}" in out and f"resuming from {older.parent}" in out
    assert [r["epoch"] for r in metric_rows(run)] == [0, 1, 2]  # epoch 1 again, from epoch 0's checkpoint

    for folder in checkpoint_folders(run):
        path = folder / "checkpoint.pt"
        path.write_bytes(path.read_bytes()[:1000])
    metrics_before = (run / "metrics.parquet").read_bytes()
    assert train_main(["--local", *args[:-2], "max_epochs=4", "freeze.mode=none"]) == 2
    error = capsys.readouterr().err
    assert f"every checkpoint of {run} is unreadable" in error and "--restart" in error
    assert (run / "metrics.parquet").read_bytes() == metrics_before
    assert train_main(["--local", *args[:-2], "max_epochs=1", "freeze.mode=none", "--restart"]) == 0
    assert [r["epoch"] for r in metric_rows(run)] == [0]


def test_a_checkpoint_stores_the_snapshot_of_its_own_epoch_once(synthetic_shards, tmp_path: Path) -> None:
    """Weights + Adam's two moments + a little: the Early-Freeze snapshot of the epoch just validated shares
    the weights' bytes instead of adding a fourth copy."""
    args = tiny_overrides(synthetic_shards, tmp_path, "z", "max_epochs=1", "model.backbone=resnet18")
    assert train_main(["--local", *args]) == 0
    folder = checkpoint_folders(tmp_path / "z")[0]
    payload = load_checkpoint(folder)
    assert list(payload["snapshots"]["snapshots"]) == [0]  # epoch 0 is every task's best so far
    parameter_bytes = sum(t.numel() * t.element_size() for t in payload["objective"].values())
    ratio = (folder / "checkpoint.pt").stat().st_size / parameter_bytes
    assert 2.9 < ratio < 3.2, ratio


@pytest.mark.parametrize(("config_text", "overrides", "line"), [
    ("data:\n  batch_size: [64\n", [],
     "is not valid YAML: expected ',' or ']', but got '<stream end>' at line 3, column 1"),
    (None, ["data.tasks=[foo]"], "data.tasks names unknown task(s) 'foo'; known: age, gender"),
    (None, ["keep_checkpoints=-1"], "keep_checkpoints must be >= 0 (0 keeps all), got -1"),
    (None, ["data.datasets=[]"], "data.datasets is empty: name at least one shard folder"),
    (None, ["optim.lr=[1"], "override 'optim.lr=[1': the value is not valid YAML"),
])
def test_a_bad_config_is_one_error_line_and_exit_2_before_ray_starts(
        tmp_path: Path, capsys, config_text, overrides, line) -> None:
    import ray

    argv = ["--local", f"runs_dir={tmp_path}", *overrides]
    if config_text is not None:
        (tmp_path / "bad.yaml").write_text(config_text)
        argv = ["--config", str(tmp_path / "bad.yaml"), *argv]
    assert train_main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and line in error[0]
    assert not ray.is_initialized() and not (tmp_path / "run").exists()


def test_a_diverging_run_stops_at_once_naming_epoch_step_and_task_and_saves_nothing_of_it(
        synthetic_shards, tmp_path: Path, capsys) -> None:
    args = tiny_overrides(synthetic_shards, tmp_path, "d", "max_epochs=3", "freeze.mode=none", "optim.lr=1e12")
    assert train_main(["--local", *args]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: training diverged at epoch 0, step "), error
    assert "the loss of task" in error[0] and "nothing of this epoch was saved" in error[0]
    assert checkpoint_folders(tmp_path / "d") == [] and not (tmp_path / "d" / "best_model.pt").exists()
    assert train_main(["--local", *args]) == 1  # deterministic: the same line again, not a retry loop
    assert capsys.readouterr().err.strip().splitlines() == error


def test_a_finite_but_useless_run_is_reported_loudly_by_train_evaluate_and_predict(
        synthetic_shards, tmp_path: Path, capsys) -> None:
    from pipeline.evaluate import main as evaluate_main
    from pipeline.predict import main as predict_main

    # resnet18 stays finite at this rate (the small backbone of TINY diverges): useless, not broken
    args = tiny_overrides(synthetic_shards, tmp_path, "useless", "max_epochs=1", "optim.lr=10", "freeze.mode=none",
                          "model.backbone=resnet18",
                          f"data.datasets=[{synthetic_shards['utk']}]")
    assert train_main(["--local", *args]) == 0  # finite all along: it trains, and says what it is worth
    summary = json.loads((tmp_path / "useless" / "run_summary.json").read_text())
    assert "age" in summary["at_chance"] and summary["tasks"]["age"]["value"] > summary["tasks"]["age"]["chance"]
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1 and "these tasks are no better than chance: age (mae" in warning[0]

    out = tmp_path / "evaluation"
    assert evaluate_main([str(tmp_path / "useless"), "--split", "val", "--out", str(out), "--loader-workers", "0"]) == 0
    assert "WARNING: on val, no better than chance: age (mae" in capsys.readouterr().out
    assert "age" in json.loads((out / "metrics.json").read_text())["at_chance"]

    crop = next((synthetic_shards["utk"]).glob("*.tar"))
    image = tmp_path / "face.png"
    with tarfile.open(crop) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
        image.write_bytes(tar.extractfile(member).read())
    assert predict_main([str(tmp_path / "useless"), str(image), "--out", str(tmp_path / "p.jsonl"),
                         "--device", "cpu"]) == 0
    assert "these tasks are no better than chance: age" in capsys.readouterr().err


def test_init_from_a_run_loads_trunk_and_matching_heads_and_starts_new_tasks_fresh(synthetic_shards, tmp_path: Path,
                                                                                    capsys) -> None:
    utk, fer = synthetic_shards["utk"], synthetic_shards["fer"]
    pretrain = tiny_overrides(synthetic_shards, tmp_path, "pre", "max_epochs=1", "freeze.mode=none",
                              f"data.datasets=[{utk}]", "data.tasks=[age,gender,race]")
    assert train_main(["--local", *pretrain]) == 0
    # lr ~0: the fine-tuned run's weights stay where init_from put them, so they can be compared.
    finetune = tiny_overrides(synthetic_shards, tmp_path, "fine", "max_epochs=1", "freeze.mode=none", "optim.lr=1e-30",
                              "optim.weighting_lr=1e-30", f"data.datasets=[{utk},{fer}]", "data.tasks=[age,emotion]",
                              f"model.init_from={tmp_path / 'pre'}")
    capsys.readouterr()
    assert train_main(["--local", *finetune]) == 0
    assert (f"init_from {tmp_path / 'pre'}: loaded backbone, heads.age, shared; fresh heads.emotion; "
            "not used heads.gender, heads.race") in capsys.readouterr().out
    source = torch.load(tmp_path / "pre" / "best_model.pt", weights_only=True)["objective"]
    tuned = newest_checkpoint(tmp_path / "fine")["objective"]
    for key, tensor in tuned.items():
        if key.startswith(("net.backbone.", "net.shared.", "net.heads.age.")) and tensor.is_floating_point() \
                and "running_" not in key:  # BatchNorm statistics move with every forward pass
            assert torch.allclose(tensor, source[key], atol=1e-6), key
    assert train_main(["--local", *finetune[:-1], f"model.init_from={tmp_path / 'nothing'}", "name=bad"]) == 2
    assert f"model.init_from {tmp_path / 'nothing'} holds no facemtl network" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("weighting", ["dwa", "rlw", "famo"])
def test_the_modern_weightings_train_end_to_end_and_resume_exactly(
        synthetic_shards, tmp_path: Path, weighting: str) -> None:
    def run(name: str, epochs: int) -> list[str]:
        return tiny_overrides(synthetic_shards, tmp_path, name, f"max_epochs={epochs}", "freeze.mode=none",
                              f"loss.weighting={weighting}")

    assert train_main(["--local", *run("straight", 3)]) == 0
    assert train_main(["--local", *run("resumed", 2)]) == 0
    assert train_main(["--local", *run("resumed", 3)]) == 0
    straight, resumed = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "resumed")
    assert all(math.isfinite(row["val/total_loss"]) and math.isfinite(row["train/total_loss"]) for row in straight)
    assert without_timings(resumed) == without_timings(straight)  # the weighting's state is in the checkpoint
