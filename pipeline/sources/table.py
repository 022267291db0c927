"""Any other dataset: a csv or Parquet table with an image-path column and label columns.

``--map column=task,...`` names which columns hold which tasks (built-in or declared with ``--tasks-file``).
Class labels may be given as indices or as class names (``male``/``female``, ``Happy``; case-insensitive);
for gender the short forms ``m``/``f`` are accepted too. A landmarks task takes one column per coordinate:
``column=task:<point><x|y>`` with the point's index or name, e.g. ``lx=landmarks:0x,ly=landmarks:0y`` or
``nx=landmarks:nose.x``, in pixels of the image (pixel i centred on i), every coordinate of the task mapped;
a row with any of them empty has no landmarks label. A ``split`` column (train/val/valid/test) is used when
present, otherwise a seeded split.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.schema import get_task
from pipeline.sources.base import FileImage, SourceInputError, SourceListing, open_text, require_path, seeded_split

SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
GENDER_SHORT_FORMS = {"m": "male", "f": "female"}


def parse_column_map(text: str) -> dict[str, str]:
    """``"Age=age,sex=gender,lx=landmarks:0x"`` -> ``{"Age": "age", "sex": "gender", "lx": "landmarks:0x"}``,
    checking the task names, the landmark coordinates, and that every coordinate of a landmarks task is mapped."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        column, sep, target = item.partition("=")
        if not sep or not column or not target:
            raise ValueError(f"--map entry {item!r} is not column=task")
        mapping[column.strip()] = target.strip()
    if not mapping:
        raise ValueError("--map names no column")
    coordinates_by_task: dict[str, list[int]] = {}
    for target in mapping.values():
        task, coordinate = parse_target(target)
        if coordinate is not None:
            coordinates_by_task.setdefault(task, []).append(coordinate)
    for task, coordinates in coordinates_by_task.items():
        missing = sorted(set(range(get_task(task).label_width)) - set(coordinates))
        if missing or len(coordinates) != len(set(coordinates)):
            raise ValueError(f"--map must name each coordinate of {task!r} once (x and y of "
                             f"{', '.join(get_task(task).points)}); missing or repeated: {missing or coordinates}")
    return mapping


def parse_target(target: str) -> tuple[str, int | None]:
    """``"age"`` -> (age, None); ``"landmarks:1y"`` or ``"landmarks:right_eye.y"`` -> (landmarks, 3): the index of
    the coordinate in the label ``x0, y0, x1, y1, ...``."""
    task, _, point = target.partition(":")
    spec = get_task(task)
    if not point:
        if spec.kind == "landmarks":
            raise ValueError(f"--map {target!r}: a landmarks task takes one column per coordinate, e.g. {task}:0x")
        return task, None
    if spec.kind != "landmarks":
        raise ValueError(f"--map {target!r}: only a landmarks task has coordinates")
    name, axis = point[:-1].rstrip("."), point[-1:]
    index = int(name) if name.isdigit() else spec.points.index(name) if name in spec.points else -1
    if axis not in ("x", "y") or not 0 <= index < len(spec.points):
        raise ValueError(f"--map {target!r}: expected {task}:<point><x|y> with a point index 0..{len(spec.points) - 1} "
                         f"or name ({', '.join(spec.points)}), e.g. {task}:0x or {task}:{spec.points[0]}.y")
    return task, 2 * index + (axis == "y")


def _label_value(task: str, raw: object) -> object:
    """Turn a table cell into a schema value: class names become indices, empty cells become None."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return None
    spec = get_task(task)
    if spec.kind != "regression" and isinstance(raw, str) and not raw.strip().lstrip("-").isdigit():
        name = raw.strip().lower()
        if task == "gender":
            name = GENDER_SHORT_FORMS.get(name, name)
        return spec.class_index(name)
    return raw


def row_labels(row: dict[str, object], column_map: dict[str, str]) -> dict[str, object]:
    """A row's labels: one cell per scalar task; a landmarks task's coordinates gathered from their columns
    (``None`` when any of them is empty)."""
    labels: dict[str, object] = {}
    coordinates: dict[str, dict[int, object]] = {}
    for column, target in column_map.items():
        task, coordinate = parse_target(target)
        if coordinate is None:
            labels[task] = _label_value(task, row[column])
        else:
            coordinates.setdefault(task, {})[coordinate] = row[column]
    for task, cells in coordinates.items():
        values = [cells[index] for index in range(len(cells))]
        empty = any(value is None or (isinstance(value, str) and not value.strip()) for value in values)
        labels[task] = None if empty else values
    return labels


def list_table(
    table_path: Path,
    image_root: Path,
    column_map: dict[str, str],
    image_column: str = "image",
    split_column: str = "split",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    dataset: str = "table",
) -> SourceListing:
    """List a csv/Parquet table; image paths are relative to ``image_root`` unless absolute."""
    require_path(table_path, "table")
    require_path(image_root, "image root")
    is_parquet = table_path.suffix.lower() == ".parquet"
    if is_parquet:
        table = pq.read_table(table_path)
        columns, rows = set(table.column_names), table.to_pylist()
    else:
        # Cells stay text ("007", "m") and are checked against the schema below.
        with open_text(table_path) as handle:
            reader = csv.DictReader(handle)
            columns, rows = set(reader.fieldnames or ()), list(reader)
    wanted = [image_column, *column_map]
    missing = [name for name in wanted if name not in columns]
    if missing:
        raise SourceInputError(f"{table_path}: column(s) {missing} not found; the table has {sorted(columns)}")
    listing = SourceListing(dataset)
    for row_number, row in enumerate(rows, start=0 if is_parquet else 2):
        source_id = f"{table_path}:{row_number}"
        relative = row[image_column]
        if not relative:
            listing.reject(source_id, f"empty {image_column!r}")
            continue
        image_path = Path(str(relative))
        image_path = image_path if image_path.is_absolute() else image_root / image_path
        if not image_path.is_file():
            listing.reject(source_id, f"image {image_path} not found")
            continue
        try:
            labels = row_labels(row, column_map)
        except ValueError as error:
            listing.reject(source_id, f"label out of range: {error}", stage="labels")
            continue
        key = str(relative).rsplit(".", 1)[0]
        raw_split = row.get(split_column) if split_column in columns else None
        if raw_split is None:
            split = seeded_split(seed, key, val_fraction, test_fraction)
        elif str(raw_split).strip().lower() in SPLIT_NAMES:
            split = SPLIT_NAMES[str(raw_split).strip().lower()]
        else:
            listing.reject(source_id, f"split {raw_split!r} is not one of {', '.join(SPLIT_NAMES)}")
            continue
        listing.add(key, split, labels, source_id, FileImage(str(image_path)))
    return listing
