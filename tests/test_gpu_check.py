"""bench/gpu_check.sh in its CPU mode: every step that can run without a GPU, on tiny inputs, so it cannot rot."""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def run_check(tmp_path: Path, *args: str, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH")]))
    return subprocess.run(["bash", str(SCRIPT), "--cpu", "--tiny", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


def table_rows(output: str) -> list[list[str]]:
    """The Markdown table's rows as cells (header and rule left out)."""
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def statuses_by_step(rows: list[list[str]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for step, _what, _rate, _ratio, status, _notes in rows:
        found.setdefault(step, set()).add(status)
    return found


@pytest.mark.slow
def test_cpu_tiny_mode_runs_every_step_and_prints_the_table(tmp_path: Path) -> None:
    result = run_check(tmp_path, "--no-ray")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    rows = table_rows(result.stdout)
    statuses = statuses_by_step(rows)
    assert set(statuses) == {"1", "2", "3", "4", "5", "6"}
    assert all(status <= {"ok", "skipped"} for status in statuses.values()), rows
    # measured steps carry a rate; the one step that needs CUDA says it was skipped and why
    assert all(float(rate.replace(",", "")) > 0 for _, _, rate, _, status, _ in rows if status == "ok")
    assert [(what, notes) for step, what, _, _, status, notes in rows if status == "skipped"] == [
        ("decode_jpeg(device='cuda'), batches of 8 (32 px, nvJPEG)", "no GPU in --cpu mode")]
    loader_rows = [what for step, what, *_ in rows if step == "2"]
    assert [what.split(", ")[1] for what in loader_rows] == ["1 loader worker(s)", "2 loader worker(s)"]
    train_rows = [(what, status, notes) for step, what, _, _, status, notes in rows if step == "6"]
    assert len(train_rows) == 3 and "resumes" in train_rows[1][0] and "identical" in train_rows[2][2]
    written = (tmp_path / "out" / "gpu_check.md").read_text()
    assert table_rows(written) == rows
    assert "==== train.log" in (tmp_path / "out" / "gpu_check_logs.txt").read_text()


@pytest.mark.slow
def test_a_failing_step_fails_the_run_and_says_why_in_its_row(tmp_path: Path) -> None:
    not_shards = tmp_path / "not-shards"
    not_shards.mkdir()
    result = run_check(tmp_path, "--steps", "3", "--shards", str(not_shards), "--no-ray")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    rows = table_rows(result.stdout)
    loader_rows = [row for row in rows if row[0] == "3" and "TaskBalancedStream" in row[1]]
    assert len(loader_rows) == 2
    assert all(row[4] == "FAIL" and "not a shard folder" in row[5] for row in loader_rows)
    assert any(row[0] == "3" and row[4] == "ok" for row in rows)  # the model alone still ran
    assert {row[4] for row in rows if row[0] != "3"} == {"skipped"}


@pytest.mark.slow
def test_a_missing_wheel_is_named_before_any_step_runs(tmp_path: Path) -> None:
    fake = tmp_path / "fake-site"
    fake.mkdir()
    (fake / "webdataset.py").write_text("raise ModuleNotFoundError('no webdataset here', name='webdataset')\n")
    result = run_check(tmp_path, "--steps", "6", extra_path=fake)
    assert result.returncode == 1
    assert "MISSING: pipeline.train needs 'webdataset'" in result.stdout
    step_6 = [row for row in table_rows(result.stdout) if row[0] == "6"]
    assert len(step_6) == 1 and step_6[0][4] == "FAIL" and "webdataset wheel in .whl/" in step_6[0][5]


def test_steps_outside_1_to_6_are_refused(tmp_path: Path) -> None:
    result = run_check(tmp_path, "--steps", "7")
    assert result.returncode == 2 and "steps must be a comma-separated subset of 1,2,3,4,5,6" in result.stderr


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed")
def test_ddp_step_runs_under_ray_train(tmp_path: Path) -> None:
    result = run_check(tmp_path, "--steps", "5")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    (step_5,) = [row for row in table_rows(result.stdout) if row[0] == "5"]
    assert step_5[4] == "ok" and "Ray Train TorchTrainer" in step_5[1] and "2 CPU processes" in step_5[1]
