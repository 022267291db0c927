"""``pipeline.experiments --status``: each arm x seed's state read from its run folder, and what is left."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import load_config, save_config
from pipeline.experiment_reuse import sibling_run_configs
from pipeline.experiment_status import RunState, epochs_left_line, format_status, partial_row_labels, run_state
from pipeline.experiment_tables import delta_m_by_row, format_table, summarize
from pipeline.schema import get_task


def arm_config(runs_dir: Path, name: str):
    return load_config(None, [f"runs_dir={runs_dir}", f"name={name}", "max_epochs=10", "data.tasks=[age]"])


def write_run(config, epochs: int, seconds_per_epoch: float = 30.0) -> None:
    """A run folder as pipeline.train leaves it after ``epochs`` epochs: its config and one metrics row each."""
    config.run_dir.mkdir(parents=True)
    save_config(config, config.run_dir / "config.yaml")
    rows = [{"epoch": epoch, "epoch_seconds": seconds_per_epoch, "val/age/loss": 1.0 / (epoch + 1),
             "val/age/mae": 6.0 - epoch * 0.1, "is_best": True, "freeze/frozen_tasks": "[]"} for epoch in range(epochs)]
    pq.write_table(pa.Table.from_pylist(rows), config.run_dir / "metrics.parquet")


def test_not_started_partly_trained_and_finished_runs(tmp_path: Path) -> None:
    experiment = tmp_path / "weighting"
    finished, partial, fresh = (arm_config(experiment, f"{arm}-seed0") for arm in ("equal", "dwa", "rlw"))
    write_run(finished, 10)
    write_run(partial, 3)
    states = [run_state(config, experiment, siblings=None) for config in (finished, partial, fresh)]
    assert [(s.epochs_done, s.finished, s.seconds) for s in states] == [(10, True, 300.0), (3, False, 90.0),
                                                                         (0, False, 0.0)]
    assert [s.describe() for s in states] == ["finished (10 epoch(s), 5.0 min)",
                                              "3 of 10 epochs, resumes from its last checkpoint", "not started"]
    assert states[0].run_dir == finished.run_dir and states[2].run_dir is None
    assert not fresh.run_dir.exists()  # reading a status creates nothing


def test_an_arm_without_a_folder_shows_the_finished_run_it_would_reuse(tmp_path: Path) -> None:
    other = arm_config(tmp_path / "mtl-vs-single", "mtl-seed0")
    write_run(other, 10)
    unfinished_twin = arm_config(tmp_path / "freeze", "early-freeze-seed0")  # same config, 4 epochs: not reused
    write_run(unfinished_twin, 4)
    arm = arm_config(tmp_path / "weighting", "learned-seed0")
    state = run_state(arm, tmp_path / "weighting", sibling_run_configs(tmp_path / "weighting"))
    assert state.reuses == "../mtl-vs-single/mtl-seed0 (when run)" and state.finished
    assert state.run_dir == other.run_dir.resolve() and not arm.run_dir.exists()
    assert not run_state(arm, tmp_path / "weighting", siblings=None).finished  # --no-reuse: it would train


def test_epochs_left_and_the_time_they_may_take() -> None:
    states = [RunState("equal-seed0", 10, 10, True, 1200.0),
              RunState("learned-seed0", 10, 10, True, 9999.0, reuses="../mtl-vs-single/mtl-seed0"),
              RunState("dwa-seed0", 10, 5, False, 600.0), RunState("rlw-seed0", 10, 0, False, 0.0)]
    # dwa's 5 epochs left at its own 2 min, rlw's 10 at the mean of the epochs trained here (1800 s / 15: a reused
    # run's time is another experiment's)
    assert epochs_left_line(states) == (
        "2 of 4 run(s) finished, 1 partly trained; at most 15 epoch(s) left, about 0.5 h at each arm's own min per "
        "epoch so far (2.0); 1 arm(s) not measured yet (rlw) at the mean, 2.0 min per epoch, an underestimate if "
        "they are slower")
    assert epochs_left_line(states[:2]) == "2 of 2 run(s) finished, 0 partly trained; at most 0 epoch(s) left"
    text = format_status("weighting", Path("runs/w"), states)
    assert text.splitlines()[3] == "  dwa-seed0      5 of 10 epochs, resumes from its last checkpoint"


def test_each_arm_left_is_estimated_at_its_own_epochs_cost() -> None:
    states = [RunState("equal-seed0", 10, 10, True, 600.0), RunState("equal-seed1", 10, 0, False, 0.0),
              RunState("pcgrad-seed0", 10, 2, False, 360.0), RunState("pcgrad-seed1", 10, 0, False, 0.0)]
    # equal: 10 epochs at 60 s; pcgrad: 8 + 10 at 180 s = 600 + 3240 s, not 28 epochs at the mean 80 s (0.6 h)
    assert epochs_left_line(states).endswith("about 1.1 h at each arm's own min per epoch so far (1.0-3.0)")
    assert epochs_left_line(states[:2]).endswith("about 0.2 h at this experiment's 1.0 min per epoch so far")


def test_rows_with_fewer_finished_seeds_say_how_many() -> None:
    records = [{"row": "equal", "seed": 0}, {"row": "equal", "seed": 1}, {"row": "dwa", "seed": 0}]
    assert partial_row_labels(records, ["equal", "dwa", "rlw"], 2) == {
        "equal": "equal", "dwa": "dwa (1 of 2 seeds)", "rlw": "rlw (0 of 2 seeds)"}
    # mtl-vs-single: one row for the single-task arms; every seed of one task's arm is not the whole row
    singles = [{"row": "single-task", "seed": seed} for seed in (0, 1)] + [{"row": "MTL", "seed": 0}]
    assert partial_row_labels(singles, ["single-task", "single-task", "MTL"], 2) == {
        "single-task": "single-task (2 of 4 runs)", "MTL": "MTL (1 of 2 seeds)"}


def test_a_table_of_the_finished_runs_labels_the_rows_short_of_seeds() -> None:
    age = get_task("age")
    records = [{"row": "equal", "seed": 0, "val/age/mae": 5.0}, {"row": "equal", "seed": 1, "val/age/mae": 5.2},
               {"row": "dwa", "seed": 0, "val/age/mae": 4.9}]
    summary = summarize(records, ["equal", "dwa"], [age])
    deltas = delta_m_by_row(records, summary, "equal", [age])
    labels = partial_row_labels(records, ["equal", "dwa"], 2)
    table = format_table("weighting", "equal", summary, deltas, [age], {"age": 9.0}, 2, row_labels=labels)
    assert "| dwa (1 of 2 seeds) | 4.90 | +3.92 |" in table and "| equal | 5.10 ± 0.14 | ref. |" in table
    assert "Δm vs equal (%)" in table and "to the equal row's means" in table


def test_a_run_another_process_trains_says_by_whom() -> None:
    state = RunState("dwa-seed0", 10, 3, False, 90.0, training_by="pid 7 on node1 since 2026-12-01 01:00:00")
    assert state.describe() == "3 of 10 epochs, in training by pid 7 on node1 since 2026-12-01 01:00:00"
    assert epochs_left_line([state, RunState("rlw-seed0", 10, 0, False, 0.0)]).startswith(  # one process: no share
        "0 of 2 run(s) finished, 0 partly trained, 1 in training now; at most 17 epoch(s) left, about 0.1 h at")


def test_the_hours_left_are_shared_by_the_processes_training_now() -> None:
    one, two = "pid 7 on node1 since 2026-12-01 01:00:00", "pid 8 on node2 since 2026-12-01 01:05:00"
    states = [RunState("dwa-seed0", 10, 4, False, 480.0, training_by=one, trainer=(7, "node1")),
              RunState("dwa-seed1", 10, 4, False, 480.0, training_by=two, trainer=(8, "node2")),
              RunState("learned-seed0", 10, 2, False, 240.0, reuses="../freeze/early-freeze-seed0",
                       training_by="pid 7 on node1 since 2026-12-01 01:30:00", by_config=True,
                       trainer=(7, "node1")),  # the same process, its config claim taken later
              RunState("dwa-seed2", 10, 0, False, 0.0)]
    # 6 + 6 + 8 + 10 epochs at 2 min: 1.0 h of one process, 0.5 h for the two processes at work
    assert epochs_left_line(states) == (
        "0 of 4 run(s) finished, 0 partly trained, 3 in training now; at most 30 epoch(s) left, about 1.0 h of one "
        "process (0.5 h while the 2 training now go on) at each arm's own min per epoch so far (2.0)")
    uneven = [RunState("dwa-seed0", 10, 9, False, 1080.0, training_by=one, trainer=(7, "node1")),
              RunState("dwa-seed1", 10, 1, False, 120.0, training_by=two, trainer=(8, "node2"))]
    # 1 + 9 epochs: not 5 epochs' time for each process, since one run is never trained by two
    assert "about 0.3 h of one process (0.3 h while the 2 training now go on)" in epochs_left_line(uneven)


def test_a_tables_training_line_sums_the_epochs_and_names_each_runs_cpu(tmp_path: Path) -> None:
    from pipeline.experiment_runs import training_line

    xeon = {"model": "Intel Xeon", "torch_capability": "AVX512", "torch_threads": 1}
    runs = []
    for name, epochs, starts in [("a", 10, [xeon]), ("b", 4, [xeon, {"model": "AMD EPYC", "torch_capability": "AVX2"}]),
                                 ("c", 2, [])]:
        config = arm_config(tmp_path, name)
        write_run(config, epochs, seconds_per_epoch=90.0)
        (config.run_dir / "starts.jsonl").write_text("".join(json.dumps({"cpu": cpu}) + "\n" for cpu in starts))
        runs.append(config.run_dir)
    # 16 epochs x 90 s = 24 min; b was resumed on another machine, c records no CPU (started before it was kept)
    assert training_line(runs) == ("Trained: 3 runs, 0.4 h of epochs in all (3-15 min a run). Intel Xeon (AVX512): "
                                   "2 runs; AMD EPYC (AVX2): 1 run; CPU not recorded: 1 run "
                                   "(a run whose starts name two of these counts under each).")
    assert training_line(runs[::2]).endswith("Intel Xeon (AVX512): 1 run; CPU not recorded: 1 run.")
    assert training_line([]) == ""
