"""``python -m pipeline.shard``: turn a face dataset into WebDataset shards with one label schema.

    python -m pipeline.shard utkface data/UTKFace --split-csv data/coral --out shards/utkface --workers 2
    python -m pipeline.shard synthetic --num-samples 4000 --tasks age,gender,race --out shards/synth
    python -m pipeline.shard merge shards/utkface        # after the parts of a SLURM array are done
    python -m pipeline.shard table photos.csv --image-root photos --map age=age --align --faces all --min-face 40

The run: list the source (cheap, deterministic) -> fix the shard plan (which records go into which
``<split>-NNNNNN.tar``) -> encode the shards in worker processes, each published atomically -> merge:
``manifest.parquet``, ``rejected.parquet``, one ``wids`` index per split and ``summary.json``.
A re-run skips complete shards; a SLURM array task (``--task-index I --num-tasks K``) encodes every
K-th shard of the same plan, and whichever part finishes last merges.

``--align`` (any source; the ``align`` extra) treats every input as a photo: each worker finds its faces and
writes each kept face warped onto the 5-point template (docs/align.md); a photo without a face is a rejection.

The summary also holds per-split image statistics of the written crops (grey mean, std, sharpness; measured on
every ``GREY_STATS_EVERY``-th crop of a shard) and warns when a held-out split's sharpness differs from train's by
more than ``SHARPNESS_RATIO_LIMIT``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.align import (
    DEFAULT_MIN_FACE,
    FACE_POLICIES,
    AlignExtraMissing,
    AlignSettings,
    check_align_extra,
)
from pipeline.progress import start_progress
from pipeline.schema import (
    BUILTIN_TASKS,
    TaskDeclarationError,
    TaskSpec,
    declare_tasks,
    known_tasks,
    load_tasks_file,
    parse_task_declarations,
    parse_task_list,
)
from pipeline.shard_writer import (
    MANIFEST_COMPRESSION,
    MANIFEST_FORMAT,
    PARTS_DIR,
    EncodeSettings,
    ImageStats,
    ShardPlan,
    ShardResult,
    manifest_format,
    manifest_schema,
    read_part_status,
    shard_is_complete,
    write_shard,
)
from pipeline.sources.base import (
    SPLITS,
    SourceInputError,
    SourceListing,
    SourceRecord,
    unit_interval,
)

PLAN_FILE = "plan.json"
MANIFEST_FILE = "manifest.parquet"
REJECTED_FILE = "rejected.parquet"
SUMMARY_FILE = "summary.json"
# Sharpness (mean absolute horizontal grey difference) of train against val or test, either way, above
# which the summary warns. The FER2013 copy whose train images were blurred measured 3.9 vs 14.0 (3.6x);
# its repaired copy 11.6 vs 11.7. Splits of one source drawn the same way stay within a few per cent.
SHARPNESS_RATIO_LIMIT = 1.5
WARNING_PREFIX = "WARNING:"


class ShardingError(Exception):
    """The run cannot produce a usable dataset; the message says why and what to do."""


@dataclass(frozen=True)
class ShardJob:
    """Everything a sharding run needs besides the source itself."""

    out_dir: Path
    encode: EncodeSettings = EncodeSettings()
    samples_per_shard: int = 1000
    workers: int = 1
    task_index: int = 0
    num_tasks: int = 1
    limit: int | None = None
    seed: int = 0
    overwrite: bool = False
    tasks: tuple[TaskSpec, ...] = tuple(BUILTIN_TASKS.values())  # the manifest's label columns, in order

    @property
    def task_specs(self) -> dict[str, TaskSpec]:
        return {spec.name: spec for spec in self.tasks}

    def __post_init__(self) -> None:
        if not 0 <= self.task_index < self.num_tasks:
            raise ValueError(f"--task-index {self.task_index} must be in 0..{self.num_tasks - 1}")
        if self.samples_per_shard < 1 or self.workers < 1:
            raise ValueError("--samples-per-shard and --workers must be at least 1")
        if not 8 <= self.encode.image_size <= 4096 or not 1 <= self.encode.jpeg_quality <= 100:
            raise ValueError("--size must be in 8..4096 and --jpeg-quality in 1..100")


# ---------------------------------------------------------------- planning


def select_records(listing: SourceListing, limit: int | None, seed: int) -> list[SourceRecord]:
    """Drop duplicate keys (keeping the first in sorted order), apply ``--limit``, order by split, then shuffled.

    Within a split the order is a seeded pseudo-random one (a hash of seed and key), not the key order:
    file names often encode labels (UTKFace's start with the age), and a shard of key-ordered samples
    holds one narrow age range, which a reader's shuffle buffer cannot mix (its batches would drift
    from young to old through an epoch). ``--limit`` keeps a seeded pseudo-random subset likewise, not
    the first N files. Both depend only on the seed and the keys, so a re-run writes the same shards.
    """
    by_key: dict[str, SourceRecord] = {}
    for record in sorted(listing.records, key=lambda r: (r.key, r.source_id)):
        if record.key in by_key:
            listing.reject(record.source_id,
                           f"duplicate sample key {record.key!r} (also {by_key[record.key].source_id})")
            continue
        by_key[record.key] = record
    records = list(by_key.values())
    records.sort(key=lambda r: (unit_interval(seed, r.key), r.key))
    if limit is not None:
        records = records[:limit]
    split_order = {split: i for i, split in enumerate(SPLITS)}
    return sorted(records, key=lambda r: split_order[r.split])  # stable: the shuffled order within a split


def plan_shards(records: Iterable[SourceRecord], samples_per_shard: int) -> list[ShardPlan]:
    """Cut each split's records (already ordered) into shards of ``samples_per_shard``."""
    by_split: dict[str, list[SourceRecord]] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    plans = []
    for split, split_records in by_split.items():
        for index, start in enumerate(range(0, len(split_records), samples_per_shard)):
            chunk = tuple(split_records[start : start + samples_per_shard])
            plans.append(ShardPlan(f"{split}-{index:06d}", split, chunk))
    return plans


