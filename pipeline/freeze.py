"""Early Freeze (thesis Algorithm 1) and its Early-Stop baseline (thesis Table 5.4).

:class:`EarlyFreeze` is a pure state machine over per-epoch, per-task validation losses: no torch, no
torch.distributed. Its decisions depend only on the losses it is given, so ranks that feed it the same
all-reduced losses take the same decisions. Applying a decision to a model is kept apart, in
:func:`apply_decision`, with :class:`SnapshotStore` holding the model states a decision may restore.

Modes:

- ``early-freeze``: when a task has not improved for ``patience`` validations, restore the whole model to
  that task's best epoch and freeze the trunk (backbone + shared layers) and that task's head; the other
  tasks go on training their heads. A task converging later restores and freezes only its own head.
  With ``trunk_quorum`` q > 1 (not in the thesis) the trunk waits until q active tasks have run out of
  patience together, then restores the latest of their best epochs: with tens of tasks one almost always
  stalls early, and Algorithm 1 would then throw away what the trunk learned for all the others.
- ``early-stop``: a converged task stops contributing loss; nothing is restored, the trunk keeps training
  for the other tasks (the baseline the thesis compares against). ``trunk_quorum`` has no effect.
- ``none``: never decides; bests are tracked for logging only. ``trunk_quorum`` has no effect.

One epoch of the training loop::

    decisions = machine.update(epoch, val_loss_by_task)      # all-reduced losses
    store.put(epoch, model, machine)                         # before the decisions change the model
    for decision in decisions:
        apply_decision(model, decision, store)
    store.prune(machine.needed_snapshot_epochs())
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

MODES = ("early-freeze", "early-stop", "none")
# How a task's patience is counted: validations without improvement since its last improvement (the
# thesis' prose: "we wait for some number of epochs"), or all of them (its Algorithm 1, which never resets
# Counter[i] when the loss improves).
COUNTERS = ("consecutive", "cumulative")
DECISION_KINDS = ("freeze_trunk", "freeze_head", "stop")
# State keys added after the first checkpoints: a state without one behaves as before the key existed.
LATER_KEY_DEFAULTS = {"counter": "consecutive", "trunk_quorum": 1}
HEADS_PREFIX = "heads."


@dataclass(frozen=True)
class FreezeDecision:
    """What :meth:`EarlyFreeze.update` decided for one task; :func:`apply_decision` carries it out."""

    task: str
    epoch: int  # the epoch whose validation led to the decision
    kind: str  # "freeze_trunk" | "freeze_head" | "stop"
    restore_epoch: int | None  # the snapshot to restore (None for "stop")
    restore_scope: str | None  # "model" | "head" | None

    def __post_init__(self) -> None:
        if self.kind not in DECISION_KINDS:
            raise ValueError(f"decision kind must be one of {DECISION_KINDS}, got {self.kind!r}")


@dataclass
class _TaskWatch:
    """One task's best validation loss so far and how many validations since it last improved."""

    best_loss: float = math.inf
    best_epoch: int | None = None
    counter: int = 0

    def observe(self, epoch: int, loss: float, min_delta: float, cumulative: bool) -> None:
        if loss < self.best_loss - min_delta:
            self.best_loss, self.best_epoch = loss, epoch
            if not cumulative:
                self.counter = 0
        else:
            self.counter += 1


