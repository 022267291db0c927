"""Run claims: one process trains a run folder at a time, across processes, and a killed process frees its runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.run_claims import claim_holder, claim_path, claimed, describe_holder

REPO = Path(__file__).resolve().parents[1]
HOLD = ("import sys; from pathlib import Path; from pipeline.run_claims import claimed\n"
        "with claimed(Path(sys.argv[1])) as mine:\n    print(mine, flush=True); sys.stdin.read()")


def hold_claim(run_dir: Path) -> subprocess.Popen:
    """Another process that claims ``run_dir`` and holds the claim until its stdin closes."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "True"
    return holder


def test_a_run_claimed_by_another_process_is_refused_and_names_its_holder(tmp_path: Path) -> None:
    run_dir = tmp_path / "weighting" / "dwa-seed0"
    assert claim_holder(run_dir) is None  # never claimed: no file made by asking
    assert not claim_path(run_dir).exists()
    holder = hold_claim(run_dir)
    try:
        with claimed(run_dir) as mine:
            assert mine is False
        held_by = claim_holder(run_dir)
        assert held_by["pid"] == holder.pid and held_by["host"] == socket.gethostname()
        assert describe_holder(held_by).startswith(f"pid {holder.pid} on {socket.gethostname()} since 20")
        assert not run_dir.exists()  # the claim is beside the run folder, which the trainer creates
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert claim_holder(run_dir) is None  # released when the holder ends
    with claimed(run_dir) as mine:
        assert mine is True
        assert json.loads(claim_path(run_dir).read_text())["pid"] == os.getpid()
        assert describe_holder({}) == "another process"


def test_a_killed_holder_leaves_its_run_free(tmp_path: Path) -> None:
    run_dir = tmp_path / "dwa-seed0"
    holder = hold_claim(run_dir)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert claim_holder(run_dir) is None
    with claimed(run_dir) as mine:
        assert mine is True


def test_one_process_claims_a_run_once(tmp_path: Path) -> None:
    run_dir = tmp_path / "dwa-seed0"
    with claimed(run_dir) as first, claimed(run_dir) as second:  # two open files: two claims, one wins
        assert (first, second) == (True, False)
    with claimed(run_dir) as again:
        assert again is True


@pytest.mark.parametrize("content", [b"", b"not json"])
def test_a_claim_that_says_nothing_yet_names_another_process(tmp_path: Path, content: bytes) -> None:
    run_dir = tmp_path / "dwa-seed0"
    holder = hold_claim(run_dir)
    try:
        claim_path(run_dir).write_bytes(content)
        assert claim_holder(run_dir) == {}
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_lines_appended_by_processes_at_once_stay_whole(tmp_path: Path) -> None:
    """invocations.jsonl is appended by every invocation sharing an experiment: lines larger than any buffer
    (a config of many tasks, many shard summaries) from four processes at once each stay one whole line."""
    path = tmp_path / "invocations.jsonl"
    script = ("import sys; from pathlib import Path; from pipeline.provenance import append_record\n"
              "for k in range(40):\n"
              "    append_record(Path(sys.argv[1]), {'writer': sys.argv[2], 'k': k, 'pad': 'x' * 300000})")
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path), str(w)], cwd=REPO) for w in range(4)]
    assert [writer.wait(timeout=120) for writer in writers] == [0] * 4
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["writer"], r["k"]) for r in records) == sorted((str(w), k) for w in range(4) for k in range(40))


def test_a_forked_child_such_as_a_loader_worker_does_not_keep_its_parents_claim(tmp_path: Path) -> None:
    run_dir = tmp_path / "dwa-seed0"
    script = ("import os, sys, time; from pathlib import Path; from pipeline.run_claims import claimed\n"
              "with claimed(Path(sys.argv[1])) as mine:\n"
              "    child = os.fork()\n"
              "    if child == 0:\n        os.write(1, b'forked\\n'); time.sleep(60); os._exit(0)\n"
              "    os.write(1, f'{child}\\n'.encode()); sys.stdin.read()")  # one write each: lines never interleave
    parent = subprocess.Popen([sys.executable, "-c", script, str(run_dir)], cwd=REPO, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    # both lines, in either order: the child prints once its at-fork hook has run
    lines = {parent.stdout.readline().strip() for _ in range(2)}
    child = int((lines - {"forked"}).pop())
    try:
        assert claim_holder(run_dir)["pid"] == parent.pid
        parent.kill()
        parent.wait(timeout=30)
        os.kill(child, 0)  # the child lives on
        assert claim_holder(run_dir) is None
    finally:
        os.kill(child, signal.SIGKILL)
