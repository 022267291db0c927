"""Per-task losses over the labelled rows of a batch, and the strategies that weight them into one loss.

Task losses (thesis 3.3): cross-entropy for classification (BCE-with-logits for a one-logit binary
head), mean squared (or absolute) error for regression with target and prediction divided by
``age_scale``, so that the age loss is of the order of the classification losses (thesis 3.3.2).

Weighting strategies (thesis 3.4 and baselines) follow LibMTL: each is one small :class:`LossWeighting`
subclass, registered by name in :data:`WEIGHTINGS`; :func:`build_weighting` picks one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.schema import TaskSpec

# Plain means over the labelled rows. The thesis' eq. 3.2 halves the squared error; that factor only
# scales the age loss (and its gradient) by 0.5, which a weighting absorbs, so torch's MSE is used as is.
REGRESSION_LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"mse": F.mse_loss, "l1": F.l1_loss}


# ---------------------------------------------------------------- task losses


def masked_task_losses(
    outputs: Mapping[str, Tensor],
    labels: Tensor,
    mask: Tensor,
    tasks: Sequence[TaskSpec],
    age_scale: float = 100.0,
    regression_loss: str = "mse",
) -> dict[str, Tensor]:
    """Task -> mean loss over the rows labelled for that task; a task without a labelled row is absent.

    ``labels`` (N, T) float holds column j for ``tasks[j]`` (class index, or value in years for
    regression); ``mask`` (N, T) bool is True where the label exists. Unlabelled cells are never read,
    so they may hold anything (NaN included). Losses are computed in float32.
    """
    if regression_loss not in REGRESSION_LOSSES:
        raise ValueError(f"unknown regression loss {regression_loss!r}; known: {', '.join(REGRESSION_LOSSES)}")
    if labels.shape != mask.shape or labels.shape[1] != len(tasks):
        raise ValueError(f"labels {tuple(labels.shape)} and mask {tuple(mask.shape)} must both be (N, {len(tasks)})")
    losses = {}
    for column, task in enumerate(tasks):
        rows = mask[:, column]
        if not rows.any():
            continue
        output, target = outputs[task.name][rows].float(), labels[rows, column].float()
        if task.kind == "regression":
            losses[task.name] = REGRESSION_LOSSES[regression_loss](output[:, 0], target / age_scale)
        else:
            losses[task.name] = classification_loss(output, target)
    return losses


def classification_loss(logits: Tensor, class_index: Tensor) -> Tensor:
    """Mean cross-entropy; a one-column ``logits`` is a binary head scored with BCE-with-logits."""
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits[:, 0], class_index)
    return F.cross_entropy(logits, class_index.long())


def predict_age(output: Tensor, age_scale: float = 100.0) -> Tensor:
    """Ages in years, shape (N,), from a regression head's (N, 1) output in scaled units."""
    return output[:, 0] * age_scale


# ---------------------------------------------------------------- weighting strategies


class LossWeighting(nn.Module):
    """Combines per-task losses into the loss to backpropagate; learnable weightings hold ``nn.Parameter``s.

    Only tasks present in ``task_losses`` contribute to :meth:`combine`; an absent task (no labelled
    sample in the batch, or frozen) neither adds a term nor changes the weights of the others.
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__()
        if not task_names:
            raise ValueError("a loss weighting needs at least one task")
        self.task_names: tuple[str, ...] = tuple(task_names)
        # The device and dtype of an empty sum, for weightings without parameters.
        self.register_buffer("zero", torch.zeros(()), persistent=False)

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        """The total loss (a scalar tensor) from the losses of the tasks present."""
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Current weight of every task, for logging."""
        raise NotImplementedError

    def task_positions(self, task_losses: Mapping[str, Tensor]) -> list[int]:
        """Index in ``task_names`` of every task in ``task_losses``; an unknown task is an error."""
        unknown = [task for task in task_losses if task not in self.task_names]
        if unknown:
            raise KeyError(f"losses for unknown tasks {unknown}; the weighting knows {list(self.task_names)}")
        return [self.task_names.index(task) for task in task_losses]


