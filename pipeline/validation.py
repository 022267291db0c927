"""One pass over a validation (or test) split: per-task losses and metrics, all-reduced over the ranks;
and the one line per epoch that training prints."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import TrainConfig
from pipeline.data import normalize_images
from pipeline.metrics import MetricSums, prediction_sums
from pipeline.model import MultiTaskNet
from pipeline.progress import epoch_progress
from pipeline.schema import TaskSpec, label_slices
from pipeline.task_losses import all_task_losses, predict_age

if TYPE_CHECKING:
    from pipeline.loop import WorkerContext


@torch.no_grad()
def evaluate_split(
    net: MultiTaskNet, loader, tasks: Sequence[TaskSpec], context: "WorkerContext", config: TrainConfig
) -> dict[str, dict[str, float]]:
    """Per-task loss and metrics over a whole split, summed on every rank and all-reduced.

    The sums stay on the device until the split is done (:func:`batch_metric_sums`): the host reads them once,
    and no batch waits for the device."""
    net.eval()
    sums = MetricSums(tasks)
    samples = getattr(getattr(loader, "dataset", None), "num_samples", 0)
    progress = epoch_progress(context, math.ceil(samples / (config.data.batch_size * context.world_size)),
                              config.data.batch_size, "validation")
    totals = sums.as_tensor().to(context.device)
    for batch in loader:
        if progress is not None:
            progress.update(batch["images"].shape[0] * context.world_size)
        images = normalize_images(batch["images"].to(context.device, non_blocking=True), config.model.channels_last)
        labels = batch["labels"].to(context.device, non_blocking=True)
        mask = batch["mask"].to(context.device, non_blocking=True)
        totals += batch_metric_sums(net(images), labels, mask, tasks, config.loss.age_scale,
                                    config.loss.regression_loss)
    sums.load_tensor(context.all_reduce_sum(totals))
    return sums.summary()


def batch_metric_sums(outputs: Mapping[str, torch.Tensor], labels: torch.Tensor, mask: torch.Tensor,
                      tasks: Sequence[TaskSpec], age_scale: float = 100.0, regression_loss: str = "mse",
                      ) -> torch.Tensor:
    """One batch's :meth:`MetricSums.as_tensor`, float64 where the outputs are, without reading a value on the host.

    Per task: its mean loss over the labelled rows (:func:`all_task_losses`, 0 without any) times their count, the
    count, and :func:`prediction_sums` of the predictions on every row, the unlabelled ones masked out."""
    losses = all_task_losses(outputs, labels, mask, tasks, age_scale, regression_loss)
    counts = mask.double().sum(dim=0)
    parts = []
    for index, (task, columns) in enumerate(zip(tasks, label_slices(tasks))):
        output, target = outputs[task.name].float(), labels[:, columns]
        if task.kind == "landmarks":
            predicted = output
        elif task.kind == "regression":
            predicted, target = predict_age(output, age_scale), target[:, 0]
        elif output.shape[1] == 1:
            predicted, target = (output[:, 0] > 0).long(), target[:, 0]
        else:
            predicted, target = output.argmax(dim=1), target[:, 0]
        count = counts[index : index + 1]
        parts += [losses[task.name].double() * count, count, prediction_sums(task, predicted, target, mask[:, index])]
    return torch.cat(parts)


# Above this many classification tasks the epoch line gives their mean accuracy, not one figure each.
CLASSIFICATION_TASKS_LISTED = 8


def format_epoch_line(metrics: dict[str, Any], tasks: Sequence[TaskSpec]) -> str:
    parts = [f"epoch {metrics['epoch']:>3}", f"train {metrics['train/total_loss']:.3f}",
             f"val {metrics['val/total_loss']:.3f}"]
    classification = [task for task in tasks if task.kind in ("binary", "multiclass")]
    summarised = len(classification) > CLASSIFICATION_TASKS_LISTED
    for task in tasks:
        if summarised and task in classification:
            continue
        unit, key = {"regression": ("MAE", "mae"), "landmarks": ("NME", "nme")}.get(task.kind, ("acc", "accuracy"))
        parts.append(f"{task.name} {unit} {metrics[f'val/{task.name}/{key}']:.3f}")
    if summarised:
        accuracies = [metrics[f"val/{task.name}/accuracy"] for task in classification]
        parts.append(f"{len(classification)} attributes mean acc {sum(accuracies) / len(accuracies):.3f}")
    parts.append(f"{metrics['train/images_per_s']:.0f} img/s")
    if metrics["freeze/events"]:
        parts.append("freeze " + ", ".join(metrics["freeze/events"]))
    return " | ".join(parts)
