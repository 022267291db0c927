"""The unified label schema: tasks declared as data, and the registry every dataset maps into.

A task has a name, a kind (``binary``, ``multiclass``, ``regression`` or ``landmarks`` = K points) and its
classes, range or points. The built-in tasks (:data:`BUILTIN_TASKS`) are always known; a YAML tasks file
(:func:`load_tasks_file`) declares more, and :func:`declare_tasks` makes them known to this process.
Every sample carries every known task; a dataset without a label for a task stores ``None`` (``null`` in
JSON, a null cell in Parquet). A missing label is never a made-up value.

A landmarks label is ``[x0, y0, x1, y1, ...]``: readers give pixels of the image they point at, the shard
writer stores them in units of the written crop's side ([0, 1], origin top-left), which training uses.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

TaskKind = Literal["binary", "multiclass", "regression", "landmarks"]
TASK_KINDS = ("binary", "multiclass", "regression", "landmarks")
LabelValue = int | float | list[float] | None


class LabelError(ValueError):
    """A label value that the task's specification does not allow."""


class TaskDeclarationError(ValueError):
    """A task declaration that is malformed, or that contradicts another declaration of the same name."""


DEFAULT_METRIC = {"binary": "accuracy", "multiclass": "accuracy", "regression": "mae", "landmarks": "nme"}


@dataclass(frozen=True)
class TaskSpec:
    """What one task predicts and how its labels are checked.

    ``classes`` names the class indices of a classification task (index i is ``classes[i]``);
    ``value_range`` bounds a regression target (inclusive); ``points`` names a landmarks task's points,
    whose labels are ``2 * len(points)`` numbers ``x0, y0, x1, y1, ...``.
    """

    name: str
    kind: TaskKind
    classes: tuple[str, ...] = ()
    value_range: tuple[float, float] | None = None
    metric: str = "accuracy"
    points: tuple[str, ...] = ()

    @property
    def num_outputs(self) -> int:
        """Width of the network head for this task."""
        if self.kind == "landmarks":
            return 2 * len(self.points)
        return 1 if self.kind == "regression" else len(self.classes)

    @property
    def label_width(self) -> int:
        """Columns this task takes in a batch's label tensor: 2K for K landmarks, else 1."""
        return 2 * len(self.points) if self.kind == "landmarks" else 1

    @property
    def lower_is_better(self) -> bool:
        """Whether the task's main metric (MAE, NME) falls as the model improves."""
        return self.kind in ("regression", "landmarks")

    def flip_order(self) -> list[int]:
        """Point indices after a horizontal flip: a point named ``left...`` trades places with ``right...``
        (and ``..._left`` with ``..._right``); a point without a partner (the nose) keeps its index."""
        index = {name: i for i, name in enumerate(self.points)}
        return [index.get(_mirrored_name(name), i) for i, name in enumerate(self.points)]

    def declaration(self) -> dict[str, object]:
        """This task in the tasks-file format (what :func:`parse_task_declaration` reads back)."""
        entry: dict[str, object] = {"name": self.name, "kind": self.kind}
        if self.classes:
            entry["classes"] = list(self.classes)
        if self.value_range is not None:
            entry["range"] = list(self.value_range)
        if self.points:
            entry["points"] = list(self.points)
        entry["metric"] = self.metric
        return entry

    def validate(self, value: object) -> LabelValue:
        """Return ``value`` in canonical form (int class index, float, or list of floats), or raise
        :class:`LabelError`."""
        if value is None:
            return None
        if self.kind == "landmarks":
            return self._validate_points(value)
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

    def _validate_points(self, value: object) -> list[float] | None:
        """2K finite numbers; a label with any missing coordinate is missing as a whole."""
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise LabelError(f"{self.name}: {value!r} is not a list of {self.label_width} coordinates")
        items = list(value)
        if len(items) != self.label_width:
            raise LabelError(f"{self.name}: {len(items)} coordinates, expected {self.label_width} "
                             f"(x, y of {', '.join(self.points)})")
        try:
            numbers = [float(item) if item is not None else math.nan for item in items]
        except (TypeError, ValueError):
            raise LabelError(f"{self.name}: {items!r} are not all numbers") from None
        if any(math.isnan(number) for number in numbers):
            return None
        if any(math.isinf(number) for number in numbers):
            raise LabelError(f"{self.name}: coordinates must be finite, got {numbers}")
        return numbers

    def class_index(self, name: str) -> int:
        """Index of a class given by name (case-insensitive)."""
        lowered = name.strip().lower()
        for index, class_name in enumerate(self.classes):
            if class_name.lower() == lowered:
                return index
        raise LabelError(f"{self.name}: unknown class {name!r}; expected one of {', '.join(self.classes)}")


