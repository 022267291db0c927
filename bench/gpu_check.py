"""GPU check: facemtl's CUDA, bf16, channels_last, GPU-augmentation and NCCL paths in one run, one table at the end.

    bench/gpu_check.sh                     # on a GPU machine: every step, about 5-8 minutes
    bench/gpu_check.sh --cpu --tiny        # every step that can run without a GPU, tiny inputs (the test)
    bench/gpu_check.sh --steps 1,2,6       # some steps only

Steps, on synthetic shards this script makes itself (``python -m pipeline.shard synthetic``):
  1  MultiTaskNet(ResNet-50) training step at 224 px, bf16 autocast, channels_last, batch 256, on random
     tensors already on the GPU: the device's upper bound; then the same with ``augment_batch`` on the GPU
  2  the same model fed by ``TaskBalancedStream`` with 2/4/8 loader workers, augmentation on the GPU; ratio to (1)
  3  MobileNetV2 at 128 px (the configs' model), the same two ways
  4  ``torchvision.io.decode_jpeg(device="cuda")`` on a batch of shard JPEGs against decoding on the CPU
  5  DDP over every GPU (Ray Train with NCCL; torchrun where Ray is missing), scaling against (1); 1 GPU: skipped
  6  ``python -m pipeline.train`` on the demo config with use_gpu=true: 2 short epochs, checkpoint, resume,
     validation metrics against a CPU fp32 run of the same steps (tolerances in bench/gpu_train_check.py)

Each group of steps runs in its own process under a time limit, so a CUDA error or a hang in one cannot take the
others down, and the whole run stays inside ``--budget-s``. The table goes to stdout and, when $OUT is set, to
$OUT/gpu_check.md (the steps' logs to $OUT/gpu_check_logs.txt). Exit status: 0 when no step failed, 1 when one
did, 2 when the check could not start (no CUDA device without --cpu, bad arguments).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
STEPS = ("1", "2", "3", "4", "5", "6")
TASKS = ("age", "gender", "race", "smile", "young", "emotion")
# Wheels that a bare GPU machine may lack, by the module name an ImportError reports.
WHEEL_OF_MODULE = {"yaml": "pyyaml", "PIL": "pillow", "webdataset": "webdataset", "braceexpand": "braceexpand",
                   "simplejpeg": "simplejpeg"}
# The table's figures against published ones (NVIDIA Deep Learning Examples, ResNet-50 v1.5, PyTorch, AMP).
ANCHOR = "NVIDIA ResNet-50 v1.5, 1x A100-80GB AMP: 2,470 img/s (8x: 16,621)"
GOAL_SYNTHETIC = 3000.0  # (1) on an H100/H200-class GPU
GOAL_LOADER_RATIO = 0.9  # (2)/(1) with 8 loader workers


@dataclass
class Row:
    """One line of the result table."""

    step: str
    what: str
    images_per_s: float | None = None
    ratio: str = ""
    status: str = "ok"  # ok | FAIL | skipped
    notes: str = ""


@dataclass
class ModelPlan:
    """One backbone measured two ways: random tensors (``synthetic_step``) and fed by the loader (``loader_step``)."""

    key: str
    label: str
    backbone: str
    image_size: int
    batch_size: int
    synthetic_step: str
    loader_step: str
    shards: str = ""


@dataclass
class Plan:
    """Everything a step process needs, written to ``plan.json`` in the work folder."""

    device: str  # cuda | cpu
    tiny: bool
    use_ray: bool
    work: str
    models: list[ModelPlan]
    amp: str = "bf16"
    warmup_steps: int = 10
    timed_steps: int = 50
    max_timed_s: float = 25.0
    loader_workers: list[int] = field(default_factory=lambda: [2, 4, 8])
    decode_batch: int = 256
    decode_batches: int = 10
    decode_shards: str = ""
    cpu_ddp_workers: int = 2
    reference_images_per_s: float | None = None  # step (1), for step 5's scaling
    demo_shards: list[str] = field(default_factory=list)
    train_steps_per_epoch: int = 30
    train_overrides: list[str] = field(default_factory=list)
    train_run_timeout_s: float = 150.0
    goals: bool = True

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        values = json.loads(Path(path).read_text())
        values["models"] = [ModelPlan(**model) for model in values["models"]]
        return cls(**values)


class RowWriter:
    """The rows of one step process, rewritten to its result file after each row (a killed process keeps its rows)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[Row] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        self.path.write_text(json.dumps([dataclasses.asdict(r) for r in self.rows]))
        rate = format_rate(row.images_per_s)
        print(f"[{row.step}] {row.what}: {rate} img/s {row.ratio} {row.status} {row.notes}", flush=True)
        return row


