"""``python -m pipeline.run_archive save|restore``: the records of finished runs, without their weights, kept
where a runs folder is not (a scratch disk that is purged, a machine that is handed back, a git repository).

    python -m pipeline.run_archive save runs docs/records      # finished runs' records -> docs/records
    python -m pipeline.run_archive restore docs/records runs   # the runs it holds and runs/ lacks -> runs/

A finished run's records are what an experiment's tables and provenance read: ``config.yaml``,
``metrics.parquet``, ``starts.jsonl`` and ``evaluation/<split>/metrics.{json,md}``; no
checkpoint, best_model.pt or TensorBoard events (tens of KB a run, not tens of MB). ``save`` first evaluates each
finished run's best_model.pt on the test split where that is not yet recorded for its best epoch, so that
``pipeline.experiments ... --split test`` can report a restored run from its record. Both directions keep the
layout ``<experiment>/<run>/``, copy the link of a run the experiment reused from another as that link (a
folder the user linked, to a scratch disk say, is copied as a folder), and merge each experiment's
``invocations.jsonl`` (the lines of both, in time order). A partly trained run is not saved (its weights are what
it needs to go on); a restored run never replaces a run folder that exists. A config records absolute paths (its
shards, weights and runs folder), which the experiments compare: ``restore --relocate OLD=NEW`` rewrites those under
folder OLD to NEW in the restored copies, for a machine where they lie elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from pipeline.evaluate import EVALUATION_DIR, METRICS_JSON, METRICS_MARKDOWN
from pipeline.experiment_arms import ExperimentError
from pipeline.experiment_invocations import INVOCATIONS_FILE, recorded_links
from pipeline.experiment_runs import (
    current_evaluation, evaluate_best_model, is_fresh, read_rows, run_is_finished,
)
from pipeline.experiment_reuse import read_saved_config
from pipeline.provenance import STARTS_FILE
from pipeline.run_records import BEST_MODEL_FILE, CONFIG_FILE, METRICS_FILE

RUN_RECORD_FILES = (CONFIG_FILE, METRICS_FILE, STARTS_FILE)
EVALUATION_FILES = (METRICS_JSON, METRICS_MARKDOWN)


def is_finished_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run with nothing left to train, judged by its own config's ``max_epochs``."""
    saved = read_saved_config(run_dir)
    return saved is not None and run_is_finished(read_rows(run_dir), int(saved.get("max_epochs") or 0))


def epochs_done(run_dir: Path) -> int:
    """Epochs recorded in ``run_dir``'s metrics.parquet."""
    return len(read_rows(run_dir))


def record_files(run_dir: Path) -> list[Path]:
    """The files of ``run_dir`` that are its records, relative to it."""
    names = [Path(name) for name in RUN_RECORD_FILES]
    evaluation = run_dir / EVALUATION_DIR
    if evaluation.is_dir():
        names += [Path(EVALUATION_DIR) / split.name / name for split in sorted(evaluation.iterdir()) if split.is_dir()
                  for name in EVALUATION_FILES]
    return [name for name in names if (run_dir / name).is_file()]


def same_records(run_a: Path, run_b: Path) -> bool:
    """Whether two run folders hold the same record files with the same bytes (a save with nothing new to copy)."""
    files = record_files(run_a)
    return (not run_b.is_symlink() and files == record_files(run_b)
            and all((run_a / name).read_bytes() == (run_b / name).read_bytes() for name in files))


STAGING_SUFFIXES = (".partial", ".replaced")  # hidden folders of a copy in progress: never a run


def remove_leftovers(root: Path) -> None:
    """Delete what an interrupted copy left under ``root/<experiment>/`` (before anything reads the folders)."""
    for suffix in STAGING_SUFFIXES:
        for leftover in root.glob(f"*/.*{suffix}"):
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


# The config keys that hold paths (``data.datasets`` a list of them), as ``--relocate`` rewrites them.
PATH_KEYS = (("runs_dir",), ("data", "datasets"), ("data", "tasks_file"), ("model", "weights_path"),
             ("model", "init_from"))


def relocated(path: str, moves: Sequence[tuple[str, str]]) -> str:
    """``path`` with the first of ``moves`` (old folder, new folder) that holds it applied."""
    for old, new in moves:
        if Path(path) == Path(old) or Path(path).is_relative_to(old):
            return str(Path(new) / Path(path).relative_to(old))
    return path