def plan_fingerprint(dataset: str, plans: list[ShardPlan], job: ShardJob) -> str:
    """A hash of everything that determines the shards' bytes; a resumed run must match it."""
    digest = hashlib.sha256()
    digest.update(json.dumps([dataset, job.encode.describe(), job.samples_per_shard]).encode())
    for plan in plans:
        for record in plan.records:
            digest.update(json.dumps([plan.name, record.key, record.source_id, record.labels, record.extras],
                                     default=str).encode())
    return digest.hexdigest()


def shards_for_task(plans: list[ShardPlan], task_index: int, num_tasks: int) -> list[ShardPlan]:
    """Round-robin: array task I of K encodes shards I, I+K, I+2K, ... of the common plan."""
    return plans[task_index::num_tasks]


def _temporary_name(path: Path) -> Path:
    """Unique per process: array parts finishing together may write the same merged file at once."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _write_json_atomically(path: Path, document: object) -> None:
    temporary = _temporary_name(path)
    temporary.write_text(json.dumps(document, indent=1, sort_keys=True) + "\n")
    os.replace(temporary, path)


def _prepare_out_dir(listing: SourceListing, plans: list[ShardPlan], job: ShardJob) -> None:
    """Create the output folder, or check that the shards already in it belong to this very plan."""
    parts_dir = job.out_dir / PARTS_DIR
    plan_path = parts_dir / PLAN_FILE
    fingerprint = plan_fingerprint(listing.dataset, plans, job)
    if job.overwrite and job.out_dir.exists() and job.task_index == 0:
        shutil.rmtree(job.out_dir)
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous["fingerprint"] != fingerprint:
            raise ShardingError(
                f"{job.out_dir} holds shards of a different input or settings (plan {previous['fingerprint'][:12]}, "
                f"this run {fingerprint[:12]}); use another --out or pass --overwrite"
            )
        _refuse_to_mix_manifest_formats(job.out_dir, plans)
    parts_dir.mkdir(parents=True, exist_ok=True)
    for plan in shards_for_task(plans, job.task_index, job.num_tasks):  # only this part's: others may be writing
        for stale in (job.out_dir / f"{plan.name}.tar.tmp", *parts_dir.glob(f"{plan.name}.*.tmp")):
            stale.unlink(missing_ok=True)  # left by an interrupted run; never mistaken for a shard
    _write_json_atomically(
        plan_path,
        {
            "dataset": listing.dataset,
            "fingerprint": fingerprint,
            "encode": job.encode.describe(),
            "samples_per_shard": job.samples_per_shard,
            "shards": [{"name": p.name, "split": p.split, "num_records": len(p.records)} for p in plans],
            "listing_rejections": [vars(r) for r in listing.rejections],
            "notes": listing.notes,
            "task_declarations": [spec.declaration() for spec in job.tasks],
        },
    )


def _refuse_to_mix_manifest_formats(out_dir: Path, plans: list[ShardPlan]) -> None:
    """A folder holds one manifest format. An older version's complete folder is kept as it is (its summary
    says it can be rewritten); an incomplete one cannot be finished by this version without mixing formats."""
    older = [p.name for p in plans if shard_is_complete(out_dir, p.name)
             and manifest_format(read_part_status(out_dir, p.name)) < MANIFEST_FORMAT]
    if older and len(older) < len(plans):
        raise ShardingError(
            f"{out_dir} holds {len(older)} shards written by an older pipeline.shard (image bytes in the manifest) "
            f"and {len(plans) - len(older)} still to write, which would mix two manifest formats in one folder; "
            f"pass --overwrite to rewrite it all"
        )


# ---------------------------------------------------------------- running


def encode_shards(plans: list[ShardPlan], dataset: str, job: ShardJob) -> list[ShardResult]:
    """Encode this task's shards with ``job.workers`` processes; complete shards are skipped."""
    mine = shards_for_task(plans, job.task_index, job.num_tasks)
    # pyarrow imports pandas when it builds its first table (~0.3 s); pay that once here, before the
    # worker processes fork, instead of once in every worker.
    pa.Table.from_pylist([], schema=manifest_schema(job.task_specs))
    results: list[ShardResult] = []
    progress = start_progress(sum(len(p.records) for p in mine), f"{dataset} shards", "images")
    if job.workers == 1:
        for plan in mine:
            results.append(write_shard(plan, job.out_dir, dataset, job.encode, job.task_specs))
            progress.update(len(plan.records))
    else:
        # Full shards first and each split's short last shard at the end, so that the workers finish together
        # instead of one running a full shard alone while the others wait.
        largest_first = sorted(mine, key=lambda plan: -len(plan.records))
        with ProcessPoolExecutor(max_workers=job.workers) as pool:
            futures = {pool.submit(write_shard, plan, job.out_dir, dataset, job.encode, job.task_specs): plan
                       for plan in largest_first}
            for future in as_completed(futures):
                results.append(future.result())
                progress.update(len(futures[future].records))
    progress.close()
    return sorted(results, key=lambda r: r.name)


