"""``python -m pipeline.evaluate``: a trained model's per-task metrics on one split of shard folders.

    python -m pipeline.evaluate runs/demo --split test                        # the run's best_model.pt
    python -m pipeline.evaluate runs/demo/checkpoint_2025-05-01_10-00-00.000000 --split val  # a Ray checkpoint
    python -m pipeline.evaluate runs/demo/best_model.pt --split test --data shards/other --out reports/other

The model is rebuilt from the config stored in the checkpoint and its weights are loaded strictly. The
data are the run's own datasets, or the shard folders given with ``--data`` (also ones the model never
saw). Every sample of the split is read once, in order, and scored with the training loop's own
validation code (:func:`pipeline.loop.evaluate_split`: the same losses, age scale and predictions as the
``val/*`` metrics of a run), so a run's best epoch evaluated on ``val`` reproduces its metrics.parquet.

Outputs, in ``--out`` (default ``<run>/evaluation/<split>/``, or ``<checkpoint's folder>/evaluation/<split>/``):
``metrics.json`` (everything), ``metrics.md`` (the tables, also printed) and ``confusion_<task>.png``
per classification task with labels.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from pipeline.config import ConfigError, TrainConfig, load_config_dict
from pipeline.data import DataConfigError, EvalStream, ShardSet, eval_loader, open_shard_set
from pipeline.losses import build_weighting
from pipeline.loop import (
    MultiTaskObjective,
    WorkerContext,
    evaluate_split,
    resolve_device,
    uses_channels_last,
    weighting_options,
)
from pipeline.metrics import MetricSums, TaskSums, per_class_accuracy
from pipeline.model import MultiTaskNet, describe_state_mismatch
from pipeline.run_records import BEST_MODEL_FILE, CHECKPOINT_FILE, latest_checkpoint
from pipeline.schema import TaskSpec, get_task
from pipeline.sources.base import SPLITS

EVALUATION_DIR = "evaluation"
METRICS_JSON = "metrics.json"
METRICS_MARKDOWN = "metrics.md"


class EvaluationError(Exception):
    """An input that cannot be evaluated (path, checkpoint, data, device); the message names it."""


# ---------------------------------------------------------------- the model


@dataclass
class LoadedModel:
    """A network rebuilt from a checkpoint, with the training config it was trained under."""

    net: MultiTaskNet
    config: TrainConfig
    tasks: list[TaskSpec]
    checkpoint_path: Path
    epoch: int | None  # the epoch whose weights these are, when the checkpoint says


def find_checkpoint(target: Path) -> Path:
    """The checkpoint file that ``target`` names: the file itself, or in a folder ``best_model.pt``, else
    ``checkpoint.pt`` (a ``--local`` run, a Ray checkpoint folder), else the newest loadable
    ``checkpoint_*/checkpoint.pt`` of a Ray run."""
    if target.is_file():
        return target
    if not target.is_dir():
        raise EvaluationError(f"{target} does not exist")
    for candidate in (target / BEST_MODEL_FILE, target / CHECKPOINT_FILE):
        if candidate.is_file():
            return candidate
    found = latest_checkpoint(target)
    if found is None:
        raise EvaluationError(
            f"{target} holds no {BEST_MODEL_FILE}, {CHECKPOINT_FILE} or checkpoint_*/{CHECKPOINT_FILE}: "
            "not a run or checkpoint folder"
        )
    return found[0] / CHECKPOINT_FILE


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of a best_model.pt or checkpoint.pt, checked for the keys a model needs.

    ``weights_only``: reading a checkpoint runs no code from it (both formats hold only tensors and
    plain values)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises anything from KeyError to RuntimeError for a foreign file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise EvaluationError(
            f"{path} is not a facemtl checkpoint: torch.load failed ({type(error).__name__}: {reason})"
        ) from None
    required = ("objective", "config", "tasks")
    if not isinstance(payload, dict) or any(key not in payload for key in required):
        found = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise EvaluationError(f"{path} is not a facemtl checkpoint: expected the keys {list(required)}, found {found}")
    return payload


def checkpoint_epoch(payload: dict[str, Any]) -> int | None:
    """best_model.pt names its epoch; a full checkpoint holds the next epoch to run."""
    if "epoch" in payload:
        return int(payload["epoch"])
    if "run_state" in payload:
        return int(payload["run_state"]["epoch"]) - 1
    return None


def load_model(path: Path) -> LoadedModel:
    """Rebuild the MultiTaskNet (and its loss weighting, which the weights include) and load strictly."""
    payload = read_checkpoint(path)
    try:
        config = load_config_dict(payload["config"])
        tasks = [get_task(name) for name in payload["tasks"]]
    except (ConfigError, KeyError) as error:
        raise EvaluationError(f"{path}: its stored config or task list is not valid: {error}") from None
    model = config.model
    # weights_path=None: the checkpoint holds every weight; the training machine's backbone file is not needed.
    net = MultiTaskNet(tasks, model.backbone, model.shared_dims, model.head_hidden, model.dropout, None, model.binary_outputs)
    weighting = build_weighting(config.loss.weighting, [t.name for t in tasks], **weighting_options(config))
    objective = MultiTaskObjective(net, weighting, tasks, config)
    problems = describe_state_mismatch(objective.state_dict(), payload["objective"])
    if problems:
        raise EvaluationError(f"{path}: weights do not fit the model its config describes: " + "; ".join(problems))
    objective.load_state_dict(payload["objective"], strict=True)
    return LoadedModel(net, config, tasks, path, checkpoint_epoch(payload))


# ---------------------------------------------------------------- the data


@dataclass
class EvaluationData:
    """The shard sets that have the split, and a note for each one skipped because it has not."""

    split: str
    shard_sets: list[ShardSet]
    skipped: list[dict[str, str]] = field(default_factory=list)


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
    skipped = [{"name": s.name, "path": str(s.root), "reason": f"no {split} split"} for s in shard_sets if s not in with_split]
    return EvaluationData(split, with_split, skipped)


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
    """How to run the model: device, batch size and loader processes."""

    device: torch.device
    batch_size: int
    loader_workers: int


@dataclass
class DatasetSums:
    """One dataset's metric sums and how many of its samples were read."""

    name: str
    path: Path
    samples: int
    sums: MetricSums


