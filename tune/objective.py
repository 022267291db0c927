"""What Tune hears of one epoch of a trial: its validation metrics, scored.

The objective is the mean over the validated tasks of ``pipeline.metrics.normalized_score`` (accuracy;
``10 / (10 + MAE)`` for age), each in [0, 1]; given single-task baselines (``--baselines``), it is Δm
instead, the mean % improvement over them. Pure: no Ray here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from pipeline.config import ConfigError
from pipeline.metrics import delta_m, normalized_score
from pipeline.schema import get_task

OBJECTIVE = "objective"
EPOCHS_DONE = "epochs_done"  # the schedulers' clock, in epochs
MEAN_SCORE = "mean_score"  # mean normalized score over tasks, in [0, 1]
DELTA_M = "delta_m"  # % improvement over single-task baselines, with --baselines
HPARAM_PREFIX = "hparam/"  # every result carries the values its epoch was trained with (PBT changes them)


def search_objective(metrics: dict[str, Any]) -> float:
    """Mean over the validated tasks of their normalized score (higher is better, each in [0, 1])."""
    tasks = sorted({key.split("/")[1] for key in metrics if key.startswith("val/") and key.endswith("/loss")})
    return sum(normalized_score(get_task(task), _task_metrics(metrics, task)) for task in tasks) / len(tasks)


def main_metrics(metrics: dict[str, Any], tasks: Iterable[str]) -> dict[str, float]:
    """Each task's main validation metric (MAE for age, accuracy otherwise)."""
    return {task: metrics[f"val/{task}/{get_task(task).metric}"] for task in tasks}


def load_baselines(path: Path) -> dict[str, float]:
    """Single-task baseline results: a YAML mapping of task to its main metric (age: MAE in years, others:
    accuracy), e.g. from ``python -m pipeline.experiments mtl-vs-single``. Checked before anything starts."""
    try:
        document = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"--baselines {path}: {error}") from None
    if not isinstance(document, dict) or not document:
        raise ConfigError(f"--baselines {path}: expected a mapping of task to its single-task metric, e.g. 'age: 5.8'")
    baselines = {}
    for task, value in document.items():
        try:
            spec = get_task(str(task))
        except KeyError as error:
            raise ConfigError(f"--baselines {path}: {error.args[0]}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"--baselines {path}: {task}: expected its {spec.metric} as a number > 0, got {value!r}")
        baselines[spec.name] = float(value)
    return baselines


def _task_metrics(metrics: dict[str, Any], task: str) -> dict[str, float]:
    prefix = f"val/{task}/"
    return {key[len(prefix):]: value for key, value in metrics.items() if key.startswith(prefix)}


def tune_result(epoch_metrics: dict[str, Any], baselines: dict[str, float] | None = None,
                sample: dict[str, Any] | None = None) -> dict[str, Any]:
    """One epoch for Tune: the loop's metrics (lists as JSON, as in metrics.parquet), the mean normalized
    score, Δm given baselines (then the objective), the epochs done, and the values it was trained with."""
    result = {key: json.dumps(value) if isinstance(value, list) else value for key, value in epoch_metrics.items()}
    scores = {MEAN_SCORE: search_objective(result)}
    if baselines:
        scores[DELTA_M] = delta_m(main_metrics(result, baselines), baselines)
    objective = scores[DELTA_M] if baselines else scores[MEAN_SCORE]
    hparams = {f"{HPARAM_PREFIX}{name}": value for name, value in (sample or {}).items()}
    return result | scores | {OBJECTIVE: objective, EPOCHS_DONE: result["epoch"] + 1} | hparams
