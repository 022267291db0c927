"""PCGrad, Aligned-MTL, DB-MTL and GradNorm against steps worked out by hand from their papers' update rules: on
(K, P) gradient matrices, on a model of 2 shared parameters and one scalar head per task, with an absent task,
after a resume, and on 2 gloo ranks whose batches differ (both must end with the same parameters)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.gradient_weighting import (
    align_principal_components,
    balance_magnitudes,
    combined_gradient_step,
    project_conflicting,
)
from pipeline.losses import build_weighting

TASKS = ["a", "absent", "b"]


# ---------------------------------------------------------------- the combine rules on (K, P) matrices


def test_pcgrad_projects_each_conflicting_gradient_onto_the_others_normal_plane_and_sums() -> None:
    gradients = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    # g1.g2 = -1 < 0: g1' = g1 - (-1 / |g2|^2 = -1/2) g2 = (0.5, 0.5); g2' = g2 - (-1 / |g1|^2) g1 = (0, 1).
    assert project_conflicting(gradients, [[0, 1], [1, 0]]).tolist() == pytest.approx([0.5, 1.5])
    # No conflict (g1.g2 = 1 > 0): the plain sum.
    agreeing = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert project_conflicting(agreeing, [[1], [0]]).tolist() == pytest.approx([2.0, 1.0])


def test_pcgrad_projects_onto_the_original_gradients_in_the_given_order() -> None:
    gradients = torch.tensor([[1.0, 0.0], [-1.0, 1.0], [-1.0, -1.0]])
    # g1 against g2 then g3: g1.g2 = -1 -> g1' = (0.5, 0.5); g1'.g3 = -1 -> g1'' = (0.5, 0.5) + 1/2 (-1, -1) = (0, 0).
    # g1 against g3 then g2: g1.g3 = -1 -> (0.5, -0.5); (0.5, -0.5).g2 = -1 -> (0.5, -0.5) + 1/2 (-1, 1) = (0, 0).
    # g2: g2.g1 = -1 -> (0, 1); (0, 1).g3 = -1 -> (0, 1) + 1/2 (-1, -1) = (-0.5, 0.5).
    # g3: g3.g1 = -1 -> (0, -1); (0, -1).g2 = -1 -> (0, -1) + 1/2 (-1, 1) = (-0.5, -0.5). Sum: (-1, 0).
    assert project_conflicting(gradients, [[1, 2], [0, 2], [0, 1]]).tolist() == pytest.approx([-1.0, 0.0], abs=1e-6)
    assert project_conflicting(gradients, [[2, 1], [0, 2], [0, 1]]).tolist() == pytest.approx([-1.0, 0.0], abs=1e-6)


def test_aligned_mtl_rescales_orthogonal_gradients_to_the_smallest_singular_value() -> None:
    # G G^T = diag(1, 4): lambda_min = 1, B = 1 * diag(1, 1/2); weights B 1 = (1, 1/2); sum (1, 0) + (0, 1).
    gradients = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert align_principal_components(gradients).tolist() == pytest.approx([1.0, 1.0], rel=1e-6)


def test_aligned_mtl_equals_sigma_min_times_u_v_transposed_summed_over_tasks() -> None:
    # The paper's form: G = U S V^T, aligned G^ = s_min U V^T (orthogonal rows of norm s_min).
    # For G = ((1, 0), (1, 1)): G G^T = ((1, 1), (1, 2)), eigenvalues (3 -+ sqrt 5) / 2,
    # so s_min = sqrt(0.381966) = 0.618034.
    gradients = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    u, s, vh = torch.linalg.svd(gradients.double())
    assert s.min().item() == pytest.approx(0.618034, rel=1e-5)
    aligned = s.min() * u @ vh
    assert (aligned @ aligned.T).flatten().tolist() == pytest.approx([0.381966, 0.0, 0.0, 0.381966], abs=1e-6)
    assert align_principal_components(gradients).tolist() == pytest.approx(aligned.sum(dim=0).tolist(), rel=1e-5)


def test_aligned_mtl_drops_the_null_directions_of_a_rank_deficient_matrix() -> None:
    # G = ((1, 1), (2, 2)) has one singular value sqrt(10), so s_min = sqrt(10) and G^ = G: the sum (3, 3).
    rank_one = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    assert align_principal_components(rank_one).tolist() == pytest.approx([3.0, 3.0], rel=1e-5)
    assert align_principal_components(torch.zeros(2, 3)).tolist() == [0.0, 0.0, 0.0]


def test_dbmtl_scales_every_gradient_to_the_largest_norm() -> None:
    # norms (1, 4): max 4; 4 (1, 0) / 1 + 4 (0, 4) / 4 = (4, 4).
    assert balance_magnitudes(torch.tensor([[1.0, 0.0], [0.0, 4.0]])).tolist() == pytest.approx([4.0, 4.0], rel=1e-6)


# ---------------------------------------------------------------- a model: 2 shared parameters, a scalar head per task


class TinyModel(nn.Module):
    """L_t = d_t . theta + h_t (or exp of it): the gradient of theta is d_t, of the head h_t 1."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(2))
        self.heads = nn.ParameterDict({task: nn.Parameter(torch.zeros(())) for task in TASKS})

    def losses(self, directions: dict[str, tuple[float, float]], exponential: bool = False) -> dict[str, torch.Tensor]:
        linear = {task: torch.tensor(d) @ self.theta + self.heads[task] for task, d in directions.items()}
        return {task: value.exp() for task, value in linear.items()} if exponential else linear

    def step(self, weighting, directions: dict[str, tuple[float, float]], reduce_sum=None, lr: float = 0.1) -> None:
        """One SGD step as the loop takes it: per-task gradients combined, each head its own."""
        for parameter in self.parameters():
            parameter.grad = None
        exponential = type(weighting).__name__ == "DualBalancing"  # positive losses, for DB-MTL's log
        task_losses = weighting.differentiated_losses(self.losses(directions, exponential))
        combined_gradient_step(task_losses, weighting.task_names, [self.theta],
                               {task: [self.heads[task]] for task in TASKS}, weighting.combine_gradients, reduce_sum)
        with torch.no_grad():
            for parameter in self.parameters():
                if parameter.grad is not None:
                    parameter -= lr * parameter.grad


