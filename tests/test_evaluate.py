"""python -m pipeline.evaluate: metrics from hand-computed cases, then a tiny trained run evaluated end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.data import open_shard_set, summary_digest
from pipeline.evaluate import (
    EvaluationError,
    check_task_declarations,
    default_output_dir,
    main as evaluate_main,
    open_evaluation_data,
    task_report,
)
from pipeline.metrics import MetricSums, classification_metrics, per_class_accuracy
from pipeline.schema import TaskSpec, forget_declared_tasks, get_task
from pipeline.shard import main as shard_main
from pipeline.train import main as train_main
from tests.test_train import tiny_overrides

THREE_CLASSES = TaskSpec("colour", "multiclass", classes=("red", "green", "blue"))
ALL_TASKS = ("age", "gender", "race", "smile", "young", "emotion")


# ---------------------------------------------------------------- the maths, by hand


def test_confusion_matrix_gives_accuracy_balanced_accuracy_and_per_class_accuracy() -> None:
    sums = MetricSums([THREE_CLASSES])
    true = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    predicted = [0, 0, 0, 1, 1, 1, 0, 0, 2, 1]
    sums.add_predictions(THREE_CLASSES, torch.tensor(predicted), torch.tensor(true, dtype=torch.float32))
    confusion = sums.sums["colour"].confusion
    assert confusion.tolist() == [[3, 1, 0], [2, 2, 0], [0, 1, 1]]  # confusion[true, predicted]
    metrics = classification_metrics(confusion)
    assert metrics["accuracy"] == pytest.approx(6 / 10)
    assert metrics["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 4 + 1 / 2) / 3)
    assert per_class_accuracy(confusion, THREE_CLASSES.classes) == \
        pytest.approx({"red": 0.75, "green": 0.5, "blue": 0.5})


def test_class_without_samples_is_left_out_of_balanced_accuracy_and_has_no_accuracy() -> None:
    confusion = torch.tensor([[2, 0, 1], [1, 1, 0], [0, 0, 0]], dtype=torch.float64)
    assert classification_metrics(confusion)["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert math.isnan(per_class_accuracy(confusion, THREE_CLASSES.classes)["blue"])


def test_age_errors_give_mae_rmse_and_cs5_counting_five_years_as_within() -> None:
    age = get_task("age")
    sums = MetricSums([age])
    sums.add_predictions(age, torch.tensor([30.0, 35.0, 25.0, 36.0]), torch.tensor([30.0, 30.0, 30.0, 30.0]))
    sums.add_losses({"age": torch.tensor(0.5)}, {"age": 4})
    metrics = sums.summary()["age"]
    # errors 0, 5, 5, 6 years
    assert metrics["mae"] == pytest.approx(16 / 4)
    assert metrics["rmse"] == pytest.approx(math.sqrt((0 + 25 + 25 + 36) / 4))
    assert metrics["cs5"] == pytest.approx(3 / 4)
    assert metrics["count"] == 4 and metrics["loss"] == pytest.approx(0.5)


def test_task_without_labels_is_reported_as_such_not_as_a_score() -> None:
    age = get_task("age")
    sums = MetricSums([age])
    report = task_report(age, sums.sums["age"], sums.summary()["age"], ["fer", "celeba"])
    assert report == {"kind": "regression", "count": 0, "status": "no labels in fer, celeba"}


def test_default_output_folder_is_beside_the_run_or_the_checkpoint_file(tmp_path: Path) -> None:
    (tmp_path / "best_model.pt").write_bytes(b"")
    assert default_output_dir(tmp_path, "test") == tmp_path / "evaluation" / "test"
    assert default_output_dir(tmp_path / "best_model.pt", "val") == tmp_path / "evaluation" / "val"


# ---------------------------------------------------------------- a tiny trained run


@pytest.fixture(scope="module")
def trained_run(synthetic_shards, tmp_path_factory) -> Path:
    """One epoch of one step: the weights need not be good, only the same ones training validated."""
    runs = tmp_path_factory.mktemp("evaluate-runs")
    args = tiny_overrides(synthetic_shards, runs, "r", "max_epochs=1", "data.steps_per_epoch=1",
                          "data.loader_workers=0")
    assert train_main(["--local", *args]) == 0
    return runs / "r"


@pytest.fixture(scope="module")
def val_report(trained_run: Path) -> dict:
    assert evaluate_main([str(trained_run), "--split", "val", "--loader-workers", "0"]) == 0
    return json.loads((trained_run / "evaluation" / "val" / "metrics.json").read_text())


def labelled_count(shard_dirs, task: str, split: str) -> int:
    """From the manifests: the split's samples that carry a label for ``task``."""
    return sum(len(open_shard_set(folder).labels(task, split)) for folder in shard_dirs)


def test_every_task_counts_each_labelled_val_sample_once(val_report: dict, synthetic_shards) -> None:
    assert val_report["checkpoint"].endswith("best_model.pt") and val_report["split"] == "val"
    assert val_report["samples"] == sum(open_shard_set(f).num_samples("val") for f in synthetic_shards.values())
    assert {d["name"] for d in val_report["datasets"]} == {"utk", "fer", "celeba"}
    for task in ALL_TASKS:
        assert val_report["tasks"][task]["count"] == labelled_count(synthetic_shards.values(), task, "val"), task
    emotion = val_report["tasks"]["emotion"]
    assert sum(map(sum, emotion["confusion"])) == emotion["count"] and len(emotion["confusion"]) == 7
    assert val_report["by_dataset"]["fer"]["tasks"]["age"]["status"] == "no labels in fer"


