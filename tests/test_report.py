"""The search report: leaderboard and curves computed by hand on small tables, then the whole command on a
real finished search, checked as files and as a page that headless Chromium renders."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageStat

from tune.report import (
    COMPLETED, STOPPED_EARLY, FreezeEvent, ParallelAxis, ReportPage, TrialWeightsSection, freeze_events,
    leaderboard_rows, loss_weight_curves, main, parallel_axes, render_report, uses_log_axis,
)

CHROMIUM = Path("/usr/bin/chromium")
SCREEN = (1280, 2400)


def epoch_row(trial_id: str, epoch: int, objective: float, age_mae: float, gender_accuracy: float, **extra) -> dict:
    return {"trial_id": trial_id, "epoch": epoch, "lr": 1e-3, "lam": 0.1, "patience": 4, "objective": objective,
            "val/age/mae": age_mae, "val/gender/accuracy": gender_accuracy, "val/total_loss": 2.0, **extra}


def test_leaderboard_ranks_trials_by_best_objective_and_reads_metrics_at_that_epoch() -> None:
    trials = pa.Table.from_pylist([
        epoch_row("a", 0, 0.20, 30.0, 0.50), epoch_row("a", 1, 0.50, 12.0, 0.70), epoch_row("a", 2, 0.40, 11.0, 0.60),
        epoch_row("b", 0, 0.60, 9.0, 0.80),
        epoch_row("c", 0, 0.30, 20.0, 0.55), epoch_row("c", 1, 0.10, 25.0, 0.52), epoch_row("c", 2, 0.30, 18.0, 0.58),
    ])
    rows = leaderboard_rows(trials, max_epochs=3)

    assert [row["trial_id"] for row in rows] == ["b", "a", "c"]
    b, a, c = rows
    assert (b["best_objective"], b["best_epoch"], b["epochs_run"], b["status"]) == (0.60, 0, 1, STOPPED_EARLY)
    assert (a["best_objective"], a["best_epoch"], a["epochs_run"], a["status"]) == (0.50, 1, 3, COMPLETED)
    assert (a["val/age/mae"], a["val/gender/accuracy"]) == (12.0, 0.70)  # epoch 1's, not the lowest MAE (epoch 2)
    assert c["best_epoch"] == 0 and c["val/age/mae"] == 20.0  # equal objectives: the earliest epoch
    assert (a["lr"], a["lam"], a["patience"]) == (1e-3, 0.1, 4) and "weighting" not in a


def test_a_trial_without_a_finite_objective_goes_last_and_weighting_is_listed_when_sampled() -> None:
    trials = pa.Table.from_pylist([
        epoch_row("nan", 0, math.nan, 50.0, 0.5, weighting="equal"),
        epoch_row("ok", 0, 0.1, 50.0, 0.5, weighting="learned"),
        epoch_row("ok", 1, 0.2, 40.0, 0.6, weighting="learned"),
    ])
    rows = leaderboard_rows(trials, max_epochs=2)

    assert [row["trial_id"] for row in rows] == ["ok", "nan"]
    assert rows[0]["weighting"] == "learned" and rows[0]["status"] == COMPLETED
    assert rows[1]["best_objective"] is None and rows[1]["best_epoch"] is None and rows[1]["val/age/mae"] is None


def test_freeze_events_are_read_from_the_json_list_of_each_epoch() -> None:
    epochs = [
        {"epoch": 0, "freeze/events": "[]", "weights/age": 0.5, "weights/gender": 0.5},
        {"epoch": 1, "freeze/events": json.dumps(["freeze_trunk:gender@1->0"]),
         "weights/age": 0.6, "weights/gender": 0.4},
        {"epoch": 2, "freeze/events": json.dumps(["freeze_head:age@2->1", "stop:smile@2->None"]),
         "weights/age": 0.7, "weights/gender": 0.3},
        {"epoch": 3, "freeze/events": None, "weights/age": 0.7, "weights/gender": math.nan},
    ]
    assert freeze_events(epochs) == [FreezeEvent(1, "freeze_trunk:gender@1->0"), FreezeEvent(2, "freeze_head:age@2->1"),
                                     FreezeEvent(2, "stop:smile@2->None")]
    assert loss_weight_curves(epochs) == {"age": [(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.7)],
                                          "gender": [(0, 0.5), (1, 0.4), (2, 0.3)]}


def test_parallel_axes_are_log_for_lr_and_lambda_and_categorical_for_weighting() -> None:
    rows = [{"lr": 1e-5, "lam": 0.0, "weighting": "learned", "best_objective": 0.2},
            {"lr": 1e-3, "lam": 0.5, "weighting": "equal", "best_objective": 0.4},
            {"lr": 1e-4, "lam": 1.0, "weighting": "learned", "best_objective": 0.3}]
    lr, lam, weighting, objective = parallel_axes(rows, ["lr", "lam", "weighting", "best_objective"])

    assert lr.log and [lr.position(row["lr"]) for row in rows] == pytest.approx([0.0, 1.0, 0.5])
    assert not lam.log and lam.position(0.5) == pytest.approx(0.5)  # a grid with λ = 0 cannot be log
    assert weighting.categories == ("equal", "learned") and weighting.position("learned") == 1.0
    assert objective.position(0.3) == pytest.approx(0.5)
    assert ParallelAxis("patience", 4, 4).position(4) == 0.5  # one value: the middle
    assert uses_log_axis("lr", [1e-4, 1e-2]) and not uses_log_axis("patience", [2, 10])


def test_every_text_from_the_search_is_escaped_in_the_html() -> None:
    hostile = '<script>alert("x")</script>'
    row = {"trial_id": hostile, "lr": 1e-3, "lam": 0.1, "patience": 2, "weighting": "<b>", "best_objective": 0.5,
           "best_epoch": 0, "epochs_run": 1, "status": STOPPED_EARLY, "val/age/mae": 9.0}
    page = ReportPage(
        name=hostile, search_dir=Path("/runs") / hostile, space_text=f"lr: {hostile}", max_epochs=3,
        best_config=Path("/runs/best_config.yaml"), rows=[row], tasks=["age"],
        hyperparameters=["lr", "lam", "patience", "weighting"], colours={hostile: '"red'},
        plots={hostile: 'a"b.png'},
        best_trials=[TrialWeightsSection(hostile, "weights_x.png", [FreezeEvent(0, hostile)], Path("m"))],
    )
    html = render_report(page)

    assert "<script>" not in html and "<b>" not in html and 'src="a"b.png"' not in html
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "python -m pipeline.train --config /runs/best_config.yaml" in html


def test_a_folder_that_is_not_a_search_is_refused_with_its_path(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'trials.parquet'} not found" in capsys.readouterr().err

    (tmp_path / "config.yaml").write_text("max_epochs: 3\n")
    pq.write_table(pa.table({"trial_id": pa.array([], pa.string()), "epoch": pa.array([], pa.int64())}),
                   tmp_path / "trials.parquet")
    assert main([str(tmp_path)]) == 2
    assert f"{tmp_path / 'trials.parquet'} holds no trial" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()


# --- The command on a real finished search ------------------------------------------------------------


@pytest.fixture(scope="module")
def report_html(finished_search: Path, tmp_path_factory) -> Path:
    """``python -m tune.report`` on the session's finished search, written outside the search folder."""
    out = tmp_path_factory.mktemp("report") / "search.html"
    assert main([str(finished_search), "--out", str(out), "--top", "3"]) == 0
    return out