def dbmtl_weighting(**options):
    weighting = build_weighting("dbmtl", TASKS, **options)
    weighting.attach_shared_parameters([nn.Parameter(torch.zeros(2))])
    return weighting


def test_a_pcgrad_step_sets_the_projected_sum_on_shared_parameters_and_leaves_the_absent_head_alone() -> None:
    model = TinyModel()
    model.step(build_weighting("pcgrad", TASKS), {"a": (1.0, 0.0), "b": (-1.0, 1.0)})
    # Shared: (0.5, 1.5) as above; theta = -0.1 (0.5, 1.5). Heads a, b: their own gradient 1; "absent": none.
    assert model.theta.tolist() == pytest.approx([-0.05, -0.15])
    assert [model.heads[t].item() for t in TASKS] == pytest.approx([-0.1, 0.0, -0.1])
    assert model.heads["absent"].grad is None


def test_an_aligned_mtl_step_with_an_absent_task_uses_the_present_tasks_alone() -> None:
    model = TinyModel()
    model.step(build_weighting("alignedmtl", TASKS), {"a": (1.0, 0.0), "b": (0.0, 2.0)})
    assert model.theta.tolist() == pytest.approx([-0.1, -0.1], rel=1e-5)  # -0.1 (1, 1), worked out above
    assert model.heads["absent"].grad is None


def test_dbmtl_keeps_beta_constant_by_default_as_its_authors_code_does() -> None:
    weighting = dbmtl_weighting()  # beta 0.9, sigma 0
    model = TinyModel()
    directions = {"a": (1.0, 0.0), "b": (0.0, 2.0)}  # L = exp(d . theta + h): grad log L = (d, 1), whatever theta
    model.step(weighting, directions, lr=1.0)
    model.step(weighting, directions, lr=1.0)
    # t = 1 as below: theta = (-0.2, -0.2). t = 2, beta still 0.9: g_avg = g + 0.9 (0.1 g - g) = 0.19 g: (0.19, 0),
    # (0, 0.38); both scaled to 0.38: theta -= (0.38, 0.38).
    assert model.theta.tolist() == pytest.approx([-0.58, -0.58], rel=1e-5)
    assert weighting.gradient_averages[0].tolist() == pytest.approx([0.19, 0.0], rel=1e-5)


