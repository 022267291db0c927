"""``python -m pipeline.experiments NAME``: the seed thesis' comparisons, one command each.

    python -m pipeline.experiments mtl-vs-single --config configs/utkface.yaml              # Tables 4.6-4.15
    python -m pipeline.experiments weighting --config configs/celeba.yaml --seeds 3          # Tables 5.1-5.3
    python -m pipeline.experiments freeze --config configs/utkface.yaml                      # Table 5.4
    python -m pipeline.experiments lambda --config configs/utkface.yaml max_epochs=10 --local  # Table 5.5
    python -m pipeline.experiments transfer --config configs/utkface.yaml --init-from runs/fer-utkface --seeds 3

An experiment is a set of training runs ("arms") of one config that differ in one thing, each trained with
seeds 0..N-1 through ``pipeline.train`` (Ray Train on a local Ray or the cluster named by ``RAY_ADDRESS``;
``--local``: in this process, no Ray). Everything lands in ``runs_dir/<out name>/`` (default out name: NAME):

    <arm>-seed<k>/     one run folder per arm and seed (pipeline.train's layout)
    results.parquet    one row per arm x seed: every validation metric of the run's best epoch
    table.md           the comparison table (also printed): mean ± std over seeds, chance level, Δm
    plot.png           one bar chart per task, one bar per row, error bars = std over seeds
    results-test.parquet, table-test.md, plot-test.png
                       the same on the test split (``--split test``): each run's best_model.pt evaluated
                       by pipeline.evaluate, whose report lands in <arm>-seed<k>/evaluation/test/

Running the same command again skips finished runs (metrics.parquet reached ``max_epochs`` or every task
froze/stopped), resumes unfinished ones and refuses a run folder whose saved config differs from the
arm's (other than ``max_epochs``): choose another ``--name`` for another config.

The experiments (``freeze.mode`` and ``loss.weighting`` values are those of pipeline.config):

- ``mtl-vs-single``: the config as it is (row "MTL") and one single-task model per task (row
  "single-task"), or per task of ``--single-tasks`` (e.g. ``Smiling,Male,landmarks`` of CelebA's 41: the
  table then has every task's MTL figure, single-task figures and Δm for those only). A single-task model
  is the same config restricted to its task: ``data.tasks`` = [task],
  ``data.datasets`` = the datasets that label it, ``loss.weighting=fixed`` with the one-hot weight
  {task: 1}. That is the 2019 lab notes' one-hot ``loss_weights`` without the idle heads: with all heads
  kept, the untrained tasks' losses would still choose the best epoch (lowest total validation loss),
  drive the lr plateau and Early Freeze, and take batch share from the sampler. With the default
  ``data.steps_per_epoch: 0`` a single-task epoch covers its own datasets' training samples once.
- ``weighting``: ``equal`` (the thesis' "average loss"), ``learned`` (eq. 3.5), ``uncertainty``, ``dwa``,
  ``rlw``, ``famo`` (every registered strategy but ``fixed``).
- ``freeze``: ``early-freeze`` (Algorithm 1), ``early-stop`` (converged tasks stop; the thesis' Table 5.4
  baseline), ``none``, and ``early-freeze`` with Algorithm 1's cumulative counter.
- ``lambda``: λ of the learned weighting over the thesis' grid {0.001, 0.01, 0.1, 1} (Table 5.5).
- ``transfer`` (the lab notes' pretrain, then fine-tune): the config from its own start (the baseline, row
  "ImageNet start" with ``model.weights_path``, else "random start") and from the network of the run
  ``--init-from`` names (row "from <run>": ``model.init_from``, which loads the trunk and every head of the same
  task and shape), e.g. pretrained on FER2013 + UTKFace (``python -m pipeline.train --config
  configs/fer-utkface.yaml``: runs/fer-utkface), fine-tuned on UTKFace. Only this experiment takes
  ``--init-from``; the path, the file read and the config its weights were trained with go into
  ``invocations.jsonl``.

Metrics are those of each run's best epoch (lowest val/total_loss, the epoch saved as best_model.pt): with
``--split val`` (the default) its validation metrics, read from its metrics.parquet; with ``--split test``
best_model.pt evaluated on the test split (:func:`pipeline.evaluate.evaluate_checkpoint`), the numbers a
paper reports, since the validation split chose the epoch. The table's caption names the split.

Δm (Maninis et al. 2019) summarises a row against the experiment's baseline row in one number:
Δm = (1/T) Σ_t (-1)^{l_t} (M_t - M_base,t) / M_base,t x 100 %, l_t = 1 where lower is better (MAE), so a
positive Δm is an improvement. It is computed from the means over seeds; undefined (shown –) where a baseline
metric is 0.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml

from pipeline.config import (
    ConfigError, TrainConfig, config_differences, describe_differences, load_config, to_dict, with_absolute_paths,
)
from pipeline.data import DataConfigError, ShardSet, open_shard_set, resolve_tasks
from pipeline.evaluate import EvaluationError, evaluate_checkpoint
from pipeline.run_summary import chance_levels
from pipeline.freeze import MODES as FREEZE_MODES
from pipeline.losses import WEIGHTINGS
from pipeline.inference import CheckpointError
from pipeline.run_records import BEST_MODEL_FILE, CONFIG_FILE, METRICS_FILE, network_file_of
from pipeline.schema import TaskSpec, get_task
from pipeline.train import check_init_from
from pipeline.train import main as train_main
from pipeline.training_setup import declare_config_tasks

EXPERIMENTS = ("mtl-vs-single", "weighting", "freeze", "lambda", "transfer")
# Every registered strategy but the hand-set one, equal (the thesis' "average loss", the baseline) first.
COMPARED_WEIGHTINGS = ("equal", *(name for name in WEIGHTINGS if name not in ("equal", "fixed")))
LAMBDA_GRID = (0.001, 0.01, 0.1, 1.0)  # thesis Table 5.5
BASELINE_LAMBDA = 0.1  # the config default and the thesis' best λ
LOWER_IS_BETTER = frozenset({"mae", "rmse", "nme"})
PLOTTED_TASKS_MAX = 12  # one bar chart each; beyond this the plot shows the tasks with a baseline, first ones
RESULTS_FILE, TABLE_FILE, PLOT_FILE = "results.parquet", "table.md", "plot.png"
INVOCATIONS_FILE = "invocations.jsonl"  # every command that ran this experiment, with commit and shard summaries
SPLIT_CHOICES = ("val", "test")
SPLIT_NAMES = {"val": "validation", "test": "test"}


class ExperimentError(Exception):
    """An experiment that cannot go on; the message names the run folder and what to do."""


@dataclass(frozen=True)
class Arm:
    """One configuration of an experiment: ``overrides`` are applied after the user's, per seed."""

    name: str  # run folders are <name>-seed<k>
    row: str  # the table row its results go to (the single-task arms share one)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    baseline: bool = False  # its row is the one every other row's Δm is measured against


