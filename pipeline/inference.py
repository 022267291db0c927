"""A trained model for inference: the checkpoint a path names, read safely, the network rebuilt on a device.

Shared by ``python -m pipeline.evaluate`` and ``python -m pipeline.predict``. A path may name

    runs/demo                          a run folder: its best_model.pt, else its checkpoint.pt (older --local
                                       runs), else the newest readable checkpoint_*/checkpoint.pt
    runs/demo/checkpoint_2025-...      a checkpoint folder: its checkpoint.pt
    runs/demo/best_model.pt            a checkpoint file, as given

Reading runs no code from the file (``torch.load(weights_only=True)``), and every way a path can fail to
hold a usable model is one :class:`CheckpointError` that names the path and says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.config import ConfigError, TrainConfig, declared_tasks_of, load_config_dict
from pipeline.loop import MultiTaskObjective, resolve_device, weighting_options
from pipeline.losses import build_weighting
from pipeline.model import MultiTaskNet, describe_state_mismatch
from pipeline.run_records import BEST_MODEL_FILE, CHECKPOINT_FILE, checkpoint_folders
from pipeline.schema import (TaskDeclarationError, TaskSpec, declare_tasks, get_task, known_tasks,
                             parse_task_declarations)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
CPU = torch.device("cpu")
REQUIRED_KEYS = ("objective", "config", "tasks")  # what best_model.pt and checkpoint.pt both hold
RAY_CHECKPOINTS = f"checkpoint_*/{CHECKPOINT_FILE}"


class CheckpointError(Exception):
    """A path that does not hold a usable facemtl checkpoint; the message names the path and why."""


class DeviceError(Exception):
    """A device that was asked for and is not available here."""


@dataclass
class InferenceModel:
    """A network rebuilt from a checkpoint, in eval mode on ``device``, with what it was trained under."""

    net: MultiTaskNet
    config: TrainConfig
    tasks: list[TaskSpec]
    epoch: int | None  # the epoch whose weights these are, when the checkpoint says
    checkpoint_path: Path  # the file that was read
    device: torch.device

    @property
    def image_size(self) -> int:
        """Side of the square input image the network was trained on."""
        return self.config.data.image_size

    @property
    def age_scale(self) -> float:
        """Years per unit of a regression head's output."""
        return self.config.loss.age_scale

    @property
    def run_dir(self) -> Path:
        """The run folder the checkpoint belongs to (its own folder, or the one above a checkpoint folder)."""
        folder = self.checkpoint_path.parent
        return folder.parent if folder.name.startswith("checkpoint_") else folder

    def describe(self) -> str:
        """One line: the checkpoint, its epoch, backbone, tasks, input size and device."""
        epoch = "" if self.epoch is None else f", epoch {self.epoch}"
        tasks = ", ".join(task.name for task in self.tasks)
        return (f"{self.checkpoint_path}{epoch}: {self.config.model.backbone}, tasks {tasks}, "
                f"input {self.image_size} px, device {self.device}")