class ConstantWeighting(LossWeighting):
    """Fixed weights: total = sum of weight * loss over the present tasks with a non-zero weight."""

    def __init__(self, task_names: Sequence[str], weight_by_task: Mapping[str, float]) -> None:
        super().__init__(task_names)
        self.weight_by_task = {task: float(weight_by_task.get(task, 0.0)) for task in self.task_names}

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        self.task_positions(task_losses)
        total = self.zero.clone()
        for task, loss in task_losses.items():
            # Zero-weight tasks are skipped, not multiplied by 0, so that one-hot weights give exactly
            # the single task's loss, even when another task's loss is inf or NaN.
            if self.weight_by_task[task] != 0.0:
                total = total + self.weight_by_task[task] * loss
        return total

    def weights(self) -> dict[str, float]:
        return dict(self.weight_by_task)


class EqualWeighting(ConstantWeighting):
    """The thesis' "average loss": 1/T for each of all T tasks, present in the batch or not."""

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__(task_names, {task: 1.0 / len(task_names) for task in task_names})


class FixedWeighting(ConstantWeighting):
    """Weights given by hand (``weights``); unnamed tasks get 0. One-hot weights = a single-task baseline."""

    def __init__(self, task_names: Sequence[str], weights: Mapping[str, float]) -> None:
        unknown = sorted(set(weights) - set(task_names))
        if unknown:
            raise ValueError(f"fixed weights name unknown tasks {unknown}; tasks are {list(task_names)}")
        negative = sorted(task for task, weight in weights.items() if weight < 0)
        if negative:
            raise ValueError(f"fixed weights must be >= 0; negative for {negative}")
        if not any(weight > 0 for weight in weights.values()):
            raise ValueError(f"fixed weighting needs a positive weight for at least one of {list(task_names)}")
        super().__init__(task_names, weights)


class LearnedWeighting(LossWeighting):
    """The thesis' loss weight layer (eq. 3.5): L = sum_i w_i L_i + lam * ||w||^2, with w >= 0, sum w = 1.

    The thesis does not say how the constraint is kept while w is learned; here w = softmax(theta),
    which satisfies it exactly at every step and is differentiable, so theta is trained by backprop
    with the network. theta starts random (torch's RNG), so the weights start as a random point of the
    simplex. Minimising sum w_i L_i alone moves weight toward the smallest loss; lam * ||w||^2, smallest
    at the uniform weights, pulls back toward them. The regulariser applies whichever tasks are present.
    """

    def __init__(self, task_names: Sequence[str], lam: float = 0.1) -> None:
        super().__init__(task_names)
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        self.lam = float(lam)
        # Small random logits: a random point of the simplex near uniform, so no task starts starved.
        self.logits = nn.Parameter(0.1 * torch.randn(len(self.task_names)))

    def task_weights(self) -> Tensor:
        """w = softmax(theta), differentiable."""
        return torch.softmax(self.logits, dim=0)

    def regulariser(self, task_weights: Tensor) -> Tensor:
        """lam * ||w||^2."""
        return self.lam * task_weights.square().sum()

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        task_weights = self.task_weights()
        total = self.regulariser(task_weights)
        if task_losses:
            present = torch.tensor(self.task_positions(task_losses), device=task_weights.device)
            total = total + (task_weights[present] * torch.stack(list(task_losses.values()))).sum()
        return total

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, self.task_weights().detach().tolist()))


class UncertaintyWeighting(LossWeighting):
    """Kendall, Gal & Cipolla (2018), as LibMTL's UW: L = sum_i L_i / (2 exp(s_i)) + s_i / 2.

    s_i is a learnable log-variance per task, starting at 0 (weight 1/2). An absent task contributes
    neither term: s_i / 2 alone would drive its s_i down without bound.
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__(task_names)
        self.log_variances = nn.Parameter(torch.zeros(len(self.task_names)))

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        if not task_losses:
            return self.log_variances.sum() * 0.0
        present = torch.tensor(self.task_positions(task_losses), device=self.log_variances.device)
        log_variances = self.log_variances[present]
        losses = torch.stack(list(task_losses.values()))
        return (losses / (2 * log_variances.exp()) + log_variances / 2).sum()

    def weights(self) -> dict[str, float]:
        return dict(zip(self.task_names, (1 / (2 * self.log_variances.detach().exp())).tolist()))


WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "learned": LearnedWeighting,
    "equal": EqualWeighting,
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
}


def build_weighting(name: str, task_names: Sequence[str], **options: object) -> LossWeighting:
    """The weighting registered as ``name`` over ``task_names``, with its ``options`` (e.g. ``lam``, ``weights``)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; known: {', '.join(WEIGHTINGS)}")
    try:
        return WEIGHTINGS[name](task_names, **options)
    except TypeError as error:
        raise ValueError(f"bad options {sorted(options)} for loss weighting {name!r}: {error}") from None
