"""Which process trains a run folder now: several invocations of one experiment (terminals, SLURM jobs on a shared
file system) can share its runs, each training the runs no other one holds.

A claim is an exclusive ``flock`` on ``.<run>.claim`` beside the run folder, held while the run trains and released
by the operating system when its process ends, however it ends (forked children close their copies at once), so a
killed job leaves no run claimed. The file stays (removing it would let a process that opened it just before lock a
file no one else sees) and says who holds it: pid, host and since when. On NFS, Linux takes ``flock`` as a POSIX
lock on the server (NFSv4, or v3 with its lock manager); a file system without locks refuses the claim with an
error instead of letting two processes train.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


ATTEMPTS = 5  # a claim found held is tried again briefly: `--status` tests claims by holding them for an instant
RETRY_SECONDS = 0.05
_held: set[int] = set()  # the descriptors of this process's claims


def _drop_claims_in_child() -> None:
    """A forked child (a DataLoader worker) closes its copies: the claim stays its parent's, and ends with it."""
    for fd in _held:
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_drop_claims_in_child)


def claim_path(run_dir: Path) -> Path:
    return run_dir.parent / f".{run_dir.name}.claim"


@contextmanager
def claimed(run_dir: Path) -> Iterator[bool]:
    """Claim ``run_dir`` for this process: yields True while it holds the claim, False where another process
    holds it."""
    path = claim_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by exec'd children (PEP 446)
    try:
        for attempt in range(ATTEMPTS):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 == ATTEMPTS:
                    yield False
                    return
                time.sleep(RETRY_SECONDS)
        _held.add(fd)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield True
    finally:
        _held.discard(fd)
        os.close(fd)  # releases the lock


def claim_holder(run_dir: Path) -> dict[str, object] | None:
    """Who holds ``run_dir``'s claim now ({} where it was claimed an instant ago and says nothing yet), or None.
    Reads only: a shared lock taken and dropped at once tests the claim without changing the file."""
    try:
        fd = os.open(claim_path(run_dir), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"{}")
        except ValueError:
            return {}
    finally:
        os.close(fd)


def describe_holder(holder: dict[str, object]) -> str:
    if not holder:
        return "another process"
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
