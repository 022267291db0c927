"""The per-worker training loop: task-balanced batches -> MultiTaskNet -> weighted losses -> Early Freeze.

``train_loop`` is what every rank runs (Ray Train's ``train_loop_per_worker``, launched by
``pipeline.train``); distribution enters only
through :class:`WorkerContext` (rank, world size, all-reduce, DDP wrapping) and the ``report`` callback
(metrics + checkpoint each epoch), so the loop reads the same in one process and on a cluster.

Per epoch: ``steps_per_epoch`` training steps; validation over the whole val split (sums all-reduced);
the learning rate ÷10 when the total validation loss plateaus (thesis 3.6.2); Early Freeze decides on the
all-reduced per-task validation losses, so every rank takes the same decision; the best model (lowest
total validation loss) is kept.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import TrainConfig, config_differences, describe_differences, to_dict
from pipeline.data import (
    EvalStream,
    TaskBalancedStream,
    augment_batch_and_labels,
    eval_loader,
    normalize_images,
    stream_seed,
    train_loader,
)
from pipeline.freeze import EarlyFreeze, SnapshotStore, apply_decision
from pipeline.gradient_weighting import combined_gradient_step
from pipeline.losses import LossWeighting, build_weighting
from pipeline.model import MultiTaskNet
from pipeline.progress import epoch_progress
from pipeline.run_records import network_state_of
from pipeline.schema import TaskSpec
from pipeline.task_losses import labelled_task_names, masked_task_losses
from pipeline.training_setup import prepare
from pipeline.validation import evaluate_split, format_epoch_line

# ---------------------------------------------------------------- the objective: model + loss weighting


class MultiTaskObjective(nn.Module):
    """The network and its loss weighting as one module, so that DDP synchronises both."""

    def __init__(self, net: MultiTaskNet, weighting: LossWeighting, tasks: Sequence[TaskSpec],
                 config: TrainConfig) -> None:
        super().__init__()
        self.net, self.weighting, self.tasks = net, weighting, list(tasks)
        weighting.attach_shared_parameters(list(net.trunk_parameters()))
        self.age_scale, self.regression_loss = config.loss.age_scale, config.loss.regression_loss
        # DDP expects a gradient for every trainable parameter at every step; one process does not, and
        # there an absent task's head and loss weight get no gradient at all (so Adam leaves them alone).
        self.every_parameter_in_graph = False

    def forward(self, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, loss_tasks: Sequence[str],
                labelled_tasks: Sequence[str] | None = None):
        """``labelled_tasks``: the tasks with a labelled sample in the batch, read by the caller from the
        loader's mask while it is still on the CPU (else from ``mask`` here: a device sync)."""
        outputs = self.net(images)
        task_losses = masked_task_losses(outputs, labels, mask, self.tasks, self.age_scale, self.regression_loss,
                                         labelled_tasks)
        contributing = {t: loss for t, loss in task_losses.items() if t in loss_tasks}
        total = self.weighting.combine(contributing)
        if self.every_parameter_in_graph:
            # Under DDP, heads and loss weights of tasks without a labelled sample in this batch join the
            # graph with weight 0: a zero gradient, and no find_unused_parameters.
            idle = [outputs[t].sum() * 0.0 for t in outputs if t not in contributing and outputs[t].requires_grad]
            idle += [p.sum() * 0.0 for p in self.weighting.parameters() if p.requires_grad]
            if idle:
                total = total + torch.stack(idle).sum()
        return total, task_losses, outputs


# ---------------------------------------------------------------- distribution at the edge


