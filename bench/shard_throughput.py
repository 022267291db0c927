"""Images/s of ``pipeline.shard`` against the physical floor of the work, measured in the same run.

The floor is a plain loop in one process that only decodes, resizes and re-encodes the same JPEG files
with Pillow (same size, filter and quality). ``pipeline.shard`` decodes a colour or grey JPEG through simplejpeg
instead (Pillow's pixels, ~35 % less time), so a second plain loop with the writer's own decoder is printed too:
the writer against it is the cost of everything but the image work. ``pipeline.shard`` additionally lists the
source, writes tars and manifest parts atomically (fsync), hashes every image, sums its grey statistics and
merges the manifest. Each is warmed on 100 images before it is timed, so that neither pays a process's one-time
costs (the page cache; pyarrow importing pandas for its first table, ~0.3 s, which only the first run would
pay). Wall time says what a user waits on an idle machine; CPU time (this process and its worker processes) says
what each image costs, and stays meaningful on a busy one.

libjpeg-turbo (AVX2) writes each row past the cache when the row buffer happens to be 32-byte aligned, so a
whole run can decode at one of two speeds (~10 % apart) by heap luck. So the loops and the writer alternate over
``--rounds`` and each ratio is of their total CPU over all rounds; the range of single rounds' ratios is printed
beside it.

The scaling from 1 to 2 worker processes is printed for the whole command and for its encoding phase alone: the
listing, planning and merging around that phase run in the main process only, and their seconds (printed too)
bound the whole command's scaling however well the workers scale (Amdahl).

    python bench/shard_throughput.py [--images 2000] [--size 128] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import pipeline.shard
from pipeline.shard import main as shard_main
from pipeline.shard_writer import encode_jpeg, fit_image
from pipeline.sources.base import decode_image_bytes
from pipeline.sources.synthetic import draw_face_attributes, render_face


def make_inputs(folder: Path, count: int, side: int = 250) -> list[Path]:
    """UTKFace-named 250x250 JPEG faces (the size of common aligned crops)."""
    folder.mkdir(parents=True)
    paths = []
    for index in range(count):
        rng = np.random.default_rng(index)
        face = draw_face_attributes(rng)
        image = render_face(face, rng, side)
        path = folder / f"{int(face.age)}_{1 - face.gender}_{face.race}_2017{index:013d}.jpg.chip.jpg"
        image.save(path, format="JPEG", quality=95)
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    """CPU time of this process and of its finished worker processes."""
    return sum(usage.ru_utime + usage.ru_stime
               for usage in (resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)))


def timed(run, *args) -> tuple[float, float]:
    """(wall, CPU) seconds of ``run(*args)``."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    run(*args)
    return time.perf_counter() - wall, cpu_seconds() - cpu


def pillow_decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def floor_loop(paths: list[Path], size: int, quality: int, decode=pillow_decode) -> None:
    """Decode + resize + encode of every file, one process, nothing else."""
    for path in paths:
        encode_jpeg(fit_image(decode(path.read_bytes()), size), quality)


def shard_run(input_dir: Path, out_dir: Path, size: int, quality: int, workers: int, *options: str) -> None:
    code = shard_main(["utkface", str(input_dir), "--out", str(out_dir), "--size", str(size), "--jpeg-quality",
                       str(quality), "--workers", str(workers), "--samples-per-shard", "250", *options])
    assert code == 0


class EncodePhaseClock:
    """Wall seconds spent in ``pipeline.shard.encode_shards`` (the worker processes' phase), summed over calls, so
    that the scaling of the workers can be told apart from the serial listing, planning and merging around them."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._encode_shards = pipeline.shard.encode_shards

    def __enter__(self) -> EncodePhaseClock:
        def timed_encode(*args, **kwargs):
            started = time.perf_counter()
            try:
                return self._encode_shards(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        pipeline.shard.encode_shards = timed_encode
        return self

    def __exit__(self, *exc) -> None:
        pipeline.shard.encode_shards = self._encode_shards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--rounds", type=int, default=5, help="floor and writer runs, alternated")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="facemtl-bench-"))
    try:
        paths = make_inputs(work / "UTKFace", args.images)
        floor_loop(paths[:100], args.size, args.quality)  # warm the page cache and Pillow
        shard_run(work / "UTKFace", work / "warm", args.size, args.quality, 1, "--limit", "100")
        floor_name, decoder_name = "Pillow loop (floor), 1 process", "loop, writer's decoder, 1 process"
        processes = {floor_name: 1, decoder_name: 1, "pipeline.shard --workers 1": 1, "pipeline.shard --workers 2": 2}
        seconds: dict[str, list[tuple[float, float]]] = {name: [] for name in processes}  # (wall, CPU) per round
        encode_clocks = {workers: EncodePhaseClock() for workers in (1, 2)}
        for _ in range(args.rounds):
            seconds[floor_name].append(timed(floor_loop, paths, args.size, args.quality))
            seconds[decoder_name].append(timed(floor_loop, paths, args.size, args.quality, decode_image_bytes))
            for workers in (1, 2):
                out_dir = work / f"out{workers}"
                with encode_clocks[workers]:
                    seconds[f"pipeline.shard --workers {workers}"].append(
                        timed(shard_run, work / "UTKFace", out_dir, args.size, args.quality, workers))
                shutil.rmtree(out_dir)
        wall = {name: sum(w for w, _ in runs) for name, runs in seconds.items()}
        cpu = {name: sum(c for _, c in runs) for name, runs in seconds.items()}
        images = args.images * args.rounds
        floor = images / wall[floor_name]
        print(f"\n{args.images} images 250x250 -> {args.size}x{args.size} JPEG q{args.quality}, {args.rounds} rounds")
        print(f"{'run':<34}{'images/s':>10}{'vs floor x workers':>20}{'floor CPU / CPU':>17}{'CPU us/image':>14}")
        for name, workers in processes.items():
            rate = images / wall[name]
            print(f"{name:<34}{rate:>10.0f}{rate / (floor * workers):>20.2f}{cpu[floor_name] / cpu[name]:>17.2f}"
                  f"{cpu[name] / images * 1e6:>14.0f}")
        writer_name = "pipeline.shard --workers 1"
        print(f"scaling 1 -> 2 workers: {wall[writer_name] / wall['pipeline.shard --workers 2']:.2f}x")
        serial = [(wall[f"pipeline.shard --workers {w}"] - encode_clocks[w].seconds) / args.rounds for w in (1, 2)]
        print(f"  the encoding phase alone (worker processes): "
              f"{encode_clocks[1].seconds / encode_clocks[2].seconds:.2f}x; around it, in the main process only "
              f"(listing, planning, merging): {serial[0]:.2f} s a run with 1 worker, {serial[1]:.2f} s with 2")
        for name, label in ((decoder_name, "the same decoder in a plain loop"), (floor_name, "Pillow floor")):
            round_ratios = [loop_cpu / writer_cpu for (_, loop_cpu), (_, writer_cpu)
                            in zip(seconds[name], seconds[writer_name])]
            print(f"shard writer / {label}, images per CPU-second: {cpu[name] / cpu[writer_name]:.2f} "
                  f"(single rounds {min(round_ratios):.2f}-{max(round_ratios):.2f})")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
