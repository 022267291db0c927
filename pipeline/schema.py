"""The unified label schema: one registry of tasks that every dataset maps into.

Every sample carries every task of the registry; a dataset without a label for a task stores ``None``
(``null`` in JSON, a null cell in Parquet). A missing label is never a made-up value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

TaskKind = Literal["binary", "multiclass", "regression"]
LabelValue = int | float | None


class LabelError(ValueError):
    """A label value that the task's specification does not allow."""


@dataclass(frozen=True)
class TaskSpec:
    """What one task predicts and how its labels are checked.

    ``classes`` names the class indices of a classification task (index i is ``classes[i]``);
    ``value_range`` bounds a regression target (inclusive).
    """

    name: str
    kind: TaskKind
    classes: tuple[str, ...] = ()
    value_range: tuple[float, float] | None = None
    metric: str = "accuracy"

    @property
    def num_outputs(self) -> int:
        """Width of the network head for this task."""
        return 1 if self.kind == "regression" else len(self.classes)

    def validate(self, value: object) -> LabelValue:
        """Return ``value`` in canonical form (int class index or float), or raise :class:`LabelError`."""
        if value is None:
            return None
        if self.kind == "regression":
            try:
                number = float(value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise LabelError(f"{self.name}: {value!r} is not a number") from None
            if math.isnan(number):
                return None
            low, high = self.value_range or (-math.inf, math.inf)
            if not low <= number <= high:
                raise LabelError(f"{self.name}: {number:g} is outside [{low:g}, {high:g}]")
            return number
        if isinstance(value, bool) or not _is_integral(value):
            raise LabelError(f"{self.name}: {value!r} is not a class index")
        index = int(value)  # type: ignore[arg-type]
        if not 0 <= index < len(self.classes):
            raise LabelError(
                f"{self.name}: class {index} is outside 0..{len(self.classes) - 1} ({', '.join(self.classes)})"
            )
        return index

    def class_index(self, name: str) -> int:
        """Index of a class given by name (case-insensitive)."""
        lowered = name.strip().lower()
        for index, class_name in enumerate(self.classes):
            if class_name.lower() == lowered:
                return index
        raise LabelError(f"{self.name}: unknown class {name!r}; expected one of {', '.join(self.classes)}")


def _is_integral(value: object) -> bool:
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, str):
        return value.strip().lstrip("-").isdigit()
    return False


AGE_RANGE = (0.0, 120.0)

TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("age", "regression", value_range=AGE_RANGE, metric="mae"),
        TaskSpec("gender", "binary", classes=("female", "male")),
        TaskSpec("race", "multiclass", classes=("White", "Black", "Asian", "Indian", "Others")),
        TaskSpec("smile", "binary", classes=("not_smiling", "smiling")),
        TaskSpec("young", "binary", classes=("old", "young")),
        TaskSpec(
            "emotion",
            "multiclass",
            classes=("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"),
        ),
    )
}


def get_task(name: str) -> TaskSpec:
    """Look up a task by name with an error that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


def parse_task_list(text: str) -> tuple[str, ...]:
    """Parse ``"age,gender"`` into known task names, in registry order, rejecting unknown names."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("the task list is empty")
    for name in names:
        get_task(name)
    return tuple(name for name in TASKS if name in names)


def validate_labels(labels: dict[str, object]) -> dict[str, LabelValue]:
    """Validate a partial label dict and complete it with ``None`` for every task it lacks."""
    unknown = set(labels) - set(TASKS)
    if unknown:
        raise LabelError(f"unknown task(s) {sorted(unknown)}; known tasks: {', '.join(TASKS)}")
    return {name: spec.validate(labels.get(name)) for name, spec in TASKS.items()}
