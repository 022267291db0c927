"""Step 6 of the GPU check: ``python -m pipeline.train`` on the device, checkpoint, resume, and against the CPU.

    python bench/gpu_train_check.py train PLAN.json RESULT.json   (run by bench/gpu_check.py)

Three runs of the demo config on the demo's three synthetic datasets, ``data.steps_per_epoch`` short:
  a. on the device (use_gpu=true device=cuda, precision auto = bf16 autocast), max_epochs=1: one epoch, a checkpoint;
  b. the same command with max_epochs=2: it must resume from that checkpoint and run epoch 1;
  c. the reference: ``--local device=cpu`` (fp32), max_epochs=2 straight through.
Both see the same batches (the stream and the augmentation draw from seeded CPU generators) and start from the
same weights; dropout is off (model.dropout=0) because its masks come from the device's own generator.
Run (b)'s epoch-1 validation metrics must then match run (c)'s within TOLERANCE. In --cpu mode (a) and (b)
run on the CPU too, and the tolerance is that of one computation done twice (resume must change nothing).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

from gpu_check import REPO, Plan, Row, RowWriter, one_line


@dataclass(frozen=True)
class Tolerance:
    """How far the device run's validation metrics may be from the CPU reference's."""

    loss_relative: float  # val/total_loss and every val/<task>/loss
    accuracy_absolute: float  # val/<task>/accuracy
    mae_relative: float  # val/age/mae

    def describe(self) -> str:
        return (f"loss and MAE {self.loss_relative:g} relative, accuracy {self.accuracy_absolute:g} absolute"
                if self.loss_relative == self.mae_relative else
                f"loss {self.loss_relative:g}, MAE {self.mae_relative:g} relative, "
                f"accuracy {self.accuracy_absolute:g} absolute")


# bf16 autocast against fp32 after 2 x 30 Adam steps at lr 1e-3 from scratch drift apart like two nearby trajectories,
# not like two seeds. Measured on the CPU (bf16 autocast against fp32, same init and batches, this model and data
# at these sizes, 2026-11-29): total validation loss 1.4 %, per-task loss up to 4.6 % (gender), accuracy up to 0.046
# (young: 5 of 108 validation samples), age MAE 0.5 %. The bounds are about twice the largest of these.
TOLERANCE_BF16 = Tolerance(loss_relative=0.10, accuracy_absolute=0.10, mae_relative=0.10)
# Same device, same precision: only the order of float sums may differ.
TOLERANCE_SAME = Tolerance(loss_relative=1e-3, accuracy_absolute=1e-3, mae_relative=1e-3)


def train_command(plan: Plan, name: str, device: str, max_epochs: int, local: bool) -> list[str]:
    datasets = "[" + ",".join(plan.demo_shards) + "]"
    return [sys.executable, "-m", "pipeline.train", "--config", str(REPO / "configs" / "demo.yaml"),
            *(["--local"] if local else []), f"name={name}", f"runs_dir={Path(plan.work) / 'runs'}",
            f"data.datasets={datasets}", f"max_epochs={max_epochs}",
            f"data.steps_per_epoch={plan.train_steps_per_epoch}",
            f"use_gpu={'true' if device == 'cuda' else 'false'}", f"device={device}", "model.dropout=0",
            *plan.train_overrides]


def run_training(command: list[str], log: Path, timeout: float) -> tuple[int, str]:
    """Exit code and output of one ``pipeline.train`` run (its output also goes to ``log``)."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    try:
        completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        code, output = completed.returncode, completed.stdout + completed.stderr
    except subprocess.TimeoutExpired as error:  # its captured output comes as bytes, text=True or not
        captured = [part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                    for part in (error.stdout, error.stderr)]
        code, output = -1, "".join(captured) + f"\ntimed out after {timeout:.0f} s"
    log.write_text(output)
    print(f"  exit {code} in {time.perf_counter() - started:.0f} s, output in {log}", flush=True)
    return code, output


def checkpoint_files(run_dir: Path) -> list[Path]:
    """``checkpoint.pt`` of a --local run, or Ray Train's ``checkpoint_*/checkpoint.pt``."""
    return sorted([*run_dir.glob("checkpoint.pt"), *run_dir.glob("checkpoint_*/checkpoint.pt")])


def tensor_locations(path: Path) -> set[str]:
    """Where the checkpoint's tensors were when saved (``cuda:0``, ``cpu``), read without moving them anywhere."""
    import torch

    locations: set[str] = set()

    def keep_on_cpu(storage, location: str):
        locations.add(location)
        return storage

    torch.load(path, map_location=keep_on_cpu, weights_only=False)
    return locations


def epoch_rows(run_dir: Path) -> list[dict]:
    return pq.read_table(run_dir / "metrics.parquet").to_pylist()


def compared_metrics(row: dict) -> dict[str, float]:
    return {key: float(value) for key, value in row.items()
            if key.startswith("val/") and key.endswith(("loss", "/accuracy", "/mae")) and value is not None}


