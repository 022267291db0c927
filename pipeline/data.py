"""Reading shards for training and evaluation: decode, augment, the task-balanced sampler.

Training: every dataset is an endless, resampled stream of its train shards (seeded by seed, rank,
dataloader worker and epoch), and every batch is composed from per-dataset quotas. The quotas come from
the manifests' label coverage (each dataset labels only some tasks) and solve a small linear programme:
maximise the smallest ratio "expected labelled examples of task t per batch / target share of t".
An epoch is a fixed number of steps, the same on every rank, so no rank runs dry before another.

Evaluation: each split is read once, in order; sample i of a dataset goes to reader
``i mod (world_size x loader_workers)``, so every sample is seen exactly once across ranks and workers.

Both read a sample's JPEG where the folder's manifest places it in its tar and its labels from the
manifest's columns (:func:`manifest_shards`); a folder whose manifest predates offsets is read member by
member, labels from each ``.json``. Images leave the loader as uint8 (4x less to move between processes);
:func:`normalize_images` turns them into floats on the training device.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import mmap
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import simplejpeg
import torch
import webdataset as wds
from scipy.optimize import linprog
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as transforms_functional

from pipeline.config import AugmentConfig
from pipeline.schema import (
    BUILTIN_TASKS,
    TaskDeclarationError,
    TaskSpec,
    check_same_declaration,
    declare_tasks,
    get_task,
    known_tasks,
    label_slices,
    parse_task_declarations,
)
from pipeline.tar_format import TarBytes, TarFormatError, member_at, members_at

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DataConfigError(ValueError):
    """Shard folders that cannot be read, or datasets and tasks that cannot be combined into a training stream;
    the message names the file or dataset and what is wrong."""


def data_error_line(error: DataConfigError) -> str:
    """The one line a :class:`DataConfigError` says, also when a DataLoader worker raised it: torch raises it
    again in the main process with the worker's traceback as its message, our line last."""
    last = str(error).strip().splitlines()[-1]
    return last.removeprefix(f"{DataConfigError.__module__}.{DataConfigError.__qualname__}: ")


# ---------------------------------------------------------------- shard folders

SUMMARY_FILE = "summary.json"
MANIFEST_FILE = "manifest.parquet"
SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test"}
SHARD_HINT = "run the python -m pipeline.shard command that wrote it again (it writes only missing shards)"


@dataclass(frozen=True)
class ShardSet:
    """One dataset as ``pipeline.shard`` wrote it: its summary and, per split, its shards as the wids index
    lists them (``url`` as a path, ``nsamples``, ``filesize``, ``index``: the index file's name)."""

    name: str
    root: Path
    summary: dict
    shard_index: dict[str, list[dict]]

    def shards(self, split: str) -> list[dict]:
        return self.shard_index.get(split, [])

    def urls(self, split: str) -> list[str]:
        return [shard["url"] for shard in self.shards(split)]

    def num_samples(self, split: str) -> int:
        return int(self.summary["samples_per_split"].get(split, 0))

    def labels(self, task: str, split: str = "train") -> list[float]:
        """A task's non-null labels in a split, read from the manifest's label column only."""
        table = pq.read_table(self.root / MANIFEST_FILE, columns=["split", task], filters=[("split", "=", split)])
        return [v for v in table.column(task).to_pylist() if v is not None]

    def label_mean(self, task: str, split: str = "train") -> tuple[float, int]:
        """(mean, count) of a task's labels in a split."""
        values = self.labels(task, split)
        return (sum(values) / len(values) if values else 0.0), len(values)

    def labelled_fraction(self, task: str, split: str = "train") -> float:
        """Share of this split's samples that carry a label for ``task`` (0 when none do)."""
        total = self.num_samples(split)
        labelled = self.summary["labelled_per_task"].get(task, {}).get(split, 0)
        return labelled / total if total else 0.0


def summary_digest(shards: str | Path) -> str | None:
    """sha256 of a shard folder's summary.json (counts, splits, image statistics: shards made again differ), None
    where it has none."""
    try:
        return hashlib.sha256((Path(shards) / SUMMARY_FILE).read_bytes()).hexdigest()
    except OSError:
        return None


def open_shard_set(path: str | Path) -> ShardSet:
    """Open a shard folder and check it before anything reads a sample: summary, manifest and wids indices
    parse, the indices count the samples the summary counts, and every tar has the byte size its index records.

    Only ``stat`` touches the tars (cheap for any number of shards); their sample counts are checked as they
    are read (:func:`tar_samples`). Raises :class:`DataConfigError` naming the file and what is wrong.
    """
    root = Path(path)
    summary_path = root / SUMMARY_FILE
    if not summary_path.exists():
        raise DataConfigError(f"{root} is not a shard folder (no {SUMMARY_FILE}); "
                              "create it with python -m pipeline.shard")
    summary = _read_json(summary_path, root)
    _check_summary(summary, summary_path, root)
    _check_manifest(root, summary)
    shard_index = {split: _read_shard_index(root, split, count)
                   for split, count in summary["samples_per_split"].items()}
    return ShardSet(summary["dataset"], root, summary, shard_index)


def _metadata_hint(root: Path) -> str:
    """How to rewrite a folder's summary, manifest and indices: merge rebuilds them from ``_parts/``."""
    return f"rebuild it with python -m pipeline.shard merge {root}" if (root / "_parts").is_dir() else \
        "shard the dataset again with python -m pipeline.shard"


