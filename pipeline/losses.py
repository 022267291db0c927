"""The strategies that weight per-task losses into one loss (thesis 3.4 and the baselines).

They follow LibMTL: each is one small :class:`LossWeighting` subclass, registered by name in
:data:`WEIGHTINGS`; :func:`build_weighting` picks one. The per-task losses themselves are
:mod:`pipeline.task_losses`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from pipeline.gradient_weighting import (
    align_principal_components,
    balance_magnitudes,
    moving_averages,
    project_conflicting,
)

ReduceSum = Callable[[Tensor], Tensor]  # sums a tensor over the DDP ranks


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
        # Frozen by the loop (again after a resume), so not part of the state_dict.
        self.frozen_tasks: set[str] = set()

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
        self.frozen_tasks.add(task)
        for parameter in self.task_parameters(task):
            parameter.requires_grad_(False)

    def is_frozen(self, task: str) -> bool:
        return task in self.frozen_tasks

    def training_tasks(self) -> list[str]:
        return [task for task in self.task_names if not self.is_frozen(task)]

    # Hooks for weightings that learn from more than the current losses; the loop calls them, no-ops here.
    # Set by weightings that need :meth:`after_step`: the loop then recomputes the losses after each step.
    needs_losses_after_step = False
    # Set by :class:`GradientWeighting`: the loop combines per-task gradients instead of backpropagating combine.
    gradient_level = False

    def attach_shared_parameters(self, parameters: Sequence[nn.Parameter]) -> None:
        """The network's shared parameters (backbone, shared layers) in order, for weightings that read their
        gradients; called once when network and weighting meet (before any state_dict is loaded)."""

    def end_epoch(self, mean_loss_by_task: Mapping[str, float]) -> None:
        """The epoch's mean training loss of each task (the same on every rank: all-reduced by the caller)."""

    def after_step(self, task_losses_after: Mapping[str, Tensor], reduce_sum: ReduceSum | None = None) -> None:
        """The losses of the batch just trained on, recomputed after the optimizer step.

        ``reduce_sum`` sums a tensor over the ranks (an all-reduce); ``None`` in a single process.
        """

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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints of earlier versions hold one vector for all tasks under the same name.
        legacy = state_dict.pop(f"{prefix}{self._attribute}", None)
        if legacy is not None and legacy.shape == (len(self.task_names),):
            for task, value in zip(self.task_names, legacy):
                state_dict[f"{prefix}{self._attribute}.{task}"] = value.clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


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
        return {task: 1 / (2 * math.exp(self.scalars[task].item())) if task in training else 0.0
                for task in self.task_names}


def weighted_sum(weights: Tensor, task_losses: Mapping[str, Tensor]) -> Tensor:
    """sum_i w_i L_i, with ``weights`` in the order of ``task_losses``."""
    return (weights * torch.stack(list(task_losses.values()))).sum()


class DynamicWeightAverage(LossWeighting):
    """Liu, Johns & Davison (2019), DWA (eq. 7): w_i(t) = K exp(r_i(t-1) / T) / sum_j exp(r_j(t-1) / T).

    r_i(t-1) = L_i(t-1) / L_i(t-2) from the epoch-mean training losses that :meth:`end_epoch` receives; T is
    ``temperature``. A task without two epochs of history has r = 1, so the first two epochs weight every
    task 1, as in the paper (the weights sum to K, where the project's "equal" gives 1/K each).
    Restricted to the present tasks: the softmax runs over the K tasks of the call, so the present weights
    always sum to K; an absent task takes no weight and its history is untouched.
    """

    def __init__(self, task_names: Sequence[str], temperature: float = 2.0) -> None:
        if temperature <= 0:
            raise ValueError(f"DWA temperature must be > 0, got {temperature}")
        super().__init__(task_names)
        self.temperature = float(temperature)
        # L(t-1) and L(t-2) by task; NaN = no mean for that epoch.
        self.register_buffer("last_epoch_losses", torch.full((len(self.task_names),), math.nan))
        self.register_buffer("previous_epoch_losses", torch.full((len(self.task_names),), math.nan))

    def end_epoch(self, mean_loss_by_task: Mapping[str, float]) -> None:
        self.previous_epoch_losses.copy_(self.last_epoch_losses)
        self.last_epoch_losses.copy_(torch.tensor([mean_loss_by_task.get(task, math.nan) for task in self.task_names]))

    def task_weights(self, tasks: Sequence[str]) -> Tensor:
        """K softmax(r / T) over ``tasks``, in their order."""
        # Indexing the buffers by Python ints keeps the step free of host-to-device copies.
        indices = [self.task_names.index(task) for task in tasks]
        ratios = torch.stack([self.last_epoch_losses[i] / self.previous_epoch_losses[i] for i in indices])
        ratios = torch.where(torch.isfinite(ratios), ratios, torch.ones_like(ratios))
        return len(tasks) * torch.softmax(ratios / self.temperature, dim=0)

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        self.check_tasks(task_losses)
        if not task_losses:
            return self.zero.clone()
        return weighted_sum(self.task_weights(list(task_losses)), task_losses)

    def weights(self) -> dict[str, float]:
        """The weights of the training tasks when all are present; 0 for a frozen task."""
        training = self.training_tasks()
        return dict.fromkeys(self.task_names, 0.0) | dict(zip(training, self.task_weights(training).tolist()))


