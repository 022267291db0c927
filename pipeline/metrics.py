"""Per-task metrics kept as sums and counts, so that ranks can add them up with one all-reduce.

For every task: summed loss and labelled count; classification adds a confusion matrix (accuracy,
balanced accuracy, per-class accuracy follow from it); regression (age) adds summed absolute and
squared errors in years and the count within 5 years (cumulative score CS(5)); landmarks add summed absolute
coordinate errors (MAE in units of the crop side) and summed per-face NME (:func:`normalised_mean_errors`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from pipeline.schema import TaskSpec, get_task

CS_THRESHOLD_YEARS = 5.0
NME_SCALE = 0.1  # an NME of 10 % of the inter-ocular distance scores 0.5 (normalized_score)


@dataclass
class TaskSums:
    """Everything needed for one task's metrics; ``confusion[true, predicted]`` for classification."""

    loss_sum: float = 0.0
    count: int = 0
    confusion: torch.Tensor | None = None
    abs_error_sum: float = 0.0
    squared_error_sum: float = 0.0
    within_threshold: int = 0
    coordinate_count: int = 0  # landmarks: labelled coordinates (2K per labelled face)
    nme_sum: float = 0.0  # landmarks: per-face normalised mean errors, summed


def interocular_points(task: TaskSpec) -> tuple[int, int] | None:
    """Indices of the eye points whose distance normalises NME: ``left_eye`` and ``right_eye`` (or names that
    contain left/right and eye), or None when the task has no such pair."""
    for left, name in enumerate(task.points):
        if "eye" in name.lower() and "left" in name.lower():
            right_name = name.lower().replace("left", "right")
            for right, other in enumerate(task.points):
                if other.lower() == right_name:
                    return left, right
    return None


