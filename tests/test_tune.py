"""Hyperparameter search: the space is checked before anything starts; a real ASHA search on Ray Tune."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.provenance import read_starts
from pipeline.train import main as train_main
from tune.objective import load_baselines, search_objective, tune_result
from tune.results import trial_run_dir
from tune.search import main as search_main
from tune.tuner import tune_param_space
from tune.space import THESIS_LAM_GRID, check_against_config, load_space

TASKS = ("age", "gender", "race", "smile", "young", "emotion")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.lr=[-1e-3, 1e-2]", r"space.lr: a log-uniform range needs low > 0"),
        ("space.lam=[0.5, 0.01]", r"space.lam: empty or inverted range \[0.5, 0.01\]"),
        ("space.lr=[1e-3, 1e-3]", r"space.lr: empty or inverted range"),
        ("space.patience=[8, 3]", r"space.patience: expected 1 <= low <= high, got \[8, 3\]"),
        ("space.weighting=[]", r"space.weighting: the choice list is empty"),
        ("space.momentum=[0.8, 0.99]",
         r"unknown key\(s\) space.momentum; known: lam, lam_grid, lr, patience, weighting"),
        ("space.lr=0.01", r"space.lr: expected a list of 2 values"),
    ],
)
def test_a_bad_space_is_refused_with_the_key_named(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_space(None, [override])


def test_a_space_value_that_makes_a_bad_training_config_is_refused() -> None:
    space = load_space(None, ["space.weighting=[learned, magic]"])
    with pytest.raises(ConfigError, match="space.weighting: value 'magic'.*loss.weighting 'magic' unknown"):
        check_against_config(space, {})


def test_the_command_refuses_a_bad_space_before_ray_starts(tmp_path: Path, capsys) -> None:
    import ray

    assert search_main([f"runs_dir={tmp_path}", "space.lr=[-1, 1]", "--name", "bad"]) == 2
    assert "space.lr: a log-uniform range needs low > 0" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "bad").exists()


def test_the_thesis_grid_tries_exactly_the_four_thesis_lambdas() -> None:
    space = load_space(grid="thesis")
    assert space.lam_grid == THESIS_LAM_GRID == [0.001, 0.01, 0.1, 1.0]
    assert tune_param_space(space)["lam"] == {"grid_search": [0.001, 0.01, 0.1, 1.0]}


def test_the_objective_is_the_mean_normalized_score_of_the_validated_tasks() -> None:
    metrics = {"val/age/loss": 1.0, "val/age/mae": 4.0, "val/gender/loss": 0.6, "val/gender/accuracy": 0.8,
               "val/total_loss": 1.6, "train/gender/loss": 0.5}
    assert search_objective(metrics) == pytest.approx((10 / 14 + 0.8) / 2)  # age: 10 / (10 + MAE)
    assert search_objective(metrics | {"val/age/mae": 10.0}) == pytest.approx((0.5 + 0.8) / 2)
    # A worse MAE always scores lower, however far off: a diverged trial never ties a poor one.
    assert search_objective(metrics | {"val/age/mae": 400.0}) < search_objective(metrics | {"val/age/mae": 25.0}) < 0.8


def test_trial_records_keep_every_epoch_the_latest_report_winning_and_the_best_epochs_values(tmp_path: Path) -> None:
    import numpy as np

    from tune.objective import tune_result
    from tune.results import append_trial_row, best_trial_config, trial_row, trials_table

    names = ["lr", "patience"]

    def report(trial: str, epoch: int, age_mae: float, lr: float) -> None:
        metrics = {"epoch": epoch, "val/age/loss": 1.0, "val/age/mae": age_mae}
        append_trial_row(tmp_path,
                         trial_row(trial, tune_result(metrics, sample={"lr": lr, "patience": np.int64(3)}), names))

    report("a", 0, 10.0, 1e-3)
    report("a", 1, 6.0, 1e-3)
    report("b", 0, 9.0, 2e-3)
    report("b", 1, 4.0, 5e-4)  # PBT changed b's lr before its second epoch
    report("a", 1, 5.0, 1e-3)  # a restarted trial reports its epoch again
    with (tmp_path / "trial_results.jsonl").open("a") as handle:
        handle.write('{"trial_id": "c", "ep')  # a driver killed mid-line
    table = trials_table(tmp_path)
    assert [(r["trial_id"], r["epoch"], r["val/age/mae"]) for r in table.to_pylist()] == [
        ("a", 0, 10.0), ("a", 1, 5.0), ("b", 0, 9.0), ("b", 1, 4.0)]
    assert table.column("patience").to_pylist() == [3, 3, 3, 3]
    document, best = best_trial_config(table, {"optim": {"lr": 0.1}}, "s", names)
    assert (best["trial_id"], best["epoch"]) == ("b", 1)
    assert document["optim"]["lr"] == 5e-4 and document["freeze"]["patience"] == 3 and document["name"] == "s-best"
    (tmp_path / "trial_results.jsonl").write_text('{"trial_id": "a", "epoch": 0}\nnot json\n'
                                                  '{"trial_id": "a", "epoch": 1}\n')
    with pytest.raises(ValueError, match="trial_results.jsonl:2: not a JSON line"):
        trials_table(tmp_path)


@pytest.mark.slow
def test_an_asha_search_stops_trailing_trials_and_its_best_config_trains(finished_search: Path) -> None:
    """The shared search: 4 trials, one at a time, sampler seed 0, ASHA halving after every epoch of 3.

    Interrupting a search and resuming it is tested on SLURM (tests/test_tune_slurm.py), where the job
    is requeued midway and restores the Tuner."""
    rows = pq.read_table(finished_search / "trials.parquet").to_pylist()
    epochs_by_trial: dict[str, list[int]] = {}
    for row in rows:
        epochs_by_trial.setdefault(row["trial_id"], []).append(row["epoch"])
        assert 1e-5 <= row["lr"] < 1e-2 and 1e-3 <= row["lam"] < 1 and 2 <= row["patience"] <= 10
        assert 0 <= row["objective"] <= 1
        assert all(f"val/{task}/loss" in row for task in TASKS) and "val/age/mae" in row \
            and "val/emotion/accuracy" in row
        assert row["objective"] == pytest.approx(search_objective(row))
    assert len(epochs_by_trial) == 4
    assert all(epochs == list(range(len(epochs))) for epochs in epochs_by_trial.values())
    assert min(len(epochs) for epochs in epochs_by_trial.values()) < 3  # ASHA stopped a trial early
    assert max(len(epochs) for epochs in epochs_by_trial.values()) == 3

    best = load_config(finished_search / "best_config.yaml")
    best_row = max(rows, key=lambda row: row["objective"])
    assert (best.optim.lr, best.loss.lam, best.freeze.patience) == \
        (best_row["lr"], best_row["lam"], best_row["patience"])
    assert best.name == "finished-best" and best.data.image_size == 32
    assert train_main(["--local", "--config", str(finished_search / "best_config.yaml"), "max_epochs=1"]) == 0
    assert (Path(best.runs_dir) / "finished-best" / "best_model.pt").exists()

    (search_start,) = read_starts(finished_search)  # the search and each trial record what ran them
    assert search_start["command"].startswith("python -m tune.search ") and "--num-samples 4" in search_start["command"]
    for trial_id in epochs_by_trial:
        (trial_start,) = read_starts(trial_run_dir(finished_search, trial_id))
        assert trial_start["command"] == f"tune.search trial {trial_id}" and trial_start["commit"]


def test_with_single_task_baselines_the_objective_is_delta_m(tmp_path: Path) -> None:
    baselines_file = tmp_path / "baselines.yaml"
    baselines_file.write_text("age: 5.0\ngender: 0.8\n")
    baselines = load_baselines(baselines_file)
    epoch = {"epoch": 0, "val/age/loss": 1.0, "val/age/mae": 4.0, "val/gender/loss": 0.5, "val/gender/accuracy": 0.84,
             "val/total_loss": 1.5, "freeze/events": []}
    result = tune_result(epoch, baselines)
    # age: MAE 5 -> 4 is +20 %; gender: 0.80 -> 0.84 is +5 %; Δm = mean = 12.5 %
    assert result["delta_m"] == pytest.approx(12.5) and result["objective"] == result["delta_m"]
    assert result["mean_score"] == pytest.approx((10 / 14 + 0.84) / 2)
    assert tune_result(epoch)["objective"] == result["mean_score"]  # without baselines: the mean score


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("age: -1", r"age: expected its mae as a number > 0, got -1"),
        ("smiles: 0.9", r"unknown task 'smiles'"),
        ("[0.9]", r"expected a mapping of task to its single-task metric"),
        ("gender: high", r"gender: expected its accuracy as a number > 0, got 'high'"),
    ],
)
def test_bad_baselines_are_refused_with_the_task_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_baselines(path)


@pytest.mark.slow
@pytest.mark.ray
def test_population_based_training_lets_a_trailing_trial_adopt_a_leading_ones_state(
        synthetic_shards, tmp_path: Path) -> None:
    """PBT, two trials side by side, an exploit/explore step after every epoch: the trailing trial goes on
    from the leading one's epoch checkpoint with perturbed values, which trials.parquet records per epoch."""
    import subprocess
    import sys

    from tests.test_train import tiny_overrides

    training = tiny_overrides(synthetic_shards, tmp_path, "unused", "max_epochs=2", "data.loader_workers=0")
    search = ["--num-samples", "2", "--scheduler", "pbt", "--perturbation-interval", "1", "--quantile-fraction", "0.5",
              "--max-concurrent", "2", "--seed", "0", "--name", "pbt", "--runs-dir", str(tmp_path)]
    result = subprocess.run([sys.executable, "-m", "tune.search", *training, *search], cwd=Path(__file__).parents[1],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[Exploit] Cloning trial" in result.stdout + result.stderr
    rows = pq.read_table(tmp_path / "pbt" / "trials.parquet").to_pylist()
    by_trial: dict[str, list[dict]] = {}
    for row in sorted(rows, key=lambda row: row["epoch"]):
        by_trial.setdefault(row["trial_id"], []).append(row)
    assert len(by_trial) == 2
    # A trial that adopted another's state goes on from that state's epoch, and Tune keeps its results from
    # the adoption on: its rows may start later than epoch 0. Every trial trains to the last epoch.
    epochs = {trial_id: [r["epoch"] for r in trial] for trial_id, trial in by_trial.items()}
    assert all(e == sorted(set(e)) and e[-1] == 1 for e in epochs.values()), epochs
    assert any(e == [0, 1] for e in epochs.values()), epochs
    values = {(r["trial_id"], r["lr"], r["lam"], r["patience"]) for r in rows}
    assert len(values) > 2  # some trial trained later epochs with other values than its first
    for trial in by_trial.values():
        assert all(1 <= r["patience"] for r in trial) and all(r["lr"] > 0 and r["lam"] > 0 for r in trial)


def test_tune_modules_have_one_job_each_and_no_import_cycle() -> None:
    import ast

    folder = Path(__file__).parents[1] / "tune"
    imports = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        imports[path.stem] = {node.module.split(".")[1] for node in ast.walk(tree)
                              if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tune.")}
    done: list[str] = []
    while len(done) < len(imports):  # a topological order exists exactly when there is no cycle
        ready = sorted(name for name, needs in imports.items() if name not in done and needs <= set(done))
        assert ready, f"import cycle among {sorted(set(imports) - set(done))}: {imports}"
        done += ready
    assert "search" not in set().union(*imports.values())  # nothing imports the command
    assert imports["slurm"] == set()  # submission only


def test_the_report_and_the_hparams_view_need_neither_ray_nor_submitit() -> None:
    import subprocess
    import sys

    code = "import sys, tune.report, tune.hparams; print(sorted({'ray', 'submitit'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