class SeededWeighting(LossWeighting):
    """A weighting that draws random numbers from its own generator, seeded alike on every rank.

    The generator's state is a buffer, refreshed whenever the state_dict is taken and restored on load,
    so a resumed run draws what the uninterrupted one would have.
    """

    def __init__(self, task_names: Sequence[str], seed: int = 0) -> None:
        super().__init__(task_names)
        self.generator = torch.Generator().manual_seed(seed)
        self.register_buffer("generator_state", self.generator.get_state())
        self.register_state_dict_pre_hook(lambda module, prefix, keep_vars: module.save_generator_state())
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module.restore_generator_state())

    def save_generator_state(self) -> None:
        self.generator_state.copy_(self.generator.get_state())

    def restore_generator_state(self) -> None:
        self.generator.set_state(self.generator_state.cpu())


class RandomWeighting(SeededWeighting):
    """Lin et al. (2022), Random Loss Weighting (eq. 3): w = softmax(lambda), lambda ~ N(0, I) drawn every step.

    lambda is drawn for all tasks at every call, present or not, so that ranks seeded alike draw alike
    whatever their batches hold; restricted to the present tasks, the softmax runs over their draws only.
    """

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        self.check_tasks(task_losses)
        draws = torch.randn(len(self.task_names), generator=self.generator)
        if not task_losses:
            return self.zero.clone()
        present_draws = torch.stack([draws[self.task_names.index(task)] for task in task_losses])
        # Python floats: the weights reach the losses' device without a host-to-device copy.
        task_weights = torch.softmax(present_draws, dim=0).tolist()
        total = self.zero.clone()
        for weight, loss in zip(task_weights, task_losses.values()):
            total = total + weight * loss
        return total

    def weights(self) -> dict[str, float]:
        """The expected weight, 1/K over the K training tasks (each step's draw is logged nowhere)."""
        training = self.training_tasks()
        return {task: 1.0 / len(training) if task in training else 0.0 for task in self.task_names}