def normalised_mean_errors(predicted: torch.Tensor, target: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    """Per face (N,): the mean Euclidean point error divided by the true inter-ocular distance (NME); in units
    of the crop side for a task without eye points. ``predicted`` and ``target`` are (N, 2K) ``x0, y0, ...``."""
    predicted_points = predicted.double().reshape(len(predicted), -1, 2)
    target_points = target.double().reshape(len(target), -1, 2)
    point_errors = (predicted_points - target_points).norm(dim=2).mean(dim=1)
    eyes = interocular_points(task)
    if eyes is None:
        return point_errors
    interocular = (target_points[:, eyes[0]] - target_points[:, eyes[1]]).norm(dim=1)
    return point_errors / interocular.clamp_min(1e-6)


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
        """``predicted``: class indices, ages in years or (N, 2K) coordinates for the labelled rows;
        ``target`` likewise."""
        sums = self.sums[task.name]
        added = prediction_sums(task, predicted, target).cpu()
        abs_error, squared_error, within, coordinates, nme = added[:5].tolist()
        sums.abs_error_sum += abs_error
        sums.squared_error_sum += squared_error
        sums.within_threshold += int(round(within))
        sums.coordinate_count += int(round(coordinates))
        sums.nme_sum += nme
        if sums.confusion is not None:
            sums.confusion += added[5:].view_as(sums.confusion)

    def as_tensor(self) -> torch.Tensor:
        """Every task's sums in one float64 tensor: per task loss sum, count, then :func:`prediction_sums`'s."""
        parts = []
        for task in self.tasks:
            s = self.sums[task.name]
            parts.append(torch.tensor([s.loss_sum, s.count, s.abs_error_sum, s.squared_error_sum, s.within_threshold,
                                       s.coordinate_count, s.nme_sum], dtype=torch.float64))
            if s.confusion is not None:
                parts.append(s.confusion.flatten())
        return torch.cat(parts)

    def load_tensor(self, flat: torch.Tensor) -> None:
        """Replace the sums by ``flat`` (e.g. after an all-reduce of :meth:`as_tensor`)."""
        flat = flat.double().cpu()
        offset = 0
        for task in self.tasks:
            s = self.sums[task.name]
            s.loss_sum, count, s.abs_error_sum, s.squared_error_sum, within, coordinates, s.nme_sum = \
                flat[offset : offset + 7].tolist()
            s.count, s.within_threshold, s.coordinate_count = \
                int(round(count)), int(round(within)), int(round(coordinates))
            offset += 7
            if s.confusion is not None:
                size = s.confusion.numel()
                s.confusion = flat[offset : offset + size].view_as(s.confusion).clone()
                offset += size

    def summary(self) -> dict[str, dict[str, float]]:
        """task -> {loss, count, accuracy, balanced_accuracy}, {loss, count, mae, rmse, cs5} or
        {loss, count, nme, mae}."""
        result = {}
        for task in self.tasks:
            s = self.sums[task.name]
            metrics: dict[str, float] = {"count": s.count, "loss": s.loss_sum / s.count if s.count else float("nan")}
            if task.kind == "landmarks":
                metrics |= {"nme": s.nme_sum / (s.count or float("nan")),
                            "mae": s.abs_error_sum / (s.coordinate_count or float("nan"))}
            elif task.kind == "regression":  # NaN without labels, as for classification: never a perfect score
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


def prediction_sums(task: TaskSpec, predicted: torch.Tensor, target: torch.Tensor,
                    labelled: torch.Tensor | None = None) -> torch.Tensor:
    """What predictions add to a task's sums, in :meth:`MetricSums.as_tensor`'s order after loss sum and count:
    absolute and squared error sums, count within ``CS_THRESHOLD_YEARS``, coordinate count, NME sum, then a
    classification task's confusion matrix; float64 on the device of ``target``.

    ``predicted`` and ``target`` as for :meth:`MetricSums.add_predictions`; with ``labelled`` (N,) bool only those
    rows count, whatever the others hold (NaN included). Computed on every row and masked, never on the rows picked
    out, and nothing is read on the host: a batch's metrics never wait for the device."""
    rows = torch.ones(len(target), dtype=torch.bool, device=target.device) if labelled is None else labelled
    zero = torch.zeros((), dtype=torch.float64, device=target.device)
    abs_error = squared_error = within = coordinates = nme = zero
    confusion = []
    if task.kind == "landmarks":
        abs_error = torch.where(rows[:, None], (predicted.double() - target.double()).abs(), 0.0).sum()
        coordinates = rows.double().sum() * target.shape[1]
        nme = torch.where(rows, normalised_mean_errors(predicted, target, task), 0.0).sum()
    elif task.kind == "regression":
        error = torch.where(rows, (predicted.double() - target.double()).abs(), 0.0)
        abs_error, squared_error = error.sum(), (error**2).sum()
        within = (rows & (error <= CS_THRESHOLD_YEARS)).double().sum()
    else:
        size = len(task.classes)
        cells = torch.where(rows, target, 0).long() * size + torch.where(rows, predicted, 0).long()
        confusion = [zero.new_zeros(size * size).index_add_(0, cells, rows.double())]
    return torch.cat([torch.stack([abs_error, squared_error, within, coordinates, nme]), *confusion])


def _empty_confusion(task: TaskSpec) -> torch.Tensor | None:
    if task.kind in ("regression", "landmarks"):
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
    Landmarks score ``NME_SCALE / (NME_SCALE + NME)`` likewise.
    """
    if task.kind == "landmarks":
        return NME_SCALE / (NME_SCALE + metrics["nme"])
    if task.kind == "regression":
        return age_scale / (age_scale + metrics["mae"])
    return metrics["accuracy"]


def relative_improvement(value: float, baseline: float, lower_is_better: bool) -> float:
    """(-1)^l (value - baseline) / baseline x 100: positive when ``value`` is the better one; NaN (undefined)
    for a baseline of 0, e.g. a single-task model that got no validation sample right."""
    if baseline == 0:
        return math.nan
    sign = -1.0 if lower_is_better else 1.0
    return sign * (value - baseline) / baseline * 100.0


def delta_m(model: Mapping[str, float], baseline: Mapping[str, float]) -> float:
    """Δm in percent: the mean over tasks of the model's relative improvement over a baseline on each task's
    main metric (Maninis et al. 2019), signed so that a lower MAE counts as an improvement; NaN when it is
    undefined for a task.

    ``model`` and ``baseline`` map task names to that metric (MAE for age, NME for landmarks, accuracy
    otherwise); the tasks of ``baseline`` are compared.
    """
    if not baseline:
        raise ValueError("Δm needs at least one baseline task")
    return statistics.fmean(relative_improvement(model[task], reference, get_task(task).lower_is_better)
                            for task, reference in baseline.items())


def chance_level(task: TaskSpec, train_labels: Sequence, eval_labels: Sequence) -> float:
    """What a model that ignores the image scores: the most frequent training class's accuracy, the MAE of
    always predicting the mean training age, or the NME of always predicting the mean training landmarks.
    The bar a trained model must clear."""
    if not eval_labels:
        return float("nan")
    if task.kind == "landmarks":
        mean_points = torch.tensor(train_labels, dtype=torch.float64).mean(dim=0)
        target = torch.tensor(eval_labels, dtype=torch.float64)
        return float(normalised_mean_errors(mean_points.expand_as(target), target, task).mean())
    if task.kind == "regression":
        mean = sum(train_labels) / len(train_labels)
        return sum(abs(value - mean) for value in eval_labels) / len(eval_labels)
    majority = max(set(train_labels), key=list(train_labels).count)
    return sum(value == majority for value in eval_labels) / len(eval_labels)
