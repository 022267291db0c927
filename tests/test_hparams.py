"""tune.hparams as TensorBoard sees it: a real ``tensorboard`` server's HParams API lists the search's
hyperparameters and metrics, and one session per trial with its values, also for a resumed trial."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import metadata
from torch.utils.tensorboard import SummaryWriter

from pipeline.run_records import TENSORBOARD_DIR
from tune.hparams import EXPERIMENT_FILE, TrialHParams, hparam_infos, write_search_experiment
from tune.space import load_space

TASKS = ("age", "gender")
METRICS = ["objective", "val/age/mae", "val/gender/accuracy", "val/total_loss"]
EPOCHS = 3
# trial_id: its sampled values, and the offset of its (made-up) metric values
TRIALS = {
    "trial_a": ({"lr": 1e-4, "lam": 0.01, "patience": 2}, 0.0),
    "trial_b": ({"lr": 3e-3, "lam": 0.5, "patience": 7}, 1.0),
    "trial_resumed": ({"lr": 2e-5, "lam": 0.1, "patience": 4}, 2.0),
}
ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
DEADLINE_S = 60.0


def epoch_metrics(offset: float, epoch: int) -> dict[str, float]:
    """Values exact in float32 (TensorBoard stores scalars as float32)."""
    return {"objective": 0.25 + 0.125 * epoch + offset / 16, "val/age/mae": 8.0 - epoch - offset,
            "val/gender/accuracy": 0.5 + 0.125 * epoch, "val/total_loss": 2.0 - 0.5 * epoch + offset}


def train_epochs(log_dir: Path, session: TrialHParams, offset: float, epochs: range) -> None:
    """What a trial writes per epoch: RunRecorder's scalars and the session's objective, in the same run."""
    writer = SummaryWriter(str(log_dir))
    for epoch in epochs:
        values = epoch_metrics(offset, epoch)
        for tag in METRICS[1:]:
            writer.add_scalar(tag, values[tag], epoch)
        session.record(epoch, values["objective"])
    writer.close()


def trial_log_dir(search_dir: Path, trial_id: str) -> Path:
    return search_dir / trial_id / "train" / TENSORBOARD_DIR


def session_starts_in(log_dir: Path) -> int:
    return sum(value.tag == metadata.SESSION_START_INFO_TAG
               for path in log_dir.glob("*tfevents*")
               for event in EventFileLoader(str(path)).Load() for value in event.summary.value)


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A search of three finished trials; the last was interrupted after epoch 1 and resumed from epoch 1.
    Its interrupted run wrote other values (offset - 0.5), so the final values say which run TensorBoard kept."""
    root = tmp_path_factory.mktemp("search")
    write_search_experiment(root, load_space(None, []), TASKS)
    for trial_id, (hparams, offset) in TRIALS.items():
        log_dir = trial_log_dir(root, trial_id)
        if trial_id == "trial_resumed":
            interrupted = TrialHParams(log_dir, hparams)
            train_epochs(log_dir, interrupted, offset - 0.5, range(2))
            interrupted.writer.close()  # the process dies: its files stay, no session end
            # A resumed trial starts seconds later in another process. Event files are read in name order
            # (time in seconds, host, pid, then a per-process counter that sorts "10" before "9"): in this
            # one process, only a later second keeps the resumed run's files after the interrupted one's.
            time.sleep(1.1)
        session = TrialHParams(log_dir, hparams)
        train_epochs(log_dir, session, offset, range(1 if trial_id == "trial_resumed" else 0, EPOCHS))
        session.close()
    write_search_experiment(root, load_space(None, []), TASKS)  # a resumed search writes it again
    return root


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(base_url: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(f"{base_url}/data/plugin/hparams/{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def session_groups(base_url: str) -> list[dict[str, Any]]:
    body = {"startIndex": 0, "sliceSize": 100, "allowedStatuses": ALL_STATUSES}
    return post(base_url, "session_groups", body).get("sessionGroups", [])


def loaded(groups: list[dict[str, Any]]) -> bool:
    """Every trial's session with every metric at its last epoch: TensorBoard has read all event files."""
    final_steps = [metric["trainingStep"] for group in groups for metric in group["metricValues"]]
    return len(groups) == len(TRIALS) and final_steps == [EPOCHS - 1] * len(TRIALS) * len(METRICS)


@contextlib.contextmanager
def running_tensorboard(logdir: Path, load_fast: str) -> Iterator[tuple[str, Path]]:
    """``tensorboard --logdir`` with its Python (load_fast false) or Rust (true) data loader: its URL and log."""
    port, log = free_port(), logdir.parent / f"tensorboard-{logdir.name}-{load_fast}.log"
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
               "--port", str(port), f"--load_fast={load_fast}", "--reload_interval", "1"]
    with log.open("w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}", log
    finally:
        server.kill()  # its Rust data server, if any, exits with it (it dies when its stdin closes)
        server.wait()


def wait_for_sessions(base_url: str, log: Path, ready: Callable[[list[dict[str, Any]]], bool]) -> None:
    """Polls the session groups until ``ready`` holds (TensorBoard loads and reloads in the background)."""
    deadline, groups = time.monotonic() + DEADLINE_S, []
    while time.monotonic() < deadline:
        try:
            groups = session_groups(base_url)
        except (urllib.error.URLError, ConnectionError):
            groups = []  # not listening yet
        if ready(groups):
            return
        time.sleep(0.2)
    pytest.fail(f"tensorboard did not show the expected sessions within {DEADLINE_S:.0f} s; last: {groups}\n"
                f"{log.read_text()[-3000:]}")


@pytest.fixture(scope="module", params=["false", "true"], ids=["python-loader", "rust-loader"])
def tensorboard_url(request: pytest.FixtureRequest, search_dir: Path) -> Iterator[str]:
    """A TensorBoard on the search, once it has loaded all of it."""
    with running_tensorboard(search_dir, request.param) as (base_url, log):
        wait_for_sessions(base_url, log, loaded)
        yield base_url


@pytest.mark.slow
def test_experiment_lists_the_sampled_hyperparameters_with_their_domains_and_the_metrics(tensorboard_url: str) -> None:
    experiment = post(tensorboard_url, "experiment", {})
    domains = {info["name"]: (info["type"], info["domainInterval"]) for info in experiment["hparamInfos"]}
    assert domains == {
        "lr": ("DATA_TYPE_FLOAT64", {"minValue": 1e-5, "maxValue": 1e-2}),
        "lam": ("DATA_TYPE_FLOAT64", {"minValue": 1e-3, "maxValue": 1.0}),
        "patience": ("DATA_TYPE_FLOAT64", {"minValue": 2, "maxValue": 10}),
    }
    assert [info["name"]["tag"] for info in experiment["metricInfos"]] == METRICS
    infos = experiment["hparamInfos"] + experiment["metricInfos"]
    assert all(info["displayName"] and info["description"] for info in infos)


@pytest.mark.slow
def test_every_trial_is_one_session_with_its_values_and_final_metrics(tensorboard_url: str) -> None:
    groups = {group["name"]: group for group in session_groups(tensorboard_url)}
    assert sorted(groups) == sorted(f"{trial_id}/train/{TENSORBOARD_DIR}" for trial_id in TRIALS)
    for trial_id, (hparams, offset) in TRIALS.items():
        group = groups[f"{trial_id}/train/{TENSORBOARD_DIR}"]
        assert group["hparams"] == hparams
        [session] = group["sessions"]
        assert session["status"] == "STATUS_SUCCESS"
        final = {metric["name"]["tag"]: metric["value"] for metric in session["metricValues"]}
        assert final == epoch_metrics(offset, EPOCHS - 1)


@pytest.mark.slow
def test_a_resumed_trial_stays_one_session_with_the_values_of_its_last_run(
        tensorboard_url: str, search_dir: Path) -> None:
    assert session_starts_in(trial_log_dir(search_dir, "trial_resumed")) == 1
    [group] = [group for group in session_groups(tensorboard_url) if group["name"].startswith("trial_resumed/")]
    [session] = group["sessions"]
    assert group["hparams"] == TRIALS["trial_resumed"][0]
    assert session["status"] == "STATUS_SUCCESS"
    final = {metric["name"]["tag"]: (metric["trainingStep"], metric["value"]) for metric in session["metricValues"]}
    assert final["objective"] == (EPOCHS - 1, epoch_metrics(TRIALS["trial_resumed"][1], EPOCHS - 1)["objective"])


@pytest.mark.slow
def test_a_running_tensorboard_follows_a_trial_as_it_trains(tmp_path: Path) -> None:
    """The Rust loader (tensorboard's default where tensorboard-data-server is installed) reads all event files
    of a run as they grow; the Python loader reads one at a time and sees the rest only when restarted."""
    search = tmp_path / "live"
    write_search_experiment(search, load_space(None, []), TASKS)
    log_dir = trial_log_dir(search, "trial_live")
    with running_tensorboard(search, "true") as (base_url, log):
        session = TrialHParams(log_dir, TRIALS["trial_a"][0])
        train_epochs(log_dir, session, 0.0, range(1))
        wait_for_sessions(base_url, log, lambda groups: final_state(groups) == ("STATUS_UNKNOWN", 0))
        train_epochs(log_dir, session, 0.0, range(1, EPOCHS))
        session.close()
        wait_for_sessions(base_url, log, lambda groups: final_state(groups) == ("STATUS_SUCCESS", EPOCHS - 1))


def final_state(groups: list[dict[str, Any]]) -> tuple[str, int] | None:
    """The one session's status and the step of its last objective, once TensorBoard has both."""
    if len(groups) != 1 or len(groups[0]["metricValues"]) != len(METRICS):
        return None
    [session] = groups[0]["sessions"]
    objective = next(metric for metric in session["metricValues"] if metric["name"]["tag"] == "objective")
    return session.get("status", "STATUS_UNKNOWN"), objective["trainingStep"]


def test_the_search_experiment_is_one_file_however_often_it_is_written(tmp_path: Path) -> None:
    space = load_space(None, [])
    for _ in range(3):
        write_search_experiment(tmp_path, space, TASKS)
    assert [path.name for path in tmp_path.iterdir()] == [EXPERIMENT_FILE]


def test_a_lambda_grid_and_a_weighting_choice_are_discrete_domains() -> None:
    space = load_space(None, ["space.lam_grid=[0.001, 0.1]", "space.weighting=[learned, equal]"])
    discrete = {info.name: list(info.domain_discrete) for info in hparam_infos(space)
                if info.HasField("domain_discrete")}
    assert discrete == {"lam": [0.001, 0.1], "weighting": ["learned", "equal"]}


@pytest.mark.slow
def test_a_real_search_shows_every_trial_with_its_sampled_values_in_the_hparams_view(finished_search: Path) -> None:
    """``tune.search`` wires it together: every trial of the shared search is a session with the values of
    trials.parquet and its objective at its last epoch; the experiment names each task's metric."""
    import pyarrow.parquet as pq

    rows = pq.read_table(finished_search / "trials.parquet").to_pylist()
    last_rows = {row["trial_id"]: row for row in sorted(rows, key=lambda row: row["epoch"])}

    def every_trial_at_its_last_epoch(groups: list[dict[str, Any]]) -> bool:
        steps = {group["name"].split("/")[0]: [m["trainingStep"] for m in group["metricValues"]
                                               if m["name"]["tag"] == "objective"]
                 for group in groups}
        return steps == {trial_id: [row["epoch"]] for trial_id, row in last_rows.items()}

    with running_tensorboard(finished_search, "true") as (base_url, log):
        wait_for_sessions(base_url, log, every_trial_at_its_last_epoch)
        experiment = post(base_url, "experiment", {})
        groups = session_groups(base_url)
    assert sorted(info["name"] for info in experiment["hparamInfos"]) == ["lam", "lr", "patience"]
    assert [info["name"]["tag"] for info in experiment["metricInfos"]] == [
        "objective", "val/age/mae", "val/gender/accuracy", "val/race/accuracy", "val/smile/accuracy",
        "val/young/accuracy", "val/emotion/accuracy", "val/total_loss"]
    for group in groups:
        row = last_rows[group["name"].split("/")[0]]
        assert group["hparams"] == pytest.approx({"lr": row["lr"], "lam": row["lam"], "patience": row["patience"]})
        [session] = group["sessions"]
        assert session["status"] == "STATUS_SUCCESS"
        final = {metric["name"]["tag"]: metric["value"] for metric in session["metricValues"]}
        assert final["objective"] == pytest.approx(row["objective"])
        # The training scalars are the run's own: a trial ASHA stops may finish the epoch under way, which
        # its metrics.parquet and TensorBoard record but Tune (trials.parquet) no longer hears of.
        trial_id = group["name"].split("/")[0]
        metrics_file = finished_search / trial_id / "train" / "metrics.parquet"
        if not metrics_file.exists():
            # A run writes its records after its report (pipeline/train.py: only epochs whose checkpoint is
            # persisted), so a trial ASHA stops at its first report may end before writing any.
            assert [r["epoch"] for r in rows if r["trial_id"] == trial_id] == [0], trial_id
            continue
        # metrics.parquet is written before the TensorBoard events (a stop between them leaves the table ahead)
        run_rows = {row["epoch"]: row for row in pq.read_table(metrics_file).to_pylist()}
        [age_mae] = [metric for metric in session["metricValues"] if metric["name"]["tag"] == "val/age/mae"]
        assert age_mae["trainingStep"] in run_rows, (trial_id, age_mae, sorted(run_rows))
        assert final["val/age/mae"] == pytest.approx(run_rows[age_mae["trainingStep"]]["val/age/mae"])