def incomplete_shards(out_dir: Path) -> list[str]:
    plan = json.loads((out_dir / PARTS_DIR / PLAN_FILE).read_text())
    return [entry["name"] for entry in plan["shards"] if not shard_is_complete(out_dir, entry["name"])]


def merge_shards(out_dir: Path) -> dict[str, object]:
    """Write manifest, rejections, per-split ``wids`` indices and the summary from the completed parts."""
    plan_path = out_dir / PARTS_DIR / PLAN_FILE
    if not plan_path.exists():
        raise ShardingError(f"{out_dir} has no {PARTS_DIR}/{PLAN_FILE}: run pipeline.shard on a source first")
    plan = json.loads(plan_path.read_text())
    missing = incomplete_shards(out_dir)
    if missing:
        raise ShardingError(
            f"{len(missing)} of {len(plan['shards'])} shards are not complete yet ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); re-run the sharding command (it resumes) and merge again"
        )
    statuses = [read_part_status(out_dir, entry["name"]) for entry in plan["shards"]]
    older = [status["name"] for status in statuses if manifest_format(status) < MANIFEST_FORMAT]
    if older and len(older) < len(statuses):
        raise ShardingError(
            f"{out_dir} mixes shards of two manifest formats ({len(older)} written by an older pipeline.shard, e.g. "
            f"{older[0]}); shard the folder again with --overwrite"
        )
    tasks = _planned_tasks(plan, out_dir, statuses)
    labelled = _write_manifest(out_dir, statuses, tasks, current_format=not older)
    rejections = [*plan["listing_rejections"], *(r for status in statuses for r in status["rejections"])]
    _write_parquet_atomically(
        pa.Table.from_pylist(rejections, schema=pa.schema([("source_id", pa.string()), ("stage", pa.string()),
                                                           ("reason", pa.string())])),
        out_dir / REJECTED_FILE,
    )
    for split in SPLITS:
        split_statuses = [s for s in statuses if s["split"] == split]
        if split_statuses:
            _write_json_atomically(
                out_dir / f"{split}.json",
                {
                    "__kind__": "wids-shard-index-v1",
                    "wids_version": 1,
                    "name": f"{plan['dataset']}-{split}",
                    "shardlist": [
                        {"url": f"{s['name']}.tar", "nsamples": s["num_samples"], "filesize": s["num_bytes"]}
                        for s in split_statuses
                        if s["num_samples"] > 0
                    ],
                },
            )
    summary = summarize(plan["dataset"], statuses, labelled, rejections, plan["encode"], plan["notes"], tasks)
    summary["manifest_bytes"] = (out_dir / MANIFEST_FILE).stat().st_size
    if older:
        sizes = f"{_human_size(summary['manifest_bytes'])} beside {_human_size(summary['tar_bytes'])} of tars"
        summary["notes"].append(
            f"written by an older pipeline.shard: {MANIFEST_FILE} repeats every JPEG ({sizes}) and no image statistics "
            f"were recorded; run the same command with --overwrite to rewrite the folder with a manifest of offsets "
            f"and hashes only"
        )
    _write_json_atomically(out_dir / SUMMARY_FILE, summary)
    if summary["num_samples"] == 0:
        raise ShardingError(f"no usable sample in the input: all {len(rejections)} inputs were rejected "
                            f"(see {out_dir / REJECTED_FILE})")
    return summary


