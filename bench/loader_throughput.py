"""Samples/s of the training stream against torchvision ImageFolder and a decode-only floor, same images.

Three readers of the same synthetic JPEGs (all measured in this run, 2 dataloader workers each):
  * ours: ``TaskBalancedStream`` over the shards (tar read + decode + labels + batching in the workers)
    and ``augment_batch`` on each batch in the consuming process, as training does;
  * ImageFolder: the images extracted to ``class/`` folders, ``ImageFolder`` + ``DataLoader`` with the
    equivalent torchvision transforms (RandomResizedCrop, flip, ColorJitter, PILToTensor);
  * floor: a loop in one process per worker that only decodes the JPEG bytes (no augmentation, no
    batching), scaled by the number of workers.

    python bench/loader_throughput.py [--samples 3000] [--size 64] [--batches 60]
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from pipeline.config import AugmentConfig
from pipeline.data import TaskBalancedStream, augment_batch, decode_image, open_shard_set, train_loader
from pipeline.shard import main as shard_main
from pipeline.tar_format import tar_end, tar_members

WORKERS = 2


def endless(loader):
    while True:
        yield from loader


def timed_batches(loader, batches: int, batch_size: int) -> float:
    """Samples/s over ``batches`` batches after 5 warm-up batches (worker start-up not counted)."""
    iterator = iter(loader)
    for _ in range(5):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="facemtl-loader-"))
    try:
        shards = work / "shards"
        assert shard_main(["synthetic", "--tasks", "age,gender,race", "--num-samples", str(args.samples),
                           "--size", str(args.size), "--out", str(shards), "--workers", "2"]) == 0
        columns = ["key", "split", "gender", "shard", "offset", "size"]
        manifest = pq.read_table(shards / "manifest.parquet", columns=columns).to_pylist()
        folder = work / "imagefolder"
        jpegs = []
        for row in manifest:
            if row["split"] != "train":
                continue
            with open(shards / row["shard"], "rb") as tar:  # the manifest locates the sample; the tar holds it
                tar.seek(row["offset"])
                sample = dict(tar_members(tar.read(row["size"]) + tar_end(), row["shard"]))
            jpeg = sample[f"{row['key']}.jpg"]
            target = folder / str(row["gender"]) / f"{row['key']}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(jpeg)
            jpegs.append(jpeg)

        shard_set = open_shard_set(shards)
        stream = TaskBalancedStream([shard_set], {shard_set.name: args.batch}, ["age", "gender", "race"], args.size,
                                    shuffle_buffer=500, seed=0)
        generator = torch.Generator().manual_seed(0)
        augmented = (augment_batch(batch["images"], AugmentConfig(), generator) for batch in train_loader(stream, WORKERS))
        ours = timed_batches(augmented, args.batches, args.batch)

        transform = v2.Compose([
            v2.PILToTensor(), v2.RandomResizedCrop(args.size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            v2.RandomHorizontalFlip(), v2.ColorJitter(0.2, 0.2, 0.2),
        ])
        image_folder = datasets.ImageFolder(str(folder), transform=transform)
        baseline_loader = DataLoader(image_folder, batch_size=args.batch, shuffle=True, num_workers=WORKERS,
                                     prefetch_factor=4, persistent_workers=True)
        baseline = timed_batches(endless(baseline_loader), args.batches, args.batch)

        in_process = iter(TaskBalancedStream([shard_set], {shard_set.name: args.batch}, ["age", "gender", "race"],
                                             args.size, shuffle_buffer=500, seed=1))
        one_process = timed_batches(in_process, args.batches, args.batch)

        count = min(len(jpegs), 2000)
        started = time.perf_counter()
        for jpeg in jpegs[:count]:
            decode_image(jpeg, args.size)
        floor = WORKERS * count / (time.perf_counter() - started)
        started = time.perf_counter()
        for jpeg in jpegs[:count]:
            Image.open(io.BytesIO(jpeg)).convert("RGB")
        pil_floor = WORKERS * count / (time.perf_counter() - started)

        print(f"\n{args.samples} synthetic faces {args.size}x{args.size}, batch {args.batch}, {WORKERS} loader workers")
        print(f"{'reader':<44}{'samples/s':>10}{'ours / it':>11}")
        for name, rate in (("ours: stream + batch augment", ours),
                           ("torchvision ImageFolder + DataLoader", baseline),
                           ("floor: decode only (torchvision), x workers", floor),
                           ("floor: decode only (Pillow), x workers", pil_floor)):
            print(f"{name:<44}{rate:>10.0f}{ours / rate:>11.2f}")
        print(f"\none process, no workers: stream (tar + decode + labels + batching) {one_process:.0f} samples/s, "
              f"{one_process / (floor / WORKERS):.2f} of decode-only")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
