"""One run folder of an experiment's arm, as the experiment reads it: refused when it holds another config,
finished or not, and the metrics of its best epoch on a split (validation: its records; another split:
best_model.pt evaluated by :mod:`pipeline.evaluate`, or the evaluation recorded for that epoch where a run was
restored without its weights by :mod:`pipeline.run_archive`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow.parquet as pq
import yaml

from pipeline.config import TrainConfig, config_differences, describe_differences, to_dict
from pipeline.data import SUMMARY_FILE, summary_digest
from pipeline.evaluate import EVALUATION_DIR, METRICS_JSON, EvaluationError, evaluate_checkpoint
from pipeline.experiment_arms import Arm, ExperimentError
from pipeline.inference import CheckpointError
from pipeline.provenance import read_starts
from pipeline.run_records import BEST_MODEL_FILE, CONFIG_FILE, METRICS_FILE, has_records


def best_epoch_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The epoch saved as best_model.pt: the last one marked best (lowest val/total_loss, not restored)."""
    best = [row for row in rows if row.get("is_best")]
    if not best:
        raise ValueError("no epoch is marked is_best")
    return best[-1]


def run_is_finished(rows: Sequence[Mapping[str, Any]], max_epochs: int) -> bool:
    """Whether a run with these metrics.parquet rows has nothing left to train: ``max_epochs`` epochs, or
    every task frozen or stopped in the last one (``freeze/frozen_tasks`` is stored as a JSON list)."""
    if not rows:
        return False
    last = rows[-1]
    if int(last["epoch"]) + 1 >= max_epochs:
        return True
    tasks = {key.split("/")[1] for key in last if key.startswith("val/") and key.endswith("/loss")}
    done = last.get("freeze/frozen_tasks") or "[]"
    return bool(tasks) and tasks <= set(json.loads(done) if isinstance(done, str) else done)


def trained_seconds(rows: Sequence[Mapping[str, Any]]) -> float:
    """The epochs' own seconds (metrics.parquet's ``epoch_seconds``), summed."""
    return sum(float(row.get("epoch_seconds") or 0.0) for row in rows)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    return pq.read_table(path).to_pylist() if path.exists() else []


def check_run_folder(config: TrainConfig) -> None:
    """A run folder that already holds another config is not this arm's run: refused, not mixed in. A start that
    failed before its first checkpoint (a wrong path, say) left a config but nothing trained under it; as
    ``pipeline.train`` does, that folder is started again under the config given now."""
    saved_path = config.run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    differences = config_differences(saved, to_dict(config))
    if differences and not has_records(config.run_dir):
        print(f"{config.run_dir.name}: nothing was trained under its earlier config "
              f"({describe_differences(saved, to_dict(config), differences)}); it starts under this one", flush=True)
    elif differences:
        link = ""
        if config.run_dir.is_symlink():
            link = (f" ({config.run_dir} is a link to {config.run_dir.resolve()}: remove the link itself, "
                    f"`rm {config.run_dir}` without a trailing slash, not what it points to)")
        raise ExperimentError(f"{config.run_dir} was trained with another config "
                              f"({describe_differences(saved, to_dict(config), differences)}); "
                              f"use another --name for this experiment or delete that run folder{link}")


