"""``python -m pipeline.evaluate``: a trained model's per-task metrics on one split of shard folders.

    python -m pipeline.evaluate runs/demo --split test                        # the run's best_model.pt
    python -m pipeline.evaluate runs/demo/checkpoint_2025-05-01_10-00-00.000000 --split val  # a Ray checkpoint
    python -m pipeline.evaluate runs/demo/best_model.pt --split test --data shards/other --out reports/other

The model is rebuilt from the config stored in the checkpoint, its weights loaded strictly
(:mod:`pipeline.inference`). The data are the run's own datasets, or the shard folders given with
``--data`` (also ones the model never saw). Every sample of the split is read once, in order, and
scored with the training loop's own validation code (:func:`pipeline.validation.evaluate_split`: the same
losses, age scale and predictions as the ``val/*`` metrics of a run), so a run's best epoch evaluated on
``val`` reproduces its metrics.parquet.

Outputs, in ``--out`` (default ``<run>/evaluation/<split>/``, or ``<checkpoint's folder>/evaluation/<split>/``):
``metrics.json`` (everything), ``metrics.md`` (the tables, also printed) and ``confusion_<task>.png``
per classification task with labels (binary ones only while there are at most ``CONFUSION_PLOTS_BINARY_MAX``
classification tasks: CelebA's 40 attributes get the per-attribute table instead). Landmarks report NME
(mean point error over the inter-ocular distance) and MAE in units of the crop side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from pipeline.data import (SUMMARY_FILE, DataConfigError, EvalStream, ShardSet, data_error_line, eval_loader,
                           open_shard_set, shard_task_declarations, summary_digest)
from pipeline.inference import (DEVICE_CHOICES, CheckpointError, DeviceError, InferenceModel, choose_device,
                                load_inference_model)
from pipeline.loop import WorkerContext
from pipeline.validation import evaluate_split
from pipeline.metrics import MetricSums, TaskSums, per_class_accuracy
from pipeline.run_summary import chance_levels, headline_metric, no_better_than_chance
from pipeline.schema import TaskDeclarationError, TaskSpec, check_same_declaration
from pipeline.sources.base import SPLITS

EVALUATION_DIR = "evaluation"
METRICS_JSON = "metrics.json"
METRICS_MARKDOWN = "metrics.md"


class EvaluationError(Exception):
    """Data that cannot be evaluated on (no dataset, no such split); the message names it."""


# ---------------------------------------------------------------- the data


@dataclass
class EvaluationData:
    """The shard sets that have the split, and a note for each one skipped because it has not."""

    split: str
    shard_sets: list[ShardSet]
    skipped: list[dict[str, str]] = field(default_factory=list)
    # root -> (resolved path, summary.json digest) as opened: the report names the data read, even if a link is
    # repointed or the shards made again while it evaluates
    identities: dict[Path, tuple[str, str | None]] = field(default_factory=dict)


def open_evaluation_data(paths: Sequence[str | Path], split: str) -> EvaluationData:
    """Open the shard folders; skip those without ``split`` (with a note), fail when none has it."""
    if not paths:
        raise EvaluationError("no datasets to evaluate on: the checkpoint's config names none; pass --data")
    try:
        shard_sets = [open_shard_set(path) for path in paths]
    except DataConfigError as error:
        raise EvaluationError(str(error)) from None
    with_split = [s for s in shard_sets if s.num_samples(split) > 0 and s.urls(split)]
    if not with_split:
        names = ", ".join(f"{s.name} ({s.root})" for s in shard_sets)
        raise EvaluationError(f"no dataset has a {split!r} split: {names}")
    identities = {s.root: (str(s.root.resolve()), summary_digest(s.root)) for s in shard_sets}
    skipped = [{"name": s.name, "path": identities[s.root][0], "reason": f"no {split} split",
                "summary_sha256": identities[s.root][1]} for s in shard_sets if s not in with_split]
    return EvaluationData(split, with_split, skipped, identities)


def check_task_declarations(tasks: Sequence[TaskSpec], checkpoint: Path, shard_sets: Sequence[ShardSet]) -> None:
    """Refuse a dataset that declares one of the model's ``tasks`` differently (other classes, points or range):
    its labels mean something else than the model's outputs. The message quotes both declarations."""
    model_specs = {spec.name: spec for spec in tasks}
    for shard_set in shard_sets:
        try:
            for spec in shard_task_declarations(shard_set):
                if spec.name in model_specs:
                    check_same_declaration(model_specs[spec.name], spec, f"the checkpoint {checkpoint}",
                                           f"dataset {shard_set.name!r} ({shard_set.root / SUMMARY_FILE})")
        except (DataConfigError, TaskDeclarationError) as error:
            raise EvaluationError(str(error)) from None


