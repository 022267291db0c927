"""An experiment's results: mean ± std over seeds (pure), Δm against the baseline row (pipeline.metrics), which
differences exceed the seed spread (Welch's t-test), the Markdown table, the plot and results.parquet, on the
validation split or another (``table-test.md``…).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from scipy import stats as scipy_stats

from pipeline.metrics import delta_m
from pipeline.schema import TaskSpec

PLOTTED_TASKS_MAX = 12  # one bar chart each; beyond this the plot shows the tasks with a baseline, first ones
RESULTS_FILE, TABLE_FILE, PLOT_FILE = "results.parquet", "table.md", "plot.png"
SPLIT_NAMES = {"val": "validation", "test": "test"}
SIGNIFICANCE = 0.05  # two-sided level of the test marking a cell that differs from its baseline beyond seed noise
BEYOND_SPREAD_MARK = "†"


class CellStats(NamedTuple):
    mean: float
    std: float  # sample std (n-1) over seeds; NaN for one seed
    count: int


# ---------------------------------------------------------------- aggregation over seeds (pure)


def mean_and_std(values: Sequence[float]) -> CellStats:
    """Mean and sample standard deviation (n-1); the std is NaN below two values, the mean NaN for none."""
    values = [float(v) for v in values]
    if not values:
        return CellStats(math.nan, math.nan, 0)
    return CellStats(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan, len(values))


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


def delta_m_by_row(records: Sequence[Mapping[str, Any]], summary: Mapping[str, Mapping[str, CellStats]], baseline: str,
                   tasks: Sequence[TaskSpec], split: str = "val") -> dict[str, CellStats]:
    """row -> mean ± std over seeds of Δm against the ``baseline`` row's means, one Δm per seed of the row (its
    records of that seed, over the tasks the baseline row has). The mean equals the Δm of the row's means; the
    std is the seed spread the issue asks for. NaN where Δm is undefined (no baseline task)."""
    compared = {task: stats.mean for task, stats in summary[baseline].items() if not math.isnan(stats.mean)}
    deltas = {}
    for row in summary:
        if row == baseline:
            continue
        by_seed: dict[Any, dict[str, float]] = {}
        for record in (r for r in records if r["row"] == row):
            metrics = by_seed.setdefault(record.get("seed"), {})
            for task in tasks:
                value = record.get(f"{split}/{task.name}/{task.metric}")
                if value is not None:
                    metrics[task.name] = value
        values = [delta_m(metrics, compared) for metrics in by_seed.values()
                  if compared and all(task in metrics for task in compared)]
        deltas[row] = mean_and_std(values)
    return deltas


def beyond_seed_spread(cell: CellStats, baseline: CellStats, level: float = SIGNIFICANCE) -> bool:
    """Whether ``cell``'s mean differs from ``baseline``'s by more than their seed spread explains: Welch's t-test
    (unequal variances) on the two rows' seeds, two-sided p < ``level``. False below two seeds in either row (no
    spread to compare with) and where the test is undefined (both spreads 0 and equal means)."""
    if cell.count < 2 or baseline.count < 2 or math.isnan(cell.mean) or math.isnan(baseline.mean):
        return False
    if cell.std == 0 and baseline.std == 0:
        return cell.mean != baseline.mean
    result = scipy_stats.ttest_ind_from_stats(cell.mean, cell.std, cell.count, baseline.mean, baseline.std,
                                              baseline.count, equal_var=False)
    return bool(result.pvalue < level)


# ---------------------------------------------------------------- table and plot


def metric_label(task: TaskSpec) -> str:
    if task.lower_is_better:
        unit = " (years)" if task.kind == "regression" else ""
        return f"{task.name} {task.metric.upper()}{unit} ↓"
    return f"{task.name} {task.metric.replace('_', ' ')} (%) ↑"


def display_scale(task: TaskSpec) -> float:
    """Fractions are shown in percent (as the thesis' tables), errors as they are (years, NME)."""
    return 1.0 if task.lower_is_better else 100.0


def format_cell(stats: CellStats, scale: float) -> str:
    if stats.count == 0 or math.isnan(stats.mean):
        return "–"
    if math.isnan(stats.std):
        return f"{stats.mean * scale:.2f}"
    return f"{stats.mean * scale:.2f} ± {stats.std * scale:.2f}"


def format_table(experiment: str, baseline: str, summary: Mapping[str, Mapping[str, CellStats]],
                 deltas: Mapping[str, CellStats], tasks: Sequence[TaskSpec], chance: Mapping[str, float], seeds: int,
                 split: str = "val", row_labels: Mapping[str, str] | None = None) -> str:
    """The Markdown table: a caption, one column per task, one row per arm row, the chance level, Δm against the
    ``baseline`` row (``deltas``: :func:`delta_m_by_row`). ``row_labels`` shows some rows under another label."""
    seeds_text = "one seed" if seeds == 1 else f"mean ± std (n-1) over {seeds} seeds"
    marks = "" if seeds == 1 else (
        f" {BEYOND_SPREAD_MARK}: differs from the {baseline} row beyond the seed spread (Welch's t-test over seeds, "
        f"two-sided p < {SIGNIFICANCE:g}, one test per cell, not corrected for their number); an unmarked difference "
        "is not shown to differ.")
    caption = (f"**{experiment}**: {SPLIT_NAMES[split]} split, best epoch of each run (lowest val/total_loss, "
               f"the epoch saved as best_model.pt), {seeds_text}. Δm: mean over tasks of the relative difference "
               f"to the {baseline} row's means, sign-adjusted so that positive is better (Maninis et al. 2019), "
               "one per seed."
               f"{marks}")
    header = ["model", *(metric_label(task) for task in tasks), f"Δm vs {baseline} (%) ↑"]
    lines = [caption, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, by_task in summary.items():
        marked = {task.name for task in tasks
                  if row != baseline and beyond_seed_spread(by_task[task.name], summary[baseline][task.name])}
        cells = [format_cell(by_task[task.name], display_scale(task))
                 + (f" {BEYOND_SPREAD_MARK}" if task.name in marked else "") for task in tasks]
        if row == baseline:
            delta = "ref."
        elif math.isnan(deltas[row].mean):
            delta = "–"
        else:
            spread = "" if math.isnan(deltas[row].std) else f" ± {deltas[row].std:.2f}"
            delta = f"{deltas[row].mean:+.2f}{spread}"
        lines.append("| " + " | ".join([(row_labels or {}).get(row, row), *cells, delta]) + " |")
    chance_cells = [format_cell(CellStats(chance[task.name], math.nan, 1), display_scale(task)) for task in tasks]
    lines.append("| " + " | ".join(["chance", *chance_cells, ""]) + " |")
    return "\n".join(lines) + "\n"


def plot_comparison(summary: Mapping[str, Mapping[str, CellStats]], tasks: Sequence[TaskSpec],
                    chance: Mapping[str, float], baseline: str, title: str, path: Path) -> Path:
    """One bar chart per task, one bar per row with the std over seeds as error bar, chance as a dashed line."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = list(summary)
    if len(tasks) > PLOTTED_TASKS_MAX:
        with_baseline = [task for task in tasks if summary[baseline][task.name].count]
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


# ---------------------------------------------------------------- the files, one set per split


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