def metric_differences(device_row: dict, cpu_row: dict, tolerance: Tolerance) -> tuple[list[str], str]:
    """(metrics outside the tolerance, a summary of the largest differences by kind)."""
    device, cpu = compared_metrics(device_row), compared_metrics(cpu_row)
    outside, largest = [], {"loss": (0.0, ""), "accuracy": (0.0, ""), "mae": (0.0, "")}
    for key in sorted(cpu):
        if key not in device:
            outside.append(f"{key} missing from the device run")
            continue
        kind = "accuracy" if key.endswith("/accuracy") else "mae" if key.endswith("/mae") else "loss"
        absolute = abs(device[key] - cpu[key])
        difference = absolute if kind == "accuracy" else absolute / max(abs(cpu[key]), 1e-8)
        bound = {"loss": tolerance.loss_relative, "accuracy": tolerance.accuracy_absolute,
                 "mae": tolerance.mae_relative}[kind]
        if not difference <= bound:  # NaN is outside too
            outside.append(f"{key} {device[key]:.4g} vs CPU {cpu[key]:.4g}")
        if not difference <= largest[kind][0]:
            largest[kind] = (difference, key)
    summary = ", ".join(f"{kind} {value:.3g}{'' if kind == 'accuracy' else ' rel'} ({key.removeprefix('val/')})"
                        for kind, (value, key) in largest.items() if key)
    return outside, summary or f"none, all {len(cpu)} metrics identical"


def check_training(plan: Plan, writer: RowWriter) -> None:
    device = plan.device
    local = not plan.use_ray
    launcher = "pipeline.train --local (no Ray)" if local else "pipeline.train (Ray Train, 1 worker)"
    logs = Path(plan.work) / "logs"
    runs = Path(plan.work) / "runs"
    run_dir = runs / f"on-{device}"
    precision = "bf16 autocast" if device == "cuda" else "fp32"
    epochs = f"2 epochs x {plan.train_steps_per_epoch} steps"

    what = f"{launcher}, demo config, device={device} ({precision}): epoch 0, checkpoint"
    code, output = run_training(train_command(plan, run_dir.name, device, 1, local), logs / "train-a-first-epoch.log",
                                plan.train_run_timeout_s)
    checkpoints = checkpoint_files(run_dir)
    if code != 0 or not checkpoints:
        reason = f"exit {code}: {last_output_line(output)}" if code != 0 else f"no checkpoint in {run_dir}"
        writer.add(Row("6", what, status="FAIL", notes=reason))
        return
    locations = tensor_locations(checkpoints[-1])
    # evidence that it trained on the device: the checkpoint's tensors were saved from it, or the loop said so
    on_device = any(location.startswith(device) for location in locations) or f"device {device}" in output
    first = epoch_rows(run_dir)[-1]
    notes = f"checkpoint {checkpoints[-1].relative_to(run_dir)}, tensors saved from {', '.join(sorted(locations))}"
    writer.add(Row("6", what, first.get("train/images_per_s"), status="ok" if on_device else "FAIL",
                   notes=notes if on_device else f"did not run on {device}: {notes}"))

    what = "the same command with max_epochs=2: resumes from the checkpoint, runs epoch 1"
    code, output = run_training(train_command(plan, run_dir.name, device, 2, local), logs / "train-b-resume.log",
                                plan.train_run_timeout_s)
    epochs_done = [row["epoch"] for row in epoch_rows(run_dir)] if (run_dir / "metrics.parquet").exists() else []
    resumed = "resuming" in output
    if code != 0 or not resumed or epochs_done != [0, 1]:
        reason = f"exit {code}: {last_output_line(output)}" if code != 0 else \
            f"resumed: {resumed}, epochs in metrics.parquet: {epochs_done} (expected [0, 1])"
        writer.add(Row("6", what, status="FAIL", notes=reason))
        return
    on_device_rows = epoch_rows(run_dir)
    writer.add(Row("6", what, on_device_rows[-1].get("train/images_per_s"),
                   notes="'resuming' printed, epochs [0, 1] recorded"))

    tolerance = TOLERANCE_BF16 if device == "cuda" else TOLERANCE_SAME
    what = f"validation metrics after {epochs} against pipeline.train --local device=cpu (fp32), same steps"
    reference_dir = runs / "reference-cpu"
    code, output = run_training(train_command(plan, reference_dir.name, "cpu", 2, local=True), logs / "train-c-cpu.log",
                                plan.train_run_timeout_s)
    if code != 0:
        writer.add(Row("6", what, status="FAIL", notes=f"CPU reference exit {code}: {last_output_line(output)}"))
        return
    reference = epoch_rows(reference_dir)[-1]
    outside, summary = metric_differences(on_device_rows[-1], reference, tolerance)
    device_rate, cpu_rate = on_device_rows[-1].get("train/images_per_s"), reference.get("train/images_per_s")
    ratio = f"{device_rate / cpu_rate:.1f}x CPU" if device == "cuda" and device_rate and cpu_rate else ""
    notes = f"largest differences: {summary}; tolerance: {tolerance.describe()}"
    if outside:
        notes = f"outside the tolerance: {'; '.join(outside[:4])}; " + notes
    writer.add(Row("6", what, cpu_rate, ratio, "FAIL" if outside else "ok", notes))


def last_output_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def main(argv: Sequence[str]) -> int:
    if len(argv) != 3 or argv[0] != "train":
        print(__doc__, file=sys.stderr)
        return 2
    plan = Plan.load(argv[1])
    writer = RowWriter(argv[2])
    try:
        check_training(plan, writer)
    except Exception as error:
        import traceback

        traceback.print_exc()
        writer.add(Row("6", "pipeline.train on the device", status="FAIL", notes=one_line(error)))
    return 0  # a failed check is a row; a non-zero exit means the process itself broke


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