def _planned_tasks(plan: dict, out_dir: Path, statuses: list[dict]) -> dict[str, TaskSpec]:
    """The tasks a plan was written for; a plan from before task declarations has the built-in tasks whose
    columns its manifest parts hold."""
    if "task_declarations" in plan:
        try:
            return {spec.name: spec for spec in parse_task_declarations(plan["task_declarations"], str(out_dir))}
        except TaskDeclarationError as error:
            raise ShardingError(str(error)) from None
    columns = pq.read_schema(out_dir / PARTS_DIR / f"{statuses[0]['name']}.parquet").names if statuses else []
    return {name: spec for name, spec in BUILTIN_TASKS.items() if name in columns}


def _write_manifest(out_dir: Path, statuses: list[dict], tasks: dict[str, TaskSpec],
                    current_format: bool) -> Counter[tuple[str, str]]:
    """Append the manifest parts in plan order, one at a time (memory: one part, never all of them), and
    count the labelled samples per (task, split). An older folder's parts keep their own columns."""
    part_paths = [out_dir / PARTS_DIR / f"{status['name']}.parquet" for status in statuses]
    schema = manifest_schema(tasks) if current_format or not part_paths else pq.read_schema(part_paths[0])
    labelled: Counter[tuple[str, str]] = Counter()
    temporary = _temporary_name(out_dir / MANIFEST_FILE)
    with pq.ParquetWriter(temporary, schema, compression=MANIFEST_COMPRESSION) as writer:
        for status, part_path in zip(statuses, part_paths):
            part = pq.read_table(part_path, schema=schema)
            writer.write_table(part)
            for task in tasks:
                labelled[task, status["split"]] += part.num_rows - part.column(task).null_count
    os.replace(temporary, out_dir / MANIFEST_FILE)
    return labelled


