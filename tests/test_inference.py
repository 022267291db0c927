"""pipeline.inference: which file a path names, what a checkpoint must hold, and the network rebuilt from it.

The checkpoints are written here as training writes them (:func:`pipeline.run_records.best_model_payload`
of a full payload), with fresh weights of a small backbone; evaluate and predict load real trained runs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.config import load_config, to_dict
from pipeline.inference import (
    CheckpointError,
    DeviceError,
    build_objective,
    choose_device,
    load_inference_model,
)
from pipeline.run_records import best_model_payload
from pipeline.schema import get_task

TASK_NAMES = ["age", "gender"]
SMALL_MODEL = ["model.backbone=shufflenet_v2_x0_5", "model.shared_dims=[8]", "model.head_hidden=4",
               "data.image_size=32", "data.tasks=[age,gender]",
               "model.weights_path=/training/machine/only/backbone.pth"]
RAY_CHECKPOINT_NAMES = ("checkpoint_2024-01-01_00-00-01.000000", "checkpoint_2024-01-01_00-00-02.000000")


def full_checkpoint(*overrides: str, next_epoch: int = 5) -> dict[str, Any]:
    """What a training run writes to checkpoint.pt, less the optimiser's state: fresh weights, stored config."""
    config = load_config(overrides=[*SMALL_MODEL, *overrides])
    objective = build_objective(config, [get_task(name) for name in TASK_NAMES])
    return {"objective": objective.state_dict(), "config": to_dict(config), "tasks": TASK_NAMES,
            "frozen_parts": objective.net.frozen_parts(), "run_state": {"epoch": next_epoch}}


@pytest.fixture(scope="module")
def checkpoint_payload() -> dict[str, Any]:
    return full_checkpoint()


@pytest.fixture(scope="module")
def run_folder(checkpoint_payload: dict[str, Any], tmp_path_factory) -> Path:
    """A --local run folder: checkpoint.pt and the best_model.pt of its epoch 4."""
    folder = tmp_path_factory.mktemp("run")
    torch.save(checkpoint_payload, folder / "checkpoint.pt")
    torch.save(best_model_payload(checkpoint_payload, epoch=4), folder / "best_model.pt")
    return folder


# ---------------------------------------------------------------- the rebuilt network


def test_a_best_model_is_rebuilt_with_its_own_weights_in_eval_mode_without_the_backbone_file(
    run_folder: Path, checkpoint_payload: dict[str, Any]
) -> None:
    model = load_inference_model(run_folder / "best_model.pt")
    assert model.checkpoint_path == run_folder / "best_model.pt" and model.epoch == 4
    assert [task.name for task in model.tasks] == TASK_NAMES and model.image_size == 32 and model.age_scale == 100.0
    assert model.device == torch.device("cpu") and not model.net.training
    saved_net_weights = {key.removeprefix("net."): value for key, value in checkpoint_payload["objective"].items()
                         if key.startswith("net.")}
    loaded_weights = model.net.state_dict()
    assert loaded_weights.keys() == saved_net_weights.keys()
    assert all(torch.equal(loaded_weights[key], saved_net_weights[key]) for key in loaded_weights)
    assert model.describe() == (f"{run_folder / 'best_model.pt'}, epoch 4: shufflenet_v2_x0_5, tasks age, gender, "
                                "input 32 px, device cpu")


def test_a_full_checkpoint_holds_the_next_epoch_so_its_weights_are_of_the_one_before(run_folder: Path) -> None:
    assert load_inference_model(run_folder / "checkpoint.pt").epoch == 4


# ---------------------------------------------------------------- which file a path names