def _mirrored_name(name: str) -> str:
    swapped = name.replace("left", "\0").replace("right", "left").replace("\0", "right")
    return swapped.replace("Left", "\0").replace("Right", "Left").replace("\0", "Right")


def _is_integral(value: object) -> bool:
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, str):
        return value.strip().lstrip("-").isdigit()
    return False


AGE_RANGE = (0.0, 120.0)
FIVE_POINTS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # CelebA's aligned landmarks
LANDMARKS_TASK = "landmarks"

BUILTIN_TASKS: dict[str, TaskSpec] = {
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
        TaskSpec(LANDMARKS_TASK, "landmarks", metric="nme", points=FIVE_POINTS),
    )
}
TASKS = BUILTIN_TASKS  # the name older code and tests use

# Tasks declared in this process (a tasks file, a shard folder's summary, a checkpoint), in declaration order,
# and where each was declared first.
_declared: dict[str, TaskSpec] = {}
_declared_by: dict[str, str] = {}


def parse_task_declaration(entry: object, origin: str = "a task declaration") -> TaskSpec:
    """One ``{name, kind, classes | range | points, metric}`` mapping of a tasks file as a :class:`TaskSpec`."""
    if not isinstance(entry, Mapping):
        raise TaskDeclarationError(f"{origin}: {entry!r} is not a mapping of name, kind and classes/range/points")
    unknown = set(entry) - {"name", "kind", "classes", "range", "points", "metric"}
    name, kind = entry.get("name"), entry.get("kind")
    where = f"{origin}: task {name!r}"
    if unknown:
        raise TaskDeclarationError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                                   "expected name, kind, classes, range, points, metric")
    if not isinstance(name, str) or not name.strip() or "/" in name or "," in name:
        raise TaskDeclarationError(f"{origin}: task name {name!r} must be non-empty text without '/' or ','")
    if kind not in TASK_KINDS:
        raise TaskDeclarationError(f"{where}: kind {kind!r} is not one of {', '.join(TASK_KINDS)}")
    classes = tuple(_class_name(c) for c in entry.get("classes") or ())
    points = tuple(str(p) for p in entry.get("points") or ())
    value_range = entry.get("range")
    if kind == "binary" and not classes:
        classes = ("no", "yes")
    if kind in ("binary", "multiclass") and (len(classes) < 2 or (kind == "binary" and len(classes) != 2)):
        raise TaskDeclarationError(f"{where}: a {kind} task needs {'2' if kind == 'binary' else '2 or more'} "
                                   f"classes, got {list(classes)}")
    if kind == "landmarks" and not points:
        raise TaskDeclarationError(f"{where}: a landmarks task needs its points, e.g. points: [left_eye, right_eye]")
    if value_range is not None:
        if kind != "regression" or not isinstance(value_range, Sequence) or len(value_range) != 2:
            raise TaskDeclarationError(f"{where}: range [low, high] belongs to a regression task")
        value_range = (float(value_range[0]), float(value_range[1]))
    if kind != "landmarks" and points or kind not in ("binary", "multiclass") and classes:
        raise TaskDeclarationError(f"{where}: classes belong to binary/multiclass tasks, points to landmarks")
    metric = str(entry.get("metric") or DEFAULT_METRIC[kind])
    return TaskSpec(name.strip(), kind, classes, value_range, metric, points)


