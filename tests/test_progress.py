"""Progress lines: about one per tenth of the way, with rate and time left; rank 0 only, long epochs only."""

from __future__ import annotations

import io

from pipeline.loop import WorkerContext
from pipeline.progress import PROGRESS_MIN_STEPS, epoch_progress
from pipeline.progress import PlainProgress, format_seconds, start_progress


def test_a_log_file_gets_a_line_per_tenth_with_rate_and_time_left() -> None:
    stream = io.StringIO()
    progress = start_progress(200, "epoch 3 train", "img", stream=stream)
    assert isinstance(progress, PlainProgress)  # not a terminal: plain lines, no bar
    for _ in range(25):
        progress.update(8)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 9 and lines[-1].startswith("epoch 3 train: 200/200 img (100 %, ")
    assert lines[0].startswith("epoch 3 train: 24/200 img (12 %, ") and lines[-1].endswith(" img/s, 0:00 left)")


def test_time_left_reads_as_minutes_or_hours() -> None:
    assert format_seconds(75) == "1:15" and format_seconds(3725) == "1:02:05"


def test_only_rank_0_of_a_long_epoch_reports_progress() -> None:
    assert epoch_progress(WorkerContext(rank=1, world_size=2), 1000, 64, "x") is None
    assert epoch_progress(WorkerContext(), PROGRESS_MIN_STEPS - 1, 64, "x") is None
    assert epoch_progress(WorkerContext(), PROGRESS_MIN_STEPS, 64, "x") is not None
