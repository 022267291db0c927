"""Per-task metrics kept as sums and counts, so that ranks can add them up with one all-reduce.

For every task: summed loss and labelled count; classification adds a confusion matrix (accuracy,
balanced accuracy, per-class accuracy follow from it); regression (age) adds summed absolute and
squared errors in years and the count within 5 years (cumulative score CS(5)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from pipeline.schema import TaskSpec, get_task

CS_THRESHOLD_YEARS = 5.0


@dataclass
class TaskSums:
    """Everything needed for one task's metrics; ``confusion[true, predicted]`` for classification."""

    loss_sum: float = 0.0
    count: int = 0
    confusion: torch.Tensor | None = None
    abs_error_sum: float = 0.0
    squared_error_sum: float = 0.0
    within_threshold: int = 0


class MetricSums:
    """Accumulates per-task sums over batches; ``as_tensor``/``from_tensor`` for all-reduce."""

    def __init__(self, tasks: Sequence[TaskSpec]) -> None:
        self.tasks = list(tasks)
        self.sums = {t.name: TaskSums(confusion=_empty_confusion(t)) for t in self.tasks}

    def add_losses(self, loss_by_task: Mapping[str, torch.Tensor], count_by_task: Mapping[str, int]) -> None:
        """Add mean losses of a batch, weighted by how many labelled samples each mean is over."""
        for task, loss in loss_by_task.items():
            self.sums[task].loss_sum += float(loss) * count_by_task[task]
            self.sums[task].count += int(count_by_task[task])

    def add_predictions(self, task: TaskSpec, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """``predicted``: class indices or ages in years for the labelled rows; ``target`` likewise."""
        sums = self.sums[task.name]
        if task.kind == "regression":
            error = (predicted.double() - target.double()).abs()
            sums.abs_error_sum += float(error.sum())
            sums.squared_error_sum += float((error**2).sum())
            sums.within_threshold += int((error <= CS_THRESHOLD_YEARS).sum())
        else:
            size = sums.confusion.shape[0]
            flat = target.long() * size + predicted.long()
            sums.confusion += torch.bincount(flat.cpu(), minlength=size * size).view(size, size).double()

    def as_tensor(self) -> torch.Tensor:
        parts = []
        for task in self.tasks:
            s = self.sums[task.name]
            parts.append(torch.tensor([s.loss_sum, s.count, s.abs_error_sum, s.squared_error_sum, s.within_threshold], dtype=torch.float64))
            if s.confusion is not None:
                parts.append(s.confusion.flatten())
        return torch.cat(parts)

    def load_tensor(self, flat: torch.Tensor) -> None:
        """Replace the sums by ``flat`` (e.g. after an all-reduce of :meth:`as_tensor`)."""
        flat = flat.double().cpu()
        offset = 0
        for task in self.tasks:
            s = self.sums[task.name]
            s.loss_sum, count, s.abs_error_sum, s.squared_error_sum, within = flat[offset : offset + 5].tolist()
            s.count, s.within_threshold = int(round(count)), int(round(within))
            offset += 5
            if s.confusion is not None:
                size = s.confusion.numel()
                s.confusion = flat[offset : offset + size].view_as(s.confusion).clone()
                offset += size

    def summary(self) -> dict[str, dict[str, float]]:
        """task -> {loss, count, accuracy, balanced_accuracy} or {loss, count, mae, rmse, cs5}."""
        result = {}
        for task in self.tasks:
            s = self.sums[task.name]
            metrics: dict[str, float] = {"count": s.count, "loss": s.loss_sum / s.count if s.count else float("nan")}
            if task.kind == "regression":  # NaN without labels, as for classification: never a perfect score
                labelled = s.count or float("nan")
                metrics |= {
                    "mae": s.abs_error_sum / labelled,
                    "rmse": (s.squared_error_sum / labelled) ** 0.5,
                    "cs5": s.within_threshold / labelled,
                }
            else:
                metrics |= classification_metrics(s.confusion)
            result[task.name] = metrics
        return result


def _empty_confusion(task: TaskSpec) -> torch.Tensor | None:
    if task.kind == "regression":
        return None
    return torch.zeros(len(task.classes), len(task.classes), dtype=torch.float64)


def classification_metrics(confusion: torch.Tensor) -> dict[str, float]:
    """Accuracy and balanced accuracy (mean recall over the classes that occur) from a confusion matrix."""
    total = float(confusion.sum())
    correct = float(confusion.diagonal().sum())
    support = confusion.sum(dim=1)
    recalls = confusion.diagonal()[support > 0] / support[support > 0]
    return {
        "accuracy": correct / total if total else float("nan"),
        "balanced_accuracy": float(recalls.mean()) if len(recalls) else float("nan"),
    }


def per_class_accuracy(confusion: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    support = confusion.sum(dim=1)
    return {name: float(confusion[i, i] / support[i]) if support[i] else float("nan") for i, name in enumerate(classes)}


def normalized_score(task: TaskSpec, metrics: Mapping[str, float], age_scale: float = 10.0) -> float:
    """One number in [0, 1] per task, higher is better: accuracy, or ``age_scale / (age_scale + MAE)`` for age.

    The age score is 1 at MAE 0, 0.5 at MAE = ``age_scale`` years and falls smoothly after that, so that
    every MAE still ranks the trials (``1 - MAE/scale`` would be 0 for all of an early search's MAEs).
    """
    if task.kind == "regression":
        return age_scale / (age_scale + metrics["mae"])
    return metrics["accuracy"]


def delta_m(model: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """Δm in percent: the mean over tasks of the model's relative improvement over a baseline on each task's
    main metric (Maninis et al. 2019), signed so that a lower MAE counts as an improvement.

    ``model`` and ``baseline`` map task names to that metric (MAE for age, accuracy otherwise); the tasks of
    ``baseline`` are compared.
    """
    if not baseline:
        raise ValueError("Δm needs at least one baseline task")
    improvements = []
    for task, reference in baseline.items():
        sign = -1.0 if get_task(task).kind == "regression" else 1.0
        improvements.append(sign * (model[task] - reference) / reference)
    return 100.0 * sum(improvements) / len(improvements)


def chance_level(task: TaskSpec, train_labels: Sequence[float], eval_labels: Sequence[float]) -> float:
    """What a model that ignores the image scores: the most frequent training class's accuracy, or the
    MAE of always predicting the mean training age. The bar a trained model must clear."""
    if not eval_labels:
        return float("nan")
    if task.kind == "regression":
        mean = sum(train_labels) / len(train_labels)
        return sum(abs(value - mean) for value in eval_labels) / len(eval_labels)
    majority = max(set(train_labels), key=list(train_labels).count)
    return sum(value == majority for value in eval_labels) / len(eval_labels)