class FastAdaptiveWeighting(LossWeighting):
    """Liu et al. (2023), FAMO (Algorithm 1): the loss is c sum_i z_i log L_i with z = softmax(xi) and
    c = (sum_i z_i / L_i)^-1 held constant, so the network's gradient is sum_i (c z_i / L_i) grad L_i, a convex
    combination. After the step, :meth:`after_step` takes delta_i = log L_i(before) - log L_i(after) on the
    same batch and moves xi against grad_xi (z . delta) + gamma xi with Adam (lr 0.025, gamma 0.01), as the
    authors' code does: weight flows away from the tasks whose log-loss falls fastest.

    Restricted to the present tasks: z and c are over the tasks of the call; xi is updated over the tasks
    present both before and after the step (under DDP: on any rank, with delta averaged over those ranks),
    with a softmax over them alone; an absent or frozen task's xi and Adam moments are untouched. Losses
    get 1e-8 added before the log, as in the authors' code.
    """

    needs_losses_after_step = True
    EPSILON = 1e-8

    def __init__(self, task_names: Sequence[str], lr: float = 0.025, weight_decay: float = 0.01,
                 betas: tuple[float, float] = (0.9, 0.999)) -> None:
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"FAMO needs lr > 0 and weight_decay >= 0, got lr={lr}, weight_decay={weight_decay}")
        super().__init__(task_names)
        self.lr, self.weight_decay, self.betas = float(lr), float(weight_decay), tuple(betas)
        # xi and its Adam state live in buffers (the loop's optimizer never sees them), one entry per task.
        for name in ("logits", "first_moment", "second_moment", "adam_steps"):
            self.register_buffer(name, torch.zeros(len(self.task_names)))
        self.register_buffer("one", torch.ones(()), persistent=False)
        self.losses_before: dict[str, Tensor] = {}  # from combine to after_step, within one step

    def task_weights(self, tasks: Sequence[str]) -> Tensor:
        """z = softmax(xi) over ``tasks``, in their order."""
        return torch.softmax(torch.stack([self.logits[self.task_names.index(task)] for task in tasks]), dim=0)

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        self.check_tasks(task_losses)
        self.losses_before = {task: loss.detach() for task, loss in task_losses.items()}
        if not task_losses:
            return self.zero.clone()
        losses = torch.stack(list(task_losses.values())) + self.EPSILON
        task_weights = self.task_weights(list(task_losses))
        normaliser = 1.0 / (task_weights / losses.detach()).sum()
        return normaliser * (task_weights * losses.log()).sum()

    def after_step(self, task_losses_after: Mapping[str, Tensor], reduce_sum: ReduceSum | None = None) -> None:
        decrease, present = [], []
        for task in self.task_names:
            if task in self.losses_before and task in task_losses_after and not self.is_frozen(task):
                before, after = self.losses_before[task], task_losses_after[task].detach().float()
                decrease.append((before + self.EPSILON).log() - (after + self.EPSILON).log())
                present.append(self.one)
            else:
                decrease.append(self.zero)
                present.append(self.zero)
        self.losses_before = {}
        decrease_and_count = torch.stack([torch.stack(decrease), torch.stack(present)])
        if reduce_sum is not None:
            decrease_and_count = reduce_sum(decrease_and_count).to(self.logits.device)
        self.update_logits(decrease_and_count[0], decrease_and_count[1])

    @torch.no_grad()
    def update_logits(self, decrease_sum: Tensor, counts: Tensor) -> None:
        """One Adam step on xi (L2 decay gamma, as torch's Adam) for the tasks with ``counts`` > 0."""
        updated = counts > 0
        decrease = decrease_sum / counts.clamp(min=1)
        # z over the updated tasks alone; grad of z . delta is z * (delta - z . delta) (softmax's Jacobian).
        task_weights = torch.softmax(self.logits.masked_fill(~updated, -math.inf), dim=0).nan_to_num(0.0)
        gradient = task_weights * (decrease - (task_weights * decrease).sum()) + self.weight_decay * self.logits
        beta1, beta2 = self.betas
        steps = self.adam_steps + updated.float()
        first = beta1 * self.first_moment + (1 - beta1) * gradient
        second = beta2 * self.second_moment + (1 - beta2) * gradient.square()
        step = (self.lr / (1 - beta1**steps)) * first / ((second / (1 - beta2**steps)).sqrt() + 1e-8)
        for buffer, new in ((self.logits, self.logits - step), (self.first_moment, first),
                            (self.second_moment, second), (self.adam_steps, steps)):
            buffer.copy_(torch.where(updated, new, buffer))

    def freeze_task(self, task: str) -> None:
        super().freeze_task(task)
        self.losses_before.pop(task, None)

    def weights(self) -> dict[str, float]:
        """z of the training tasks (the network's effective weights are c z_i / L_i); 0 for a frozen task."""
        training = self.training_tasks()
        return dict.fromkeys(self.task_names, 0.0) | dict(zip(training, self.task_weights(training).tolist()))