class CellStats(NamedTuple):
    mean: float
    std: float  # sample std (n-1) over seeds; NaN for one seed
    count: int


# ---------------------------------------------------------------- the arms of each experiment (pure)


def single_task_overrides(task: str, datasets: Sequence[str]) -> dict[str, Any]:
    """The config changes that turn the multi-task config into ``task``'s single-task baseline."""
    return {"data.tasks": [task], "data.datasets": list(datasets), "data.task_shares": {},
            "loss.weighting": "fixed", "loss.fixed_weights": {task: 1.0}}


def source_name(init_from: Path) -> str:
    """How the table names a pretrained network: its run folder (``runs/x/mtl-seed0/best_model.pt``: mtl-seed0),
    with the file when it is another checkpoint (``checkpoint_000003/checkpoint.pt``)."""
    if init_from.name == BEST_MODEL_FILE:
        return init_from.parent.name
    return f"{init_from.parent.name}/{init_from.name}" if init_from.suffix == ".pt" else init_from.name


def transfer_arms(init_from: Path, backbone_weights: str | None) -> list[Arm]:
    """The config's own start (the baseline) and the same config started from ``init_from``'s network. The
    own start clears ``model.init_from``, so that the two arms differ in that key alone."""
    own_start = ("imagenet", "ImageNet start") if backbone_weights else ("scratch", "random start")
    return [Arm(*own_start, {"model.init_from": None}, baseline=True),
            Arm("pretrained", f"from {source_name(init_from)}", {"model.init_from": str(init_from)})]


