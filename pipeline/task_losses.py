"""Per-task losses over the labelled rows of a batch (thesis 3.3), and the predictions they imply.

Cross-entropy for classification (BCE-with-logits for a one-logit binary head), mean squared (or
absolute) error for regression with target and prediction divided by ``age_scale``, so that the age loss
is of the order of the classification losses (thesis 3.3.2); mean absolute error over the landmark
coordinates in percent of the crop side (``LANDMARK_LOSS_SCALE``) for the same reason. How they are
weighted into one loss is :mod:`pipeline.losses`.

Losses are computed on every row and masked, never on the rows picked out by the mask: picking rows
(``x[mask]``) or asking whether any is labelled makes the host wait for the device, a stall per task on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.schema import TaskSpec, label_slices

# Plain means over the labelled rows. The thesis' eq. 3.2 halves the squared error; that factor only
# scales the age loss (and its gradient) by 0.5, which a weighting absorbs, so torch's MSE is used as is.
REGRESSION_LOSSES: dict[str, Callable[..., Tensor]] = {"mse": F.mse_loss, "l1": F.l1_loss}
# Landmark errors in percent of the crop side: at chance ~4 (a face is placed within a few per cent), so that one
# landmarks task weighs about as much as a handful of binary attributes (0.69 each at chance) among 40 of them.
LANDMARK_LOSS_SCALE = 100.0


def masked_task_losses(
    outputs: Mapping[str, Tensor],
    labels: Tensor,
    mask: Tensor,
    tasks: Sequence[TaskSpec],
    age_scale: float = 100.0,
    regression_loss: str = "mse",
    labelled_tasks: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """Task -> mean loss over the rows labelled for that task (:func:`all_task_losses`); a task without a labelled
    row is absent.

    Which tasks are present is a host decision (a weighting leaves an absent task out of the graph, the loop counts
    each task's batches): ``labelled_tasks`` when the caller has it from the loader's CPU mask
    (:func:`labelled_task_names`), and then nothing waits for the device; else it is read from ``mask``, one sync
    per call where ``mask`` is on an accelerator.
    """
    losses = all_task_losses(outputs, labels, mask, tasks, age_scale, regression_loss)
    if labelled_tasks is None:
        labelled_tasks = labelled_task_names(mask, tasks)
    return {task: loss for task, loss in losses.items() if task in labelled_tasks}


def labelled_task_names(mask: Tensor, tasks: Sequence[TaskSpec]) -> list[str]:
    """The tasks with at least one labelled row in ``mask`` (N, T); read on the host."""
    return [task.name for task, labelled in zip(tasks, mask.any(dim=0).tolist()) if labelled]


def all_task_losses(
    outputs: Mapping[str, Tensor],
    labels: Tensor,
    mask: Tensor,
    tasks: Sequence[TaskSpec],
    age_scale: float = 100.0,
    regression_loss: str = "mse",
) -> dict[str, Tensor]:
    """Task -> mean loss over its labelled rows, for every task: exactly 0, with a zero gradient, for a task
    without a labelled row. Reads no value on the host, so it never waits for the device.

    ``labels`` (N, C) float holds each task's label in its columns (:func:`pipeline.schema.label_slices`:
    one column, a class index or a value in years, or 2K landmark coordinates); ``mask`` (N, T) bool is
    True where task j's label exists. Unlabelled cells, and the outputs of unlabelled rows, enter neither the
    loss nor its gradient, so they may hold anything (NaN included). Losses are computed in float32.
    """
    if regression_loss not in REGRESSION_LOSSES:
        raise ValueError(f"unknown regression loss {regression_loss!r}; known: {', '.join(REGRESSION_LOSSES)}")
    slices = label_slices(tasks)
    width = slices[-1].stop if slices else 0
    if mask.shape[1] != len(tasks) or labels.shape != (mask.shape[0], width):
        raise ValueError(f"labels {tuple(labels.shape)} must be (N, {width}) and mask {tuple(mask.shape)} "
                         f"(N, {len(tasks)}) for tasks {', '.join(t.name for t in tasks)}")
    losses = {}
    for column, (task, columns) in enumerate(zip(tasks, slices)):
        rows = mask[:, column]
        # Unlabelled rows get output 0 and target 0: a finite loss there (a NaN class index would not even be
        # one), and the where's backward gives their outputs an exact zero gradient.
        output = torch.where(rows[:, None], outputs[task.name].float(), 0.0)
        target = torch.where(rows[:, None], labels[:, columns].float(), 0.0)
        if task.kind == "landmarks":
            row_losses = F.l1_loss(output, target, reduction="none").mean(dim=1) * LANDMARK_LOSS_SCALE
        elif task.kind == "regression":
            row_losses = REGRESSION_LOSSES[regression_loss](output[:, 0], target[:, 0] / age_scale, reduction="none")
        else:
            row_losses = classification_row_losses(output, target[:, 0])
        losses[task.name] = (row_losses * rows).sum() / rows.sum().clamp(min=1)
    return losses


def classification_row_losses(logits: Tensor, class_index: Tensor) -> Tensor:
    """Cross-entropy of each row; a one-column ``logits`` is a binary head scored with BCE-with-logits."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], class_index, reduction="none")
    return F.cross_entropy(logits, class_index.long(), reduction="none")


def predict_age(output: Tensor, age_scale: float = 100.0) -> Tensor:
    """Ages in years, shape (N,), from a regression head's (N, 1) output in scaled units."""
    return output[:, 0] * age_scale
