"""``pipeline.run_archive``: finished runs' records kept without their weights, and brought back so that an
experiment skips those runs and reports them (the end-to-end round trip is in tests/test_experiments.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.data import summary_digest
from pipeline.experiment_arms import ExperimentError
from pipeline.experiment_invocations import record_late_links
from pipeline.experiment_runs import check_run_folder, evaluate_best_model
from pipeline.run_archive import is_finished_run, main, merge_invocations, restore_records, run_folders, save_records
from tests.test_experiment_status import arm_config, write_run


def write_evaluation(run_dir: Path, epoch: int, mae: float, split: str = "test", own_datasets: bool = True) -> None:
    """metrics.json as pipeline.evaluate writes it for best_model.pt (the keys the archive reads)."""
    folder = run_dir / "evaluation" / split
    folder.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(run_dir / "best_model.pt"), "epoch": epoch, "split": split,
              "own_datasets": own_datasets, "tasks": {"age": {"mae": mae, "count": 40, "note": "text, not a metric"}}}
    (folder / "metrics.json").write_text(json.dumps(report))
    (folder / "metrics.md").write_text("| task | MAE |\n")


def reuse(runs: Path, experiment: str, run: str, target: str) -> None:
    """A link as pipeline.experiments makes it for a reused run, recorded in the experiment's invocations.jsonl."""
    (runs / experiment).mkdir(exist_ok=True)
    (runs / experiment / run).symlink_to(target, target_is_directory=True)
    line = {"time": "2026-11-30T10:00:00+0000", "command": experiment, "reused_runs": {run: target}}
    (runs / experiment / "invocations.jsonl").write_text(json.dumps(line) + "\n")


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
    reuse(runs, "weighting", "learned-seed0", "../freeze/early-freeze-seed0")
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
    assert "learned-seed0" in (archive / "weighting" / "invocations.jsonl").read_text()


def test_save_checks_a_recorded_evaluation_as_split_test_would_and_keeps_one_it_cannot_make_again(
        tmp_path: Path) -> None:
    runs, archive = tmp_path / "runs", tmp_path / "records"
    run = finished_run_with_weights(runs, "freeze", "none-seed0")
    written = (run / "evaluation" / "test" / "metrics.json").stat().st_mtime
    os.utime(run / "best_model.pt", (written - 60, written - 60))
    assert save_records(runs, archive).warnings == []  # fresh: used as it is
    os.utime(run / "best_model.pt", (written + 60, written + 60))  # saved again since: evaluated again, which
    report = save_records(runs, archive)  # fails here (best_model.pt holds no network), so the record is kept
    assert report.evaluated == [] and len(report.warnings) == 1
    assert report.warnings[0].startswith("freeze/none-seed0: its test evaluation of the best epoch is kept as "
                                         "recorded, unchecked against its shards now (cannot evaluate")
    assert (archive / "freeze" / "none-seed0" / "evaluation" / "test" / "metrics.json").is_file()


def test_a_folder_the_user_linked_is_saved_as_a_folder_and_a_link_not_recorded_is_not_reuse(tmp_path: Path) -> None:
    runs, archive, scratch = tmp_path / "runs", tmp_path / "records", tmp_path / "scratch"
    finished_run_with_weights(scratch, "freeze", "none-seed0")
    (runs / "freeze").mkdir(parents=True)
    (runs / "freeze" / "none-seed0").symlink_to(scratch / "freeze" / "none-seed0", target_is_directory=True)
    report = save_records(runs, archive)
    saved = archive / "freeze" / "none-seed0"
    assert report.copied == ["freeze/none-seed0"] and not saved.is_symlink() and is_finished_run(saved)


def test_restore_brings_back_finished_runs_an_experiment_then_skips_and_reports(tmp_path: Path) -> None:
    runs, archive = tmp_path / "runs", tmp_path / "records"
    finished_run_with_weights(runs, "freeze", "early-freeze-seed0")
    reuse(runs, "weighting", "learned-seed0", "../freeze/early-freeze-seed0")
    save_records(runs, archive)
    fresh = tmp_path / "fresh-runs"

    report = restore_records(archive, fresh)

    assert report.copied == ["freeze/early-freeze-seed0"] and report.linked == ["weighting/learned-seed0"]
    restored = fresh / "freeze" / "early-freeze-seed0"
    assert is_finished_run(restored) and is_finished_run(fresh / "weighting" / "learned-seed0")
    assert not (restored / "best_model.pt").exists()
    # --split test of a restored run: the evaluation recorded for its best epoch, numbers only
    assert evaluate_best_model(restored, "test") == {"test/age/mae": 5.5, "test/age/count": 40}
    assert save_records(runs, archive).unchanged == ["freeze/early-freeze-seed0", "weighting/learned-seed0"]
    assert restore_records(archive, fresh).unchanged == ["freeze/early-freeze-seed0", "weighting/learned-seed0"]


