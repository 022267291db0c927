"""What made a result: the code's commit and the software it ran on, for the records a run or an experiment keeps."""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shlex
import socket
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
STARTS_FILE = "starts.jsonl"  # one line per start of a run: a resumed run may have run on other code
PACKAGES = ("torch", "torchvision", "ray", "webdataset", "numpy", "simplejpeg")


def git_commit(repo: Path = REPOSITORY) -> str:
    """The checked-out commit of ``repo`` ("+changes" when the tree differs from it), or "unknown"."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None where it is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_description() -> dict[str, Any]:
    """The CPU model, the instruction set torch's CPU kernels use and torch's thread count: the same config and
    seed give other numbers on another CPU (other kernels, other rounding), so a result records which."""
    model = platform.processor() or "unknown"
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"model": model, "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads()}


def start_record(command: Sequence[str]) -> dict[str, Any]:
    """One start of a run: when, the exact command and the folder it ran in (its paths may be relative), the
    commit, the host, its CPU, Python and the packages."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": shlex.join(command), "cwd": os.getcwd(),
            "commit": git_commit(), "host": socket.gethostname(), "cpu": cpu_description(),
            "python": platform.python_version(), "packages": package_versions()}


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line under an exclusive ``flock``: lines of processes appending at once (invocations sharing
    an experiment) never interleave, also on NFS, where O_APPEND alone does not make appends atomic."""
    line = (json.dumps(record) + "\n").encode()
    with path.open("ab", buffering=0) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        written = 0
        while written < len(line):
            written += handle.write(line[written:])


def record_start(run_dir: Path, command: Sequence[str]) -> None:
    """Append this start to ``run_dir/starts.jsonl``."""
    append_record(run_dir / STARTS_FILE, start_record(command))


def read_records(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of an appended record file (starts.jsonl, invocations.jsonl); none where it is absent. A
    line cut short by a crash is skipped, not fatal: these files trace results, they are not results."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def read_starts(run_dir: Path) -> list[dict[str, Any]]:
    """The start records of ``run_dir`` (none for a run made before they were kept)."""
    return read_records(run_dir / STARTS_FILE)
