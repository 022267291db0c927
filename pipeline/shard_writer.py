"""Write one shard: decode, fit and encode its images, then publish tar + manifest part atomically.

This is the unit of work of ``pipeline.shard``: a worker process (or a SLURM array task) gets a
:class:`ShardPlan` and produces ``<split>-NNNNNN.tar`` plus its manifest part and status in ``_parts/``.
Nothing is visible under its final name until it is complete: files are written as ``*.tmp``, fsynced
and renamed, the tar last, so "the tar exists" means "the shard and its part are complete".
The tar is the one copy of the pixels: the manifest locates each sample in it (offset, size, sha256).

With ``EncodeSettings.align`` every input is a photo: each face the policy keeps becomes one sample, warped onto
the 5-point template (pipeline/align.py, docs/align.md), and a photo without one becomes a rejection.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import operator
import os
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.align import (
    AlignedFace,
    AlignSettings,
    MtcnnDetector,
    apply_transform,
    faces_in_photo,
    one_torch_thread,
)
from pipeline.schema import BUILTIN_TASKS, LabelValue, TaskSpec
from pipeline.sources.base import Rejection, SourceRecord
from pipeline.tar_format import tar_end, tar_member_bytes

PARTS_DIR = "_parts"
# 1 (status files without the field): the manifest repeated every JPEG in an ``image`` column;
# 2: the manifest locates each sample in its tar (``offset``, ``size``); statuses carry image statistics.
MANIFEST_FORMAT = 2
# zstd halves a manifest against Parquet's default snappy (its largest column, the hex sha256, is random).
MANIFEST_COMPRESSION = "zstd"
_GREY_LEVELS = range(256)
_GREY_SQUARES = [level * level for level in _GREY_LEVELS]
# The grey statistics measure every 4th crop of a shard (its first included; the same on any worker or resume):
# measuring each cost ~9 % of sharding it. Tolerance, against every crop's: on the real UTKFace (23,705 crops)
# split means and stds within 0.6 grey levels, sharpness within 0.06; a small split of very varied images less
# close (176 synthetic faces: mean 6.7 levels, std 2.2, sharpness 0.15 off).
GREY_STATS_EVERY = 4


@dataclass(frozen=True)
class EncodeSettings:
    """How every image of a dataset is stored."""

    image_size: int = 128
    jpeg_quality: int = 90
    align: AlignSettings | None = None  # set: detect faces in each input and write each kept face aligned

    def describe(self) -> dict[str, object]:
        """What plan.json records and the plan's fingerprint hashes; without ``align`` when it is off, so that a
        plain folder written before ``--align`` existed resumes under the same fingerprint."""
        described: dict[str, object] = {"image_size": self.image_size, "jpeg_quality": self.jpeg_quality}
        if self.align is not None:
            described["align"] = {"detector": MtcnnDetector.name, **dataclasses.asdict(self.align)}
        return described


@dataclass(frozen=True)
class ShardPlan:
    """The records that make up one shard, fixed before any image is read."""

    name: str  # e.g. "train-000003"; the tar is <name>.tar
    split: str
    records: tuple[SourceRecord, ...]


@dataclass(frozen=True)
class ImageStats:
    """Integer sums over the grey levels of measured crops (every :data:`GREY_STATS_EVERY`-th of a shard): exact, so
    any merge order gives the same totals."""

    num_images: int = 0
    num_pixels: int = 0
    pixel_sum: int = 0
    pixel_square_sum: int = 0
    abs_diff_sum: int = 0  # |grey[y, x + 1] - grey[y, x]|, summed
    num_diffs: int = 0

    @classmethod
    def of(cls, image: Image.Image) -> ImageStats:
        """~90 us for a 128 px crop (a tenth of sharding it): moments from the grey histogram, differences in int16."""
        grey = image.convert("L")
        width, height = grey.size
        histogram = grey.histogram()
        pixels = np.frombuffer(grey.tobytes(), dtype=np.uint8).reshape(height, width)
        abs_diffs = np.subtract(pixels[:, 1:], pixels[:, :-1], dtype=np.int16)
        np.abs(abs_diffs, out=abs_diffs)
        return cls(
            1, width * height, sum(map(operator.mul, histogram, _GREY_LEVELS)),
            sum(map(operator.mul, histogram, _GREY_SQUARES)), int(abs_diffs.sum(dtype=np.int64)),
            height * (width - 1),
        )

    def __add__(self, other: ImageStats) -> ImageStats:
        # Field by field: dataclasses.astuple deep-copies, ~30 us a call, once per image.
        return ImageStats(*(getattr(self, field.name) + getattr(other, field.name)
                            for field in dataclasses.fields(self)))

    @property
    def mean(self) -> float:
        return self.pixel_sum / self.num_pixels if self.num_pixels else 0.0

    @property
    def std(self) -> float:
        if not self.num_pixels:
            return 0.0
        variance_times_n2 = self.num_pixels * self.pixel_square_sum - self.pixel_sum**2  # exact in integers
        return (variance_times_n2 / self.num_pixels**2) ** 0.5

    @property
    def sharpness(self) -> float:
        """Mean absolute horizontal difference of grey levels: low for blurred images."""
        return self.abs_diff_sum / self.num_diffs if self.num_diffs else 0.0


@dataclass(frozen=True)
class ShardResult:
    name: str
    split: str
    num_samples: int
    num_bytes: int
    rejections: tuple[Rejection, ...]
    seconds: float
    skipped: bool = False  # already complete from an earlier run


def fit_geometry(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """Where :func:`fit_image` puts a ``width`` x ``height`` image in its square: (scaled width, scaled height,
    left offset, top offset) in pixels, by the same rounding as ``ImageOps.pad``."""
    if width == height:
        return size, size, 0, 0
    if width > height:
        scaled_height = round(height / width * size)
        return size, scaled_height, 0, round((size - scaled_height) * 0.5)
    scaled_width = round(width / height * size)
    return scaled_width, size, round((size - scaled_width) * 0.5), 0


def crop_landmarks(points: list[float], width: int, height: int, size: int) -> list[float]:
    """Pixel coordinates ``x0, y0, ...`` of a ``width`` x ``height`` image (pixel i spans [i, i + 1)) -> units
    of the side of the square :func:`fit_image` writes (0 = left/top edge, 1 = right/bottom edge)."""
    scaled_width, scaled_height, left, top = fit_geometry(width, height, size)
    scale_x, scale_y = scaled_width / width, scaled_height / height
    moved = []
    for x, y in zip(points[0::2], points[1::2]):
        moved += [(left + (x + 0.5) * scale_x) / size, (top + (y + 0.5) * scale_y) / size]
    return moved


def uncrop_landmarks(points: list[float], width: int, height: int, size: int) -> list[float]:
    """The inverse of :func:`crop_landmarks`: units of the square crop -> pixels of the original image."""
    scaled_width, scaled_height, left, top = fit_geometry(width, height, size)
    scale_x, scale_y = scaled_width / width, scaled_height / height
    moved = []
    for x, y in zip(points[0::2], points[1::2]):
        moved += [(x * size - left) / scale_x - 0.5, (y * size - top) / scale_y - 0.5]
    return moved


def crop_labels(labels: dict[str, LabelValue], tasks: dict[str, TaskSpec], width: int, height: int,
                size: int) -> dict[str, LabelValue]:
    """``labels`` with every landmarks label moved from the source image's pixels into the written crop."""
    return {name: crop_landmarks(value, width, height, size)  # type: ignore[arg-type]
            if value is not None and tasks[name].kind == "landmarks" else value
            for name, value in labels.items()}


