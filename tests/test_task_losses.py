"""Masked per-task losses, checked against small hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.task_losses import masked_task_losses, predict_age
from pipeline.schema import TASKS

NAN = math.nan
AGE_GENDER_RACE = [TASKS["age"], TASKS["gender"], TASKS["race"]]


def toy_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Four rows; age labelled on rows 0 and 2, gender (one-logit head) on 0 and 1, race on 1 and 3."""
    outputs = {
        "age": torch.tensor([[0.30], [0.50], [0.20], [0.90]]),
        "gender": torch.tensor([[0.0], [2.0], [-1.0], [5.0]]),
        "race": torch.tensor([[3.0, 3.0, 3.0, 3.0, 3.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5, [0.0, 0.0, 0.0, 0.0, 2.0]]),
    }
    labels = torch.tensor([[25.0, 1.0, NAN], [NAN, 0.0, 2.0], [40.0, NAN, NAN], [NAN, NAN, 4.0]])
    return outputs, labels, ~labels.isnan()


def test_masked_losses_equal_hand_computed_losses_over_labelled_rows_only() -> None:
    outputs, labels, mask = toy_batch()
    losses = masked_task_losses(outputs, labels, mask, AGE_GENDER_RACE, age_scale=100.0)

    age_mse = ((0.30 - 0.25) ** 2 + (0.20 - 0.40) ** 2) / 2
    gender_bce = (math.log(2.0) + math.log(1.0 + math.e**2)) / 2  # -log σ(0) and -log(1 - σ(2))
    race_ce = ((math.log(math.e + 4.0) - 0.0) + (math.log(4.0 + math.e**2) - 2.0)) / 2
    assert set(losses) == {"age", "gender", "race"}
    assert losses["age"].item() == pytest.approx(age_mse, rel=1e-6)
    assert losses["gender"].item() == pytest.approx(gender_bce, rel=1e-6)
    assert losses["race"].item() == pytest.approx(race_ce, rel=1e-6)


def test_l1_age_loss_is_mean_absolute_error_in_scaled_units() -> None:
    outputs, labels, mask = toy_batch()
    losses = masked_task_losses(outputs, labels, mask, AGE_GENDER_RACE, age_scale=100.0, regression_loss="l1")
    assert losses["age"].item() == pytest.approx((0.05 + 0.20) / 2, rel=1e-6)


def test_two_output_binary_head_uses_cross_entropy() -> None:
    outputs = {"gender": torch.tensor([[0.0, 1.0], [2.0, 0.0]])}
    losses = masked_task_losses(outputs, torch.tensor([[1.0], [1.0]]), torch.tensor([[True], [True]]), [TASKS["gender"]])
    expected = ((math.log(1 + math.e) - 1.0) + (math.log(math.e**2 + 1) - 0.0)) / 2
    assert losses["gender"].item() == pytest.approx(expected, rel=1e-6)


def test_task_without_labelled_rows_is_absent_and_leaves_other_losses_unchanged() -> None:
    outputs, labels, mask = toy_batch()
    mask[:, 2] = False
    with_race_column = masked_task_losses(outputs, labels, mask, AGE_GENDER_RACE)
    without_race = masked_task_losses(outputs, labels[:, :2], mask[:, :2], AGE_GENDER_RACE[:2])
    assert "race" not in with_race_column
    assert with_race_column.keys() == without_race.keys()
    for task in without_race:
        assert torch.equal(with_race_column[task], without_race[task])


def test_gradient_reaches_only_labelled_rows() -> None:
    outputs, labels, mask = toy_batch()
    age_output = outputs["age"].requires_grad_()
    masked_task_losses(outputs, labels, mask, AGE_GENDER_RACE)["age"].backward()
    assert age_output.grad[[1, 3]].abs().sum() == 0 and age_output.grad[[0, 2]].abs().min() > 0


def test_predict_age_turns_scaled_output_into_years() -> None:
    assert torch.allclose(predict_age(torch.tensor([[0.25], [0.5]]), 80.0), torch.tensor([20.0, 40.0]))


def test_unknown_regression_loss_is_an_error_naming_the_known_ones() -> None:
    outputs, labels, mask = toy_batch()
    with pytest.raises(ValueError, match="huber.*mse, l1"):
        masked_task_losses(outputs, labels, mask, AGE_GENDER_RACE, regression_loss="huber")


# ---------------------------------------------------------------- weightings
