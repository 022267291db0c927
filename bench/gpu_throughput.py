"""Training images/s of the GPU check (steps 1-5), one group of steps per process.

    python bench/gpu_throughput.py model:KEY|decode|ddp PLAN.json RESULT.json   (run by bench/gpu_check.py)
    python bench/gpu_throughput.py ddp-worker PLAN.json RESULT.json             (a torchrun rank of step 5)

The step is MultiTaskNet (backbone, shared layers, six task heads) with masked per-task losses and Adam, under
bf16 autocast, model and batch in channels_last. Its loss is a stand-in for ``pipeline.losses`` (same heads and
masks, no learned weighting) that never synchronises with the host, so the figures are the device's, not the
bookkeeping's. Times are taken after warm-up steps, between ``torch.cuda.synchronize`` calls.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tarfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from gpu_check import (ANCHOR, BENCH, GOAL_LOADER_RATIO, GOAL_SYNTHETIC, REPO, TASKS, ModelPlan, Plan, Row, RowWriter,
                       one_line)

warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

from pipeline.model import MultiTaskNet  # noqa: E402
from pipeline.schema import TaskSpec, get_task  # noqa: E402


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()


def multitask_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor, mask: torch.Tensor,
                   tasks: Sequence[TaskSpec]) -> torch.Tensor:
    """Sum over tasks of the mean loss over labelled samples; masks multiply (boolean indexing would sync)."""
    weights = mask.float()
    total = torch.zeros((), device=labels.device)
    for index, task in enumerate(tasks):
        output = outputs[task.name].float()
        if task.kind == "regression":
            per_sample = (output[:, 0] - labels[:, index] / 100).square()
        else:
            per_sample = F.cross_entropy(output, labels[:, index].long(), reduction="none")
        total = total + (per_sample * weights[:, index]).sum() / weights[:, index].sum().clamp(min=1)
    return total


class TrainStep:
    """One optimizer step of MultiTaskNet on a batch already on ``device``."""

    def __init__(self, backbone: str, task_names: Sequence[str], device: torch.device, amp: str,
                 wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> None:
        torch.manual_seed(0)
        self.tasks = [get_task(name) for name in task_names]
        self.device, self.amp = device, amp
        net = MultiTaskNet(self.tasks, backbone).to(device, memory_format=torch.channels_last)
        net.train()
        self.model = wrap(net) if wrap else net
        self.optimizer = torch.optim.Adam(net.parameters(), lr=1e-4)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
        with autocast(self.device, self.amp):
            loss = multitask_loss(self.model(images), labels, mask, self.tasks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def random_targets(tasks: Sequence[TaskSpec], batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    columns = [torch.rand(batch, device=device) * 80 if task.kind == "regression"
               else torch.randint(0, task.num_outputs, (batch,), device=device).float() for task in tasks]
    return torch.stack(columns, dim=1), torch.rand(batch, len(tasks), device=device) < 0.5


def random_batch(tasks: Sequence[TaskSpec], batch: int, size: int, device: torch.device):
    """Normalised float images (channels_last), labels and mask, made on ``device``."""
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    return (images, *random_targets(tasks, batch, device))


def images_per_second(step: Callable[[], None], batch: int, warmup: int, steps: int, max_seconds: float,
                      device: torch.device) -> tuple[float, int]:
    """Warm up, then time up to ``steps`` steps (fewer past ``max_seconds``); (images/s, steps timed)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    started = time.perf_counter()
    done = 0
    while done < steps and (done == 0 or time.perf_counter() - started < max_seconds):
        step()
        done += 1
    synchronize(device)
    return done * batch / (time.perf_counter() - started), done


