"""What a training run leaves in its folder: checkpoints, the best model, metrics and TensorBoard events.

    <run_dir>/config.yaml          the resolved config
    <run_dir>/metrics.parquet      one row per reported epoch (rewritten atomically every epoch)
    <run_dir>/tensorboard/         scalars per task, loss weights, freeze events
    <run_dir>/best_model.pt        weights + config of the epoch with the lowest total validation loss
    <run_dir>/checkpoint_*/        checkpoint.pt (full training state) and progress.json (its epoch); Ray
                                   Train names the folders by time, --local by epoch; the newest
                                   ``keep_checkpoints`` are kept
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.config import declared_tasks_of, load_config_dict
from pipeline.schema import known_tasks

CHECKPOINT_FILE = "checkpoint.pt"
PROGRESS_FILE = "progress.json"  # beside checkpoint.pt: the epochs it holds, readable without loading it
BEST_MODEL_FILE = "best_model.pt"
METRICS_FILE = "metrics.parquet"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_FOLDERS = "checkpoint_*"  # Ray Train's (named by time) and --local's (named by epoch)
STOPPED_FILE = "stopped.json"  # why a run stopped on purpose (divergence, a refused resume): not retried


class CheckpointsUnusable(Exception):
    """A run folder whose checkpoints all fail to load: resuming would silently start over."""


def save_atomically(payload: Any, path: Path) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def save_checkpoint(payload: dict[str, Any], folder: Path) -> None:
    """``checkpoint.pt`` and its ``progress.json`` into ``folder``, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    save_atomically(payload, folder / CHECKPOINT_FILE)
    progress = folder / f"{PROGRESS_FILE}.tmp"
    progress.write_text(json.dumps({"epoch": payload["run_state"]["epoch"], "step": payload["run_state"].get("step")}))
    os.replace(progress, folder / PROGRESS_FILE)


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file or a folder holding ``checkpoint.pt``; data only, no code (``weights_only``)."""
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def checkpoint_folders(run_dir: Path, also: Path | None = None) -> list[Path]:
    """Checkpoint folders of a run, newest first: by the epoch their progress.json records, then by name
    (Ray's names sort by time; folders of older versions have no progress.json)."""
    folders = {path.parent for path in run_dir.glob(f"{CHECKPOINT_FOLDERS}/{CHECKPOINT_FILE}")}
    if also is not None and (also / CHECKPOINT_FILE).exists():
        folders.add(also)

    def recorded_epoch(folder: Path) -> int:
        try:
            return int(json.loads((folder / PROGRESS_FILE).read_text())["epoch"])
        except (OSError, ValueError, KeyError, TypeError):
            return -1

    return sorted(folders, key=lambda folder: (recorded_epoch(folder), folder.name), reverse=True)


def latest_checkpoint(run_dir: Path, also: Path | None = None, warn: Any = None,
                      mmap: bool = False) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable checkpoint folder of a run and its payload; None when the run has none.

    A folder whose file does not load (a job killed while it was copied) is skipped, and ``warn`` (a
    callable taking one line) hears which; when every one fails, :class:`CheckpointsUnusable` names them.
    """
    problems = []
    for folder in checkpoint_folders(run_dir, also):
        try:
            payload = load_checkpoint(folder, mmap=mmap)
        except Exception as error:  # a damaged zip fails as RuntimeError, EOFError, UnpicklingError, ...
            problems.append(f"{folder / CHECKPOINT_FILE} ({type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''})")
            continue
        if problems and warn is not None:
            warn(f"warning: skipped unreadable checkpoint(s) {'; '.join(problems)}; resuming from {folder}")
        return folder, payload
    if problems:
        raise CheckpointsUnusable(f"every checkpoint of {run_dir} is unreadable: {'; '.join(problems)}")
    return None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoint folders (0 = all)."""
    if keep > 0:
        for folder in checkpoint_folders(run_dir)[keep:]:
            shutil.rmtree(folder, ignore_errors=True)


def has_records(run_dir: Path) -> bool:
    """Whether a run folder holds anything a restart would overwrite: checkpoints, metrics, a best model."""
    return any(run_dir.glob(f"{CHECKPOINT_FOLDERS}/{CHECKPOINT_FILE}")) or any(
        (run_dir / name).exists() for name in (METRICS_FILE, BEST_MODEL_FILE, CHECKPOINT_FILE))


def network_file_of(target: Path) -> Path:
    """The file ``model.init_from`` reads: a run folder's best_model.pt, else its newest checkpoint; a file as
    it is."""
    if not target.is_dir():
        return target
    folders = checkpoint_folders(target)
    return target / BEST_MODEL_FILE if (target / BEST_MODEL_FILE).is_file() else (
        folders[0] / CHECKPOINT_FILE if folders else target / BEST_MODEL_FILE)


def network_state_of(target: Path) -> dict[str, torch.Tensor]:
    """The network weights of a facemtl run folder or checkpoint file (:func:`network_file_of`), without the
    loss weighting's; for ``model.init_from``."""
    payload = torch.load(network_file_of(target), map_location="cpu", weights_only=True)
    return {key[len("net."):]: tensor for key, tensor in payload["objective"].items() if key.startswith("net.")}


def record_stop(run_dir: Path, reason: str) -> None:
    """Why the run stopped without finishing, for the launching process to report (a Ray worker cannot)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    temporary = run_dir / f"{STOPPED_FILE}.tmp"
    temporary.write_text(json.dumps({"reason": reason}))
    os.replace(temporary, run_dir / STOPPED_FILE)


def read_stop(run_dir: Path) -> str | None:
    path = run_dir / STOPPED_FILE
    return json.loads(path.read_text())["reason"] if path.exists() else None


def best_model_payload(payload: dict[str, Any], epoch: int) -> dict[str, Any]:
    """Only what inference needs: weights, config, task list and the tasks' declarations (so that the file
    describes its declared tasks without the tasks file or the shards)."""
    return {"objective": payload["objective"], "config": payload["config"], "tasks": payload["tasks"],
            "task_declarations": task_declarations(payload["config"], payload["tasks"]),
            "frozen_parts": payload["frozen_parts"], "epoch": epoch}


def task_declarations(config: dict[str, Any], task_names: list[str]) -> list[dict[str, object]]:
    """The declarations of a run's tasks, from the built-in tasks, its ``data.tasks_file`` and its shards."""
    declared, _ = declared_tasks_of(load_config_dict(config).data)
    specs = {**known_tasks(), **{spec.name: spec for spec in declared}}
    return [specs[name].declaration() for name in task_names if name in specs]