def relocate_config(config: dict[str, Any], moves: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """A saved config (config.yaml's mapping) with every path under an old folder of ``moves`` moved to its new one."""
    moved = copy.deepcopy(config)
    for keys in PATH_KEYS:
        *parents, last = keys
        section = moved
        for key in parents:
            section = section.get(key) if isinstance(section, dict) else None
        if not isinstance(section, dict) or section.get(last) is None:
            continue
        value = section[last]
        section[last] = [relocated(p, moves) for p in value] if isinstance(value, list) else relocated(value, moves)
    return moved


def copy_records(source_run: Path, target_run: Path, moves: Sequence[tuple[str, str]] = ()) -> None:
    """Replace ``target_run`` by the records of ``source_run`` (its config's paths relocated by ``moves``): written
    beside it, then renamed into place, so that an interrupted copy never leaves a folder that looks like a whole
    run."""
    staging, replaced = (target_run.with_name(f".{target_run.name}{suffix}") for suffix in STAGING_SUFFIXES)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(replaced, ignore_errors=True)
    for name in record_files(source_run):
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_run / name, staging / name)
    saved = read_saved_config(staging)
    if moves and saved is not None:
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(relocate_config(saved, moves), sort_keys=False))
    if target_run.is_symlink():
        target_run.unlink()
    if target_run.exists():
        target_run.rename(replaced)
    staging.rename(target_run)
    shutil.rmtree(replaced, ignore_errors=True)


def copy_link(source_link: Path, target_link: Path) -> None:
    """``target_link`` made the same relative link as ``source_link`` (a reused run: the link is the record)."""
    if target_link.is_symlink() or target_link.is_file():
        target_link.unlink()
    elif target_link.exists():
        shutil.rmtree(target_link)
    target_link.symlink_to(os.readlink(source_link), target_is_directory=True)


def invocation_time(line: str) -> datetime:
    """When an invocations.jsonl line was written (its ``time``); the earliest possible for a line without one."""
    try:
        text = json.loads(line)["time"]
        try:
            written = datetime.fromisoformat(text)
        except ValueError:  # the older records' "+0000": Python 3.10's fromisoformat refuses it
            written = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S%z")
    except (ValueError, KeyError, TypeError):
        return datetime.min.replace(tzinfo=timezone.utc)
    return written if written.tzinfo is not None else written.replace(tzinfo=timezone.utc)


def merge_invocations(source: Path, target: Path) -> int:
    """``target`` rewritten with the lines of both files, each once, in time order (the later line about a run
    wins in :func:`pipeline.experiment_invocations.recorded_links`); returns how many lines came from ``source``."""
    if not source.is_file():
        return 0
    held = target.read_text().splitlines() if target.is_file() else []
    known = set(held)
    new = [line for line in source.read_text().splitlines() if line.strip() and line not in known]
    if new:
        merged = sorted(held + list(dict.fromkeys(new)), key=invocation_time)
        staging = target.with_name(f".{target.name}.partial")
        staging.write_text("".join(f"{line}\n" for line in merged))
        staging.replace(target)
    return len(new)


def run_folders(root: Path) -> list[Path]:
    """``root/<experiment>/<run>`` entries that are run folders or links to one, by path."""
    return sorted(entry for experiment in sorted(root.iterdir()) if experiment.is_dir() and not
                  experiment.name.startswith(".") for entry in experiment.iterdir()
                  if not entry.name.startswith(".") and (entry.is_symlink() or (entry / CONFIG_FILE).is_file()))


def is_reuse_link(entry: Path, root: Path) -> bool:
    """Whether ``entry`` is a link ``pipeline.experiments`` made to a run it reused (recorded in the experiment's
    invocations.jsonl, relative, to a folder under ``root``), not a folder the user linked elsewhere."""
    if not entry.is_symlink():
        return False
    target = os.readlink(entry)
    return (recorded_links(entry.parent).get(entry.name) == target and not os.path.isabs(target)
            and (entry.parent / target).resolve().is_relative_to(root.resolve()))


@dataclass
class ArchiveReport:
    """What one save or restore did, by run (``<experiment>/<run>``)."""

    copied: list[str] = field(default_factory=list)
    linked: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)  # "<run>: why"
    warnings: list[str] = field(default_factory=list)  # copied, but without something

    def lines(self, header: str) -> list[str]:
        return [f"{header}: {len(self.copied)} run(s) copied, {len(self.linked)} link(s) to reused runs, "
                f"{len(self.unchanged)} already there, {len(self.evaluated)} evaluated on the test split now",
                *(f"  left out {why}" for why in self.left_out), *(f"  warning: {why}" for why in self.warnings)]


def ensure_evaluated(run_dir: Path, split: str, report: ArchiveReport, name: str) -> None:
    """Evaluate best_model.pt on ``split`` unless a fresh evaluation of it is recorded (as ``--split test`` would
    use it); a run without the split or without best_model.pt (itself restored from records) keeps what it has, and
    so does one whose evaluation is of its best epoch but cannot be made again (its shards are gone, say)."""
    if not (run_dir / BEST_MODEL_FILE).is_file():
        return
    recorded = current_evaluation(run_dir, split)
    if recorded is not None and is_fresh(recorded, run_dir, split):
        return
    try:
        evaluate_best_model(run_dir, split)
    except ExperimentError as error:
        if recorded is not None:
            report.warnings.append(f"{name}: its {split} evaluation of the best epoch is kept as recorded, unchecked "
                                   f"against its shards now ({error})")
        else:
            report.warnings.append(f"{name} has no {split} evaluation: {error}")
        return
    report.evaluated.append(name)


