"""What every dataset reader produces: records that point at an image and carry schema labels.

A reader only *lists* its dataset (file names, annotation rows); it never decodes an image. Decoding
happens later in the shard workers, so a reader is cheap and every SLURM array task can run it to get
the same plan. Records are plain picklable dataclasses so they travel to worker processes.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

import numpy as np
import simplejpeg
from PIL import Image

from pipeline.schema import LabelError, LabelValue, validate_labels

SPLITS = ("train", "val", "test")


class ImageRef(Protocol):
    """Something a worker process can turn into a decoded RGB-or-grey PIL image."""

    def load(self) -> Image.Image: ...


@dataclass(frozen=True)
class FileImage:
    """An image file on disk (JPEG, PNG, ...)."""

    path: str

    def load(self) -> Image.Image:
        with open(self.path, "rb") as handle:
            data = handle.read()
        return decode_image_bytes(data)


@dataclass(frozen=True)
class PixelImage:
    """A grey image stored as space-separated 0-255 values (the FER2013 csv ``pixels`` column)."""

    pixels: str
    width: int
    height: int

    def load(self) -> Image.Image:
        values = np.array(self.pixels.split(), dtype=np.int64)
        if values.size != self.width * self.height:
            raise ValueError(f"{values.size} pixel values, expected {self.width}x{self.height}")
        if values.min() < 0 or values.max() > 255:
            raise ValueError("pixel values outside 0..255")
        return Image.fromarray(values.astype(np.uint8).reshape(self.height, self.width), mode="L")


# The ImageNet mean colour: zero after normalisation, so a transparent background reads as "nothing here".
NEUTRAL_BACKGROUND = (124, 116, 104)


def decode_image_bytes(data: bytes) -> Image.Image:
    """Decode an encoded image fully, so truncated and corrupt files fail here and not later; transparent
    pixels are composited onto :data:`NEUTRAL_BACKGROUND` (dropping alpha would leave black or whatever
    colour the file stores under it)."""
    image = decode_plain_jpeg(data)
    if image is not None:
        return image
    image = Image.open(io.BytesIO(data))
    image.load()
    if not image.has_transparency_data:
        return image
    background = Image.new("RGBA", image.size, (*NEUTRAL_BACKGROUND, 255))
    return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")


# Colour spaces whose pixels Pillow's JPEG decoder and simplejpeg produce identically (the same libjpeg-turbo with
# the accurate DCT and fancy upsampling); CMYK and YCCK go to Pillow.
_SIMPLEJPEG_COLOURS = {"YCbCr": "RGB", "RGB": "RGB", "Gray": "GRAY"}


def decode_plain_jpeg(data: bytes) -> Image.Image | None:
    """A colour or grey JPEG through simplejpeg: Pillow's pixels and mode in ~65 % of its time (no header parsing
    in Python). None for anything else (other formats, CMYK, more pixels than Pillow's decompression-bomb limit,
    anything libjpeg warns about), which Pillow then decodes or rejects with its own message."""
    if not data.startswith(b"\xff\xd8"):
        return None
    try:
        height, width, colour_space, _ = simplejpeg.decode_jpeg_header(data)
        target = _SIMPLEJPEG_COLOURS.get(colour_space)
        if target is None or (Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS):
            return None
        pixels = simplejpeg.decode_jpeg(data, target, strict=True)
    except ValueError:
        return None
    return Image.fromarray(pixels[:, :, 0] if target == "GRAY" else pixels)


@dataclass(frozen=True)
class SourceRecord:
    """One sample as listed by a reader: its key, split, labels and where its image comes from."""

    key: str
    split: str
    labels: dict[str, LabelValue]
    source_id: str
    image: ImageRef
    extras: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    """An input that was skipped, with the file or row it came from and why."""

    source_id: str
    stage: str
    reason: str


@dataclass
class SourceListing:
    """Everything a reader found: the usable records and the rejected inputs.

    Inputs with the same sample key but different labels are all rejected, each reason citing another of
    them, since nothing says which is right; exact duplicates are kept here and dropped by
    ``pipeline.shard.select_records``, which keeps the first.
    """

    dataset: str
    records: list[SourceRecord] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _records_by_key: dict[str, list[SourceRecord]] = field(default_factory=dict, repr=False)
    _conflicting_keys: set[str] = field(default_factory=set, repr=False)

    def add(
        self,
        key: str,
        split: str,
        labels: dict[str, object],
        source_id: str,
        image: ImageRef,
        extras: dict[str, object] | None = None,
    ) -> None:
        """Validate the labels against the schema and keep the record, or reject it with the reason."""
        try:
            checked = validate_labels(labels)
        except LabelError as error:
            self.reject(source_id, f"label out of range: {error}", stage="labels")
            return
        record = SourceRecord(sanitize_key(key), split, checked, source_id, image, extras or {})
        same_key = self._records_by_key.setdefault(record.key, [])
        if record.key in self._conflicting_keys:
            self.reject(source_id, _conflict_reason(record, same_key[0]), stage="labels")
        elif same_key and same_key[0].labels != record.labels:
            self._conflicting_keys.add(record.key)
            for earlier in same_key:
                self.records.remove(earlier)
                self.reject(earlier.source_id, _conflict_reason(earlier, record), stage="labels")
            self.reject(source_id, _conflict_reason(record, same_key[0]), stage="labels")
        else:
            same_key.append(record)
            self.records.append(record)

    def reject(self, source_id: str, reason: str, stage: str = "listing") -> None:
        self.rejections.append(Rejection(source_id, stage, reason))


def _conflict_reason(record: SourceRecord, other: SourceRecord) -> str:
    differences = ", ".join(f"{task} {value} here, {other.labels[task]} there"
                            for task, value in record.labels.items() if value != other.labels[task])
    return (f"conflicting duplicate of {other.source_id} (same sample key {record.key!r}): "
            f"{differences or 'same labels, which another input contradicts'}")


def open_text(path: Path) -> TextIO:
    """A csv or annotation text file; a UTF-8 byte-order mark, which Excel writes, is dropped."""
    return path.open(newline="", encoding="utf-8-sig")


class SourceInputError(Exception):
    """The input itself is missing or unusable: nothing can be sharded."""


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sanitize_key(text: str) -> str:
    """WebDataset keys may not contain dots (they separate key and extension); keep them readable."""
    key = _KEY_UNSAFE.sub("_", text).strip("_")
    if not key:
        raise ValueError(f"cannot derive a sample key from {text!r}")
    return key


def unit_interval(seed: int, key: str) -> float:
    """A stable pseudo-random number in [0, 1) for a sample: same seed and key, same number, anywhere."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def seeded_split(seed: int, key: str, val_fraction: float, test_fraction: float) -> str:
    """Assign a sample to train/val/test by a hash of (seed, key), independent of the other samples."""
    draw = unit_interval(seed, key)
    if draw < test_fraction:
        return "test"
    if draw < test_fraction + val_fraction:
        return "val"
    return "train"