def _write_parquet_atomically(table: pa.Table, path: Path) -> None:
    temporary = _temporary_name(path)
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def image_stats_by_split(statuses: list[dict]) -> dict[str, ImageStats]:
    """Each split's image statistics, summed over its shards (exact integer sums: any order, same result)."""
    totals: dict[str, ImageStats] = {}
    for status in statuses:
        if "image_stats" in status:
            totals[status["split"]] = totals.get(status["split"], ImageStats()) + ImageStats(**status["image_stats"])
    return {split: totals[split] for split in SPLITS if split in totals and totals[split].num_images}


def sharpness_warnings(stats_by_split: dict[str, ImageStats]) -> list[str]:
    """A held-out split much blurrier or sharper than train: a broken copy or a different pipeline, not a protocol."""
    train = stats_by_split.get("train")
    warnings = []
    for split in ("val", "test"):
        if train is None or split not in stats_by_split:
            continue
        held_out = stats_by_split[split]
        low, high = sorted((train.sharpness, held_out.sharpness))
        if high > SHARPNESS_RATIO_LIMIT * low:
            ratio = f"{high / low:.1f}x" if low else "infinitely"
            warnings.append(
                f"{WARNING_PREFIX} train and {split} images differ in sharpness: {train.sharpness:.1f} vs "
                f"{held_out.sharpness:.1f} (mean absolute horizontal grey difference), {ratio} apart, over the limit "
                f"of {SHARPNESS_RATIO_LIMIT}x; one split may have been blurred or resized differently (an old FER2013 "
                f"copy had 3.9 in train vs 14.0 in test): check the source before training on it"
            )
    return warnings


def summarize(
    dataset: str, statuses: list[dict], labelled: Counter[tuple[str, str]], rejections: list[dict[str, str]],
    encode: dict, notes: list[str], tasks: dict[str, TaskSpec] | None = None,
) -> dict[str, object]:
    """Samples per split, labelled samples per task and split, the task declarations, image statistics,
    rejections by reason."""
    tasks = BUILTIN_TASKS if tasks is None else tasks
    samples_per_split = {split: sum(s["num_samples"] for s in statuses if s["split"] == split) for split in SPLITS}
    samples_per_split = {split: count for split, count in samples_per_split.items() if count}
    coverage = {
        task: {split: labelled[task, split] for split in samples_per_split}
        for task in tasks
        if any(labelled[task, split] for split in samples_per_split)
    }
    stats = image_stats_by_split(statuses)
    reasons = Counter(_reason_kind(r["reason"]) for r in rejections)
    return {
        "dataset": dataset,
        "num_samples": sum(samples_per_split.values()),
        "samples_per_split": samples_per_split,
        "labelled_per_task": coverage,
        "tasks": list(coverage),
        "task_declarations": [spec.declaration() for spec in tasks.values()],
        "num_rejected": len(rejections),
        "rejected_by_reason": dict(reasons.most_common()),
        "image_size": encode["image_size"],
        "image_stats": {
            split: {"num_images": s.num_images, "mean": round(s.mean, 3), "std": round(s.std, 3),
                    "sharpness": round(s.sharpness, 3)}
            for split, s in stats.items()
        },
        **({"align": alignment_summary(encode["align"], statuses)} if "align" in encode else {}),
        "manifest_format": min((manifest_format(s) for s in statuses), default=MANIFEST_FORMAT),
        "tar_bytes": sum(s["num_bytes"] for s in statuses),
        "notes": [*notes, *sharpness_warnings(stats)],
    }