def failed(writer: RowWriter, step: str, what: str, error: BaseException) -> None:
    traceback.print_exc()
    if isinstance(error, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
    writer.add(Row(step, what, status="FAIL", notes=one_line(error)))


# ---------------------------------------------------------------- steps 1-3: one model, two ways


def loader_batches(shards: str, task_names: Sequence[str], image_size: int, batch: int, workers: int,
                   pin_memory: bool) -> Iterator[dict[str, torch.Tensor]]:
    """Our training stream as the loop builds it: quotas from label coverage, one stream per loader worker."""
    from pipeline.data import TaskBalancedStream, compute_quotas, open_shard_set, train_loader

    shard_set = open_shard_set(shards)
    coverage = {shard_set.name: {task: shard_set.labelled_fraction(task) for task in task_names}}
    quotas = compute_quotas(coverage, task_names, batch)
    stream = TaskBalancedStream([shard_set], quotas, task_names, image_size, shuffle_buffer=500, seed=0)
    return iter(train_loader(stream, workers, pin_memory=pin_memory))


def labelled_tasks(shards: str) -> list[str]:
    from pipeline.data import open_shard_set

    shard_set = open_shard_set(shards)
    return [task for task in TASKS if shard_set.labelled_fraction(task) > 0]


def measure_model(plan: Plan, model: ModelPlan, writer: RowWriter) -> None:
    """Random tensors on the device (the upper bound), + GPU augmentation, then fed by the loader per worker count."""
    from pipeline.config import AugmentConfig
    from pipeline.data import augment_batch, normalize_images

    device = torch.device(plan.device)
    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolution algorithms once
    size, batch = model.image_size, model.batch_size
    timing = dict(warmup=plan.warmup_steps, steps=plan.timed_steps, max_seconds=plan.max_timed_s, device=device)
    try:
        task_names, shard_error = labelled_tasks(model.shards), None
    except Exception as error:  # the loader rows report it; the model alone still runs
        task_names, shard_error = list(TASKS), error
    what = f"{model.label} {size} px, batch {batch}, {plan.amp}, channels_last"
    try:
        train_step = TrainStep(model.backbone, task_names, device, plan.amp)
    except Exception as error:
        failed(writer, model.synthetic_step, what, error)
        return

    upper = None
    try:
        images, labels, mask = random_batch(train_step.tasks, batch, size, device)
        upper, steps = images_per_second(lambda: train_step(images, labels, mask), batch, **timing)
        notes = f"{steps} steps after {plan.warmup_steps} warm-up"
        if plan.goals and model.synthetic_step == "1":
            notes += f"; goal >= {GOAL_SYNTHETIC:,.0f}: {'met' if upper >= GOAL_SYNTHETIC else 'MISSED'}; {ANCHOR}"
        writer.add(Row(model.synthetic_step, f"{what}: random tensors on the {device.type}", upper, notes=notes))
        del images
    except Exception as error:
        failed(writer, model.synthetic_step, f"{what}: random tensors", error)

    augment = AugmentConfig()
    generator = torch.Generator().manual_seed(0)

    def ratio(rate: float) -> str:
        return f"{rate / upper:.2f} of ({model.synthetic_step})" if upper else ""

    try:
        raw = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)

        def augmented_step() -> None:
            train_step(normalize_images(augment_batch(raw, augment, generator), channels_last=True), labels, mask)

        rate, steps = images_per_second(augmented_step, batch, **timing)
        what = f"{model.label}: + augment_batch and normalize_images on the {device.type}"
        writer.add(Row(model.synthetic_step, what, rate, ratio(rate),
                       notes=f"uint8 batch already on the device; {steps} steps"))
        del raw
    except Exception as error:
        failed(writer, model.synthetic_step, f"{model.label}: + augmentation", error)

    for workers in plan.loader_workers:
        what = f"{model.label} fed by TaskBalancedStream, {workers} loader worker(s), augmentation on the {device.type}"
        if shard_error is not None:
            writer.add(Row(model.loader_step, what, status="FAIL", notes=one_line(shard_error)))
            continue
        try:
            batches = loader_batches(model.shards, task_names, size, batch, workers, pin_memory=device.type == "cuda")

            def loader_step() -> None:
                loaded = next(batches)
                images = augment_batch(loaded["images"].to(device, non_blocking=True), augment, generator)
                train_step(normalize_images(images, channels_last=True), loaded["labels"].to(device, non_blocking=True),
                           loaded["mask"].to(device, non_blocking=True))

            # the prefetch queue (4 batches per worker) is drained first, so the timed steps see the steady state
            rate, steps = images_per_second(loader_step, batch, plan.warmup_steps + 4 * workers, plan.timed_steps,
                                            plan.max_timed_s, device)
            notes = f"{steps} steps after {plan.warmup_steps + 4 * workers} warm-up"
            if plan.goals and workers == 8 and model.loader_step == "2" and upper:
                met = rate / upper >= GOAL_LOADER_RATIO
                notes += f"; goal >= {GOAL_LOADER_RATIO} of (1): {'met' if met else 'MISSED'}"
            writer.add(Row(model.loader_step, what, rate, ratio(rate), notes=notes))
            del batches  # its workers end with the iterator
        except Exception as error:
            failed(writer, model.loader_step, what, error)