def one_line(error: BaseException) -> str:
    """An exception as one table cell: its type and the last line of its message."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[-1] if message else ''}"[:300]


def format_rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


# ---------------------------------------------------------------- sizes


def build_plan(args: argparse.Namespace, work: Path, use_ray: bool) -> Plan:
    """The full check's sizes, or tiny ones for a CPU test of the same code paths."""
    device = "cpu" if args.cpu else "cuda"
    if args.tiny:
        models = [
            ModelPlan("resnet50", "ResNet-50", "resnet50", 32, 4, "1", "2"),
            ModelPlan("mobilenet", "MobileNetV2", "mobilenet_v2", 32, 4, "3", "3"),
        ]
        return Plan(device, True, use_ray, str(work), models, warmup_steps=1, timed_steps=2, max_timed_s=20.0,
                    loader_workers=[1, 2], decode_batch=8, decode_batches=2, train_steps_per_epoch=2,
                    train_overrides=["data.batch_size=8", "data.image_size=32", "data.loader_workers=1",
                                     "model.shared_dims=[32]", "model.head_hidden=16"],
                    train_run_timeout_s=120.0, goals=False)
    models = [
        ModelPlan("resnet50", "ResNet-50", "resnet50", 224, 256, "1", "2"),
        ModelPlan("mobilenet", "MobileNetV2", "mobilenet_v2", 128, 256, "3", "3"),
    ]
    return Plan(device, False, use_ray, str(work), models, goals=device == "cuda")


SHARD_SAMPLES = {False: 3000, True: 64}  # synthetic faces per loader shard set (resampled endlessly by the stream)
DEMO_DATASETS = (("synth-utkface", "age,gender,race", 3000, 1), ("synth-fer2013", "emotion", 2000, 2),
                 ("synth-celeba", "gender,smile,young", 2000, 3))  # as pipeline.demo shards them
DEMO_SCALE = {False: 0.5, True: 0.04}
DEMO_IMAGE_SIZE = {False: 64, True: 32}


def make_shards(name: str, tasks: str, samples: int, size: int, seed: int, out: Path, log: Path) -> None:
    """``python -m pipeline.shard synthetic``; raises with the log's last line when it fails."""
    workers = max(1, min(8, (os.cpu_count() or 2) - 1)) if samples > 500 else 1  # tiny sets: no process pool
    command = [sys.executable, "-m", "pipeline.shard", "synthetic", "--name", name, "--tasks", tasks,
               "--num-samples", str(samples), "--seed", str(seed), "--size", str(size), "--samples-per-shard", "500",
               "--workers", str(workers), "--out", str(out)]
    with log.open("a") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        code = subprocess.run(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=child_env(),
                              timeout=300).returncode
    if code != 0:
        raise RuntimeError(f"pipeline.shard synthetic {name} exited {code}: {last_line(log)}")


# ---------------------------------------------------------------- environment


def child_env() -> dict[str, str]:
    """The repository and bench/ on the path of every step process, whatever started this script."""
    paths = [str(REPO), str(BENCH), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths)), "PYTHONUNBUFFERED": "1"}


def missing_module(module: str) -> str | None:
    """None when ``module`` imports; else the name of the module that is missing (or the error)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        return error.name or str(error)
    except ImportError as error:
        return one_line(error)
    return None


def wheel_message(module: str, missing: str) -> str:
    wheel = WHEEL_OF_MODULE.get(missing.split(".")[0], missing.split(".")[0])
    return (f"{module} needs {missing!r}, which is not installed: put the {wheel} wheel in .whl/ "
            "(the pip download line is at the top of bench/gpu_check.sh)")


def ray_version() -> str:
    """Ray's version, or "not installed", without importing it (seconds)."""
    if importlib.util.find_spec("ray") is None:
        return "not installed"
    return importlib.metadata.version("ray")


def describe_environment(plan: Plan) -> list[str]:
    import torch
    import torchvision

    lines = [f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
             f"{os.cpu_count()} CPUs"]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"CUDA {torch.version.cuda}, {len(names)} GPU(s): {', '.join(names)}")
    else:
        lines.append("CUDA: no device")
    lines.append(f"ray: {ray_version()}" + ("" if plan.use_ray else " (not used: step 5 runs under torchrun, step 6 as "
                                                               "pipeline.train --local)"))
    if Path("/dev/shm").exists():
        free = shutil.disk_usage("/dev/shm").free / 2**30
        lines.append(f"/dev/shm free: {free:.1f} GiB (loader workers pass batches through it)")
    mode = f"{'CPU' if plan.device == 'cpu' else 'GPU'}, {'tiny' if plan.tiny else 'full'} sizes"
    lines.append(f"mode: {mode}, work folder {plan.work}")
    return lines


# ---------------------------------------------------------------- running the step processes


