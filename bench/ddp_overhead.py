"""What Ray Train costs over plain DDP: the same steps of the same model and batch, three ways.

  (a) the core training step in one process;
  (b) plain DDP under ``torchrun --nproc_per_node 2`` (gloo on CPU);
  (c) Ray Train, ``TorchTrainer`` with 2 workers (gloo on CPU).

Each worker runs MultiTaskNet (resnet18, six task heads) on a fixed random batch with the masked
losses and the learned loss weighting, one torch thread per process. Steady-state steps/s are timed
after warm-up steps, from the median step (a busy machine's bursts move the mean, hardly the median),
with the median step split into forward, backward (with DDP's all-reduce) and optimizer, and the CPU time
the worker process spends on a step (its threads included: what Ray adds inside the worker); start-up
(process launch, process group, Ray cluster) is reported separately.

    python bench/ddp_overhead.py [--steps 30] [--batch 32] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

TASKS = ("age", "gender", "race", "smile", "young", "emotion")
WARMUP = 5


def timed_steps(steps: int, batch: int, size: int, distributed: bool) -> dict[str, float]:
    """Warm up, then time ``steps`` optimizer steps: steps/s of the median step, and its phases in ms."""
    from pipeline.losses import build_weighting
    from pipeline.task_losses import masked_task_losses
    from pipeline.model import MultiTaskNet
    from pipeline.schema import get_task

    torch.set_num_threads(1)
    torch.manual_seed(0)
    tasks = [get_task(t) for t in TASKS]
    class Objective(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = MultiTaskNet(tasks, "resnet18", [128], 64, 0.2)
            self.weighting = build_weighting("learned", list(TASKS), lam=0.1)

        def forward(self, images, labels, mask):
            return self.weighting.combine(masked_task_losses(self.net(images), labels, mask, tasks))

    objective = Objective()
    model = torch.nn.parallel.DistributedDataParallel(objective) if distributed else objective
    optimizer = torch.optim.Adam(objective.parameters(), lr=1e-3)
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 2, (batch, len(TASKS))).float()
    labels[:, 0] = torch.rand(batch) * 80
    mask = torch.ones(batch, len(TASKS), dtype=torch.bool)  # every head gets a gradient: no unused parameters

    def step() -> tuple[float, float, float, float]:
        cpu_started, started = time.process_time(), time.perf_counter()
        total = model(images, labels, mask)
        forward = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        backward = time.perf_counter()
        optimizer.step()
        return forward - started, backward - forward, time.perf_counter() - backward, time.process_time() - cpu_started

    for _ in range(WARMUP):
        step()
    phases = sorted((step() for _ in range(steps)), key=lambda phase: sum(phase[:3]))
    median = phases[len(phases) // 2]
    cpu = sorted(phase[3] for phase in phases)[len(phases) // 2]  # this process's CPU: Ray's threads included
    return {"steps_per_s": 1 / sum(median[:3]), "forward_ms": 1e3 * median[0], "backward_ms": 1e3 * median[1],
            "optimizer_ms": 1e3 * median[2], "cpu_ms": 1e3 * cpu}


def torchrun_worker(steps: int, batch: int, size: int) -> None:
    """Entry point under torchrun: init gloo, time, print rank 0's figures as JSON."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    result = timed_steps(steps, batch, size, distributed=True)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)
    dist.destroy_process_group()


def ray_worker(config: dict) -> None:
    import tempfile

    import ray.train

    figures = timed_steps(config["steps"], config["batch"], config["size"], distributed=True)
    # Ray Train v2 keeps only metrics that come with a checkpoint in the final Result.
    with tempfile.TemporaryDirectory() as folder:
        rank0 = ray.train.get_context().get_world_rank() == 0
        ray.train.report(figures, checkpoint=ray.train.Checkpoint.from_directory(folder) if rank0 else None)


def run_ray(steps: int, batch: int, size: int) -> tuple[dict[str, float], float]:
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    trainer = TorchTrainer(ray_worker, train_loop_config={"steps": steps, "batch": batch, "size": size},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="facemtl-bench-ray-")))
    result = trainer.fit()
    if result.error is not None or not result.metrics:
        raise RuntimeError(f"Ray Train run failed: {result.error}")
    wall = time.perf_counter() - started
    ray.shutdown()
    return result.metrics, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--torchrun-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torchrun_worker:
        torchrun_worker(args.steps, args.batch, args.size)
        return

    started = time.perf_counter()
    single = timed_steps(args.steps, args.batch, args.size, distributed=False)
    single_wall = time.perf_counter() - started

    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    output = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__, "--torchrun-worker",
         "--steps", str(args.steps), "--batch", str(args.batch), "--size", str(args.size)],
        capture_output=True, text=True, env=env, check=True,
    ).stdout
    torchrun = json.loads(output.split("RESULT ", 1)[1].splitlines()[0])
    torchrun_wall = time.perf_counter() - started

    ray, ray_wall = run_ray(args.steps, args.batch, args.size)

    def startup(wall: float, rate: float) -> float:
        return wall - (args.steps + WARMUP) / rate

    print(f"\nresnet18 MultiTaskNet, {args.size}x{args.size}, batch {args.batch} per worker, "
          f"{args.steps} timed steps, 1 thread/process")
    print(f"{'run':<38}{'steps/s':>8}{'samples/s':>10}{'start-up s':>11}   median step, ms: forward, backward, "
          "optimizer; CPU")
    for name, figures, wall, workers in (("(a) one process, no DDP", single, single_wall, 1),
                                         ("(b) torchrun --nproc_per_node 2 DDP", torchrun, torchrun_wall, 2),
                                         ("(c) Ray Train TorchTrainer, 2 workers", ray, ray_wall, 2)):
        rate = figures["steps_per_s"]
        print(f"{name:<38}{rate:>8.2f}{rate * args.batch * workers:>10.1f}{startup(wall, rate):>11.1f}   "
              f"{figures['forward_ms']:.0f}, {figures['backward_ms']:.0f}, {figures['optimizer_ms']:.0f}; "
              f"{figures['cpu_ms']:.0f}")
    print(f"Ray Train / plain DDP, steady state: {ray['steps_per_s'] / torchrun['steps_per_s']:.3f}")


if __name__ == "__main__":
    main()
