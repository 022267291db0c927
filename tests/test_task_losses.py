"""Masked per-task losses, checked against small hand computations, against the mean over the rows picked out
by the mask (the formula they replace), and for reading no value on the host."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.schema import TASKS, TaskSpec, get_task, label_slices
from pipeline.task_losses import (
    LANDMARK_LOSS_SCALE,
    REGRESSION_LOSSES,
    all_task_losses,
    labelled_task_names,
    masked_task_losses,
    predict_age,
)

NAN = math.nan
AGE_GENDER_RACE = [TASKS["age"], TASKS["gender"], TASKS["race"]]


def toy_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Four rows; age labelled on rows 0 and 2, gender (one-logit head) on 0 and 1, race on 1 and 3."""
    outputs = {
        "age": torch.tensor([[0.30], [0.50], [0.20], [0.90]]),
        "gender": torch.tensor([[0.0], [2.0], [-1.0], [5.0]]),
        "race": torch.tensor([[3.0, 3.0, 3.0, 3.0, 3.0], [1.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5,
                              [0.0, 0.0, 0.0, 0.0, 2.0]]),
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
    losses = masked_task_losses(outputs, torch.tensor([[1.0], [1.0]]), torch.tensor([[True], [True]]),
                                [TASKS["gender"]])
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



def test_landmark_and_two_logit_losses_equal_hand_computed_losses_with_garbage_in_unlabelled_rows() -> None:
    tasks = [get_task("smile"), get_task("landmarks")]
    outputs = {"smile": torch.tensor([[0.0, 1.0], [math.inf, NAN], [2.0, 0.0]]),
               "landmarks": torch.tensor([[0.5] * 10, [0.2] * 10, [NAN] * 10])}
    labels = torch.tensor([[1.0] + [0.4] * 10, [NAN] + [0.3] * 10, [0.0] + [1e30] * 10])
    mask = torch.tensor([[True, True], [False, True], [True, False]])
    losses = masked_task_losses(outputs, labels, mask, tasks)
    smile_ce = ((math.log(1 + math.e) - 1.0) + (math.log(math.e**2 + 1) - 2.0)) / 2
    assert losses["smile"].item() == pytest.approx(smile_ce, rel=1e-6)
    assert losses["landmarks"].item() == pytest.approx((0.1 + 0.1) / 2 * LANDMARK_LOSS_SCALE, rel=1e-5)


def test_labelled_tasks_given_by_the_caller_select_the_same_losses_as_the_mask() -> None:
    outputs, labels, mask = toy_batch()
    mask[:, 1] = False
    assert labelled_task_names(mask, AGE_GENDER_RACE) == ["age", "race"]
    from_mask = masked_task_losses(outputs, labels, mask, AGE_GENDER_RACE)
    given = masked_task_losses(outputs, labels, mask, AGE_GENDER_RACE, labelled_tasks=["age", "race"])
    assert from_mask.keys() == given.keys() == {"age", "race"}
    assert all(torch.equal(from_mask[task], given[task]) for task in given)


# ---------------------------------------------------------------- the same as the mean over the picked rows

MIXED_TASKS = [get_task("age"), get_task("gender"), get_task("smile"), get_task("emotion"), get_task("landmarks")]


def picked_row_losses(outputs: dict[str, torch.Tensor], labels: torch.Tensor, mask: torch.Tensor,
                      tasks: list[TaskSpec], age_scale: float, regression_loss: str) -> dict[str, torch.Tensor]:
    """The formula the masked losses replace: each task's mean over ``x[mask]``, a task without rows absent."""
    losses = {}
    for column, (task, columns) in enumerate(zip(tasks, label_slices(tasks))):
        rows = mask[:, column]
        if not rows.any():
            continue
        output, target = outputs[task.name][rows].float(), labels[rows, columns].float()
        if task.kind == "landmarks":
            losses[task.name] = F.l1_loss(output, target) * LANDMARK_LOSS_SCALE
        elif task.kind == "regression":
            losses[task.name] = REGRESSION_LOSSES[regression_loss](output[:, 0], target[:, 0] / age_scale)
        elif output.shape[1] == 1:
            losses[task.name] = F.binary_cross_entropy_with_logits(output[:, 0], target[:, 0])
        else:
            losses[task.name] = F.cross_entropy(output, target[:, 0].long())
    return losses


def random_batch(seed: int, rows: int = 9) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Outputs and labels of ``MIXED_TASKS`` (gender with a one-logit head); about half the cells labelled,
    emotion never; NaN, inf and huge numbers in every unlabelled label cell."""
    generator = torch.Generator().manual_seed(seed)
    widths = {"gender": 1}
    outputs = {task.name: 3 * torch.randn(rows, widths.get(task.name, task.num_outputs), generator=generator)
               for task in MIXED_TASKS}
    mask = torch.rand(rows, len(MIXED_TASKS), generator=generator) < 0.5
    mask[0, :4] = True  # every task but emotion has a labelled row
    mask[:, 3] = False
    columns = []
    for task in MIXED_TASKS:
        if task.kind == "regression":
            columns.append(80 * torch.rand(rows, 1, generator=generator))
        elif task.kind == "landmarks":
            columns.append(torch.rand(rows, task.label_width, generator=generator))
        else:
            columns.append(torch.randint(len(task.classes), (rows, 1), generator=generator).float())
    labels = torch.cat(columns, dim=1)
    garbage = torch.tensor([NAN, math.inf, -math.inf, 1e30, -7.0])
    unlabelled = ~torch.cat([mask[:, [j]].expand(-1, task.label_width) for j, task in enumerate(MIXED_TASKS)], dim=1)
    labels[unlabelled] = garbage[torch.randint(len(garbage), (int(unlabelled.sum()),), generator=generator)]
    return outputs, labels, mask


@pytest.mark.parametrize("regression_loss", ["mse", "l1"])
@pytest.mark.parametrize("seed", range(5))
def test_masked_losses_and_gradients_equal_the_mean_over_picked_rows_on_random_batches(seed: int,
                                                                                        regression_loss: str) -> None:
    outputs, labels, mask = random_batch(seed)
    leaves = {task: output.requires_grad_() for task, output in outputs.items()}
    expected = picked_row_losses(outputs, labels, mask, MIXED_TASKS, 80.0, regression_loss)
    masked = masked_task_losses(outputs, labels, mask, MIXED_TASKS, 80.0, regression_loss)
    assert masked.keys() == expected.keys() == {"age", "gender", "smile", "landmarks"}
    for task in expected:
        assert masked[task].item() == pytest.approx(expected[task].item(), rel=1e-5, abs=1e-7)
        expected_gradient, = torch.autograd.grad(expected[task], leaves[task])
        masked_gradient, = torch.autograd.grad(masked[task], leaves[task])
        assert torch.allclose(masked_gradient, expected_gradient, rtol=1e-5, atol=1e-8)


def test_task_without_a_labelled_row_has_loss_zero_and_zero_gradient_whatever_its_rows_hold() -> None:
    outputs, labels, mask = random_batch(0)
    outputs["emotion"][0, 0] = NAN
    outputs["emotion"][1, 2] = math.inf
    emotion_output = outputs["emotion"].requires_grad_()
    losses = all_task_losses(outputs, labels, mask, MIXED_TASKS)
    assert losses["emotion"].item() == 0.0
    gradient, = torch.autograd.grad(losses["emotion"], emotion_output)
    assert torch.equal(gradient, torch.zeros_like(gradient))


def test_garbage_in_unlabelled_rows_leaves_losses_and_gradients_finite_and_unchanged() -> None:
    outputs, labels, mask = random_batch(1)
    clean_labels = torch.where(labels.isfinite() & (labels.abs() < 1e6), labels, 0.5)
    spoilt = {task: output.clone() for task, output in outputs.items()}
    for column, task in enumerate(MIXED_TASKS):
        spoilt[task.name][~mask[:, column]] = NAN  # the outputs of the unlabelled rows
    results = []
    for batch_outputs, batch_labels in ((outputs, clean_labels), (spoilt, labels)):
        leaves = {task: output.requires_grad_() for task, output in batch_outputs.items()}
        losses = all_task_losses(batch_outputs, batch_labels, mask, MIXED_TASKS)
        gradients = torch.autograd.grad(sum(losses.values()), list(leaves.values()))
        results.append((torch.stack(list(losses.values())), torch.cat([g.flatten() for g in gradients])))
    (clean_losses, clean_gradients), (spoilt_losses, spoilt_gradients) = results
    assert spoilt_losses.isfinite().all() and spoilt_gradients.isfinite().all()
    assert torch.equal(spoilt_losses, clean_losses) and torch.equal(spoilt_gradients, clean_gradients)


# ---------------------------------------------------------------- no host sync


def test_losses_and_their_gradients_need_no_value_on_the_host() -> None:
    """On the meta device a tensor has no values: ``.item()``, ``bool()``, ``if count == 0``, ``x[mask]``,
    ``.nonzero()``, ``.tolist()``, ``.cpu()`` all raise there, as each would make the host wait for a GPU."""
    outputs, labels, mask = random_batch(2)
    outputs = {task: output.to("meta").requires_grad_() for task, output in outputs.items()}
    labels, mask = labels.to("meta"), mask.to("meta")
    losses = all_task_losses(outputs, labels, mask, MIXED_TASKS)
    assert losses.keys() == {task.name for task in MIXED_TASKS}
    sum(losses.values()).backward()
    assert all(output.grad is not None for output in outputs.values())
    chosen = masked_task_losses(outputs, labels, mask, MIXED_TASKS, labelled_tasks=["age", "landmarks"])
    assert chosen.keys() == {"age", "landmarks"}
    with pytest.raises((RuntimeError, NotImplementedError)):
        picked_row_losses(outputs, labels, mask, MIXED_TASKS, 100.0, "mse")  # the check does catch a sync


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync debug mode needs a GPU")
def test_losses_and_their_gradients_make_no_cuda_sync() -> None:
    outputs, labels, mask = random_batch(3)
    outputs = {task: output.cuda().requires_grad_() for task, output in outputs.items()}
    labels, mask = labels.cuda(), mask.cuda()
    all_task_losses(outputs, labels, mask, MIXED_TASKS)  # warm-up: first calls may sync to load kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sum(all_task_losses(outputs, labels, mask, MIXED_TASKS).values()).backward()
        masked_task_losses(outputs, labels, mask, MIXED_TASKS, labelled_tasks=["age"])
    finally:
        torch.cuda.set_sync_debug_mode("default")

