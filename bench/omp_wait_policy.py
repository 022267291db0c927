"""OpenMP's wait policy for the training step: PASSIVE (what facemtl sets, pipeline/__init__.py) against
libgomp's default (spin a while, then sleep) and ACTIVE (spin until there is work).

The demo's training step (ResNet-18, six task heads, learned loss weights, Adam, 64 px, batch 48, torch's
default threads) fed by the training stream with 2 loader processes, run in a fresh process per policy (the
policy is read when torch loads, before ``pipeline`` could set its own), alternating, on idle CPUs and then
beside ``--busy`` processes that each spin on one CPU (a shared node: other jobs, Ray's daemons, another
rank). Wall and CPU time per step of the training process (its OpenMP threads included), best round of each
kept, and the ratios to the default.

    python bench/omp_wait_policy.py [--steps 20] [--rounds 2] [--busy 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASKS = ("age", "gender", "race", "smile", "young", "emotion")
SIZE, BATCH, WARMUP = 64, 48, 3


def measure(shards: str, steps: int) -> None:
    """In a fresh process: time ``steps`` training steps; print wall and CPU seconds per step as JSON."""
    import torch  # first: libgomp reads the policy now, before pipeline/__init__.py sets its default


    from pipeline.config import AugmentConfig
    from pipeline.data import TaskBalancedStream, augment_batch, normalize_images, open_shard_set, train_loader
    from pipeline.losses import build_weighting
    from pipeline.model import MultiTaskNet
    from pipeline.schema import get_task
    from pipeline.task_losses import masked_task_losses

    shard_set = open_shard_set(shards)
    stream = TaskBalancedStream([shard_set], {shard_set.name: BATCH}, TASKS, SIZE, shuffle_buffer=500, seed=0)
    batches = iter(train_loader(stream, 2))
    tasks = [get_task(name) for name in TASKS]
    torch.manual_seed(0)
    net = MultiTaskNet(tasks, "resnet18", [128], 64, 0.2).to(memory_format=torch.channels_last)
    weighting = build_weighting("learned", list(TASKS), lam=0.1)
    optimizer = torch.optim.Adam([*net.parameters(), *weighting.parameters()], lr=1e-3)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        batch = next(batches)
        images = normalize_images(augment_batch(batch["images"], AugmentConfig(), generator), channels_last=True)
        loss = weighting.combine(masked_task_losses(net(images), batch["labels"], batch["mask"], tasks))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    print(json.dumps({"wall": (time.perf_counter() - wall) / steps, "cpu": (time.process_time() - cpu) / steps}))


def spin() -> None:
    while True:
        pass


POLICIES = ("default", "PASSIVE", "ACTIVE")


def run_policy(policy: str, shards: Path, steps: int) -> dict[str, float]:
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if policy != "default":
        environment["OMP_WAIT_POLICY"] = policy
    command = [sys.executable, __file__, "--measure", str(shards), "--steps", str(steps)]
    output = subprocess.run(command, env=environment, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def compare(shards: Path, steps: int, rounds: int, label: str) -> None:
    results: dict[str, list[dict[str, float]]] = {policy: [] for policy in POLICIES}
    for _ in range(rounds):
        for policy in results:
            results[policy].append(run_policy(policy, shards, steps))
    best = {policy: {key: min(r[key] for r in runs) for key in ("wall", "cpu")} for policy, runs in results.items()}
    print(f"\n{label}")
    for policy, figures in best.items():
        print(f"  {policy:<8} {1e3 * figures['wall']:7.1f} ms/step wall, {1e3 * figures['cpu']:7.1f} ms/step CPU")
    for policy in POLICIES[1:]:
        print(f"  {policy} / default: wall {best[policy]['wall'] / best['default']['wall']:.2f}, "
              f"CPU {best[policy]['cpu'] / best['default']['cpu']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", type=int, default=2, help="spinning processes beside the training (0: idle only)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure, args.steps)
        return

    from pipeline.shard import main as shard_main

    print(f"{os.cpu_count()} CPUs; ResNet-18 {SIZE} px, batch {BATCH}, 2 loader processes, {args.steps} steps, "
          f"best of {args.rounds} rounds per policy")
    with tempfile.TemporaryDirectory(prefix="facemtl-bench-") as work:
        shards = Path(work) / "shards"
        assert shard_main(["synthetic", "--tasks", ",".join(TASKS), "--num-samples", "1500", "--size", str(SIZE),
                           "--out", str(shards), "--workers", "2"]) == 0
        compare(shards, args.steps, args.rounds, "idle CPUs")
        if args.busy:
            spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(args.busy)]
            for process in spinners:
                process.start()
            try:
                compare(shards, args.steps, args.rounds, f"beside {args.busy} spinning process(es)")
            finally:
                for process in spinners:
                    process.terminate()


if __name__ == "__main__":
    main()