def test_a_run_folder_names_best_model_then_checkpoint_then_the_newest_readable_ray_checkpoint(
    run_folder: Path, tmp_path: Path
) -> None:
    assert load_inference_model(run_folder).checkpoint_path == run_folder / "best_model.pt"
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(run_folder / "checkpoint.pt", local / "checkpoint.pt")
    assert load_inference_model(local).checkpoint_path == local / "checkpoint.pt"

    ray_run = tmp_path / "ray"
    older, newer = (ray_run / name for name in RAY_CHECKPOINT_NAMES)
    for folder in (older, newer):
        folder.mkdir(parents=True)
        shutil.copy(run_folder / "checkpoint.pt", folder / "checkpoint.pt")
    assert load_inference_model(ray_run).checkpoint_path == newer / "checkpoint.pt"
    assert load_inference_model(older).checkpoint_path == older / "checkpoint.pt"  # a Ray checkpoint folder
    whole = (newer / "checkpoint.pt").read_bytes()
    (newer / "checkpoint.pt").write_bytes(whole[: len(whole) // 2])  # cut short: the job died while Ray copied it
    assert load_inference_model(ray_run).checkpoint_path == older / "checkpoint.pt"


# ---------------------------------------------------------------- what is not a usable checkpoint


def write_unusable(kind: str, folder: Path, run_folder: Path) -> Path:
    """A path of the given kind that holds no usable model."""
    path = folder / kind
    contents: dict[str, Any] = {
        "foreign-torch-file": {"fc.weight": torch.zeros(2, 2)},
        "torch-list": [1, 2],
        "objective-not-a-state-dict": {"objective": "weights", "config": {}, "tasks": []},
        "unknown-task": {**full_checkpoint(), "tasks": ["age", "hair_colour"]},
        "invalid-config": {**full_checkpoint(), "config": {**to_dict(load_config()), "max_epochs": 0}},
        "other-shapes": {**full_checkpoint(), "config": full_checkpoint("model.head_hidden=6")["config"]},
    }
    if kind == "missing":
        return folder / "absent"
    if kind == "empty-folder":
        path.mkdir()
    elif kind in contents:
        torch.save(contents[kind], path)
    elif kind == "truncated":
        whole = (run_folder / "best_model.pt").read_bytes()
        path.write_bytes(whole[: len(whole) // 2])
    elif kind == "ray-run-with-only-broken-checkpoints":
        for name in RAY_CHECKPOINT_NAMES:
            (path / name).mkdir(parents=True)
            (path / name / "checkpoint.pt").write_text("not a checkpoint\n")
    else:
        path.write_bytes({"text": b"not a checkpoint\n", "text-torch-reads-as-keys": b"hello world " * 10,
                          "empty": b""}[kind])
    return path


@pytest.mark.parametrize(("kind", "reason"), [
    ("missing", "does not exist"),
    ("empty-folder", "holds no best_model.pt, checkpoint.pt or checkpoint_*/checkpoint.pt"),
    ("text", "cannot be read as a facemtl checkpoint (UnpicklingError"),
    ("text-torch-reads-as-keys", "cannot be read as a facemtl checkpoint (KeyError"),
    ("empty", "cannot be read as a facemtl checkpoint (EOFError"),
    ("truncated", "cannot be read as a facemtl checkpoint (RuntimeError"),
    ("foreign-torch-file",
     "not a facemtl checkpoint: expected the keys ['objective', 'config', 'tasks'], found the keys ['fc.weight']"),
    ("torch-list", "found a list"),
    ("objective-not-a-state-dict", "'objective' holds a str, expected a state dict"),
    ("unknown-task", "unknown task 'hair_colour'"),
    ("invalid-config", "max_epochs must be >= 1"),
    ("other-shapes", "weights do not fit the model its config describes: 6 shape mismatches"),
    ("ray-run-with-only-broken-checkpoints", "none of its 2 checkpoint_*/checkpoint.pt is usable"),
])
def test_an_unusable_path_is_a_checkpoint_error_naming_it_and_why(kind: str, reason: str, run_folder: Path,
                                                                    tmp_path: Path) -> None:
    path = write_unusable(kind, tmp_path, run_folder)
    with pytest.raises(CheckpointError) as error:
        load_inference_model(path)
    assert str(error.value).startswith(str(path)) and reason in str(error.value)


def test_random_bytes_are_only_ever_a_checkpoint_error(tmp_path: Path) -> None:
    # torch.load fails on such files as UnpicklingError, but also as IndexError, KeyError, RuntimeError, ...
    rng = np.random.default_rng(0)
    for index in range(30):
        path = tmp_path / f"random{index}.pt"
        path.write_bytes(rng.bytes(int(rng.integers(1, 3000))))
        with pytest.raises(CheckpointError, match="cannot be read as a facemtl checkpoint"):
            load_inference_model(path)


# ---------------------------------------------------------------- the device


def test_cuda_without_a_gpu_is_a_device_error_and_auto_falls_back_to_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert choose_device("auto") == choose_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="no CUDA device is available"):
        choose_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_a_model_loaded_onto_the_gpu_has_its_weights_there(run_folder: Path) -> None:
    model = load_inference_model(run_folder, choose_device("auto"))
    assert model.device.type == "cuda" and all(weight.is_cuda for weight in model.net.state_dict().values())