def test_a_fresh_evaluation_of_best_model_is_used_and_a_newer_model_or_shard_set_is_evaluated_again(
        tmp_path: Path, capsys) -> None:
    run = finished_run_with_weights(tmp_path / "runs", "freeze", "none-seed0")  # best_model.pt is no checkpoint
    shards, other = tmp_path / "shards", tmp_path / "other-shards"
    for folder in (shards, other):
        folder.mkdir()
        (folder / "summary.json").write_text(f'{{"dataset": "{folder.name}"}}')
    linked = tmp_path / "utkface"  # the config names a link, as a user's shards/utkface -> a scratch disk
    linked.symlink_to(shards)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "data": {**saved["data"], "datasets": [str(linked)]}}))
    report_path = run / "evaluation" / "test" / "metrics.json"
    report = json.loads(report_path.read_text())

    def record(**dataset) -> float:
        """The report as pipeline.evaluate writes it, read from ``shards``; returns when it was written."""
        dataset = {"name": "utkface", "path": str(shards), **dataset}
        report_path.write_text(json.dumps({**report, "datasets": [dataset], "skipped_datasets": []}))
        written = report_path.stat().st_mtime
        for path in (run / "best_model.pt", shards / "summary.json"):
            os.utime(path, (written - 60, written - 60))
        return written

    def evaluated_again() -> bool:
        try:
            evaluate_best_model(run, "test")
        except ExperimentError as error:  # best_model.pt here holds no network: evaluating it fails, saying so
            assert "cannot evaluate" in str(error)
            return True
        return False

    written = record()  # a report without digests: the summaries' times decide
    assert evaluate_best_model(run, "test") == {"test/age/mae": 5.5, "test/age/count": 40}  # not evaluated again
    assert "none-seed0: test split as evaluated before" in capsys.readouterr().out
    with pytest.raises(ExperimentError, match="cannot evaluate .* on test"):  # evaluating reads the bytes
        evaluate_best_model(run, "test", reevaluate=True)
    for newer in (run / "best_model.pt", shards / "summary.json"):
        os.utime(newer, (written + 60, written + 60))
        assert evaluated_again()
        os.utime(newer, (written - 60, written - 60))

    written = record(summary_sha256=summary_digest(shards))
    assert not evaluated_again()
    (shards / "summary.json").write_text('{"dataset": "made again, with other images"}')
    os.utime(shards / "summary.json", (written - 60, written - 60))  # an older copy (cp -p) is caught by its digest
    assert evaluated_again()

    record(summary_sha256=summary_digest(shards))
    linked.unlink()
    linked.symlink_to(other)  # the config's folder is another one now
    assert evaluated_again()
    linked.unlink()
    linked.symlink_to(shards)
    assert not evaluated_again()
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "data": {**saved["data"],
                                                                      "datasets": [str(linked), str(other)]}}))
    assert evaluated_again()  # a folder the report did not read
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "data": {**saved["data"], "datasets": [str(linked)]}}))
    (shards / "summary.json").unlink()  # its shards are gone: nothing says the report is of them
    assert evaluated_again()


@pytest.mark.parametrize("epoch, own_datasets", [(6, True), (9, False)], ids=["another-epoch", "other-data"])
def test_a_recorded_evaluation_of_another_epoch_or_other_data_is_not_the_runs_result(
        tmp_path: Path, epoch: int, own_datasets: bool) -> None:
    run = finished_run_with_weights(tmp_path / "runs", "freeze", "none-seed0")
    (run / "best_model.pt").unlink()
    write_evaluation(run, epoch, 5.0, own_datasets=own_datasets)
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


