"""Experiments: the arms of each comparison, Δm and mean ± std by hand, the ready configs, and
``mtl-vs-single`` and ``transfer`` end to end on the synthetic shards (in-process training, a re-run skips
finished runs)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import config_differences, load_config, save_config, to_dict
from pipeline.data import summary_digest
from pipeline.experiment_arms import (COMPARED_WEIGHTINGS, Arm, ExperimentError, arm_overrides, baseline_row,
                                      chosen_arms, experiment_arms, selection_name)
from pipeline.experiment_runs import best_epoch_row, check_run_folder, run_is_finished
from pipeline.experiment_tables import (
    CellStats, beyond_seed_spread, delta_m_by_row, format_table, mean_and_std, summarize,
)
from pipeline.experiments import __doc__ as experiments_help
from pipeline.experiments import format_estimate, main
from pipeline.losses import WEIGHTINGS
from pipeline.run_archive import main as archive_main
from pipeline.schema import get_task
from pipeline.train import main as train_main
from tests.test_run_claims import hold_claim
from tests.test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
DATASETS_BY_TASK = {"age": ["/s/utk"], "gender": ["/s/utk", "/s/celeba"]}


def test_mean_and_std_use_the_sample_std_over_seeds() -> None:
    assert mean_and_std([1.0, 2.0, 3.0]) == CellStats(2.0, 1.0, 3)  # std = sqrt(((1-2)^2 + (3-2)^2) / 2)
    assert mean_and_std([0.8, 0.9]).std == pytest.approx(math.sqrt(0.005))
    one = mean_and_std([4.5])
    assert one.mean == 4.5 and math.isnan(one.std) and one.count == 1
    assert mean_and_std([]).count == 0 and math.isnan(mean_and_std([]).mean)


def test_single_task_arms_restrict_tasks_and_datasets_and_use_one_hot_fixed_weights() -> None:
    arms = experiment_arms("mtl-vs-single", ["age", "gender"], DATASETS_BY_TASK)
    assert [(a.name, a.row) for a in arms] == [("single-age", "single-task"), ("single-gender", "single-task"),
                                               ("mtl", "MTL")]
    assert arms[0].overrides == {"data.tasks": ["age"], "data.datasets": ["/s/utk"], "data.task_shares": {},
                                 "loss.weighting": "fixed", "loss.fixed_weights": {"age": 1.0}}
    assert arms[1].overrides["data.datasets"] == ["/s/utk", "/s/celeba"]
    assert arms[2].overrides == {}
    config = load_config(None, arm_overrides(arms[1], 2, Path("/runs/exp")))
    assert config.data.tasks == ["gender"] and config.loss.weighting == "fixed" \
        and config.loss.fixed_weights == {"gender": 1.0}
    assert config.seed == 2 and config.run_dir == Path("/runs/exp/single-gender-seed2")


def test_weighting_freeze_and_lambda_arms_vary_their_keys() -> None:
    weighting = experiment_arms("weighting", ["age"], {})
    assert [(a.row, dict(a.overrides)) for a in weighting][:6] == [
        ("equal", {"loss.weighting": "equal"}), ("learned", {"loss.weighting": "learned"}),
        ("uncertainty", {"loss.weighting": "uncertainty", "optim.weighting_lr": 0.0}),
        ("dwa", {"loss.weighting": "dwa"}),
        ("rlw", {"loss.weighting": "rlw"}), ("famo", {"loss.weighting": "famo"})]
    # the methods whose authors learn their weights with the network's optimizer get its lr, not the thesis' 3e-5
    gradnorm = next(arm for arm in weighting if arm.name == "gradnorm")
    assert gradnorm.overrides == {"loss.weighting": "gradnorm", "optim.weighting_lr": 0.0}
    config = load_config(REPO / "configs" / "utkface.yaml", arm_overrides(gradnorm, 0, Path("/runs/x")))
    assert config.optim.weighting_lr == 0.0
    assert load_config(REPO / "configs" / "utkface.yaml").optim.weighting_lr == 3e-5
    assert {a.name for a in weighting} == set(WEIGHTINGS) - {"fixed"}
    chosen = experiment_arms("weighting", ["age"], {}, weightings=["pcgrad", "learned"])
    assert [a.name for a in chosen] == ["equal", "learned", "pcgrad"]  # registry order; the baseline always
    with pytest.raises(ExperimentError, match="--weightings names fixed"):
        experiment_arms("weighting", ["age"], {}, weightings=["fixed"])
    freeze = experiment_arms("freeze", ["age"], {})
    assert [(a.row, dict(a.overrides)) for a in freeze] == [
        ("early-freeze", {"freeze.mode": "early-freeze"}), ("early-stop", {"freeze.mode": "early-stop"}),
        ("none", {"freeze.mode": "none"}),
        ("early-freeze (cumulative counter)", {"freeze.mode": "early-freeze", "freeze.counter": "cumulative"})]
    assert experiment_arms("freeze", ["age", "gender"], {})[4:] == [  # a quorum needs as many tasks
        Arm("early-freeze-quorum2", "early-freeze (trunk quorum 2)",
            {"freeze.mode": "early-freeze", "freeze.trunk_quorum": 2})]
    lam = experiment_arms("lambda", ["age"], {})
    assert [a.name for a in lam] == ["lambda-0.001", "lambda-0.01", "lambda-0.1", "lambda-1"]
    assert [a.row for a in lam] == ["λ=0.001", "λ=0.01", "λ=0.1", "λ=1"]
    assert lam[0].overrides == {"loss.weighting": "learned", "loss.lam": 0.001}
    for arm in [*weighting, *experiment_arms("freeze", ["age", "gender"], {}), *lam]:
        load_config(None, arm_overrides(arm, 0, Path("/runs/x")))  # every arm is a valid config
    assert [baseline_row(arms) for arms in (weighting, freeze, lam)] == ["equal", "early-stop", "λ=0.1"]
    assert baseline_row(experiment_arms("mtl-vs-single", ["age", "gender"], DATASETS_BY_TASK)) == "single-task"


def test_transfer_arms_differ_in_init_from_alone_and_the_own_start_is_the_baseline() -> None:
    source = Path("/runs/fer-utkface-mtl/mtl-seed0")
    arms = experiment_arms("transfer", ["age", "gender", "race"], {}, init_from=source,
                           backbone_weights="weights/mobilenet_v2-b0353104.pth")
    assert [(a.name, a.row) for a in arms] == [("imagenet", "ImageNet start"), ("pretrained", "from mtl-seed0")]
    assert baseline_row(arms) == "ImageNet start"
    utkface = REPO / "configs" / "utkface.yaml"
    own, pretrained = (load_config(utkface, arm_overrides(arm, 0, Path("/runs/x"))) for arm in arms)
    assert own.model.init_from is None and pretrained.model.init_from == str(source)
    assert config_differences(to_dict(own), to_dict(pretrained)) == ["model.init_from"]  # name is a run's own
    assert own.model.weights_path == pretrained.model.weights_path == "weights/mobilenet_v2-b0353104.pth"

    from_file = experiment_arms("transfer", ["age"], {}, init_from=source / "best_model.pt", backbone_weights=None)
    assert [(a.name, a.row) for a in from_file] == [("scratch", "random start"), ("pretrained", "from mtl-seed0")]


def test_init_from_is_required_by_transfer_and_refused_by_the_other_experiments() -> None:
    with pytest.raises(ExperimentError, match="transfer needs --init-from"):
        experiment_arms("transfer", ["age"], {})
    for experiment in ("mtl-vs-single", "weighting", "freeze", "lambda"):
        with pytest.raises(ExperimentError, match=f"--init-from is for the transfer experiment; {experiment} does not"):
            experiment_arms(experiment, ["age"], {"age": ["/s/utk"]}, init_from=Path("/runs/pre"))


def test_arms_chosen_by_name_keep_the_baseline_and_another_baseline_moves_the_reference() -> None:
    freeze = experiment_arms("freeze", ["age", "gender"], {})
    assert chosen_arms("freeze", freeze) == freeze
    assert [a.name for a in chosen_arms("freeze", freeze, ["none"])] == ["early-stop", "none"]  # table order
    thesis = chosen_arms("freeze", freeze, ["none"], baseline="early-freeze")
    assert [(a.name, a.baseline) for a in thesis] == [("early-freeze", True), ("none", False)]
    assert baseline_row(thesis) == "early-freeze" and thesis[0].overrides == freeze[0].overrides
    assert [a.name for a in chosen_arms("freeze", freeze, baseline="none")] == [a.name for a in freeze]
    assert [a.name for a in chosen_arms("freeze", freeze, ["none"], baseline="none")] == ["none"]
    singles = experiment_arms("mtl-vs-single", ["age", "gender"], DATASETS_BY_TASK)
    assert [a.name for a in chosen_arms("mtl-vs-single", singles, ["mtl"])] == ["single-age", "single-gender", "mtl"]
    with pytest.raises(ExperimentError, match="freeze has no arm nofreeze, early-freze; its arms: early-freeze, "):
        chosen_arms("freeze", freeze, ["none", "nofreeze"], baseline="early-freze")


def test_a_selection_of_arms_is_named_by_its_arms_and_reference_and_the_whole_experiment_by_nothing() -> None:
    freeze = experiment_arms("freeze", ["age", "gender"], {})
    assert selection_name(freeze, chosen_arms("freeze", freeze)) == ""
    assert selection_name(freeze, chosen_arms("freeze", freeze, [a.name for a in freeze])) == ""
    assert selection_name(freeze, chosen_arms("freeze", freeze, ["none"], "early-freeze")) == "none-vs-early-freeze"
    assert selection_name(freeze, chosen_arms("freeze", freeze, ["early-freeze"], "none")) == "early-freeze-vs-none"
    assert selection_name(freeze, chosen_arms("freeze", freeze, ["none"])) == "none-vs-early-stop"
    assert selection_name(freeze, chosen_arms("freeze", freeze, ["none"], "none")) == "none"
    assert selection_name(freeze, chosen_arms("freeze", freeze, baseline="none")) == "vs-none"
    singles = experiment_arms("mtl-vs-single", ["age", "gender"], DATASETS_BY_TASK)
    assert selection_name(singles, chosen_arms("mtl-vs-single", singles, ["mtl"])) == ""
    assert selection_name(singles, chosen_arms("mtl-vs-single", singles, baseline="mtl")) == "vs-mtl"


def test_an_option_of_another_experiment_is_refused_not_ignored() -> None:
    with pytest.raises(ExperimentError, match="--single-tasks is for the mtl-vs-single experiment; freeze does not"):
        experiment_arms("freeze", ["age"], DATASETS_BY_TASK, single_tasks=["age"])
    with pytest.raises(ExperimentError, match="--weightings is for the weighting experiment; mtl-vs-single does not"):
        experiment_arms("mtl-vs-single", ["age"], DATASETS_BY_TASK, weightings=["pcgrad"])


def test_transfer_refuses_a_source_without_a_facemtl_network_or_of_another_backbone_before_training(
        synthetic_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    overrides = tiny_overrides({"utk": synthetic_shards["utk"]}, tmp_path, "unused")
    command = ["--config", str(REPO / "configs" / "demo.yaml"), *overrides, "--name", "tr", "--local"]
    assert main(["transfer", *command]) == 1
    assert "transfer needs --init-from" in capsys.readouterr().err
    assert main(["weighting", *command, "--init-from", str(tmp_path)]) == 1
    assert "--init-from is for the transfer experiment; weighting does not take it" in capsys.readouterr().err
    assert main(["transfer", *command, "--init-from", str(tmp_path / "nothing")]) == 2
    assert f"model.init_from {tmp_path / 'nothing'} holds no facemtl network" in capsys.readouterr().err
    other = tmp_path / "resnet" / "best_model.pt"
    other.parent.mkdir()
    torch.save({"objective": {"net.backbone.conv.weight": torch.zeros(1)},
                "config": {"model": {"backbone": "resnet50"}}}, other)
    assert main(["transfer", *command, "--init-from", str(other)]) == 1
    assert "--init-from holds a resnet50 network and the config trains shufflenet_v2_x0_5" in capsys.readouterr().err
    assert not (tmp_path / "tr").exists()  # refused before the experiment folder, let alone a run


def test_finished_runs_best_epoch_and_config_differences() -> None:
    rows = [{"epoch": 0, "is_best": True, "val/age/loss": 2.0, "freeze/frozen_tasks": "[]"},
            {"epoch": 1, "is_best": True, "val/age/loss": 1.0, "freeze/frozen_tasks": "[]"},
            {"epoch": 2, "is_best": False, "val/age/loss": 0.5, "freeze/frozen_tasks": '["age"]'}]
    assert best_epoch_row(rows)["epoch"] == 1  # epoch 2 restored a snapshot: not the saved best model
    assert run_is_finished(rows, max_epochs=3) and run_is_finished(rows, max_epochs=10)  # all tasks frozen
    assert not run_is_finished(rows[:2], max_epochs=3) and not run_is_finished([], max_epochs=1)
    saved = {"max_epochs": 3, "seed": 0, "loss": {"weighting": "learned", "lam": 0.1}}
    assert config_differences(saved, {"max_epochs": 9, "seed": 0,
                                      "loss": {"weighting": "learned", "lam": 0.01}}) == ["loss.lam"]


def test_single_tasks_subset_gets_single_arms_and_delta_m_over_those_tasks_only() -> None:
    datasets = {"age": ["/s/utk"], "gender": ["/s/utk"], "landmarks": ["/s/celeba"]}
    arms = experiment_arms("mtl-vs-single", ["age", "gender", "landmarks"], datasets, single_tasks=["landmarks", "age"])
    assert [arm.name for arm in arms] == ["single-age", "single-landmarks", "mtl"]
    with pytest.raises(ExperimentError, match="--single-tasks names Smiling"):
        experiment_arms("mtl-vs-single", ["age"], {"age": ["/s/utk"]}, single_tasks=["Smiling"])
    tasks = [get_task("age"), get_task("gender"), get_task("landmarks")]
    records = [{"row": "single-task", "val/age/mae": 6.0}, {"row": "single-task", "val/landmarks/nme": 0.10},
               {"row": "MTL", "val/age/mae": 3.0, "val/gender/accuracy": 0.9, "val/landmarks/nme": 0.12}]
    summary = summarize(records, ["single-task", "MTL"], tasks)
    table = format_table("mtl-vs-single", "single-task", summary,
                         delta_m_by_row(records, summary, "single-task", tasks),
                         tasks, {"age": 9.0, "gender": 0.5, "landmarks": 0.3}, seeds=1)
    lines = table.splitlines()
    assert lines[2] == ("| model | age MAE (years) ↓ | gender accuracy (%) ↑ | landmarks NME ↓ "
                        "| Δm vs single-task (%) ↑ |")
    assert lines[4] == "| single-task | 6.00 | – | 0.10 | ref. |"
    # age: +50 % (6 -> 3), landmarks: -20 % (0.10 -> 0.12); gender has no single-task model
    assert lines[5] == "| MTL | 3.00 | 90.00 | 0.12 | +15.00 |"


def test_table_has_a_column_per_task_rows_chance_and_delta_m_with_its_spread_over_seeds() -> None:
    tasks = [get_task("age"), get_task("gender")]
    records = [{"row": "single-task", "seed": 0, "val/age/mae": 6.0},
               {"row": "single-task", "seed": 0, "val/gender/accuracy": 0.75},
               {"row": "MTL", "seed": 0, "val/age/mae": 4.0, "val/gender/accuracy": 0.80},
               {"row": "MTL", "seed": 1, "val/age/mae": 6.0, "val/gender/accuracy": 0.80}]
    summary = summarize(records, ["single-task", "MTL"], tasks)
    assert summary["MTL"]["age"] == CellStats(5.0, math.sqrt(2), 2)
    # seed 0: age +33.33 % (6 -> 4), gender +6.67 % -> +20.00; seed 1: age 0, gender +6.67 % -> +3.33
    deltas = delta_m_by_row(records, summary, "single-task", tasks)
    assert deltas["MTL"].mean == pytest.approx((20.0 + 10 / 3) / 2)
    assert deltas["MTL"].std == pytest.approx(math.sqrt(2) * (20.0 - 10 / 3) / 2)
    table = format_table("mtl-vs-single", "single-task", summary, deltas, tasks, {"age": 9.0, "gender": 0.5}, seeds=2)
    lines = table.splitlines()
    assert lines[2] == "| model | age MAE (years) ↓ | gender accuracy (%) ↑ | Δm vs single-task (%) ↑ |"
    assert lines[4] == "| single-task | 6.00 | 75.00 | ref. |"
    assert lines[5] == "| MTL | 5.00 ± 1.41 | 80.00 ± 0.00 | +11.67 ± 11.79 |"  # one baseline seed: no † possible
    assert lines[6] == "| chance | 9.00 | 50.00 |  |"


def test_a_difference_is_marked_beyond_the_seed_spread_by_welchs_t_test() -> None:
    # By hand: seeds 1, 2, 3 (mean 2, std 1) against 4, 5, 6 (mean 5, std 1): standard error sqrt(1/3 + 1/3) = 0.816,
    # t = 3 / 0.816 = 3.67 with Welch's df = (2/3)^2 / (2 (1/3)^2 / 2) = 4, beyond t(0.975, 4) = 2.78: marked.
    # Against 2.5, 3.5, 4.5 (mean 3.5): t = 1.84 < 2.78: within seed noise.
    low, high, near = mean_and_std([1, 2, 3]), mean_and_std([4, 5, 6]), mean_and_std([2.5, 3.5, 4.5])
    assert beyond_seed_spread(high, low) and beyond_seed_spread(low, high)
    assert not beyond_seed_spread(near, low)
    assert not beyond_seed_spread(mean_and_std([9.0]), low)  # one seed: no spread to judge by
    assert beyond_seed_spread(mean_and_std([2, 2]), mean_and_std([3, 3]))  # no spread at all, different means
    assert not beyond_seed_spread(mean_and_std([2, 2]), mean_and_std([2, 2]))
    tasks = [get_task("age"), get_task("gender")]
    records = [{"row": row, "seed": seed, "val/age/mae": age, "val/gender/accuracy": gender}
               for row, ages, genders in (("equal", [1, 2, 3], [0.90, 0.91, 0.92]),
                                          ("learned", [4, 5, 6], [0.905, 0.915, 0.925]))
               for seed, (age, gender) in enumerate(zip(ages, genders))]
    summary = summarize(records, ["equal", "learned"], tasks)
    table = format_table("weighting", "equal", summary, delta_m_by_row(records, summary, "equal", tasks), tasks,
                         {"age": 9.0, "gender": 0.5}, seeds=3)
    lines = table.splitlines()
    assert "†: differs from the equal row beyond the seed spread (Welch's t-test" in lines[0]
    assert lines[4] == "| equal | 2.00 ± 1.00 | 91.00 ± 1.00 | ref. |"
    assert lines[5].startswith("| learned | 5.00 ± 1.00 † | 91.50 ± 1.00 | ")  # age beyond, gender within noise


@pytest.mark.parametrize("name, tasks", [("utkface", ["age", "gender", "race"]), ("celeba", ["gender", "young"]),
                                         ("fer-utkface", ["age", "gender", "race", "emotion"])])
def test_ready_configs_load(name: str, tasks: list[str]) -> None:
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert config.data.tasks == tasks and config.name == name
    assert all(path.startswith("shards/") for path in config.data.datasets)
    assert config.model.backbone == "mobilenet_v2" and config.model.weights_path == "weights/mobilenet_v2-b0353104.pth"
    for arm in experiment_arms("mtl-vs-single", tasks, {t: config.data.datasets for t in tasks}):
        load_config(REPO / "configs" / f"{name}.yaml", arm_overrides(arm, 0, Path("/runs/x")))


def test_the_estimate_of_the_runs_left_is_per_epoch_so_a_resumed_run_does_not_shrink_it() -> None:
    # a run resumed for its last epoch (60 s), then a whole one (10 epochs in 540 s): 600 s / 11 epochs
    assert format_estimate([(60.0, 1)], 2, 10) == \
        "; at most about 20 min left for 2 more run(s) of up to 10 epochs (1.0 min per epoch here)"
    assert "about 18 min left for 2 more" in format_estimate([(60.0, 1), (540.0, 10)], 2, 10)
    assert format_estimate([], 3, 10) == "" and format_estimate([(60.0, 1)], 0, 10) == ""


def test_mtl_vs_single_end_to_end_writes_table_plot_results_and_skips_finished_runs(
        synthetic_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_torch_thread) -> None:
    shards = {name: synthetic_shards[name] for name in ("utk", "celeba")}
    overrides = tiny_overrides(shards, tmp_path, "unused", "data.tasks=[age,gender]", "max_epochs=1",
                               "data.loader_workers=0")
    argv = ["mtl-vs-single", "--config", str(REPO / "configs" / "demo.yaml"), *overrides, "--name", "cmp", "--local"]
    assert main([*argv, "--status"]) == 0  # before any training: every run not started, nothing created
    status = capsys.readouterr().out
    assert status.count("not started") == 3 and "no finished run yet" in status
    assert not (tmp_path / "cmp").exists()
    assert main(argv) == 0
    experiment = tmp_path / "cmp"
    runs = ["single-age-seed0", "single-gender-seed0", "mtl-seed0"]
    assert all((experiment / run / "metrics.parquet").exists() for run in runs)
    assert load_config(experiment / "single-age-seed0" / "config.yaml").data.datasets == [str(shards["utk"])]

    table = (experiment / "table.md").read_text()
    assert "| model | age MAE (years) ↓ | gender accuracy (%) ↑ | Δm vs single-task (%) ↑ |" in table
    for row in ("| single-task | ", "| MTL | ", "| chance | "):
        assert row in table
    assert re.search(r"\nTrained: 3 runs, [0-9.]+ h of epochs in all \([0-9]+-[0-9]+ min a run\)\. .+: 3 runs\.\n",
                     table)  # the CPU's name varies by machine
    mtl_line = next(line for line in table.splitlines() if line.startswith("| MTL |"))
    assert mtl_line.rstrip(" |").split("| ")[-1].startswith(("+", "-"))  # a Δm value
    out = capsys.readouterr().out
    assert table in out
    assert "single-age-seed0: trained 1 epoch(s) in " in out and "min left for 2 more run(s) of up to 1 epochs" in out
    (invocation,) = [json.loads(line) for line in (experiment / "invocations.jsonl").read_text().splitlines()]
    assert invocation["command"].startswith("python -m pipeline.experiments mtl-vs-single --config ")
    assert invocation["cwd"] == os.getcwd()
    assert len(invocation["commit"]) >= 40
    assert {Path(path).name for path in invocation["shards"]} == {shards["utk"].name, shards["celeba"].name}
    assert all(summary["samples_per_split"]["train"] > 0 for summary in invocation["shards"].values())

    results = pq.read_table(experiment / "results.parquet").to_pylist()
    assert [(r["arm"], r["seed"]) for r in results] == [("single-age", 0), ("single-gender", 0), ("mtl", 0)]
    assert results[0]["val/gender/accuracy"] is None and results[0]["val/age/mae"] > 0
    with Image.open(experiment / "plot.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 300

    mtimes = {run: (experiment / run / "metrics.parquet").stat().st_mtime_ns for run in runs}
    assert main(argv) == 0
    assert {run: (experiment / run / "metrics.parquet").stat().st_mtime_ns for run in runs} == mtimes
    assert capsys.readouterr().out.count("finished, skipped") == 3
    assert (experiment / "table.md").read_text() == table
    assert main([*argv, "--status"]) == 0  # every run finished: the same table, written nowhere
    status = capsys.readouterr().out
    assert status.count("finished (1 epoch(s)") == 3 and table in status
    assert len((experiment / "invocations.jsonl").read_text().splitlines()) == 2

    assert main([*argv, "--split", "test"]) == 0  # no training: each best_model.pt evaluated on the test split
    assert capsys.readouterr().out.count("finished, skipped") == 3
    test_table = (experiment / "table-test.md").read_text()
    assert test_table.startswith("**mtl-vs-single**: test split") and "| MTL | " in test_table
    assert (experiment / "table.md").read_text() == table and (experiment / "plot-test.png").exists()
    test_results = pq.read_table(experiment / "results-test.parquet").to_pylist()
    for record, run in zip(test_results, runs):
        report = json.loads((experiment / run / "evaluation" / "test" / "metrics.json").read_text())
        tasks = {"single-age-seed0": ["age"], "single-gender-seed0": ["gender"], "mtl-seed0": ["age", "gender"]}[run]
        read = report["datasets"]
        assert [dataset["summary_sha256"] for dataset in read] == [summary_digest(dataset["path"]) for dataset in read]
        for task in tasks:
            metric = get_task(task).metric
            assert record[f"test/{task}/{metric}"] == pytest.approx(report["tasks"][task][metric])
            assert record[f"test/{task}/count"] == report["tasks"][task]["count"] > 0
    assert test_results[2]["test/age/mae"] != results[2]["val/age/mae"]
    assert main([*argv, "--split", "test"]) == 0  # the reports written above are of these models: used as they are
    assert capsys.readouterr().out.count("test split as evaluated before") == 3
    assert (experiment / "table-test.md").read_text() == test_table
    assert main([*argv, "--split", "test", "--reevaluate"]) == 0
    assert capsys.readouterr().out.count("test split evaluated in") == 3
    assert (experiment / "table-test.md").read_text() == test_table

    # The tables outlive the run folders: records saved without weights (a missing test evaluation is made
    # first), the folders deleted, restored; the same command then trains nothing and reports the same tables.
    shutil.rmtree(experiment / "mtl-seed0" / "evaluation")
    records = tmp_path / "records"
    assert archive_main(["save", str(tmp_path), str(records)]) == 0
    assert "3 run(s) copied, 0 link(s) to reused runs, 0 already there, 1 evaluated" in capsys.readouterr().out
    assert not list(records.rglob("*.pt"))
    shutil.rmtree(experiment)
    assert archive_main(["restore", str(records), str(tmp_path)]) == 0
    assert main([*argv, "--split", "test"]) == 0
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 3 and out.count("test split as recorded") == 3
    assert (experiment / "table-test.md").read_text() == test_table
    assert main(argv) == 0 and (experiment / "table.md").read_text() == table
    assert len((experiment / "invocations.jsonl").read_text().splitlines()) == 7  # 5 before, 2 since

    assert main([*argv[:-1], "optim.lr=0.01", "--local"]) == 1  # another config in the same folder: refused
    assert "trained with another config (optim.lr 0.001 -> 0.01)" in capsys.readouterr().err


def test_invocations_share_an_experiment_each_training_the_runs_no_other_process_holds(
        synthetic_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        one_torch_thread) -> None:
    shards = {name: synthetic_shards[name] for name in ("utk", "celeba")}
    overrides = tiny_overrides(shards, tmp_path, "unused", "data.tasks=[age,gender]", "max_epochs=1",
                               "data.loader_workers=0")
    argv = ["mtl-vs-single", "--config", str(REPO / "configs" / "demo.yaml"), *overrides, "--name", "cmp", "--local"]
    experiment = tmp_path / "cmp"
    holder = hold_claim(experiment / "single-gender-seed0")  # another invocation is training it
    try:
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert f"single-gender-seed0: in training by pid {holder.pid} on " in out
        assert "not finished: single-gender-seed0, held by another process" in out
        assert all((experiment / run / "metrics.parquet").exists() for run in ("single-age-seed0", "mtl-seed0"))
        assert not (experiment / "single-gender-seed0").exists()
        assert not (experiment / "table.md").exists()  # a table without that run would look whole
        assert main([*argv, "--status"]) == 0
        status = capsys.readouterr().out
        assert re.search(rf"single-gender-seed0 +0 of 1 epochs, in training by pid {holder.pid} on ", status)
        assert "2 of 3 run(s) finished, 0 partly trained, 1 in training now;" in status
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert main(argv) == 0  # the holder ended without finishing it: the next invocation trains it, then the table
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 2 and "single-gender-seed0: trained 1 epoch(s)" in out
    table = (experiment / "table.md").read_text()
    assert "| single-task | " in table and "(2 of 3 runs)" not in table

    # A run another process holds and finishes while this one trains the rest: this one writes the whole table.
    shutil.rmtree(experiment)
    other = hold_claim(experiment / "single-age-seed0")
    trainer = train_main

    single_age = experiment_arms("mtl-vs-single", ["age"], {"age": [str(shards["utk"])]}, ["age"])[0]
    other_argv = ["--config", str(REPO / "configs" / "demo.yaml"), *overrides,
                  *arm_overrides(single_age, 0, experiment), "--local"]

    def train_then_let_the_other_finish(train_argv: list[str]) -> int:
        if 'name="mtl-seed0"' in train_argv:  # meanwhile the other process trained single-age-seed0 and ended
            assert trainer(other_argv) == 0
            other.stdin.close()
            other.wait(timeout=30)
        return trainer(train_argv)

    monkeypatch.setattr("pipeline.experiments.train_main", train_then_let_the_other_finish)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "single-age-seed0: in training by pid" in out and "not finished" not in out
    results = pq.read_table(experiment / "results.parquet").to_pylist()
    assert [r["arm"] for r in results] == ["single-age", "single-gender", "mtl"]
    assert results[0]["val/age/mae"] > 0

    # A holder that ends without finishing its run (failed, killed): this invocation trains it at the end.
    shutil.rmtree(experiment)
    failed = hold_claim(experiment / "single-gender-seed0")

    def train_then_the_other_fails(train_argv: list[str]) -> int:
        if 'name="mtl-seed0"' in train_argv:
            failed.kill()
            failed.wait(timeout=30)
        return trainer(train_argv)

    monkeypatch.setattr("pipeline.experiments.train_main", train_then_the_other_fails)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.index("single-gender-seed0: in training by pid") < out.index("[2/3] single-gender, seed 0\n",
                                                                            out.index("mtl-seed0: trained"))
    assert "single-gender-seed0: trained 1 epoch(s)" in out and (experiment / "table.md").exists()


def test_a_run_folder_where_nothing_was_trained_starts_again_under_the_new_config(tmp_path: Path, capsys) -> None:
    def config(lr: str):
        return load_config(None, [f"runs_dir={tmp_path}", "name=mtl-seed0", f"optim.lr={lr}"])

    failed_start = config("0.001")  # e.g. a wrong weights path: pipeline.train saved the config, then failed
    failed_start.run_dir.mkdir(parents=True)
    save_config(failed_start, failed_start.run_dir / "config.yaml")
    check_run_folder(config("0.01"))
    assert "nothing was trained under its earlier config (optim.lr 0.001 -> 0.01)" in capsys.readouterr().out
    (failed_start.run_dir / "metrics.parquet").write_bytes(b"")  # an epoch's records: now it is another run
    with pytest.raises(ExperimentError, match=r"trained with another config \(optim.lr 0.001 -> 0.01\)"):
        check_run_folder(config("0.01"))
    check_run_folder(config("0.001"))  # its own config resumes


def test_the_help_names_every_weighting_the_weighting_experiment_compares() -> None:
    (item,) = [item for item in experiments_help.split("\n- ") if item.startswith("``weighting``")]
    assert [name for name in COMPARED_WEIGHTINGS if f"``{name}``" not in item] == []


def test_unknown_experiment_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["mtl-vs-everything"])


@pytest.mark.slow
def test_transfer_end_to_end_starts_the_pretrained_arm_from_the_source_and_skips_finished_runs(
        synthetic_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_torch_thread) -> None:
    utk, fer = synthetic_shards["utk"], synthetic_shards["fer"]
    source = tmp_path / "pretraining" / "mtl-seed0"
    pretrain = tiny_overrides({"utk": utk, "fer": fer}, source.parent, source.name, "max_epochs=1", "freeze.mode=none",
                              "data.loader_workers=0")
    assert train_main(["--local", *pretrain]) == 0  # FER2013 + UTKFace: age, gender, race and emotion
    # lr ~0: each arm's weights stay where its start put them, so the pretrained arm's can be compared with the source's
    overrides = tiny_overrides({"utk": utk}, tmp_path, "unused", "data.tasks=[age,gender]", "max_epochs=1",
                               "freeze.mode=none", "data.loader_workers=0", "optim.lr=1e-30",
                               "optim.weighting_lr=1e-30")
    argv = ["transfer", "--config", str(REPO / "configs" / "demo.yaml"), *overrides, "--init-from", str(source),
            "--name", "transfer", "--local"]
    capsys.readouterr()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"init_from {source}: loaded backbone, heads.age, heads.gender, shared; fresh nothing; " \
           "not used heads.emotion, heads.race" in out
    experiment = tmp_path / "transfer"
    runs = ["scratch-seed0", "pretrained-seed0"]
    assert load_config(experiment / "pretrained-seed0" / "config.yaml").model.init_from == str(source)
    assert load_config(experiment / "scratch-seed0" / "config.yaml").model.init_from is None

    source_weights = torch.load(source / "best_model.pt", weights_only=True)["objective"]
    for run, starts_from_source in (("pretrained-seed0", True), ("scratch-seed0", False)):
        tuned = torch.load(experiment / run / "best_model.pt", weights_only=True)["objective"]
        trunk = [key for key, tensor in tuned.items() if key.startswith(("net.backbone.", "net.shared."))
                 and tensor.is_floating_point() and "running_" not in key]  # BatchNorm statistics move in every pass
        same = all(torch.allclose(tuned[key], source_weights[key], atol=1e-6) for key in trunk)
        assert same == starts_from_source, run

    table = (experiment / "table.md").read_text()
    assert table.startswith("**transfer**: validation split")
    assert "| model | age MAE (years) ↓ | gender accuracy (%) ↑ | Δm vs random start (%) ↑ |" in table
    lines = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| ")}
    assert lines["| random start"].endswith("| ref. |")
    assert lines["| from mtl-seed0"].rstrip(" |").split("| ")[-1].startswith(("+", "-"))  # Δm against random start
    (invocation,) = [json.loads(line) for line in (experiment / "invocations.jsonl").read_text().splitlines()]
    assert invocation["init_from"]["path"] == str(source) and invocation["init_from"]["epoch"] == 0
    assert invocation["init_from"]["file"] == str(source / "best_model.pt")
    assert invocation["init_from"]["config"]["data"]["datasets"] == [str(utk), str(fer)]
    (source_start,) = invocation["init_from"]["starts"]  # the source run's own record, copied
    assert source_start["command"].startswith("python -m pipeline.train") and source_start["cwd"] == os.getcwd()

    mtimes = {run: (experiment / run / "metrics.parquet").stat().st_mtime_ns for run in runs}
    assert main([*argv, "--split", "test"]) == 0  # trains nothing: each best_model.pt evaluated on the test split
    out = capsys.readouterr().out
    assert out.count("finished, skipped") == 2 and "init_from" not in out
    assert {run: (experiment / run / "metrics.parquet").stat().st_mtime_ns for run in runs} == mtimes
    test_table = (experiment / "table-test.md").read_text()
    assert test_table.startswith("**transfer**: test split") and "| from mtl-seed0 | " in test_table
    results = pq.read_table(experiment / "results-test.parquet").to_pylist()
    assert [(r["arm"], r["row"]) for r in results] == [("scratch", "random start"), ("pretrained", "from mtl-seed0")]