def evaluate_dataset(loaded: LoadedModel, shard_set: ShardSet, split: str, options: RunOptions) -> DatasetSums:
    """Every sample of ``split`` of one dataset through the training loop's validation code."""
    stream = EvalStream([shard_set], split, [t.name for t in loaded.tasks], loaded.config.data.image_size)
    loader = eval_loader(stream, options.batch_size, options.loader_workers, pin_memory=options.device.type == "cuda")
    batches = CountingBatches(loader)
    context = SumsKeepingContext(device=options.device)
    evaluate_split(loaded.net, batches, loaded.tasks, context, loaded.config)
    sums = MetricSums(loaded.tasks)
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


def task_report(task: TaskSpec, sums: TaskSums, summary: dict[str, float], dataset_names: Sequence[str]) -> dict[str, Any]:
    """One task's metrics as plain values; a task without a labelled sample says so instead of scoring 0."""
    if sums.count == 0:
        return {"kind": task.kind, "count": 0, "status": no_labels_status(dataset_names)}
    report: dict[str, Any] = {"kind": task.kind, **summary}
    if task.kind != "regression":
        report |= {
            "classes": list(task.classes),
            "support": [int(v) for v in sums.confusion.sum(dim=1).tolist()],
            "per_class_accuracy": per_class_accuracy(sums.confusion, task.classes),
            "confusion": [[int(v) for v in row] for row in sums.confusion.tolist()],
        }
    return report


def tasks_report(tasks: Sequence[TaskSpec], sums: MetricSums, dataset_names: Sequence[str]) -> dict[str, dict[str, Any]]:
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


