"""Early Freeze: the decision machine on hand-computed loss sequences, and its decisions on a toy model."""

from __future__ import annotations

import copy
import io
import json
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from pipeline.freeze import (
    EarlyFreeze, FreezeDecision, SnapshotStore, apply_decision, restore_from_snapshot, take_snapshot,
)

# Validation losses by epoch for tasks a, b with patience 2 and min_delta 0.05.
SCRIPT = [
    {"a": 1.00, "b": 2.00},  # 0: both improve
    {"a": 0.80, "b": 1.80},  # 1: a's best
    {"a": 0.78, "b": 1.60},  # 2: a gains 0.02 < min_delta: counter 1
    {"a": 0.90, "b": 1.50},  # 3: a's counter 2 -> freeze trunk at epoch 1; b's watch restarts
    {"b": 1.70},  # 4: b's first loss on the frozen trunk is its new best, though worse than 1.50
    {"b": 1.66},  # 5: gains 0.04 < min_delta: counter 1
    {"b": 1.50},  # 6: b's best
    {"b": 1.60},  # 7: counter 1
    {"b": 1.49},  # 8: gains 0.01 < min_delta: counter 2 -> freeze b's head at epoch 6
]
TRUNK_FREEZE = FreezeDecision("a", 3, "freeze_trunk", 1, "model")
HEAD_FREEZE = FreezeDecision("b", 8, "freeze_head", 6, "head")


def scripted_machine(**overrides) -> EarlyFreeze:
    return EarlyFreeze(("a", "b"), **({"patience": 2, "min_delta": 0.05} | overrides))


def decisions_by_epoch(machine: EarlyFreeze, script: list[dict[str, float]],
                       first_epoch: int = 0) -> dict[int, list[FreezeDecision]]:
    return {epoch: machine.update(epoch, losses) for epoch, losses in enumerate(script, start=first_epoch)}


# ---------------------------------------------------------------- the decision machine


def test_early_freeze_freezes_trunk_at_best_epoch_of_first_converged_task_then_head_of_the_next() -> None:
    machine = scripted_machine()
    decided = decisions_by_epoch(machine, SCRIPT[:4])
    assert decided == {0: [], 1: [], 2: [], 3: [TRUNK_FREEZE]}
    assert machine.trunk_frozen and machine.frozen_tasks == ("a",) and machine.active_tasks == ("b",)
    assert machine.loss_tasks() == ("b",)
    assert machine.best_epoch_by_task["b"] is None and machine.snapshot_scope() == "heads"

    decided = decisions_by_epoch(machine, SCRIPT[4:], first_epoch=4)
    assert decided == {4: [], 5: [], 6: [], 7: [], 8: [HEAD_FREEZE]}
    assert machine.frozen_tasks == ("a", "b") and machine.all_done and machine.loss_tasks() == ()
    assert machine.events == [TRUNK_FREEZE, HEAD_FREEZE]


def test_improvement_smaller_than_min_delta_is_no_improvement() -> None:
    strict, lenient = scripted_machine(), scripted_machine(min_delta=0.0)
    decisions_by_epoch(strict, SCRIPT[:3])
    decisions_by_epoch(lenient, SCRIPT[:3])
    assert strict.best_epoch_by_task["a"] == 1
    assert lenient.best_epoch_by_task["a"] == 2 and lenient.update(3, SCRIPT[3]) == []


