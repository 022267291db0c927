"""The multi-task network of the thesis (section 3.2): pretrained backbone -> shared MTL layers -> one head per task.

::

    images -> backbone (torchvision model, last Linear removed) -> shared: [Linear -> LeakyReLU -> BatchNorm1d]*
           -> heads[task]: Linear -> Dropout -> LeakyReLU -> Linear -> (N, outputs of task)

Freezing (Early Freeze, thesis 3.5) is part of the model: a frozen part has ``requires_grad`` False, stays
in eval mode through ``model.train()`` (its BatchNorm running statistics and Dropout stop changing) and
is computed under ``torch.no_grad()``, so no backward pass runs through it; that is what makes the
epochs after the trunk froze fast.

Note: ``BatchNorm1d`` in the shared layers cannot normalise a batch of one sample in train mode (PyTorch
raises "Expected more than 1 value per channel"); training batches, per rank, need at least two samples
(drop the last incomplete batch). Eval mode, or a frozen trunk, has no such limit.
"""

from __future__ import annotations

import contextlib
import itertools
import pickle
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from pipeline.schema import TaskSpec

BINARY_OUTPUT_CHOICES = (1, 2)  # 1 = one BCE logit, 2 = two-way cross-entropy


class BackboneWeightsError(ValueError):
    """A backbone weights file that cannot be read, or does not fit the torchvision model it is meant for."""


def build_backbone(name: str, weights_path: str | Path | None = None) -> tuple[nn.Module, int]:
    """The torchvision classification model ``name`` without its last ``nn.Linear``, and its feature width.

    ``weights_path`` (a local state-dict file, never downloaded) is loaded strictly into the full model,
    classifier included, before the classifier is removed, so torchvision's own weight files fit as they are.
    """
    model = torchvision.models.get_model(name, weights=None)
    if weights_path is not None:
        load_weights_strictly(model, Path(weights_path), name)
    return model, remove_last_linear(model)


def remove_last_linear(model: nn.Module) -> int:
    """Replace the last ``nn.Linear`` of ``model`` (its classifier) by ``nn.Identity``; return its ``in_features``.

    "Last" is in registration order, which for torchvision classifiers (resnet ``fc``, mobilenet and
    efficientnet ``classifier[-1]``, convnext ``classifier[2]``) is also the order of the forward pass.
    """
    linear_names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linear_names:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to use as its classifier")
    parent_name, _, child_name = linear_names[-1].rpartition(".")
    parent = model.get_submodule(parent_name)
    in_features = parent.get_submodule(child_name).in_features
    setattr(parent, child_name, nn.Identity())
    return in_features


def load_weights_strictly(model: nn.Module, path: Path, model_name: str) -> None:
    """Load the state dict in ``path`` into ``model``; every key and shape must match, else the error lists them."""
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise BackboneWeightsError(f"{path}: cannot be read as a weights-only state dict: {error}") from None
    if not isinstance(state, Mapping):
        raise BackboneWeightsError(f"{path}: holds a {type(state).__name__}, expected a state dict of {model_name}")
    problems = describe_state_mismatch(model.state_dict(), state)
    if problems:
        raise BackboneWeightsError(f"{path} does not fit torchvision {model_name}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def describe_state_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any],
                            shown: int = 5) -> list[str]:
    """Missing keys, unexpected keys and shape mismatches of ``given`` against ``expected`` (first ``shown`` each)."""

    def listing(what: str, keys: list[str]) -> str:
        more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
        return f"{len(keys)} {what}: {', '.join(keys[:shown])}{more}"

    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    reshaped = [
        f"{key} {tuple(given[key].shape)} != {tuple(expected[key].shape)}"
        for key in expected
        if key in given and isinstance(given[key], torch.Tensor) and given[key].shape != expected[key].shape
    ]
    return [
        listing(what, keys)
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", reshaped))
        if keys
    ]


def build_shared_layers(in_features: int, shared_dims: Sequence[int]) -> nn.Sequential:
    """Per width: Linear -> LeakyReLU -> BatchNorm1d (the thesis' order: activation before normalisation)."""
    layers: list[nn.Module] = []
    for width in shared_dims:
        layers += [nn.Linear(in_features, width), nn.LeakyReLU(), nn.BatchNorm1d(width)]
        in_features = width
    return nn.Sequential(*layers)


def build_head(in_features: int, hidden: int, dropout: float, outputs: int) -> nn.Sequential:
    """Linear -> Dropout -> LeakyReLU -> Linear; the last layer has neither dropout nor activation (thesis 3.2)."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.Dropout(dropout), nn.LeakyReLU(),
                         nn.Linear(hidden, outputs))


def head_outputs(task: TaskSpec, binary_outputs: int) -> int:
    """Width of ``task``'s head: 1 for regression, ``binary_outputs`` for binary, one per class for multiclass."""
    return binary_outputs if task.kind == "binary" else task.num_outputs