def test_an_interrupted_copy_keeps_the_old_records_and_the_next_save_clears_what_it_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs, archive = tmp_path / "runs", tmp_path / "records"
    run = finished_run_with_weights(runs, "freeze", "none-seed0")
    save_records(runs, archive)
    old = (archive / "freeze" / "none-seed0" / "starts.jsonl").read_text()
    (run / "starts.jsonl").write_text('{"commit": "def"}\n')
    copies, real_copy = [], shutil.copy2

    def copy_then_fail(source, target):  # the disk fills after the first file
        if copies:
            raise OSError(28, "No space left on device")
        copies.append(real_copy(source, target))

    monkeypatch.setattr("pipeline.run_archive.shutil.copy2", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_records(runs, archive)
    assert (archive / "freeze" / ".none-seed0.partial" / "config.yaml").is_file()  # the half copy, hidden
    assert [path.name for path in run_folders(archive)] == ["none-seed0"]
    assert (archive / "freeze" / "none-seed0" / "starts.jsonl").read_text() == old
    monkeypatch.undo()
    save_records(runs, archive)
    assert (archive / "freeze" / "none-seed0" / "starts.jsonl").read_text() == '{"commit": "def"}\n'
    assert [path.name for path in (archive / "freeze").iterdir()] == ["none-seed0"]


def test_invocation_lines_are_merged_once_and_in_time_order(tmp_path: Path) -> None:
    def line(hour: int, link: str) -> str:
        return json.dumps({"time": f"2026-11-30T{hour:02d}:00:00+0000", "reused_runs": {"learned-seed0": link}})

    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    ours.write_text(f"{line(9, 'a')}\n{line(12, 'c')}\n")
    theirs.write_text(f"{line(12, 'c')}\n{line(10, 'b')}\n\n")  # an older line the archive kept
    assert merge_invocations(theirs, ours) == 1
    assert ours.read_text() == f"{line(9, 'a')}\n{line(10, 'b')}\n{line(12, 'c')}\n"  # the newest link stays last
    assert merge_invocations(theirs, ours) == 0 and merge_invocations(tmp_path / "absent", ours) == 0


def test_older_records_second_times_and_newer_microsecond_times_merge_in_time_order(tmp_path: Path) -> None:
    old = json.dumps({"time": "2026-11-30T10:00:01+0000", "reused_runs": {"learned-seed0": "b"}})
    new = json.dumps({"time": "2026-11-30T11:00:00.250000+01:00", "reused_runs": {"learned-seed0": "a"}})  # 10:00:00
    ours, theirs = tmp_path / "ours.jsonl", tmp_path / "theirs.jsonl"
    ours.write_text(f"{old}\n")
    theirs.write_text(f"{new}\n")
    assert merge_invocations(theirs, ours) == 1
    assert ours.read_text() == f"{new}\n{old}\n"


def test_the_same_command_twice_within_a_second_stays_two_invocations_in_the_records(tmp_path: Path) -> None:
    experiment = tmp_path / "runs" / "weighting"
    experiment.mkdir(parents=True)
    for _ in range(2):
        record_late_links(experiment, ["python", "-m", "pipeline.experiments", "weighting"], {"dwa-seed0": "../x"})
    archive = tmp_path / "records" / "weighting" / "invocations.jsonl"
    archive.parent.mkdir(parents=True)
    assert merge_invocations(experiment / "invocations.jsonl", archive) == 2
    assert merge_invocations(experiment / "invocations.jsonl", archive) == 0  # saved again: nothing new
    assert len(archive.read_text().splitlines()) == 2


def test_the_command_line_says_what_it_copied_and_refuses_a_missing_folder(tmp_path: Path, capsys) -> None:
    runs, archive = tmp_path / "runs", tmp_path / "records"
    finished_run_with_weights(runs, "lambda", "lambda-0.1-seed0")
    assert main(["save", str(runs), str(archive)]) == 0
    assert (f"saved into {archive}: 1 run(s) copied, 0 link(s) to reused runs, 0 already there, 0 evaluated on the "
            "test split now") in capsys.readouterr().out
    assert main(["restore", str(tmp_path / "nowhere"), str(runs)]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err


def test_restore_relocates_the_configs_paths_so_the_experiment_takes_the_run_on_another_layout(tmp_path: Path) -> None:
    def config(root: Path):
        return load_config(None, [f"runs_dir={root}/runs/freeze", "name=none-seed0", "max_epochs=10",
                                  "data.tasks=[age]",
                                  f"data.datasets=[{root}/shards/utk]", f"model.weights_path={root}/weights/w.pth"])

    old, new, records = tmp_path / "old", tmp_path / "new", tmp_path / "records"
    write_run(config(old), 10)
    save_records(old / "runs", records, splits=())
    assert main(["restore", str(records), str(new / "runs"), "--relocate", f"{old}={new}"]) == 0
    restored = yaml.safe_load((new / "runs" / "freeze" / "none-seed0" / "config.yaml").read_text())
    assert restored["data"]["datasets"] == [f"{new}/shards/utk"] and restored["model"]["weights_path"] == \
        f"{new}/weights/w.pth"
    check_run_folder(config(new))  # the arm's own run now: not refused
    assert (records / "freeze" / "none-seed0" / "config.yaml").read_text() == (
        old / "runs" / "freeze" / "none-seed0" / "config.yaml").read_text()  # the archive keeps what was trained

    restore_records(records, tmp_path / "elsewhere" / "runs")  # no --relocate: the old paths, refused by name
    moved = dataclasses.replace(config(new), runs_dir=str(tmp_path / "elsewhere" / "runs" / "freeze"))
    with pytest.raises(ExperimentError, match=r"trained with another config \(data.datasets"):
        check_run_folder(moved)