def test_only_the_first_task_in_order_freezes_the_trunk_when_two_converge_in_one_epoch() -> None:
    losses = [{"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 2.0, "b": 2.0, "c": 0.5}, {"b": 3.0, "c": 3.0},
              {"b": 4.0, "c": 2.0}]
    machine = EarlyFreeze(("a", "b", "c"), patience=1)
    decided = decisions_by_epoch(machine, losses)
    assert decided == {
        0: [],
        1: [FreezeDecision("a", 1, "freeze_trunk", 0, "model")],
        2: [],  # b converged at epoch 1 too, but its watch restarted with the trunk freeze
        3: [FreezeDecision("b", 3, "freeze_head", 2, "head")],
    }
    reversed_order = EarlyFreeze(("b", "a", "c"), patience=1)
    decisions_by_epoch(reversed_order, losses[:2])
    assert reversed_order.frozen_tasks == ("b",)


def test_several_heads_may_freeze_in_one_epoch_once_the_trunk_is_frozen() -> None:
    machine = EarlyFreeze(("a", "b", "c"), patience=1)
    losses = [{"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 2.0, "b": 0.9, "c": 0.9}, {"b": 0.8, "c": 0.8},
              {"b": 0.9, "c": 0.9}]
    decided = decisions_by_epoch(machine, losses)
    assert decided[3] == [FreezeDecision("b", 3, "freeze_head", 2, "head"),
                          FreezeDecision("c", 3, "freeze_head", 2, "head")]
    assert machine.all_done


def test_early_stop_mode_stops_converged_tasks_without_restoring_or_restarting_the_others() -> None:
    machine = EarlyFreeze(("a", "b"), patience=1, mode="early-stop")
    decided = decisions_by_epoch(machine, [{"a": 1.0, "b": 1.0}, {"a": 1.2, "b": 0.9}])
    assert decided[1] == [FreezeDecision("a", 1, "stop", None, None)]
    assert machine.stopped_tasks == ("a",) and machine.frozen_tasks == () and not machine.trunk_frozen
    assert machine.loss_tasks() == ("b",) and machine.needed_snapshot_epochs() == set()
    # b keeps its best of epoch 1: a worse loss at epoch 2 stops it.
    assert machine.update(2, {"b": 0.95}) == [FreezeDecision("b", 2, "stop", None, None)]
    assert machine.all_done and machine.loss_tasks() == ()


def test_none_mode_never_decides_but_tracks_bests() -> None:
    machine = EarlyFreeze(("a", "b"), patience=1, mode="none")
    decided = decisions_by_epoch(machine, [{"a": 1.0 + epoch, "b": 2.0 - epoch / 10} for epoch in range(6)])
    assert all(decisions == [] for decisions in decided.values()) and machine.events == []
    assert machine.loss_tasks() == ("a", "b") and not machine.all_done
    assert machine.best_epoch_by_task == {"a": 0, "b": 5} and machine.best_loss_by_task["a"] == 1.0
    assert machine.needed_snapshot_epochs() == set()


def test_needed_snapshot_epochs_are_the_best_epochs_of_active_tasks() -> None:
    machine = scripted_machine()
    needed = [(machine.update(epoch, losses), machine.needed_snapshot_epochs())[1]
              for epoch, losses in enumerate(SCRIPT)]
    assert needed == [{0}, {1}, {1, 2}, set(), {4}, {4}, {6}, {6}, set()]


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"tasks": ("a",), "patience": 0}, "patience"),
        ({"tasks": ("a",), "patience": 1.5}, "patience"),
        ({"tasks": ("a",), "patience": 2, "mode": "early-thaw"}, "mode"),
        ({"tasks": ("a",), "patience": 2, "min_delta": -0.1}, "min_delta"),
        ({"tasks": ("a", "a"), "patience": 2}, "unique"),
        ({"tasks": (), "patience": 2}, "at least one task"),
    ],
)
def test_invalid_arguments_are_refused(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EarlyFreeze(**arguments)


@pytest.mark.parametrize(
    "losses, message",
    [({"a": 1.0}, "'b'"), ({"a": 1.0, "b": float("nan")}, "'b'"), ({"a": 1.0, "b": 1.0, "c": 1.0}, "unknown tasks")],
)
def test_update_refuses_missing_non_finite_or_unknown_losses(losses: dict, message: str) -> None:
    machine = scripted_machine()
    with pytest.raises(ValueError, match=message):
        machine.update(0, losses)
    assert machine.best_epoch_by_task == {"a": None, "b": None}  # a refused update changes nothing


def test_update_refuses_an_epoch_that_does_not_increase() -> None:
    machine = scripted_machine()
    machine.update(3, SCRIPT[0])
    with pytest.raises(ValueError, match="increase"):
        machine.update(3, SCRIPT[1])


def assert_a_resumed_machine_continues_exactly(new_machine, script, split_epoch: int) -> EarlyFreeze:
    """Run ``script`` straight, and again stopped after ``split_epoch`` and resumed from a JSON round trip of
    the state: the same decisions and the same final state. Returns the resumed machine."""
    uninterrupted = new_machine()
    expected = decisions_by_epoch(uninterrupted, script)

    first = new_machine()
    decided = decisions_by_epoch(first, script[: split_epoch + 1])
    resumed = new_machine()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    decided |= decisions_by_epoch(resumed, script[split_epoch + 1 :], first_epoch=split_epoch + 1)

    assert decided == expected
    assert resumed.state_dict() == uninterrupted.state_dict()
    assert resumed.events == uninterrupted.events and resumed.frozen_tasks == uninterrupted.frozen_tasks
    return resumed


@pytest.mark.parametrize("split_epoch", range(len(SCRIPT)))
def test_state_dict_json_round_trip_continues_exactly_as_an_uninterrupted_run(split_epoch: int) -> None:
    assert_a_resumed_machine_continues_exactly(scripted_machine, SCRIPT, split_epoch)


def test_load_state_dict_refuses_a_different_configuration() -> None:
    state = scripted_machine().state_dict()
    with pytest.raises(ValueError, match="patience"):
        scripted_machine(patience=3).load_state_dict(state)


# ---------------------------------------------------------------- a quorum of tasks for the trunk

# Validation losses by epoch for tasks a, b, c with patience 2, min_delta 0 and trunk_quorum 2.
QUORUM_SCRIPT = [
    {"a": 1.0, "b": 1.0, "c": 1.0},  # 0: all best
    {"a": 1.1, "b": 0.9, "c": 0.9},  # 1: a counter 1; b, c best
    {"a": 1.2, "b": 0.8, "c": 0.8},  # 2: a counter 2, out of patience alone: no quorum; b, c best
    {"a": 1.3, "b": 0.85, "c": 0.7},  # 3: a counter 3, still waiting; b counter 1; c best
    {"a": 1.4, "b": 0.86, "c": 0.6},  # 4: b counter 2: a (best 0) and b (best 2) -> trunk at 2, winner b
    {"a": 1.0, "c": 0.5},  # 5: first losses on the frozen trunk: both best
    {"a": 1.1, "c": 0.6},  # 6: both counter 1
    {"a": 1.2, "c": 0.4},  # 7: a counter 2 -> its head alone at epoch 5 (no quorum for heads); c best
]
QUORUM_TRUNK_FREEZE = FreezeDecision("b", 4, "freeze_trunk", 2, "model")
QUORUM_HEAD_FREEZE = FreezeDecision("a", 7, "freeze_head", 5, "head")


def quorum_machine(**overrides) -> EarlyFreeze:
    return EarlyFreeze(("a", "b", "c"), **({"patience": 2, "trunk_quorum": 2} | overrides))


def test_a_trunk_quorum_of_1_is_algorithm_1() -> None:
    explicit, default = scripted_machine(trunk_quorum=1), scripted_machine()
    assert decisions_by_epoch(explicit, SCRIPT) == decisions_by_epoch(default, SCRIPT)
    assert explicit.events == [TRUNK_FREEZE, HEAD_FREEZE]
    # On the quorum script, a alone freezes the trunk at its best epoch, 0.
    assert decisions_by_epoch(quorum_machine(trunk_quorum=1), QUORUM_SCRIPT[:3])[2] == [
        FreezeDecision("a", 2, "freeze_trunk", 0, "model")]


def test_trunk_waits_for_a_quorum_and_restores_the_latest_best_epoch_among_the_stalled_tasks() -> None:
    machine = quorum_machine()
    decided = decisions_by_epoch(machine, QUORUM_SCRIPT[:4])
    assert decided == {0: [], 1: [], 2: [], 3: []}  # a ran out of patience at 2 and stays alone
    assert not machine.trunk_frozen and machine.active_tasks == ("a", "b", "c")

    assert machine.update(4, QUORUM_SCRIPT[4]) == [QUORUM_TRUNK_FREEZE]
    assert machine.trunk_frozen and machine.frozen_tasks == ("b",) and machine.active_tasks == ("a", "c")
    assert machine.best_epoch_by_task == {"a": None, "b": 2, "c": None}  # the others' watches restarted

    decided = decisions_by_epoch(machine, QUORUM_SCRIPT[5:], first_epoch=5)
    assert decided == {5: [], 6: [], 7: [QUORUM_HEAD_FREEZE]}
    assert machine.frozen_tasks == ("b", "a") and machine.active_tasks == ("c",)


def test_a_waiting_task_that_improves_again_leaves_the_quorum() -> None:
    machine = quorum_machine(patience=1)
    losses = [{"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1.1, "b": 0.9, "c": 0.9}, {"a": 0.95, "b": 1.0, "c": 0.8}]
    decided = decisions_by_epoch(machine, losses)
    assert decided == {0: [], 1: [], 2: []}  # a out at 1, b out at 2; a improved at 2: one out at a time
    assert machine.update(3, {"a": 1.0, "b": 1.0, "c": 0.7}) == [FreezeDecision("a", 3, "freeze_trunk", 2, "model")]


def test_the_quorum_breaks_ties_between_equally_late_best_epochs_by_task_order() -> None:
    losses = [{"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 1.1, "b": 1.1, "c": 0.9}]  # a and b: best 0, out at 1
    assert decisions_by_epoch(EarlyFreeze(("a", "b", "c"), patience=1, trunk_quorum=2), losses)[1] == [
        FreezeDecision("a", 1, "freeze_trunk", 0, "model")]
    assert decisions_by_epoch(EarlyFreeze(("b", "a", "c"), patience=1, trunk_quorum=2), losses)[1] == [
        FreezeDecision("b", 1, "freeze_trunk", 0, "model")]


def test_needed_snapshot_epochs_keep_the_best_epochs_of_waiting_tasks() -> None:
    machine = quorum_machine()
    needed = [(machine.update(epoch, losses), machine.needed_snapshot_epochs())[1]
              for epoch, losses in enumerate(QUORUM_SCRIPT)]
    assert needed == [{0}, {0, 1}, {0, 2}, {0, 2, 3}, set(), {5}, {5}, {7}]


def test_the_trunk_quorum_has_no_effect_on_early_stop_and_none() -> None:
    for mode in ("early-stop", "none"):
        assert decisions_by_epoch(quorum_machine(mode=mode, trunk_quorum=3), QUORUM_SCRIPT[:3]) == \
            decisions_by_epoch(quorum_machine(mode=mode, trunk_quorum=1), QUORUM_SCRIPT[:3])
    stopping = quorum_machine(mode="early-stop", trunk_quorum=3)
    assert decisions_by_epoch(stopping, QUORUM_SCRIPT[:3])[2] == [FreezeDecision("a", 2, "stop", None, None)]


@pytest.mark.parametrize("trunk_quorum", [0, 1.5, True])
def test_a_trunk_quorum_that_is_not_a_positive_integer_is_refused(trunk_quorum) -> None:
    with pytest.raises(ValueError, match="trunk_quorum must be an integer >= 1"):
        EarlyFreeze(("a", "b"), patience=2, trunk_quorum=trunk_quorum)


def test_a_trunk_quorum_above_the_number_of_tasks_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match="trunk_quorum 4 is more than the 3 tasks of this run"):
        quorum_machine(trunk_quorum=4)
    assert quorum_machine(trunk_quorum=3).trunk_quorum == 3


@pytest.mark.parametrize("split_epoch", range(len(QUORUM_SCRIPT)))
def test_state_dict_round_trip_keeps_the_quorum_and_the_waiting_tasks(split_epoch: int) -> None:
    resumed = assert_a_resumed_machine_continues_exactly(quorum_machine, QUORUM_SCRIPT, split_epoch)
    with pytest.raises(ValueError, match="trunk_quorum=2, this run has trunk_quorum=3"):
        quorum_machine(trunk_quorum=3).load_state_dict(resumed.state_dict())


def test_a_state_saved_before_the_trunk_quorum_existed_loads_as_a_quorum_of_1() -> None:
    machine = scripted_machine()
    decisions_by_epoch(machine, SCRIPT[:3])
    state = machine.state_dict()
    del state["trunk_quorum"]
    resumed = scripted_machine()
    resumed.load_state_dict(state)
    assert resumed.update(3, SCRIPT[3]) == [TRUNK_FREEZE]
    with pytest.raises(ValueError, match="trunk_quorum=1, this run has trunk_quorum=2"):
        scripted_machine(trunk_quorum=2).load_state_dict(state)


# ---------------------------------------------------------------- applying decisions to a model


class ToyMultiTaskNet(nn.Module):
    """The attribute names and freeze methods of pipeline.model's network, at toy size."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 8)
        self.shared = nn.BatchNorm1d(8)
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 1)})
        self.frozen_modules: list[nn.Module] = []

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        shared = self.shared(self.backbone(features))
        return {task: head(shared) for task, head in self.heads.items()}

    def freeze_trunk(self) -> None:
        self._freeze(self.backbone)
        self._freeze(self.shared)

    def freeze_head(self, task: str) -> None:
        self._freeze(self.heads[task])

    def _freeze(self, module: nn.Module) -> None:
        module.requires_grad_(False)
        module.eval()
        self.frozen_modules.append(module)

    def train(self, mode: bool = True) -> ToyMultiTaskNet:
        super().train(mode)
        for module in self.frozen_modules:
            module.eval()  # frozen BatchNorm keeps its running statistics
        return self


def train_steps(model: ToyMultiTaskNet, optimizer: torch.optim.Optimizer, tasks: tuple[str, ...],
                generator: torch.Generator) -> None:
    model.train()
    for _ in range(3):
        outputs = model(torch.randn(16, 4, generator=generator) * 3 + 1)
        loss = sum((outputs[task] - 1).pow(2).mean() for task in tasks)
        optimizer.zero_grad(set_to_none=False)  # the stricter case: zeroed gradients, not dropped ones
        loss.backward()
        optimizer.step()


@dataclass
class ScriptedRun:
    """What one training run of the toy model with SCRIPT as validation losses went through, by epoch."""

    validated: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # state that was validated
    settled: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)  # state after the decisions
    trainable: dict[int, set[str]] = field(default_factory=dict)  # parameters still requiring grad
    stored: dict[int, dict[int, set[str]]] = field(default_factory=dict)  # store: epoch -> snapshot keys
    events: list[FreezeDecision] = field(default_factory=list)
    store_state: dict = field(default_factory=dict)  # SnapshotStore.state_dict() at the end of epoch 2


@pytest.fixture(scope="module")
def scripted_run() -> ScriptedRun:
    """Train the toy model epoch by epoch as pipeline.train does; states are copied independently of
    the code under test. One run serves every test below (the first optimizer step alone costs ~1 s)."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model, machine, store, run = ToyMultiTaskNet(), scripted_machine(), SnapshotStore(), ScriptedRun()
    # Built once over every parameter, with momentum and weight decay, as a training loop might.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.1)
    for epoch, losses in enumerate(SCRIPT):
        train_steps(model, optimizer, machine.loss_tasks(), generator)
        run.validated[epoch] = copy.deepcopy(model.state_dict())
        decisions = machine.update(epoch, losses)
        store.put(epoch, model, machine)
        for decision in decisions:
            apply_decision(model, decision, store)
        store.prune(machine.needed_snapshot_epochs())
        run.settled[epoch] = copy.deepcopy(model.state_dict())
        run.trainable[epoch] = {name for name, p in model.named_parameters() if p.requires_grad}
        run.stored[epoch] = {e: set(store.get(e)) for e in store.epochs}
        if epoch == 2:
            run.store_state = copy.deepcopy(store.state_dict())
    run.events = machine.events
    return run


def assert_state_equal(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                       prefixes: tuple[str, ...]) -> None:
    checked = [name for name in state if name.startswith(prefixes)]
    assert checked
    for name in checked:
        assert torch.equal(state[name], expected[name]), name


TRUNK = ("backbone.", "shared.")


def test_freeze_trunk_restores_the_whole_model_to_the_best_epoch_of_the_converged_task(
        scripted_run: ScriptedRun) -> None:
    validated = scripted_run.validated
    assert_state_equal(scripted_run.settled[3], validated[1], ("",))  # every tensor, BatchNorm statistics included
    assert not torch.equal(validated[1]["shared.running_mean"], validated[3]["shared.running_mean"])
    assert scripted_run.trainable[3] == {"heads.b.weight", "heads.b.bias"}


def test_frozen_trunk_and_head_stay_bit_identical_while_the_other_head_trains(scripted_run: ScriptedRun) -> None:
    # Epoch 7's training took more optimizer steps with the trunk and head a frozen.
    assert_state_equal(scripted_run.validated[7], scripted_run.validated[1], (*TRUNK, "heads.a."))
    assert not torch.equal(scripted_run.validated[7]["heads.b.weight"], scripted_run.settled[3]["heads.b.weight"])


def test_freeze_head_restores_only_that_head(scripted_run: ScriptedRun) -> None:
    assert scripted_run.events == [TRUNK_FREEZE, HEAD_FREEZE]
    assert_state_equal(scripted_run.settled[8], scripted_run.validated[6], ("heads.b.",))
    assert not torch.equal(scripted_run.validated[6]["heads.b.weight"], scripted_run.validated[8]["heads.b.weight"])
    assert_state_equal(scripted_run.settled[8], scripted_run.validated[1], (*TRUNK, "heads.a."))
    assert scripted_run.trainable[8] == set()


def test_head_freeze_leaves_the_heads_still_training_untouched() -> None:
    model, store = ToyMultiTaskNet(), SnapshotStore()
    store.load_state_dict({"snapshots": {5: {name: torch.full_like(t, 7)
                                             for name, t in take_snapshot(model, "heads").items()}}})
    before = copy.deepcopy(model.state_dict())
    apply_decision(model, FreezeDecision("b", 6, "freeze_head", 5, "head"), store)
    assert_state_equal(model.state_dict(), store.get(5), ("heads.b.",))
    assert_state_equal(model.state_dict(), before, (*TRUNK, "heads.a."))
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {
        "backbone.weight", "backbone.bias", "shared.weight", "shared.bias", "heads.a.weight", "heads.a.bias"
    }


def test_restore_from_snapshot_with_head_scope_leaves_everything_else_untouched() -> None:
    model = ToyMultiTaskNet()
    snapshot = {name: torch.full_like(tensor, 7) for name, tensor in model.state_dict().items()}
    before = copy.deepcopy(model.state_dict())
    restore_from_snapshot(model, snapshot, "head", "a")
    assert_state_equal(model.state_dict(), snapshot, ("heads.a.",))
    assert_state_equal(model.state_dict(), before, (*TRUNK, "heads.b."))
    with pytest.raises(ValueError, match="heads.c."):
        restore_from_snapshot(model, snapshot, "head", "c")


def test_take_snapshot_is_a_cpu_copy_of_the_model_or_of_its_heads() -> None:
    model = ToyMultiTaskNet()
    snapshot = take_snapshot(model, "model")
    with torch.no_grad():
        model.backbone.weight.add_(1)
    assert not torch.equal(snapshot["backbone.weight"], model.backbone.weight)
    assert set(snapshot) == set(model.state_dict()) and all(t.device.type == "cpu" for t in snapshot.values())
    assert set(take_snapshot(model, "heads")) == {"heads.a.weight", "heads.a.bias", "heads.b.weight", "heads.b.bias"}


# ---------------------------------------------------------------- the snapshot store


def test_snapshot_store_keeps_needed_epochs_and_drops_the_rest() -> None:
    model, machine, store = ToyMultiTaskNet(), EarlyFreeze(("a", "b"), patience=3), SnapshotStore()
    kept = []
    for epoch, losses in enumerate([{"a": 1.0, "b": 1.0}, {"a": 0.5, "b": 2.0}, {"a": 0.6, "b": 0.4},
                                    {"a": 0.7, "b": 0.5}]):
        with torch.no_grad():
            model.backbone.weight.fill_(epoch)
        machine.update(epoch, losses)
        store.put(epoch, model, machine)
        store.prune(machine.needed_snapshot_epochs())
        kept.append(store.epochs)
    assert kept == [(0,), (0, 1), (1, 2), (1, 2)]  # epoch 3 improved nothing: never stored
    assert store.get(1)["backbone.weight"].eq(1).all() and store.get(2)["backbone.weight"].eq(2).all()
    with pytest.raises(KeyError, match="epoch 0"):
        store.get(0)


def test_snapshot_store_holds_whole_model_until_trunk_freeze_then_only_heads(scripted_run: ScriptedRun) -> None:
    everything, heads = (set(scripted_run.validated[0]),
                         {"heads.a.weight", "heads.a.bias", "heads.b.weight", "heads.b.bias"})
    assert scripted_run.stored == {
        0: {0: everything},
        1: {1: everything},
        2: {1: everything, 2: everything},
        3: {},
        4: {4: heads},
        5: {4: heads},
        6: {6: heads},
        7: {6: heads},
        8: {},
    }


def test_snapshot_store_state_dict_round_trip_through_torch_save(scripted_run: ScriptedRun) -> None:
    buffer = io.BytesIO()
    torch.save(scripted_run.store_state, buffer)
    buffer.seek(0)
    restored = SnapshotStore()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.epochs == (1, 2)
    for epoch in restored.epochs:
        assert_state_equal(restored.get(epoch), scripted_run.validated[epoch], ("",))


def test_the_cumulative_counter_of_algorithm_1_counts_every_non_improving_validation() -> None:
    """Algorithm 1 never resets Counter[i]; its prose waits for epochs without improvement in a row."""
    losses = [1.0, 1.1, 0.9, 0.95]  # improve, worse, improve, worse
    consecutive = EarlyFreeze(["age"], patience=2, counter="consecutive")
    cumulative = EarlyFreeze(["age"], patience=2, counter="cumulative")
    decisions = {"consecutive": [], "cumulative": []}
    for epoch, loss in enumerate(losses):
        decisions["consecutive"] += consecutive.update(epoch, {"age": loss})
        decisions["cumulative"] += cumulative.update(epoch, {"age": loss})
    assert decisions["consecutive"] == []  # 1 validation without improvement since epoch 2
    assert decisions["cumulative"] == [FreezeDecision("age", 3, "freeze_trunk", 2, "model")]  # 2 in all; best epoch 2
    restored = EarlyFreeze(["age"], patience=2, counter="cumulative")
    restored.load_state_dict(cumulative.state_dict())
    with pytest.raises(ValueError, match="counter='cumulative', this run has counter='consecutive'"):
        EarlyFreeze(["age"], patience=2).load_state_dict(cumulative.state_dict())
