"""Progress a person can watch: a tqdm bar on a terminal, a plain line about every 10 % in a log file (under
SLURM, Ray or a redirect), with the rate and the time left."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def start_progress(total: int, description: str, unit: str = "img",
                   stream: TextIO | None = None) -> tqdm | PlainProgress:
    """A progress reporter over ``total`` units: ``update(count)``, then ``close()``."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(total=total, unit=unit, desc=description, dynamic_ncols=True, file=stream)
    return PlainProgress(total, description, unit, stream)


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return (f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600
            else f"{seconds // 60}:{seconds % 60:02d}")


class PlainProgress:
    """One line at each tenth of the way, and at the end."""

    def __init__(self, total: int, description: str, unit: str, stream: TextIO) -> None:
        self.total, self.description, self.unit, self.stream = total, description, unit, stream
        self.done, self.next_report, self.started = 0, 0.1, time.perf_counter()

    def update(self, count: int = 1) -> None:
        self.done += count
        if not self.total or (self.done / self.total < self.next_report and self.done != self.total):
            return
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate
        print(f"{self.description}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f} %, "
              f"{rate:.0f} {self.unit}/s, {format_seconds(left)} left)", file=self.stream, flush=True)
        self.next_report = self.done / self.total + 0.1

    def close(self) -> None:
        pass


# Epochs shorter than this many steps show no progress lines: they end before anyone would look.
PROGRESS_MIN_STEPS = 20


def epoch_progress(context, steps: int, batch_size: int, description: str):
    """Rank 0's progress through an epoch of ``steps`` global batches (images, rate, time left), or None."""
    if context.rank != 0 or steps < PROGRESS_MIN_STEPS:
        return None
    return start_progress(steps * batch_size * context.world_size, description, "img", stream=sys.stdout)
