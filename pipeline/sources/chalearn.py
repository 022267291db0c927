"""ChaLearn LAP 2016 apparent age: ``<split>_gt.csv`` rows of (image name, mean age, std) and image folders.

Layout: ``INPUT_DIR/train_gt.csv`` with images in ``INPUT_DIR/train/``, likewise ``valid`` and ``test``.
The csv may have a header (``image,mean,stdv``) or not. The apparent age (the mean of the annotators'
votes) is the ``age`` label; its standard deviation is kept in the sample's metadata as ``age_std``
because the challenge's ε-error needs it.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.sources.base import FileImage, SourceInputError, SourceListing, open_text, require_path

CHALEARN_SPLITS = {"train": "train", "valid": "val", "val": "val", "test": "test"}


def list_chalearn(input_dir: Path, dataset: str = "chalearn") -> SourceListing:
    """List every ``<split>_gt.csv`` found in ``input_dir``."""
    require_path(input_dir, "ChaLearn folder")
    listing = SourceListing(dataset)
    csv_paths = [(input_dir / f"{name}_gt.csv", name, split) for name, split in CHALEARN_SPLITS.items()]
    found = [entry for entry in csv_paths if entry[0].exists()]
    if not found:
        raise SourceInputError(f"{input_dir}: no train_gt.csv / valid_gt.csv / test_gt.csv found")
    for csv_path, folder_name, split in found:
        image_dir = input_dir / folder_name
        with open_text(csv_path) as handle:
            for row_number, row in enumerate(csv.reader(handle), start=1):
                if not row or (row_number == 1 and not _is_number(row[1] if len(row) > 1 else "")):
                    continue  # blank line or header
                source_id = f"{csv_path}:{row_number}"
                if len(row) < 2:
                    listing.reject(source_id, "expected image name, mean age[, std]")
                    continue
                image_name, mean_age = row[0].strip(), row[1].strip()
                image_path = image_dir / image_name
                if not image_path.is_file():
                    listing.reject(source_id, f"image {image_path} not found")
                    continue
                if not _is_number(mean_age):
                    listing.reject(source_id, f"mean age {mean_age!r} is not a number")
                    continue
                extras = {"age_std": float(row[2])} if len(row) > 2 and _is_number(row[2]) else {}
                key = f"{folder_name}_{image_name.rsplit('.', 1)[0]}"
                listing.add(key, split, {"age": float(mean_age)}, source_id, FileImage(str(image_path)), extras)
    return listing


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