def split_metrics(report: Mapping[str, Any], split: str) -> dict[str, int | float]:
    """``<split>/<task>/<metric>`` -> value of every numeric metric of a pipeline.evaluate report, named as
    metrics.parquet names the validation ones; a task without labels has none."""
    return {f"{split}/{task}/{name}": value for task, metrics in report["tasks"].items()
            for name, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def recorded_evaluation(run_dir: Path, split: str) -> dict[str, Any] | None:
    """The evaluation report (metrics.json) recorded in ``run_dir`` for ``split``, or None."""
    try:
        return json.loads((run_dir / EVALUATION_DIR / split / METRICS_JSON).read_text())
    except (OSError, ValueError):
        return None


def current_evaluation(run_dir: Path, split: str) -> dict[str, Any] | None:
    """The recorded ``split`` evaluation where it is of best_model.pt at the run's best epoch, on ``split`` of the
    run's own datasets (an evaluation on other data, ``pipeline.evaluate --data``, is not the run's result)."""
    report = recorded_evaluation(run_dir, split)
    rows = read_rows(run_dir)
    if report is None or not any(row.get("is_best") for row in rows):
        return None
    current = (report.get("own_datasets") is True and report.get("split") == split
               and Path(report.get("checkpoint", "")).name == BEST_MODEL_FILE
               and report.get("epoch") == int(best_epoch_row(rows)["epoch"]))
    return report if current else None


def configured_datasets(run_dir: Path) -> set[Path] | None:
    """The shard folders the run's saved config names, resolved as an evaluation now would read them."""
    try:
        saved = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return None
    return {Path(path).resolve() for path in (saved.get("data") or {}).get("datasets") or ()}


def is_fresh(report: Mapping[str, Any], run_dir: Path, split: str) -> bool:
    """Whether a current evaluation (:func:`current_evaluation`) still holds: written after best_model.pt, and of
    the shard folders the run's config names now, each as it is now (its summary.json's digest, where the report
    records one; else a summary no newer than the report)."""
    written = (run_dir / EVALUATION_DIR / split / METRICS_JSON).stat().st_mtime
    read = [*report.get("datasets", ()), *report.get("skipped_datasets", ())]
    if {Path(dataset["path"]).resolve() for dataset in read} != configured_datasets(run_dir):
        return False  # a folder added, removed, or a link that points elsewhere now
    for dataset in read:
        summary = Path(dataset["path"]) / SUMMARY_FILE
        if not summary.exists():
            return False
        if "summary_sha256" in dataset:
            if summary_digest(Path(dataset["path"])) != dataset["summary_sha256"]:
                return False
        elif summary.stat().st_mtime > written:
            return False
    best_model = run_dir / BEST_MODEL_FILE
    return best_model.exists() and best_model.stat().st_mtime <= written


def evaluate_best_model(run_dir: Path, split: str, reevaluate: bool = False) -> dict[str, int | float]:
    """The run's best_model.pt on ``split`` of its own datasets (report in <run>/evaluation/<split>/), evaluated
    unless a fresh evaluation of it is recorded there (or ``reevaluate``); a run restored from its records
    (pipeline.run_archive: no best_model.pt) gives the evaluation recorded for its best epoch."""
    recorded = current_evaluation(run_dir, split)
    if not (run_dir / BEST_MODEL_FILE).exists():
        if recorded is None:
            raise ExperimentError(f"cannot evaluate {run_dir} on {split}: it has no {BEST_MODEL_FILE} (restored from "
                                  f"records?) and no {split} evaluation recorded for its best epoch")
        print(f"{run_dir.name}: {split} split as recorded ({BEST_MODEL_FILE} is not in this folder)", flush=True)
        return split_metrics(recorded, split)
    if not reevaluate and recorded is not None and is_fresh(recorded, run_dir, split):
        print(f"{run_dir.name}: {split} split as evaluated before, of this {BEST_MODEL_FILE} and these shards "
              f"(--reevaluate evaluates it again)", flush=True)
        return split_metrics(recorded, split)
    try:
        report, out_dir = evaluate_checkpoint(run_dir / BEST_MODEL_FILE, split, loader_workers=1, log=lambda line: None)
    except (CheckpointError, EvaluationError) as error:
        raise ExperimentError(f"cannot evaluate {run_dir} on {split}: {error}") from None
    print(f"{run_dir.name}: {split} split evaluated in {report['seconds']:.0f} s ({out_dir})", flush=True)
    return split_metrics(report, split)


def result_record(experiment: str, arm: Arm, seed: int, run_dir: Path, split: str = "val",
                  reevaluate: bool = False) -> dict[str, Any]:
    """One results row: the arm, the seed and every metric of the run's best epoch on ``split`` (validation:
    from metrics.parquet; another split: best_model.pt evaluated on it, see :func:`evaluate_best_model`)."""
    rows = read_rows(run_dir)
    if not rows:
        raise ExperimentError(f"{run_dir / METRICS_FILE} is missing or empty after training")
    best = best_epoch_row(rows)
    if split == "val":
        metrics = {key: value for key, value in best.items() if key.startswith("val/")}
    else:
        metrics = evaluate_best_model(run_dir, split, reevaluate)
    return {"experiment": experiment, "arm": arm.name, "row": arm.row, "seed": seed, "run_dir": str(run_dir),
            "best_epoch": int(best["epoch"]), "epochs_run": len(rows), **metrics}


def describe_cpu(cpu: Mapping[str, Any] | None) -> str:
    if not cpu:
        return "CPU not recorded"
    return f"{cpu.get('model', 'unknown')} ({cpu.get('torch_capability', '?')})"


def training_line(run_dirs: Sequence[Path]) -> str:
    """How long the runs of a table trained (their epochs' seconds, summed) and on which CPUs, from starts.jsonl: the
    same config and seed train along another path on another CPU, so a table whose runs come from several machines
    says so. A run started on two machines counts under both."""
    minutes = [trained_seconds(read_rows(run_dir)) / 60 for run_dir in run_dirs]
    if not minutes:
        return ""
    cpus: Counter[str] = Counter()
    for run_dir in run_dirs:
        cpus.update({describe_cpu(start.get("cpu")) for start in read_starts(run_dir)} or {describe_cpu(None)})
    where = "; ".join(f"{cpu}: {count} run{'s' if count > 1 else ''}" for cpu, count in cpus.most_common())
    if sum(cpus.values()) > len(run_dirs):
        where += " (a run whose starts name two of these counts under each)"
    return (f"Trained: {len(minutes)} run{'s' if len(minutes) > 1 else ''}, {sum(minutes) / 60:.1f} h of epochs in all "
            f"({min(minutes):.0f}-{max(minutes):.0f} min a run). {where}.")