class MultiTaskNet(nn.Module):
    """Shared trunk (backbone + shared layers) and one head per task; ``forward`` gives task -> (N, outputs).

    Regression heads predict in scaled units (years / ``age_scale``, see :mod:`pipeline.task_losses`); a
    landmarks head predicts ``x0, y0, x1, y1, ...`` in units of the crop side.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpec],
        backbone: str = "resnet18",
        shared_dims: Sequence[int] = (256,),
        head_hidden: int = 128,
        dropout: float = 0.3,
        weights_path: str | Path | None = None,
        binary_outputs: int = 2,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ValueError("MultiTaskNet needs at least one task")
        if binary_outputs not in BINARY_OUTPUT_CHOICES:
            raise ValueError(f"binary_outputs must be one of {BINARY_OUTPUT_CHOICES}, got {binary_outputs}")
        self.task_names: tuple[str, ...] = tuple(task.name for task in tasks)
        self.backbone, feature_width = build_backbone(backbone, weights_path)
        self.shared = build_shared_layers(feature_width, shared_dims)
        shared_width = shared_dims[-1] if shared_dims else feature_width
        self.heads = nn.ModuleDict({
            task.name: build_head(shared_width, head_hidden, dropout, head_outputs(task, binary_outputs))
            for task in tasks
        })
        for task in tasks:
            if task.kind == "landmarks":
                self.set_output_bias(task.name, 0.5)  # the crop's centre: coordinates are in [0, 1]
        self.trunk_frozen = False
        self.frozen_heads: frozenset[str] = frozenset()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad() if self.trunk_frozen else contextlib.nullcontext():
            features = self.shared(torch.flatten(self.backbone(images), 1))
        outputs = {}
        for task, head in self.heads.items():
            with torch.no_grad() if task in self.frozen_heads else contextlib.nullcontext():
                outputs[task] = head(features)
        return outputs

    def set_output_bias(self, task: str, value: float) -> None:
        """Start a regression head at ``value`` (e.g. the mean scaled age): Adam moves a bias by about lr
        per step, so starting at 0 would spend hundreds of steps just reaching the mean."""
        self._head(task)[-1].bias.data.fill_(value)

    def train(self, mode: bool = True) -> MultiTaskNet:
        """As ``nn.Module.train``, except that frozen parts stay in eval mode."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    # ------------------------------------------------------------ parameters

    def trunk_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters shared by all tasks: backbone and shared layers."""
        return itertools.chain(self.backbone.parameters(), self.shared.parameters())

    def head_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """Parameters of ``task``'s head only."""
        return self._head(task).parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters not frozen (``requires_grad`` True): what an optimizer should hold."""
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    # ------------------------------------------------------------ freezing (one-way)

    def freeze_trunk(self) -> None:
        """Stop training backbone and shared layers: no gradient, eval mode, forward under ``no_grad``."""
        self.trunk_frozen = True
        self._freeze(self.backbone)
        self._freeze(self.shared)

    def freeze_head(self, task: str) -> None:
        """Stop training ``task``'s head likewise; its output no longer carries a gradient to anything."""
        self._freeze(self._head(task))
        self.frozen_heads = self.frozen_heads | {task}

    def load_matching(self, state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
        """Copy from another run's network state every part (backbone, shared layers, a task's head) whose
        keys and shapes all match; returns the parts ``loaded``, kept ``fresh`` (new task, other shape) and
        ``unused`` (in ``state`` only)."""
        own = self.state_dict()

        def part(key: str) -> str:
            return ".".join(key.split(".")[:2]) if key.startswith("heads.") else key.split(".")[0]

        parts = sorted({part(key) for key in own})
        report: dict[str, list[str]] = {"loaded": [], "fresh": [],
                                        "unused": sorted({part(k) for k in state} - set(parts))}
        with torch.no_grad():
            for name in parts:
                keys = [key for key in own if part(key) == name]
                if all(key in state and state[key].shape == own[key].shape for key in keys):
                    for key in keys:
                        own[key].copy_(state[key])
                    report["loaded"].append(name)
                else:
                    report["fresh"].append(name)
        return report

    def frozen_parts(self) -> dict[str, Any]:
        """What is frozen, for a checkpoint: ``{"trunk": bool, "heads": [task, ...]}``."""
        return {"trunk": self.trunk_frozen, "heads": sorted(self.frozen_heads)}

    def apply_frozen_parts(self, parts: Mapping[str, Any]) -> None:
        """Freeze what ``parts`` (from :meth:`frozen_parts`) names; freezing is one-way, nothing is unfrozen."""
        if parts.get("trunk", False):
            self.freeze_trunk()
        for task in parts.get("heads", ()):
            self.freeze_head(task)

    def _head(self, task: str) -> nn.Module:
        if task not in self.heads:
            raise KeyError(f"no head for task {task!r}; heads: {', '.join(self.task_names)}")
        return self.heads[task]

    def _frozen_modules(self) -> list[nn.Module]:
        trunk = [self.backbone, self.shared] if self.trunk_frozen else []
        return trunk + [self.heads[task] for task in sorted(self.frozen_heads)]

    @staticmethod
    def _freeze(module: nn.Module) -> None:
        module.requires_grad_(False)
        module.eval()
