"""``pipeline.run_archive``: finished runs' records kept without their weights, and brought back so that an
experiment skips those runs and reports them (the end-to-end round trip is in tests/test_experiments.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.experiment_arms import ExperimentError
from pipeline.experiment_runs import evaluate_best_model
from pipeline.run_archive import is_finished_run, main, merge_lines, restore_records, run_folders, save_records
from tests.test_experiment_status import arm_config, write_run


def write_evaluation(run_dir: Path, epoch: int, mae: float, split: str = "test") -> None:
    folder = run_dir / "evaluation" / split
    folder.mkdir(parents=True)
    report = {"checkpoint": str(run_dir / "best_model.pt"), "epoch": epoch, "split": split,
              "tasks": {"age": {"mae": mae, "count": 40, "note": "text is not a metric"}}}
    (folder / "metrics.json").write_text(json.dumps(report))
    (folder / "metrics.md").write_text("| task | MAE |\n")


def finished_run_with_weights(runs: Path, experiment: str, run: str) -> Path:
    config = arm_config(runs / experiment, run)
    write_run(config, 10)
    (config.run_dir / "best_model.pt").write_bytes(b"weights")
    (config.run_dir / "checkpoint_000009").mkdir()
    (config.run_dir / "checkpoint_000009" / "checkpoint.pt").write_bytes(b"state")
    (config.run_dir / "tensorboard").mkdir(exist_ok=True)
    (config.run_dir / "starts.jsonl").write_text('{"commit": "abc"}\n')
    write_evaluation(config.run_dir, epoch=9, mae=5.5)
    return config.run_dir


def test_save_keeps_finished_runs_records_without_weights_and_reused_runs_as_links(tmp_path: Path) -> None:
    runs, archive = tmp_path / "runs", tmp_path / "records"
    early_freeze = finished_run_with_weights(runs, "freeze", "early-freeze-seed0")
    write_run(arm_config(runs / "freeze", "early-stop-seed0"), 4)  # partly trained: its checkpoints go on
    (runs / "weighting").mkdir()
    (runs / "weighting" / "learned-seed0").symlink_to("../freeze/early-freeze-seed0", target_is_directory=True)
    (runs / "freeze" / "invocations.jsonl").write_text('{"command": "freeze"}\n')

    report = save_records(runs, archive, splits=("test",))

    assert report.copied == ["freeze/early-freeze-seed0"] and report.linked == ["weighting/learned-seed0"]
    assert report.left_out == ["freeze/early-stop-seed0: not finished (4 epoch(s); its checkpoints resume it)"]
    assert report.evaluated == []  # the test evaluation of epoch 9 was already recorded
    saved = archive / "freeze" / "early-freeze-seed0"
    assert sorted(str(path.relative_to(saved)) for path in saved.rglob("*") if path.is_file()) == [
        "config.yaml", "evaluation/test/metrics.json", "evaluation/test/metrics.md", "metrics.parquet",
        "starts.jsonl"]
    assert (saved / "metrics.parquet").read_bytes() == (early_freeze / "metrics.parquet").read_bytes()
    assert os.readlink(archive / "weighting" / "learned-seed0") == "../freeze/early-freeze-seed0"
    assert (archive / "freeze" / "invocations.jsonl").read_text() == '{"command": "freeze"}\n'
    assert not (archive / "weighting" / "invocations.jsonl").exists()  # none to merge


def test_restore_brings_back_finished_runs_an_experiment_then_skips_and_reports(tmp_path: Path) -> None:
    runs, archive = tmp_path / "runs", tmp_path / "records"
    finished_run_with_weights(runs, "freeze", "early-freeze-seed0")
    (runs / "weighting").mkdir()
    (runs / "weighting" / "learned-seed0").symlink_to("../freeze/early-freeze-seed0", target_is_directory=True)
    save_records(runs, archive)
    fresh = tmp_path / "fresh-runs"

    report = restore_records(archive, fresh)

    assert report.copied == ["freeze/early-freeze-seed0"] and report.linked == ["weighting/learned-seed0"]
    restored = fresh / "freeze" / "early-freeze-seed0"
    assert is_finished_run(restored) and is_finished_run(fresh / "weighting" / "learned-seed0")
    assert not (restored / "best_model.pt").exists()
    # --split test of a restored run: the evaluation recorded for its best epoch, numbers only
    assert evaluate_best_model(restored, "test") == {"test/age/mae": 5.5, "test/age/count": 40}
    assert restore_records(archive, fresh).unchanged == ["freeze/early-freeze-seed0", "weighting/learned-seed0"]


def test_a_recorded_evaluation_of_another_epoch_is_not_the_best_models(tmp_path: Path) -> None:
    run = finished_run_with_weights(tmp_path / "runs", "freeze", "none-seed0")
    (run / "best_model.pt").unlink()
    (run / "evaluation" / "test" / "metrics.json").write_text(json.dumps(
        {"checkpoint": str(run / "best_model.pt"), "epoch": 6, "tasks": {"age": {"mae": 5.0}}}))
    with pytest.raises(ExperimentError, match="no best_model.pt .* and no test evaluation recorded for its best epoch"):
        evaluate_best_model(run, "test")


def test_restore_keeps_a_run_folder_that_exists_and_says_how_to_take_the_archived_one(tmp_path: Path) -> None:
    runs, archive = tmp_path / "runs", tmp_path / "records"
    finished_run_with_weights(archive, "freeze", "none-seed0")
    write_run(arm_config(runs / "freeze", "none-seed0"), 3)
    report = restore_records(archive, runs)
    assert report.copied == [] and report.left_out == [
        f"freeze/none-seed0: {runs}/freeze/none-seed0 exists with 3 epoch(s) and is kept; "
        "delete it to take the archived run instead"]
    assert not is_finished_run(runs / "freeze" / "none-seed0")


def test_an_interrupted_copy_is_not_a_run_and_the_next_save_replaces_the_old_records(tmp_path: Path) -> None:
    runs, archive = tmp_path / "runs", tmp_path / "records"
    run = finished_run_with_weights(runs, "freeze", "none-seed0")
    save_records(runs, archive)
    (archive / "freeze" / ".cumulative-seed0.partial").mkdir()  # a copy cut short: hidden, not a run folder
    assert [path.name for path in run_folders(archive)] == ["none-seed0"]
    (run / "starts.jsonl").write_text('{"commit": "def"}\n')
    save_records(runs, archive)
    assert (archive / "freeze" / "none-seed0" / "starts.jsonl").read_text() == '{"commit": "def"}\n'
    assert sorted(path.name for path in (archive / "freeze").iterdir()) == [".cumulative-seed0.partial", "none-seed0"]


def test_invocation_lines_are_merged_once_in_either_direction(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    ours.write_text("a\nb\n")
    theirs.write_text("b\nc\n\n")
    assert merge_lines(theirs, ours) == 1 and ours.read_text() == "a\nb\nc\n"
    assert merge_lines(theirs, ours) == 0 and merge_lines(tmp_path / "absent", ours) == 0


def test_the_command_line_says_what_it_copied_and_refuses_a_missing_folder(tmp_path: Path, capsys) -> None:
    runs, archive = tmp_path / "runs", tmp_path / "records"
    finished_run_with_weights(runs, "lambda", "lambda-0.1-seed0")
    assert main(["save", str(runs), str(archive)]) == 0
    assert (f"saved into {archive}: 1 run(s) copied, 0 link(s) to reused runs, 0 already there, 0 evaluated on the "
            "test split now") in capsys.readouterr().out
    assert main(["restore", str(tmp_path / "nowhere"), str(runs)]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err