def test_two_dbmtl_steps_follow_the_moving_average_and_max_norm_rule_and_leave_the_absent_task_untouched() -> None:
    weighting = dbmtl_weighting(beta_sigma=0.5)  # beta 0.9, decaying as 0.9 / sqrt(t)
    model = TinyModel()
    directions = {"a": (1.0, 0.0), "b": (0.0, 2.0)}  # L = exp(d . theta + h): grad log L = (d, 1), whatever theta
    model.step(weighting, directions, lr=1.0)
    # t = 1: beta_1 = 0.9; g_avg = g + 0.9 (0 - g) = 0.1 g: (0.1, 0), (0, 0.2); max norm 0.2: 2 (0.1, 0) + 1 (0, 0.2).
    assert model.theta.tolist() == pytest.approx([-0.2, -0.2], rel=1e-5)
    model.step(weighting, directions, lr=1.0)
    # t = 2: beta_2 = 0.9 / sqrt 2 = 0.636396; g_avg,a = 1 - 0.636396 * 0.9 = 0.427244, g_avg,b = 2 - 0.636396 * 1.8
    # = 0.854487; both scaled to 0.854487: theta -= (0.854487, 0.854487).
    assert model.theta.tolist() == pytest.approx([-0.2 - 0.854487, -0.2 - 0.854487], rel=1e-5)
    assert weighting.updates.tolist() == [2, 0, 2]
    assert weighting.gradient_averages[1].tolist() == [0.0, 0.0]
    assert weighting.gradient_averages[0].tolist() == pytest.approx([0.427244, 0.0], rel=1e-5)
    # Heads train on log L: gradient 1 each step.
    assert [model.heads[t].item() for t in TASKS] == pytest.approx([-2.0, 0.0, -2.0])


def test_dbmtl_resumed_from_its_state_dict_takes_the_same_next_step() -> None:
    weighting, model = dbmtl_weighting(beta_sigma=0.5), TinyModel()  # a decaying beta: the counts matter too
    model.step(weighting, {"a": (1.0, 0.5), "b": (-0.5, 2.0)})
    resumed = dbmtl_weighting(beta=0.5, beta_sigma=0.5)  # the averages and counts are state; beta is config
    resumed.load_state_dict(copy.deepcopy(weighting.state_dict()))
    resumed.beta = weighting.beta
    twin = copy.deepcopy(model)
    model.step(weighting, {"a": (1.0, 0.5), "b": (-0.5, 2.0)})
    twin.step(resumed, {"a": (1.0, 0.5), "b": (-0.5, 2.0)})
    assert torch.equal(model.theta, twin.theta)


def test_pcgrad_order_is_seeded_and_resumes_where_it_left_off() -> None:
    weighting = build_weighting("pcgrad", TASKS, seed=5)
    for _ in range(3):
        weighting.combine_gradients(torch.randn(3, 4), TASKS)
    resumed = build_weighting("pcgrad", TASKS, seed=0)
    resumed.load_state_dict(copy.deepcopy(weighting.state_dict()))
    gradients = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [-1.0, -1.0, 1.0]])
    assert torch.equal(resumed.combine_gradients(gradients, TASKS), weighting.combine_gradients(gradients, TASKS))


# ---------------------------------------------------------------- GradNorm (loss-level, reads the last shared weight)


def gradnorm_case(**options):
    """W (1, 2) as the last shared weight; L_a = 3 W_00 + 3 (|grad_W| = 3), L_b = W_01 + 1 (|grad_W| = 1)."""
    weighting = build_weighting("gradnorm", TASKS, **options)
    layer = nn.Parameter(torch.zeros(1, 2))
    weighting.attach_shared_parameters([nn.Parameter(torch.zeros(3)), layer, nn.Parameter(torch.zeros(2))])
    return weighting, layer, {"a": 3 * layer[0, 0] + 3, "b": layer[0, 1] + 1}


def test_gradnorm_trains_on_the_plain_sum_until_it_knows_the_first_epoch_losses() -> None:
    weighting, layer, task_losses = gradnorm_case()
    total = weighting.combine(task_losses)
    assert total.item() == pytest.approx(4.0)  # w = 2 softmax(0, 0) = (1, 1); no L_grad yet
    total.backward()
    assert all(weighting.logits[t].grad is None for t in TASKS)


