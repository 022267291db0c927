"""Memory format of the training step on this device: channels_last (NHWC) against contiguous (NCHW).

The same MultiTaskNet training step (backbone, shared layers, six task heads, masked losses, learned loss
weighting, Adam) on the same random batch, once per memory format and backbone; steady-state images/s after
warm-up steps. ``model.channels_last`` (default true) is what the training loop uses on every device.

    python bench/channels_last.py [--steps 10] [--batch 64] [--size 64] [--backbones mobilenet_v2 resnet18]
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.losses import build_weighting
from pipeline.task_losses import masked_task_losses
from pipeline.model import MultiTaskNet
from pipeline.schema import get_task

TASKS = ("age", "gender", "race", "smile", "young", "emotion")
WARMUP = 3


def images_per_second(backbone: str, channels_last: bool, steps: int, batch: int, size: int) -> float:
    """Steady-state training images/s of one backbone in one memory format."""
    torch.manual_seed(0)
    tasks = [get_task(name) for name in TASKS]
    net = MultiTaskNet(tasks, backbone=backbone)
    weighting = build_weighting("learned", list(TASKS))
    optimizer = torch.optim.Adam([*net.parameters(), *weighting.parameters()], lr=1e-4)
    images = torch.randn(batch, 3, size, size)
    labels = torch.stack([torch.randint(0, task.num_outputs, (batch,)).float() if task.kind != "regression"
                          else torch.rand(batch) * 80 for task in tasks], dim=1)
    mask = torch.rand(batch, len(tasks)) < 0.5
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    net.train()
    for step in range(WARMUP + steps):
        if step == WARMUP:
            started = time.perf_counter()
        losses = masked_task_losses(net(images), labels, mask, tasks)
        loss = weighting.combine(losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--backbones", nargs="+", default=["mobilenet_v2", "resnet18"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, {args.size} px, "
          f"{args.steps} timed steps after {WARMUP} warm-up")
    print(f"{'backbone':<14} {'NCHW img/s':>11} {'NHWC img/s':>11} {'NHWC / NCHW':>12}")
    for backbone in args.backbones:
        contiguous = images_per_second(backbone, False, args.steps, args.batch, args.size)
        nhwc = images_per_second(backbone, True, args.steps, args.batch, args.size)
        print(f"{backbone:<14} {contiguous:>11.1f} {nhwc:>11.1f} {nhwc / contiguous:>12.2f}")


if __name__ == "__main__":
    main()