def align_labels(labels: dict[str, LabelValue], tasks: dict[str, TaskSpec], photo_to_crop: np.ndarray,
                 size: int) -> dict[str, LabelValue]:
    """``labels`` with every landmarks label (pixels of the photo, pixel i centred on i) carried by the alignment's
    similarity into units of the side of the aligned crop, as :func:`crop_labels` does for a fitted one."""
    moved: dict[str, LabelValue] = {}
    for name, value in labels.items():
        if value is not None and tasks[name].kind == "landmarks":
            points = np.asarray(value, dtype=np.float64).reshape(-1, 2) + 0.5  # continuous pixels, as align uses
            value = [round(float(unit), 6) for unit in (apply_transform(photo_to_crop, points) / size).ravel()]
        moved[name] = value
    return moved


def fit_image(image: Image.Image, size: int) -> Image.Image:
    """RGB, ``size`` x ``size``; a non-square crop is scaled to fit and padded, keeping its aspect."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    if image.size == (size, size):
        return image
    if image.width == image.height:
        return image.resize((size, size), Image.Resampling.BILINEAR)
    return ImageOps.pad(image, (size, size), method=Image.Resampling.BILINEAR, color=(0, 0, 0))


def describe_image_error(error: Exception) -> str:
    """A reason a person understands, with the decoder's own words after it."""
    if isinstance(error, UnidentifiedImageError):
        return "not a decodable image (corrupt file or unknown format)"
    if isinstance(error, OSError) and "truncated" in str(error).lower():
        return f"truncated image ({error})"
    return f"cannot decode image ({type(error).__name__}: {error})"


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


