"""How far Adam moves the shared trunk per step under a loss weighting, relative to equal weighting.

A weighting that smooths the gradient before Adam sees it (DB-MTL's moving average of each task's gradient)
shrinks Adam's second moment more than its first, so Adam takes longer steps at the same lr. This measures it:
each method trains its own copy of the same MultiTaskNet (MobileNetV2, no pretrained weights; age, gender, race)
with Adam at lr 1e-3 on fresh random batches (labels unrelated to the images: gradients as noisy as they get),
the step written as in ``pipeline.loop``; it prints the mean |change| of a trunk weight per step over the last
``--window`` steps, in units of lr, and its ratio to equal's. ``dbmtl:beta=0`` is DB-MTL without the moving
average (log losses and magnitude balancing only): the control that says which of DB-MTL's parts lengthens the step.

    python bench/weighting_step_size.py [--steps 50] [--window 20] [--methods equal dbmtl dbmtl:beta=0 ...]
"""

from __future__ import annotations

import argparse

import torch

from pipeline.config import TrainConfig
from pipeline.loop import MultiTaskObjective, WorkerContext, set_combined_gradients
from pipeline.losses import build_weighting
from pipeline.model import MultiTaskNet
from pipeline.schema import get_task

TASKS = [get_task(name) for name in ("age", "gender", "race")]
LR = 1e-3


def random_batch(generator: torch.Generator, batch: int = 64, size: int = 64):
    images = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.stack([torch.rand(batch, generator=generator) * 80 + 10,
                          torch.randint(0, 2, (batch,), generator=generator).float(),
                          torch.randint(0, 5, (batch,), generator=generator).float()], dim=1)
    return images, labels, torch.ones(batch, len(TASKS), dtype=torch.bool)


def parse_method(text: str) -> tuple[str, dict[str, float]]:
    """``dbmtl:beta=0.8,beta_sigma=0.5`` -> ("dbmtl", {"beta": 0.8, "beta_sigma": 0.5})."""
    name, _, options = text.partition(":")
    return name, {key: float(value) for key, value in (item.split("=") for item in options.split(",") if item)}


def trunk_step_size(method: str, options: dict[str, float], steps: int, window: int) -> float:
    """Mean |Δθ| / lr of the trunk's weights per step, over the last ``window`` of ``steps`` steps."""
    torch.manual_seed(0)  # the same initial network for every method
    names = [task.name for task in TASKS]
    weighting = build_weighting(method, names, **options)
    objective = MultiTaskObjective(MultiTaskNet(TASKS, "mobilenet_v2"), weighting, TASKS, TrainConfig())
    optimizer = torch.optim.Adam(objective.parameters(), lr=LR)
    trunk = list(objective.net.trunk_parameters())
    generator = torch.Generator().manual_seed(1)  # the same batches for every method
    sizes = []
    for step in range(steps):
        images, labels, mask = random_batch(generator)
        total, task_losses, _ = objective(images, labels, mask, names)
        optimizer.zero_grad(set_to_none=True)
        if weighting.gradient_level:
            set_combined_gradients(objective, task_losses, names, WorkerContext())
        else:
            total.backward()
        before = torch.cat([parameter.detach().flatten() for parameter in trunk])
        optimizer.step()
        if step >= steps - window:
            after = torch.cat([parameter.detach().flatten() for parameter in trunk])
            sizes.append(float((after - before).abs().mean()) / LR)
    return sum(sizes) / len(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--window", type=int, default=20)
    parser.add_argument("--methods", nargs="+", default=["dbmtl", "dbmtl:beta=0", "dbmtl:beta_sigma=0.5"],
                        help="space-separated, each NAME or NAME:option=value,...; equal is always measured first")
    args = parser.parse_args()
    torch.set_num_threads(1)
    methods = ["equal", *(method for method in args.methods if method != "equal")]
    baseline = None
    for text in methods:
        size = trunk_step_size(*parse_method(text), args.steps, args.window)
        baseline = size if baseline is None else baseline
        print(f"{text:<24} trunk step {size:.3f} lr  ({size / baseline:.2f}x equal)", flush=True)


if __name__ == "__main__":
    main()
