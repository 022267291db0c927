"""``invocations.jsonl`` of an experiment folder: every command that ran the experiment, with the code's
commit, its shards' summaries, the other experiments' runs it reused and the pretrained network it started from,
so that a table can be traced.
"""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from pipeline.data import ShardSet
from pipeline.provenance import append_record, git_commit, read_records, read_starts
from pipeline.run_records import BEST_MODEL_FILE, network_file_of

INVOCATIONS_FILE = "invocations.jsonl"  # every command that ran this experiment, with commit and shard summaries


def recorded_links(experiment_dir: Path) -> dict[str, str]:
    """Run name -> link of every reused run an earlier invocation recorded (the later one where a name repeats)."""
    links: dict[str, str] = {}
    for invocation in read_records(experiment_dir / INVOCATIONS_FILE):
        links.update(invocation.get("reused_runs") or {})
    return links


def describe_source(init_from: Path) -> dict[str, Any]:
    """The pretrained network ``init_from`` names: its path, the file read, the config and epoch its weights
    were trained with, and its run's start records (command, commit; pipeline.provenance), copied so that the
    record outlives that folder; empty for a run older than those records."""
    file = network_file_of(init_from)
    payload = torch.load(file, map_location="cpu", weights_only=True)
    epoch = payload.get("epoch", payload.get("run_state", {}).get("epoch"))
    run_dir = file.parent if file.name == BEST_MODEL_FILE else file.parent.parent  # best_model.pt or a checkpoint's
    return {"path": str(init_from), "file": str(file), "epoch": epoch, "config": payload.get("config"),
            "starts": read_starts(run_dir)}


def invocation_line(command: Sequence[str]) -> dict[str, Any]:
    """What every invocations.jsonl line says of the invocation: when, the exact command, where, the code's commit.
    The time is to the microsecond: records merge identical lines as one (pipeline.run_archive), and the same
    command run twice within a second is two invocations."""
    return {"time": datetime.now().astimezone().isoformat(timespec="microseconds"), "command": shlex.join(command),
            "cwd": os.getcwd(), "commit": git_commit()}


def record_invocation(experiment_dir: Path, command: Sequence[str], shard_sets: Sequence[ShardSet],
                      source: Mapping[str, Any] | None = None, reused_runs: Mapping[str, str] | None = None) -> None:
    """One line per invocation in ``invocations.jsonl``: the exact command, the code's commit, the summary of
    every shard folder, the runs of other experiments it reuses (``reused_runs``: run name -> link, relative to
    the experiment folder) and the pretrained ``source`` (:func:`describe_source`), so that a table can be traced
    to what made it."""
    entry = {**invocation_line(command),
             "shards": {str(s.root): json.loads((s.root / "summary.json").read_text()) for s in shard_sets},
             "reused_runs": dict(reused_runs or {}),
             **({"init_from": dict(source)} if source is not None else {})}
    append_record(experiment_dir / INVOCATIONS_FILE, entry)


def record_late_links(experiment_dir: Path, command: Sequence[str], reused_runs: Mapping[str, str]) -> None:
    """A line for the links an invocation made at its end (a sibling's run it waited for finished meanwhile), so
    that they are reuse's like those of its first line (:func:`recorded_links`)."""
    entry = {**invocation_line(command), "reused_runs": dict(reused_runs), "linked_at_end": True}
    append_record(experiment_dir / INVOCATIONS_FILE, entry)