@dataclass
class WorkerContext:
    """Where this loop runs: rank, world size, device. A single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return tensor
        reduced = tensor.to(self.device if dist.get_backend() == "nccl" else "cpu").clone()
        dist.all_reduce(reduced)
        return reduced.cpu()

    def all_reduce_sum_on_device(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks, in place and where ``tensor`` is: for large tensors such as per-task gradients."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's BatchNorm statistics to every rank: each rank's last training batch moved its own, and
        validation and the checkpoint must see one model."""
        if self.distributed:
            for buffer in module.buffers():
                dist.broadcast(buffer, src=0)

    def check_ranks_identical(self, module: nn.Module, when: str) -> str:
        """The digest of ``module``'s state, after checking that every rank holds the same one."""
        digest = state_digest(module)
        if self.distributed:
            digests: list[str | None] = [None] * self.world_size
            dist.all_gather_object(digests, digest)
            check_digests_agree(digests, when)
        return digest

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP over the trainable parameters (frozen ones are left out by DDP itself); with nothing left to
        train (every task frozen), there is nothing to synchronise. A gradient-level weighting averages its
        per-task gradients itself (:func:`set_combined_gradients`): no DDP, whose all-reduce would come per task."""
        gradient_level = isinstance(module, MultiTaskObjective) and module.weighting.gradient_level
        trainable = any(parameter.requires_grad for parameter in module.parameters())
        if not self.distributed or gradient_level or not trainable:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def state_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer of ``module``, by name: equal digests, identical state."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_digests_agree(digests: Sequence[str | None], when: str) -> None:
    """Raise when ranks hold different model states: a DDP bug, never to be trained on silently."""
    if len(set(digests)) > 1:
        by_rank = ", ".join(f"rank {rank} {digest[:12] if digest else digest}" for rank, digest in enumerate(digests))
        raise RuntimeError(f"ranks hold different model states {when}: {by_rank}")


def resolve_device(config: TrainConfig) -> torch.device:
    if config.device == "cpu" or (config.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on GPUs by default; fp32 on CPU (where autocast buys nothing here)."""
    if device.type != "cuda":
        return None
    return {"auto": torch.bfloat16, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[config.precision]


# ---------------------------------------------------------------- state that a checkpoint holds


@dataclass
class RunState:
    """Everything a resumed run needs besides the modules' weights."""

    epoch: int = 0  # next epoch to run
    step: int = 0  # optimizer steps taken
    best_total_val_loss: float = math.inf
    history: list[dict[str, Any]] = field(default_factory=list)


def seed_epoch_rngs(seed: int, rank: int, epoch: int) -> None:
    """Torch (CPU and CUDA), numpy and Python RNGs at the start of an epoch, from (seed, rank, epoch) alone:
    dropout differs between ranks, and a run resumed at an epoch boundary draws exactly what it would have."""
    torch.manual_seed(stream_seed(seed, rank, epoch, "torch"))
    np.random.seed(stream_seed(seed, rank, epoch, "numpy") % 2**32)
    random.seed(stream_seed(seed, rank, epoch, "python"))


def build_optimizer(objective: MultiTaskObjective, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam over the trainable parameters only: frozen ones are not held (and so never stepped)."""
    net_params = [p for p in objective.net.parameters() if p.requires_grad]
    groups = [{"params": net_params, "lr": config.optim.lr, "name": "net"}]
    weighting_params = [p for p in objective.weighting.parameters() if p.requires_grad]
    if weighting_params:
        groups.append({"params": weighting_params, "lr": config.optim.weighting_lr or config.optim.lr,
                       "name": "weighting"})
    return torch.optim.Adam(groups, betas=tuple(config.optim.betas), weight_decay=config.optim.weight_decay)


def rebuild_optimizer(old: torch.optim.Optimizer, objective: MultiTaskObjective,
                      config: TrainConfig) -> torch.optim.Optimizer:
    """A new optimizer over what is still trainable, keeping Adam's moments and current lr for those."""
    new = build_optimizer(objective, config)
    for new_group, old_group in zip(new.param_groups, old.param_groups):
        new_group["lr"] = old_group["lr"]
    for param in (p for g in new.param_groups for p in g["params"]):
        if param in old.state:
            new.state[param] = old.state[param]
    return new


# ---------------------------------------------------------------- one epoch


class TrainingDiverged(RuntimeError):
    """A non-finite training loss: the run stops, and nothing of the epoch is saved."""


# Steps between the checks for a non-finite loss: each costs one host-device sync (and an all-reduce),
# so not every step; the losses themselves are summed on the device and read once per epoch.
DIVERGENCE_CHECK_STEPS = 50


def train_one_epoch(
    model: nn.Module,
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    optimizer: torch.optim.Optimizer,
    tasks: Sequence[TaskSpec],
    loss_tasks: Sequence[str],
    context: WorkerContext,
    config: TrainConfig,
    augment_generator: torch.Generator,
    grad_scaler: torch.amp.GradScaler,
    epoch: int = 0,
) -> dict[str, float]:
    """``steps`` optimizer steps; returns mean task losses, labelled examples per batch and images/s.

    Raises :class:`TrainingDiverged` (on every rank alike) when a loss turns NaN or infinite.
    """
    model.train()
    objective = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    amp_dtype = autocast_dtype(config, context.device)
    column = {t.name: i for i, t in enumerate(tasks)}
    # Running sums on the device, read at the divergence checks and at the end: no sync per step, and a few
    # kernels per step for all tasks together. Row T is the total loss; which losses exist is known on the host.
    loss_sums = torch.zeros(len(tasks) + 1, dtype=torch.float64, device=context.device)
    first_bad_step = torch.full((len(tasks) + 1,), -1, dtype=torch.long, device=context.device)
    no_loss = torch.zeros((), device=context.device)  # an absent task adds 0 to its sum
    loss_batches = [0] * (len(tasks) + 1)
    labelled = torch.zeros(len(tasks))
    images_seen = 0
    progress = epoch_progress(context, steps, config.data.batch_size, f"epoch {epoch} train")
    started = time.perf_counter()
    for step in range(steps):
        batch = next(batches)
        labelled_tasks = labelled_task_names(batch["mask"], tasks)  # the loader's mask, still on the CPU
        labels = batch["labels"].to(context.device, non_blocking=True)
        # landmark labels move with the crop and flip of their image
        images, labels = augment_batch_and_labels(batch["images"].to(context.device, non_blocking=True), labels,
                                                  tasks, config.data.augment, augment_generator)
        images = normalize_images(images, config.model.channels_last)
        mask = batch["mask"].to(context.device, non_blocking=True)
        autocast = torch.autocast(context.device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with autocast:
            total, task_losses, _ = model(images, labels, mask, loss_tasks, labelled_tasks)
        optimizer.zero_grad(set_to_none=True)
        if objective.weighting.gradient_level:
            set_combined_gradients(objective, task_losses, loss_tasks, context)
        else:
            grad_scaler.scale(total).backward()  # a no-op scale unless fp16, whose small gradients underflow
        grad_scaler.step(optimizer)
        grad_scaler.update()
        if objective.weighting.needs_losses_after_step:
            # FAMO: this batch's losses after the step (train mode, as its authors do), to update its weights
            with torch.no_grad(), autocast:
                losses_after = masked_task_losses(objective.net(images), labels, mask, tasks, config.loss.age_scale,
                                                  config.loss.regression_loss, labelled_tasks)
            objective.weighting.after_step(losses_after, context.all_reduce_sum if context.distributed else None)
        step_losses = torch.stack([task_losses[t.name].detach().float() if t.name in task_losses else no_loss
                                   for t in tasks] + [total.detach().float()]).double()
        loss_sums += step_losses
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(step_losses), step, first_bad_step)
        for task in task_losses:
            loss_batches[column[task]] += 1
        loss_batches[-1] += 1
        labelled += batch["mask"].sum(dim=0).float()
        images_seen += images.shape[0]
        if progress is not None:
            progress.update(images.shape[0] * context.world_size)
        if (step + 1) % DIVERGENCE_CHECK_STEPS == 0 or step + 1 == steps:
            check_finite(first_bad_step, loss_sums, tasks, context, epoch, steps)
    seconds = time.perf_counter() - started
    if progress is not None:
        progress.close()
    # Means over every rank's batches: the same figures on every rank (DWA's weights come from them).
    sums = context.all_reduce_sum(loss_sums).tolist()
    counts = context.all_reduce_sum(torch.tensor(loss_batches, dtype=torch.float64)).tolist()
    metrics = {f"train/{t.name}/loss": sums[i] / counts[i] for i, t in enumerate(tasks) if counts[i]}
    metrics |= {f"train/{t.name}/labelled_per_batch": float(labelled[i] / steps) for i, t in enumerate(tasks)}
    metrics |= {"train/total_loss": sums[-1] / counts[-1],
                "train/images_per_s": images_seen * context.world_size / seconds}
    return metrics


def set_combined_gradients(objective: MultiTaskObjective, task_losses: dict[str, torch.Tensor],
                           loss_tasks: Sequence[str], context: WorkerContext) -> None:
    """A gradient-level weighting's step: each training task's gradient of the trainable shared parameters and of
    its head, averaged over the ranks that had the task (one all-reduce), combined by the weighting into the
    shared parameters' ``.grad``; heads get their own task's. The same on every rank."""
    weighting = objective.weighting
    contributing = weighting.differentiated_losses({t: loss for t, loss in task_losses.items() if t in loss_tasks})
    shared = [p for p in objective.net.trunk_parameters() if p.requires_grad]
    heads = {task: [p for p in objective.net.head_parameters(task) if p.requires_grad]
             for task in weighting.task_names}
    combined_gradient_step(contributing, weighting.task_names, shared, heads, weighting.combine_gradients,
                           context.all_reduce_sum_on_device if context.distributed else None)


def check_finite(first_bad_step: torch.Tensor, loss_sums: torch.Tensor, tasks: Sequence[TaskSpec],
                 context: WorkerContext, epoch: int, steps: int) -> None:
    """Raise :class:`TrainingDiverged` on every rank once any rank has seen a non-finite loss."""
    bad_here = first_bad_step >= 0
    ranks_bad = int(context.all_reduce_sum(bad_here.any().float().reshape(1).cpu())[0])
    if not ranks_bad:
        return
    if not bad_here.any():
        raise TrainingDiverged(f"training diverged in epoch {epoch}: a loss became non-finite on another rank")
    names = [t.name for t in tasks] + ["total"]
    steps_by_index = first_bad_step.tolist()
    index = min((i for i, s in enumerate(steps_by_index) if s >= 0), key=lambda i: (steps_by_index[i], i))
    value = loss_sums[index].item()
    raise TrainingDiverged(
        f"training diverged at epoch {epoch}, step {steps_by_index[index]} of {steps}: the loss of task "
        f"{names[index]!r} became {value}; nothing of this epoch was saved (try a lower optim.lr)")


# ---------------------------------------------------------------- the loop


Reporter = Callable[[dict[str, Any], dict[str, Any]], None]  # (metrics, checkpoint payload) -> None


class ResumeError(ValueError):
    """A checkpoint this run cannot continue from: another config, or state that does not fit."""


def train_loop(config: TrainConfig, context: WorkerContext, report: Reporter,
               resume: dict[str, Any] | None = None) -> RunState:
    """Train until every task is frozen/stopped or ``max_epochs``; ``report`` is called once per epoch."""
    if resume is not None:
        differences = config_differences(resume["config"], to_dict(config))
        if differences:
            raise ResumeError(f"the checkpoint was written under another config: "
                              f"{describe_differences(resume['config'], to_dict(config), differences)}")
    setup = prepare(config, context.world_size)
    if context.rank == 0:
        print(setup.description, flush=True)
        print(f"{setup.steps_per_epoch} steps per epoch, {context.world_size} worker(s), device {context.device}",
              flush=True)
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    net = MultiTaskNet(
        setup.tasks, config.model.backbone, config.model.shared_dims, config.model.head_hidden, config.model.dropout,
        config.model.weights_path, config.model.binary_outputs,
    )
    weighting = build_weighting(config.loss.weighting, [t.name for t in setup.tasks], **weighting_options(config))
    if weighting.gradient_level and config.precision == "fp16":
        # The GradScaler scales one loss; per-task gradients would need their own unscaling and inf checks.
        raise ValueError(f"loss.weighting={config.loss.weighting} combines per-task gradients and does not support "
                         f"precision=fp16; use bf16 or fp32")
    for task, mean in setup.regression_means.items():
        net.set_output_bias(task, mean / config.loss.age_scale)
    if config.model.init_from and resume is None:
        parts = net.load_matching(network_state_of(Path(config.model.init_from)))
        if context.rank == 0:
            print(f"init_from {config.model.init_from}: loaded {', '.join(parts['loaded']) or 'nothing'}; "
                  f"fresh {', '.join(parts['fresh']) or 'nothing'}; not used {', '.join(parts['unused']) or 'nothing'}",
                  flush=True)
    objective = MultiTaskObjective(net, weighting, setup.tasks, config).to(context.device)
    objective.every_parameter_in_graph = context.distributed and not weighting.gradient_level
    if config.model.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    freezer = EarlyFreeze([t.name for t in setup.tasks], config.freeze.patience, config.freeze.min_delta,
                          config.freeze.mode, config.freeze.counter, config.freeze.trunk_quorum)
    snapshots = SnapshotStore()
    grad_scaler = torch.amp.GradScaler(context.device.type,
                                       enabled=autocast_dtype(config, context.device) == torch.float16)
    state = RunState()
    if resume is not None:
        objective.load_state_dict(resume["objective"])
        freezer.load_state_dict(resume["freeze"])
        snapshots.load_state_dict(resume["snapshots"])
        # Before the optimizer, which holds trainable parameters only.
        net.apply_frozen_parts(resume["frozen_parts"])
        for task in (*freezer.frozen_tasks, *freezer.stopped_tasks):
            weighting.freeze_task(task)
        grad_scaler.load_state_dict(resume["grad_scaler"])
        state = RunState(**resume["run_state"])
    optimizer = build_optimizer(objective, config)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=config.optim.plateau_factor, patience=config.optim.plateau_patience
    )
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
    context.check_ranks_identical(objective, "before the first step")  # same seed, same weights: not only by DDP
    model = context.wrap(objective)
    val_loader = eval_loader(
        EvalStream(setup.shard_sets, "val", [t.name for t in setup.tasks], config.data.image_size, context.rank,
                   context.world_size),
        config.data.batch_size, config.data.loader_workers, pin_memory=context.device.type == "cuda",
    )

    while state.epoch < config.max_epochs and not freezer.all_done:
        epoch = state.epoch
        seed_epoch_rngs(config.seed, context.rank, epoch)
        stream = TaskBalancedStream(
            setup.shard_sets, setup.quotas, [t.name for t in setup.tasks], config.data.image_size,
            config.data.shuffle_buffer, config.seed, context.rank, epoch,
        )
        augment_generator = torch.Generator().manual_seed(stream_seed(config.seed, context.rank, epoch, "augment"))
        batches = iter(train_loader(stream, config.data.loader_workers, pin_memory=context.device.type == "cuda"))
        started = time.perf_counter()
        metrics: dict[str, Any] = {"epoch": epoch}
        metrics |= train_one_epoch(
            model, batches, setup.steps_per_epoch, optimizer, setup.tasks, freezer.loss_tasks(), context, config,
            augment_generator, grad_scaler, epoch,
        )
        del batches
        state.step += setup.steps_per_epoch
        weighting.end_epoch({t.name: metrics[f"train/{t.name}/loss"] for t in setup.tasks
                             if f"train/{t.name}/loss" in metrics})
        context.broadcast_buffers(objective)
        val = evaluate_split(net, val_loader, setup.tasks, context, config)
        val_loss_by_task = {task: values["loss"] for task, values in val.items()}
        for task in freezer.loss_tasks():
            if not math.isfinite(val_loss_by_task.get(task, math.nan)):
                raise TrainingDiverged(f"training diverged: the validation loss of task {task!r} at epoch {epoch} is "
                                       f"{val_loss_by_task.get(task)}; nothing of this epoch was saved "
                                       "(try a lower optim.lr)")
        total_val_loss = sum(val_loss_by_task.values())
        for task, values in val.items():
            metrics |= {f"val/{task}/{name}": value for name, value in values.items()}
        metrics["val/total_loss"] = total_val_loss
        metrics |= {f"weights/{task}": w for task, w in weighting.weights().items()}
        metrics["lr"] = optimizer.param_groups[0]["lr"]

        decisions = freezer.update(epoch, val_loss_by_task)
        if epoch in freezer.needed_snapshot_epochs():
            snapshots.put(epoch, net, freezer)
        for decision in decisions:
            apply_decision(net, decision, snapshots)
            weighting.freeze_task(decision.task)
        if decisions:
            optimizer = rebuild_optimizer(optimizer, objective, config)
            scheduler.optimizer = optimizer
            model = context.wrap(objective)
        snapshots.prune(freezer.needed_snapshot_epochs())
        scheduler.step(total_val_loss)

        metrics["freeze/events"] = [f"{d.kind}:{d.task}@{d.epoch}->{d.restore_epoch}" for d in decisions]
        metrics["freeze/frozen_tasks"] = list(freezer.frozen_tasks) + list(freezer.stopped_tasks)
        metrics["freeze/trunk_frozen"] = freezer.trunk_frozen
        metrics["epoch_seconds"] = time.perf_counter() - started
        # After a restore the weights are no longer the ones just evaluated: not a candidate for best model.
        restored = any(d.restore_epoch is not None for d in decisions)
        is_best = total_val_loss < state.best_total_val_loss and not restored
        if is_best:
            state.best_total_val_loss = total_val_loss
        metrics["is_best"] = is_best
        metrics["state_digest"] = context.check_ranks_identical(objective, f"after epoch {epoch}")
        state.history.append(_plain_metrics(metrics))
        state.epoch = epoch + 1
        if context.rank == 0:
            print(format_epoch_line(metrics, setup.tasks), flush=True)
        objective_state = objective.state_dict()
        report(
            metrics,
            {
                "objective": objective_state,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "grad_scaler": grad_scaler.state_dict(),
                "freeze": freezer.state_dict(),
                # Tensors equal to the current weights are saved once (torch.save stores a storage once).
                "snapshots": snapshots.state_dict(share_with=objective_state, prefix="net."),
                "frozen_parts": net.frozen_parts(),
                "run_state": {"epoch": state.epoch, "step": state.step,
                              "best_total_val_loss": state.best_total_val_loss, "history": state.history},
                "config": to_dict(config),
                "tasks": [t.name for t in setup.tasks],
                "is_best": is_best,
            },
        )
    return state


def weighting_options(config: TrainConfig) -> dict[str, Any]:
    """The config's options of its loss weighting (RLW's and PCGrad's seed is the run's: every rank draws alike)."""
    options = {"learned": {"lam": config.loss.lam}, "fixed": {"weights": config.loss.fixed_weights},
               "dwa": {"temperature": config.loss.dwa_temperature}, "rlw": {"seed": config.seed},
               "famo": {"lr": config.loss.famo_lr, "weight_decay": config.loss.famo_weight_decay},
               "gradnorm": {"alpha": config.loss.gradnorm_alpha},
               "dbmtl": {"beta": config.loss.dbmtl_beta, "beta_sigma": config.loss.dbmtl_beta_sigma},
               "pcgrad": {"seed": config.seed}}
    return options.get(config.loss.weighting, {})


def _plain_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(metrics, default=str))
