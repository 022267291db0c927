"""The demo learns: on the synthetic shards, configs/demo.yaml beats the chance level of every task clearly."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.demo import DEMO_CONFIG, shard_demo_datasets
from pipeline.run_summary import read_run_summary
from pipeline.train import main as train_main

pytestmark = pytest.mark.slow
CLASSIFICATION_MARGIN = 0.08  # accuracy above the majority class
AGE_MARGIN_YEARS = 3.0  # MAE below always predicting the mean training age


def test_demo_config_beats_chance_on_every_task(tmp_path: Path) -> None:
    shard_dirs = shard_demo_datasets(tmp_path / "shards", image_size=64, workers=2)
    datasets = "[" + ",".join(str(p) for p in shard_dirs) + "]"
    assert train_main(["--local", "--config", str(DEMO_CONFIG), f"data.datasets={datasets}",
                       f"runs_dir={tmp_path}"]) == 0
    summary = read_run_summary(tmp_path / "demo")  # written by pipeline.train at the end
    assert set(summary["tasks"]) == {"age", "gender", "race", "smile", "young", "emotion"} \
        and summary["at_chance"] == []
    for task, row in summary["tasks"].items():
        if row["metric"] == "mae":
            assert row["value"] <= row["chance"] - AGE_MARGIN_YEARS, (task, row)
        else:
            assert row["value"] >= row["chance"] + CLASSIFICATION_MARGIN, (task, row)
