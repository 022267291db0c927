"""Hyperparameter search: the space is checked before anything starts; a real ASHA search on Ray Tune."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.config import ConfigError, load_config
from pipeline.train import main as train_main
from tests.test_train import tiny_overrides
from tune.search import main as search_main
from tune.search import search_objective, tune_param_space
from tune.space import THESIS_LAM_GRID, check_against_config, load_space

REPO = Path(__file__).resolve().parents[1]
TASKS = ("age", "gender", "race", "smile", "young", "emotion")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("space.lr=[-1e-3, 1e-2]", r"space.lr: a log-uniform range needs low > 0"),
        ("space.lam=[0.5, 0.01]", r"space.lam: empty or inverted range \[0.5, 0.01\]"),
        ("space.lr=[1e-3, 1e-3]", r"space.lr: empty or inverted range"),
        ("space.patience=[8, 3]", r"space.patience: expected 1 <= low <= high, got \[8, 3\]"),
        ("space.weighting=[]", r"space.weighting: the choice list is empty"),
        ("space.momentum=[0.8, 0.99]", r"unknown key\(s\) space.momentum; known: lam, lam_grid, lr, patience, weighting"),
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
    assert search_objective(metrics) == pytest.approx((0.6 + 0.8) / 2)
    assert search_objective(metrics | {"val/age/mae": 25.0}) == pytest.approx(0.8 / 2)  # age score floors at 0


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_an_asha_search_killed_midway_resumes_stops_trailing_trials_and_its_best_config_trains(
    local_ray, synthetic_shards, tmp_path: Path
) -> None:
    # One trial at a time and a fixed sampler seed: ASHA sees the same trials in the same order on every run
    # (the second one trails the first after epoch 0 and is stopped).
    training = tiny_overrides(synthetic_shards, tmp_path, "unused", "max_epochs=3", "data.loader_workers=0")
    search = ["--num-samples", "4", "--scheduler", "asha", "--grace-period", "1", "--reduction-factor", "2",
              "--max-concurrent", "1", "--seed", "0", "--name", "lr-lam", "--runs-dir", str(tmp_path)]
    search_dir = tmp_path / "lr-lam"
    with (tmp_path / "search.log").open("w") as log:
        child = subprocess.Popen([sys.executable, "-m", "tune.search", *training, *search], cwd=REPO, stdout=log,
                                 stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not list(search_dir.glob("*_00002/train/checkpoint_*/checkpoint.pt")) and time.monotonic() < deadline:
        assert child.poll() is None, (tmp_path / "search.log").read_text()[-3000:]
        time.sleep(0.5)
    child.kill()  # killed midway through the third trial
    child.wait()
    finished = {path: path.stat().st_mtime for path in search_dir.glob("*_0000[01]/train/metrics.parquet")}
    assert len(finished) == 2

    assert search_main([*training, *search]) == 0  # the same name: resumed
    assert {path: path.stat().st_mtime for path in finished} == finished  # finished trials not trained again
    rows = pq.read_table(search_dir / "trials.parquet").to_pylist()
    epochs_by_trial: dict[str, list[int]] = {}
    for row in rows:
        epochs_by_trial.setdefault(row["trial_id"], []).append(row["epoch"])
        assert 1e-5 <= row["lr"] < 1e-2 and 1e-3 <= row["lam"] < 1 and 2 <= row["patience"] <= 10
        assert 0 <= row["objective"] <= 1
        assert all(f"val/{task}/loss" in row for task in TASKS) and "val/age/mae" in row and "val/emotion/accuracy" in row
    assert len(epochs_by_trial) == 4
    assert all(epochs == list(range(len(epochs))) for epochs in epochs_by_trial.values())
    assert min(len(epochs) for epochs in epochs_by_trial.values()) < 3  # ASHA stopped a trial early
    assert max(len(epochs) for epochs in epochs_by_trial.values()) == 3

    best = load_config(search_dir / "best_config.yaml")
    best_row = max(rows, key=lambda row: row["objective"])
    assert (best.optim.lr, best.loss.lam, best.freeze.patience) == (best_row["lr"], best_row["lam"], best_row["patience"])
    assert best.name == "lr-lam-best" and best.data.image_size == 32
    assert train_main(["--local", "--config", str(search_dir / "best_config.yaml"), "max_epochs=1"]) == 0
    assert (tmp_path / "lr-lam-best" / "best_model.pt").exists()