# json.dumps with these options builds a new encoder on every call; one shared encoder writes the same bytes.
_SAMPLE_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"))


def sample_metadata(record: SourceRecord, dataset: str) -> bytes:
    """The ``.json`` member of a sample: deterministic bytes (sorted keys); landmarks in crop units."""
    document: dict[str, object] = {"dataset": dataset, "source_id": record.source_id, "labels": record.labels}
    document.update(record.extras)
    return _SAMPLE_JSON.encode(document).encode()


def label_type(spec: TaskSpec) -> pa.DataType:
    """A manifest column: float for regression, a list of floats for landmarks, a small int for a class index."""
    if spec.kind == "landmarks":
        return pa.list_(pa.float64())
    return pa.float64() if spec.kind == "regression" else pa.int16()


def manifest_schema(tasks: dict[str, TaskSpec] | None = None) -> pa.Schema:
    """Columns of ``manifest.parquet`` for ``tasks`` (default: the built-in ones): identity, one nullable
    column per task (in crop units for landmarks), where the sample lies in its
    tar (``offset`` of its first header, ``size`` of its .jpg and .json members with headers and padding)
    and the sha256 of its JPEG bytes."""
    label_fields = [pa.field(name, label_type(spec), nullable=True) for name, spec in (tasks or BUILTIN_TASKS).items()]
    return pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("dataset", pa.string()),
            pa.field("split", pa.string()),
            pa.field("shard", pa.string()),
            pa.field("source_id", pa.string()),
            *label_fields,
            pa.field("extras", pa.string()),
            pa.field("offset", pa.int64()),
            pa.field("size", pa.int64()),
            pa.field("sha256", pa.string()),
        ]
    )