# ---------------------------------------------------------------- running the model


@dataclass
class SumsKeepingContext(WorkerContext):
    """One process (rank 0 of 1) that keeps what ``evaluate_split`` all-reduces: the whole
    :class:`MetricSums` tensor, confusion matrices included, which the summary it returns leaves out."""

    reduced: torch.Tensor | None = None

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        self.reduced = tensor.clone()
        return tensor


class CountingBatches:
    """Iterates ``batches`` and counts the samples that went through (each sample of the split once)."""

    def __init__(self, batches: Iterable[dict[str, Any]]) -> None:
        self.batches, self.samples = batches, 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for batch in self.batches:
            self.samples += len(batch["key"])
            yield batch


@dataclass(frozen=True)
class RunOptions:
    """How to feed the model: batch size and loader processes."""

    batch_size: int
    loader_workers: int


@dataclass
class DatasetSums:
    """One dataset's metric sums and how many of its samples were read."""

    name: str
    path: Path
    samples: int
    sums: MetricSums


def evaluate_dataset(model: InferenceModel, shard_set: ShardSet, split: str, options: RunOptions) -> DatasetSums:
    """Every sample of ``split`` of one dataset through the training loop's validation code."""
    stream = EvalStream([shard_set], split, [t.name for t in model.tasks], model.image_size)
    loader = eval_loader(stream, options.batch_size, options.loader_workers, pin_memory=model.device.type == "cuda")
    batches = CountingBatches(loader)
    context = SumsKeepingContext(device=model.device)
    try:
        evaluate_split(model.net, batches, model.tasks, context, model.config)
    except DataConfigError as error:  # a shard whose damage its size does not show, found while reading it
        raise EvaluationError(data_error_line(error)) from None
    sums = MetricSums(model.tasks)
    sums.load_tensor(context.reduced)
    return DatasetSums(shard_set.name, shard_set.root, batches.samples, sums)


def total_sums(tasks: Sequence[TaskSpec], per_dataset: Sequence[DatasetSums]) -> MetricSums:
    """The sums over all datasets: metric sums add up, like the ranks' in an all-reduce."""
    total = MetricSums(tasks)
    total.load_tensor(torch.stack([d.sums.as_tensor() for d in per_dataset]).sum(dim=0))
    return total


# ---------------------------------------------------------------- the report (pure)


def no_labels_status(dataset_names: Sequence[str]) -> str:
    return "no labels in " + ", ".join(dataset_names)


def task_report(task: TaskSpec, sums: TaskSums, summary: dict[str, float],
                dataset_names: Sequence[str]) -> dict[str, Any]:
    """One task's metrics as plain values; a task without a labelled sample says so instead of scoring 0."""
    if sums.count == 0:
        return {"kind": task.kind, "count": 0, "status": no_labels_status(dataset_names)}
    report: dict[str, Any] = {"kind": task.kind, **summary}
    if task.kind in ("binary", "multiclass"):
        report |= {
            "classes": list(task.classes),
            "support": [int(v) for v in sums.confusion.sum(dim=1).tolist()],
            "per_class_accuracy": per_class_accuracy(sums.confusion, task.classes),
            "confusion": [[int(v) for v in row] for row in sums.confusion.tolist()],
        }
    return report