class GradNormWeighting(PerTaskParameterWeighting):
    """Chen et al. (2018), GradNorm (eq. 1, Algorithm 1): the network trains on sum_i w_i L_i, and w on
    L_grad = sum_i |G_i - mean_j(G_j) r_i^alpha|, with G_i = |grad_W w_i L_i| on W, the last shared weight
    matrix, r_i = L~_i / mean_j L~_j the relative inverse training rate, L~_i = L_i / L_i(0), and the target
    mean(G) r_i^alpha a constant. The network's loss carries w detached, L_grad moves w alone.

    As LibMTL: w = K softmax(theta) over the K tasks of the call, so sum w = K exactly (the paper renormalises
    w after each step), and L_i(0) is the task's mean training loss over its first epoch (all-reduced by the
    loop, the same on every rank; the paper takes the first step's loss): until then w_i = 1 and theta_i does
    not move. An absent or frozen task has neither term, and its theta no gradient. |grad_W L_i| costs one
    small backward per task, from the heads to W only; with the trunk frozen there is no W and w stays.
    """

    def __init__(self, task_names: Sequence[str], alpha: float = 1.5) -> None:
        if alpha < 0:
            raise ValueError(f"GradNorm's alpha must be >= 0, got {alpha}")
        super().__init__(task_names, "logits", torch.zeros(len(task_names)))
        self.alpha = float(alpha)
        self.register_buffer("initial_losses", torch.full((len(self.task_names),), math.nan))
        self.balanced_layer: list[nn.Parameter] = []  # a plain list: W belongs to the network's state, not this
        # Read on the host once per epoch and load, so that the step needs no sync to know it.
        self.has_initial_losses = False
        self.register_load_state_dict_post_hook(lambda module, incompatible_keys: module.note_initial_losses())

    def note_initial_losses(self) -> None:
        self.has_initial_losses = bool(torch.isfinite(self.initial_losses).any())

    def attach_shared_parameters(self, parameters: Sequence[nn.Parameter]) -> None:
        self.balanced_layer = [p for p in parameters if p.dim() >= 2][-1:]

    def end_epoch(self, mean_loss_by_task: Mapping[str, float]) -> None:
        for index, task in enumerate(self.task_names):
            if math.isnan(self.initial_losses[index].item()) and math.isfinite(mean_loss_by_task.get(task, math.nan)):
                self.initial_losses[index] = mean_loss_by_task[task]
        self.note_initial_losses()

    def task_weights(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        """w = K softmax(theta) over the tasks of ``task_losses``, in their order; differentiable."""
        return len(task_losses) * torch.softmax(self.present_scalars(task_losses), dim=0)

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        if not task_losses:
            return self.zero.clone()
        task_weights = self.task_weights(task_losses)
        return weighted_sum(task_weights.detach(), task_losses) + self.balance_loss(task_losses, task_weights)

    def balance_loss(self, task_losses: Mapping[str, Tensor], task_weights: Tensor) -> Tensor:
        """L_grad over the present tasks that have L_i(0); 0 while none has, or without a trainable W."""
        layer = [p for p in self.balanced_layer if p.requires_grad]
        if not layer or not torch.is_grad_enabled() or not self.has_initial_losses:
            return self.zero.clone()
        initial = torch.stack([self.initial_losses[self.task_names.index(task)] for task in task_losses])
        norms = []
        for loss in task_losses.values():
            reaches = loss.requires_grad
            gradient = torch.autograd.grad(loss, layer, retain_graph=True, allow_unused=True)[0] if reaches else None
            norms.append(gradient.norm() if gradient is not None else self.zero)
        gradient_norms = task_weights * torch.stack(norms).detach()
        # Masked rather than indexed: no host sync to learn which tasks have a reference loss.
        balanced = torch.isfinite(initial)
        count = balanced.sum().clamp(min=1)
        training_rates = torch.where(balanced, torch.stack(list(task_losses.values())).detach() / initial, 0.0)
        relative_rates = training_rates / (training_rates.sum() / count).clamp(min=1e-12)
        target = (torch.where(balanced, gradient_norms, 0.0).sum() / count * relative_rates.pow(self.alpha)).detach()
        return torch.where(balanced, (gradient_norms - target).abs(), 0.0).sum()

    def weights(self) -> dict[str, float]:
        """K softmax(theta) over the K training tasks; 0 for a frozen task."""
        training = self.training_tasks()
        weight_by_task = dict.fromkeys(self.task_names, 0.0)
        if training:
            logits = torch.stack([self.scalars[task].detach() for task in training])
            weight_by_task |= dict(zip(training, (len(training) * torch.softmax(logits, dim=0)).tolist()))
        return weight_by_task


class GradientWeighting(LossWeighting):
    """A weighting of the tasks' gradients of the shared parameters rather than of their losses: the loop
    differentiates each of :meth:`differentiated_losses` on its own and sets the shared parameters' gradient to
    :meth:`combine_gradients` of them (:mod:`pipeline.gradient_weighting`); each head gets its task's gradient.

    :meth:`combine` is the plain sum of the present losses, for the logged total and the divergence check.
    Such a weighting keeps its state in buffers, never ``nn.Parameter``s: the loop all-reduces the per-task
    gradients itself, and nothing of the weighting.
    """

    gradient_level = True

    def combine(self, task_losses: Mapping[str, Tensor]) -> Tensor:
        self.check_tasks(task_losses)
        return sum(task_losses.values(), self.zero.clone())

    def differentiated_losses(self, task_losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The per-task losses whose gradients are combined (heads train on these too)."""
        return dict(task_losses)

    def combine_gradients(self, gradients: Tensor, tasks: list[str]) -> Tensor:
        """The shared parameters' gradient (P,) from the present ``tasks``' gradients (K, P); the same on all ranks."""
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """1 for a training task (its gradient enters the combination), 0 for a frozen one."""
        training = set(self.training_tasks())
        return {task: 1.0 if task in training else 0.0 for task in self.task_names}


class ProjectedConflictingGradients(GradientWeighting, SeededWeighting):
    """Yu et al. (2020), PCGrad (Algorithm 1): each task's gradient loses its component along every other task's
    gradient it conflicts with (negative dot product), the others taken in random order; the shared parameters
    get the sum. The order comes from the weighting's own generator (seeded by the run): every rank draws the
    same, and a resume continues the sequence.
    """

    def combine_gradients(self, gradients: Tensor, tasks: list[str]) -> Tensor:
        orders = [torch.randperm(len(tasks), generator=self.generator).tolist() for _ in tasks]
        return project_conflicting(gradients, orders)


class AlignedMultiTask(GradientWeighting):
    """Senushkin et al. (2023), Aligned-MTL (Algorithm 1, uniform task weights): the tasks' gradient matrix G is
    replaced by sqrt(lambda_min) V diag(lambda)^-1/2 V^T G (eigen-decomposition of G G^T), whose rows are
    orthogonal and of equal norm, and the shared parameters get their sum. No solver, no state.
    """

    def combine_gradients(self, gradients: Tensor, tasks: list[str]) -> Tensor:
        return align_principal_components(gradients)


class DualBalancing(GradientWeighting):
    """Lin et al. (2023), DB-MTL (Algorithm 1): tasks train on log(L_i + 1e-8) (loss-scale balancing); each
    task's gradient of the shared parameters enters a moving average g_avg,i (beta_t = beta / t^sigma; sigma 0, a
    constant beta, is its authors' code's default), and the shared parameters get max_j |g_avg,j| sum_i g_avg,i /
    |g_avg,i| (gradient-magnitude balancing).

    t counts each task's own updates: an absent or frozen task's average and count stay as they were. The
    averages (tasks x shared parameters, e.g. 6 x 11.3M floats for ResNet-18) are in the state_dict, so a
    resumed run continues them.
    """

    EPSILON = 1e-8

    def __init__(self, task_names: Sequence[str], beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        if not 0 <= beta < 1 or beta_sigma < 0:
            raise ValueError(f"DB-MTL needs 0 <= beta < 1 and beta_sigma >= 0, got {beta=}, {beta_sigma=}")
        super().__init__(task_names)
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.register_buffer("gradient_averages", torch.zeros(len(self.task_names), 0))
        self.register_buffer("updates", torch.zeros(len(self.task_names), dtype=torch.long))

    def attach_shared_parameters(self, parameters: Sequence[nn.Parameter]) -> None:
        size = sum(p.numel() for p in parameters)
        if self.gradient_averages.shape[1] != size:
            self.gradient_averages = torch.zeros(len(self.task_names), size, device=self.gradient_averages.device)

    def differentiated_losses(self, task_losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {task: (loss + self.EPSILON).log() for task, loss in task_losses.items()}

    def combine_gradients(self, gradients: Tensor, tasks: list[str]) -> Tensor:
        if gradients.shape[1] != self.gradient_averages.shape[1]:
            raise ValueError(f"DB-MTL holds averages of {self.gradient_averages.shape[1]} shared parameters, got "
                             f"gradients of {gradients.shape[1]}: attach_shared_parameters was not called")
        index = torch.tensor([self.task_names.index(task) for task in tasks], device=self.updates.device)
        updates = self.updates[index] + 1
        averages = moving_averages(self.gradient_averages[index], gradients.to(self.gradient_averages.dtype), updates,
                                   self.beta, self.beta_sigma)
        self.gradient_averages[index] = averages
        self.updates[index] = updates
        return balance_magnitudes(averages, self.EPSILON)


WEIGHTINGS: dict[str, type[LossWeighting]] = {
    "learned": LearnedWeighting,
    "equal": EqualWeighting,
    "fixed": FixedWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DynamicWeightAverage,
    "rlw": RandomWeighting,
    "famo": FastAdaptiveWeighting,
    "gradnorm": GradNormWeighting,
    "dbmtl": DualBalancing,
    "pcgrad": ProjectedConflictingGradients,
    "alignedmtl": AlignedMultiTask,
}


def build_weighting(name: str, task_names: Sequence[str], **options: object) -> LossWeighting:
    """The weighting registered as ``name`` over ``task_names``, with its ``options`` (e.g. ``lam``, ``weights``)."""
    if name not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {name!r}; known: {', '.join(WEIGHTINGS)}")
    try:
        return WEIGHTINGS[name](task_names, **options)
    except TypeError as error:
        raise ValueError(f"bad options {sorted(options)} for loss weighting {name!r}: {error}") from None
