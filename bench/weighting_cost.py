"""What a loss weighting costs per training step, relative to equal weighting.

Each method trains its own copy of the same MultiTaskNet (resnet18, no pretrained weights, six task heads)
on one fixed random batch, one torch thread, the step written as in ``pipeline.loop.train_one_epoch`` (its
``MultiTaskObjective``): forward, masked task losses, ``weighting.combine``, backward, Adam step; for FAMO also
the loop's ``after_step`` (``famo+reforward``: the losses recomputed on the same batch without gradients, as
the authors do; ``famo``: the weighting's own work alone); for the gradient-level methods (PCGrad, Aligned-MTL,
DB-MTL) the loop's ``set_combined_gradients`` in place of the backward (one backward per task present).
GradNorm and DWA are given two epochs of history first, so that their weights move. Methods take turns
within every round, so machine noise falls on all alike; the ratio is the median over rounds of
(method step time / equal step time).

    python bench/weighting_cost.py [--steps 10] [--warmup 3] [--batch 64] [--size 64] [--methods equal,pcgrad]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from pipeline.config import TrainConfig
from pipeline.loop import MultiTaskObjective, WorkerContext, set_combined_gradients
from pipeline.losses import build_weighting
from pipeline.model import MultiTaskNet
from pipeline.schema import get_task
from pipeline.task_losses import masked_task_losses

TASKS = [get_task(name) for name in ("age", "gender", "race", "smile", "young", "emotion")]
METHODS = ("equal", "dwa", "rlw", "famo", "famo+reforward", "gradnorm", "pcgrad", "alignedmtl", "dbmtl")


class Trainer:
    """One method's network, weighting and optimizer, and its training step."""

    def __init__(self, method: str) -> None:
        torch.manual_seed(0)  # the same initial network for every method
        self.method = method
        weighting = build_weighting(method.split("+")[0], [task.name for task in TASKS])
        self.objective = MultiTaskObjective(MultiTaskNet(TASKS, "resnet18"), weighting, TASKS, TrainConfig())
        self.weighting = weighting
        self.weighting.end_epoch({task.name: 1.0 for task in TASKS})
        self.weighting.end_epoch({task.name: 0.9 + 0.02 * i for i, task in enumerate(TASKS)})  # DWA: ratios != 1
        self.optimizer = torch.optim.Adam(self.objective.parameters(), lr=1e-4)
        self.context = WorkerContext()

    def step(self, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> float:
        """Seconds for one training step."""
        started = time.perf_counter()
        names = [task.name for task in TASKS]
        total, task_losses, _ = self.objective(images, labels, mask, names)
        self.optimizer.zero_grad(set_to_none=True)
        if self.weighting.gradient_level:
            set_combined_gradients(self.objective, task_losses, names, self.context)
        else:
            total.backward()
        self.optimizer.step()
        if self.weighting.needs_losses_after_step:
            if self.method.endswith("+reforward"):
                with torch.no_grad():
                    task_losses = masked_task_losses(self.objective.net(images), labels, mask, TASKS)
            self.weighting.after_step(task_losses)
        return time.perf_counter() - started


def random_batch(batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, labels and a mask with about a quarter of the labels missing, as partial labels leave them."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 2, (batch, len(TASKS)), generator=generator).float()
    labels[:, 0] = torch.rand(batch, generator=generator) * 80
    mask = torch.rand(batch, len(TASKS), generator=generator) < 0.75
    return images, labels, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; equal is always timed")
    args = parser.parse_args()
    methods = ["equal"] + [method for method in args.methods.split(",") if method != "equal"]
    torch.set_num_threads(1)
    started = time.perf_counter()
    print(f"{', '.join(methods)}: resnet18, {len(TASKS)} tasks, batch {args.batch} of {args.size} px, CPU, 1 thread; "
          f"{args.warmup} warm-up + {args.steps} timed steps each, interleaved", flush=True)
    batch = random_batch(args.batch, args.size)
    trainers = [Trainer(method) for method in methods]
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(args.warmup + args.steps):
        for trainer in trainers:
            elapsed = trainer.step(*batch)
            if round_index >= args.warmup:
                seconds[trainer.method].append(elapsed)
    print(f"{'method':<16}{'median ms':>10}{'ratio to equal':>16}")
    for method in methods:
        ratios = [mine / equal for mine, equal in zip(seconds[method], seconds["equal"])]
        print(f"{method:<16}{1000 * statistics.median(seconds[method]):>10.1f}{statistics.median(ratios):>16.3f}")
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