def holdout_split(seed: int, key: str, val_fraction: float) -> str:
    """Split a published training set into train and a seeded validation hold-out."""
    return "val" if unit_interval(seed, f"holdout:{key}") < val_fraction else "train"


def list_files(folder: Path, listing: SourceListing, recursive: bool = True) -> list[Path]:
    """The regular files in ``folder`` (and in its subfolders when ``recursive``), in pathlib's order.

    Symlinks to files count and symlinked folders are not entered, as with ``Path.rglob`` + ``is_file``;
    ``os.scandir`` knows each entry's type from reading its folder, so unlike those this costs no ``stat``
    per file (it halves the listing, which runs serially before any shard worker starts). A folder that
    cannot be read is rejected in ``listing`` and the rest kept.
    """
    found: list[tuple[str, ...]] = []
    pending: list[tuple[str, ...]] = [()]
    while pending:
        relative = pending.pop()
        directory = folder.joinpath(*relative)
        files, subfolders = [], []
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        subfolders.append((*relative, entry.name))
                    elif entry.is_file():
                        files.append((*relative, entry.name))
        except OSError as error:
            listing.reject(str(directory), f"cannot read this folder: {error.strerror or error}")
            continue
        found += files
        if recursive:
            pending += subfolders
    found.sort()
    return [folder.joinpath(*parts) for parts in found]


def require_path(path: Path, what: str) -> Path:
    """Fail clearly when an input the reader cannot work without is absent."""
    if not path.exists():
        raise SourceInputError(f"{what} not found: {path}")
    return path


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)