class EarlyFreeze:
    """Decides, from per-task validation losses, when each task has converged and what to freeze.

    A task improves when its loss is below its best by more than ``min_delta``; ``patience`` counts
    validations (calls to :meth:`update`) without improvement.

    Only one trunk freeze per epoch (Algorithm 1's ``break``): if several tasks converge in the same
    epoch, the first in task order freezes the trunk. With ``trunk_quorum`` q > 1 (``early-freeze`` mode
    only), the trunk freezes once at least q active tasks are out of patience at one validation; a task
    that ran out earlier keeps training and counting until then (it drops out of the count if it improves).
    The winner is the one whose best epoch is the latest (ties: task order), so the restore keeps the most
    training that a stalled task still counts as its best. Heads freeze one by one as before: the quorum
    concerns the trunk only. When the trunk is frozen, every task still active
    restarts its watch (best = inf, counter = 0): its earlier bests were measured on a trunk that no
    longer exists (the model was just restored to another epoch and the trunk will not change again), so
    neither those losses nor those snapshots can be compared with what its head learns from now on.
    Tasks that converged in the same epoch as the winner are therefore judged again under the new watch.
    """

    def __init__(self, tasks: Sequence[str], patience: int, min_delta: float = 0.0, mode: str = "early-freeze",
                 counter: str = "consecutive", trunk_quorum: int = 1) -> None:
        tasks = tuple(tasks)
        if not tasks:
            raise ValueError("EarlyFreeze needs at least one task")
        if len(set(tasks)) != len(tasks):
            raise ValueError(f"task names must be unique, got {list(tasks)}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an integer >= 1, got {patience!r}")
        if not min_delta >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if counter not in COUNTERS:
            raise ValueError(f"counter must be one of {COUNTERS}, got {counter!r}")
        if isinstance(trunk_quorum, bool) or not isinstance(trunk_quorum, int) or trunk_quorum < 1:
            raise ValueError(f"trunk_quorum must be an integer >= 1, got {trunk_quorum!r}")
        if trunk_quorum > len(tasks):
            raise ValueError(f"trunk_quorum {trunk_quorum} is more than the {len(tasks)} tasks of this run: "
                             "the trunk would never freeze")
        self.tasks, self.patience, self.min_delta, self.mode = tasks, patience, float(min_delta), mode
        self.counter, self.trunk_quorum = counter, trunk_quorum
        self._watch = {task: _TaskWatch() for task in tasks}
        self._frozen: list[str] = []
        self._stopped: list[str] = []
        self._trunk_frozen = False
        self._last_epoch: int | None = None
        self.events: list[FreezeDecision] = []

    @property
    def active_tasks(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if t not in self._frozen and t not in self._stopped)

    @property
    def frozen_tasks(self) -> tuple[str, ...]:
        """Frozen tasks in the order they were frozen."""
        return tuple(self._frozen)

    @property
    def stopped_tasks(self) -> tuple[str, ...]:
        """Early-stopped tasks in the order they were stopped."""
        return tuple(self._stopped)

    @property
    def trunk_frozen(self) -> bool:
        return self._trunk_frozen

    @property
    def all_done(self) -> bool:
        """Every task frozen or stopped: training has nothing left to learn."""
        return not self.active_tasks

    @property
    def best_loss_by_task(self) -> dict[str, float]:
        """Best validation loss per task since its watch last (re)started (inf before the first)."""
        return {task: watch.best_loss for task, watch in self._watch.items()}

    @property
    def best_epoch_by_task(self) -> dict[str, int | None]:
        return {task: watch.best_epoch for task, watch in self._watch.items()}

    def loss_tasks(self) -> tuple[str, ...]:
        """Tasks whose loss is still computed and backpropagated: frozen and stopped ones are not."""
        return self.active_tasks

    def snapshot_scope(self) -> str:
        """What a snapshot must hold: the whole model until the trunk is frozen, then only the heads."""
        return "heads" if self._trunk_frozen else "model"

    def needed_snapshot_epochs(self) -> set[int]:
        """Epochs whose snapshots a future decision may restore: the best epochs of the active tasks."""
        if self.mode != "early-freeze":
            return set()
        return {self._watch[t].best_epoch for t in self.active_tasks if self._watch[t].best_epoch is not None}

    def update(self, epoch: int, val_loss_by_task: Mapping[str, float]) -> list[FreezeDecision]:
        """Record one validation and return the decisions it leads to (often none).

        ``val_loss_by_task`` must hold a finite loss for every active task; losses of frozen or stopped
        tasks are ignored. Epochs must increase from call to call.
        """
        if self._last_epoch is not None and epoch <= self._last_epoch:
            raise ValueError(f"epochs must increase: got {epoch} after {self._last_epoch}")
        unknown = sorted(set(val_loss_by_task) - set(self.tasks))
        if unknown:
            raise ValueError(f"validation losses for unknown tasks {unknown}; tasks are {list(self.tasks)}")
        active = self.active_tasks
        loss_by_task = {}
        for task in active:
            if task not in val_loss_by_task:
                raise ValueError(f"no validation loss for active task {task!r} at epoch {epoch}")
            loss_by_task[task] = float(val_loss_by_task[task])
            if not math.isfinite(loss_by_task[task]):
                raise ValueError(f"validation loss of task {task!r} at epoch {epoch} is {loss_by_task[task]}")

        self._last_epoch = epoch
        for task in active:
            self._watch[task].observe(epoch, loss_by_task[task], self.min_delta, self.counter == "cumulative")
        converged = [t for t in active if self._watch[t].counter >= self.patience]
        if self.mode == "none" or not converged:
            return []

        if self.mode == "early-stop":
            decisions = [FreezeDecision(t, epoch, "stop", None, None) for t in converged]
            self._stopped.extend(converged)
        elif not self._trunk_frozen:
            if len(converged) < self.trunk_quorum:
                return []
            # Quorum 1 keeps Algorithm 1's first-in-order (under the cumulative counter the two may differ).
            winner = converged[0] if self.trunk_quorum == 1 else self._latest_best(converged)
            decisions = [FreezeDecision(winner, epoch, "freeze_trunk", self._watch[winner].best_epoch, "model")]
            self._trunk_frozen = True
            self._frozen.append(winner)
            for task in self.active_tasks:
                self._watch[task] = _TaskWatch()
        else:
            decisions = [FreezeDecision(t, epoch, "freeze_head", self._watch[t].best_epoch, "head") for t in converged]
            self._frozen.extend(converged)
        self.events.extend(decisions)
        return decisions

    def _latest_best(self, tasks: Sequence[str]) -> str:
        """The task whose best epoch is the latest; the first in order among equals (``max`` keeps the first)."""
        return max(tasks, key=lambda task: self._watch[task].best_epoch)

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON types only; an infinite best loss (no best yet) is stored as None."""
        return {
            "tasks": list(self.tasks),
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
            "counter": self.counter,
            "trunk_quorum": self.trunk_quorum,
            "watch": {
                task: {
                    "best_loss": None if math.isinf(w.best_loss) else w.best_loss,
                    "best_epoch": w.best_epoch,
                    "counter": w.counter,
                }
                for task, w in self._watch.items()
            },
            "frozen_tasks": list(self._frozen),
            "stopped_tasks": list(self._stopped),
            "trunk_frozen": self._trunk_frozen,
            "last_epoch": self._last_epoch,
            "events": [asdict(event) for event in self.events],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state_dict`; the tasks, patience, min_delta, mode, counter and quorum must be the
        same (a state saved before counter or trunk_quorum existed holds their defaults)."""
        configured = {"tasks": list(self.tasks), "patience": self.patience, "min_delta": self.min_delta,
                      "mode": self.mode, "counter": self.counter, "trunk_quorum": self.trunk_quorum}
        for key, value in configured.items():
            saved = state.get(key, LATER_KEY_DEFAULTS.get(key))
            if saved != value:
                raise ValueError(f"Early Freeze state has {key}={saved!r}, this run has {key}={value!r}")
        self._watch = {
            task: _TaskWatch(
                math.inf if entry["best_loss"] is None else float(entry["best_loss"]), entry["best_epoch"],
                int(entry["counter"])
            )
            for task, entry in state["watch"].items()
        }
        self._frozen = list(state["frozen_tasks"])
        self._stopped = list(state["stopped_tasks"])
        self._trunk_frozen = bool(state["trunk_frozen"])
        self._last_epoch = state["last_epoch"]
        self.events = [FreezeDecision(**event) for event in state["events"]]


