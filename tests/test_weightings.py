"""DWA, RLW and FAMO against steps worked out by hand from their papers' update rules, with absent tasks,
resumes from a state_dict and ranks that must agree."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from pipeline.losses import build_weighting

TASKS = ["a", "absent", "b"]


def losses(**values: float) -> dict[str, torch.Tensor]:
    return {task: torch.tensor(value) for task, value in values.items()}


# ---------------------------------------------------------------- DWA


def test_dwa_weights_every_task_one_for_two_epochs_then_follow_the_epoch_loss_ratios() -> None:
    weighting = build_weighting("dwa", ["a", "b"])  # temperature 2, as in the paper
    assert weighting.combine(losses(a=1.0, b=2.0)).item() == pytest.approx(3.0)  # epoch 0: w = (1, 1)
    weighting.end_epoch({"a": 1.0, "b": 2.0})
    assert weighting.combine(losses(a=1.0, b=2.0)).item() == pytest.approx(3.0)  # epoch 1: no ratio yet
    weighting.end_epoch({"a": 0.5, "b": 1.8})
    # Epoch 2: r = (0.5 / 1.0, 1.8 / 2.0) = (0.5, 0.9); w = 2 exp(r / 2) / (exp(0.25) + exp(0.45)):
    # w_a = 2 / (1 + e^0.2) = 0.900332, w_b = 2 e^0.2 / (1 + e^0.2) = 1.099668 (the slower task gains).
    total = weighting.combine(losses(a=0.4, b=1.5))
    assert total.item() == pytest.approx(0.900332 * 0.4 + 1.099668 * 1.5, rel=1e-5)
    assert weighting.weights() == pytest.approx({"a": 0.900332, "b": 1.099668}, rel=1e-5)


def test_dwa_restricts_the_softmax_to_the_present_tasks() -> None:
    weighting = build_weighting("dwa", TASKS)
    weighting.end_epoch({"a": 1.0, "absent": 1.0, "b": 2.0})
    weighting.end_epoch({"a": 0.5, "absent": 4.0, "b": 1.8})
    history = copy.deepcopy(weighting.state_dict())
    # "absent" (r = 4) would take most of the weight; absent, it takes none and a, b split K = 2 as above.
    assert weighting.combine(losses(a=1.0)).item() == pytest.approx(1.0)  # alone: K softmax = 1
    assert weighting.combine(losses(a=0.4, b=1.5)).item() == pytest.approx(0.900332 * 0.4 + 1.099668 * 1.5, rel=1e-5)
    assert all(torch.equal(tensor, history[name]) for name, tensor in weighting.state_dict().items())


def test_dwa_resumes_with_the_same_weights_and_a_frozen_task_gets_none() -> None:
    weighting = build_weighting("dwa", TASKS, temperature=0.5)
    weighting.end_epoch({"a": 2.0, "absent": 1.0, "b": 1.0})
    weighting.end_epoch({"a": 1.0, "absent": 1.0, "b": 0.9})
    resumed = build_weighting("dwa", TASKS, temperature=0.5)
    resumed.load_state_dict(weighting.state_dict())
    assert resumed.weights() == weighting.weights()
    weighting.freeze_task("absent")
    logged = weighting.weights()
    assert logged["absent"] == 0.0 and logged["a"] + logged["b"] == pytest.approx(2.0)


# ---------------------------------------------------------------- RLW


def rlw_weights(weighting, **values: float) -> list[float]:
    """The weights of one combine call, read back from the total of unit-vector losses."""
    weights = []
    for task in values:
        probe = copy.deepcopy(weighting)
        one_hot = {other: torch.tensor(1.0 if other == task else 0.0) for other in values}
        weights.append(probe.combine(one_hot).item())
    weighting.combine(losses(**values))  # advance the real one
    return weights


def test_rlw_weights_are_the_softmax_of_standard_normal_draws_over_the_present_tasks() -> None:
    weighting = build_weighting("rlw", TASKS, seed=7)
    draws = torch.randn(3, generator=torch.Generator().manual_seed(7)).tolist()  # λ for a, absent, b
    # w = softmax(λ_a, λ_b): the absent task's draw is made (ranks stay in step) but takes no weight.
    expected = [math.exp(draws[0]) / (math.exp(draws[0]) + math.exp(draws[2])),
                math.exp(draws[2]) / (math.exp(draws[0]) + math.exp(draws[2]))]
    assert rlw_weights(weighting, a=2.0, b=3.0) == pytest.approx(expected, rel=1e-6)
    assert build_weighting("rlw", TASKS).weights() == pytest.approx({"a": 1 / 3, "absent": 1 / 3, "b": 1 / 3})


def test_rlw_draws_the_same_whatever_tasks_a_rank_sees() -> None:
    full, partial = build_weighting("rlw", TASKS, seed=1), build_weighting("rlw", TASKS, seed=1)
    for _ in range(3):
        full.combine(losses(a=1.0, absent=1.0, b=1.0))
        partial.combine(losses(b=1.0) if _ % 2 else {})
    assert rlw_weights(full, a=1.0, absent=1.0, b=1.0) == rlw_weights(partial, a=1.0, absent=1.0, b=1.0)


def test_rlw_resumed_from_its_state_dict_draws_what_the_uninterrupted_run_draws() -> None:
    weighting = build_weighting("rlw", TASKS, seed=3)
    for _ in range(5):
        weighting.combine(losses(a=1.0, b=2.0))
    checkpoint = copy.deepcopy(weighting.state_dict())
    resumed = build_weighting("rlw", TASKS, seed=99)  # the seed is in the state
    resumed.load_state_dict(checkpoint)
    for _ in range(3):
        assert rlw_weights(resumed, a=1.0, b=2.0) == rlw_weights(weighting, a=1.0, b=2.0)


# ---------------------------------------------------------------- FAMO


def test_famo_loss_is_c_times_weighted_log_losses_with_gradient_a_convex_combination() -> None:
    weighting = build_weighting("famo", TASKS)
    task_losses = {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(2.0, requires_grad=True)}
    total = weighting.combine(task_losses)
    # ξ = 0: z = (1/2, 1/2); c = 1 / (0.5 / 1 + 0.5 / 2) = 4/3; total = 4/3 * 0.5 log 2 = 0.462098.
    assert total.item() == pytest.approx(0.462098, rel=1e-5)
    total.backward()
    # d total / d L_i = c z_i / L_i = (2/3, 1/3): the network follows Σ w_i ∇L_i with Σ w_i = 1.
    assert [task_losses[t].grad.item() for t in "ab"] == pytest.approx([2 / 3, 1 / 3], rel=1e-6)


def test_two_famo_steps_follow_the_hand_computed_adam_update_and_leave_the_absent_task_untouched() -> None:
    weighting = build_weighting("famo", TASKS)  # lr 0.025, γ = 0.01, Adam betas (0.9, 0.999)
    weighting.combine(losses(a=1.0, b=2.0))
    weighting.after_step(losses(a=0.5, absent=9.0, b=1.8))  # "absent" was not in the step: ignored
    # δ = (log 2, log(2/1.8)) = (0.693147, 0.105361); z = (1/2, 1/2); ∇ξ z·δ = z ⊙ (δ - z·δ) = (0.146947, -0.146947).
    # Adam's first step moves each logit by lr against the sign of its gradient: ξ = (-0.025, 0.025).
    assert [weighting.logits[i].item() for i in (0, 2)] == pytest.approx([-0.025, 0.025], rel=1e-5)
    assert weighting.task_weights(["a", "b"])[0].item() == pytest.approx(1 / (1 + math.exp(0.05)), rel=1e-6)  # 0.487503
    weighting.combine(losses(a=0.5, b=1.8))
    weighting.after_step(losses(a=0.45, b=1.5))
    # δ = (log(0.5/0.45), log(1.8/1.5)) = (0.105361, 0.182322); z = (0.487503, 0.512497); z·δ = 0.144803;
    # g_a = 0.487503 (0.105361 - 0.144803) + 0.01 (-0.025) = -0.019478, g_b = +0.019478.
    # m_a = 0.9 (0.1 * 0.146947) + 0.1 (-0.019478) = 0.011277; v_a = 0.999 (0.001 * 0.146947²) + 0.001 * 0.019478²
    # = 2.19511e-5; step = 0.025 (m_a / 0.19) / sqrt(v_a / 0.001999) = 0.014160: ξ_a = -0.039160, ξ_b = +0.039160.
    assert [weighting.logits[i].item() for i in (0, 2)] == pytest.approx([-0.039160, 0.039160], rel=1e-4)
    absent = TASKS.index("absent")
    assert [buffer[absent].item() for buffer in (weighting.logits, weighting.first_moment, weighting.second_moment,
                                                 weighting.adam_steps)] == [0.0, 0.0, 0.0, 0.0]


def test_famo_logits_follow_torch_adam_with_weight_decay_on_the_softmax_vector_jacobian_product() -> None:
    generator = torch.Generator().manual_seed(0)
    weighting = build_weighting("famo", ["a", "b", "c"], lr=0.05, weight_decay=0.1)
    reference = [torch.zeros((), requires_grad=True) for _ in range(3)]
    optimizer = torch.optim.Adam(reference, lr=0.05, weight_decay=0.1)
    for step in range(6):
        present = ["a", "b", "c"] if step < 3 else ["a", "c"]  # b absent for the last three steps
        before = {t: torch.rand((), generator=generator) + 0.5 for t in present}
        after = {t: before[t] * (0.8 + 0.3 * torch.rand((), generator=generator)) for t in present}
        weighting.combine(before)
        weighting.after_step(after)
        optimizer.zero_grad()
        indices = [["a", "b", "c"].index(t) for t in present]
        decrease = torch.stack([before[t].log() - after[t].log() for t in present])
        (torch.softmax(torch.stack([reference[i] for i in indices]), dim=0) * decrease).sum().backward()
        optimizer.step()
    assert weighting.logits.tolist() == pytest.approx([p.item() for p in reference], abs=1e-6)


def test_famo_resumed_from_its_state_dict_gives_the_same_next_weights() -> None:
    weighting = build_weighting("famo", TASKS)
    for before, after in [((1.0, 2.0), (0.7, 1.9)), ((0.7, 1.9), (0.6, 1.7)), ((0.6, 1.7), (0.59, 1.5))]:
        weighting.combine(losses(a=before[0], b=before[1]))
        weighting.after_step(losses(a=after[0], b=after[1]))
    resumed = build_weighting("famo", TASKS)
    resumed.load_state_dict(copy.deepcopy(weighting.state_dict()))
    for run in (weighting, resumed):
        run.combine(losses(a=0.5, b=1.4))
        run.after_step(losses(a=0.45, b=1.35))
    assert resumed.weights() == weighting.weights()
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in weighting.state_dict().items())


def test_famo_ranks_with_different_batches_end_identical_with_delta_averaged_over_the_ranks_that_had_it() -> None:
    ranks = [build_weighting("famo", TASKS) for _ in range(2)]
    batches = [(losses(a=1.0, b=2.0), losses(a=0.5, b=1.9)),  # rank 0
               (losses(a=1.2), losses(a=1.0))]  # rank 1: b unlabelled, "absent" nowhere
    # What each rank contributes to the all-reduce, from a dry run on a copy.
    contributions = []
    for weighting, (before, after) in zip(ranks, batches):
        dry_run = copy.deepcopy(weighting)
        dry_run.combine(before)
        dry_run.after_step(after, reduce_sum=lambda tensor: contributions.append(tensor.clone()) or tensor)
    total = contributions[0] + contributions[1]
    for weighting, (before, after) in zip(ranks, batches):
        weighting.combine(before)
        weighting.after_step(after, reduce_sum=lambda tensor: total)
    assert all(torch.equal(ranks[0].state_dict()[k], v) for k, v in ranks[1].state_dict().items())
    # δ_a = mean(log 2, log 1.2) = 0.482773, δ_b = log(2/1.9) = 0.051293 (rank 0 only): ξ_a falls, ξ_b rises.
    single = build_weighting("famo", TASKS)
    single.update_logits(torch.tensor([0.482773, 0.0, 0.051293]), torch.tensor([1.0, 0.0, 1.0]))
    assert ranks[0].logits.tolist() == pytest.approx(single.logits.tolist(), abs=1e-6)
    assert ranks[0].logits.tolist() == pytest.approx([-0.025, 0.0, 0.025], rel=1e-5)


def test_a_frozen_famo_task_keeps_its_logit_and_gets_zero_logged_weight() -> None:
    weighting = build_weighting("famo", TASKS)
    weighting.combine(losses(a=1.0, absent=3.0, b=2.0))
    weighting.freeze_task("absent")
    weighting.after_step(losses(a=0.5, absent=1.0, b=1.8))
    assert weighting.logits[TASKS.index("absent")].item() == 0.0
    assert weighting.weights()["absent"] == 0.0
    assert weighting.weights()["a"] + weighting.weights()["b"] == pytest.approx(1.0)
