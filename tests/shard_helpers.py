"""Reading back what ``pipeline.shard`` wrote, the way a consumer would."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import webdataset as wds

from pipeline.shard import main as shard_main

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
