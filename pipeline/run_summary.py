"""What a run achieved: each task's metric at the best epoch next to its chance level, and the tasks that
are no better than chance (a run that stayed finite but learned nothing must not hand over a "best" model
without a word).

``<run_dir>/run_summary.json`` is written when training ends; ``evaluate`` and ``predict`` warn from it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

import pyarrow.parquet as pq

from pipeline.data import ShardSet, declare_shard_tasks
from pipeline.metrics import chance_level
from pipeline.run_records import METRICS_FILE
from pipeline.schema import TaskSpec, get_task

SUMMARY_FILE = "run_summary.json"


def headline_metric(task: TaskSpec) -> str:
    """The metric a task is judged by: MAE for regression, NME for landmarks, accuracy otherwise."""
    return {"regression": "mae", "landmarks": "nme"}.get(task.kind, "accuracy")


def chance_levels(shard_sets: Sequence[ShardSet], tasks: Sequence[TaskSpec], split: str = "val") -> dict[str, float]:
    """Per task, :func:`pipeline.metrics.chance_level` over every dataset's labels of ``split``."""
    return {task.name: chance_level(task, [v for s in shard_sets for v in s.labels(task.name, "train")],
                                    [v for s in shard_sets for v in s.labels(task.name, split)]) for task in tasks}


def no_better_than_chance(task: TaskSpec, value: float, chance: float) -> bool:
    """Not strictly better than chance (a non-finite value never is); a task without a chance level is not judged."""
    if math.isnan(chance):
        return False
    if not math.isfinite(value):
        return True
    return value >= chance if task.lower_is_better else value <= chance


def best_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The epoch whose weights best_model.pt holds: the last one marked best (lowest total validation loss)."""
    marked = [row for row in rows if row.get("is_best")]
    return marked[-1] if marked else min(rows, key=lambda row: row["val/total_loss"])


def summarize_run(run_dir: Path, shard_sets: Sequence[ShardSet]) -> dict[str, Any]:
    """Per task at the best epoch: metric, value, chance level, and whether it is no better than chance."""
    declare_shard_tasks(shard_sets)  # the run's declared tasks, in the process that summarises it
    rows = pq.read_table(run_dir / METRICS_FILE).to_pylist()
    best = best_row(rows)
    names = sorted({key.split("/")[1] for key in best if key.startswith("val/") and key.count("/") == 2}
                   - {"total_loss"})
    tasks = [get_task(name) for name in names]
    chance = chance_levels(shard_sets, tasks)
    per_task = {}
    for task in tasks:
        metric = headline_metric(task)
        value = best.get(f"val/{task.name}/{metric}")
        value = math.nan if value is None else float(value)
        per_task[task.name] = {"metric": metric, "value": value, "chance": chance[task.name],
                               "no_better_than_chance": no_better_than_chance(task, value, chance[task.name])}
    return {"best_epoch": int(best["epoch"]), "epochs": len(rows), "tasks": per_task,
            "at_chance": [name for name, entry in per_task.items() if entry["no_better_than_chance"]]}


def write_run_summary(run_dir: Path, summary: dict[str, Any]) -> Path:
    path = run_dir / SUMMARY_FILE
    temporary = path.with_name(f"{SUMMARY_FILE}.tmp")
    temporary.write_text(json.dumps(summary, indent=2))
    os.replace(temporary, path)
    return path


def read_run_summary(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / SUMMARY_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def format_summary_table(summary: dict[str, Any]) -> str:
    lines = ["| task | metric | model | chance level |", "|---|---|---|---|"]
    for name, entry in summary["tasks"].items():
        flag = " (no better than chance)" if entry["no_better_than_chance"] else ""
        lines.append(f"| {name} | {entry['metric']} | {entry['value']:.3f}{flag} | {entry['chance']:.3f} |")
    return "\n".join(lines)


def at_chance_warning(summary: dict[str, Any] | None, where: str) -> str | None:
    """One loud line naming the tasks of ``where`` (a run folder) that are no better than chance, or None."""
    if not summary or not summary.get("at_chance"):
        return None
    details = ", ".join(f"{name} ({summary['tasks'][name]['metric']} {summary['tasks'][name]['value']:.4g}, "
                        f"chance {summary['tasks'][name]['chance']:.4g})" for name in summary["at_chance"])
    return (f"WARNING: {where}: at its best epoch ({summary['best_epoch']}) these tasks are no better than chance: "
            f"{details}. Their predictions carry no information; check optim.lr and the data.")