# ---------------------------------------------------------------- applying decisions to a model
#
# The model (pipeline.model.MultiTaskNet, unwrapped from DDP) has ``heads`` (a ModuleDict by task name,
# hence the "heads.<task>." state-dict keys), ``freeze_trunk()`` and ``freeze_head(task)``.


def take_snapshot(model: nn.Module, scope: str) -> dict[str, torch.Tensor]:
    """A CPU copy of ``model``'s state dict: everything (scope "model") or only ``heads.*`` (scope "heads")."""
    if scope not in ("model", "heads"):
        raise ValueError(f"snapshot scope must be 'model' or 'heads', got {scope!r}")
    return {
        name: tensor.detach().to("cpu", copy=True)
        for name, tensor in model.state_dict().items()
        if scope == "model" or name.startswith(HEADS_PREFIX)
    }


def restore_from_snapshot(model: nn.Module, snapshot: Mapping[str, torch.Tensor], scope: str,
                          task: str | None = None) -> None:
    """Copy ``snapshot`` into ``model`` in place: all of it (scope "model") or only ``task``'s head (scope "head")."""
    if scope == "model":
        model.load_state_dict(snapshot)
        return
    if scope != "head" or task is None:
        raise ValueError(f"restore scope must be 'model', or 'head' with a task; got scope={scope!r}, task={task!r}")
    prefix = f"{HEADS_PREFIX}{task}."
    head_state = {name: tensor for name, tensor in model.state_dict().items() if name.startswith(prefix)}
    if not head_state:
        raise ValueError(f"the model has no state under {prefix!r}")
    missing = sorted(set(head_state) - set(snapshot))
    if missing:
        raise ValueError(f"the snapshot lacks {missing}")
    with torch.no_grad():
        for name, tensor in head_state.items():
            tensor.copy_(snapshot[name])  # state_dict tensors share storage with the parameters and buffers


