"""Validation sums a split's losses and metrics on the device and reads them on the host once: checked against the
plain per-sample definitions on hand-made batches, and for reading no value on the host within a batch."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import TrainConfig
from pipeline.loop import WorkerContext
from pipeline.metrics import MetricSums
from pipeline.schema import get_task, label_slices
from pipeline.validation import batch_metric_sums, evaluate_split

NAN = math.nan
TASKS = [get_task(name) for name in ("age", "gender", "race", "emotion", "landmarks")]
AGE_SCALE = TrainConfig().loss.age_scale


class FixedOutputs(torch.nn.Module):
    """A stand-in network that answers each batch with the next of the given outputs."""

    def __init__(self, outputs: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.outputs = iter(outputs)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return next(self.outputs)


def face(left_eye: tuple[float, float], shift: float = 0.0) -> list[float]:
    """Ten landmark coordinates: eyes, nose and mouth corners, the right eye 0.4 to the right of the left one."""
    x, y = left_eye
    points = [(x, y), (x + 0.4, y), (x + 0.2, y + 0.2), (x + 0.05, y + 0.35), (x + 0.35, y + 0.35)]
    return [value + shift for point in points for value in point]


# Rows: age, gender (one logit), race (five logits), emotion (never labelled here), landmarks (ten numbers).
# Unlabelled cells hold NaN and unlabelled rows' outputs anything: neither may change a metric.
BATCHES = [
    {
        "labels": [[30.0, 1.0, 2.0, NAN, *face((0.3, 0.4))],
                   [NAN, 0.0, 0.0, NAN, *[NAN] * 10],
                   [52.0, NAN, 4.0, NAN, *face((0.25, 0.35))]],
        "outputs": {
            "age": [[0.33], [5e3], [0.45]],
            "gender": [[1.5], [0.7], [-9.0]],
            "race": [[0.0, 0.0, 2.0, 0.0, 0.0], [1.0, 0.5, 0.0, 0.0, 0.0], [3.0, 0.0, 0.0, 0.0, 1.0]],
            "emotion": [[9.0] + [0.0] * 6] * 3,
            "landmarks": [face((0.3, 0.4), 0.02), [1e4] * 10, face((0.2, 0.3))],
        },
    },
    {
        "labels": [[20.0, 0.0, NAN, NAN, *[NAN] * 10],
                   [NAN, NAN, NAN, NAN, *face((0.3, 0.3))]],
        "outputs": {
            "age": [[0.21], [-7.0]],
            "gender": [[-0.2], [4.0]],
            "race": [[NAN] * 5, [0.0] * 5],
            "emotion": [[0.0] * 7] * 2,
            "landmarks": [[NAN] * 10, face((0.32, 0.3))],
        },
    },
]


def batches() -> list[dict[str, torch.Tensor]]:
    made = []
    for batch in BATCHES:
        labels = torch.tensor(batch["labels"])
        columns = [columns.start for columns in label_slices(TASKS)]  # NaN exactly where a task is unlabelled
        made.append({"images": torch.zeros(len(labels), 3, 8, 8, dtype=torch.uint8), "labels": labels,
                     "mask": ~labels[:, columns].isnan()})
    return made


def outputs() -> list[dict[str, torch.Tensor]]:
    return [{task: torch.tensor(values) for task, values in batch["outputs"].items()} for batch in BATCHES]


def labelled_rows(task_index: int) -> list[tuple[list[float], list[float]]]:
    """(output, label) of every row of every batch labelled for the task, labels in the task's columns."""
    task = TASKS[task_index]
    start = label_slices(TASKS)[task_index].start
    rows = []
    for batch in BATCHES:
        for label_row, output in zip(batch["labels"], batch["outputs"][task.name]):
            label = label_row[start : start + task.label_width]
            if not math.isnan(label[0]):
                rows.append((output, label))
    return rows