def _stage(final: Path, chunks: list[bytes]) -> tuple[Path, Path]:
    """Write ``chunks`` durably under ``<final>.tmp``; return (temporary, final) for the rename."""
    temporary = final.with_name(final.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.writelines(chunks)
        handle.flush()
        os.fsync(handle.fileno())
    return temporary, final


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def shard_is_complete(out_dir: Path, name: str) -> bool:
    return (out_dir / f"{name}.tar").exists() and (out_dir / PARTS_DIR / f"{name}.json").exists()


def read_part_status(out_dir: Path, name: str) -> dict:
    """A complete shard's ``_parts/<name>.json``: counts, tar size, rejections, format, image statistics."""
    return json.loads((out_dir / PARTS_DIR / f"{name}.json").read_text())


def manifest_format(status: dict) -> int:
    return int(status.get("manifest_format", 1))


@dataclass
class AlignmentCounts:
    """One shard's face detection: photos searched, faces written, and the seconds spent detecting and warping
    (one thread of one worker process, so faces / seconds is the rate of one worker)."""

    photos: int = 0
    faces: int = 0
    seconds: float = 0.0


@cache
def worker_detector(min_face: int) -> MtcnnDetector:
    """One detector per worker process (and min_face): its three networks load once, not once per shard."""
    return MtcnnDetector(min_face=min_face)


def aligned_samples(record: SourceRecord, photo: Image.Image, detector: MtcnnDetector, settings: EncodeSettings,
                    tasks: dict[str, TaskSpec],
                    counts: AlignmentCounts) -> list[tuple[SourceRecord, Image.Image]] | Rejection:
    """The faces ``settings.align`` keeps in ``photo``, each a (sample record, aligned crop), or why none.

    With the policy ``all`` every face's key gets ``_f<i>`` (largest first, so keys are stable) and every face
    carries the photo's labels; the detection (box, 5 points in the photo and in the crop, score) goes into
    the sample's json under ``face``.
    """
    assert settings.align is not None
    started = time.perf_counter()
    with one_torch_thread():
        found = faces_in_photo(photo, detector, settings.image_size, settings.align.policy, settings.align.min_face)
    counts.photos += 1
    counts.faces += len(found.faces)
    counts.seconds += time.perf_counter() - started
    if not found.faces:
        return Rejection(record.source_id, "face", found.no_face_reason or "no face found")
    return [(face_record(record, face, index, settings.align.policy == "all", settings.image_size, tasks), face.crop)
            for index, face in enumerate(found.faces)]


def face_record(record: SourceRecord, face: AlignedFace, index: int, suffix_key: bool, size: int,
                tasks: dict[str, TaskSpec]) -> SourceRecord:
    """The sample of one aligned face of ``record``'s photo: its key, labels in the crop and detection."""
    return dataclasses.replace(
        record,
        key=f"{record.key}_f{index}" if suffix_key else record.key,
        labels=align_labels(record.labels, tasks, face.photo_to_crop, size),
        extras={**record.extras, "face": {**face.describe(), "index": index}},
    )


def fitted_samples(record: SourceRecord, image: Image.Image, size: int,
                   tasks: dict[str, TaskSpec]) -> list[tuple[SourceRecord, Image.Image]]:
    """The one sample of a plain (not aligned) input: its image fitted into the square, its landmarks moved along."""
    labels = crop_labels(record.labels, tasks, *image.size, size)
    if labels != record.labels:  # a new record only when a landmark moved: replace() costs as much as the rest
        record = dataclasses.replace(record, labels=labels)
    return [(record, fit_image(image, size))]


def encoded_samples(source_record: SourceRecord, settings: EncodeSettings, tasks: dict[str, TaskSpec],
                    detector: MtcnnDetector | None,
                    alignment: AlignmentCounts) -> list[tuple[SourceRecord, Image.Image, bytes]] | Rejection:
    """The samples one input becomes, each (record, crop, JPEG bytes), or why it becomes none."""
    try:
        source_image = source_record.image.load()
        if detector is None:
            samples = fitted_samples(source_record, source_image, settings.image_size, tasks)
        else:
            samples = aligned_samples(source_record, source_image, detector, settings, tasks, alignment)
        if isinstance(samples, Rejection):
            return samples
        return [(record, image, encode_jpeg(image, settings.jpeg_quality)) for record, image in samples]
    except Exception as error:  # any decoder failure is a property of that one input file
        return Rejection(source_record.source_id, "image", describe_image_error(error))


def manifest_row(record: SourceRecord, dataset: str, plan: ShardPlan, offset: int, size: int,
                 jpeg: bytes) -> dict[str, object]:
    """One sample's row of the manifest part: identity, labels, where its members lie in the tar, its hash."""
    return {
        "key": record.key,
        "dataset": dataset,
        "split": plan.split,
        "shard": f"{plan.name}.tar",
        "source_id": record.source_id,
        **record.labels,
        "extras": json.dumps(record.extras, sort_keys=True) if record.extras else None,
        "offset": offset,
        "size": size,
        "sha256": hashlib.sha256(jpeg).hexdigest(),
    }


def write_shard(plan: ShardPlan, out_dir: Path, dataset: str, settings: EncodeSettings,
                tasks: dict[str, TaskSpec] | None = None) -> ShardResult:
    """Encode every record of ``plan`` labelled for ``tasks`` (default: the built-in ones); bad images become
    rejections, the rest a complete shard."""
    tasks = tasks or BUILTIN_TASKS
    started = time.perf_counter()
    if shard_is_complete(out_dir, plan.name):
        status = read_part_status(out_dir, plan.name)
        rejections = tuple(Rejection(**entry) for entry in status["rejections"])
        return ShardResult(plan.name, plan.split, status["num_samples"], status["num_bytes"], rejections, 0.0, True)

    rejections: list[Rejection] = []
    manifest_rows: list[dict[str, object]] = []
    tar_parts: list[bytes] = []
    image_stats = ImageStats()
    offset = 0
    alignment = AlignmentCounts()
    detector = worker_detector(settings.align.min_face) if settings.align is not None else None
    for source_record in plan.records:
        encoded = encoded_samples(source_record, settings, tasks, detector, alignment)
        if isinstance(encoded, Rejection):
            rejections.append(encoded)
            continue
        for record, image, jpeg in encoded:
            jpg_member = tar_member_bytes(f"{record.key}.jpg", jpeg)
            json_member = tar_member_bytes(f"{record.key}.json", sample_metadata(record, dataset))
            tar_parts += [jpg_member, json_member]
            sample_size = len(jpg_member) + len(json_member)
            if len(manifest_rows) % GREY_STATS_EVERY == 0:
                image_stats += ImageStats.of(image)
            manifest_rows.append(manifest_row(record, dataset, plan, offset, sample_size, jpeg))
            offset += sample_size
    tar_parts.append(tar_end())

    part_buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(manifest_rows, schema=manifest_schema(tasks)), part_buffer,
                   compression=MANIFEST_COMPRESSION)
    num_bytes = offset + len(tar_parts[-1])
    status = {
        "name": plan.name,
        "split": plan.split,
        "num_samples": len(manifest_rows),
        "num_bytes": num_bytes,
        "rejections": [vars(r) for r in rejections],
        "manifest_format": MANIFEST_FORMAT,
        "image_stats": dataclasses.asdict(image_stats),
    }
    if settings.align is not None:
        status["align"] = dataclasses.asdict(alignment)
    publish_shard(out_dir, plan.name, part_buffer.getvalue().to_pybytes(), json.dumps(status, indent=1).encode(),
                  tar_parts)
    return ShardResult(
        plan.name, plan.split, len(manifest_rows), num_bytes, tuple(rejections), time.perf_counter() - started
    )


def publish_shard(out_dir: Path, name: str, manifest_part: bytes, status: bytes, tar_parts: list[bytes]) -> None:
    """Write the manifest part and status durably under their names, then the tar: its presence means the shard
    is complete. One directory fsync per folder, after its renames, keeps that order across a crash."""
    parts_dir = out_dir / PARTS_DIR
    for temporary, final in (_stage(parts_dir / f"{name}.parquet", [manifest_part]),
                             _stage(parts_dir / f"{name}.json", [status])):
        os.replace(temporary, final)
    _fsync_dir(parts_dir)
    temporary, final = _stage(out_dir / f"{name}.tar", tar_parts)
    os.replace(temporary, final)
    _fsync_dir(out_dir)
