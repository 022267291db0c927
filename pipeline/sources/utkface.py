"""UTKFace: ``<age>_<gender>_<race>_<datetime>.jpg[.chip.jpg]`` files, labels in the file name.

UTKFace codes gender 0 = male, 1 = female; the schema uses 0 = female, 1 = male. The optional split
csv is the CORAL-CNN protocol (Cao, Mirjalili, Raschka 2019; used by the thesis): ``utk_train.csv`` and
``utk_test.csv`` with columns ``file, age`` where ``age = true age - 21`` (ages 21-60). Files outside
those csvs are not part of the protocol and are left out (counted, not rejected). Without split csvs a
seeded 80/10/10 split is used.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from pipeline.sources.base import (
    FileImage,
    SourceInputError,
    SourceListing,
    holdout_split,
    is_image_name,
    list_files,
    open_text,
    require_path,
    seeded_split,
)

UTKFACE_GENDER_TO_SCHEMA = {0: 1, 1: 0}
CORAL_AGE_OFFSET = 21

# age_gender_race_datetime; the release has a few names without the race field and one without the
# dot before "jpg" ("..._20170109150557335jpg.chip.jpg"), which must still parse.
_NAME = re.compile(r"^(?P<age>\d+)_(?P<gender>\d+)_(?:(?P<race>\d+)_)?(?P<stamp>\d{8,})\s*(?:\.?jpg)?(?:\.chip\.jpg)?$")


def parse_utkface_name(name: str) -> dict[str, int | None]:
    """Labels from a UTKFace file name, in UTKFace's own coding; ``ValueError`` if it does not parse."""
    match = _NAME.match(name)
    if not match:
        raise ValueError("file name is not age_gender_race_datetime.jpg[.chip.jpg]")
    race = match["race"]
    return {"age": int(match["age"]), "gender": int(match["gender"]), "race": int(race) if race else None}


def _read_coral_split(split_csv_dir: Path) -> dict[str, tuple[str, int]]:
    """File name -> (published split, CORAL age label) from ``utk_train.csv`` and ``utk_test.csv``."""
    assignment: dict[str, tuple[str, int]] = {}
    for split, file_name in (("train", "utk_train.csv"), ("test", "utk_test.csv")):
        path = require_path(split_csv_dir / file_name, "CORAL split csv")
        with open_text(path) as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"file", "age"} <= set(reader.fieldnames):
                raise SourceInputError(f"{path}: expected columns 'file' and 'age', found {reader.fieldnames}")
            for row_number, row in enumerate(reader, start=2):
                try:
                    assignment[row["file"]] = (split, int(row["age"]))
                except (TypeError, ValueError):
                    raise SourceInputError(f"{path}:{row_number}: age {row['age']!r} is not an integer") from None
    return assignment


def list_utkface(
    input_dir: Path,
    split_csv_dir: Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    dataset: str = "utkface",
) -> SourceListing:
    """List a UTKFace folder (searched recursively), with the CORAL split when ``split_csv_dir`` is given."""
    require_path(input_dir, "UTKFace folder")
    listing = SourceListing(dataset)
    coral = _read_coral_split(split_csv_dir) if split_csv_dir else None
    outside_protocol = 0
    files = list_files(input_dir, listing)
    for path in files:
        name = path.name
        if not is_image_name(name):
            listing.reject(str(path), "not an image file name")
            continue
        try:
            parsed = parse_utkface_name(name)
        except ValueError as error:
            listing.reject(str(path), str(error))
            continue
        if parsed["gender"] not in UTKFACE_GENDER_TO_SCHEMA:
            listing.reject(str(path), f"gender code {parsed['gender']} is outside UTKFace's coding (0 male, 1 female)")
            continue
        key = name.split(".")[0]
        if coral is None:
            split = seeded_split(seed, key, val_fraction, test_fraction)
        elif name in coral:
            published_split, coral_age = coral[name]
            if coral_age + CORAL_AGE_OFFSET != parsed["age"]:
                listing.reject(
                    str(path),
                    f"CORAL csv age {coral_age} (= {coral_age + CORAL_AGE_OFFSET} years) disagrees with the file name",
                )
                continue
            # The thesis held out 20 % of CORAL's train split for validation.
            split = holdout_split(seed, key, 0.2) if published_split == "train" else published_split
        else:
            outside_protocol += 1
            continue
        labels = {"age": parsed["age"], "gender": UTKFACE_GENDER_TO_SCHEMA[parsed["gender"]], "race": parsed["race"]}
        listing.add(key, split, labels, str(path), FileImage(str(path)))
    if coral is not None:
        listing.notes.append(f"{outside_protocol} files are outside the CORAL protocol (ages 21-60) and left out")
        found_names = {path.name for path in files}
        for name in sorted(set(coral) - found_names):
            listing.reject(f"{split_csv_dir}/utk_{coral[name][0]}.csv:{name}",
                           "listed in the split csv, image not found")
    return listing