# ---------------------------------------------------------------- step 4: JPEG decoding


def shard_jpegs(shards: str, count: int) -> list[bytes]:
    """The first ``count`` JPEGs of a shard folder's train tars (plain tar files: WebDataset's layout)."""
    tars = sorted(Path(shards).glob("train-*.tar"))
    if not tars:
        raise FileNotFoundError(f"{shards} holds no train-*.tar shard")
    jpegs: list[bytes] = []
    for path in tars:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.name.endswith(".jpg"):
                    jpegs.append(archive.extractfile(member).read())
                    if len(jpegs) == count:
                        return jpegs
    return jpegs


def measure_decode(plan: Plan, writer: RowWriter) -> None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        jpegs = shard_jpegs(plan.decode_shards, plan.decode_batch)
        encoded = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
        size = decode_jpeg(encoded[0], mode=ImageReadMode.RGB).shape[-1]
    except Exception as error:
        failed(writer, "4", "decode_jpeg on shard JPEGs", error)
        return
    batch = len(encoded)

    def rate_on(device: torch.device) -> float:
        decode = lambda: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)  # noqa: E731
        rate, _ = images_per_second(decode, batch, 2, plan.decode_batches, plan.max_timed_s, device)
        return rate

    cpu = None
    try:
        cpu = rate_on(torch.device("cpu"))
        writer.add(Row("4", f"decode_jpeg on the CPU, one process, {batch} shard JPEGs of {size} px", cpu,
                       notes="per core: the loader's workers each decode at about this rate"))
    except Exception as error:
        failed(writer, "4", "decode_jpeg on the CPU", error)
    what = f"decode_jpeg(device='cuda'), batches of {batch} ({size} px, nvJPEG)"
    if plan.device != "cuda":
        writer.add(Row("4", what, status="skipped", notes="no GPU in --cpu mode"))
        return
    try:
        gpu = rate_on(torch.device("cuda"))
        writer.add(Row("4", what, gpu, f"{gpu / cpu:.1f}x CPU" if cpu else "",
                       notes="bytes copied from pageable memory each batch"))
    except Exception as error:
        failed(writer, "4", what, error)


# ---------------------------------------------------------------- step 5: DDP over every GPU


def ddp_rank_images_per_second(settings: dict, device: torch.device) -> float:
    """One rank: DDP-wrapped TrainStep on random tensors; per-rank images/s (ranks step in lockstep)."""
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    device_ids = [device.index] if device.type == "cuda" else None
    train_step = TrainStep(settings["backbone"], TASKS, device, settings["amp"],
                           wrap=lambda net: DistributedDataParallel(net, device_ids=device_ids))
    images, labels, mask = random_batch(train_step.tasks, settings["batch"], settings["size"], device)
    rate, _ = images_per_second(lambda: train_step(images, labels, mask), settings["batch"], settings["warmup"],
                                settings["steps"], settings["max_seconds"], device)
    return rate


