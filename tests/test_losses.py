"""The loss weightings of thesis 3.4 and their baselines, checked against small hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses import WEIGHTINGS, LearnedWeighting, build_weighting

NAN = math.nan


def test_registry_names_every_strategy_and_unknown_name_lists_them() -> None:
    assert set(WEIGHTINGS) == {"learned", "equal", "fixed", "uncertainty", "dwa", "rlw", "famo", "gradnorm", "dbmtl",
                               "pcgrad", "alignedmtl"}
    with pytest.raises(ValueError, match="unknown loss weighting 'nashmtl'; known: learned, equal, fixed, uncertainty"):
        build_weighting("nashmtl", ["a", "b"])
    with pytest.raises(ValueError, match="bad options.*'equal'"):
        build_weighting("equal", ["a", "b"], lam=0.1)


def test_learned_weights_start_random_on_the_simplex() -> None:
    torch.manual_seed(0)
    weights = build_weighting("learned", ["a", "b", "c"]).weights()
    torch.manual_seed(0)
    assert build_weighting("learned", ["a", "b", "c"]).weights() == weights
    assert sum(weights.values()) == pytest.approx(1.0) and min(weights.values()) >= 0
    assert len(set(weights.values())) == 3


def test_learned_total_is_weighted_sum_plus_lam_times_squared_norm_over_the_present_tasks() -> None:
    weighting = build_weighting("learned", ["a", "b", "c"], lam=0.3)
    set_logits(weighting, [0.4, -1.0, 0.1])
    assert weighting.combine({}).item() == 0.0
    total = weighting.combine({"a": torch.tensor(2.0), "c": torch.tensor(5.0)})  # b absent: no term, no weight
    w_a, w_c = math.exp(0.4) / (math.exp(0.4) + math.exp(0.1)), math.exp(0.1) / (math.exp(0.4) + math.exp(0.1))
    assert total.item() == pytest.approx(w_a * 2.0 + w_c * 5.0 + 0.3 * (w_a**2 + w_c**2), rel=1e-6)


def set_logits(weighting: LearnedWeighting, logits: list[float]) -> None:
    with torch.no_grad():
        for task, value in zip(weighting.task_names, logits):
            weighting.logits[task].fill_(value)


def logit_values(weighting: LearnedWeighting) -> list[float]:
    return [weighting.logits[task].item() for task in weighting.task_names]


def logit_gradients(weighting: LearnedWeighting) -> list[float | None]:
    return [None if weighting.logits[task].grad is None else weighting.logits[task].grad.item()
            for task in weighting.task_names]


def test_one_sgd_step_on_learned_weights_follows_the_softmax_gradient() -> None:
    lam, lr, losses = 0.1, 0.5, [10.0, 1.0]
    weighting = build_weighting("learned", ["dominant", "small"], lam=lam)
    set_logits(weighting, [0.2, -0.1])
    optimizer = torch.optim.SGD(weighting.parameters(), lr=lr)
    weighting.combine({"dominant": torch.tensor(losses[0]), "small": torch.tensor(losses[1])}).backward()

    # d/dθ_k [Σ w_i L_i + λ Σ w_i²] with w = softmax(θ): w_k (L_k - Σ w_i L_i) + 2λ w_k (w_k - Σ w_i²)
    exps = [math.exp(0.2), math.exp(-0.1)]
    w = [e / sum(exps) for e in exps]
    mean_loss = sum(wi * li for wi, li in zip(w, losses))
    squared_norm = sum(wi**2 for wi in w)
    gradient = [w[k] * (losses[k] - mean_loss) + 2 * lam * w[k] * (w[k] - squared_norm) for k in range(2)]
    assert logit_gradients(weighting) == pytest.approx(gradient, rel=1e-5)
    assert gradient[0] > 0 > gradient[1]

    optimizer.step()
    assert logit_values(weighting) == pytest.approx([0.2 - lr * gradient[0], -0.1 - lr * gradient[1]], rel=1e-5)
    assert weighting.weights()["dominant"] < w[0]


def test_two_present_tasks_get_the_hand_computed_gradient_and_the_absent_one_none() -> None:
    lam, losses = 0.1, [3.0, 0.5]
    weighting = build_weighting("learned", ["a", "absent", "b"], lam=lam)
    set_logits(weighting, [0.5, 2.0, -0.5])
    weighting.combine({"a": torch.tensor(losses[0]), "b": torch.tensor(losses[1])}).backward()
    # By hand: w = softmax(0.5, -0.5) = (0.7311, 0.2689); Σ w L = 2.3276; Σ w² = 0.6068.
    # dθ_a = 0.7311 (3 - 2.3276) + 0.2 * 0.7311 (0.7311 - 0.6068) = 0.4915 + 0.0182 = 0.5097; dθ_b = -dθ_a.
    grad_a, grad_absent, grad_b = logit_gradients(weighting)
    assert grad_a == pytest.approx(0.5097, abs=2e-4)
    assert grad_b == pytest.approx(-grad_a, rel=1e-6)
    assert grad_absent is None


def test_replay_with_an_absent_task_keeps_the_present_weights_on_the_simplex_and_the_absent_logit_untouched() -> None:
    torch.manual_seed(3)
    weighting = build_weighting("learned", ["age", "gender", "frozen"], lam=0.1)
    frozen_before = weighting.logits["frozen"].detach().clone()
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1)
    losses = {"age": torch.tensor(1.2), "gender": torch.tensor(0.4)}
    for _ in range(2000):
        optimizer.zero_grad()
        weighting.combine(losses).backward()
        optimizer.step()
    present = weighting.task_weights(losses)
    assert present.sum().item() == pytest.approx(1.0, abs=1e-6)
    # 1.2 w + 0.4 (1 - w) + 0.1 (w² + (1 - w)²) falls all the way to w_age = 0: weight goes to the smaller
    # loss among the training tasks, never to the absent one (0.997 of it did with a softmax over all three).
    assert present[1].item() > 0.99
    assert torch.equal(weighting.logits["frozen"].detach(), frozen_before)
    assert weighting.logits["frozen"].grad is None


def test_a_frozen_task_leaves_the_optimizer_and_gets_zero_weight_in_the_logged_weights() -> None:
    weighting = build_weighting("learned", ["a", "b", "c"])
    weighting.freeze_task("b")
    assert [p.requires_grad for p in weighting.task_parameters("b")] == [False]
    logged = weighting.weights()
    assert logged["b"] == 0.0 and logged["a"] + logged["c"] == pytest.approx(1.0)
    assert sum(p.requires_grad for p in weighting.parameters()) == 2


def test_a_checkpoint_with_one_logit_vector_loads_into_per_task_logits() -> None:
    weighting = build_weighting("learned", ["a", "b"])
    weighting.load_state_dict({"logits": torch.tensor([0.25, -0.5])})
    assert logit_values(weighting) == [0.25, -0.5]


def train_learned_weights(lam: float, steps: int, losses: tuple[float, float] = (10.0, 1.0)) -> list[float]:
    """SGD on the weights alone, for constant task losses; the weight after every step."""
    weighting = build_weighting("learned", ["dominant", "small"], lam=lam)
    set_logits(weighting, [0.3, -0.3])
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        weighting.combine({"dominant": torch.tensor(losses[0]), "small": torch.tensor(losses[1])}).backward()
        optimizer.step()
        history.append(weighting.weights()["dominant"])
    return history


def test_learned_weight_moves_steadily_away_from_the_dominant_loss() -> None:
    history = train_learned_weights(lam=0.1, steps=5)
    assert all(later < earlier for earlier, later in zip(history, history[1:]))


def test_regulariser_keeps_learned_weights_closer_to_uniform() -> None:
    unregularised = train_learned_weights(lam=0.0, steps=400)[-1]
    regularised = train_learned_weights(lam=10.0, steps=400)[-1]
    assert abs(regularised - 0.5) < abs(unregularised - 0.5)
    # The minimum of 10 w + 1 (1 - w) + 10 (w² + (1 - w)²) over w in [0, 1] is at w = 11/40.
    assert regularised == pytest.approx(11 / 40, abs=1e-3)
    assert unregularised < 0.05


def test_equal_weighting_is_the_mean_over_all_tasks_with_absent_ones_contributing_zero() -> None:
    weighting = build_weighting("equal", ["a", "b", "c"])
    assert weighting.weights() == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    total = weighting.combine({"a": torch.tensor(2.0), "b": torch.tensor(4.0)})
    assert total.item() == pytest.approx((2.0 + 4.0 + 0.0) / 3, rel=1e-6)
    assert weighting.combine({}).item() == 0.0


def test_fixed_one_hot_weighting_equals_the_single_task_loss_exactly() -> None:
    weighting = build_weighting("fixed", ["a", "b", "c"], weights={"b": 1.0})
    loss_b = torch.tensor(0.123456789, requires_grad=True) * 3.0
    total = weighting.combine({"a": torch.tensor(7.0), "b": loss_b, "c": torch.tensor(NAN)})
    assert torch.equal(total, loss_b)
    assert weighting.weights() == {"a": 0.0, "b": 1.0, "c": 0.0}


def test_fixed_weights_must_name_known_tasks_and_be_positive_somewhere() -> None:
    with pytest.raises(ValueError, match="unknown tasks \\['z'\\]"):
        build_weighting("fixed", ["a", "b"], weights={"z": 1.0})
    with pytest.raises(ValueError, match="positive weight"):
        build_weighting("fixed", ["a", "b"], weights={})


def test_uncertainty_total_matches_hand_computation() -> None:
    weighting = build_weighting("uncertainty", ["a", "b", "c"])
    with torch.no_grad():
        for task, value in zip("abc", [0.3, -0.2, 5.0]):
            weighting.log_variances[task].fill_(value)
    total = weighting.combine({"a": torch.tensor(2.0), "b": torch.tensor(0.5)})  # c absent: no term at all
    expected = 2.0 / (2 * math.exp(0.3)) + 0.3 / 2 + 0.5 / (2 * math.exp(-0.2)) - 0.2 / 2
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert weighting.weights()["b"] == pytest.approx(1 / (2 * math.exp(-0.2)), rel=1e-6)


def test_uncertainty_gradient_at_zero_log_variance_is_one_minus_loss_over_two() -> None:
    weighting = build_weighting("uncertainty", ["a", "b", "c"])
    assert weighting.weights() == {"a": 0.5, "b": 0.5, "c": 0.5}
    weighting.combine({"a": torch.tensor(2.0), "b": torch.tensor(0.5)}).backward()
    gradients = [weighting.log_variances[task].grad for task in "abc"]
    assert [g.item() for g in gradients[:2]] == pytest.approx([(1 - 2.0) / 2, (1 - 0.5) / 2])
    assert gradients[2] is None  # absent: no gradient at all


def test_uncertainty_leaves_an_absent_task_bit_identical_under_adam() -> None:
    weighting = build_weighting("uncertainty", ["a", "b"])
    optimizer = torch.optim.Adam(weighting.parameters(), lr=0.1, weight_decay=1e-5)
    for step in range(20):
        optimizer.zero_grad()
        # b is present for the first 10 steps (Adam builds momentum), then absent
        losses = {"a": torch.tensor(2.0)} | ({"b": torch.tensor(0.5)} if step < 10 else {})
        weighting.combine(losses).backward()
        optimizer.step()
        if step == 9:
            b_when_absent = weighting.log_variances["b"].detach().clone()
    assert torch.equal(weighting.log_variances["b"].detach(), b_when_absent)


def test_losses_for_unknown_tasks_are_an_error() -> None:
    with pytest.raises(KeyError, match="unknown tasks \\['z'\\]"):
        build_weighting("learned", ["a"]).combine({"z": torch.tensor(1.0)})