def experiment_arms(experiment: str, tasks: Sequence[str], datasets_by_task: Mapping[str, Sequence[str]],
                    single_tasks: Sequence[str] = (), weightings: Sequence[str] = (), init_from: Path | None = None,
                    backbone_weights: str | None = None) -> list[Arm]:
    """The arms of ``experiment`` in table order; ``datasets_by_task`` (shard folders labelling each task) and
    ``single_tasks`` (the tasks that get a single-task arm; default all) are only used by ``mtl-vs-single``,
    ``weightings`` (default every registered one but ``fixed``; ``equal``, the baseline, always) by ``weighting``,
    ``init_from`` (required there, refused elsewhere) and ``backbone_weights`` (the config's
    ``model.weights_path``) by ``transfer``."""
    if experiment == "transfer" and init_from is None:
        raise ExperimentError("transfer needs --init-from: the pretrained run folder (or its best_model.pt)")
    if experiment != "transfer" and init_from is not None:
        raise ExperimentError(f"--init-from is for the transfer experiment; {experiment} does not take it")
    if experiment == "mtl-vs-single":
        unknown = [task for task in single_tasks if task not in tasks]
        if unknown:
            raise ExperimentError(f"--single-tasks names {', '.join(unknown)}, not among the config's tasks "
                                  f"({', '.join(tasks)})")
        chosen = [task for task in tasks if task in single_tasks] if single_tasks else list(tasks)
        singles = [Arm(f"single-{task}", "single-task", single_task_overrides(task, datasets_by_task[task]),
                       baseline=True) for task in chosen]
        return [*singles, Arm("mtl", "MTL")]
    if experiment == "weighting":
        unknown = [name for name in weightings if name not in COMPARED_WEIGHTINGS]
        if unknown:
            raise ExperimentError(f"--weightings names {', '.join(unknown)}; known: {', '.join(COMPARED_WEIGHTINGS)}")
        chosen = [name for name in COMPARED_WEIGHTINGS if name == "equal" or name in weightings or not weightings]
        return [Arm(weighting, weighting, {"loss.weighting": weighting}, baseline=weighting == "equal")
                for weighting in chosen]
    if experiment == "freeze":
        return [*(Arm(mode, mode, {"freeze.mode": mode}, baseline=mode == "early-stop") for mode in FREEZE_MODES),
                Arm("early-freeze-cumulative", "early-freeze (cumulative counter)",
                    {"freeze.mode": "early-freeze", "freeze.counter": "cumulative"})]
    if experiment == "lambda":
        return [Arm(f"lambda-{lam:g}", f"λ={lam:g}", {"loss.weighting": "learned", "loss.lam": lam},
                    baseline=lam == BASELINE_LAMBDA) for lam in LAMBDA_GRID]
    if experiment == "transfer":
        return transfer_arms(init_from, backbone_weights)
    raise ValueError(f"unknown experiment {experiment!r}; known: {', '.join(EXPERIMENTS)}")


def baseline_row(arms: Sequence[Arm]) -> str:
    """The row every other row's Δm is measured against: the one row of the arms marked ``baseline``."""
    (row,) = {arm.row for arm in arms if arm.baseline}
    return row


def run_name(arm: Arm, seed: int) -> str:
    return f"{arm.name}-seed{seed}"


def arm_overrides(arm: Arm, seed: int, experiment_dir: Path) -> list[str]:
    """``key=value`` overrides of one run; values as JSON, which the config's YAML parser reads exactly."""
    values = {**arm.overrides, "seed": seed, "runs_dir": str(experiment_dir), "name": run_name(arm, seed)}
    return [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in values.items()]


# ---------------------------------------------------------------- run folders (pure over their records)


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


# ---------------------------------------------------------------- aggregation and Δm (pure)


def mean_and_std(values: Sequence[float]) -> CellStats:
    """Mean and sample standard deviation (n-1); the std is NaN below two values, the mean NaN for none."""
    values = [float(v) for v in values]
    if not values:
        return CellStats(math.nan, math.nan, 0)
    return CellStats(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))


def lower_is_better(task: TaskSpec) -> bool:
    return task.metric in LOWER_IS_BETTER


def relative_improvement(value: float, baseline: float, lower_better: bool) -> float:
    """(-1)^l (value - baseline) / baseline x 100: positive when ``value`` is the better one; NaN (undefined)
    for a baseline of 0, e.g. a single-task model that got no validation sample right."""
    if baseline == 0:
        return math.nan
    sign = -1.0 if lower_better else 1.0
    return sign * (value - baseline) / baseline * 100.0