def ray_ddp_worker(settings: dict) -> None:
    """``train_loop_per_worker`` of Ray Train: the process group is already set up (nccl or gloo)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    device = ray.train.torch.get_device() if settings["device"] == "cuda" else torch.device("cpu")
    rate = ddp_rank_images_per_second(settings, device)
    if context.get_world_rank() == 0:
        Path(settings["result"]).write_text(json.dumps({"per_rank": rate, "world_size": context.get_world_size()}))


def torchrun_ddp_worker(plan: Plan, result: str) -> None:
    """A rank under ``torch.distributed.run``: set up the process group, measure, rank 0 writes the result."""
    import torch.distributed as dist

    settings = ddp_settings(plan, result)
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if plan.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before NCCL starts: each rank on its own GPU
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rate = ddp_rank_images_per_second(settings, device)
    if dist.get_rank() == 0:
        Path(result).write_text(json.dumps({"per_rank": rate, "world_size": dist.get_world_size()}))
    dist.destroy_process_group()


def ddp_settings(plan: Plan, result: str) -> dict:
    model = plan.models[0]
    return {"backbone": model.backbone, "size": model.image_size, "batch": model.batch_size, "amp": plan.amp,
            "device": plan.device, "warmup": plan.warmup_steps, "steps": plan.timed_steps,
            "max_seconds": plan.max_timed_s, "result": result}


def run_with_ray(settings: dict, world: int, use_gpu: bool, storage: Path) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    path = os.pathsep.join([str(REPO), str(BENCH), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 2 * world), num_gpus=world if use_gpu else 0,
             include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": path, "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}})
    try:
        # Ray pickles functions of __main__ by value, torch's module objects with them; by name, workers import it
        from gpu_throughput import ray_ddp_worker as worker

        trainer = TorchTrainer(
            worker, train_loop_config=settings,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=world, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="gpu-check-ddp", storage_path=str(storage)),
        )
        result = trainer.fit()
        if result.error is not None:
            raise RuntimeError(f"Ray Train run failed: {one_line(result.error)}")
    finally:
        ray.shutdown()


def run_with_torchrun(plan_path: str, result: str, world: int) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(Path(__file__).resolve()), "ddp-worker", plan_path, result]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print("$ " + " ".join(command), flush=True)
    code = subprocess.run(command, cwd=REPO, env=env).returncode
    if code != 0:
        raise RuntimeError(f"torchrun exited {code} (its ranks' output is above in this log)")


def measure_ddp(plan: Plan, plan_path: str, writer: RowWriter) -> None:
    model = plan.models[0]
    if plan.device == "cuda":
        world, backend = torch.cuda.device_count(), "NCCL"
        if world < 2:
            writer.add(Row("5", f"DDP over every GPU ({model.label})", status="skipped",
                           notes=f"{world} GPU: DDP scaling needs 2 or more"))
            return
    else:
        world, backend = plan.cpu_ddp_workers, "gloo"
    launcher = "Ray Train TorchTrainer" if plan.use_ray else "torchrun (without Ray)"
    what = f"DDP {backend}, {world} {'GPUs' if plan.device == 'cuda' else 'CPU processes'}, {launcher}, {model.label}"
    result = str(Path(plan.work) / "ddp.result.json")
    try:
        if plan.use_ray:
            run_with_ray(ddp_settings(plan, result), world, plan.device == "cuda", Path(plan.work) / "ray")
        else:
            run_with_torchrun(plan_path, result, world)
        measured = json.loads(Path(result).read_text())
        total = measured["per_rank"] * measured["world_size"]
        reference = plan.reference_images_per_s
        scaling = f"{total / (world * reference):.2f} of {world}x (1)" if reference else ""
        writer.add(Row("5", what, total, scaling, notes=f"batch {model.batch_size} per rank; "
                       f"{'scaling against step (1)' if reference else 'step (1) not measured: no scaling'}"))
    except Exception as error:
        failed(writer, "5", what, error)


# ---------------------------------------------------------------- entry


def main(argv: Sequence[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    step, plan_path, result = argv
    plan = Plan.load(plan_path)
    if step == "ddp-worker":
        torchrun_ddp_worker(plan, result)
        return 0
    writer = RowWriter(result)
    if step.startswith("model:"):
        measure_model(plan, next(m for m in plan.models if m.key == step.partition(":")[2]), writer)
    elif step == "decode":
        measure_decode(plan, writer)
    elif step == "ddp":
        measure_ddp(plan, plan_path, writer)
    else:
        print(f"unknown step {step!r}", file=sys.stderr)
        return 2
    return 0  # failed measurements are rows; a non-zero exit means the process itself broke


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
