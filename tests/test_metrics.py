"""pipeline.metrics on cases small enough to check by hand."""

import math

import pytest
import torch

from pipeline.metrics import MetricSums, normalized_score
from pipeline.schema import get_task


def test_a_task_without_labels_scores_nan_never_perfect() -> None:
    sums = MetricSums([get_task("age"), get_task("gender")]).summary()
    assert sums["age"]["count"] == 0 and all(math.isnan(sums["age"][name]) for name in ("loss", "mae", "rmse", "cs5"))
    assert sums["gender"]["count"] == 0 and math.isnan(sums["gender"]["accuracy"])


def test_the_normalized_age_score_is_half_at_ten_years_and_falls_with_every_year() -> None:
    age, gender = get_task("age"), get_task("gender")
    assert normalized_score(age, {"mae": 0.0}) == 1.0
    assert normalized_score(age, {"mae": 10.0}) == pytest.approx(0.5)
    assert normalized_score(age, {"mae": 30.0}) == pytest.approx(0.25)
    assert normalized_score(age, {"mae": 31.0}) < normalized_score(age, {"mae": 30.0})
    assert normalized_score(gender, {"accuracy": 0.8}) == 0.8


def test_sums_survive_the_all_reduce_round_trip() -> None:
    race = get_task("race")
    sums = MetricSums([race])
    sums.add_predictions(race, torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]))
    sums.add_losses({"race": torch.tensor(1.0)}, {"race": 4})
    doubled = MetricSums([race])
    doubled.load_tensor(sums.as_tensor() * 2)  # what an all-reduce over two identical ranks gives
    assert doubled.summary()["race"]["count"] == 8
    assert doubled.summary()["race"]["accuracy"] == sums.summary()["race"]["accuracy"] == pytest.approx(3 / 4)


def test_delta_m_is_the_mean_signed_relative_improvement_in_percent() -> None:
    from pipeline.metrics import delta_m

    # accuracy 0.75 -> 0.80 is +6.67 %; MAE 6 -> 5 is +16.67 % (lower is better); race 0.9 -> 0.81 is -10 %
    assert delta_m({"gender": 0.80, "age": 5.0, "race": 0.81}, {"gender": 0.75, "age": 6.0, "race": 0.9}) == \
        pytest.approx((100 * 0.05 / 0.75 + 100 / 6 - 10) / 3)
    assert delta_m({"age": 6.0}, {"age": 6.0}) == 0.0
    # worse on both: -0.05 / 0.80 and -(6 - 5) / 5
    assert delta_m({"gender": 0.75, "age": 6.0}, {"gender": 0.80, "age": 5.0}) == \
        pytest.approx((-0.05 / 0.80 - 1 / 5) / 2 * 100)
    assert math.isnan(delta_m({"race": 0.3}, {"race": 0.0}))  # no relative change from 0
    with pytest.raises(ValueError):
        delta_m({}, {})
