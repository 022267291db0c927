"""Gradient-level multi-task weighting: per-task gradients of the shared parameters, combined into one direction.

A gradient-level weighting (PCGrad, Aligned-MTL, DB-MTL; their classes are in :mod:`pipeline.losses`) does
not weight losses: it needs each task's own gradient of the shared parameters (backbone + shared layers) and
sets their ``.grad`` to a combination of them, while each head gets its own task's gradient. Here:

- the combine rules, pure functions on a (K, P) matrix of K tasks' gradients: :func:`project_conflicting`
  (PCGrad), :func:`align_principal_components` (Aligned-MTL), :func:`balance_magnitudes` (DB-MTL);
- :func:`task_gradient_rows`: one ``torch.autograd.grad`` per task on the unwrapped module, so there is no
  DDP all-reduce per task;
- :func:`average_over_ranks`: one explicit all-reduce of all rows, each task's row averaged over the ranks
  whose batch had that task, so every rank combines the same matrix and applies the same update;
- :func:`combined_gradient_step`: the three together, writing ``.grad`` of shared and head parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

ReduceSum = Callable[[Tensor], Tensor]  # sums a tensor over the DDP ranks (returns the sum)

# ---------------------------------------------------------------- combine rules on a (K, P) matrix


def project_conflicting(gradients: Tensor, orders: Sequence[Sequence[int]]) -> Tensor:
    """PCGrad (Yu et al. 2020, Algorithm 1): sum_i g_i^PC, where g_i^PC starts as g_i and, for each other task j
    in ``orders[i]``, loses its component along g_j when they conflict: g_i^PC -= min(g_i^PC . g_j, 0) / |g_j|^2 g_j.

    Projections use the original g_j, as in the paper. Every g_i^PC stays a combination c_i . G of the rows, so
    the surgery runs on the K x K Gram matrix (float64, CPU) and touches the P-long rows twice (G G^T, then
    (sum_i c_i) . G) instead of twice per pair. A zero g_j projects nothing.
    """
    gram = (gradients @ gradients.T).double().cpu()
    identity = torch.eye(len(gradients), dtype=torch.float64)
    combined = torch.zeros(len(gradients), dtype=torch.float64)
    for i, order in enumerate(orders):
        coefficients = identity[i].clone()
        for j in order:
            if j != i and gram[j, j] > 0:
                conflict = min(float(coefficients @ gram[:, j]), 0.0)
                coefficients -= conflict / float(gram[j, j]) * identity[j]
        combined += coefficients
    return combined.to(gradients.dtype).to(gradients.device) @ gradients


def align_principal_components(gradients: Tensor) -> Tensor:
    """Aligned-MTL (Senushkin et al. 2023, Algorithm 1, weights w = 1): sum of the rows of B G, where M = G G^T =
    V diag(lambda) V^T and B = sqrt(lambda_min) V diag(lambda)^-1/2 V^T.

    B G has orthogonal rows of equal norm sqrt(lambda_min) (condition number 1): each task gets the same
    magnitude, and no task's component cancels another's. Eigenvalues below lambda_max * K * eps (float32) are
    dropped (rank-deficient G), and lambda_min is the smallest one kept, as in the authors' code. The K x K
    eigenproblem is solved in float64 on the CPU (K numbers to move; eigh is not worth a GPU launch).
    """
    gram = (gradients @ gradients.T).double().cpu()
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    tolerance = eigenvalues.max().clamp(min=0) * gram.shape[0] * torch.finfo(torch.float32).eps
    kept = eigenvalues > tolerance
    if not kept.any():
        return torch.zeros_like(gradients[0])
    eigenvalues, eigenvectors = eigenvalues[kept], eigenvectors[:, kept]
    balance = eigenvalues.min().sqrt() * (eigenvectors * eigenvalues.rsqrt()) @ eigenvectors.T
    task_weights = balance.sum(dim=0).to(gradients.dtype).to(gradients.device)
    return task_weights @ gradients


def balance_magnitudes(gradients: Tensor, epsilon: float = 1e-8) -> Tensor:
    """DB-MTL's gradient-magnitude balancing (Lin et al. 2023, Algorithm 1): max_j |g_j| * sum_i g_i / |g_i|.

    Every task's (averaged) gradient is scaled to the largest norm among them; ``epsilon`` as in the authors'
    code, so a zero row adds nothing.
    """
    norms = gradients.norm(dim=1)
    return ((norms.max() / (norms + epsilon)).unsqueeze(1) * gradients).sum(dim=0)


def moving_averages(averages: Tensor, gradients: Tensor, updates: Tensor, beta: float, beta_sigma: float) -> Tensor:
    """DB-MTL's moving average of each task's gradient (Algorithm 1; beta_sigma > 0 lets beta decay):
    g_avg <- g + beta_t (g_avg - g), beta_t = beta / t^sigma, t = the row's count of updates including this one.

    ``averages``, ``gradients``: (K, P); ``updates``: (K,) counts t; returns the new (K, P) averages.
    """
    decay = (beta / updates.double().pow(beta_sigma)).to(averages.dtype).unsqueeze(1)
    return gradients + decay * (averages - gradients)


# ---------------------------------------------------------------- per-task gradients, averaged over ranks


def task_gradient_rows(
    task_losses: Mapping[str, Tensor],
    tasks: Sequence[str],
    shared: Sequence[nn.Parameter],
    heads: Mapping[str, Sequence[nn.Parameter]],
) -> Tensor:
    """(T, S + H + 1): row t holds task t's gradient of the shared parameters (S numbers), of its own head (its
    slice of H, the heads in ``tasks`` order) and, last, 1 if the task has a loss here (else the row is 0).

    One ``torch.autograd.grad`` per present task, on the module itself: nothing is accumulated in ``.grad``,
    and a DDP wrapper's hooks never fire. A parameter the loss does not reach gets zeros.
    """
    sizes = [p.numel() for p in shared] + [p.numel() for task in tasks for p in heads.get(task, ())]
    parameters = [*shared, *(p for task in tasks for p in heads.get(task, ()))]
    device = parameters[0].device if parameters else torch.device("cpu")
    rows = torch.zeros(len(tasks), sum(sizes) + 1, device=device)
    offsets = torch.tensor([0] + sizes).cumsum(0).tolist()
    head_start = {task: len(shared) + sum(len(heads.get(t, ())) for t in tasks[:i]) for i, task in enumerate(tasks)}
    present = [task for task in tasks if task in task_losses]
    for count, task in enumerate(present):
        own = list(shared) + list(heads.get(task, ()))
        if not own:
            rows[tasks.index(task), -1] = 1.0
            continue
        indices = list(range(len(shared))) + [head_start[task] + k for k in range(len(heads.get(task, ())))]
        grads = torch.autograd.grad(task_losses[task], own, retain_graph=count + 1 < len(present), allow_unused=True)
        row = rows[tasks.index(task)]
        for index, grad in zip(indices, grads):
            if grad is not None:
                row[offsets[index]:offsets[index + 1]] = grad.reshape(-1)
        row[-1] = 1.0
    return rows


def average_over_ranks(rows: Tensor, reduce_sum: ReduceSum | None) -> Tensor:
    """``rows`` from :func:`task_gradient_rows` summed over the ranks (one all-reduce) and each task's row divided
    by the number of ranks that had the task: (T, S + H + 1), with the last column that count (0 = nowhere)."""
    summed = reduce_sum(rows) if reduce_sum is not None else rows
    summed = summed.to(rows.device)
    counts = summed[:, -1:]
    return torch.cat([summed[:, :-1] / counts.clamp(min=1), counts], dim=1)


def write_gradients(vector: Tensor, parameters: Sequence[nn.Parameter]) -> None:
    """Set ``.grad`` of ``parameters`` from consecutive slices of ``vector``."""
    offset = 0
    for parameter in parameters:
        parameter.grad = vector[offset:offset + parameter.numel()].view_as(parameter).clone()
        offset += parameter.numel()


def combined_gradient_step(
    task_losses: Mapping[str, Tensor],
    tasks: Sequence[str],
    shared: Sequence[nn.Parameter],
    heads: Mapping[str, Sequence[nn.Parameter]],
    combine: Callable[[Tensor, list[str]], Tensor],
    reduce_sum: ReduceSum | None = None,
) -> list[str]:
    """Write ``.grad``: the shared parameters get ``combine(rows of the tasks present on any rank, their names)``,
    each such task's head its own gradient averaged over the ranks that had it. Returns those task names.

    Heads of tasks present nowhere, and the shared parameters when no task is present, keep ``.grad`` None
    (the optimizer leaves them alone). Every rank gets the same averaged rows, so the same update.
    """
    rows = average_over_ranks(task_gradient_rows(task_losses, tasks, shared, heads), reduce_sum)
    present = (rows[:, -1] > 0).tolist()
    names = [task for task, here in zip(tasks, present) if here]
    if not names:
        return names
    shared_size = sum(p.numel() for p in shared)
    index = torch.tensor([i for i, here in enumerate(present) if here], device=rows.device)
    if shared:
        write_gradients(combine(rows[index, :shared_size], names), shared)
    offset = shared_size
    for task, here in zip(tasks, present):
        size = sum(p.numel() for p in heads.get(task, ()))
        if here:
            write_gradients(rows[tasks.index(task), offset:offset + size], heads.get(task, ()))
        offset += size
    return names