def alignment_summary(settings: dict, statuses: list[dict]) -> dict[str, object]:
    """Photos searched, faces written, photos without a kept face, and faces/s of one worker: faces over the
    seconds the workers spent detecting and warping (each shard runs on one thread of one worker)."""
    photos = sum(status["align"]["photos"] for status in statuses)
    faces = sum(status["align"]["faces"] for status in statuses)
    seconds = sum(status["align"]["seconds"] for status in statuses)
    without_face = sum(1 for status in statuses for rejection in status["rejections"] if rejection["stage"] == "face")
    return {**settings, "photos": photos, "faces": faces, "photos_without_face": without_face,
            "detect_seconds": round(seconds, 3),
            "faces_per_second_per_worker": round(faces / seconds, 2) if seconds > 0 else 0.0}


def _human_size(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 1e6 else f"{num_bytes / 1e3:.1f} kB"


def _reason_kind(reason: str) -> str:
    """Group rejection reasons for the summary: the text before the first detail."""
    return reason.split(":")[0].split(" (")[0][:80]


def print_summary(summary: dict[str, object], out_dir: Path, seconds: float, encoded: int,
                  rejections_path: Path) -> None:
    print(f"\n{summary['dataset']}: {summary['num_samples']} samples in {out_dir}")
    print("  per split:  " + ", ".join(f"{k} {v}" for k, v in summary["samples_per_split"].items()))
    for task, per_split in summary["labelled_per_task"].items():
        print(f"  {task:<9} labelled: " + ", ".join(f"{k} {v}" for k, v in per_split.items()))
    declared = [entry["name"] for entry in summary.get("task_declarations", [])]
    missing = [task for task in declared if task not in summary["labelled_per_task"]]
    if missing:
        print(f"  no labels (null) for: {', '.join(missing)}")
    if summary["num_rejected"]:
        print(f"  rejected {summary['num_rejected']} inputs (details: {rejections_path}):")
        for reason, count in list(summary["rejected_by_reason"].items())[:8]:
            print(f"    {count:>6}  {reason}")
    if summary["image_stats"]:
        per_split = [f"{split} {s['mean']:.1f} / {s['std']:.1f} / {s['sharpness']:.1f}"
                     for split, s in summary["image_stats"].items()]
        print("  images (grey mean / std / sharpness): " + ", ".join(per_split))
    if "align" in summary:
        align = summary["align"]
        print(f"  faces ({align['detector']}, {align['policy']}, at least {align['min_face']} px): "
              f"{align['faces']} from {align['photos']} photos, {align['photos_without_face']} without one; "
              f"{align['faces_per_second_per_worker']:.1f} faces/s per worker")
    ratio = summary["manifest_bytes"] / summary["tar_bytes"] if summary["tar_bytes"] else 0.0
    print(f"  manifest: {_human_size(summary['manifest_bytes'])} beside {_human_size(summary['tar_bytes'])} of tars "
          f"({ratio:.1%})")
    for note in summary["notes"]:
        print(f"  {note}" if note.startswith(WARNING_PREFIX) else f"  note: {note}")
    rate = encoded / seconds if seconds > 0 else 0.0
    print(f"  encoded {encoded} images in {seconds:.1f} s ({rate:.0f} images/s)")


def run(listing: SourceListing, job: ShardJob) -> dict[str, object] | None:
    """Plan, encode this task's shards and, once every shard exists, merge. Returns the summary if merged."""
    started = time.perf_counter()
    records = select_records(listing, job.limit, job.seed)
    if not records:
        reasons = Counter(_reason_kind(r.reason) for r in listing.rejections).most_common(3)
        raise ShardingError(f"no usable sample in the input ({len(listing.rejections)} rejected; "
                            f"most common: {reasons})")
    plans = plan_shards(records, job.samples_per_shard)
    _prepare_out_dir(listing, plans, job)
    results = encode_shards(plans, listing.dataset, job)
    encoded = sum(r.num_samples for r in results if not r.skipped)
    skipped = sum(1 for r in results if r.skipped)
    if skipped:
        print(f"resumed: {skipped} complete shard(s) kept from an earlier run", file=sys.stderr)
    missing = incomplete_shards(job.out_dir)
    if missing:
        print(
            f"part {job.task_index + 1}/{job.num_tasks} done ({len(results)} shards); {len(missing)} shards of other "
            f"parts pending; the last part merges, or run: python -m pipeline.shard merge {job.out_dir}"
        )
        return None
    summary = merge_shards(job.out_dir)
    print_summary(summary, job.out_dir, time.perf_counter() - started, encoded, job.out_dir / REJECTED_FILE)
    return summary


# ---------------------------------------------------------------- command line


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, help="output folder (default: shards/<name>)")
    common.add_argument("--name", help="dataset name stored with every sample (default: the source)")
    common.add_argument("--size", type=int, default=128, help="side of the square output crop in pixels")
    common.add_argument("--jpeg-quality", type=int, default=90)
    common.add_argument("--samples-per-shard", type=int, default=1000)
    common.add_argument("--workers", type=int, default=1, help="encoding processes")
    array_offset = int(os.environ.get("SLURM_ARRAY_TASK_ID", 0)) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0))
    common.add_argument("--task-index", type=int, default=array_offset, help="this part of a split run (SLURM array)")
    common.add_argument("--num-tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)))
    common.add_argument("--limit", type=int, help="shard a seeded subset of this many samples")
    common.add_argument("--seed", type=int, default=0, help="seed of the seeded splits and of --limit")
    common.add_argument("--val-fraction", type=float, default=0.1)
    common.add_argument("--test-fraction", type=float, default=0.1)
    common.add_argument("--overwrite", action="store_true", help="delete an existing output folder first")
    common.add_argument("--tasks-file", type=Path,
                        help="YAML task declarations beside the built-in tasks (docs/tasks.md)")
    common.add_argument("--align", action="store_true",
                        help="inputs are photos: detect faces (MTCNN, the align extra) and write each aligned "
                             "(docs/align.md)")
    common.add_argument("--faces", choices=FACE_POLICIES, help="with --align: the largest face (default) or all")
    common.add_argument("--min-face", type=int,
                        help=f"with --align: smallest face box side in px (default {DEFAULT_MIN_FACE})")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.shard", description=__doc__.split("\n\n")[0])
    sources = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    common = _common_options()
    utk = sources.add_parser("utkface", parents=[common], help="UTKFace aligned & cropped faces")
    utk.add_argument("input", type=Path)
    utk.add_argument("--split-csv", type=Path, help="folder with the CORAL-CNN utk_train.csv and utk_test.csv")
    celeba = sources.add_parser("celeba", parents=[common], help="CelebA img_align_celeba + annotation txt files")
    celeba.add_argument("input", type=Path)
    celeba.add_argument("--attr-file", type=Path, help="attribute file (default INPUT/list_attr_celeba.txt)")
    fer = sources.add_parser("fer2013", parents=[common], help="FER2013 csv or train/test folder-per-class tree")
    fer.add_argument("input", type=Path)
    chalearn = sources.add_parser("chalearn", parents=[common], help="ChaLearn LAP 2016 apparent age")
    chalearn.add_argument("input", type=Path)
    table = sources.add_parser("table", parents=[common], help="any csv/Parquet table of image paths and labels")
    table.add_argument("input", type=Path)
    table.add_argument("--image-root", type=Path, required=True)
    table.add_argument("--map", required=True, help="column=task,... e.g. Age=age,Sex=gender,lx=landmarks:0x")
    table.add_argument("--image-column", default="image")
    table.add_argument("--split-column", default="split")
    synthetic = sources.add_parser("synthetic", parents=[common], help="procedural faces (the embedded default)")
    synthetic.add_argument("--num-samples", type=int, default=2000)
    synthetic.add_argument("--tasks", default="age,gender,race,smile,young,emotion",
                           help="tasks to label, or 'all': every known task (built-in and --tasks-file) it can draw")
    synthetic.add_argument("--framing", choices=("tight", "loose"), default="tight",
                           help="tight: aligned-crop-like faces (the demo's); loose: freer position, size and "
                                "rotation, for learning landmarks")
    merge = sources.add_parser("merge", help="write manifest and indices once every array part is done")
    merge.add_argument("out", type=Path)
    return parser


def list_source(args: argparse.Namespace) -> SourceListing:
    """Run the reader that ``args.source`` names."""
    name = args.name or args.source
    if args.source == "utkface":
        from pipeline.sources.utkface import list_utkface

        return list_utkface(args.input, args.split_csv, args.seed, args.val_fraction, args.test_fraction, name)
    if args.source == "celeba":
        from pipeline.sources.celeba import list_celeba

        return list_celeba(args.input, args.seed, args.val_fraction, args.test_fraction, args.attr_file, name)
    if args.source == "fer2013":
        from pipeline.sources.fer2013 import list_fer2013

        return list_fer2013(args.input, args.seed, args.val_fraction, name)
    if args.source == "chalearn":
        from pipeline.sources.chalearn import list_chalearn

        return list_chalearn(args.input, name)
    if args.source == "table":
        from pipeline.sources.table import list_table, parse_column_map

        return list_table(
            args.input, args.image_root, parse_column_map(args.map), args.image_column, args.split_column,
            args.seed, args.val_fraction, args.test_fraction, name,
        )
    from pipeline.sources.synthetic import list_synthetic

    tasks = tuple(known_tasks()) if args.tasks == "all" else parse_task_list(args.tasks)
    return list_synthetic(
        args.num_samples, tasks, args.seed, args.val_fraction, args.test_fraction, size=args.size, dataset=name,
        framing=args.framing,
    )


def align_settings(args: argparse.Namespace) -> AlignSettings | None:
    """``--align`` with its policy, checked up front (the extra installed, the options meaningful), or None."""
    if not args.align:
        if args.faces is not None or args.min_face is not None:
            raise ValueError("--faces and --min-face choose among detected faces: they need --align")
        return None
    check_align_extra()
    settings = AlignSettings(args.faces or "largest", DEFAULT_MIN_FACE if args.min_face is None else args.min_face)
    print(f"aligning: {settings.policy} face(s) of at least {settings.min_face} px per photo (MTCNN, one thread per "
          f"worker)", file=sys.stderr)
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.source == "merge":
            started = time.perf_counter()
            summary = merge_shards(args.out)
            print_summary(summary, args.out, time.perf_counter() - started, 0, args.out / REJECTED_FILE)
            return 0
        if args.tasks_file:
            declare_tasks(load_tasks_file(args.tasks_file), str(args.tasks_file))
        align = align_settings(args)
        print(f"listing {args.source} {getattr(args, 'input', '') or ''}".rstrip(), file=sys.stderr)
        listing = list_source(args)  # a reader may declare its own tasks (CelebA's attributes)
        job = ShardJob(
            out_dir=args.out or Path("shards") / (args.name or args.source),
            encode=EncodeSettings(args.size, args.jpeg_quality, align),
            samples_per_shard=args.samples_per_shard,
            workers=args.workers,
            task_index=args.task_index,
            num_tasks=args.num_tasks,
            limit=args.limit,
            seed=args.seed,
            overwrite=args.overwrite,
            tasks=tuple(known_tasks().values()),
        )
        run(listing, job)
    except (SourceInputError, ShardingError, AlignExtraMissing, ValueError, KeyError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)  # an OSError names its file: a folder denied, a full disk
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
