"""CelebA: ``img_align_celeba/`` images, ``list_attr_celeba.txt`` (1/-1), ``list_eval_partition.txt``.

The attribute file is CelebA's own format: a count line, a line of 40 attribute names, then one row
per image (``000001.jpg  -1  1 ...``). Schema tasks come from ``Male`` (gender), ``Smiling`` (smile)
and ``Young`` (young); the partition file's 0/1/2 are train/val/test. Without a partition file a seeded
split is used. Optional ``list_landmarks_align_celeba.txt`` adds the five aligned landmarks to each
sample's metadata.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.sources.base import FileImage, SourceInputError, SourceListing, open_text, require_path, seeded_split

ATTRIBUTE_TO_TASK = {"Male": "gender", "Smiling": "smile", "Young": "young"}
PARTITION_TO_SPLIT = {"0": "train", "1": "val", "2": "test"}
ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARK_FILE = "list_landmarks_align_celeba.txt"
IMAGE_FOLDER = "img_align_celeba"


def read_celeba_table(path: Path) -> tuple[list[str], dict[str, list[str]]]:
    """Read a CelebA annotation table (count line, header line, rows): (column names, name -> values)."""
    with open_text(path) as handle:
        lines = handle.read().splitlines()
    if len(lines) < 2:
        raise SourceInputError(f"{path}: expected a count line and a header line")
    columns = lines[1].split()
    rows: dict[str, list[str]] = {}
    for line_number, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != len(columns) + 1:
            raise SourceInputError(f"{path}:{line_number}: {len(fields) - 1} values, expected {len(columns)}")
        rows[fields[0]] = fields[1:]
    return columns, rows


def _attribute_value(code: str) -> int:
    if code not in ("1", "-1"):
        raise ValueError(f"attribute value {code!r} is not 1 or -1")
    return 1 if code == "1" else 0


def list_celeba(
    input_dir: Path,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    attribute_file: Path | None = None,
    dataset: str = "celeba",
) -> SourceListing:
    """List CelebA; ``attribute_file`` overrides the default ``INPUT_DIR/list_attr_celeba.txt``."""
    require_path(input_dir, "CelebA folder")
    attr_path = require_path(attribute_file or input_dir / ATTRIBUTE_FILE, "CelebA attribute file")
    image_dir = require_path(input_dir / IMAGE_FOLDER, "CelebA image folder")
    columns, attribute_rows = read_celeba_table(attr_path)
    missing = [name for name in ATTRIBUTE_TO_TASK if name not in columns]
    if missing:
        raise SourceInputError(f"{attr_path}: attribute column(s) {missing} not found")
    column_index = {name: columns.index(name) for name in ATTRIBUTE_TO_TASK}

    partition_path = input_dir / PARTITION_FILE
    partition = _read_partition(partition_path) if partition_path.exists() else None
    landmark_path = input_dir / LANDMARK_FILE
    landmarks = read_celeba_table(landmark_path)[1] if landmark_path.exists() else None

    listing = SourceListing(dataset)
    if partition is None:
        listing.notes.append(f"{PARTITION_FILE} not found: seeded split")
    present = {p.name for p in image_dir.iterdir()}
    for image_name, values in sorted(attribute_rows.items()):
        source_id = f"{attr_path}:{image_name}"
        if image_name not in present:
            listing.reject(source_id, f"image not found in {image_dir}")
            continue
        key = image_name.rsplit(".", 1)[0]
        try:
            labels = {task: _attribute_value(values[column_index[attr]]) for attr, task in ATTRIBUTE_TO_TASK.items()}
        except ValueError as error:
            listing.reject(source_id, str(error))
            continue
        if partition is None:
            split = seeded_split(seed, key, val_fraction, test_fraction)
        elif image_name in partition:
            split = partition[image_name]
        else:
            listing.reject(source_id, f"not listed in {PARTITION_FILE}")
            continue
        extras = {"landmarks": [float(v) for v in landmarks[image_name]]} if landmarks and image_name in landmarks else {}
        listing.add(key, split, labels, str(image_dir / image_name), FileImage(str(image_dir / image_name)), extras)
    return listing


def _read_partition(path: Path) -> dict[str, str]:
    partition: dict[str, str] = {}
    with open_text(path) as handle:
        lines = handle.read().splitlines()
    for line_number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in PARTITION_TO_SPLIT:
            raise SourceInputError(f"{path}:{line_number}: expected '<image> 0|1|2', found {line!r}")
        partition[fields[0]] = PARTITION_TO_SPLIT[fields[1]]
    return partition
