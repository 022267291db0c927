"""``python -m tune.report SEARCH_DIR``: a static HTML report of a hyperparameter search, readable offline.

    python -m tune.report runs/search                          # runs/search/report/index.html + PNGs beside it
    python -m tune.report runs/search --out /tmp/r/search.html --top 5

The report shows a leaderboard (one row per trial, best objective first, each task's main validation
metric at the trial's best epoch), learning curves (objective and validation loss per trial), every
hyperparameter against the objective (scatter plots and parallel coordinates), and, for the best trials,
the learned loss weights across epochs with the Early Freeze events marked. It reads only the files
``tune.search`` writes (``trials.parquet``, ``config.yaml``, ``space.yaml``, ``best_config.yaml`` and each
trial's ``train/metrics.parquet``); the plots are PNGs next to the HTML file, referenced by relative path.

Three layers, each testable alone: pure functions from the search's tables to rows and curves, plotting
(matplotlib's Agg canvas, no pyplot state), and HTML rendering (every text escaped).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from pipeline.run_records import CONFIG_FILE, METRICS_FILE
from pipeline.config import declared_tasks_of, load_config_dict
from pipeline.schema import declare_tasks, get_task, known_tasks
from tune.objective import OBJECTIVE
from tune.results import BEST_CONFIG_FILE, SPACE_FILE, TRIAL_RUN_NAME, TRIALS_FILE
from tune.space import CONFIG_KEYS

REPORT_DIR = "report"
REPORT_FILE = "index.html"
LOG_SCALED = ("lr", "lam")  # sampled log-uniform by tune.space
VAL_LOSS = "val/total_loss"
FREEZE_EVENTS = "freeze/events"
WEIGHTS_PREFIX = "weights/"
COMPLETED = "completed"
STOPPED_EARLY = "stopped early"
BEST_OBJECTIVE = "best_objective"


class NotASearchError(Exception):
    """The folder lacks what ``tune.search`` writes, or holds no trial."""


# --- Reading the search folder ------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchRecords:
    """What a search folder holds that the report needs."""

    search_dir: Path
    max_epochs: int
    space: dict[str, Any]
    trials: pa.Table  # trials.parquet: one row per trial and epoch
    best_config: Path | None  # None while the search runs

    def trial_metrics_path(self, trial_id: str) -> Path:
        return self.search_dir / trial_id / TRIAL_RUN_NAME / METRICS_FILE


def read_search(search_dir: Path) -> SearchRecords:
    """The search's tables and configs; :class:`NotASearchError` naming the missing file otherwise."""
    trials_path, config_path = search_dir / TRIALS_FILE, search_dir / CONFIG_FILE
    for required in (trials_path, config_path):
        if not required.is_file():
            raise NotASearchError(f"{required} not found: {search_dir} is not a tune.search folder (or not finished)")
    trials = pq.read_table(trials_path)
    if trials.num_rows == 0:
        raise NotASearchError(f"{trials_path} holds no trial")
    max_epochs = yaml.safe_load(config_path.read_text()).get("max_epochs")
    if not isinstance(max_epochs, int):
        raise NotASearchError(f"{config_path}: expected an integer max_epochs, got {max_epochs!r}")
    space_path, best_path = search_dir / SPACE_FILE, search_dir / BEST_CONFIG_FILE
    space = yaml.safe_load(space_path.read_text()) if space_path.is_file() else {}
    return SearchRecords(search_dir, max_epochs, space or {}, trials, best_path if best_path.is_file() else None)


def read_trial_epochs(records: SearchRecords, trial_id: str) -> tuple[list[dict[str, Any]], Path | None]:
    """A trial's epochs from its ``train/metrics.parquet`` (with freeze events), and that file.

    Without the file (a trial folder removed or copied without it) the trial's rows of trials.parquet
    stand in: they hold the loss weights but not the freeze events, and the path returned is None.
    """
    path = records.trial_metrics_path(trial_id)
    if path.is_file():
        return pq.read_table(path).to_pylist(), path
    return epochs_by_trial(records.trials)[trial_id], None