def delta_m(metric_by_task: Mapping[str, float], baseline_by_task: Mapping[str, float], lower_better_by_task: Mapping[str, bool]) -> float:
    """Δm (Maninis et al. 2019): the mean over tasks of :func:`relative_improvement`, in percent; NaN when
    it is undefined for a task."""
    improvements = [relative_improvement(metric_by_task[task], baseline_by_task[task], lower_better)
                    for task, lower_better in lower_better_by_task.items()]
    return statistics.fmean(improvements)


def summarize(records: Sequence[Mapping[str, Any]], rows: Sequence[str], tasks: Sequence[TaskSpec],
              split: str = "val") -> dict[str, dict[str, CellStats]]:
    """row -> task -> mean ± std of the task's main metric on ``split`` over the records (arm x seed) of
    that row. A record without the metric (a single-task run of another task) does not count."""
    summary = {}
    for row in rows:
        summary[row] = {}
        for task in tasks:
            key = f"{split}/{task.name}/{task.metric}"
            values = [r[key] for r in records if r["row"] == row and r.get(key) is not None]
            summary[row][task.name] = mean_and_std(values)
    return summary


# ---------------------------------------------------------------- table and plot


def metric_label(task: TaskSpec) -> str:
    if lower_is_better(task):
        unit = " (years)" if task.kind == "regression" else ""
        return f"{task.name} {task.metric.upper()}{unit} ↓"
    return f"{task.name} {task.metric.replace('_', ' ')} (%) ↑"


def display_scale(task: TaskSpec) -> float:
    """Fractions are shown in percent (as the thesis' tables), errors as they are (years, NME)."""
    return 1.0 if lower_is_better(task) else 100.0


def format_cell(stats: CellStats, scale: float) -> str:
    if stats.count == 0 or math.isnan(stats.mean):
        return "–"
    if math.isnan(stats.std):
        return f"{stats.mean * scale:.2f}"
    return f"{stats.mean * scale:.2f} ± {stats.std * scale:.2f}"


