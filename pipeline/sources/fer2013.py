"""FER2013: the Kaggle csv (``emotion, pixels, Usage``) or the folder-per-class layout.

The csv's ``Usage`` gives the published protocol: Training -> train, PublicTest -> val,
PrivateTest -> test. The folder layout (``train/angry/*.png``, ``test/...``) has no validation split:
a seeded fraction of ``train`` is held out unless a ``val``/``valid``/``validation`` folder exists.
Emotion codes 0-6 in the csv follow the schema's order (Angry, Disgust, Fear, Happy, Sad, Surprise,
Neutral).
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.schema import TASKS, LabelError
from pipeline.sources.base import (
    FileImage,
    PixelImage,
    SourceInputError,
    SourceListing,
    holdout_split,
    is_image_name,
    list_files,
    open_text,
    require_path,
)

FER_SIDE = 48
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
FOLDER_TO_SPLIT = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def list_fer2013(input_path: Path, seed: int = 0, val_fraction: float = 0.1, dataset: str = "fer2013") -> SourceListing:
    """List FER2013 from its csv or from a folder-per-class tree."""
    require_path(input_path, "FER2013 input")
    if input_path.is_dir():
        return _list_folders(input_path, seed, val_fraction, dataset)
    return _list_csv(input_path, dataset)


def _list_csv(csv_path: Path, dataset: str) -> SourceListing:
    listing = SourceListing(dataset)
    with open_text(csv_path) as handle:
        reader = csv.DictReader(handle)
        required = {"emotion", "pixels"}
        if reader.fieldnames is None or not required <= set(reader.fieldnames):
            raise SourceInputError(f"{csv_path}: expected columns emotion, pixels[, Usage]; found {reader.fieldnames}")
        for row_number, row in enumerate(reader, start=2):
            source_id = f"{csv_path}:{row_number}"
            usage = row.get("Usage") or "Training"
            if usage not in USAGE_TO_SPLIT:
                listing.reject(source_id, f"Usage {usage!r} is not one of {', '.join(USAGE_TO_SPLIT)}")
                continue
            pixels = row["pixels"] or ""
            if len(pixels.split()) != FER_SIDE * FER_SIDE:
                listing.reject(source_id, f"{len(pixels.split())} pixel values, expected {FER_SIDE * FER_SIDE}")
                continue
            listing.add(
                f"fer{row_number - 1:06d}",
                USAGE_TO_SPLIT[usage],
                {"emotion": row["emotion"]},
                source_id,
                PixelImage(pixels, FER_SIDE, FER_SIDE),
            )
    return listing


def _list_folders(root: Path, seed: int, val_fraction: float, dataset: str) -> SourceListing:
    listing = SourceListing(dataset)
    split_dirs = {d.name.lower(): d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in FOLDER_TO_SPLIT}
    if not split_dirs:
        nested = [d for d in root.iterdir() if d.is_dir()]
        if len(nested) == 1:  # archives often unpack to one top folder, e.g. fer2013/train
            return _list_folders(nested[0], seed, val_fraction, dataset)
        raise SourceInputError(f"{root}: expected train/ and test/ folders with one subfolder per emotion")
    has_val_folder = any(FOLDER_TO_SPLIT[name] == "val" for name in split_dirs)
    emotion = TASKS["emotion"]
    for folder_name, split_dir in split_dirs.items():
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            try:
                class_index = emotion.class_index(class_dir.name)
            except LabelError as error:
                listing.reject(str(class_dir), f"folder name is not an emotion: {error}")
                continue
            for path in list_files(class_dir, listing, recursive=False):
                if not is_image_name(path.name):
                    listing.reject(str(path), "not an image file name")
                    continue
                key = f"{folder_name}_{class_dir.name}_{path.stem}"
                split = FOLDER_TO_SPLIT[folder_name]
                if split == "train" and not has_val_folder:
                    split = holdout_split(seed, key, val_fraction)
                listing.add(key, split, {"emotion": class_index}, str(path), FileImage(str(path)))
    return listing
