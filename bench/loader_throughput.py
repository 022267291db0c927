"""Samples/s of the training stream against torchvision ImageFolder and a decode-only floor, same images.

For each image size, three readers of the same synthetic JPEGs (2 dataloader workers each):
  * ours: ``TaskBalancedStream`` over the shards (tar read, decode, labels, batching in the workers)
    and ``augment_batch`` on each batch in the consuming process, as training does;
  * ImageFolder: the images extracted to ``class/`` folders, ``ImageFolder`` + ``DataLoader`` with the
    equivalent torchvision transforms (RandomResizedCrop, flip, ColorJitter, PILToTensor);
  * floor: a loop in one process that only decodes JPEG bytes already in memory, with the stream's decoder, each
    into one place allocated as the stream allocates its batches (``empty_image_batch``: no labels, no batching),
    scaled by the number of workers. Not into a fresh array each: libjpeg-turbo stores rows that start 32-byte
    aligned past the cache, 12-16 % slower, so such a floor took one of two speeds by where malloc put the arrays.
Per worker, the stream in one process (one thread) is then compared with the floor by the CPU time each
takes per sample, in alternating rounds, the best round of each kept: CPU time, unlike wall time, does not
count the slices other processes of a busy machine take. The last line is the lower ratio over the sizes.

    python bench/loader_throughput.py [--samples 3000] [--sizes 64 128] [--batches 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import simplejpeg
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from pipeline.config import AugmentConfig
from pipeline.data import TaskBalancedStream, augment_batch, empty_image_batch, open_shard_set, train_loader
from pipeline.shard import main as shard_main
from pipeline.tar_format import tar_end, tar_members

WORKERS = 2
TASKS = ["age", "gender", "race"]
FLOOR_IMAGES = 2000


def endless(loader):
    while True:
        yield from loader


def timed_batches(batches, count: int, batch_size: int) -> float:
    """Samples/s over ``count`` batches after 5 warm-up batches (worker start-up not counted)."""
    for _ in range(5):
        next(batches)
    started = time.perf_counter()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.perf_counter() - started)


def cpu_rate(batches, count: int, batch_size: int) -> float:
    """Samples per CPU second of this process over ``count`` batches."""
    started = time.process_time()
    for _ in range(count):
        next(batches)
    return count * batch_size / (time.process_time() - started)


def decode_only(jpegs: list[bytes], place: np.ndarray) -> None:
    """Decode each JPEG into ``place`` (HWC), as the stream decodes into its batch."""
    for jpeg in jpegs:
        simplejpeg.decode_jpeg(jpeg, "RGB", buffer=place)


def decode_cpu_rate(jpegs: list[bytes], place: np.ndarray) -> float:
    """JPEGs decoded into ``place`` per CPU second of this process."""
    started = time.process_time()
    decode_only(jpegs, place)
    return len(jpegs) / (time.process_time() - started)


def write_images(samples: int, size: int, work: Path) -> tuple[Path, Path, list[bytes]]:
    """Synthetic shards, and the same train JPEGs as an ImageFolder (classed by gender) and in memory."""
    shards = work / "shards"
    assert shard_main(["synthetic", "--tasks", ",".join(TASKS), "--num-samples", str(samples),
                       "--size", str(size), "--out", str(shards), "--workers", "2"]) == 0
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
    return shards, folder, jpegs


def measure_size(args: argparse.Namespace, size: int, work: Path) -> float:
    """Print one size's table; return the stream's share of the decode-only floor per worker."""
    shards, folder, jpegs = write_images(args.samples, size, work)
    shard_set = open_shard_set(shards)

    def stream(seed: int) -> TaskBalancedStream:
        return TaskBalancedStream([shard_set], {shard_set.name: args.batch}, TASKS, size, shuffle_buffer=500, seed=seed)

    generator = torch.Generator().manual_seed(0)
    augmented = (augment_batch(batch["images"], AugmentConfig(), generator)
                 for batch in train_loader(stream(0), WORKERS))
    ours = timed_batches(augmented, args.batches, args.batch)
    del augmented  # its workers stop: they would compete with what follows

    transform = v2.Compose([
        v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomHorizontalFlip(), v2.ColorJitter(0.2, 0.2, 0.2),
    ])
    baseline_loader = DataLoader(datasets.ImageFolder(str(folder), transform=transform), batch_size=args.batch,
                                 shuffle=True, num_workers=WORKERS, prefetch_factor=4)
    baseline_batches = endless(baseline_loader)
    baseline = timed_batches(baseline_batches, args.batches, args.batch)
    del baseline_batches, baseline_loader

    in_memory, place = jpegs[:FLOOR_IMAGES], empty_image_batch(1, size)[0]
    in_process = iter(stream(1))
    for _ in range(5):
        next(in_process)
    stream_rounds, floor_rounds = [], []
    for _ in range(args.rounds):
        stream_rounds.append(cpu_rate(in_process, args.batches, args.batch))
        floor_rounds.append(decode_cpu_rate(in_memory, place))
    one_process, floor = max(stream_rounds), max(floor_rounds)
    started = time.perf_counter()
    decode_only(in_memory, place)
    floor_wall = len(in_memory) / (time.perf_counter() - started)
    started = time.perf_counter()
    for jpeg in jpegs[:FLOOR_IMAGES]:
        Image.open(io.BytesIO(jpeg)).convert("RGB")
    pil_floor = min(len(jpegs), FLOOR_IMAGES) / (time.perf_counter() - started)

    print(f"\n{args.samples} synthetic faces {size}x{size}, batch {args.batch}, {WORKERS} loader workers")
    print(f"{'reader':<44}{'samples/s':>10}{'ours / it':>11}")
    for name, rate in (("ours: stream + batch augment", ours),
                       ("torchvision ImageFolder + DataLoader", baseline),
                       ("floor: decode only (simplejpeg), x workers", WORKERS * floor_wall),
                       ("floor: decode only (Pillow), x workers", WORKERS * pil_floor)):
        print(f"{name:<44}{rate:>10.0f}{ours / rate:>11.2f}")
    share = one_process / floor
    print(f"one process, no workers, best of {args.rounds} rounds, per CPU second: stream (tar + decode + labels + "
          f"batching) {one_process:.0f} samples ({1e6 / one_process:.1f} us each), decode-only {floor:.0f} "
          f"({1e6 / floor:.1f} us): {share:.2f}")
    return share


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of stream and floor, per worker")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    shares = {}
    for size in args.sizes:
        work = Path(tempfile.mkdtemp(prefix="facemtl-loader-"))
        try:
            shares[size] = measure_size(args, size, work)
        finally:
            shutil.rmtree(work)
    print(f"\nper worker, stream / decode-only: {', '.join(f'{size} px {share:.2f}' for size, share in shares.items())}"
          f" ({time.perf_counter() - started:.0f} s)")
    print(f"stream / decode-only floor: {min(shares.values()):.2f}")


if __name__ == "__main__":
    main()
