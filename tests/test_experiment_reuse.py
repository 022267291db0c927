"""An experiment's arm whose config equals a finished run of another experiment links to that run instead of
training it again: the comparison by hand, the links on hand-made run folders, and ``mtl-vs-single`` then
``weighting`` end to end on the synthetic shards."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import TrainConfig, load_config, save_config, to_dict, with_absolute_paths
from pipeline.experiment_reuse import (config_claim_path, config_key, is_same_run, link_reused_runs,
                                      sibling_in_training, sibling_run_configs)
from pipeline.experiment_status import run_state
from pipeline.experiments import main
from pipeline.run_records import CONFIG_FILE, METRICS_FILE
from tests.test_run_claims import hold_claim
from tests.test_train import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
UTKFACE_LIKE = ["max_epochs=12", "loss.weighting=learned", "data.datasets=[/s/utk]"]


def run_config(runs_dir: Path, experiment: str, run: str, *overrides: str) -> TrainConfig:
    return load_config(None, ["max_epochs=2", *overrides, f"runs_dir={runs_dir / experiment}", f"name={run}"])


def saved_run(runs_dir: Path, experiment: str, run: str, *overrides: str, epochs_run: int = 2) -> Path:
    """A run folder as pipeline.train leaves it, as far as reuse reads it: config.yaml and metrics rows."""
    config = run_config(runs_dir, experiment, run, *overrides)
    save_config(config, config.run_dir / CONFIG_FILE)
    rows = [{"epoch": epoch, "is_best": True, "val/age/loss": 1.0, "freeze/frozen_tasks": "[]"}
            for epoch in range(epochs_run)]
    pq.write_table(pa.Table.from_pylist(rows), config.run_dir / METRICS_FILE)
    return config.run_dir


def record_links(experiment: Path, links: dict[str, str]) -> None:
    """What pipeline.experiments records after linking: only recorded links are reuse's to keep or remove."""
    with (experiment / "invocations.jsonl").open("a") as handle:
        handle.write(json.dumps({"reused_runs": links}) + "\n")


def test_same_run_means_the_same_config_wherever_the_run_lives() -> None:
    wanted = to_dict(load_config(None, UTKFACE_LIKE))
    assert is_same_run(to_dict(load_config(None, UTKFACE_LIKE)), wanted)
    assert is_same_run(to_dict(load_config(None, [*UTKFACE_LIKE, "name=mtl-seed0", "runs_dir=/runs/mtl-vs-single"])),
                       wanted)
    for other in ("seed=1", "loss.weighting=equal", "max_epochs=10", "data.datasets=[/s/celeba]"):
        assert not is_same_run(to_dict(load_config(None, [*UTKFACE_LIKE, other])), wanted), other


def test_a_key_only_another_weighting_reads_does_not_make_another_run() -> None:
    learned = [*UTKFACE_LIKE, "loss.dbmtl_beta_sigma=0.5", "loss.famo_lr=0.1", "loss.fixed_weights={age: 1.0}"]
    saved = to_dict(load_config(None, learned))  # DB-MTL's, FAMO's and fixed's keys: unread by learned
    assert is_same_run(saved, to_dict(load_config(None, UTKFACE_LIKE)))
    assert config_key(load_config(None, learned)) == config_key(load_config(None, UTKFACE_LIKE))
    assert not is_same_run(saved, to_dict(load_config(None, [*UTKFACE_LIKE, "loss.lam=1"])))  # learned reads λ
    dbmtl = [*UTKFACE_LIKE, "loss.weighting=dbmtl"]
    assert not is_same_run(to_dict(load_config(None, [*dbmtl, "loss.dbmtl_beta_sigma=0.5"])),
                           to_dict(load_config(None, dbmtl)))
    assert config_key(load_config(None, [*dbmtl, "loss.dbmtl_beta_sigma=0.5"])) != config_key(load_config(None, dbmtl))
    assert is_same_run(to_dict(load_config(None, [*dbmtl, "loss.lam=1"])), to_dict(load_config(None, dbmtl)))


