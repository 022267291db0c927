"""What a training run leaves in its folder: checkpoints, the best model, metrics and TensorBoard events.

    <run_dir>/config.yaml          the resolved config
    <run_dir>/metrics.parquet      one row per reported epoch (rewritten atomically every epoch)
    <run_dir>/tensorboard/         scalars per task, loss weights, freeze events
    <run_dir>/best_model.pt        weights + config of the epoch with the lowest total validation loss
    <run_dir>/checkpoint_*/checkpoint.pt   (Ray Train) or <run_dir>/checkpoint.pt (--local): full state
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

CHECKPOINT_FILE = "checkpoint.pt"
BEST_MODEL_FILE = "best_model.pt"
METRICS_FILE = "metrics.parquet"
CONFIG_FILE = "config.yaml"
TENSORBOARD_DIR = "tensorboard"


def save_atomically(payload: Any, path: Path) -> None:
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint file or a folder holding ``checkpoint.pt``."""
    path = path / CHECKPOINT_FILE if path.is_dir() else path
    return torch.load(path, map_location="cpu", weights_only=False)


def latest_checkpoint(run_dir: Path, also: Path | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest loadable ``checkpoint_*/checkpoint.pt`` of a Ray run folder (and ``also``, if given).

    Ray Train resumes a run from its own snapshot file, which its controller writes a moment after each
    report; a job killed in between (preemption, requeue) would start over although the checkpoint is
    on disk. Ray names checkpoint folders by time, so the newest name is the latest epoch; a folder
    whose file is incomplete (killed while copying) is skipped.
    """
    candidates = sorted({*run_dir.glob("checkpoint_*/" + CHECKPOINT_FILE), *([also / CHECKPOINT_FILE] if also else [])},
                        key=lambda path: path.parent.name, reverse=True)
    for path in candidates:
        try:
            return path.parent, load_checkpoint(path)
        except (OSError, RuntimeError, EOFError):
            continue
    return None


def best_model_payload(payload: dict[str, Any], epoch: int) -> dict[str, Any]:
    """Only what inference needs: weights, config and task list."""
    return {"objective": payload["objective"], "config": payload["config"], "tasks": payload["tasks"],
            "frozen_parts": payload["frozen_parts"], "epoch": epoch}


class RunRecorder:
    """Writes metrics.parquet and TensorBoard events for every epoch (rank 0 only)."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def record_epoch(self, metrics: dict[str, Any], history: list[dict[str, Any]]) -> None:
        epoch = int(metrics["epoch"])
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch" and math.isfinite(value):
                self.writer.add_scalar(key, value, epoch)
        if metrics.get("freeze/events"):
            self.writer.add_text("freeze/events", ", ".join(metrics["freeze/events"]), epoch)
        self.writer.flush()
        rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()} for row in history]
        temporary = self.run_dir / f"{METRICS_FILE}.{os.getpid()}.tmp"
        pq.write_table(pa.Table.from_pylist(rows), temporary)
        os.replace(temporary, self.run_dir / METRICS_FILE)

    def close(self) -> None:
        self.writer.close()


class LocalRun:
    """``pipeline.train --local``: one process, checkpoints in the run folder itself (no Ray)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.recorder = RunRecorder(run_dir)

    def report(self, metrics: dict[str, Any], payload: dict[str, Any]) -> None:
        save_atomically(payload, self.run_dir / CHECKPOINT_FILE)
        if payload["is_best"]:
            save_atomically(best_model_payload(payload, metrics["epoch"]), self.run_dir / BEST_MODEL_FILE)
        self.recorder.record_epoch(metrics, payload["run_state"]["history"])

    def resume_payload(self) -> dict[str, Any] | None:
        path = self.run_dir / CHECKPOINT_FILE
        return load_checkpoint(path) if path.exists() else None