def save_records(runs_dir: Path, archive_dir: Path, splits: tuple[str, ...] = ("test",)) -> ArchiveReport:
    """Copy the records of every finished run under ``runs_dir`` into ``archive_dir``, evaluating each on
    ``splits`` first where that is not recorded; links to reused runs are copied as links."""
    report = ArchiveReport()
    remove_leftovers(archive_dir)
    for entry in run_folders(runs_dir):
        name = f"{entry.parent.name}/{entry.name}"
        target = archive_dir / name
        if is_reuse_link(entry, runs_dir):
            if not is_finished_run(entry):
                report.left_out.append(f"{name}: a link to {os.readlink(entry)}, not a finished run")
                continue
            if target.is_symlink() and os.readlink(target) == os.readlink(entry):
                report.unchanged.append(name)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_link(entry, target)
            report.linked.append(name)
            continue
        if not is_finished_run(entry):
            report.left_out.append(f"{name}: not finished ({epochs_done(entry)} epoch(s); its checkpoints resume it)")
            continue
        for split in splits:
            ensure_evaluated(entry, split, report, name)
        if same_records(entry, target):
            report.unchanged.append(name)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_records(entry, target)
        report.copied.append(name)
    merge_invocation_files(runs_dir, archive_dir)
    return report


def restore_records(archive_dir: Path, runs_dir: Path, moves: Sequence[tuple[str, str]] = ()) -> ArchiveReport:
    """Copy into ``runs_dir`` every archived run it has no folder for, the paths in its config moved by ``moves``
    (old folder, new folder); a folder that exists is kept as it is."""
    report = ArchiveReport()
    remove_leftovers(runs_dir)
    for entry in run_folders(archive_dir):
        name = f"{entry.parent.name}/{entry.name}"
        target = runs_dir / name
        if target.is_symlink() or target.exists():
            if is_finished_run(target):
                report.unchanged.append(name)
            else:
                report.left_out.append(f"{name}: {target} exists with {epochs_done(target)} epoch(s) and is kept; "
                                       "delete it to take the archived run instead")
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.is_symlink():
            copy_link(entry, target)
            report.linked.append(name)
        else:
            copy_records(entry, target, moves)
            report.copied.append(name)
    merge_invocation_files(archive_dir, runs_dir)
    return report


def merge_invocation_files(source_root: Path, target_root: Path) -> None:
    """Each experiment's invocations.jsonl of ``source_root`` merged into ``target_root``'s, where that folder
    exists (an experiment with no finished run has nothing to trace yet)."""
    for source in sorted(source_root.glob(f"*/{INVOCATIONS_FILE}")):
        target_dir = target_root / source.parent.name
        if target_dir.is_dir():
            merge_invocations(source, target_dir / INVOCATIONS_FILE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run_archive", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    save = commands.add_parser("save", help="copy finished runs' records from RUNS_DIR into ARCHIVE_DIR")
    save.add_argument("runs_dir", type=Path, metavar="RUNS_DIR")
    save.add_argument("archive_dir", type=Path, metavar="ARCHIVE_DIR")
    save.add_argument("--no-evaluate", action="store_true",
                      help="do not evaluate best_model.pt on the test split first (--split test then needs the run)")
    save.set_defaults(relocate=[])
    restore = commands.add_parser("restore", help="copy the runs ARCHIVE_DIR holds and RUNS_DIR lacks into RUNS_DIR")
    restore.add_argument("archive_dir", type=Path, metavar="ARCHIVE_DIR")
    restore.add_argument("runs_dir", type=Path, metavar="RUNS_DIR")
    restore.add_argument("--relocate", action="append", default=[], metavar="OLD=NEW",
                         help="rewrite the restored configs' paths under folder OLD to NEW (shards, weights, runs "
                              "elsewhere on this machine); may be repeated")
    args = parser.parse_args(argv)
    moves = [tuple(move.split("=", 1)) for move in args.relocate]
    if any(len(move) != 2 or not all(move) for move in moves):
        parser.error("--relocate takes OLD=NEW, two folders")
    started = time.perf_counter()
    source = args.runs_dir if args.command == "save" else args.archive_dir
    if not source.is_dir():
        print(f"error: {source} is not a folder", file=sys.stderr)
        return 2
    try:
        if args.command == "save":
            report = save_records(args.runs_dir, args.archive_dir, () if args.no_evaluate else ("test",))
            lines = report.lines(f"saved into {args.archive_dir}")
        else:
            report = restore_records(args.archive_dir, args.runs_dir, moves)
            lines = report.lines(f"restored into {args.runs_dir}")
    except OSError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
