"""Bytes of ``manifest.parquet`` against the tars beside it, and the peak memory of ``pipeline.shard merge``.

The merge runs in a fresh child process per folder (it rewrites manifest, indices and summary with the
same content); its peak resident memory is read from that child, next to a child that only imports
what the merge imports, so the difference is the merge's own.

    python bench/manifest_size.py shards/utkface-64 shards/fer2013-64   # existing shard folders
    python bench/manifest_size.py                                       # the demo's datasets, sharded here
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The child prints its own peak RSS in KiB: VmHWM, which starts afresh at exec (ru_maxrss would carry the
# parent's peak over). With "-" it stops after the imports and a first pyarrow table (which imports pandas).
CHILD = """
import sys
from pathlib import Path
import pyarrow as pa
from pipeline.shard import merge_shards
from pipeline.shard_writer import manifest_schema
pa.Table.from_pylist([], schema=manifest_schema())
if sys.argv[1] != "-":
    merge_shards(Path(sys.argv[1]))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


def peak_rss_mb(folder: Path | None) -> float:
    """Peak resident memory (MB) of a child that merges ``folder``, or only imports when it is None."""
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder) if folder else "-"], cwd=REPO,
                            capture_output=True, text=True, check=True)
    return int(result.stdout.split()[-1]) * 1024 / 1e6


def measure(folder: Path) -> dict[str, object]:
    """Merge the folder again (peak memory), then the sizes of what that merge wrote."""
    merge_peak_mb = peak_rss_mb(folder)
    summary = json.loads((folder / "summary.json").read_text())
    manifest_bytes = (folder / "manifest.parquet").stat().st_size
    tar_bytes = sum(path.stat().st_size for path in folder.glob("*.tar"))
    parts_bytes = sum(path.stat().st_size for path in (folder / "_parts").glob("*.parquet"))
    return {
        "folder": str(folder), "samples": summary["num_samples"], "manifest_bytes": manifest_bytes,
        "parts_bytes": parts_bytes, "tar_bytes": tar_bytes, "ratio": manifest_bytes / tar_bytes,
        "merge_peak_mb": merge_peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", type=Path, nargs="*", help="shard folders (default: shard the demo datasets)")
    args = parser.parse_args()
    work = None
    folders = args.folders
    if not folders:
        from pipeline.demo import shard_demo_datasets

        work = Path(tempfile.mkdtemp(prefix="facemtl-manifest-"))
        folders = shard_demo_datasets(work, image_size=64, workers=2)
    try:
        rows = [measure(folder) for folder in folders]
        baseline = peak_rss_mb(None)
    finally:
        if work:
            shutil.rmtree(work)
    print(f"\n{'folder':<40}{'samples':>9}{'manifest B':>13}{'_parts B':>13}{'tars B':>14}{'ratio':>8}"
          f"{'merge peak':>12}")
    for row in rows:
        print(f"{row['folder'][-40:]:<40}{row['samples']:>9,}{row['manifest_bytes']:>13,}{row['parts_bytes']:>13,}"
              f"{row['tar_bytes']:>14,}{row['ratio']:>8.2%}{row['merge_peak_mb']:>9.0f} MB")
    print(f"peak memory of a child that only imports what the merge imports: {baseline:.0f} MB")


if __name__ == "__main__":
    main()
