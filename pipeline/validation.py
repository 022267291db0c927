"""One pass over a validation (or test) split: per-task losses and metrics, all-reduced over the ranks;
and the one line per epoch that training prints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import TrainConfig
from pipeline.data import normalize_images
from pipeline.metrics import MetricSums
from pipeline.model import MultiTaskNet
from pipeline.progress import epoch_progress
from pipeline.schema import TaskSpec, label_slices
from pipeline.task_losses import masked_task_losses, predict_age

if TYPE_CHECKING:
    from pipeline.loop import WorkerContext


@torch.no_grad()
def evaluate_split(
    net: MultiTaskNet, loader, tasks: Sequence[TaskSpec], context: "WorkerContext", config: TrainConfig
) -> dict[str, dict[str, float]]:
    """Per-task loss and metrics over a whole split, summed on every rank and all-reduced."""
    net.eval()
    sums = MetricSums(tasks)
    samples = getattr(getattr(loader, "dataset", None), "num_samples", 0)
    progress = epoch_progress(context, math.ceil(samples / (config.data.batch_size * context.world_size)),
                              config.data.batch_size, "validation")
    for batch in loader:
        if progress is not None:
            progress.update(batch["images"].shape[0] * context.world_size)
        images = normalize_images(batch["images"].to(context.device), config.model.channels_last)
        labels, mask = batch["labels"].to(context.device), batch["mask"].to(context.device)
        outputs = net(images)
        losses = masked_task_losses(outputs, labels, mask, tasks, config.loss.age_scale, config.loss.regression_loss)
        counts = {t: int(mask[:, i].sum()) for i, t in enumerate(net.task_names)}
        sums.add_losses(losses, counts)
        for index, (task, columns) in enumerate(zip(tasks, label_slices(tasks))):
            rows = mask[:, index]
            if not rows.any():
                continue
            output = outputs[task.name][rows].float()
            target = labels[rows, columns].cpu()
            if task.kind == "landmarks":
                sums.add_predictions(task, output.cpu(), target)
                continue
            if task.kind == "regression":
                predicted = predict_age(output, config.loss.age_scale)
            elif output.shape[1] == 1:
                predicted = (output[:, 0] > 0).long()
            else:
                predicted = output.argmax(dim=1)
            sums.add_predictions(task, predicted.cpu(), target[:, 0])
    sums.load_tensor(context.all_reduce_sum(sums.as_tensor()))
    return sums.summary()


# Above this many classification tasks the epoch line gives their mean accuracy, not one figure each.
CLASSIFICATION_TASKS_LISTED = 8


def format_epoch_line(metrics: dict[str, Any], tasks: Sequence[TaskSpec]) -> str:
    parts = [f"epoch {metrics['epoch']:>3}", f"train {metrics['train/total_loss']:.3f}", f"val {metrics['val/total_loss']:.3f}"]
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
