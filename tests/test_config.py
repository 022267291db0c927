"""Configs: YAML + key=value overrides into dataclasses; unknown keys and bad values are named."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config, load_config_dict, save_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def test_demo_config_loads_and_overrides_reach_nested_keys() -> None:
    config = load_config(REPO / "configs" / "demo.yaml",
                         ["optim.lr=0.01", "freeze.patience=5", "data.tasks=age,gender"])
    assert config.optim.lr == 0.01 and config.freeze.patience == 5
    assert config.data.tasks == ["age", "gender"]
    assert config.data.batch_size == 48 and config.model.backbone == "resnet18"


def test_unknown_keys_are_errors_that_name_the_key() -> None:
    with pytest.raises(ConfigError, match="unknown key.*optim.learning_rate"):
        load_config(None, ["optim.learning_rate=0.1"])
    with pytest.raises(ConfigError, match="unknown key.*bogus"):
        load_config(None, ["bogus=1"])


def test_bad_values_are_errors_that_name_the_key() -> None:
    with pytest.raises(ConfigError, match="optim.lr must be > 0"):
        load_config(None, ["optim.lr=-1"])
    with pytest.raises(ConfigError, match="max_epochs: expected int"):
        load_config(None, ["max_epochs=many"])
    with pytest.raises(ConfigError, match="freeze.mode 'sometimes' unknown"):
        load_config(None, ["freeze.mode=sometimes"])
    with pytest.raises(ConfigError, match="is not key=value"):
        load_config(None, ["max_epochs"])


def test_a_gradient_level_weighting_under_fp16_is_refused_before_training() -> None:
    with pytest.raises(ConfigError, match="pcgrad combines per-task gradients and does not support precision=fp16"):
        load_config(None, ["loss.weighting=pcgrad", "precision=fp16"])
    assert load_config(None, ["loss.weighting=pcgrad", "precision=bf16"]).precision == "bf16"
    assert load_config(None, ["loss.weighting=famo", "precision=fp16"]).precision == "fp16"  # loss-level: fine


def test_saved_config_reloads_to_the_same_values(tmp_path: Path) -> None:
    config = load_config(REPO / "configs" / "demo.yaml", ["data.augment.crop_scale=[0.5, 0.9]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config
    assert load_config_dict(to_dict(config)) == config


def test_a_config_saved_before_a_key_existed_resumes_when_the_key_keeps_its_default() -> None:
    from pipeline.config import config_differences

    saved = to_dict(load_config_dict({}))
    del saved["freeze"]["counter"]  # written by a version without freeze.counter
    assert config_differences(saved, to_dict(load_config_dict({}))) == []
    assert config_differences(saved, to_dict(load_config_dict({"freeze": {"counter": "cumulative"}}))) == \
        ["freeze.counter"]


def test_every_path_a_ray_worker_reads_is_made_absolute_against_the_launching_folder() -> None:
    from pipeline.config import with_absolute_paths

    config = load_config(None, ["data.datasets=[shards/a,/abs/b]", "data.tasks_file=configs/tasks/celeba40.yaml",
                                "model.weights_path=weights/w.pth", "model.init_from=runs/old", "runs_dir=runs"])
    moved = with_absolute_paths(config, Path("/launch"))
    assert moved.data.datasets == ["/launch/shards/a", "/abs/b"]
    assert moved.data.tasks_file == "/launch/configs/tasks/celeba40.yaml"
    assert (moved.model.weights_path, moved.model.init_from, moved.runs_dir) == (
        "/launch/weights/w.pth", "/launch/runs/old", "/launch/runs")
    assert with_absolute_paths(load_config(None, [])).data.tasks_file is None


def test_a_trunk_quorum_below_1_or_above_the_listed_tasks_is_refused_naming_both_numbers() -> None:
    with pytest.raises(ConfigError, match="freeze.trunk_quorum must be >= 1, got 0"):
        load_config(None, ["freeze.trunk_quorum=0"])
    with pytest.raises(ConfigError, match="freeze.trunk_quorum 3 is more than the 2 tasks in data.tasks"):
        load_config(None, ["data.tasks=age,gender", "freeze.trunk_quorum=3"])
    assert load_config(None, ["data.tasks=age,gender", "freeze.trunk_quorum=2"]).freeze.trunk_quorum == 2
    assert load_config(None, []).freeze.trunk_quorum == 1  # Algorithm 1
