"""CelebA: ``img_align_celeba/`` images, ``list_attr_celeba.txt`` (1/-1), ``list_eval_partition.txt``.

The attribute file is CelebA's own format: a count line, a line of 40 attribute names, then one row
per image (``000001.jpg  -1  1 ...``). Every attribute becomes a binary task under its own name
(classes no/yes, :func:`celeba_attribute_tasks`); ``Male``, ``Smiling`` and ``Young`` also feed the
built-in ``gender``, ``smile`` and ``young``. The partition file's 0/1/2 are train/val/test; without it a
seeded split is used. An optional ``list_landmarks_align_celeba.txt`` (same format, ten columns
``lefteye_x lefteye_y ... rightmouth_y`` in pixels of the 178x218 aligned image) labels the built-in
``landmarks`` task; the shard writer moves the points into the written crop.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.schema import LANDMARKS_TASK, TaskSpec, declare_tasks
from pipeline.sources.base import FileImage, SourceInputError, SourceListing, open_text, require_path, seeded_split

ATTRIBUTE_TO_TASK = {"Male": "gender", "Smiling": "smile", "Young": "young"}
PARTITION_TO_SPLIT = {"0": "train", "1": "val", "2": "test"}
ATTRIBUTE_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
LANDMARK_FILE = "list_landmarks_align_celeba.txt"
IMAGE_FOLDER = "img_align_celeba"
# The file's columns in the order of the built-in landmarks task's points (left = the image's left).
LANDMARK_COLUMNS = ("lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
                    "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y")
CELEBA_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips", "Big_Nose",
    "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses",
    "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache",
    "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick",
    "Wearing_Necklace", "Wearing_Necktie", "Young",
)
ATTRIBUTE_CLASSES = ("no", "yes")


def celeba_attribute_tasks(names: tuple[str, ...] = CELEBA_ATTRIBUTES) -> list[TaskSpec]:
    """One binary task per attribute, as ``configs/tasks/celeba40.yaml`` declares them."""
    return [TaskSpec(name, "binary", classes=ATTRIBUTE_CLASSES) for name in names]


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
    """List CelebA; ``attribute_file`` overrides the default ``INPUT_DIR/list_attr_celeba.txt``.

    Declares the file's attributes as tasks of this process (:func:`celeba_attribute_tasks`)."""
    require_path(input_dir, "CelebA folder")
    attr_path = require_path(attribute_file or input_dir / ATTRIBUTE_FILE, "CelebA attribute file")
    image_dir = require_path(input_dir / IMAGE_FOLDER, "CelebA image folder")
    columns, attribute_rows = read_celeba_table(attr_path)
    missing = [name for name in ATTRIBUTE_TO_TASK if name not in columns]
    if missing:
        raise SourceInputError(f"{attr_path}: attribute column(s) {missing} not found")
    declare_tasks(celeba_attribute_tasks(tuple(columns)), f"{attr_path} (CelebA attributes)")

    partition_path = input_dir / PARTITION_FILE
    partition = _read_partition(partition_path) if partition_path.exists() else None
    landmark_path = input_dir / LANDMARK_FILE
    landmarks = read_landmarks(landmark_path) if landmark_path.exists() else {}

    listing = SourceListing(dataset)
    if partition is None:
        listing.notes.append(f"{PARTITION_FILE} not found: seeded split")
    if not landmarks:
        listing.notes.append(f"{LANDMARK_FILE} not found: no landmarks")
    present = {p.name for p in image_dir.iterdir()}
    for image_name, values in sorted(attribute_rows.items()):
        source_id = f"{attr_path}:{image_name}"
        if image_name not in present:
            listing.reject(source_id, f"image not found in {image_dir}")
            continue
        key = image_name.rsplit(".", 1)[0]
        try:
            labels = attribute_labels(columns, values)
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
        labels[LANDMARKS_TASK] = landmarks.get(image_name)
        listing.add(key, split, labels, str(image_dir / image_name), FileImage(str(image_dir / image_name)))
    return listing


def attribute_labels(columns: list[str], codes: list[str]) -> dict[str, object]:
    """Every attribute under its own name (0 = -1, 1 = 1), and the built-in tasks three of them feed."""
    labels: dict[str, object] = {name: _attribute_value(code) for name, code in zip(columns, codes)}
    labels |= {task: labels[attribute] for attribute, task in ATTRIBUTE_TO_TASK.items()}
    return labels


def read_landmarks(path: Path) -> dict[str, list[float]]:
    """Image name -> the ten coordinates in :data:`LANDMARK_COLUMNS` order (pixels of the aligned image)."""
    columns, rows = read_celeba_table(path)
    missing = [name for name in LANDMARK_COLUMNS if name not in columns]
    if missing:
        raise SourceInputError(f"{path}: landmark column(s) {', '.join(missing)} not found; the header has {columns}")
    order = [columns.index(name) for name in LANDMARK_COLUMNS]
    try:
        return {image: [float(values[i]) for i in order] for image, values in rows.items()}
    except ValueError as error:
        raise SourceInputError(f"{path}: a landmark is not a number ({error})") from None


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
