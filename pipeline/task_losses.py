"""Per-task losses over the labelled rows of a batch (thesis 3.3), and the predictions they imply.

Cross-entropy for classification (BCE-with-logits for a one-logit binary head), mean squared (or
absolute) error for regression with target and prediction divided by ``age_scale``, so that the age loss
is of the order of the classification losses (thesis 3.3.2); mean absolute error over the landmark
coordinates in percent of the crop side (``LANDMARK_LOSS_SCALE``) for the same reason. How they are
weighted into one loss is :mod:`pipeline.losses`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor

from pipeline.schema import TaskSpec, label_slices

# Plain means over the labelled rows. The thesis' eq. 3.2 halves the squared error; that factor only
# scales the age loss (and its gradient) by 0.5, which a weighting absorbs, so torch's MSE is used as is.
REGRESSION_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": F.mse_loss, "l1": F.l1_loss}
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
) -> dict[str, Tensor]:
    """Task -> mean loss over the rows labelled for that task; a task without a labelled row is absent.

    ``labels`` (N, C) float holds each task's label in its columns (:func:`pipeline.schema.label_slices`:
    one column, a class index or a value in years, or 2K landmark coordinates); ``mask`` (N, T) bool is
    True where task j's label exists. Unlabelled cells are never read, so they may hold anything (NaN
    included). Losses are computed in float32.
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
        if not rows.any():
            continue
        output, target = outputs[task.name][rows].float(), labels[rows, columns].float()
        if task.kind == "landmarks":
            losses[task.name] = F.l1_loss(output, target) * LANDMARK_LOSS_SCALE
        elif task.kind == "regression":
            losses[task.name] = REGRESSION_LOSSES[regression_loss](output[:, 0], target[:, 0] / age_scale)
        else:
            losses[task.name] = classification_loss(output, target[:, 0])
    return losses


def classification_loss(logits: Tensor, class_index: Tensor) -> Tensor:
    """Mean cross-entropy; a one-column ``logits`` is a binary head scored with BCE-with-logits."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], class_index)
    return F.cross_entropy(logits, class_index.long())


def predict_age(output: Tensor, age_scale: float = 100.0) -> Tensor:
    """Ages in years, shape (N,), from a regression head's (N, 1) output in scaled units."""
    return output[:, 0] * age_scale
