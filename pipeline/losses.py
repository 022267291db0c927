"""Per-task losses over the labelled rows of a batch, and the strategies that weight them into one loss.

Task losses (thesis 3.3): cross-entropy for classification (BCE-with-logits for a one-logit binary
head), mean squared (or absolute) error for regression with target and prediction divided by
``age_scale``, so that the age loss is of the order of the classification losses (thesis 3.3.2).

Weighting strategies (thesis 3.4 and baselines) follow LibMTL: each is one small :class:`LossWeighting`
subclass, registered by name in :data:`WEIGHTINGS`; :func:`build_weighting` picks one.
"""

from __future__ import annotations

import math
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
    sample in the batch, or frozen) neither adds a term nor changes the weights of the others, and its
    parameters take no part in the graph (no gradient at all).
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

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        """The parameters that belong to ``task`` alone (none for weightings without parameters)."""
        return []

    def freeze_task(self, task: str) -> None:
        """``task`` has stopped training (Early Freeze / Early Stop): its parameters stop training too."""
        for parameter in self.task_parameters(task):
            parameter.requires_grad_(False)

    def is_frozen(self, task: str) -> bool:
        return any(not parameter.requires_grad for parameter in self.task_parameters(task))

    def check_tasks(self, task_losses: Mapping[str, Tensor]) -> None:
        """An unknown task is an error."""
        unknown = [task for task in task_losses if task not in self.task_names]
        if unknown:
            raise KeyError(f"losses for unknown tasks {unknown}; the weighting knows {list(self.task_names)}")


class ConstantWeighting(LossWeighting):
    """Fixed weights: total = sum of weight * loss over the present tasks with a non-zero weight."""

    def __init__(self, task_names: Sequence[str], weight_by_task: Mapping[str, float]) -> None:
        super().__init__(task_names)
        self.weight_by_task = {task: float(weight_by_task.get(task, 0.0)) for task in self.task_names}

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        self.check_tasks(task_losses)
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


class PerTaskParameterWeighting(LossWeighting):
    """A weighting with one learnable scalar per task, kept apart so that a task's scalar can be frozen,
    dropped from the optimizer and left out of the graph when the task is absent."""

    def __init__(self, task_names: Sequence[str], attribute: str, initial: Tensor) -> None:
        super().__init__(task_names)
        self._attribute = attribute
        setattr(self, attribute, nn.ParameterDict(
            {task: nn.Parameter(value.clone()) for task, value in zip(self.task_names, initial)}))

    @property
    def scalars(self) -> nn.ParameterDict:
        return getattr(self, self._attribute)

    def task_parameters(self, task: str) -> list[nn.Parameter]:
        return [self.scalars[task]]

    def present_scalars(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        """The present tasks' scalars, stacked in the order of ``task_losses``."""
        self.check_tasks(task_losses)
        return torch.stack([self.scalars[task] for task in task_losses])

    def training_tasks(self) -> list[str]:
        return [task for task in self.task_names if not self.is_frozen(task)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # Checkpoints of earlier versions hold one vector for all tasks under the same name.
        legacy = state_dict.pop(f"{prefix}{self._attribute}", None)
        if legacy is not None and legacy.shape == (len(self.task_names),):
            for task, value in zip(self.task_names, legacy):
                state_dict[f"{prefix}{self._attribute}.{task}"] = value.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


class LearnedWeighting(PerTaskParameterWeighting):
    """The thesis' loss weight layer (eq. 3.5): L = sum_i w_i L_i + lam * ||w||^2, with w >= 0, sum w = 1.

    The thesis does not say how the constraint is kept while w is learned; here w = softmax(theta) over
    the tasks present in the call (the tasks that are training), which satisfies it exactly at every step
    and is differentiable, so theta is trained by backprop with the network. The regulariser is over the
    same weights. A frozen or absent task's theta takes no part: with a softmax over all tasks, the
    gradient on an absent task's logit, -w_j * sum_present w_i L_i, is negative, and descent would move
    the weight onto tasks that no longer train. theta starts random (torch's RNG), near uniform.
    """

    def __init__(self, task_names: Sequence[str], lam: float = 0.1) -> None:
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        # Small random logits: a random point of the simplex near uniform, so no task starts starved.
        super().__init__(task_names, "logits", 0.1 * torch.randn(len(task_names)))
        self.lam = float(lam)

    def task_weights(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        """w = softmax(theta) over the tasks of ``task_losses``, in their order; differentiable."""
        return torch.softmax(self.present_scalars(task_losses), dim=0)

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        if not task_losses:
            return self.zero.clone()
        task_weights = self.task_weights(task_losses)
        losses = torch.stack(list(task_losses.values()))
        return (task_weights * losses).sum() + self.lam * task_weights.square().sum()

    def weights(self) -> dict[str, float]:
        """The weights of the training tasks when all are present; 0 for a frozen task (it has no loss term)."""
        training = self.training_tasks()
        weight_by_task = dict.fromkeys(self.task_names, 0.0)
        if training:
            logits = torch.stack([self.scalars[task].detach() for task in training])
            weight_by_task |= dict(zip(training, torch.softmax(logits, dim=0).tolist()))
        return weight_by_task


class UncertaintyWeighting(PerTaskParameterWeighting):
    """Kendall, Gal & Cipolla (2018), as LibMTL's UW: L = sum_i L_i / (2 exp(s_i)) + s_i / 2.

    s_i is a learnable log-variance per task, starting at 0 (weight 1/2). An absent task contributes
    neither term: s_i / 2 alone would drive its s_i down without bound.
    """

    def __init__(self, task_names: Sequence[str]) -> None:
        super().__init__(task_names, "log_variances", torch.zeros(len(task_names)))

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        if not task_losses:
            return self.zero.clone()
        log_variances = self.present_scalars(task_losses)
        losses = torch.stack(list(task_losses.values()))
        return (losses / (2 * log_variances.exp()) + log_variances / 2).sum()

    def weights(self) -> dict[str, float]:
        """1 / (2 exp(s_i)) of each training task; 0 for a frozen task."""
        training = set(self.training_tasks())
        return {task: 1 / (2 * math.exp(self.scalars[task].item())) if task in training else 0.0 for task in self.task_names}


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
