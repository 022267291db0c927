"""``python -m pipeline.demo`` (``make demo``): the main job on the embedded synthetic faces.

Three synthetic datasets that mimic the label coverage of real ones (a UTKFace-like set with age,
gender and race; a FER2013-like set with emotion only; a CelebA-like set with gender, smile and young)
are drawn and sharded exactly as real data would be, with ``pipeline.shard``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline.shard import main as shard_main


@dataclass(frozen=True)
class DemoDataset:
    name: str
    tasks: str
    num_samples: int
    seed: int


DEMO_DATASETS = (
    DemoDataset("synth-utkface", "age,gender,race", 3000, seed=1),
    DemoDataset("synth-fer2013", "emotion", 2000, seed=2),
    DemoDataset("synth-celeba", "gender,smile,young", 2000, seed=3),
)


def shard_demo_datasets(shard_root: Path, image_size: int, workers: int, scale: float = 1.0) -> list[Path]:
    """Draw and shard every demo dataset; an existing complete output is reused (the shard run resumes)."""
    out_dirs = []
    for dataset in DEMO_DATASETS:
        out_dir = shard_root / dataset.name
        code = shard_main(
            [
                "synthetic", "--name", dataset.name, "--tasks", dataset.tasks,
                "--num-samples", str(max(1, int(dataset.num_samples * scale))), "--seed", str(dataset.seed),
                "--size", str(image_size), "--samples-per-shard", "500", "--workers", str(workers),
                "--out", str(out_dir),
            ]
        )
        if code != 0:
            raise SystemExit(f"sharding {dataset.name} failed (exit {code})")
        out_dirs.append(out_dir)
    return out_dirs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, default=Path("shards/demo"), help="where the demo shards go")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every dataset's size (quick runs)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out_dirs = shard_demo_datasets(args.shards, args.size, args.workers, args.scale)
    print(f"\ndemo done in {time.perf_counter() - started:.0f} s; shards:")
    for out_dir in out_dirs:
        print(f"  {out_dir}  (manifest.parquet, summary.json, train/val/test .json wids indices)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