def tasks_report(tasks: Sequence[TaskSpec], sums: MetricSums,
                 dataset_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    summary = sums.summary()
    return {t.name: task_report(t, sums.sums[t.name], summary[t.name], dataset_names) for t in tasks}


def json_safe(value: Any) -> Any:
    """NaN and infinities become null: JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def format_number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


MAIN_COLUMNS = (("loss", "loss"), ("accuracy", "accuracy"), ("balanced_accuracy", "balanced acc."),
                ("mae", "MAE (years)"), ("rmse", "RMSE (years)"), ("cs5", "CS(5)"))
LANDMARK_COLUMNS = (("loss", "loss"), ("nme", "NME (inter-ocular)"), ("mae", "MAE (crop side)"))
CONFUSION_PLOTS_BINARY_MAX = 8


def mean_accuracy(tasks: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The mean accuracy over the classification tasks with labels (CelebA's usual figure), or None."""
    accuracies = [metrics["accuracy"] for metrics in tasks.values()
                  if metrics.get("kind") in ("binary", "multiclass") and metrics.get("count")]
    return {"tasks": len(accuracies), "value": sum(accuracies) / len(accuracies)} if accuracies else None


def task_table(tasks: dict[str, dict[str, Any]]) -> list[str]:
    """One row per task: samples and main metrics; '–' where a metric does not apply."""
    lines = ["| task | samples | " + " | ".join(title for _, title in MAIN_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(MAIN_COLUMNS)]
    landmarks = {}
    for name, metrics in tasks.items():
        if metrics.get("kind") == "landmarks" and "status" not in metrics:
            landmarks[name] = metrics
            continue
        if "status" in metrics:
            cells = [metrics["status"]] + [""] * (len(MAIN_COLUMNS) - 1)
        else:
            cells = [format_number(metrics.get(key)) for key, _ in MAIN_COLUMNS]
        lines.append(f"| {name} | {metrics['count']} | " + " | ".join(cells) + " |")
    if landmarks:
        lines += ["", "| landmarks | samples | " + " | ".join(title for _, title in LANDMARK_COLUMNS) + " |",
                  "|---|---:|" + "---:|" * len(LANDMARK_COLUMNS)]
        for name, metrics in landmarks.items():
            cells = [format_number(metrics.get(key)) for key, _ in LANDMARK_COLUMNS]
            lines.append(f"| {name} | {metrics['count']} | " + " | ".join(cells) + " |")
    mean = mean_accuracy(tasks)
    if mean and mean["tasks"] > 1:
        lines += ["", f"Mean accuracy over {mean['tasks']} classification tasks: {mean['value']:.4f}"]
    return lines


def per_class_table(name: str, metrics: dict[str, Any]) -> list[str]:
    lines = [f"### {name}: per-class accuracy", "", "| class | samples | correct | accuracy |", "|---|---:|---:|---:|"]
    for index, class_name in enumerate(metrics["classes"]):
        correct = metrics["confusion"][index][index]
        accuracy = format_number(metrics["per_class_accuracy"][class_name])
        lines.append(f"| {class_name} | {metrics['support'][index]} | {correct} | {accuracy} |")
    return lines


def format_markdown(report: dict[str, Any]) -> str:
    """metrics.md: the task table, per-dataset tables (of the tasks each labels) when there are several
    datasets, then the per-class tables."""
    datasets = ", ".join(f"{d['name']} ({d['samples']})" for d in report["datasets"])
    epoch = "" if report["epoch"] is None else f", epoch {report['epoch']}"
    lines = [f"# Evaluation on {report['split']}", "",
             f"Checkpoint `{report['checkpoint']}`{epoch}. Datasets (samples): {datasets}.", ""]
    skipped = [f"Skipped {s['name']} ({s['path']}): {s['reason']}." for s in report["skipped_datasets"]]
    lines += [*skipped, ""] if skipped else []
    lines += task_table(report["tasks"])
    lines += ["", "Per-class tables: metrics.json."] if len(report["tasks"]) > CONFUSION_PLOTS_BINARY_MAX else []
    if len(report["by_dataset"]) > 1:
        for name, part in report["by_dataset"].items():
            labelled = {task: metrics for task, metrics in part["tasks"].items() if metrics["count"]}
            lines += ["", f"## {name} ({part['samples']} samples; the tasks it labels)", "", *task_table(labelled)]
    for name, metrics in report["tasks"].items():
        if "classes" in metrics and len(report["tasks"]) <= CONFUSION_PLOTS_BINARY_MAX:
            lines += ["", *per_class_table(name, metrics)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the confusion plot


def plot_confusion(classes: Sequence[str], confusion: Sequence[Sequence[int]], title: str, path: Path) -> Path:
    """Counts in the cells, colours normalised per row (the share of each true class predicted as each class)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = torch.tensor(confusion, dtype=torch.float64)
    support = counts.sum(dim=1, keepdim=True)
    shares = torch.where(support > 0, counts / support.clamp(min=1), torch.zeros_like(counts))
    side = 2.0 + 0.7 * len(classes)
    figure = Figure(figsize=(side + 1.0, side), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(shares.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, label="share of the true class")
    ticks = range(len(classes))
    axes.set_xticks(ticks, labels=classes, rotation=45, ha="right")
    axes.set_yticks(ticks, labels=classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for row in ticks:
        for column in ticks:
            colour = "white" if shares[row, column] > 0.5 else "black"
            axes.text(column, row, str(int(counts[row, column])), ha="center", va="center", color=colour)
    figure.savefig(path, format="png")
    return path


# ---------------------------------------------------------------- the command line


def default_output_dir(target: Path, split: str) -> Path:
    """``<run or checkpoint folder>/evaluation/<split>``; for a checkpoint file, its folder's."""
    folder = target if target.is_dir() else target.parent
    return folder / EVALUATION_DIR / split


def local_cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, as under SLURM), not all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_device(model: InferenceModel) -> None:
    """Run as training validates: all of this process's CPUs, and channels_last when the run used it."""
    if model.device.type == "cpu":
        torch.set_num_threads(local_cpu_count())
    if model.config.model.channels_last:
        model.net.to(memory_format=torch.channels_last)


def build_report(
    model: InferenceModel, data: EvaluationData, per_dataset: Sequence[DatasetSums], options: RunOptions
) -> dict[str, Any]:
    """Everything metrics.json holds: checkpoint, data, split, counts, metrics overall and per dataset."""
    names = [d.name for d in per_dataset]
    return {
        "checkpoint": str(model.checkpoint_path.resolve()),
        "epoch": model.epoch,
        "split": data.split,
        "device": str(model.device),
        "batch_size": options.batch_size,
        "datasets": [{"name": d.name, "path": data.identities[d.path][0], "samples": d.samples,
                      "summary_sha256": data.identities[d.path][1]} for d in per_dataset],
        "skipped_datasets": data.skipped,
        "samples": sum(d.samples for d in per_dataset),
        "tasks": (overall := tasks_report(model.tasks, total_sums(model.tasks, per_dataset), names)),
        "mean_accuracy": mean_accuracy(overall),
        "by_dataset": {
            d.name: {"samples": d.samples, "tasks": tasks_report(model.tasks, d.sums, [d.name])} for d in per_dataset
        },
    }


def tasks_at_chance(tasks: Sequence[TaskSpec], task_reports: dict[str, dict[str, Any]],
                    chance: dict[str, float]) -> list[tuple[str, str, float]]:
    """(task, metric, value) of each scored task that is no better than its chance level."""
    found = []
    for task in tasks:
        entry, metric = task_reports[task.name], headline_metric(task)
        if entry.get("count") and no_better_than_chance(task, entry[metric], chance[task.name]):
            found.append((task.name, metric, entry[metric]))
    return found


def write_outputs(report: dict[str, Any], markdown: str, out_dir: Path) -> list[Path]:
    """metrics.json, metrics.md and a confusion PNG per classification task with labels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / METRICS_JSON, out_dir / METRICS_MARKDOWN]
    temporary = written[0].with_name(f".{METRICS_JSON}.{os.getpid()}.tmp")  # whole or not at all: experiments reuse it
    temporary.write_text(json.dumps(json_safe(report), indent=1) + "\n")
    os.replace(temporary, written[0])
    written[1].write_text(markdown)
    classification = sum("confusion" in metrics for metrics in report["tasks"].values())
    for task, metrics in report["tasks"].items():
        if "confusion" in metrics and (metrics["kind"] == "multiclass" or classification <= CONFUSION_PLOTS_BINARY_MAX):
            title = f"{task} on {report['split']} ({metrics['count']} samples)"
            path = out_dir / f"confusion_{task}.png"
            written.append(plot_confusion(metrics["classes"], metrics["confusion"], title, path))
    return written


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", type=Path, metavar="RUN_OR_CHECKPOINT",
                        help="a run folder, a best_model.pt / checkpoint.pt file, or a Ray checkpoint_* folder")
    parser.add_argument("--split", choices=SPLITS, default="test", help="split to evaluate (default: test)")
    parser.add_argument("--data", type=Path, nargs="+", metavar="SHARD_DIR",
                        help="shard folders to evaluate on instead of the run's datasets")
    parser.add_argument("--out", type=Path, help="output folder (default: <run>/evaluation/<split>)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's data.batch_size)")
    parser.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="auto: the GPU when there is one")
    parser.add_argument("--loader-workers", type=int, default=2, help="decoding processes (0: decode in this process)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.loader_workers < 0:
        parser.error(f"--loader-workers must be at least 0, got {args.loader_workers}")
    return args


def evaluate_checkpoint(
    target: Path,
    split: str,
    data_paths: Sequence[str | Path] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    loader_workers: int = 2,
    out_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], Path]:
    """Evaluate the checkpoint at ``target`` on ``split`` of ``data_paths`` (default: its run's datasets),
    write metrics.json, metrics.md and the confusion PNGs to ``out_dir`` (default: :func:`default_output_dir`),
    and return the report (what metrics.json holds, plus ``written``: the files) and that folder.

    Raises :class:`CheckpointError`, :class:`DeviceError` or :class:`EvaluationError` for a target, device or
    data that cannot be evaluated."""
    started = time.perf_counter()
    model = load_inference_model(target, choose_device(device))
    log(f"checkpoint: {model.describe()}")
    data = open_evaluation_data(data_paths or model.config.data.datasets, split)
    check_task_declarations(model.tasks, model.checkpoint_path, data.shard_sets)
    for skipped in data.skipped:
        log(f"note: skipping {skipped['name']} ({skipped['path']}): {skipped['reason']}")
    prepare_device(model)
    options = RunOptions(batch_size or model.config.data.batch_size, loader_workers)
    per_dataset = []
    for shard_set in data.shard_sets:
        log(f"evaluating {shard_set.name} {split} ({shard_set.num_samples(split)} samples) on {model.device}")
        per_dataset.append(evaluate_dataset(model, shard_set, split, options))
    report = build_report(model, data, per_dataset, options)
    report["own_datasets"] = not data_paths  # the run's own datasets, not others given with --data
    report["chance"] = chance_levels(data.shard_sets, model.tasks, split)
    report["at_chance"] = tasks_at_chance(model.tasks, report["tasks"], report["chance"])
    if report["at_chance"]:
        log(f"WARNING: on {split}, no better than chance: " + ", ".join(
            f"{name} ({metric} {value:.4g}, chance {report['chance'][name]:.4g})"
            for name, metric, value in report["at_chance"]))
        report["at_chance"] = [name for name, _, _ in report["at_chance"]]
    report["seconds"] = time.perf_counter() - started
    out_dir = out_dir or default_output_dir(target, split)
    report["written"] = [str(path) for path in write_outputs(report, format_markdown(report), out_dir)]
    return report, out_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report, out_dir = evaluate_checkpoint(args.target, args.split, args.data, args.device, args.batch_size,
                                              args.loader_workers, args.out, log=lambda line: print(line, flush=True))
    except (CheckpointError, DeviceError, EvaluationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n" + format_markdown(report))
    written = ", ".join(Path(path).name for path in report["written"])
    print(f"wrote {written} to {out_dir} in {report['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