def expected_classification(task_index: int, classes: int) -> dict[str, float]:
    """Loss (cross-entropy, or BCE-with-logits for one logit), accuracy and balanced accuracy, row by row."""
    losses, hits = [], {}
    for output, (label,) in labelled_rows(task_index):
        true = int(label)
        if len(output) == 1:
            losses.append(math.log1p(math.exp(-output[0] if true else output[0])))
            predicted = int(output[0] > 0)
        else:
            losses.append(math.log(sum(math.exp(value) for value in output)) - output[true])
            predicted = max(range(classes), key=lambda index: output[index])
        hits.setdefault(true, []).append(predicted == true)
    correct = [hit for per_class in hits.values() for hit in per_class]
    return {"count": len(losses), "loss": sum(losses) / len(losses), "accuracy": sum(correct) / len(correct),
            "balanced_accuracy": sum(sum(h) / len(h) for h in hits.values()) / len(hits)}


def expected_age() -> dict[str, float]:
    rows = labelled_rows(0)
    errors = [abs(output[0] * AGE_SCALE - label[0]) for output, label in rows]
    squared_losses = [(output[0] - label[0] / AGE_SCALE) ** 2 for output, label in rows]
    return {"count": len(rows), "loss": sum(squared_losses) / len(rows),
            "mae": sum(errors) / len(errors), "rmse": math.sqrt(sum(e * e for e in errors) / len(errors)),
            "cs5": sum(e <= 5 for e in errors) / len(errors)}


def expected_landmarks() -> dict[str, float]:
    rows = labelled_rows(4)
    coordinate_errors = [abs(p - t) for output, label in rows for p, t in zip(output, label)]
    nmes = []
    for output, label in rows:
        distances = [math.dist(output[i : i + 2], label[i : i + 2]) for i in range(0, 10, 2)]
        nmes.append(sum(distances) / 5 / math.dist(label[0:2], label[2:4]))  # left eye to right eye
    return {"count": len(rows), "loss": 100 * sum(coordinate_errors) / len(coordinate_errors),
            "mae": sum(coordinate_errors) / len(coordinate_errors), "nme": sum(nmes) / len(nmes)}


def test_split_metrics_equal_the_per_sample_definitions_with_an_absent_task_and_landmarks() -> None:
    summary = evaluate_split(FixedOutputs(outputs()), batches(), TASKS, WorkerContext(), TrainConfig())
    expected = {"age": expected_age(), "gender": expected_classification(1, 2), "race": expected_classification(2, 5),
                "landmarks": expected_landmarks()}
    assert expected["age"]["count"] == 3 and expected["landmarks"]["count"] == 3  # batches hold what they should
    for task, metrics in expected.items():
        assert summary[task].keys() == metrics.keys(), task
        assert summary[task] == pytest.approx(metrics, rel=1e-6), task
    emotion = summary["emotion"]
    assert emotion["count"] == 0 and all(math.isnan(emotion[key]) for key in ("loss", "accuracy", "balanced_accuracy"))


def test_batch_sums_read_no_value_on_the_host() -> None:
    """On the meta device a tensor has no values: ``.item()``, ``bool()``, ``x[mask]``, ``.cpu()`` all raise there,
    as each would make the host wait for a GPU."""
    batch, output = batches()[0], outputs()[0]
    on_meta = {task: values.to("meta") for task, values in output.items()}
    labels, mask = batch["labels"].to("meta"), batch["mask"].to("meta")
    sums = batch_metric_sums(on_meta, labels, mask, TASKS)
    assert sums.device.type == "meta" and sums.shape == MetricSums(TASKS).as_tensor().shape
    with pytest.raises((RuntimeError, NotImplementedError)):
        MetricSums(TASKS).add_predictions(TASKS[1], on_meta["gender"][:, 0] > 0, labels[:, 1])  # the check catches one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_batch_sums_make_no_cuda_sync() -> None:
    batch, output = batches()[0], outputs()[0]
    on_gpu = {task: values.cuda() for task, values in output.items()}
    labels, mask = batch["labels"].cuda(), batch["mask"].cuda()
    expected = batch_metric_sums(on_gpu, labels, mask, TASKS)  # warm-up: first calls may sync to load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sums = batch_metric_sums(on_gpu, labels, mask, TASKS)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(sums.cpu(), expected.cpu())
