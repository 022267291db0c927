"""Where an experiment stands (``--status``), read from its run folders without training or changing anything:
each arm x seed's state, the epochs left with a time estimate, and the validation table of the runs finished so far.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import TrainConfig
from pipeline.experiment_arms import arm_name_of
from pipeline.experiment_invocations import recorded_links
from pipeline.experiment_reuse import finished_same_runs, read_saved_config, sibling_in_training
from pipeline.experiment_runs import read_rows, run_is_finished, trained_seconds
from pipeline.run_claims import claim_holder, describe_holder


@dataclass(frozen=True)
class RunState:
    """One arm x seed as its run folder (or the finished run it would reuse) shows it."""

    name: str
    max_epochs: int
    epochs_done: int
    finished: bool
    seconds: float  # the epochs' own seconds (metrics.parquet's epoch_seconds), summed
    reuses: str | None = None  # the sibling experiment's run it links to, or would link to when run
    run_dir: Path | None = None  # where its records are: its own folder or the reused run; None when not started
    training_by: str | None = None  # the process that holds its claim (pipeline.run_claims) and trains it now
    by_config: bool = False  # training_by holds the claim on its config: another experiment trains that run
    trainer: tuple[Any, Any] | None = None  # training_by's (pid, host): one process may hold several claims

    @property
    def arm(self) -> str:
        """The arm this run is a seed of: its name without ``-seed<k>``."""
        return arm_name_of(self.name)

    def describe(self) -> str:
        reused = f" = {self.reuses}" if self.reuses else ""
        if self.finished:
            return f"finished{reused} ({self.epochs_done} epoch(s), {self.seconds / 60:.1f} min)"
        if self.training_by:
            where = f" as {self.reuses}" if self.reuses else ""  # a sibling experiment's run this arm waits for
            config = " (a run of this config)" if self.by_config else ""
            return f"{self.epochs_done} of {self.max_epochs} epochs{where}, in training by {self.training_by}{config}"
        if self.epochs_done:
            return f"{self.epochs_done} of {self.max_epochs} epochs, resumes from its last checkpoint"
        return "not started"


def run_state(config: TrainConfig, experiment_dir: Path, siblings: Mapping[Path, Mapping[str, Any]] | None,
              ) -> RunState:
    """The state of ``config``'s run. ``siblings`` (run folder -> saved config of the other experiments' runs, or
    None without reuse) decides which finished run an arm without a folder would link to."""
    run_dir, reuses = config.run_dir, None
    if run_dir.is_symlink() and recorded_links(experiment_dir).get(run_dir.name) == os.readlink(run_dir):
        reuses = os.readlink(run_dir)  # a link the user made is a run folder like any other
    elif not run_dir.exists() and siblings is not None:
        matches = finished_same_runs(config, siblings)
        if matches:
            run_dir = matches[0]
            reuses = os.path.relpath(run_dir, experiment_dir.resolve()) + " (when run)"
        elif (training := sibling_in_training(config, experiment_dir, siblings)) is not None:
            where, holder = training
            rows = read_rows(where) if where is not None else []
            return RunState(config.run_dir.name, config.max_epochs, len(rows), False, trained_seconds(rows),
                            None if where is None else os.path.relpath(where, experiment_dir.resolve()), None,
                            describe_holder(holder), by_config=True, trainer=process_of(holder))
    rows = read_rows(run_dir) if run_dir.exists() and read_saved_config(run_dir) is not None else []
    seconds = trained_seconds(rows)
    finished = run_is_finished(rows, config.max_epochs)
    holder = None if finished or reuses else claim_holder(config.run_dir)
    return RunState(config.run_dir.name, config.max_epochs, len(rows), finished, seconds, reuses,
                    run_dir if rows else None, None if holder is None else describe_holder(holder),
                    trainer=None if holder is None else process_of(holder))


def process_of(holder: Mapping[str, Any]) -> tuple[Any, Any]:
    return holder.get("pid"), holder.get("host")


def epochs_left_line(states: Sequence[RunState]) -> str:
    """How many runs are finished, and the epochs left at most with the time they may take, each run's epochs at
    its arm's seconds per epoch so far (a gradient-level weighting's epoch costs several of a loss-level one's);
    an arm with no epoch trained yet is counted at the mean of the others, which the line says. Where several
    processes train now, the hours they share are said too."""
    finished = sum(state.finished for state in states)
    partial = sum(not state.finished and state.epochs_done > 0 and not state.training_by for state in states)
    training = sum(state.training_by is not None for state in states)
    left = sum(state.max_epochs - state.epochs_done for state in states if not state.finished)
    line = f"{finished} of {len(states)} run(s) finished, {partial} partly trained"
    line += f", {training} in training now" if training else ""
    line += f"; at most {left} epoch(s) left"
    rates = arm_seconds_per_epoch(states)
    if not left or not rates:
        return line
    mean = mean_seconds_per_epoch(states)
    unfinished = [state for state in states if not state.finished]
    seconds_by_run = [(state.max_epochs - state.epochs_done) * rates.get(state.arm, mean) for state in unfinished]
    seconds = sum(seconds_by_run)
    processes = len({state.trainer for state in unfinished if state.trainer})
    line += f", about {seconds / 3600:.1f} h"
    if processes > 1:  # the epochs were timed as they trained, beside each other; a run is not shared out
        shared = max(seconds / processes, *(left for state, left in zip(unfinished, seconds_by_run) if state.trainer))
        line += f" of one process ({shared / 3600:.1f} h while the {processes} training now go on)"
    line += " at "
    fastest, slowest = min(rates.values()) / 60, max(rates.values()) / 60
    if len(rates) == 1:
        line += f"this experiment's {mean / 60:.1f} min per epoch so far"
    else:
        spread = f"{fastest:.1f}" if f"{fastest:.1f}" == f"{slowest:.1f}" else f"{fastest:.1f}-{slowest:.1f}"
        line += f"each arm's own min per epoch so far ({spread})"
    unmeasured = list(dict.fromkeys(state.arm for state in unfinished if state.arm not in rates))
    if unmeasured:
        line += (f"; {len(unmeasured)} arm(s) not measured yet ({', '.join(unmeasured)}) at the mean, "
                 f"{mean / 60:.1f} min per epoch, an underestimate if they are slower")
    return line


def trained_here(states: Sequence[RunState]) -> list[RunState]:
    """The runs whose epochs measure this experiment's pace: those trained in its folders and those of its configs
    in training elsewhere now, not finished runs it reuses (trained before, perhaps on another machine)."""
    return [state for state in states
            if state.epochs_done and state.seconds > 0 and (not state.reuses or state.training_by)]


def arm_seconds_per_epoch(states: Sequence[RunState]) -> dict[str, float]:
    """Arm -> the seconds per epoch of its epochs trained here, for the arms with any."""
    totals: dict[str, list[float]] = {}
    for state in trained_here(states):
        total = totals.setdefault(state.arm, [0.0, 0.0])
        total[0] += state.seconds
        total[1] += state.epochs_done
    return {arm: seconds / epochs for arm, (seconds, epochs) in totals.items()}


def mean_seconds_per_epoch(states: Sequence[RunState]) -> float:
    """The seconds per epoch of every epoch trained here, all arms together."""
    trained = trained_here(states)
    return sum(state.seconds for state in trained) / sum(state.epochs_done for state in trained)


def format_status(experiment: str, experiment_dir: Path, states: Sequence[RunState]) -> str:
    """One line per arm x seed, then the line of what is left."""
    width = max(len(state.name) for state in states)
    lines = [f"experiment {experiment} in {experiment_dir}:"]
    lines += [f"  {state.name:<{width}}  {state.describe()}" for state in states]
    lines.append(epochs_left_line(states))
    return "\n".join(lines)


def partial_row_labels(records: Sequence[Mapping[str, Any]], arm_rows: Sequence[str], seeds: int) -> dict[str, str]:
    """Row -> its label in a table of the finished runs only (``arm_rows``: each arm's row, so a row may have several
    arms, as mtl-vs-single's single-task row does): "row (k of N seeds)", or "(k of N runs)" for a row of several
    arms, where some are missing."""
    labels = {}
    for row in dict.fromkeys(arm_rows):
        arms = arm_rows.count(row)
        done, expected = sum(record["row"] == row for record in records), arms * seeds
        unit = "seed" if arms == 1 else "run"
        labels[row] = row if done == expected else f"{row} ({done} of {expected} {unit}{'s' if expected > 1 else ''})"
    return labels