def test_a_gradnorm_step_moves_the_weights_by_the_hand_computed_gradient_of_l_grad() -> None:
    weighting, layer, task_losses = gradnorm_case()  # alpha 1.5
    weighting.end_epoch({"a": 6.0, "absent": 2.0, "b": 1.0})
    total = weighting.combine(task_losses)  # "absent" has L(0) but no loss here: no term, no weight
    # L~ = (3/6, 1/1) = (0.5, 1), mean 0.75, r = (2/3, 4/3), r^1.5 = (0.544331, 1.539601); G = (3, 1), mean 2;
    # target = (1.088662, 3.079201); L_grad = |3 - 1.088662| + |1 - 3.079201| = 3.990539; total = 3 + 1 + L_grad.
    assert total.item() == pytest.approx(7.990539, rel=1e-5)
    total.backward()
    # dL_grad/dw = (sign * |grad L|) = (3, -1); w = 2 softmax(theta), dw/dtheta = ((0.5, -0.5), (-0.5, 0.5)):
    # dtheta_a = 3 * 0.5 + (-1)(-0.5) = 2, dtheta_b = -2. W gets the weighted sum's gradient alone: (3, 1).
    assert [weighting.logits[t].grad.item() for t in ("a", "b")] == pytest.approx([2.0, -2.0], rel=1e-5)
    assert weighting.logits["absent"].grad is None
    assert layer.grad.tolist() == [[3.0, 1.0]]


def test_gradnorm_resumes_with_its_weights_and_first_epoch_losses() -> None:
    weighting, _, _ = gradnorm_case()
    weighting.end_epoch({"a": 6.0, "b": 1.0})
    with torch.no_grad():
        weighting.logits["a"].fill_(0.3)
    resumed, _, task_losses = gradnorm_case()
    resumed.load_state_dict(copy.deepcopy(weighting.state_dict()))
    assert resumed.weights() == weighting.weights()
    assert resumed.combine(task_losses).item() > 4.0  # L_grad is back: L(0) came with the state


# ---------------------------------------------------------------- 2 gloo ranks with different batches


# Per rank, the tasks in its batch and their gradient directions: b is labelled on rank 0 only.
RANK_DIRECTIONS = [{"a": (1.0, 0.0), "b": (-1.0, 1.0)}, {"a": (3.0, 0.0)}]


def gloo_worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    final = {}
    for name in ("pcgrad", "alignedmtl", "dbmtl"):
        weighting = dbmtl_weighting() if name == "dbmtl" else build_weighting(name, TASKS)
        model = TinyModel()
        for _ in range(2):
            model.step(weighting, RANK_DIRECTIONS[rank], reduce_sum)
        final[name] = {"model": model.state_dict(), "weighting": weighting.state_dict()}
    torch.save(final, f"{results}.{rank}")
    dist.destroy_process_group()


def run_on_two_gloo_ranks(worker, tmp_path: Path) -> list[dict]:
    """What ``worker(rank, init_file, results)`` saved on each of 2 ranks."""
    results = str(tmp_path / "results")
    # fork: the workers need no fresh interpreter importing torch (seconds each on a busy machine)
    mp.start_processes(worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True, start_method="fork")
    return [torch.load(f"{results}.{rank}") for rank in range(2)]


def assert_bit_identical(states: list[dict], what: str) -> None:
    for key, tensor in states[0].items():  # NaN equals NaN here (GradNorm's L(0) of a task never seen)
        torch.testing.assert_close(tensor, states[1][key], rtol=0, atol=0, equal_nan=True, msg=f"{what} {key}")