def image_sources(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


@pytest.mark.slow
def test_the_report_of_a_real_search_lists_every_trial_and_links_valid_plots(finished_search: Path,
                                                                             report_html: Path) -> None:
    html = report_html.read_text()
    trial_ids = set(pq.read_table(finished_search / "trials.parquet").column("trial_id").to_pylist())
    assert len(trial_ids) == 4 and all(trial_id in html for trial_id in trial_ids)
    assert str(finished_search / "best_config.yaml") in html and "stopped early" in html

    sources = image_sources(html)
    assert {"objective.png", "val_loss.png", "hyperparameters.png", "parallel_coordinates.png"} <= set(sources)
    assert sum(source.startswith("weights_") for source in sources) == 3  # --top 3
    for source in sources:
        path = report_html.parent / source
        assert path.is_file(), f"<img src={source}> does not resolve"
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 400 and image.height >= 250
            assert len(image.convert("RGB").getcolors(1 << 24)) > 50  # drawn, not blank


@pytest.mark.slow
def test_the_report_goes_to_search_dir_report_by_default(finished_search: Path, tmp_path: Path, capsys) -> None:
    # A copy without checkpoints, so that the session's search folder stays as tune.search left it.
    search = tmp_path / "copied-search"
    shutil.copytree(finished_search, search, ignore=shutil.ignore_patterns("checkpoint_*", "*.pt", "tensorboard"))

    assert main([str(search)]) == 0
    written = search / "report" / "index.html"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(written)
    assert all((written.parent / source).is_file() for source in image_sources(written.read_text()))


# --- Rendered by a browser ----------------------------------------------------------------------------


def install_chromium() -> str | None:
    """Debian's chromium, installed with apt-get when missing; None, or the reason it cannot be had."""
    if CHROMIUM.exists():
        return None
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"{CHROMIUM} is missing and cannot be installed here (needs root and apt-get)"
    environment = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
        except subprocess.TimeoutExpired:
            return f"{' '.join(command)} took more than 600 s"
        if result.returncode != 0:
            return f"{' '.join(command)} exited {result.returncode}: {result.stderr[-1500:]}"
    return None if CHROMIUM.exists() else f"apt-get installed chromium but {CHROMIUM} is missing"


@pytest.fixture(scope="module")
def chromium() -> Path:
    """/usr/bin/chromium, installed when missing; skipped with the reason where it cannot be had (failed in CI)."""
    reason = install_chromium()
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return CHROMIUM


@pytest.mark.slow
def test_chromium_renders_the_report_as_a_non_blank_page(chromium: Path, report_html: Path, tmp_path: Path) -> None:
    screenshot = tmp_path / "report.png"
    result = subprocess.run(
        [str(chromium), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={SCREEN[0]},{SCREEN[1]}",
         f"--screenshot={screenshot}", report_html.as_uri()],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0 and screenshot.is_file(), result.stderr[-3000:]

    with Image.open(screenshot) as image:
        assert image.format == "PNG" and image.size == SCREEN
        pixels = image.convert("RGB")
        assert len(pixels.getcolors(1 << 24)) > 500  # text, tables and plots, not a blank or error page
        assert ImageStat.Stat(pixels.convert("L")).stddev[0] > 10