def task_table(tasks: dict[str, dict[str, Any]]) -> list[str]:
    """One row per task: samples and main metrics; '–' where a metric does not apply."""
    lines = ["| task | samples | " + " | ".join(title for _, title in MAIN_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(MAIN_COLUMNS)]
    for name, metrics in tasks.items():
        if "status" in metrics:
            cells = [metrics["status"]] + [""] * (len(MAIN_COLUMNS) - 1)
        else:
            cells = [format_number(metrics.get(key)) for key, _ in MAIN_COLUMNS]
        lines.append(f"| {name} | {metrics['count']} | " + " | ".join(cells) + " |")
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
    if len(report["by_dataset"]) > 1:
        for name, part in report["by_dataset"].items():
            labelled = {task: metrics for task, metrics in part["tasks"].items() if metrics["count"]}
            lines += ["", f"## {name} ({part['samples']} samples; the tasks it labels)", "", *task_table(labelled)]
    for name, metrics in report["tasks"].items():
        if "classes" in metrics:
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


def evaluation_device(requested: str, config: TrainConfig) -> torch.device:
    """auto | cpu | cuda, chosen as training chooses; asking for CUDA where there is none is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: no CUDA device is available here")
    return resolve_device(replace(config, device=requested))


def local_cpu_count() -> int:
    """CPUs this process may run on (the affinity mask, as under SLURM), not all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_report(
    loaded: LoadedModel, data: EvaluationData, per_dataset: Sequence[DatasetSums], options: RunOptions
) -> dict[str, Any]:
    """Everything metrics.json holds: checkpoint, data, split, counts, metrics overall and per dataset."""
    names = [d.name for d in per_dataset]
    return {
        "checkpoint": str(loaded.checkpoint_path.resolve()),
        "epoch": loaded.epoch,
        "split": data.split,
        "device": str(options.device),
        "batch_size": options.batch_size,
        "datasets": [{"name": d.name, "path": str(d.path.resolve()), "samples": d.samples} for d in per_dataset],
        "skipped_datasets": data.skipped,
        "samples": sum(d.samples for d in per_dataset),
        "tasks": tasks_report(loaded.tasks, total_sums(loaded.tasks, per_dataset), names),
        "by_dataset": {
            d.name: {"samples": d.samples, "tasks": tasks_report(loaded.tasks, d.sums, [d.name])} for d in per_dataset
        },
    }


def write_outputs(report: dict[str, Any], markdown: str, out_dir: Path) -> list[Path]:
    """metrics.json, metrics.md and a confusion PNG per classification task with labels."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / METRICS_JSON, out_dir / METRICS_MARKDOWN]
    written[0].write_text(json.dumps(json_safe(report), indent=1) + "\n")
    written[1].write_text(markdown)
    for task, metrics in report["tasks"].items():
        if "confusion" in metrics:
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
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU when there is one")
    parser.add_argument("--loader-workers", type=int, default=2, help="decoding processes (0: decode in this process)")
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.loader_workers < 0:
        parser.error(f"--loader-workers must be at least 0, got {args.loader_workers}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    try:
        checkpoint = find_checkpoint(args.target)
        print(f"checkpoint: {checkpoint}", flush=True)
        loaded = load_model(checkpoint)
        data = open_evaluation_data(args.data or loaded.config.data.datasets, args.split)
        device = evaluation_device(args.device, loaded.config)
    except EvaluationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for skipped in data.skipped:
        print(f"note: skipping {skipped['name']} ({skipped['path']}): {skipped['reason']}", flush=True)
    if device.type == "cpu":
        torch.set_num_threads(local_cpu_count())
    options = RunOptions(device, args.batch_size or loaded.config.data.batch_size, args.loader_workers)
    loaded.net.to(device)
    if uses_channels_last(loaded.config, WorkerContext(device=device)):
        loaded.net.to(memory_format=torch.channels_last)
    per_dataset = []
    for shard_set in data.shard_sets:
        print(f"evaluating {shard_set.name} {args.split} ({shard_set.num_samples(args.split)} samples) on {device}", flush=True)
        per_dataset.append(evaluate_dataset(loaded, shard_set, args.split, options))
    report = build_report(loaded, data, per_dataset, options)
    report["seconds"] = time.perf_counter() - started
    markdown = format_markdown(report)
    out_dir = args.out or default_output_dir(args.target, args.split)
    written = write_outputs(report, markdown, out_dir)
    print("\n" + markdown)
    print(f"wrote {', '.join(path.name for path in written)} to {out_dir} in {report['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