class SnapshotStore:
    """Model snapshots by epoch, on the CPU, kept only while an Early Freeze decision may restore them."""

    def __init__(self) -> None:
        self._snapshots: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def epochs(self) -> tuple[int, ...]:
        return tuple(sorted(self._snapshots))

    def put(self, epoch: int, model: nn.Module, machine: EarlyFreeze) -> bool:
        """Snapshot ``model`` as validated at ``epoch``, if ``machine`` may restore it; returns whether it did.

        Call after ``machine.update(epoch, …)`` (which decides whether ``epoch`` is a task's best) and
        before its decisions are applied (which change the model).
        """
        if epoch not in machine.needed_snapshot_epochs():
            return False
        self._snapshots[epoch] = take_snapshot(model, machine.snapshot_scope())
        return True

    def get(self, epoch: int) -> dict[str, torch.Tensor]:
        if epoch not in self._snapshots:
            raise KeyError(f"no snapshot of epoch {epoch}; kept: {list(self.epochs)}")
        return self._snapshots[epoch]

    def prune(self, needed_epochs: set[int]) -> None:
        """Drop the snapshots of every epoch not in ``needed_epochs``."""
        for epoch in [e for e in self._snapshots if e not in needed_epochs]:
            del self._snapshots[epoch]

    def state_dict(self, share_with: Mapping[str, torch.Tensor] | None = None, prefix: str = "") -> dict[str, Any]:
        """Tensors inside: for ``torch.save`` with the checkpoint, not for JSON.

        A snapshot tensor equal to ``share_with[prefix + name]`` (the model's current state, saved beside)
        is replaced by that tensor, so that ``torch.save`` stores its bytes once: the snapshot of the epoch
        just validated, and frozen parameters, are the current weights.
        """
        share_with = share_with or {}
        shared = {}
        for epoch, snapshot in self._snapshots.items():
            shared[epoch] = {}
            for name, tensor in snapshot.items():
                current = share_with.get(prefix + name)
                same = current is not None and current.dtype == tensor.dtype and current.shape == tensor.shape \
                    and torch.equal(current.detach().cpu(), tensor)
                shared[epoch][name] = current if same else tensor
        return {"snapshots": shared}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        # Copies on the CPU: a tensor shared with the saved model state must not follow the live model.
        self._snapshots = {int(epoch): {name: tensor.detach().to("cpu", copy=True) for name, tensor in snapshot.items()}
                           for epoch, snapshot in state["snapshots"].items()}


def apply_decision(model: nn.Module, decision: FreezeDecision, store: SnapshotStore) -> None:
    """Restore the snapshot ``decision`` names and freeze what it says.

    "stop" (the early-stopping baseline) restores nothing and leaves the trunk training; the stopped
    task's head is frozen where it is, so that weight decay and Adam's momentum do not move it further.
    """
    if decision.kind != "stop":
        restore_from_snapshot(model, store.get(decision.restore_epoch), decision.restore_scope, decision.task)
    if decision.kind == "freeze_trunk":
        model.freeze_trunk()
    model.freeze_head(decision.task)
    # An optimizer that zeroes gradients instead of dropping them would still apply momentum and weight
    # decay to a frozen parameter; one without a gradient is skipped.
    for parameter in model.parameters():
        if not parameter.requires_grad:
            parameter.grad = None
