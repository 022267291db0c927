"""What training derives from the config and the shard folders before the first step: the datasets, the
tasks (built-in, declared in ``data.tasks_file`` or by the shards), the batch quotas of the task-balanced
sampler and the epoch length."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import TrainConfig
from pipeline.data import (
    DataConfigError,
    ShardSet,
    compute_quotas,
    default_steps_per_epoch,
    describe_quotas,
    open_shard_set,
    resolve_tasks,
)
from pipeline.schema import TaskDeclarationError, TaskSpec, declare_tasks, get_task, load_tasks_file


@dataclass
class TrainingSetup:
    """What the loop derives from the config and the shard folders before the first step."""

    shard_sets: list[ShardSet]
    tasks: list[TaskSpec]
    quotas: dict[str, int]
    steps_per_epoch: int
    description: str
    regression_means: dict[str, float]  # mean training label of each regression task (initial head bias)


def prepare(config: TrainConfig, world_size: int) -> TrainingSetup:
    """Open the datasets, check tasks against their labels, compute batch quotas and the epoch length."""
    if not config.data.datasets:
        raise ValueError("data.datasets is empty: name at least one shard folder")
    shard_sets = [open_shard_set(path) for path in config.data.datasets]
    declare_config_tasks(config)
    task_names = resolve_tasks(shard_sets, config.data.tasks)
    coverage = {s.name: {t: s.labelled_fraction(t) for t in task_names} for s in shard_sets}
    quotas = compute_quotas(coverage, task_names, config.data.batch_size, config.data.task_shares)
    steps = config.data.steps_per_epoch or default_steps_per_epoch(shard_sets, config.data.batch_size * world_size)
    tasks = [get_task(t) for t in task_names]
    regression_means = {}
    for task in (t.name for t in tasks if t.kind == "regression"):
        sums = [s.label_mean(task) for s in shard_sets]
        count = sum(n for _, n in sums)
        regression_means[task] = sum(mean * n for mean, n in sums) / count
    return TrainingSetup(shard_sets, tasks, quotas, steps, describe_quotas(quotas, coverage, task_names),
                         regression_means)


def declare_config_tasks(config: TrainConfig) -> None:
    """Make ``data.tasks_file``'s tasks known (the shards' own declarations follow in ``resolve_tasks``, which
    refuses a shard folder that declares one of them differently)."""
    if not config.data.tasks_file:
        return
    try:
        declare_tasks(load_tasks_file(config.data.tasks_file), f"data.tasks_file {config.data.tasks_file}")
    except TaskDeclarationError as error:
        raise DataConfigError(str(error)) from None