# --- Pure data: rows and curves from the tables -------------------------------------------------------


def hyperparameter_names(columns: Sequence[str]) -> list[str]:
    """The sampled hyperparameters present in trials.parquet, in the space's order."""
    return [name for name in CONFIG_KEYS if name in columns]


def task_metric_column(task: str) -> str:
    """A task's main validation metric: ``val/age/mae`` for age, ``val/<task>/accuracy`` for the others."""
    return f"val/{task}/{get_task(task).metric}"


def lower_is_better(task: str) -> bool:
    return get_task(task).lower_is_better


def validated_tasks(columns: Sequence[str]) -> list[str]:
    """The tasks whose main metric is a column, in the registry's order."""
    return [task for task in known_tasks() if task_metric_column(task) in columns]


def declare_search_tasks(search_dir: Path) -> None:
    """The declared tasks of a search (its config's data.tasks_file and shards), where they are readable here."""
    config_path = search_dir / CONFIG_FILE
    if config_path.is_file():
        declared, _ = declared_tasks_of(load_config_dict(yaml.safe_load(config_path.read_text())).data)
        declare_tasks(declared, f"{config_path}'s data.tasks_file and datasets")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def epochs_by_trial(trials: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """Each trial's rows, in epoch order."""
    rows_by_trial: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in trials.to_pylist():
        rows_by_trial[row["trial_id"]].append(row)
    return {trial_id: sorted(rows, key=lambda row: row["epoch"]) for trial_id, rows in rows_by_trial.items()}


def best_epoch_row(epochs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch with the highest objective, the earliest of equals; a missing or NaN objective never wins."""
    scored = [row for row in epochs if is_number(row.get(OBJECTIVE))]
    return max(scored, key=lambda row: (row[OBJECTIVE], -row["epoch"]), default=None)


def trial_status(epochs_run: int, max_epochs: int) -> str:
    return STOPPED_EARLY if epochs_run < max_epochs else COMPLETED


def leaderboard_rows(trials: pa.Table, max_epochs: int) -> list[dict[str, Any]]:
    """One row per trial, highest best objective first (ties by trial id).

    Keys: trial_id, the hyperparameters, best_objective, best_epoch, epochs_run, status and each task's
    main metric column (``val/<task>/<metric>``) at the best epoch; None where a trial has no objective.
    """
    hyperparameters = hyperparameter_names(trials.column_names)
    metric_columns = [task_metric_column(task) for task in validated_tasks(trials.column_names)]
    rows = []
    for trial_id, epochs in epochs_by_trial(trials).items():
        best = best_epoch_row(epochs) or {}
        rows.append({
            "trial_id": trial_id,
            **{name: epochs[0][name] for name in hyperparameters},
            BEST_OBJECTIVE: best.get(OBJECTIVE),
            "best_epoch": best.get("epoch"),
            "epochs_run": len(epochs),
            "status": trial_status(len(epochs), max_epochs),
            **{column: best.get(column) for column in metric_columns},
        })
    no_objective = -math.inf
    return sorted(rows, key=lambda row: (-(row[BEST_OBJECTIVE] if row[BEST_OBJECTIVE] is not None else no_objective),
                                         row["trial_id"]))


Curve = list[tuple[int, float]]  # (epoch, value)


def curve_of(epochs: list[dict[str, Any]], column: str) -> Curve:
    """(epoch, value) of one column over a trial's epochs, leaving out epochs without a finite value."""
    return [(row["epoch"], row[column]) for row in epochs if is_number(row.get(column))]


def curves_by_trial(trials: pa.Table, column: str, trial_order: Sequence[str]) -> dict[str, Curve]:
    """One curve of ``column`` per trial, in ``trial_order``; empty when the column is absent."""
    if column not in trials.column_names:
        return {}
    epochs = epochs_by_trial(trials)
    return {trial_id: curve_of(epochs[trial_id], column) for trial_id in trial_order}


def loss_weight_curves(epochs: list[dict[str, Any]]) -> dict[str, Curve]:
    """The learned loss weight of each task (``weights/<task>``) across a trial's epochs."""
    columns = [key for key in (epochs[0] if epochs else {}) if key.startswith(WEIGHTS_PREFIX)]
    return {column[len(WEIGHTS_PREFIX):]: curve_of(epochs, column) for column in columns}


@dataclass(frozen=True)
class FreezeEvent:
    epoch: int  # the epoch whose validation led to the decision
    text: str  # as the training loop wrote it, e.g. "freeze_trunk:gender@1->0"


def freeze_events(epochs: list[dict[str, Any]]) -> list[FreezeEvent]:
    """The Early Freeze events of a trial, from the JSON list each epoch stores in ``freeze/events``."""
    events = []
    for row in epochs:
        value = row.get(FREEZE_EVENTS)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = [value]  # not written by pipeline.run_records: shown as it is
        events.extend(FreezeEvent(row["epoch"], str(text)) for text in value or [])
    return events


def events_by_epoch(events: Sequence[FreezeEvent]) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = defaultdict(list)
    for event in events:
        grouped[event.epoch].append(event.text)
    return dict(grouped)


def uses_log_axis(name: str, values: Sequence[Any]) -> bool:
    """lr and λ are sampled log-uniform; a grid with λ = 0 falls back to a linear axis."""
    return name in LOG_SCALED and all(is_number(value) and value > 0 for value in values)


@dataclass(frozen=True)
class ParallelAxis:
    """One vertical axis of the parallel-coordinates plot, mapping its values onto [0, 1]."""

    name: str
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    categories: tuple[str, ...] = ()  # non-empty: a categorical axis (weighting)

    def position(self, value: Any) -> float:
        if self.categories:
            return self.categories.index(str(value)) / max(1, len(self.categories) - 1)
        if not is_number(value):
            return math.nan
        scale = math.log10 if self.log else float
        low, high, value = scale(self.low), scale(self.high), scale(value)
        return 0.5 if high == low else (value - low) / (high - low)


def parallel_axes(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> list[ParallelAxis]:
    """An axis per name over the leaderboard rows: categorical for text values, log for lr and λ."""
    axes = []
    for name in names:
        values = [row[name] for row in rows if row[name] is not None]
        if any(isinstance(value, str) for value in values):
            axes.append(ParallelAxis(name, categories=tuple(sorted({str(value) for value in values}))))
            continue
        numbers = [value for value in values if is_number(value)] or [0.0]
        axes.append(ParallelAxis(name, min(numbers), max(numbers), uses_log_axis(name, numbers)))
    return axes


# --- Plots (matplotlib's Agg canvas: no display, no pyplot state) -------------------------------------


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure, path: Path) -> Path:
    figure.savefig(path, format="png")
    return path


def trial_colours(trial_ids: Sequence[str]) -> dict[str, str]:
    """A colour per trial, the same in every plot and in the leaderboard (repeats after 20 trials)."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    palette = colormaps["tab20" if len(trial_ids) > 10 else "tab10"]
    return {trial_id: to_hex(palette(index % palette.N)) for index, trial_id in enumerate(trial_ids)}


def spans_decades(curves: dict[str, Curve], decades: float = 2.0) -> bool:
    """Positive values spread over more than ``decades`` orders of magnitude (a diverged trial): log scale."""
    values = [value for curve in curves.values() for _, value in curve]
    return bool(values) and min(values) > 0 and math.log10(max(values) / min(values)) > decades


def plot_trial_curves(curves: dict[str, Curve], colours: dict[str, str], ylabel: str, path: Path) -> Path:
    """One line per trial (markers, so that a one-epoch trial shows), legend in leaderboard order."""
    from matplotlib.ticker import MaxNLocator

    figure = new_figure(9, 4.2)
    axes = figure.add_subplot()
    for trial_id, curve in curves.items():
        if curve:
            axes.plot(*zip(*curve), marker="o", markersize=4, color=colours[trial_id], label=trial_id)
    if spans_decades(curves):
        axes.set_yscale("log")
    axes.set(xlabel="epoch", ylabel=ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if 0 < len(curves) <= 20:
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(figure, path)


def objective_colour_scale(rows: Sequence[dict[str, Any]]):
    from matplotlib import colormaps
    from matplotlib.colors import Normalize

    objectives = [row[BEST_OBJECTIVE] for row in rows if is_number(row[BEST_OBJECTIVE])] or [0.0]
    return colormaps["viridis"], Normalize(min(objectives), max(objectives))


def plot_hyperparameter_scatter(rows: Sequence[dict[str, Any]], names: Sequence[str], path: Path) -> Path:
    """A panel per hyperparameter: its value against the trial's best objective, coloured by the objective."""
    from matplotlib.cm import ScalarMappable

    colour_map, norm = objective_colour_scale(rows)
    scored = [row for row in rows if is_number(row[BEST_OBJECTIVE])]
    objectives = [row[BEST_OBJECTIVE] for row in scored]
    figure = new_figure(3.6 * len(names) + 1.2, 3.6)
    panels = figure.subplots(1, len(names), sharey=True, squeeze=False)[0]
    for panel, axis in zip(panels, parallel_axes(scored, names)):
        values = [row[axis.name] for row in scored]
        if axis.categories:
            positions = [axis.categories.index(str(value)) for value in values]
            panel.set_xticks(range(len(axis.categories)), axis.categories)
            panel.set_xlim(-0.5, len(axis.categories) - 0.5)
        else:
            positions = values
            if axis.log:
                panel.set_xscale("log")
        panel.scatter(positions, objectives, c=objectives, cmap=colour_map, norm=norm, s=50,
                      edgecolors="black", linewidths=0.5)
        panel.set_xlabel(axis.name + (" (log)" if axis.log else ""))
        panel.grid(alpha=0.3)
    panels[0].set_ylabel("best objective")
    figure.colorbar(ScalarMappable(norm=norm, cmap=colour_map), ax=list(panels), label="best objective")
    return save_figure(figure, path)


def format_value(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def plot_parallel_coordinates(rows: Sequence[dict[str, Any]], names: Sequence[str], path: Path) -> Path:
    """A line per trial across normalised axes (the hyperparameters, then the best objective), coloured by it."""
    from matplotlib.cm import ScalarMappable

    colour_map, norm = objective_colour_scale(rows)
    axes_spec = parallel_axes(rows, [*names, BEST_OBJECTIVE])
    figure = new_figure(9, 4.2)
    axes = figure.add_subplot()
    # Worst first, so that the best trials are drawn on top.
    for row in sorted(rows, key=lambda row: row[BEST_OBJECTIVE] if is_number(row[BEST_OBJECTIVE]) else -math.inf):
        colour = colour_map(norm(row[BEST_OBJECTIVE])) if is_number(row[BEST_OBJECTIVE]) else "lightgrey"
        axes.plot(range(len(axes_spec)), [axis.position(row[axis.name]) for axis in axes_spec],
                  color=colour, marker="o", linewidth=2, alpha=0.85)
    for index, axis in enumerate(axes_spec):
        axes.axvline(index, color="black", linewidth=0.8)
        for position, label in parallel_axis_ticks(axis):
            axes.annotate(label, (index, position), xytext=(4, 0), textcoords="offset points", fontsize=8, va="center")
    axes.set_xticks(range(len(axes_spec)),
                    [axis.name.replace("_", " ") + (" (log)" if axis.log else "") for axis in axes_spec])
    axes.set(xlim=(-0.1, len(axes_spec) - 0.6), ylim=(-0.05, 1.05), yticks=[])
    for side in ("top", "right", "left"):
        axes.spines[side].set_visible(False)
    figure.colorbar(ScalarMappable(norm=norm, cmap=colour_map), ax=axes, label="best objective")
    return save_figure(figure, path)


def parallel_axis_ticks(axis: ParallelAxis) -> list[tuple[float, str]]:
    """Where to label an axis: each category, or its lowest and highest value."""
    if axis.categories:
        return [(axis.position(category), category) for category in axis.categories]
    if axis.low == axis.high:
        return [(0.5, format_value(axis.low))]
    return [(0.0, format_value(axis.low)), (1.0, format_value(axis.high))]


def plot_loss_weights(curves: dict[str, Curve], events: Sequence[FreezeEvent], title: str, path: Path) -> Path:
    """A line per task's learned loss weight; each epoch with freeze events a labelled dashed line."""
    from matplotlib.ticker import MaxNLocator

    figure = new_figure(9, 3.8)
    axes = figure.add_subplot()
    for task, curve in curves.items():
        if curve:
            axes.plot(*zip(*curve), marker="o", markersize=4, label=task)
    epochs = [epoch for curve in curves.values() for epoch, _ in curve] or [0]
    middle = (min(epochs) + max(epochs)) / 2
    for epoch, texts in events_by_epoch(events).items():
        axes.axvline(epoch, color="crimson", linestyle="--", linewidth=1)
        # Labels in the right half read leftwards, so that they stay inside the axes.
        right_half = epoch > middle
        axes.annotate("\n".join(texts), (epoch, 1), xycoords=("data", "axes fraction"),
                      xytext=(-3 if right_half else 3, -3), textcoords="offset points",
                      ha="right" if right_half else "left", va="top", fontsize=8,
                      color="crimson", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none", "pad": 1})
    axes.set(xlabel="epoch", ylabel="loss weight", title=title)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save_figure(figure, path)


# --- HTML ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialWeightsSection:
    """One of the best trials: its loss-weight plot and freeze events."""

    trial_id: str
    image: str  # file name, next to the HTML
    events: list[FreezeEvent]
    metrics_path: Path | None  # None: no metrics.parquet, so no freeze events known


@dataclass(frozen=True)
class ReportPage:
    """Everything the HTML shows; plots are file names relative to the HTML file."""

    name: str
    search_dir: Path
    space_text: str
    max_epochs: int
    best_config: Path | None
    rows: list[dict[str, Any]]
    tasks: list[str]
    hyperparameters: list[str]
    colours: dict[str, str]
    plots: dict[str, str]  # caption -> file name
    best_trials: list[TrialWeightsSection] = field(default_factory=list)


STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; color: #1f2328; background: #fff;
       max-width: 1220px; margin: 24px auto; padding: 0 20px; line-height: 1.45; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 36px; border-bottom: 1px solid #d8dee4; }
h3 { font-size: 16px; margin-bottom: 4px; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0; }
th, td { padding: 5px 8px; text-align: right; border-bottom: 1px solid #e4e7eb; white-space: nowrap; }
th { background: #f3f5f7; white-space: normal; vertical-align: bottom; }
.scroll { overflow-x: auto; } tbody tr:nth-child(even) { background: #fafbfc; }
td.text, th.text { text-align: left; }
tr.best td { font-weight: 600; } td.stopped { color: #9a6700; } td.completed { color: #1a7f37; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.meta th, .meta td { text-align: left; border: none; background: none; padding: 2px 12px 2px 0; }
pre, code { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; }
pre { background: #f6f8fa; padding: 8px 12px; border-radius: 6px; margin: 4px 0; }
figure { margin: 12px 0 20px; } figcaption { color: #57606a; font-size: 14px; }
img { max-width: 100%; border: 1px solid #e4e7eb; border-radius: 4px; }
.note { color: #57606a; font-size: 13px; }
"""


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def metric_header(task: str) -> str:
    return f"{task} {get_task(task).metric} {'↓' if lower_is_better(task) else '↑'}"


def leaderboard_html(page: ReportPage) -> str:
    headers = ["trial", *page.hyperparameters, "best objective", "best epoch", "epochs run", "status",
               *(metric_header(task) for task in page.tasks)]
    head = "".join(f'<th class="text">{escape(h)}</th>' if h in ("trial", "status", "weighting")
                   else f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for rank, row in enumerate(page.rows):
        swatch = f'<span class="swatch" style="background:{escape(page.colours[row["trial_id"]])}"></span>'
        cells = [f'<td class="text">{swatch}<code>{escape(row["trial_id"])}</code></td>']
        cells += [f'<td class="{"text" if name == "weighting" else ""}">{escape(format_value(row[name]))}</td>'
                  for name in page.hyperparameters]
        status_class = "stopped" if row["status"] == STOPPED_EARLY else "completed"
        cells += [f"<td>{escape(format_value(row[BEST_OBJECTIVE], 4))}</td>",
                  f"<td>{escape(format_value(row['best_epoch']))}</td>",
                  f"<td>{escape(row['epochs_run'])} / {escape(page.max_epochs)}</td>",
                  f'<td class="text {status_class}">{escape(row["status"])}</td>']
        cells += [f"<td>{escape(format_value(row[task_metric_column(task)], 4))}</td>" for task in page.tasks]
        body.append(f'<tr class="{"best" if rank == 0 else ""}">{"".join(cells)}</tr>')
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def figure_html(image: str, caption: str) -> str:
    return (f'<figure><img src="{escape(image)}" alt="{escape(caption)}">'
            f'<figcaption>{escape(caption)}</figcaption></figure>')


def best_trial_html(section: TrialWeightsSection) -> str:
    caption = f"learned loss weight per task, trial {section.trial_id}; dashed lines: freeze events"
    parts = [f"<h3>Trial <code>{escape(section.trial_id)}</code></h3>", figure_html(section.image, caption)]
    if section.metrics_path is None:
        parts.append(f'<p class="note">No {escape(METRICS_FILE)} for this trial: weights from {escape(TRIALS_FILE)}, '
                     "freeze events unknown.</p>")
    elif not section.events:
        parts.append('<p class="note">No freeze event in this trial.</p>')
    else:
        rows = "".join(f"<tr><td>{escape(event.epoch)}</td>"
                       f"<td class=\"text\"><code>{escape(event.text)}</code></td></tr>"
                       for event in section.events)
        head = '<tr><th>epoch</th><th class="text">freeze event</th></tr>'
        parts.append(f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>")
    return "\n".join(parts)


def header_html(page: ReportPage) -> str:
    if page.best_config is None:
        best = f'<td class="note">{escape(BEST_CONFIG_FILE)} not written yet (search still running?)</td>'
        command = ""
    else:
        best = f"<td><code>{escape(page.best_config)}</code></td>"
        command = (f"<tr><th>train it</th><td><code>python -m pipeline.train --config {escape(page.best_config)}</code>"
                   "</td></tr>")
    completed = sum(row["status"] == COMPLETED for row in page.rows)
    trials = (f"{len(page.rows)} ({completed} completed all {page.max_epochs} epochs, "
              f"{len(page.rows) - completed} stopped early)")
    return f"""<h1>Search {escape(page.name)}</h1>
<table class="meta">
<tr><th>folder</th><td><code>{escape(page.search_dir)}</code></td></tr>
<tr><th>trials</th><td>{escape(trials)}</td></tr>
<tr><th>best config</th>{best}</tr>
{command}
</table>
<h3>Search space</h3>
<pre>{escape(page.space_text)}</pre>"""


def render_report(page: ReportPage) -> str:
    """The whole HTML document; every text from the search is escaped."""
    plots = "\n".join(figure_html(image, caption) for caption, image in page.plots.items())
    best_trials = "\n".join(best_trial_html(section) for section in page.best_trials)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Search {escape(page.name)}</title>
<style>{STYLE}</style></head>
<body>
{header_html(page)}
<h2>Leaderboard</h2>
<p class="note">Best objective: the highest over a trial's epochs (mean normalised score of the tasks, higher is
better); the task metrics are those of that epoch. Epochs count from 0.</p>
{leaderboard_html(page)}
<h2>Learning curves and hyperparameters</h2>
{plots}
<h2>Loss weights of the best {len(page.best_trials)} trial(s)</h2>
{best_trials}
</body></html>
"""


# --- The command --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReportOptions:
    search_dir: Path
    out: Path  # the HTML file; the PNGs go next to it
    top: int = 3


def image_name(prefix: str, trial_id: str) -> str:
    """A file name for a trial's plot; anything but letters, digits, '.', '_' and '-' becomes '_'."""
    return f"{prefix}_{re.sub(r'[^A-Za-z0-9_.-]', '_', trial_id)}.png"


def write_report(options: ReportOptions) -> Path:
    """Read the search, draw the plots and write the HTML; returns the HTML file."""
    records = read_search(options.search_dir)
    out_dir = options.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = leaderboard_rows(records.trials, records.max_epochs)
    trial_order = [row["trial_id"] for row in rows]
    hyperparameters = hyperparameter_names(records.trials.column_names)
    colours = trial_colours(trial_order)

    plots = {
        "objective per epoch, one line per trial": plot_trial_curves(
            curves_by_trial(records.trials, OBJECTIVE, trial_order), colours, "objective", out_dir / "objective.png"),
        "validation loss (val/total_loss) per epoch": plot_trial_curves(
            curves_by_trial(records.trials, VAL_LOSS, trial_order), colours, "validation loss",
            out_dir / "val_loss.png"),
    }
    if hyperparameters:
        plots["each hyperparameter against the trial's best objective"] = plot_hyperparameter_scatter(
            rows, hyperparameters, out_dir / "hyperparameters.png")
        plots["parallel coordinates: one line per trial, axes normalised, coloured by best objective"] = (
            plot_parallel_coordinates(rows, hyperparameters, out_dir / "parallel_coordinates.png"))

    best_trials = []
    for trial_id in trial_order[:options.top]:
        epochs, metrics_path = read_trial_epochs(records, trial_id)
        events = freeze_events(epochs)
        image = plot_loss_weights(loss_weight_curves(epochs), events, f"trial {trial_id}",
                                  out_dir / image_name("weights", trial_id))
        best_trials.append(TrialWeightsSection(trial_id, image.name, events, metrics_path))

    page = ReportPage(
        name=records.search_dir.name, search_dir=records.search_dir, max_epochs=records.max_epochs,
        space_text=yaml.safe_dump(records.space, sort_keys=False, default_flow_style=None),
        best_config=records.best_config, rows=rows,
        tasks=validated_tasks(records.trials.column_names), hyperparameters=hyperparameters, colours=colours,
        plots={caption: path.name for caption, path in plots.items()}, best_trials=best_trials,
    )
    options.out.write_text(render_report(page), encoding="utf-8")
    return options.out


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tune.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("search_dir", type=Path, help="a tune.search folder (holds trials.parquet)")
    parser.add_argument("--out", type=Path,
                        help=f"the HTML file (default: SEARCH_DIR/{REPORT_DIR}/{REPORT_FILE}); PNGs go beside it")
    parser.add_argument("--top", type=positive_int, default=3, help="best trials whose loss weights are shown")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    search_dir = args.search_dir.resolve()
    options = ReportOptions(search_dir, (args.out or search_dir / REPORT_DIR / REPORT_FILE).resolve(), args.top)
    started = time.perf_counter()
    print(f"report of search {search_dir}", flush=True)
    try:
        declare_search_tasks(search_dir)
        out = write_report(options)
    except NotASearchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"written in {time.perf_counter() - started:.1f} s (plots beside it):")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