@dataclass(frozen=True)
class StepGroup:
    """Steps measured by one process: ``script ARGUMENT plan.json result.json``."""

    key: str
    steps: tuple[str, ...]
    script: str
    argument: str
    limit_s: float
    needs: tuple[str, ...]  # pipeline modules it imports


GROUPS = (
    StepGroup("resnet50", ("1", "2"), "gpu_throughput.py", "model:resnet50", 180, ("pipeline.model", "pipeline.data")),
    StepGroup("mobilenet", ("3",), "gpu_throughput.py", "model:mobilenet", 150, ("pipeline.model", "pipeline.data")),
    StepGroup("decode", ("4",), "gpu_throughput.py", "decode", 90, ()),
    StepGroup("ddp", ("5",), "gpu_throughput.py", "ddp", 240, ("pipeline.model",)),
    StepGroup("train", ("6",), "gpu_train_check.py", "train", 330, ("pipeline.train", "pipeline.loop")),
)


def last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    return lines[-1].strip()[:300] if lines else "(no output)"


def run_group(group: StepGroup, plan_path: Path, work: Path, limit_s: float) -> list[Row]:
    """Run one step process under ``limit_s``; its rows, plus a FAIL row for each of its steps without one."""
    result = work / f"{group.key}.rows.json"
    log = work / "logs" / f"{group.key}.log"
    command = [sys.executable, str(BENCH / group.script), group.argument, str(plan_path), str(result)]
    print(f"steps {','.join(group.steps)} ({group.key}): running, limit {limit_s:.0f} s, log {log}", flush=True)
    started = time.perf_counter()
    timed_out = False
    with log.open("w") as handle:
        # its own session: on a timeout its loader workers, torchrun ranks and trainings go with it
        process = subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, env=child_env(),
                                   start_new_session=True)
        try:
            code = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
    rows = [Row(**row) for row in json.loads(result.read_text())] if result.exists() else []
    seconds = time.perf_counter() - started
    print(f"  {len(rows)} row(s) in {seconds:.0f} s, exit {'timeout' if timed_out else code}", flush=True)
    if timed_out or code != 0:  # a step process exits 0 whenever it wrote its rows, failed ones included
        reason = f"killed at its {limit_s:.0f} s limit" if timed_out else f"exit {code}: {last_line(log)}"
        print("  " + "\n  ".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
        current = rows[-1].step if rows else group.steps[0]
        rows.append(Row(current, f"step {current} ({group.key}) did not finish", status="FAIL",
                        notes=f"{reason}; log {log.name}"))
    for step in group.steps:
        if not any(row.step == step for row in rows):
            rows.append(Row(step, f"step {step} ({group.key})", status="FAIL", notes=f"no result; log {log.name}"))
    return rows


def not_run(group: StepGroup, status: str, reason: str) -> list[Row]:
    return [Row(step, f"step {step} ({group.key})", status=status, notes=reason) for step in group.steps]


# ---------------------------------------------------------------- the table


def markdown_table(rows: list[Row]) -> str:
    lines = ["| step | what | images/s | ratio | status | notes |", "|---|---|--:|---|---|---|"]
    for row in rows:
        cells = [row.step, row.what, format_rate(row.images_per_s), row.ratio, row.status, row.notes]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def write_outputs(out_dir: Path, header: list[str], table: str, work: Path) -> None:
    """$OUT/gpu_check.md (header + table) and $OUT/gpu_check_logs.txt (the end of every step's log)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.md").write_text("\n".join(f"- {line}" for line in header) + "\n\n" + table + "\n")
    parts = []
    for log in sorted((work / "logs").glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        parts.append(f"==== {log.name} (last {min(len(lines), 300)} of {len(lines)} lines)\n" + "\n".join(lines[-300:]))
    (out_dir / "gpu_check_logs.txt").write_text("\n\n".join(parts) + "\n")


# ---------------------------------------------------------------- main


def parse_steps(text: str) -> set[str]:
    steps = {part.strip() for part in text.split(",") if part.strip()}
    unknown = steps - set(STEPS)
    if unknown or not steps:
        raise argparse.ArgumentTypeError(f"steps must be a comma-separated subset of {','.join(STEPS)}, got {text!r}")
    return steps


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (no CUDA needed); GPU-only rows are skipped")
    parser.add_argument("--tiny", action="store_true", help="tiny models, images and step counts (a test of the paths)")
    parser.add_argument("--steps", type=parse_steps, default=set(STEPS), help="steps to run, e.g. 1,2,6 (default all)")
    parser.add_argument("--shards", type=Path, help="an existing shard folder for steps 2-4 instead of synthetic ones")
    parser.add_argument("--no-ray", action="store_true", help="torchrun for step 5 and pipeline.train --local for "
                        "step 6 even where Ray is installed")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the check (default 480)")
    parser.add_argument("--work", type=Path, help="work folder (default: a new temporary one, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (shards, runs, logs)")
    return parser


def prepare_data(plan: Plan, args: argparse.Namespace, selected: set[str], work: Path) -> dict[str, str]:
    """Make the shards the selected steps need; returns ``{group key: reason}`` for groups that cannot run."""
    blocked: dict[str, str] = {}
    log = work / "logs" / "shards.log"
    if args.shards is not None:
        for model in plan.models:
            model.shards = str(args.shards.resolve())
        plan.decode_shards = str(args.shards.resolve())
    else:
        group_steps = {group.key: set(group.steps) for group in GROUPS}
        sizes = {m.image_size for m in plan.models if group_steps[m.key] & selected}
        sizes = sorted(sizes | ({plan.models[0].image_size} if "4" in selected else set()))
        for size in sizes:
            out = work / "shards" / f"synth-{size}px"
            try:
                make_shards(f"synth-{size}px", ",".join(TASKS), SHARD_SAMPLES[plan.tiny], size, 0, out, log)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                for group in GROUPS[:3]:
                    blocked[group.key] = one_line(error)
            for model in plan.models:
                if model.image_size == size:
                    model.shards = str(out)
            if size == plan.models[0].image_size:
                plan.decode_shards = str(out)
    if "6" in selected:
        for name, tasks, samples, seed in DEMO_DATASETS:
            out = work / "shards" / "demo" / name
            try:
                count = max(40, int(samples * DEMO_SCALE[plan.tiny]))
                make_shards(name, tasks, count, DEMO_IMAGE_SIZE[plan.tiny], seed, out, log)
            except (RuntimeError, subprocess.TimeoutExpired) as error:
                blocked["train"] = one_line(error)
            plan.demo_shards.append(str(out))
    return blocked


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if str(REPO) not in sys.path:  # run as `python bench/gpu_check.py` without the repository on the path
        sys.path.insert(0, str(REPO))
    started = time.perf_counter()
    try:
        import torch
    except ImportError as error:
        print(f"error: torch does not import ({error}); run the check with a Python that has PyTorch", file=sys.stderr)
        return 2
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device is visible (torch.cuda.is_available() is False); "
              "run with --cpu for the CPU mode", file=sys.stderr)
        return 2
    if args.cpu:
        # one torch thread per process: on a shared CPU, a team of threads whose members wait for each other
        # ran a tiny MobileNetV2 step 80x slower (64 s against 10 s for step 3 on 2 busy cores)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = (args.work or Path(tempfile.mkdtemp(prefix="facemtl-gpu-check-"))).resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    plan = build_plan(args, work, use_ray=not args.no_ray and ray_version() != "not installed")
    header = describe_environment(plan)
    print("\n".join(header), flush=True)

    missing = {module: missing_module(module) for group in GROUPS for module in group.needs}
    for module, name in missing.items():
        if name is not None:
            print("MISSING: " + wheel_message(module, name), flush=True)
    lacking = {group.key: next((wheel_message(m, missing[m]) for m in group.needs if missing[m] is not None), None)
               for group in GROUPS}
    selected = {step for group in GROUPS if not lacking[group.key] for step in group.steps if step in args.steps}
    blocked = prepare_data(plan, args, selected, work)
    print(f"shards ready after {time.perf_counter() - started:.0f} s", flush=True)

    rows: list[Row] = []
    for group in GROUPS:
        if not args.steps & set(group.steps):
            rows += not_run(group, "skipped", "not selected (--steps)")
            continue
        remaining = args.budget_s - (time.perf_counter() - started)
        if lacking[group.key] or group.key in blocked:
            rows += not_run(group, "FAIL", lacking[group.key] or f"no shards: {blocked[group.key]}")
        elif remaining < 20:
            rows += not_run(group, "FAIL", f"not started: the {args.budget_s:.0f} s budget (--budget-s) was spent")
        else:
            plan_path = work / "plan.json"
            plan.save(plan_path)
            group_rows = run_group(group, plan_path, work, min(group.limit_s, remaining))
            rows += group_rows
            if group.key == "resnet50":
                plan.reference_images_per_s = next((r.images_per_s for r in group_rows if r.step == "1"), None)

    table = markdown_table(rows)
    failed = [row for row in rows if row.status == "FAIL"]
    header.append(f"total {time.perf_counter() - started:.0f} s; {len(failed)} failed row(s)")
    print("\n" + "\n".join(header[-1:]) + "\n\n" + table, flush=True)
    if os.environ.get("OUT"):
        write_outputs(Path(os.environ["OUT"]), header, table, work)
        print(f"\ntable written to {Path(os.environ['OUT']) / 'gpu_check.md'}", flush=True)
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept: {work}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