def _class_name(value: object) -> str:
    """YAML 1.1 reads a bare ``no``/``yes`` (the issue's own example) as booleans: they name the classes no/yes."""
    return ("yes" if value else "no") if isinstance(value, bool) else str(value)


def parse_task_declarations(document: object, origin: str) -> list[TaskSpec]:
    """A tasks file's content (``{tasks: [...]}`` or the bare list) as specs, names unique."""
    entries = document.get("tasks") if isinstance(document, Mapping) else document
    if not isinstance(entries, list):
        raise TaskDeclarationError(f"{origin}: expected 'tasks:' followed by a list of task declarations")
    specs = [parse_task_declaration(entry, origin) for entry in entries]
    names = [spec.name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise TaskDeclarationError(f"{origin}: task(s) {', '.join(repeated)} declared more than once")
    return specs


def load_tasks_file(path: str | Path) -> list[TaskSpec]:
    """The task declarations of a YAML tasks file (format: docs/tasks.md)."""
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise TaskDeclarationError(f"tasks file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise TaskDeclarationError(f"tasks file {path} is not valid YAML: {error}") from None
    return parse_task_declarations(document, str(path))


def describe_declaration(spec: TaskSpec) -> str:
    return ", ".join(f"{key}: {value}" for key, value in spec.declaration().items())


def check_same_declaration(spec: TaskSpec, other: TaskSpec, origin: str, other_origin: str) -> None:
    """Raise :class:`TaskDeclarationError` with both declarations when two sources declare a task differently."""
    if spec != other:
        raise TaskDeclarationError(f"task {spec.name!r} is declared differently by {origin} "
                                   f"({describe_declaration(spec)}) and by {other_origin} "
                                   f"({describe_declaration(other)})")


def declare_tasks(specs: Iterable[TaskSpec], origin: str = "a tasks file") -> None:
    """Make ``specs`` known to this process; the same declaration twice is fine, a different one an error."""
    for spec in specs:
        known = known_tasks().get(spec.name)
        if known is not None:
            check_same_declaration(spec, known, origin, _declared_by.get(spec.name, "the built-in tasks"))
        else:
            _declared[spec.name] = spec
            _declared_by[spec.name] = origin


def forget_declared_tasks() -> None:
    """Back to the built-in tasks only (tests; a process that reads another set of shards)."""
    _declared.clear()
    _declared_by.clear()


def known_tasks() -> dict[str, TaskSpec]:
    """The built-in tasks followed by those declared in this process."""
    return {**BUILTIN_TASKS, **_declared}


def get_task(name: str) -> TaskSpec:
    """Look up a task by name with an error that lists the known ones."""
    try:
        return known_tasks()[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())} "
                       "(declare more in a tasks file: docs/tasks.md)") from None


def parse_task_list(text: str) -> tuple[str, ...]:
    """Parse ``"age,gender"`` into known task names, in registry order, rejecting unknown names."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise ValueError("the task list is empty")
    for name in names:
        get_task(name)
    return tuple(name for name in known_tasks() if name in names)


def validate_labels(labels: dict[str, object], tasks: Mapping[str, TaskSpec] | None = None) -> dict[str, LabelValue]:
    """Validate a partial label dict and complete it with ``None`` for every task it lacks.

    ``tasks`` defaults to every known task (built-in and declared)."""
    tasks = known_tasks() if tasks is None else tasks
    unknown = set(labels) - set(tasks)
    if unknown:
        raise LabelError(f"unknown task(s) {sorted(unknown)}; known tasks: {', '.join(tasks)}")
    # a missing label skips the call: most records carry a few of the tasks, and this runs once per record
    return {name: None if (value := labels.get(name)) is None else spec.validate(value)
            for name, spec in tasks.items()}


def label_slices(tasks: Sequence[TaskSpec]) -> list[slice]:
    """The columns of each task in a batch's label tensor: task j's label sits in ``labels[:, slices[j]]``."""
    slices, start = [], 0
    for task in tasks:
        slices.append(slice(start, start + task.label_width))
        start += task.label_width
    return slices
