"""Any other dataset: a csv or Parquet table with an image-path column and label columns.

``--map column=task,...`` names which columns hold which schema tasks. Class labels may be given as
indices or as class names (``male``/``female``, ``Happy``; case-insensitive); for gender the short
forms ``m``/``f`` are accepted too. A ``split`` column (train/val/valid/test) is used when present,
otherwise a seeded split.
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
    """``"Age=age,sex=gender"`` -> ``{"Age": "age", "sex": "gender"}``, checking the task names."""
    mapping: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        column, sep, task = item.partition("=")
        if not sep or not column or not task:
            raise ValueError(f"--map entry {item!r} is not column=task")
        get_task(task.strip())
        mapping[column.strip()] = task.strip()
    if not mapping:
        raise ValueError("--map names no column")
    return mapping


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
            labels = {task: _label_value(task, row[column]) for column, task in column_map.items()}
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