def test_an_arm_links_to_the_first_finished_run_of_its_config_in_another_experiment(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    saved_run(runs, "mtl-vs-single", "mtl-seed0")
    saved_run(runs, "lambda", "lambda-0.1-seed0")
    saved_run(runs, "freeze", "early-freeze-seed0", epochs_run=1)  # the same config, not finished
    saved_run(runs, "long", "mtl-seed0", "max_epochs=3", epochs_run=3)  # finished, but a 3-epoch run
    saved_run(runs, "weighting", "old-seed0")  # this experiment's own folder is not searched
    (runs / "transfer").mkdir()
    (runs / "transfer" / "imagenet-seed0").symlink_to("../mtl-vs-single/mtl-seed0")  # counts once, as its target
    learned = [run_config(runs, "weighting", f"learned-seed{seed}", f"seed={seed}") for seed in (0, 1)]

    assert link_reused_runs(learned, runs / "weighting") == {"learned-seed0": "../lambda/lambda-0.1-seed0"}
    link = runs / "weighting" / "learned-seed0"
    assert os.readlink(link) == "../lambda/lambda-0.1-seed0" and link.resolve() == runs / "lambda" / "lambda-0.1-seed0"
    assert not (runs / "weighting" / "learned-seed1").exists()  # no run of seed 1 anywhere: it trains
    assert capsys.readouterr().out == (
        "learned-seed0: same config as ../lambda/lambda-0.1-seed0 (finished; also ../mtl-vs-single/mtl-seed0, "
        "the first by path is taken): reused, not trained\n")


def test_a_link_stays_while_it_is_a_finished_run_of_the_arm_and_goes_otherwise_or_without_reuse(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = tmp_path / "runs"
    mtl = saved_run(runs, "mtl-vs-single", "mtl-seed0")
    experiment, link = runs / "weighting", runs / "weighting" / "learned-seed0"
    experiment.mkdir()
    learned = run_config(runs, "weighting", "learned-seed0")
    record_links(experiment, link_reused_runs([learned], experiment))
    capsys.readouterr()

    assert link_reused_runs([learned], experiment) == {"learned-seed0": "../mtl-vs-single/mtl-seed0"}
    assert link.is_symlink()
    assert capsys.readouterr().out == "learned-seed0: reuses ../mtl-vs-single/mtl-seed0 (finished), as linked before\n"

    longer = run_config(runs, "weighting", "learned-seed0", "max_epochs=3")  # would extend the other experiment's run
    assert link_reused_runs([longer], experiment) == {}
    assert not link.exists() and not link.is_symlink() and (mtl / METRICS_FILE).exists()
    assert "link to ../mtl-vs-single/mtl-seed0 removed (not a finished run of this config any more)" in \
        capsys.readouterr().out

    record_links(experiment, link_reused_runs([learned], experiment))
    assert link_reused_runs([learned], experiment, reuse=False) == {}
    assert not link.is_symlink() and not link.exists()
    assert "learned-seed0: link to ../mtl-vs-single/mtl-seed0 removed (--no-reuse)\n" in capsys.readouterr().out


def test_a_link_the_user_made_is_a_run_folder_like_any_other_not_reuses_to_remove(tmp_path: Path) -> None:
    scratch = saved_run(tmp_path / "scratch", "big-disk", "learned-seed0", epochs_run=1)  # unfinished: it resumes
    experiment = tmp_path / "runs" / "weighting"
    experiment.mkdir(parents=True)
    (experiment / "learned-seed0").symlink_to(scratch)
    saved_run(tmp_path / "runs", "mtl-vs-single", "mtl-seed0")  # a finished run of the same config
    learned = run_config(tmp_path / "runs", "weighting", "learned-seed0")
    for reuse in (True, False):
        assert link_reused_runs([learned], experiment, reuse) == {}
        assert os.readlink(experiment / "learned-seed0") == str(scratch)


def test_arms_of_one_config_share_a_config_claim_and_status_names_who_trains_it(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    training = saved_run(runs, "freeze", "early-freeze-seed0", epochs_run=1)  # 1 of 2 epochs so far
    experiment = runs / "lambda"
    arms = [run_config(runs, "lambda", f"lambda-0.1-seed{seed}", f"seed={seed}") for seed in (0, 1)]
    early_freeze = load_config(training / CONFIG_FILE)
    assert config_claim_path(experiment, arms[0]) == config_claim_path(runs / "freeze", early_freeze)
    assert config_claim_path(experiment, arms[0]) != config_claim_path(experiment, arms[1])
    assert sibling_in_training(arms[0], experiment, sibling_run_configs(experiment)) is None  # nobody holds it
    holder = hold_claim(config_claim_path(runs / "freeze", early_freeze))  # freeze's invocation trains it
    try:
        where, held_by = sibling_in_training(arms[0], experiment, sibling_run_configs(experiment))
        assert where == training.resolve() and held_by["pid"] == holder.pid
        state = run_state(arms[0], experiment, sibling_run_configs(experiment))  # what --status shows
        assert state.describe().startswith(f"1 of 2 epochs as ../freeze/early-freeze-seed0, in training by pid "
                                           f"{holder.pid} on ") and state.describe().endswith("(a run of this config)")
        assert not state.finished
        assert run_state(arms[0], experiment, siblings=None).describe() == "not started"  # --no-reuse
        assert link_reused_runs(arms, experiment) == {}  # not finished: nothing to link yet
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert sibling_in_training(arms[0], experiment, sibling_run_configs(experiment)) is None


def finished_mtl_vs_single(synthetic_shards, tmp_path: Path) -> list[str]:
    """The arguments of a two-task, one-epoch experiment on synthetic UTKFace, whose ``mtl-vs-single`` (MTL and
    single-age) has been trained under ``tmp_path``: the MTL run is the one other experiments reuse."""
    overrides = tiny_overrides({"utk": synthetic_shards["utk"]}, tmp_path, "unused", "data.tasks=[age,gender]",
                               "max_epochs=1", "data.loader_workers=0")
    common = ["--config", str(REPO / "configs" / "demo.yaml"), *overrides, "--local"]
    assert main(["mtl-vs-single", *common, "--single-tasks", "age"]) == 0
    return common


@pytest.mark.slow
def test_freeze_with_chosen_arms_trains_none_only_beside_the_reused_mtl_run_and_keeps_its_table_apart(
        synthetic_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_torch_thread) -> None:
    common = finished_mtl_vs_single(synthetic_shards, tmp_path)
    capsys.readouterr()
    experiment = tmp_path / "freeze"
    experiment.mkdir()
    (experiment / "table.md").write_text("the whole experiment's table\n")  # as a finished `freeze` leaves it
    assert main(["freeze", *common, "--arms", "none", "--baseline", "early-freeze"]) == 0
    out = capsys.readouterr().out
    assert "freeze: 2 arm(s) x 1 seed(s)" in out and out.count("trained 1 epoch(s)") == 1
    assert "early-freeze-seed0: same config as ../mtl-vs-single/mtl-seed0 (finished): reused" in out
    selection = experiment / "selections" / "none-vs-early-freeze"
    assert f"Results in {selection}:" in out
    table = (selection / "table.md").read_text()
    rows = [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["| model", "| early-freeze", "| none", "| chance"]
    assert "Δm vs early-freeze (%)" in table and "| early-freeze | " in table and " ref. |" in table
    assert (selection / "plot.png").is_file() and (selection / "results.parquet").is_file()
    assert (experiment / "table.md").read_text() == "the whole experiment's table\n"
    assert sorted(path.name for path in experiment.glob("*-seed0")) == ["early-freeze-seed0", "none-seed0"]
    assert main(["freeze", *common, "--arms", "none", "--baseline", "none"]) == 0  # trains nothing: none is finished
    assert "trained 1 epoch(s)" not in capsys.readouterr().out
    assert "| none | " in (experiment / "selections" / "none" / "table.md").read_text()
    assert (selection / "table.md").read_text() == table
    assert main(["freeze", *common, "--arms", "none", "--baseline", "early-frozen"]) == 1
    assert "freeze has no arm early-frozen; its arms: early-freeze, early-stop, none" in capsys.readouterr().err


@pytest.mark.slow
def test_weighting_reuses_the_finished_mtl_run_of_mtl_vs_single_and_no_reuse_trains_it_in_its_own_folder(
        synthetic_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_torch_thread) -> None:
    common = finished_mtl_vs_single(synthetic_shards, tmp_path)
    mtl = tmp_path / "mtl-vs-single" / "mtl-seed0"
    mtl_metrics_mtime = (mtl / METRICS_FILE).stat().st_mtime_ns
    capsys.readouterr()

    weighting = ["weighting", *common, "--weightings", "learned"]  # equal, the baseline, and learned
    assert main(weighting) == 0
    out = capsys.readouterr().out
    experiment = tmp_path / "weighting"
    learned, equal = experiment / "learned-seed0", experiment / "equal-seed0"
    assert "learned-seed0: same config as ../mtl-vs-single/mtl-seed0 (finished): reused, not trained" in out
    assert learned.is_symlink() and learned.resolve() == mtl.resolve()
    assert not equal.is_symlink() and (equal / METRICS_FILE).exists()
    assert "equal-seed0: trained 1 epoch(s)" in out and "learned-seed0: trained" not in out
    assert (mtl / METRICS_FILE).stat().st_mtime_ns == mtl_metrics_mtime

    def validation_metrics(results: Path, arm: str) -> dict:
        (record,) = [r for r in pq.read_table(results).to_pylist() if r["arm"] == arm]
        return {key: value for key, value in record.items() if key.startswith("val/")}

    reused = validation_metrics(experiment / "results.parquet", "learned")
    assert reused and reused == validation_metrics(tmp_path / "mtl-vs-single" / "results.parquet", "mtl")

    def task_cells(table: Path, row: str) -> list[str]:  # the per-task cells, without Δm (another baseline)
        line = next(line for line in table.read_text().splitlines() if line.startswith(f"| {row} |"))
        return line.split(" | ")[1:3]

    assert task_cells(experiment / "table.md", "learned") == task_cells(tmp_path / "mtl-vs-single" / "table.md", "MTL")
    invocation = json.loads((experiment / "invocations.jsonl").read_text().splitlines()[-1])
    assert invocation["reused_runs"] == {"learned-seed0": "../mtl-vs-single/mtl-seed0"}

    assert main([*weighting, "--split", "test"]) == 0  # the link is this arm's finished run: skipped, evaluated
    out = capsys.readouterr().out
    assert "learned-seed0: reuses ../mtl-vs-single/mtl-seed0 (finished), as linked before" in out
    assert out.count("finished, skipped") == 2 and "trained 1 epoch(s)" not in out
    assert (mtl / "evaluation" / "test" / "metrics.json").exists()
    assert "| learned | " in (experiment / "table-test.md").read_text()

    # Another lr for the whole experiment: the link to the MTL run is removed, not refused; the arm's own
    # folder of the old config is what refuses the experiment, before anything trains.
    assert main([*weighting, "optim.lr=0.5"]) == 1
    assert "learned-seed0: link to ../mtl-vs-single/mtl-seed0 removed" in capsys.readouterr().out
    assert not learned.is_symlink() and not learned.exists()
    assert main(weighting) == 0  # the old config again: linked again
    assert learned.is_symlink()
    capsys.readouterr()

    assert main([*weighting, "--no-reuse"]) == 0
    out = capsys.readouterr().out
    assert "learned-seed0: link to ../mtl-vs-single/mtl-seed0 removed (--no-reuse)" in out
    assert "equal-seed0: finished, skipped" in out and "learned-seed0: trained 1 epoch(s)" in out
    assert not learned.is_symlink() and (learned / METRICS_FILE).exists()
    assert load_config(learned / CONFIG_FILE).name == "learned-seed0"
    assert load_config(mtl / CONFIG_FILE).name == "mtl-seed0"
    assert (mtl / METRICS_FILE).stat().st_mtime_ns == mtl_metrics_mtime
    assert json.loads((experiment / "invocations.jsonl").read_text().splitlines()[-1])["reused_runs"] == {}


def test_two_invocations_starting_together_make_the_same_link_once_or_keep_the_others_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    saved_run(runs, "mtl-vs-single", "mtl-seed0")
    arm = run_config(runs, "weighting", "learned-seed0")
    (runs / "weighting").mkdir()
    import pipeline.experiment_reuse as reuse

    siblings = reuse.sibling_run_configs

    def another_invocation_first(experiment_dir: Path):  # between this one's look and its link
        os.symlink("../mtl-vs-single/mtl-seed0", arm.run_dir)
        return siblings(experiment_dir)

    monkeypatch.setattr(reuse, "sibling_run_configs", another_invocation_first)
    assert link_reused_runs([arm], runs / "weighting") == {"learned-seed0": "../mtl-vs-single/mtl-seed0"}
    assert os.readlink(arm.run_dir) == "../mtl-vs-single/mtl-seed0"

    os.unlink(arm.run_dir)

    def another_invocation_trains_it(experiment_dir: Path):
        arm.run_dir.mkdir()
        return siblings(experiment_dir)

    monkeypatch.setattr(reuse, "sibling_run_configs", another_invocation_trains_it)
    assert link_reused_runs([arm], runs / "weighting") == {}
    assert arm.run_dir.is_dir() and not arm.run_dir.is_symlink()


@pytest.mark.slow
def test_weighting_leaves_the_run_another_experiment_trains_to_it_then_links_it_or_trains_it_when_that_one_fails(
        synthetic_shards, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        one_torch_thread) -> None:
    import shutil

    from pipeline.experiment_arms import arm_overrides, experiment_arms
    from pipeline.train import main as train_main

    overrides = tiny_overrides({"utk": synthetic_shards["utk"]}, tmp_path, "unused", "data.tasks=[age,gender]",
                               "max_epochs=1", "data.loader_workers=0")
    config_path = str(REPO / "configs" / "demo.yaml")
    weighting = ["weighting", "--config", config_path, *overrides, "--local", "--weightings", "learned,dwa"]
    (mtl_arm,) = [arm for arm in experiment_arms("mtl-vs-single", ["age", "gender"], {"age": []}, ["age"])
                  if arm.name == "mtl"]
    mtl_argv = ["--config", config_path, *overrides, *arm_overrides(mtl_arm, 0, tmp_path / "mtl-vs-single"), "--local"]
    mtl_config = with_absolute_paths(load_config(config_path, mtl_argv[2:-1]))
    mtl = mtl_config.run_dir
    experiment, learned = tmp_path / "weighting", tmp_path / "weighting" / "learned-seed0"
    holder: list[subprocess.Popen] = []

    def mtl_vs_single_starts_training() -> None:  # as its invocation does: the config claimed, config.yaml written
        holder.append(hold_claim(config_claim_path(tmp_path / "mtl-vs-single", mtl_config)))
        save_config(mtl_config, mtl / CONFIG_FILE)

    def when_training(arm: str, then) -> None:  # ``then`` happens as this invocation starts training ``arm``
        def train(argv: list[str]) -> int:
            if f'name="{arm}-seed0"' in argv:
                then()
            return train_main(argv)
        monkeypatch.setattr("pipeline.experiments.train_main", train)

    def mtl_finishes() -> None:
        assert train_main(mtl_argv) == 0
        holder[-1].stdin.close()
        holder[-1].wait(timeout=30)

    # mtl-vs-single starts its MTL run after this invocation began (while equal trains) and finishes it while dwa
    # trains: learned, between them, is left to it and linked at the end; the table is written.
    def start_now_and_finish_at_dwa() -> None:
        mtl_vs_single_starts_training()
        when_training("dwa", mtl_finishes)

    when_training("equal", start_now_and_finish_at_dwa)
    assert main(weighting) == 0
    out = capsys.readouterr().out
    assert f"learned-seed0: a run of this config is in training by pid {holder[-1].pid} on " in out
    assert "learned-seed0: same config as ../mtl-vs-single/mtl-seed0 (finished): reused, not trained" in out
    assert out.index("dwa-seed0: trained") < out.index("reused, not trained")
    assert learned.is_symlink() and learned.resolve() == mtl.resolve() and (experiment / "table.md").exists()
    late = json.loads((experiment / "invocations.jsonl").read_text().splitlines()[-1])
    assert late["linked_at_end"] and late["reused_runs"] == {"learned-seed0": "../mtl-vs-single/mtl-seed0"}
    assert main(weighting) == 0 and "reuses ../mtl-vs-single/mtl-seed0 (finished), as linked before" in \
        capsys.readouterr().out  # a later invocation keeps the link recorded at the end

    # Still in training when this invocation ends: left out, no table, and the command says what to do.
    monkeypatch.undo()
    shutil.rmtree(experiment)
    shutil.rmtree(mtl)
    mtl_vs_single_starts_training()
    try:
        assert main(weighting) == 0
        out = capsys.readouterr().out
        assert "not finished: learned-seed0, held by another process" in out and "learned-seed0: trained" not in out
        assert (f"learned-seed0: a run of its config is in training by pid {holder[-1].pid} on ") in out
        assert "run this command again once it has finished" in out
        assert not learned.exists() and not (experiment / "table.md").exists()
        assert main([*weighting, "--status"]) == 0
        assert re.search(rf"learned-seed0 +0 of 1 epochs as ../mtl-vs-single/mtl-seed0, in training by pid "
                         rf"{holder[-1].pid} on .+ \(a run of this config\)", capsys.readouterr().out)
    finally:
        holder[-1].kill()
        holder[-1].wait(timeout=30)

    # Its process fails while this invocation trains: learned is trained here at the end, in its own folder.
    shutil.rmtree(experiment)
    mtl_vs_single_starts_training()
    when_training("dwa", lambda: (holder[-1].kill(), holder[-1].wait(timeout=30)))
    assert main(weighting) == 0
    out = capsys.readouterr().out
    assert out.index("learned-seed0: a run of this config is in training") < out.index("dwa-seed0: trained")
    assert out.index("dwa-seed0: trained") < out.index("learned-seed0: trained 1 epoch(s)")
    assert (experiment / "table.md").exists() and not (mtl / METRICS_FILE).exists()
    assert not learned.is_symlink() and (learned / METRICS_FILE).exists()


def test_the_keys_owned_by_one_weighting_are_the_ones_only_it_reads() -> None:
    from pipeline.config import WEIGHTING_ONLY_KEYS
    from pipeline.losses import WEIGHTINGS
    from pipeline.loop import weighting_options

    values = {"loss.lam": "0.5", "loss.fixed_weights": "{age: 1.0}", "loss.dwa_temperature": "3.0",
              "loss.famo_lr": "0.5", "loss.famo_weight_decay": "0.5", "loss.gradnorm_alpha": "0.5",
              "loss.dbmtl_beta": "0.5", "loss.dbmtl_beta_sigma": "0.5"}
    assert set(values) == {key for keys in WEIGHTING_ONLY_KEYS.values() for key in keys}
    for weighting in WEIGHTINGS:
        base = weighting_options(load_config(None, [f"loss.weighting={weighting}"]))
        for key, value in values.items():
            reads = weighting_options(load_config(None, [f"loss.weighting={weighting}", f"{key}={value}"])) != base
            assert reads == (key in WEIGHTING_ONLY_KEYS.get(weighting, ())), (weighting, key)
