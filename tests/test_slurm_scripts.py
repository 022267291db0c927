"""The daemon bookkeeping of tests/slurm/lib.sh, under the `set -euo pipefail` that up.sh and down.sh run
with. A session's daemons die with it and leave their pid files behind; the next `up.sh` must treat such
a file as "not running" and start the daemon, not exit silently (which is how one CI run failed)."""

import subprocess
import sys
from pathlib import Path

import pytest

LIB = Path(__file__).parent / "slurm" / "lib.sh"


def _run_lib(script: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-c", f"set -euo pipefail; source {LIB}; {script}"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_pid_file_naming_a_dead_process_is_not_alive(tmp_path: Path) -> None:
    pid_file = tmp_path / "munged.pid"
    pid_file.write_text(f"{_dead_pid()}\n")
    result = _run_lib(f"if pid_alive {pid_file} munged; then echo alive; else echo dead; fi; echo went-on")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dead", "went-on"]


def test_a_running_process_is_alive_only_under_its_own_name(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        pid_file = tmp_path / "sleep.pid"
        pid_file.write_text(f"{sleeper.pid}\n")
        result = _run_lib(
            f"pid_alive {pid_file} sleep && echo as-sleep; pid_alive {pid_file} slurmd || echo not-as-slurmd"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == ["as-sleep", "not-as-slurmd"]
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.parametrize("content", ["", "not-a-pid", "12 34"])
def test_an_empty_or_garbled_pid_file_is_not_alive(tmp_path: Path, content: str) -> None:
    pid_file = tmp_path / "slurmctld.pid"
    pid_file.write_text(content)
    result = _run_lib(f"pid_alive {pid_file} slurmctld || echo dead")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["dead"]


def test_stop_daemon_on_a_stale_pid_file_removes_it_and_goes_on(tmp_path: Path) -> None:
    pid_file = tmp_path / "slurmdbd.pid"
    pid_file.write_text(f"{_dead_pid()}\n")
    result = _run_lib(f"stop_daemon {pid_file} slurmdbd; echo went-on")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["went-on"]
    assert not pid_file.exists()


def test_stop_daemon_stops_a_running_process(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    pid_file = tmp_path / "sleep.pid"
    pid_file.write_text(f"{sleeper.pid}\n")
    # The test process is the parent, so reap the child while stop_daemon waits for it to go.
    result = subprocess.Popen(
        ["bash", "-c", f"set -euo pipefail; source {LIB}; stop_daemon {pid_file} sleep; echo stopped"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sleeper.wait(timeout=30) == -15
    out, _ = result.communicate(timeout=30)
    assert result.returncode == 0
    assert out.split()[-1] == "stopped"
    assert not pid_file.exists()