def test_val_metrics_reproduce_the_runs_best_epoch(val_report: dict, trained_run: Path) -> None:
    # Both sides are pipeline.validation.evaluate_split on the same weights, unaugmented (validation never is).
    # The evaluator runs it once per dataset and adds the sums, so batches are composed differently:
    # counts and accuracies are equal, losses and age errors differ only by float summation order.
    best = [row for row in pq.read_table(trained_run / "metrics.parquet").to_pylist() if row["is_best"]][-1]
    assert val_report["epoch"] == best["epoch"]
    for task in ALL_TASKS:
        metrics = val_report["tasks"][task]
        assert metrics["count"] == best[f"val/{task}/count"]
        assert metrics["loss"] == pytest.approx(best[f"val/{task}/loss"], abs=1e-4)
        names = ("mae", "rmse", "cs5") if task == "age" else ("accuracy", "balanced_accuracy")
        for name in names:
            tolerance = 0 if name in ("cs5", "accuracy", "balanced_accuracy") else 1e-4
            assert metrics[name] == pytest.approx(best[f"val/{task}/{name}"], abs=tolerance), f"{task} {name}"


def test_outputs_are_json_markdown_and_a_confusion_png_per_classification_task(
        val_report: dict, trained_run: Path) -> None:
    out = trained_run / "evaluation" / "val"
    markdown = (out / "metrics.md").read_text()
    assert "| task | samples |" in markdown and "### emotion: per-class accuracy" in markdown
    for task in ("gender", "race", "smile", "young", "emotion"):
        with Image.open(out / f"confusion_{task}.png") as image:
            assert image.format == "PNG" and image.size[0] > 100
    assert not (out / "confusion_age.png").exists()


def test_other_data_reports_the_models_unlabelled_tasks_as_no_labels(
        trained_run: Path, synthetic_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = trained_run / "checkpoint_000001" / "checkpoint.pt"
    code = evaluate_main([str(checkpoint), "--split", "val", "--data", str(synthetic_shards["fer"]),
                          "--out", str(tmp_path), "--loader-workers", "0", "--batch-size", "7"])
    assert code == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["checkpoint"] == str(checkpoint) and [d["name"] for d in report["datasets"]] == ["fer"]
    assert report["tasks"]["emotion"]["count"] == labelled_count([synthetic_shards["fer"]], "emotion", "val") > 0
    for task in ("age", "gender", "race", "smile", "young"):
        assert report["tasks"][task] == {"kind": get_task(task).kind, "count": 0, "status": "no labels in fer"}
    assert "| age | 0 | no labels in fer |" in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("confusion_*.png")] == ["confusion_emotion.png"]


# ---------------------------------------------------------------- bad inputs
# (what makes a checkpoint unusable: test_inference)


def test_an_unusable_checkpoint_exits_2_naming_the_path(synthetic_shards, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = synthetic_shards["fer"] / "manifest.parquet"
    assert evaluate_main([str(manifest), "--split", "val"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {manifest}: cannot be read as a facemtl checkpoint")


def test_cuda_without_a_gpu_exits_2(trained_run: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluate_main([str(trained_run), "--split", "val", "--device", "cuda"]) == 2
    assert "no CUDA device is available" in capsys.readouterr().err


def test_split_that_no_dataset_has_is_an_error_naming_it_and_others_are_skipped(
        synthetic_shards, tmp_path: Path) -> None:
    train_only = tmp_path / "train_only"
    assert shard_main(["synthetic", "--name", "train_only", "--num-samples", "5", "--size", "32", "--val-fraction", "0",
                       "--test-fraction", "0", "--out", str(train_only)]) == 0
    with pytest.raises(EvaluationError, match="no dataset has a 'test' split"):
        open_evaluation_data([train_only], "test")
    data = open_evaluation_data([train_only, synthetic_shards["fer"]], "test")
    assert [s.name for s in data.shard_sets] == ["fer"]
    assert data.skipped == [{"name": "train_only", "path": str(train_only.resolve()), "reason": "no test split",
                             "summary_sha256": summary_digest(train_only)}]


def test_data_declaring_a_task_of_the_model_differently_is_refused_naming_both(tmp_path: Path) -> None:
    tasks_file = tmp_path / "tasks.yaml"
    tasks_file.write_text("tasks:\n  - {name: Glasses, kind: binary, classes: [no, yes]}\n")
    assert shard_main(["synthetic", "--tasks-file", str(tasks_file), "--tasks", "Glasses", "--num-samples", "6",
                       "--size", "32", "--out", str(tmp_path / "glasses")]) == 0
    forget_declared_tasks()  # the model's process knows its own declaration, not the folder's
    folder = open_shard_set(tmp_path / "glasses")
    check_task_declarations([TaskSpec("Glasses", "binary", classes=("no", "yes"))], tmp_path / "model.pt", [folder])
    worded = TaskSpec("Glasses", "binary", classes=("absent", "present"))
    with pytest.raises(EvaluationError) as raised:
        check_task_declarations([worded, get_task("age")], tmp_path / "model.pt", [folder])
    message = str(raised.value)
    assert "classes: ['absent', 'present']" in message and "classes: ['no', 'yes']" in message
    assert "model.pt" in message and "glasses/summary.json" in message
