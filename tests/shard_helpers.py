"""Reading back what ``pipeline.shard`` wrote, the way a consumer would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds

from pipeline.shard import main as shard_main
from pipeline.tar_format import tar_end, tar_members

REPO = Path(__file__).resolve().parents[1]


def shard(*argv: str | Path) -> int:
    """Run ``python -m pipeline.shard`` in this process (fast) and return its exit code."""
    return shard_main([str(a) for a in argv])


def shard_cli(*argv: str | Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.shard", *map(str, argv)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )


def read_samples(out_dir: Path) -> dict[str, dict]:
    """Every sample of every tar, read with the webdataset library: key -> {"jpg": bytes, "json": dict, "url": tar}."""
    samples: dict[str, dict] = {}
    for tar_path in sorted(out_dir.glob("*.tar")):
        for sample in wds.WebDataset(str(tar_path), shardshuffle=False):
            assert sample["__key__"] not in samples, f"duplicate key {sample['__key__']}"
            samples[sample["__key__"]] = {
                "jpg": sample["jpg"],
                "json": json.loads(sample["json"]),
                "url": tar_path.name,
                "members": sorted(k for k in sample if not k.startswith("__")),
            }
    return samples


def read_manifest(out_dir: Path) -> list[dict]:
    return pq.read_table(out_dir / "manifest.parquet").to_pylist()


def read_rejected(out_dir: Path) -> list[dict]:
    return pq.read_table(out_dir / "rejected.parquet").to_pylist()


def tar_bytes(out_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(out_dir.glob("*.tar"))}


def sample_members(tar_path: Path, offset: int, size: int) -> list[tuple[str, bytes]]:
    """The members found by seeking to a manifest row's ``offset`` and reading its ``size`` bytes."""
    with tar_path.open("rb") as handle:
        handle.seek(offset)
        sample = handle.read(size)
    return list(tar_members(sample + tar_end(), f"{tar_path}@{offset}"))


def rewrite_in_older_format(out_dir: Path, names: list[str] | None = None) -> None:
    """Make a shard folder look as the first pipeline.shard wrote it: every JPEG again in an ``image`` column of
    the manifest parts and manifest (no offset, size), part statuses without format or image statistics.
    ``names``: only these shards' parts (a folder that mixes formats); the manifest is left alone then."""
    parts = out_dir / "_parts"
    for status_path in sorted(parts.glob("*-*.json")):
        if names is not None and status_path.stem not in names:
            continue
        status = json.loads(status_path.read_text())
        status.pop("manifest_format"), status.pop("image_stats")
        status_path.write_text(json.dumps(status, indent=1))
        part_path = parts / f"{status_path.stem}.parquet"
        part = pq.read_table(part_path)
        images = [dict(sample_members(out_dir / shard, offset, size))[f"{key}.jpg"] for key, shard, offset, size in
                  zip(*(part.column(c).to_pylist() for c in ("key", "shard", "offset", "size")))]
        columns = [c for c in part.column_names if c not in ("offset", "size", "sha256")]
        older = part.select(columns).append_column("image", pa.array(images, pa.binary()))
        pq.write_table(older.append_column(part.field("sha256"), part.column("sha256")), part_path)
    if names is None:
        plan = json.loads((parts / "plan.json").read_text())
        manifest = pa.concat_tables(pq.read_table(parts / f"{entry['name']}.parquet") for entry in plan["shards"])
        pq.write_table(manifest, out_dir / "manifest.parquet")
        summary = json.loads((out_dir / "summary.json").read_text())
        for key in ("image_stats", "manifest_format", "tar_bytes", "manifest_bytes"):
            summary.pop(key)
        (out_dir / "summary.json").write_text(json.dumps(summary))