def _read_json(path: Path, root: Path) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataConfigError(f"{path} is missing; {_metadata_hint(root)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataConfigError(f"{path} cannot be read ({error}); {_metadata_hint(root)}") from None
    except json.JSONDecodeError as error:
        raise DataConfigError(f"{path} is not valid JSON ({error}); {_metadata_hint(root)}") from None


def _check_summary(summary: object, path: Path, root: Path) -> None:
    """The fields readers use: dataset (text), samples_per_split (split -> count), labelled_per_task."""
    if not isinstance(summary, dict):
        raise DataConfigError(f"{path} holds a {type(summary).__name__}, not a summary object; {_metadata_hint(root)}")
    missing = [key for key in ("dataset", "samples_per_split", "labelled_per_task") if key not in summary]
    if missing:
        raise DataConfigError(f"{path} lacks {', '.join(missing)}; {_metadata_hint(root)}")
    counts, coverage = summary["samples_per_split"], summary["labelled_per_task"]
    well_formed = (
        isinstance(summary["dataset"], str)
        and isinstance(counts, dict) and all(isinstance(n, int) and n >= 0 for n in counts.values())
        and isinstance(coverage, dict) and all(isinstance(per_split, dict) for per_split in coverage.values())
    )
    if not well_formed:
        raise DataConfigError(f"{path} is malformed (dataset must be text, samples_per_split split -> count, "
                              f"labelled_per_task task -> split -> count); {_metadata_hint(root)}")


def _check_manifest(root: Path, summary: dict) -> None:
    """The manifest is a Parquet file with the columns readers take labels from (its footer only is read)."""
    manifest_path = root / MANIFEST_FILE
    try:
        columns = pq.read_schema(manifest_path).names
    except FileNotFoundError:
        raise DataConfigError(f"{manifest_path} is missing; {_metadata_hint(root)}") from None
    except (pa.ArrowException, OSError) as error:
        raise DataConfigError(f"{manifest_path} is not a readable Parquet file ({error}); "
                              f"{_metadata_hint(root)}") from None
    missing = [column for column in ("split", *summary["labelled_per_task"]) if column not in columns]
    if missing:
        raise DataConfigError(f"{manifest_path} has no column {', '.join(missing)}; {_metadata_hint(root)}")


def _read_shard_index(root: Path, split: str, expected_samples: int) -> list[dict]:
    """A split's wids index, checked against the summary's count and each tar's size on disk."""
    index_path = root / f"{split}.json"
    if not index_path.exists():
        raise DataConfigError(f"no {SPLIT_WORDS.get(split, split)} split in {root}: {index_path.name} is missing, "
                              f"though {SUMMARY_FILE} counts {expected_samples} {split} samples; "
                              f"{_metadata_hint(root)}")
    index = _read_json(index_path, root)
    try:
        shards = [{"url": str(root / entry["url"]), "nsamples": int(entry["nsamples"]),
                   "filesize": int(entry["filesize"]), "index": index_path.name} for entry in index["shardlist"]]
    except (KeyError, TypeError, ValueError):
        raise DataConfigError(f"{index_path} is not a wids shard index (a shardlist of url, nsamples, filesize); "
                              f"{_metadata_hint(root)}") from None
    indexed = sum(shard["nsamples"] for shard in shards)
    if indexed != expected_samples:
        raise DataConfigError(f"{index_path} lists {indexed} samples, {SUMMARY_FILE} counts {expected_samples}; "
                              f"{_metadata_hint(root)}")
    for shard in shards:
        try:
            size = Path(shard["url"]).stat().st_size
        except FileNotFoundError:
            raise DataConfigError(f"{shard['url']} is missing (listed in {index_path}); {SHARD_HINT}") from None
        check_shard_size(shard, size)
    return shards


def check_shard_size(shard: Mapping[str, object], size: int) -> None:
    """A tar must have the byte size its index records: shorter is a truncated copy, longer a changed one."""
    if size < shard["filesize"]:
        raise DataConfigError(f"{shard['url']} is truncated at byte {size}: {shard['index']} records "
                              f"{shard['filesize']} bytes; delete it and {SHARD_HINT}")
    if size > shard["filesize"]:
        raise DataConfigError(f"{shard['url']} has {size} bytes, {shard['index']} records {shard['filesize']}: "
                              f"it changed after sharding; delete it and {SHARD_HINT}")


def shard_task_declarations(shard_set: ShardSet) -> list[TaskSpec]:
    """The tasks a folder was written with (``task_declarations`` in its summary); a folder written before
    tasks were declarations knows the built-in tasks only."""
    declarations = shard_set.summary.get("task_declarations")
    if declarations is None:
        return [BUILTIN_TASKS[name] for name in shard_set.summary["labelled_per_task"] if name in BUILTIN_TASKS]
    try:
        return parse_task_declarations(declarations, str(shard_set.root / SUMMARY_FILE))
    except TaskDeclarationError as error:
        raise DataConfigError(str(error)) from None


def declare_shard_tasks(shard_sets: Sequence[ShardSet]) -> None:
    """Make every dataset's declared tasks known to this process; two datasets that declare a task
    differently are a :class:`DataConfigError` quoting both declarations."""
    first_seen: dict[str, tuple[TaskSpec, str]] = {}
    for shard_set in shard_sets:
        origin = f"dataset {shard_set.name!r} ({shard_set.root / SUMMARY_FILE})"
        for spec in shard_task_declarations(shard_set):
            earlier = first_seen.setdefault(spec.name, (spec, origin))
            try:
                check_same_declaration(spec, earlier[0], origin, earlier[1])
                declare_tasks([spec], origin)
            except TaskDeclarationError as error:
                raise DataConfigError(str(error)) from None


def resolve_tasks(shard_sets: Sequence[ShardSet], requested: Sequence[str]) -> list[str]:
    """The requested tasks (or every task some dataset labels), checked against the datasets."""
    declare_shard_tasks(shard_sets)
    covered = {task for s in shard_sets for task in s.summary["labelled_per_task"] if s.labelled_fraction(task) > 0}
    tasks = list(requested) or [t for t in known_tasks() if t in covered]
    for task in tasks:
        get_task(task)
        if task not in covered:
            names = ", ".join(s.name for s in shard_sets)
            raise DataConfigError(f"task {task!r} has no labelled training sample in any dataset ({names})")
    return tasks


# ---------------------------------------------------------------- the task-balanced sampler


def check_validation_labels(shard_sets: Sequence[ShardSet], tasks: Sequence[str]) -> None:
    """Every task needs labelled validation samples: its validation loss drives Early Freeze and the
    choice of the best model, and a task without one would make the total validation loss NaN."""
    if not any(s.shards("val") for s in shard_sets):
        folders = ", ".join(str(s.root) for s in shard_sets)
        raise DataConfigError(f"no validation split in {folders}; shard one (pipeline.shard --val-fraction, or the "
                              "dataset's published protocol) or add a dataset that has one")
    for task in tasks:
        if not any(s.labelled_fraction(task, "val") > 0 for s in shard_sets):
            names = ", ".join(s.name for s in shard_sets)
            raise DataConfigError(f"task {task!r} has no labelled validation sample in any dataset ({names}); "
                                  "shard a val split for it or leave it out with data.tasks")


def compute_quotas(
    coverage: Mapping[str, Mapping[str, float]],
    tasks: Sequence[str],
    batch_size: int,
    task_shares: Mapping[str, float] | None = None,
) -> dict[str, int]:
    """Samples per batch from each dataset so that every task gets its share of labelled examples.

    ``coverage[d][t]`` is the fraction of dataset d's samples labelled for task t. With ``n_d`` samples
    from dataset d, task t expects ``E_t = sum_d n_d coverage[d][t]`` labelled examples per batch. We
    maximise ``z`` subject to ``E_t >= z * share_t`` for every task and ``sum_d n_d = batch_size``, then
    round to integers by largest remainder. Datasets that cover no requested task are an error, as are
    tasks no dataset covers.
    """
    datasets = list(coverage)
    shares = np.array([float((task_shares or {}).get(t, 1.0)) for t in tasks])
    if (shares <= 0).any():
        raise DataConfigError(f"task shares must be positive, got {dict(zip(tasks, shares))}")
    shares = shares / shares.sum()
    matrix = np.array([[float(coverage[d].get(t, 0.0)) for d in datasets] for t in tasks])  # tasks x datasets
    for d, name in enumerate(datasets):
        if not matrix[:, d].any():
            raise DataConfigError(f"dataset {name!r} labels none of the tasks {list(tasks)}; "
                                  "remove it or add its tasks")
    for t, task in enumerate(tasks):
        if not matrix[t].any():
            raise DataConfigError(f"no dataset labels task {task!r}")
    # variables: n_1..n_D, z ; minimise -z
    num = len(datasets)
    objective = np.zeros(num + 1)
    objective[-1] = -1.0
    upper = np.hstack([-matrix, shares[:, None]])  # z*share_t - E_t <= 0
    equality = np.hstack([np.ones((1, num)), np.zeros((1, 1))])
    solution = linprog(objective, A_ub=upper, b_ub=np.zeros(len(tasks)), A_eq=equality, b_eq=[batch_size],
                       bounds=[(0, None)] * (num + 1), method="highs")
    if not solution.success:
        raise DataConfigError(f"cannot compute batch quotas: {solution.message}")
    fractional = solution.x[:num]
    quotas = np.floor(fractional + 1e-9).astype(int)
    for index in np.argsort(-(fractional - quotas), kind="stable")[: batch_size - quotas.sum()]:
        quotas[index] += 1
    return {name: int(q) for name, q in zip(datasets, quotas)}


def expected_labelled_per_batch(
    quotas: Mapping[str, int], coverage: Mapping[str, Mapping[str, float]], tasks: Sequence[str]
) -> dict[str, float]:
    return {t: sum(q * coverage[d].get(t, 0.0) for d, q in quotas.items()) for t in tasks}


def describe_quotas(quotas: Mapping[str, int], coverage: Mapping[str, Mapping[str, float]],
                    tasks: Sequence[str]) -> str:
    expected = expected_labelled_per_batch(quotas, coverage, tasks)
    lines = ["batch composition (samples per batch from each dataset):"]
    lines += [f"  {name:<20} {quota:>4}" for name, quota in quotas.items()]
    lines.append("expected labelled examples per batch:")
    lines += [f"  {task:<20} {count:>7.1f}" for task, count in expected.items()]
    return "\n".join(lines)


# ---------------------------------------------------------------- decoding


def stream_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (seed, rank, worker, epoch, dataset), stable across processes."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def label_values(labels: Mapping[str, object], tasks: Sequence[TaskSpec]) -> tuple[list[float], list[bool]]:
    """Targets in the columns of :func:`pipeline.schema.label_slices` (0.0 where unlabelled) and the labelled
    mask, one entry per task; tensors are made per batch."""
    targets: list[float] = []
    mask: list[bool] = []
    for task in tasks:
        value = labels.get(task.name)
        mask.append(value is not None)
        if task.kind == "landmarks":
            targets += [float(v) for v in value] if value is not None else [0.0] * task.label_width
        else:
            targets.append(float(value) if value is not None else 0.0)
    return targets, mask


def augment_batch(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random-resized crop, horizontal flip and colour jitter for a whole uint8 batch at once.

    It runs where the batch is trained (on the GPU there), after the copy from the loader: one affine
    grid per sample and a single ``grid_sample`` replace per-image transform calls, whose per-call
    overhead costs more than the arithmetic on 64-128 px crops (bench/loader_throughput.py). The random
    parameters come from ``generator`` (CPU), so a run is reproducible on any device.
    Crop area fraction ~ U(crop_scale), aspect ratio ~ logU(0.9, 1.1), position uniform inside the image.
    Colour jitter is one affine map per image: x' = A x + B grey(x) + C (brightness, contrast, saturation).
    A batch with landmark labels needs :func:`augment_batch_and_labels`, which moves them too.
    """
    return augment_batch_and_labels(images, None, (), config, generator)[0]


def augment_batch_and_labels(
    images: torch.Tensor, labels: torch.Tensor | None, tasks: Sequence[TaskSpec], config: AugmentConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`augment_batch`, and the same crop and flip applied to the landmark columns of ``labels``
    ((N, C) in the layout of :func:`pipeline.schema.label_slices`): points follow the crop, and a flip also
    swaps left and right points (``TaskSpec.flip_order``). Other columns are returned unchanged."""
    if not config.enabled:
        return images, labels
    count = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(count, generator=generator)

    area = uniform(*config.crop_scale)
    ratio = torch.exp(uniform(math.log(0.9), math.log(1.1)))
    width, height = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    centre_x, centre_y = uniform(-1.0, 1.0) * (1 - width), uniform(-1.0, 1.0) * (1 - height)
    flip = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0) if config.hflip else torch.ones(count)
    theta = torch.zeros(count, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * flip, centre_x
    theta[:, 1, 1], theta[:, 1, 2] = height, centre_y
    pixels = images.float()
    grid = torch.nn.functional.affine_grid(to_device(theta, images.device), list(pixels.shape), align_corners=False)
    pixels = torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if config.color_jitter > 0:
        strength = config.color_jitter
        brightness, contrast, saturation = (uniform(1 - strength, 1 + strength) for _ in range(3))
        grey = torch.tensordot(to_device(torch.tensor([0.299, 0.587, 0.114]), images.device), pixels,
                               dims=([0], [1])).unsqueeze(1)
        mean_grey = grey.mean(dim=(2, 3)).view(-1, 1, 1, 1)
        # brightness b, contrast c around the mean grey m, saturation s around the pixel's grey g:
        # x' = b*s*c*x + b*c*(1-s)*g + b*(1-c)*m
        scale_x = to_device((brightness * contrast * saturation).view(-1, 1, 1, 1), images.device)
        scale_grey = to_device((brightness * contrast * (1 - saturation)).view(-1, 1, 1, 1), images.device)
        offset = to_device((brightness * (1 - contrast)).view(-1, 1, 1, 1), images.device) * mean_grey
        pixels = pixels * scale_x + grey * scale_grey + offset
    if labels is not None and any(task.kind == "landmarks" for task in tasks):
        labels = move_landmarks(labels, tasks, theta, flip < 0)
    return pixels.clamp_(0, 255).round_().to(torch.uint8), labels


def move_landmarks(labels: torch.Tensor, tasks: Sequence[TaskSpec], theta: torch.Tensor,
                   flipped: torch.Tensor) -> torch.Tensor:
    """Landmark columns of ``labels`` in the coordinates of the image that ``affine_grid(theta)`` samples.

    ``theta`` maps an output position p (in [-1, 1], ``align_corners=False``) to the input position
    ``A p + t`` with A diagonal; a point at input position q (unit coordinate u = (q + 1) / 2) therefore
    lands at ``(q - t) / A``. On flipped rows the left/right points also trade places."""
    moved = labels.clone()
    scale = to_device(theta[:, [0, 1], [0, 1]], labels.device)  # (N, 2): x and y scale (x negative when flipped)
    shift = to_device(theta[:, :, 2], labels.device)
    flipped = to_device(flipped, labels.device)
    for task, columns in zip(tasks, label_slices(tasks)):
        if task.kind != "landmarks":
            continue
        points = labels[:, columns].view(len(labels), -1, 2)
        points = ((points * 2 - 1 - shift[:, None, :]) / scale[:, None, :] + 1) / 2
        order = to_device(torch.tensor(task.flip_order()), labels.device)
        points = torch.where(flipped[:, None, None], points[:, order], points)
        moved[:, columns] = points.reshape(len(labels), -1)
    return moved


JpegBytes = bytes | bytearray | memoryview  # a memoryview: of a mapped tar, no copy


def decode_jpeg(jpeg: JpegBytes) -> np.ndarray:
    """uint8 HWC RGB pixels of JPEG bytes.

    simplejpeg is libjpeg-turbo with the accurate DCT and upsampling that Pillow and torchvision use (the same
    pixels, tested); it reads a view of a mapped tar, can decode into a batch, and takes ~2/3 of the time of
    torchvision's decoder (deprecated since 0.29) on a 64 px crop (bench/loader_throughput.py)."""
    return simplejpeg.decode_jpeg(jpeg, "RGB")


def _fit(pixels: np.ndarray, image_size: int) -> np.ndarray:
    """HWC pixels as they are when ``image_size`` x ``image_size``, else resized by torchvision (antialiased)."""
    if pixels.shape[0] == image_size and pixels.shape[1] == image_size:
        return pixels
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    return transforms_functional.resize(chw, [image_size, image_size], antialias=True).permute(1, 2, 0).numpy()


def decode_image(jpeg: JpegBytes, image_size: int) -> torch.Tensor:
    """uint8 CHW RGB from JPEG bytes, resized to ``image_size`` when the shard stores another size; HWC in memory
    (a CHW view of it)."""
    return torch.from_numpy(_fit(decode_jpeg(jpeg), image_size)).permute(2, 0, 1)


class ImageDecodeError(ValueError):
    """The ``index``-th JPEG of a batch does not decode; the stream that knows its tar and key says which."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"JPEG {index} of the batch does not decode: {reason}")
        self.index, self.reason = index, reason


def damaged_jpeg_error(url: str, key: str, reason: str) -> DataConfigError:
    return DataConfigError(f"{url} is damaged: the JPEG of sample {key} does not decode ({reason}); "
                           f"delete it and {SHARD_HINT}")


def decode_images(jpegs: Sequence[JpegBytes], image_size: int) -> torch.Tensor:
    """A uint8 NHWC batch of the JPEGs' RGB pixels, each resized to ``image_size`` where the shard stores another size.

    Each JPEG is decoded straight into its place in the batch: decoding a batch's images first and copying them
    after costs page faults as their memory is freed and taken again, at 128 px more than decoding itself
    (bench/loader_throughput.py). NHWC, because transposing uint8 to NCHW would cost a third of the decoding; the
    batch's ``permute(0, 3, 1, 2)`` is NCHW with channels_last strides."""
    batch = empty_image_batch(len(jpegs), image_size)
    for index, (place, jpeg) in enumerate(zip(batch, jpegs)):
        if not _decode_into(jpeg, place):
            try:
                place[...] = _fit(decode_jpeg(jpeg), image_size)
            except ValueError as error:
                raise ImageDecodeError(index, str(error)) from None
    return torch.from_numpy(batch)


def empty_image_batch(count: int, image_size: int) -> np.ndarray:
    """An uninitialised uint8 NHWC batch to decode into, its first byte 8 bytes past a 16-byte boundary.

    libjpeg-turbo's SIMD colour conversion writes a row that starts 16-byte (SSE2) or 32-byte (AVX2) aligned with
    non-temporal stores, past the cache: shard JPEGs of 64-96 px decode 12-16 % slower into such rows, and whether
    a batch got them depended on where malloc put it (bench/loader_throughput.py). At image sizes that are multiples
    of 16, no row of the batch starts aligned."""
    nbytes = count * image_size * image_size * 3
    memory = np.empty(nbytes + 16, dtype=np.uint8)
    start = (8 - memory.ctypes.data) % 16
    return memory[start : start + nbytes].reshape(count, image_size, image_size, 3)


def _decode_into(jpeg: JpegBytes, place: np.ndarray) -> bool:
    """Decode into ``place`` (HWC); False, and ``place`` not that image, where the image has another size."""
    try:
        return simplejpeg.decode_jpeg(jpeg, "RGB", buffer=place).shape == place.shape
    except ValueError:
        return False  # larger than the place, or not a JPEG: decoding it on its own says which


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (augmentation parameters, constants) on ``device`` without waiting for the device: a
    plain copy from pageable memory synchronises the CUDA stream, a non-blocking one from pinned memory does not."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def normalize_images(images: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 NCHW (any memory layout) -> float, ImageNet mean/std (what torchvision backbones and weight files expect),
    laid out NCHW or, with ``channels_last``, NHWC."""
    mean = to_device(torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), images.device) * 255
    std = to_device(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), images.device) * 255
    images = (images.float() - mean) / std
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------- reading samples


SAMPLE_MEMBERS = ("jpg", "json")


def read_shard(shard: Mapping[str, object]) -> TarBytes:
    """A tar's bytes, checked against the byte size its index entry records when ``shard`` is one.

    Mapped, not read: reading a tar costs up to 5 us per sample (a zeroed buffer, then a copy from the page
    cache), 5-10 % of decoding its image. Shards are published by rename and never rewritten in place; a tar
    truncated while mapped would stop the reader (SIGBUS)."""
    url = str(shard["url"])
    with open(url, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        data = mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) if size else b""
    if "filesize" in shard:
        check_shard_size(shard, len(data))
    return data


def member_key(name: str) -> tuple[str, str]:
    """(key, suffix) of a member name: the key is the file name up to its first dot, as webdataset groups."""
    directory, _, base = name.rpartition("/")
    key, _, suffix = base.partition(".")
    return (f"{directory}/{key}" if directory else key), suffix


def tar_sample_spans(data: TarBytes, shard: Mapping[str, object]) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, suffix -> (payload start, payload size)) of every sample in a tar's bytes, its members grouped by key as
    webdataset groups them.

    ``shard`` is ``{"url"}``, or an entry of :attr:`ShardSet.shard_index`, whose sample count the tar must then have.
    A tar that is truncated, damaged or disagrees with its index, or a sample without a ``.jpg`` or ``.json`` member,
    raises :class:`DataConfigError` naming the file."""
    url = str(shard["url"])
    count, key, spans, offset = 0, "", {}, 0
    try:
        while (member := member_at(data, offset, url)) is not None:
            name, start, size, offset = member
            member_of, suffix = member_key(name)
            if spans and member_of != key:
                yield _complete_sample(url, key, spans)
                count += 1
                spans = {}
            key = member_of
            spans[suffix] = start, size
    except TarFormatError as error:
        raise DataConfigError(f"{error}; delete it and {SHARD_HINT}") from None
    if spans:
        yield _complete_sample(url, key, spans)
        count += 1
    if "nsamples" in shard and count != shard["nsamples"]:
        raise DataConfigError(f"{url} holds {count} samples, {shard['index']} records {shard['nsamples']}; "
                              f"delete it and {SHARD_HINT}")


def _complete_sample(url: str, key: str, spans: dict[str, tuple[int, int]]) -> tuple[str, dict[str, tuple[int, int]]]:
    missing = [suffix for suffix in SAMPLE_MEMBERS if suffix not in spans]
    if missing:
        raise DataConfigError(f"{url}: sample {key!r} has no {' or '.join('.' + suffix for suffix in missing)} member; "
                              f"delete it and {SHARD_HINT}")
    return key, spans


def tar_samples(shards: Iterable[Mapping[str, object]]) -> Iterator[dict]:
    """webdataset pipeline stage: shards -> samples ``{"__key__", "__url__", "jpg", "json"}`` (payloads as bytes),
    read and checked as :func:`tar_sample_spans` reads them."""
    for shard in shards:
        url = str(shard["url"])
        data = read_shard(shard)
        for key, spans in tar_sample_spans(data, shard):
            yield {"__key__": key, "__url__": url,
                   **{suffix: bytes(data[start : start + size]) for suffix, (start, size) in spans.items()}}


@dataclass(frozen=True)
class ManifestShard:
    """One tar's samples as the manifest's rows describe them, in tar order."""

    keys: list[str]
    jpg_names: np.ndarray  # b"<key>.jpg", the member name each sample's header should have
    offsets: np.ndarray  # int64: byte offset of each sample's first header
    first_row: int  # of its samples' labels in the split's label arrays


class SplitReader:
    """One split of a shard folder, its tars located one at a time as they are first read. A sample is a row: its
    labels are that row of :attr:`targets` (the columns of :func:`pipeline.schema.label_slices`, 0.0 where
    unlabelled) and :attr:`mask` (tasks), its JPEG that row's span of its tar (:meth:`jpegs`).

    A folder's manifest locates each sample in its tar and holds the labels, read column-wise once
    (:func:`manifest_shards`); a folder whose manifest predates offsets is read member by member, its label rows
    filled from each ``.json``, once per tar. The JPEGs' spans cost 16 bytes a sample; a located tar stays mapped:
    mapping it again on every read costs page faults and header reads of about 3 us a sample."""

    def __init__(self, root: Path, split: str, shards: Sequence[Mapping[str, object]],
                 tasks: Sequence[TaskSpec]) -> None:
        self.tasks = list(tasks)
        located = manifest_shards(root, split, shards, self.tasks)
        urls = [str(shard["url"]) for shard in shards]
        if located is None:
            self.described: dict[str, ManifestShard] | None = None
            counts = [int(shard["nsamples"]) for shard in shards]
            first_rows = dict(zip(urls, np.cumsum([0, *counts[:-1]]).tolist()))
            self.targets = np.zeros((sum(counts), sum(task.label_width for task in self.tasks)), dtype=np.float32)
            self.mask = np.zeros((sum(counts), len(self.tasks)), dtype=bool)
        else:
            self.described, self.targets, self.mask = located
            first_rows = {url: self.described[url].first_row for url in urls}
        self.shard_rows = {url: range(first_rows[url], first_rows[url] + int(shard["nsamples"]))
                           for url, shard in zip(urls, shards)}
        by_first_row = sorted(urls, key=first_rows.__getitem__)  # a row's tar is then found by one search
        self.tar_urls = by_first_row
        self.tar_positions = {url: position for position, url in enumerate(by_first_row)}
        self.tar_first_rows = np.array([first_rows[url] for url in by_first_row], dtype=np.int64)
        self.tar_bytes: list[memoryview | None] = [None] * len(urls)
        self.jpeg_starts = np.zeros(len(self.targets), dtype=np.int64)
        self.jpeg_sizes = np.zeros(len(self.targets), dtype=np.int64)
        self.older_keys: dict[str, list[str]] = {}  # url -> keys, of a folder without offsets

    def locate(self, shard: Mapping[str, object]) -> range:
        """The rows of ``shard``'s samples (an index entry of this split), in tar order; the tar is mapped and its
        JPEGs found the first time."""
        url = str(shard["url"])
        position = self.tar_positions[url]
        if self.tar_bytes[position] is None:
            data = read_shard(shard)
            rows = self.shard_rows[url]
            if self.described is not None:
                starts, sizes = jpeg_spans(data, self.described[url], url)
            else:
                samples = list(tar_sample_spans(data, shard))  # all checked before any row is written
                starts, sizes = np.array([spans["jpg"] for _, spans in samples], dtype=np.int64).reshape(-1, 2).T
                for row, (_, spans) in zip(rows, samples):
                    start, size = spans["json"]
                    labels = json.loads(bytes(data[start : start + size]))["labels"]
                    self.targets[row], self.mask[row] = label_values(labels, self.tasks)
                self.older_keys[url] = [key for key, _ in samples]
            self.jpeg_starts[rows.start : rows.stop], self.jpeg_sizes[rows.start : rows.stop] = starts, sizes
            self.tar_bytes[position] = memoryview(data)
        return self.shard_rows[url]

    def keys(self, url: str) -> list[str]:
        """The keys of a located tar's samples, in tar order."""
        return self.described[url].keys if self.described is not None else self.older_keys[url]

    def where(self, row: int) -> tuple[str, str]:
        """The tar and key of a located row, for messages."""
        position = int(np.searchsorted(self.tar_first_rows, row, side="right")) - 1
        url = self.tar_urls[position]
        return url, self.keys(url)[row - int(self.tar_first_rows[position])]

    def jpegs(self, rows: np.ndarray) -> list[memoryview]:
        """The JPEG bytes of located rows: views of their tars, no copy."""
        tars = np.searchsorted(self.tar_first_rows, rows, side="right") - 1
        starts = self.jpeg_starts[rows]
        ends = starts + self.jpeg_sizes[rows]
        tar_bytes = self.tar_bytes
        return [tar_bytes[tar][start:end] for tar, start, end in zip(tars.tolist(), starts.tolist(), ends.tolist())]


def batch_sample(parts: Sequence[tuple[SplitReader, np.ndarray]], index: int) -> tuple[SplitReader, int]:
    """The reader and row of a batch's ``index``-th sample, the batch made of each reader's ``rows`` in turn."""
    for reader, rows in parts:
        if index < len(rows):
            return reader, int(rows[index])
        index -= len(rows)
    raise IndexError(index)


def manifest_shards(root: Path, split: str, shards: Sequence[Mapping[str, object]], tasks: Sequence[TaskSpec],
                    ) -> tuple[dict[str, ManifestShard], np.ndarray, np.ndarray] | None:
    """A split's shards (by url) as the folder's manifest describes them: where each sample lies in its tar, and
    the split's targets and mask (:func:`label_arrays`), its rows in tar order shard after shard, read column-wise
    once instead of parsing every sample's ``.json``. None for a manifest written before it located samples (no
    ``offset`` column). A manifest that does not list a shard's samples as its index counts them is a
    :class:`DataConfigError`."""
    manifest_path = root / MANIFEST_FILE
    names = pq.read_schema(manifest_path).names
    if "offset" not in names:
        return None
    columns = ["shard", "key", "offset", *(task.name for task in tasks if task.name in names)]
    table = pq.read_table(manifest_path, columns=columns, filters=[("split", "=", split)])
    table = table.sort_by([("shard", "ascending"), ("offset", "ascending")])
    targets, mask = label_arrays(table, tasks, manifest_path)
    shard_names = np.asarray(table.column("shard").to_pylist(), dtype=object)
    keys, offsets = table.column("key").to_pylist(), table.column("offset").to_numpy()
    jpg_names = np.array([f"{key}.jpg".encode() for key in keys], dtype=bytes)
    starts = np.flatnonzero(np.r_[True, shard_names[1:] != shard_names[:-1]]) if len(shard_names) else []
    ends = np.r_[starts[1:], len(shard_names)] if len(shard_names) else []
    described = {str(root / shard_names[start]): ManifestShard(keys[start:end], jpg_names[start:end],
                                                               offsets[start:end], int(start))
                 for start, end in zip(starts, ends)}
    for shard in shards:
        listed = len(described[shard["url"]].keys) if shard["url"] in described else 0
        if listed != shard["nsamples"]:
            raise DataConfigError(f"{manifest_path} lists {listed} samples of {Path(str(shard['url'])).name}, "
                                  f"{shard['index']} records {shard['nsamples']}; {_metadata_hint(root)}")
    return described, targets, mask


def label_arrays(table: pa.Table, tasks: Sequence[TaskSpec], manifest_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Targets and labelled mask of every row of a manifest table, as :func:`label_values` makes them for one
    sample (a task without a column is unlabelled everywhere)."""
    targets = np.zeros((table.num_rows, sum(task.label_width for task in tasks)), dtype=np.float32)
    mask = np.zeros((table.num_rows, len(tasks)), dtype=bool)
    for index, (task, columns) in enumerate(zip(tasks, label_slices(tasks))):
        if task.name not in table.column_names:
            continue
        column = table.column(task.name)
        labelled = column.is_valid().to_numpy(zero_copy_only=False)
        values = column.drop_null()
        if task.kind == "landmarks":
            values = values.combine_chunks().flatten().to_numpy(zero_copy_only=False)
            if len(values) != labelled.sum() * task.label_width:
                raise DataConfigError(f"{manifest_path}: a {task.name!r} label does not hold {task.label_width} "
                                      f"numbers; {_metadata_hint(manifest_path.parent)}")
            values = values.reshape(-1, task.label_width)
        else:
            values = values.to_numpy(zero_copy_only=False)[:, None]
        mask[:, index] = labelled
        targets[labelled, columns] = values
    return targets, mask


def jpeg_spans(data: TarBytes, described: ManifestShard, url: str) -> tuple[np.ndarray, np.ndarray]:
    """(start, size) in a tar's bytes of each JPEG its manifest rows describe, found by reading the headers at the
    offsets the manifest records: all at once, and member by member only where a header is not the plain
    ``<key>.jpg`` one (long names)."""
    starts, sizes, found = members_at(data, described.offsets, described.jpg_names)
    for row in np.flatnonzero(~found):
        starts[row], sizes[row] = _jpeg_span(data, int(described.offsets[row]), described.keys[row], url)
    if (starts[1:] < starts[:-1] + sizes[:-1]).any():
        raise DataConfigError(f"{url}: its manifest places samples inside one another; {SHARD_HINT}")
    return starts, sizes


def _jpeg_span(data: TarBytes, offset: int, key: str, url: str) -> tuple[int, int]:
    """(start, size) of sample ``key``'s ``.jpg`` payload, among its members from ``offset`` on."""
    following = offset
    try:
        while (member := member_at(data, following, url)) is not None:
            name, start, size, following = member
            member_of, suffix = member_key(name)
            if member_of != key:
                break
            if suffix == "jpg":
                return start, size
    except TarFormatError as error:
        raise DataConfigError(f"{error}; delete it and {SHARD_HINT}") from None
    raise DataConfigError(f"{url} has no {key}.jpg where its manifest places it (byte {offset}): the tar changed "
                          f"after sharding; delete it and {SHARD_HINT}")


# ---------------------------------------------------------------- training stream


class TaskBalancedStream(IterableDataset):
    """Endless batches composed from per-dataset quotas; one independent stream per loader worker.

    Batches are decoded, not augmented: :func:`augment_batch` runs on the training device."""

    def __init__(
        self,
        shard_sets: Sequence[ShardSet],
        quotas: Mapping[str, int],
        tasks: Sequence[str],
        image_size: int,
        shuffle_buffer: int,
        seed: int,
        rank: int = 0,
        epoch: int = 0,
    ) -> None:
        self.sources = [(s.name, s.root, s.shards("train")) for s in shard_sets if quotas.get(s.name, 0) > 0]
        for name, _, shards in self.sources:
            if not shards:
                raise DataConfigError(f"dataset {name!r} has no train shards")
        self.quotas = dict(quotas)
        self.tasks = list(tasks)
        self.task_specs = [get_task(task) for task in self.tasks]  # looked up here: workers may not know declarations
        self.image_size = image_size
        self.shuffle_buffer = shuffle_buffer
        self.seed, self.rank, self.epoch = seed, rank, epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker = info.id if info else 0
        streams = [(*self._samples(name, root, shards, worker), self.quotas[name])
                   for name, root, shards in self.sources]
        sources = torch.tensor([index for index, (name, _, _) in enumerate(self.sources)
                                for _ in range(self.quotas[name])])
        size = self.image_size
        while True:
            # The batch's rows first (labels gathered by row, a dataset at a time), then all its decoding in one
            # tight loop (as fast as decoding alone: the decoder's tables stay in cache). The batch's NCHW view
            # goes out (channels_last strides, see decode_images); the first float op on the device lays it out.
            jpegs: list[memoryview] = []
            targets, mask, taken = [], [], []
            for samples, reader, quota in streams:
                rows = np.array(samples.take(quota))
                jpegs += reader.jpegs(rows)
                targets.append(reader.targets[rows])
                mask.append(reader.mask[rows])
                taken.append((reader, rows))
            try:
                images = decode_images(jpegs, size)
            except ImageDecodeError as error:
                reader, row = batch_sample(taken, error.index)
                raise damaged_jpeg_error(*reader.where(row), error.reason) from None
            yield {"images": images.permute(0, 3, 1, 2),
                   "labels": torch.from_numpy(np.concatenate(targets)),
                   "mask": torch.from_numpy(np.concatenate(mask)), "source": sources.clone()}

    def _samples(self, name: str, root: Path, shards: list[dict], worker: int,
                 ) -> tuple[ShuffledSamples[int], SplitReader]:
        """One dataset's endless rows, resampled shards each read whole, mixed through the shuffle buffer; and the
        reader whose arrays and tars the rows index. Rows, not JPEG views, wait in the buffer: a view is made for
        the samples a batch takes only."""
        seed = stream_seed(self.seed, self.rank, worker, self.epoch, name)
        by_url = {shard["url"]: shard for shard in shards}
        reader = SplitReader(root, "train", shards, self.task_specs)
        picked = wds.ResampledShards(list(by_url), seed=seed, worker_seed=lambda: 0, deterministic=True)
        # chained, not delegated to: a generator between the tars and the buffer would cost a step per sample
        rows = itertools.chain.from_iterable(reader.locate(by_url[pick["url"]]) for pick in picked)
        return ShuffledSamples(rows, self.shuffle_buffer, seed), reader


T = TypeVar("T")


class ShuffledSamples(Generic[T]):
    """An endless stream of samples mixed through a buffer, taken a batch's share at a time.

    The order is ``webdataset.shuffle(buffer_size, initial=min(buffer_size, 100), seed=seed)``'s, draw for draw
    (tested); taking ``count`` samples in one loop saves the generator step and the three calls per sample of its
    ``pick`` and ``random.randint``, about 2 us a sample (bench/loader_throughput.py)."""

    def __init__(self, samples: Iterator[T], buffer_size: int, seed: int) -> None:
        self.samples = samples
        self.buffer: list[T] = []
        self.buffer_size, self.initial = buffer_size, min(buffer_size, 100)
        self.random = random.Random(seed)

    def take(self, count: int) -> list[T]:
        """The next ``count`` samples."""
        buffer, samples, getrandbits = self.buffer, self.samples, self.random.getrandbits
        taken: list[T] = []
        while len(taken) < count:
            buffer.append(next(samples))
            if len(buffer) < self.buffer_size:
                buffer.append(next(samples))
            if len(buffer) < self.initial:
                continue
            # random.randint(0, len(buffer) - 1) as Random._randbelow draws it: the fewest bits, redrawn if too big
            size = len(buffer)
            bits = size.bit_length()
            index = getrandbits(bits)
            while index >= size:
                index = getrandbits(bits)
            last = buffer.pop()
            if index < len(buffer):
                taken.append(buffer[index])
                buffer[index] = last
            else:
                taken.append(last)
        return taken


def train_loader(stream: TaskBalancedStream, loader_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(
        stream, batch_size=None, num_workers=loader_workers, pin_memory=pin_memory,
        prefetch_factor=4 if loader_workers else None, persistent_workers=False,
    )


def default_steps_per_epoch(shard_sets: Sequence[ShardSet], global_batch: int) -> int:
    """One epoch = every train sample once in expectation: train samples / global batch size."""
    return max(1, math.ceil(sum(s.num_samples("train") for s in shard_sets) / global_batch))


# ---------------------------------------------------------------- evaluation stream


class EvalStream(IterableDataset):
    """Every sample of one split of every dataset exactly once across ranks x loader workers, in order."""

    def __init__(self, shard_sets: Sequence[ShardSet], split: str, tasks: Sequence[str], image_size: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.split = split
        self.sources = [(s.root, s.shards(split)) for s in shard_sets]
        self.num_samples = sum(s.num_samples(split) for s in shard_sets)  # over all ranks
        self.tasks, self.image_size = list(tasks), image_size
        self.task_specs = [get_task(task) for task in self.tasks]
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[dict[str, object]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        readers, reader = self.world_size * workers, self.rank * workers + worker
        for source_index, (root, shards) in enumerate(self.sources):
            split = SplitReader(root, self.split, shards, self.task_specs)
            position = 0  # of a sample among its dataset's
            for shard in shards:
                rows = split.locate(shard)
                # a reader's own samples only get a JPEG view and are decoded
                own = [index for index in range(len(rows)) if (position + index) % readers == reader]
                position += len(rows)
                keys, own_rows = split.keys(str(shard["url"])), np.asarray(rows)[own]
                for index, row, jpeg in zip(own, own_rows.tolist(), split.jpegs(own_rows)):
                    try:
                        image = decode_image(jpeg, self.image_size)
                    except ValueError as error:
                        raise damaged_jpeg_error(str(shard["url"]), keys[index], str(error)) from None
                    yield {
                        "images": image,
                        "labels": torch.from_numpy(split.targets[row]),
                        "mask": torch.from_numpy(split.mask[row]),
                        "source": source_index,
                        "key": keys[index],
                    }


def eval_loader(stream: EvalStream, batch_size: int, loader_workers: int, pin_memory: bool = False) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, num_workers=loader_workers, pin_memory=pin_memory)