class RunRecorder:
    """Writes metrics.parquet and TensorBoard events for every epoch (rank 0 only)."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def record_epoch(self, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """metrics.parquet first: a run stopped in between (a trial Tune ends) has no epoch in TensorBoard
        that its table lacks."""
        rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in history]
        temporary = self.run_dir / f"{METRICS_FILE}.{os.getpid()}.tmp"
        pq.write_table(pa.Table.from_pylist(rows), temporary)
        os.replace(temporary, self.run_dir / METRICS_FILE)
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch" \
                    and math.isfinite(value):
                self.writer.add_scalar(key, value, epoch)
        if metrics.get("freeze/events"):
            self.writer.add_text("freeze/events", ", ".join(metrics["freeze/events"]), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class LocalRun:
    """``pipeline.train --local``: one process, no Ray; checkpoint folders ``checkpoint_<epoch>`` in the run
    folder, the ``keep`` newest kept, as Ray Train keeps its own."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.run_dir, self.keep = run_dir, keep
        self.recorder = RunRecorder(run_dir)

    def report(self, metrics: dict[str, Any], payload: dict[str, Any]) -> None:
        save_checkpoint(payload, self.run_dir / f"checkpoint_{payload['run_state']['epoch']:06d}")
        prune_checkpoints(self.run_dir, self.keep)
        if payload["is_best"]:
            save_atomically(best_model_payload(payload, metrics["epoch"]), self.run_dir / BEST_MODEL_FILE)
        self.recorder.record_epoch(metrics, payload["run_state"]["history"])