class GradNormObjective(nn.Module):
    """As MultiTaskObjective under DDP: the weighting inside the wrapped module, absent tasks' parameters
    joined with weight 0 (every parameter in the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Parameter(torch.zeros(1, 2))
        self.weighting = build_weighting("gradnorm", TASKS)
        self.weighting.attach_shared_parameters([self.layer])

    def forward(self, rank: int) -> torch.Tensor:
        task_losses = {"a": 3 * self.layer[0, 0] + 3, "b": self.layer[0, 1] + 1}
        if rank == 1:
            del task_losses["b"]
        idle = sum(p.sum() * 0.0 for p in self.weighting.parameters())
        return self.weighting.combine(task_losses) + idle


def gradnorm_ddp_worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    objective = GradNormObjective()
    objective.weighting.end_epoch({"a": 6.0, "b": 1.0})
    model = nn.parallel.DistributedDataParallel(objective)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.zero_grad()
    model(rank).backward()
    optimizer.step()
    torch.save(objective.state_dict(), f"{results}.{rank}")
    dist.destroy_process_group()


def test_two_gloo_ranks_average_each_task_gradient_over_the_ranks_that_had_it_and_end_alike(tmp_path: Path) -> None:
    ranks = run_on_two_gloo_ranks(gloo_worker, tmp_path)
    for name in ("pcgrad", "alignedmtl", "dbmtl"):
        assert_bit_identical([rank[name]["model"] | rank[name]["weighting"] for rank in ranks], name)
    pcgrad = ranks[0]["pcgrad"]["model"]
    # Averaged rows: g_a = ((1, 0) + (3, 0)) / 2 = (2, 0) over both ranks, g_b = (-1, 1) from rank 0 alone.
    # g_a.g_b = -2: g_a' = (2, 0) + 2/2 (-1, 1) = (1, 1); g_b' = (-1, 1) + 2/4 (2, 0) = (0, 1); sum (1, 2).
    # The rows do not depend on theta (linear losses): two steps of lr 0.1 give theta = -0.2 (1, 2).
    assert pcgrad["theta"].tolist() == pytest.approx([-0.2, -0.4], rel=1e-5)
    assert pcgrad["heads.a"].item() == pytest.approx(-0.2) and pcgrad["heads.b"].item() == pytest.approx(-0.2)
    assert pcgrad["heads.absent"].item() == 0.0
    # Aligned-MTL: G G^T = ((4, -2), (-2, 2)), eigenvalues 3 -+ sqrt 5; checked against the SVD form instead.
    u, s, vh = torch.linalg.svd(torch.tensor([[2.0, 0.0], [-1.0, 1.0]], dtype=torch.float64))
    aligned_step = (s.min() * u @ vh).sum(dim=0)
    assert ranks[0]["alignedmtl"]["model"]["theta"].tolist() == pytest.approx((-0.2 * aligned_step).tolist(), rel=1e-5)
    # DB-MTL: rank 1's a is exp(3 theta_1 + h): log-gradients average to (2, 0) for a, (-1, 1) for b (rank 0),
    # so both ranks take the steps of one process given those rows (the first one is checked by hand below).
    weighting, reference = dbmtl_weighting(), TinyModel()
    for _ in range(2):
        reference.step(weighting, {"a": (2.0, 0.0), "b": (-1.0, 1.0)})
    assert ranks[0]["dbmtl"]["weighting"]["updates"].tolist() == [2, 0, 2]
    assert ranks[0]["dbmtl"]["model"]["theta"].tolist() == pytest.approx(reference.theta.tolist(), rel=1e-5)


@pytest.mark.slow  # DDP's first construction imports torch._dynamo in each worker: ~10 s on a busy machine
def test_gradnorm_under_ddp_averages_the_weight_gradients_and_ranks_end_identical(tmp_path: Path) -> None:
    ranks = run_on_two_gloo_ranks(gradnorm_ddp_worker, tmp_path)
    assert_bit_identical(ranks, "gradnorm")
    # Rank 0: dtheta = (2, -2) as computed above; rank 1 has a alone: w_a = 1 softmax(theta_a) = 1, dtheta = 0.
    # DDP averages: (1, -1); SGD 0.1: theta = (-0.1, 0.1). W: ((3, 1) + (3, 0)) / 2 = (3, 0.5) -> (-0.3, -0.05).
    assert [ranks[0][f"weighting.logits.{t}"].item() for t in ("a", "b")] == pytest.approx([-0.1, 0.1], rel=1e-5)
    assert ranks[0]["layer"].flatten().tolist() == pytest.approx([-0.3, -0.05], rel=1e-5)


def test_a_dbmtl_step_on_conflicting_rows_scales_the_smaller_average_up_to_the_larger() -> None:
    weighting, model = dbmtl_weighting(), TinyModel()
    model.step(weighting, {"a": (2.0, 0.0), "b": (-1.0, 1.0)})
    # t = 1: averages 0.1 g = (0.2, 0), (-0.1, 0.1); norms 0.2, 0.141421; max 0.2:
    # (0.2, 0) + 1.414214 (-0.1, 0.1) = (0.058579, 0.141421); lr 0.1.
    assert model.theta.tolist() == pytest.approx([-0.0058579, -0.0141421], rel=1e-4)


# ---------------------------------------------------------------- the loop's step on 2 gloo ranks


def loop_worker(rank: int, init_file: str, results: str) -> None:
    """Two PCGrad steps of ``train_one_epoch`` (the other methods differ only in their combine rule, tested above):
    rank 1's batches have no smile label."""
    from pipeline.config import TrainConfig
    from pipeline.loop import MultiTaskObjective, WorkerContext, state_digest, train_one_epoch
    from pipeline.model import MultiTaskNet
    from pipeline.schema import get_task

    torch.set_num_threads(1)  # two ranks on a shared machine
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    tasks = [get_task(name) for name in ("age", "gender", "smile")]
    config, context = TrainConfig(), WorkerContext(rank, 2)
    generator = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(2):
        labels = torch.stack([torch.rand(4, generator=generator) * 80,
                              torch.randint(0, 2, (4,), generator=generator).float(),
                              torch.randint(0, 2, (4,), generator=generator).float()], dim=1)
        mask = torch.ones(4, 3, dtype=torch.bool)
        mask[:, 2] = rank == 0
        batches.append({"images": torch.randint(0, 256, (4, 3, 16, 16), generator=generator, dtype=torch.uint8),
                        "labels": labels, "mask": mask})
    torch.manual_seed(0)
    net = MultiTaskNet(tasks, "resnet18", (8,), 8, 0.0)
    objective = MultiTaskObjective(net, build_weighting("pcgrad", [t.name for t in tasks]), tasks, config)
    model = context.wrap(objective)
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3)
    train_one_epoch(model, iter(batches), 2, optimizer, tasks, [t.name for t in tasks], context, config,
                    torch.Generator().manual_seed(rank), torch.amp.GradScaler("cpu", enabled=False))
    context.broadcast_buffers(objective)  # BatchNorm statistics, as the loop does after every epoch
    torch.save((model is objective, state_digest(objective), objective.net.heads["smile"][0].weight.grad),
               f"{results}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow  # a ResNet-18 per rank
def test_the_loops_gradient_level_step_leaves_two_gloo_ranks_with_one_state(tmp_path: Path) -> None:
    (unwrapped, digest, smile_grad), (_, other_digest, other_smile_grad) = run_on_two_gloo_ranks(loop_worker, tmp_path)
    assert unwrapped  # no DDP: the per-task gradients are averaged by the step itself
    assert digest == other_digest
    # smile was labelled on rank 0 only: its head's gradient, rank 0's own, reached rank 1 too.
    assert torch.equal(smile_grad, other_smile_grad) and smile_grad.abs().sum() > 0


# ---------------------------------------------------------------- end to end: train, checkpoint, resume


@pytest.mark.slow  # the two with learned state; PCGrad's and Aligned-MTL's loop path is pcgrad's gloo test above
@pytest.mark.parametrize("weighting", ["gradnorm", "dbmtl"])
def test_gradnorm_and_dbmtl_train_end_to_end_and_resume_exactly(synthetic_shards, tmp_path: Path, weighting: str):
    from pipeline.train import main as train_main
    from tests.test_train import metric_rows, tiny_overrides, without_timings

    def run(name: str, epochs: int) -> list[str]:
        # DB-MTL keeps a moving average of every task's gradient of the whole trunk (in every checkpoint):
        # a 1.5 M-parameter trunk keeps this test short
        return tiny_overrides(synthetic_shards, tmp_path, name, f"max_epochs={epochs}", "freeze.mode=none",
                              f"loss.weighting={weighting}", "optim.weighting_lr=0",
                              "model.backbone=mobilenet_v3_small")

    assert train_main(["--local", *run("straight", 3)]) == 0
    assert train_main(["--local", *run("resumed", 2)]) == 0
    assert train_main(["--local", *run("resumed", 3)]) == 0
    straight, resumed = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "resumed")
    assert all(math.isfinite(row["val/total_loss"]) and math.isfinite(row["train/total_loss"]) for row in straight)
    # GradNorm's weights and first-epoch losses, DB-MTL's averages are in the checkpoint: the same epochs.
    assert without_timings(resumed) == without_timings(straight)
    if weighting == "gradnorm":  # its weights moved once the first epoch's losses were known
        assert any(abs(value - 1.0) > 1e-4 for key, value in straight[-1].items() if key.startswith("weights/"))