def choose_device(requested: str) -> torch.device:
    """auto | cpu | cuda, chosen as training chooses (auto: the GPU when there is one); cuda without one is an error."""
    if requested not in DEVICE_CHOICES:
        raise ValueError(f"device {requested!r} unknown; expected one of {', '.join(DEVICE_CHOICES)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    return resolve_device(TrainConfig(device=requested))


def load_inference_model(target: str | Path, device: torch.device = CPU) -> InferenceModel:
    """The network the checkpoint at ``target`` holds, rebuilt from its stored config and task list, its
    weights (and its loss weighting's, which the checkpoint also holds) loaded strictly, in eval mode on ``device``."""
    path, payload = read_checkpoint_at(Path(target))
    try:
        config = load_config_dict(payload["config"])
        tasks = checkpoint_tasks(payload, config, path)
        objective = build_objective(config, tasks)
        epoch = checkpoint_epoch(payload)
    except (ConfigError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its stored config, tasks or epoch do not describe a model: {error}") from None
    load_objective_weights(path, objective, payload["objective"])
    return InferenceModel(objective.net.to(device).eval(), config, tasks, epoch, path, device)


def checkpoint_tasks(payload: dict[str, Any], config: TrainConfig, path: Path) -> list[TaskSpec]:
    """The specs of a checkpoint's tasks: built in, declared in the file (best_model.pt), or declared by the
    run's ``data.tasks_file`` or shards where those are readable here (a Ray checkpoint.pt)."""
    try:
        declare_tasks(parse_task_declarations(payload.get("task_declarations", []), str(path)), str(path))
        if any(name not in known_tasks() for name in payload["tasks"]):
            declared, _ = declared_tasks_of(config.data)
            declare_tasks(declared, f"{path}'s data.tasks_file and datasets")
    except TaskDeclarationError as error:
        raise CheckpointError(f"{path}: {error}") from None
    return [get_task(name) for name in payload["tasks"]]


# ---------------------------------------------------------------- finding and reading the file


def checkpoint_candidates(target: Path) -> list[Path]:
    """The files ``target`` may name, preferred first: itself (a file); a folder's best_model.pt, else its
    checkpoint.pt; else its Ray checkpoints, newest first."""
    if not target.exists():
        raise CheckpointError(f"{target} does not exist")
    if not target.is_dir():
        return [target]
    for name in (BEST_MODEL_FILE, CHECKPOINT_FILE):
        if (target / name).is_file():
            return [target / name]
    ray_checkpoints = [folder / CHECKPOINT_FILE for folder in checkpoint_folders(target)]
    if not ray_checkpoints:
        raise CheckpointError(
            f"{target} holds no {BEST_MODEL_FILE}, {CHECKPOINT_FILE} or {RAY_CHECKPOINTS}: pass a run folder, "
            "a Ray checkpoint folder (checkpoint_*) or a checkpoint file"
        )
    return ray_checkpoints


def read_checkpoint_at(target: Path) -> tuple[Path, dict[str, Any]]:
    """The first of ``target``'s candidate files that reads as a checkpoint, and its payload.

    Only a Ray run has several candidates: one cut short (its job killed while Ray copied it) is passed
    over for the one before, as resuming the run passes it over."""
    candidates = checkpoint_candidates(target)
    problems: list[str] = []
    for path in candidates:
        try:
            return path, read_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
    if len(problems) == 1:
        raise CheckpointError(problems[0])
    raise CheckpointError(f"{target}: none of its {len(problems)} {RAY_CHECKPOINTS} is usable; newest: {problems[0]}")


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of a best_model.pt or checkpoint.pt, checked for the keys a model needs."""
    try:
        with warnings.catch_warnings():
            # A foreign pickle of another protocol warns before it fails; the failure is the news.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a foreign file fails as anything: UnpicklingError, KeyError, IndexError, EOFError, ...
        raise CheckpointError(f"{path}: cannot be read as a facemtl checkpoint ({describe_error(error)})") from None
    if not isinstance(payload, dict) or any(key not in payload for key in REQUIRED_KEYS):
        found = f"the keys {sorted(map(str, payload))}" if isinstance(payload, dict) else f"a {type(payload).__name__}"
        raise CheckpointError(f"{path}: not a facemtl checkpoint: expected the keys {list(REQUIRED_KEYS)}, "
                              f"found {found}")
    if not isinstance(payload["objective"], Mapping):
        found = type(payload["objective"]).__name__
        raise CheckpointError(f"{path}: not a facemtl checkpoint: 'objective' holds a {found}, expected a state dict")
    return payload


def describe_error(error: BaseException) -> str:
    """The error's type and the telling line of its message: the first, or for torch's page-long weights-only
    failure the one after "WeightsUnpickler error:" (its first line only suggests loading unsafely)."""
    message = str(error)
    _, marker, detail = message.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (detail if marker else message).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def checkpoint_epoch(payload: dict[str, Any]) -> int | None:
    """best_model.pt names its epoch; a full checkpoint holds the next epoch to run."""
    if "epoch" in payload:
        return int(payload["epoch"])
    if "run_state" in payload:
        return int(payload["run_state"]["epoch"]) - 1
    return None


# ---------------------------------------------------------------- rebuilding the network


def build_objective(config: TrainConfig, tasks: list[TaskSpec]) -> MultiTaskObjective:
    """The network and loss weighting as training built them, without initial weights to load."""
    model = config.model
    # weights_path=None: the checkpoint holds every weight; the training machine's backbone file need not be here.
    net = MultiTaskNet(tasks, model.backbone, model.shared_dims, model.head_hidden, model.dropout,
                       weights_path=None, binary_outputs=model.binary_outputs)
    weighting = build_weighting(config.loss.weighting, [task.name for task in tasks], **weighting_options(config))
    return MultiTaskObjective(net, weighting, tasks, config)


def load_objective_weights(path: Path, objective: MultiTaskObjective, state: Mapping[str, Any]) -> None:
    """Load ``state`` strictly; keys or shapes that do not fit are listed in the error."""
    try:
        objective.load_state_dict(state, strict=True)  # the loss weighting also reads older checkpoints' layout
    except RuntimeError as error:
        problems = describe_state_mismatch(objective.state_dict(), state)
        if problems:
            raise CheckpointError(f"{path}: weights do not fit the model its config describes: "
                                  + "; ".join(problems)) from None
        raise CheckpointError(f"{path}: weights cannot be loaded: {' '.join(str(error).split())}") from None