def format_table(experiment: str, baseline: str, summary: Mapping[str, Mapping[str, CellStats]],
                 tasks: Sequence[TaskSpec], chance: Mapping[str, float], seeds: int, split: str = "val") -> str:
    """The Markdown table: a caption, one column per task, one row per arm row, the chance level, Δm against the
    ``baseline`` row."""
    seeds_text = "one seed" if seeds == 1 else f"mean ± std (n-1) over {seeds} seeds"
    caption = (f"**{experiment}**: {SPLIT_NAMES[split]} split, best epoch of each run (lowest val/total_loss, the epoch saved "
               f"as best_model.pt), {seeds_text}. Δm: mean over tasks of the relative difference to the "
               f"{baseline} row, sign-adjusted so that positive is better (Maninis et al. 2019).")
    header = ["model", *(metric_label(task) for task in tasks), f"Δm vs {baseline} (%) ↑"]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    baseline_means = {task: stats.mean for task, stats in summary[baseline].items()}
    # Δm over the tasks the baseline row has (all, unless --single-tasks chose some)
    lower_better = {task.name: lower_is_better(task) for task in tasks if not math.isnan(baseline_means[task.name])}
    for row, by_task in summary.items():
        cells = [format_cell(by_task[task.name], display_scale(task)) for task in tasks]
        if row == baseline:
            delta = "ref."
        else:
            value = delta_m({task: stats.mean for task, stats in by_task.items()}, baseline_means, lower_better)
            delta = "–" if math.isnan(value) else f"{value:+.2f}"
        lines.append("| " + " | ".join([row, *cells, delta]) + " |")
    chance_cells = [format_cell(CellStats(chance[task.name], math.nan, 1), display_scale(task)) for task in tasks]
    lines.append("| " + " | ".join(["chance", *chance_cells, ""]) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(summary: Mapping[str, Mapping[str, CellStats]], tasks: Sequence[TaskSpec], chance: Mapping[str, float],
                    title: str, path: Path) -> Path:
    """One bar chart per task, one bar per row with the std over seeds as error bar, chance as a dashed line."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(summary)
    if len(tasks) > PLOTTED_TASKS_MAX:
        with_baseline = [task for task in tasks if any(summary[row][task.name].count for row in rows[:-1])]
        tasks = (with_baseline or list(tasks))[:PLOTTED_TASKS_MAX]
    figure = Figure(figsize=(0.6 + 3.0 * len(tasks), 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    colours = [colormaps["tab10"](index % 10) for index in range(len(rows))]
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(1, len(tasks), index + 1)
        scale = display_scale(task)
        stats = [summary[row][task.name] for row in rows]
        means = [s.mean * scale for s in stats]
        errors = [0.0 if math.isnan(s.std) else s.std * scale for s in stats]
        axes.bar(range(len(rows)), means, yerr=errors, capsize=4, color=colours)
        if math.isfinite(chance[task.name]):
            axes.axhline(chance[task.name] * scale, color="grey", linestyle="--", linewidth=1, label="chance")
            axes.legend(loc="lower right", fontsize="small")
        axes.set_xticks(range(len(rows)), rows, rotation=30, ha="right")
        axes.set_title(metric_label(task), fontsize="medium")
    figure.suptitle(title)
    figure.savefig(path, format="png")
    return path


# ---------------------------------------------------------------- the runs (file system, training)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / METRICS_FILE
    return pq.read_table(path).to_pylist() if path.exists() else []


def check_run_folder(config: TrainConfig) -> None:
    """A run folder that already holds another config is not this arm's run: refused, not mixed in."""
    saved_path = config.run_dir / CONFIG_FILE
    if not saved_path.exists():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    differences = config_differences(saved, to_dict(config))
    if differences:
        raise ExperimentError(f"{config.run_dir} was trained with another config "
                              f"({describe_differences(saved, to_dict(config), differences)}); "
                              "use another --name for this experiment or delete that run folder")


def git_commit(repo: Path) -> str:
    """The checked-out commit of ``repo`` ("+changes" when the tree differs from it), or "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def describe_source(init_from: Path) -> dict[str, Any]:
    """The pretrained network ``init_from`` names: its path, the file read and the config and epoch its weights
    were trained with (a run folder records no commit; its experiment's invocations.jsonl does)."""
    file = network_file_of(init_from)
    payload = torch.load(file, map_location="cpu", weights_only=True)
    epoch = payload.get("epoch", payload.get("run_state", {}).get("epoch"))
    return {"path": str(init_from), "file": str(file), "epoch": epoch, "config": payload.get("config")}


def check_transfer_source(source_config: Mapping[str, Any] | None, config: TrainConfig) -> None:
    """A source of another backbone would hand over nothing of the trunk: that is no transfer, so refused."""
    backbone = ((source_config or {}).get("model") or {}).get("backbone")
    if backbone != config.model.backbone:
        raise ExperimentError(f"--init-from holds a {backbone} network and the config trains {config.model.backbone}: "
                              "model.init_from would load no trunk; fine-tune with the source's model.backbone")


def record_invocation(experiment_dir: Path, command: Sequence[str], shard_sets: Sequence[ShardSet],
                      source: Mapping[str, Any] | None = None) -> None:
    """One line per invocation in ``invocations.jsonl``: the exact command, the code's commit, the summary of
    every shard folder and the pretrained ``source`` (:func:`describe_source`), so that a table can be traced
    to what made it."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(command),
             "commit": git_commit(Path(__file__).resolve().parents[1]),
             "shards": {str(s.root): json.loads((s.root / "summary.json").read_text()) for s in shard_sets},
             **({"init_from": dict(source)} if source is not None else {})}
    with (experiment_dir / INVOCATIONS_FILE).open("a") as handle:
        handle.write(json.dumps(entry) + "\n")


def format_estimate(trained: Sequence[tuple[float, int]], remaining_runs: int, epochs_per_run: int) -> str:
    """How long the remaining runs may take at most, from the seconds per epoch of the (seconds, epochs) trained
    so far: per epoch, since a resumed run trains only the epochs it had left."""
    epochs = sum(count for _, count in trained)
    if not epochs or not remaining_runs:
        return ""
    per_epoch = sum(seconds for seconds, _ in trained) / epochs
    minutes = per_epoch * remaining_runs * epochs_per_run / 60
    return (f"; at most about {minutes:.0f} min left for {remaining_runs} more run(s) of up to {epochs_per_run} "
            f"epochs ({per_epoch / 60:.1f} min per epoch here)")


def train_arm(config_path: Path | None, overrides: Sequence[str], arm: Arm, seed: int, experiment_dir: Path,
              local: bool) -> tuple[Path, tuple[float, int] | None]:
    """Train one arm with one seed through ``pipeline.train`` unless its run folder is finished; returns the run
    folder and the seconds and epochs it trained now (None when skipped)."""
    run_overrides = [*overrides, *arm_overrides(arm, seed, experiment_dir)]
    config = with_absolute_paths(load_config(config_path, run_overrides))
    check_run_folder(config)
    rows_before = read_rows(config.run_dir)
    if run_is_finished(rows_before, config.max_epochs):
        print(f"{config.run_dir.name}: finished, skipped", flush=True)
        return config.run_dir, None
    started = time.perf_counter()
    argv = [*(["--config", str(config_path)] if config_path else []), *run_overrides, *(["--local"] if local else [])]
    code = train_main(argv)
    if code != 0:
        raise ExperimentError(f"training {config.run_dir} failed (exit {code}); its output is above. "
                              "Running the experiment again resumes it and skips the finished runs")
    return config.run_dir, (time.perf_counter() - started, len(read_rows(config.run_dir)) - len(rows_before))


def split_metrics(report: Mapping[str, Any], split: str) -> dict[str, int | float]:
    """``<split>/<task>/<metric>`` -> value of every numeric metric of a pipeline.evaluate report, named as
    metrics.parquet names the validation ones; a task without labels has none."""
    return {f"{split}/{task}/{name}": value for task, metrics in report["tasks"].items()
            for name, value in metrics.items() if isinstance(value, (int, float)) and not isinstance(value, bool)}


def evaluate_best_model(run_dir: Path, split: str) -> dict[str, int | float]:
    """The run's best_model.pt on ``split`` of its own datasets (report in <run>/evaluation/<split>/)."""
    try:
        report, out_dir = evaluate_checkpoint(run_dir / BEST_MODEL_FILE, split, loader_workers=1, log=lambda line: None)
    except (CheckpointError, EvaluationError) as error:
        raise ExperimentError(f"cannot evaluate {run_dir} on {split}: {error}") from None
    print(f"{run_dir.name}: {split} split evaluated in {report['seconds']:.0f} s ({out_dir})", flush=True)
    return split_metrics(report, split)


def result_record(experiment: str, arm: Arm, seed: int, run_dir: Path, split: str = "val") -> dict[str, Any]:
    """One results row: the arm, the seed and every metric of the run's best epoch on ``split`` (validation:
    from metrics.parquet; another split: best_model.pt evaluated on it)."""
    rows = read_rows(run_dir)
    if not rows:
        raise ExperimentError(f"{run_dir / METRICS_FILE} is missing or empty after training")
    best = best_epoch_row(rows)
    if split == "val":
        metrics = {key: value for key, value in best.items() if key.startswith("val/")}
    else:
        metrics = evaluate_best_model(run_dir, split)
    return {"experiment": experiment, "arm": arm.name, "row": arm.row, "seed": seed, "run_dir": str(run_dir),
            "best_epoch": int(best["epoch"]), "epochs_run": len(rows), **metrics}


def split_file(name: str, split: str) -> str:
    """table.md for the validation split, table-test.md for the test split (likewise for the others)."""
    if split == "val":
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}-{split}{dot}{suffix}"


def write_results(records: Sequence[Mapping[str, Any]], path: Path) -> None:
    """results.parquet: one row per record; a metric a run does not have (another task's) is null."""
    columns = list(dict.fromkeys(key for record in records for key in record))
    pq.write_table(pa.Table.from_pylist([{key: record.get(key) for key in columns} for record in records]), path)


def run_experiment(experiment: str, config_path: Path | None, overrides: Sequence[str], seeds: int,
                   out_name: str | None, local: bool, split: str = "val", command: Sequence[str] = (),
                   single_tasks: Sequence[str] = (), weightings: Sequence[str] = (),
                   init_from: Path | None = None) -> Path:
    """Train every arm x seed (skipping finished runs), then write the results, table and plot of ``split``."""
    base = with_absolute_paths(load_config(config_path, overrides))
    shard_sets = [open_shard_set(path) for path in base.data.datasets]
    declare_config_tasks(base)
    task_names = resolve_tasks(shard_sets, base.data.tasks)
    datasets_by_task = {task: [path for path, s in zip(base.data.datasets, shard_sets) if s.labelled_fraction(task) > 0]
                        for task in task_names}
    init_from = init_from.resolve() if init_from else None  # absolute: a run's saved config must not depend on cwd
    arms = experiment_arms(experiment, task_names, datasets_by_task, single_tasks, weightings, init_from,
                           base.model.weights_path)
    source = None
    if init_from is not None:
        check_init_from(init_from)
        source = describe_source(init_from)
        check_transfer_source(source["config"], base)
    experiment_dir = Path(base.runs_dir) / (out_name or experiment)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    record_invocation(experiment_dir, command, shard_sets, source)
    print(f"experiment {experiment}: {len(arms)} arm(s) x {seeds} seed(s) -> {experiment_dir}", flush=True)
    records, durations, total = [], [], len(arms) * seeds
    for number, (arm, seed) in enumerate(((arm, seed) for arm in arms for seed in range(seeds)), start=1):
        print(f"\n[{number}/{total}] {arm.name}, seed {seed}", flush=True)
        run_dir, trained = train_arm(config_path, overrides, arm, seed, experiment_dir, local)
        if trained is not None:
            durations.append(trained)
            estimate = format_estimate(durations, total - number, base.max_epochs)
            print(f"{run_dir.name}: trained {trained[1]} epoch(s) in {trained[0] / 60:.1f} min{estimate}", flush=True)
        records.append(result_record(experiment, arm, seed, run_dir, split))

    tasks = [get_task(name) for name in task_names]
    summary = summarize(records, list(dict.fromkeys(arm.row for arm in arms)), tasks, split)
    chance = chance_levels(shard_sets, tasks, split)
    table = format_table(experiment, baseline_row(arms), summary, tasks, chance, seeds, split)
    write_results(records, experiment_dir / split_file(RESULTS_FILE, split))
    (experiment_dir / split_file(TABLE_FILE, split)).write_text(table)
    plot_comparison(summary, tasks, chance, f"{experiment} ({SPLIT_NAMES[split]}, {seeds} seed{'s' if seeds > 1 else ''})",
                    experiment_dir / split_file(PLOT_FILE, split))
    print(f"\n{table}")
    return experiment_dir


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.experiments", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", metavar="NAME", choices=EXPERIMENTS, help=" | ".join(EXPERIMENTS))
    parser.add_argument("--config", type=Path, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the config, applied to every arm")
    parser.add_argument("--seeds", type=int, default=1, help="train every arm with seeds 0..N-1")
    parser.add_argument("--name", help="experiment folder under runs_dir (default: NAME)")
    parser.add_argument("--local", action="store_true", help="train in this process, no Ray")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="val",
                        help="split the table reports: val (from the runs' records) or test (best_model.pt evaluated)")
    parser.add_argument("--single-tasks", default="",
                        help="mtl-vs-single: the tasks that get a single-task model, e.g. Smiling,Male,landmarks "
                             "(default all)")
    parser.add_argument("--weightings", default="",
                        help="weighting: the methods compared, e.g. learned,pcgrad (default every registered one but "
                             "fixed; equal, the baseline, is always run)")
    parser.add_argument("--init-from", type=Path,
                        help="transfer (required there, refused elsewhere): the pretrained run folder or best_model.pt "
                             "the fine-tuned arm starts from")
    args = parser.parse_intermixed_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    started = time.perf_counter()
    try:
        experiment_dir = run_experiment(args.experiment, args.config, args.overrides, args.seeds, args.name, args.local,
                                        args.split, ["python", "-m", "pipeline.experiments", *(argv or sys.argv[1:])],
                                        comma_list(args.single_tasks), comma_list(args.weightings), args.init_from)
    except (ConfigError, DataConfigError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ExperimentError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"experiment done in {time.perf_counter() - started:.0f} s. Results in {experiment_dir}:")
    files = (split_file(name, args.split) for name in (TABLE_FILE, PLOT_FILE, RESULTS_FILE))
    print("  {}, {}, {} (one row per arm x seed), <arm>-seed<k>/ (the runs)".format(*files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
