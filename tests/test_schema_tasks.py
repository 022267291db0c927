"""Tasks declared as data: the tasks-file format, conflicts between declarations, labels they accept."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.schema import (
    LabelError,
    TaskDeclarationError,
    declare_tasks,
    get_task,
    label_slices,
    load_tasks_file,
    parse_task_declaration,
    validate_labels,
)

ISSUE_EXAMPLE = """\
tasks:
  - {name: Eyeglasses, kind: binary, classes: [no, yes]}
  - {name: head_yaw, kind: regression, range: [-90, 90], metric: mae}
  - {name: landmarks5, kind: landmarks, points: [left_eye, right_eye, nose, mouth_left, mouth_right]}
"""


def test_tasks_file_declares_binary_regression_and_landmark_tasks(tmp_path: Path) -> None:
    path = tmp_path / "tasks.yaml"
    path.write_text(ISSUE_EXAMPLE)
    glasses, yaw, points = load_tasks_file(path)
    # YAML reads a bare no/yes as booleans: they still name the classes no and yes
    assert (glasses.kind, glasses.classes, glasses.num_outputs) == ("binary", ("no", "yes"), 2)
    assert (yaw.kind, yaw.value_range, yaw.metric, yaw.num_outputs) == ("regression", (-90.0, 90.0), "mae", 1)
    assert (points.kind, points.num_outputs, points.label_width, points.metric) == ("landmarks", 10, 10, "nme")
    declare_tasks([glasses, yaw, points], str(path))
    assert get_task("head_yaw") == yaw
    labels = validate_labels({"head_yaw": -30, "landmarks5": list(range(10))})
    assert labels["landmarks5"] == [float(v) for v in range(10)] and labels["head_yaw"] == -30.0
    with pytest.raises(LabelError, match="head_yaw: 91 is outside"):
        validate_labels({"head_yaw": 91})
    with pytest.raises(LabelError, match="landmarks5: 4 coordinates, expected 10"):
        validate_labels({"landmarks5": [1, 2, 3, 4]})


def test_a_landmark_label_with_a_missing_coordinate_is_missing_as_a_whole() -> None:
    assert get_task("landmarks").validate([1.0] * 9 + [float("nan")]) is None


def test_a_task_declared_twice_differently_is_refused_with_both_declarations() -> None:
    declare_tasks([parse_task_declaration({"name": "beauty", "kind": "regression", "range": [1, 5]})], "first.yaml")
    declare_tasks([parse_task_declaration({"name": "beauty", "kind": "regression", "range": [1, 5]})], "again.yaml")
    with pytest.raises(TaskDeclarationError) as raised:
        wider = parse_task_declaration({"name": "beauty", "kind": "regression", "range": [0, 10]})
        declare_tasks([wider], "second.yaml")
    message = str(raised.value)
    assert "second.yaml" in message and "range: [0.0, 10.0]" in message and "range: [1.0, 5.0]" in message


def test_a_built_in_task_cannot_be_redeclared_differently() -> None:
    with pytest.raises(TaskDeclarationError, match="built-in tasks"):
        declare_tasks([parse_task_declaration({"name": "age", "kind": "regression", "range": [0, 100]})], "mine.yaml")


@pytest.mark.parametrize("entry, words", [
    ({"name": "x", "kind": "ternary"}, "kind 'ternary' is not one of"),
    ({"name": "x", "kind": "binary", "classes": ["a", "b", "c"]}, "needs 2 classes"),
    ({"name": "x", "kind": "landmarks"}, "needs its points"),
    ({"name": "x", "kind": "binary", "range": [0, 1]}, "range [low, high] belongs to a regression task"),
    ({"name": "x", "kind": "binary", "colour": "red"}, "unknown key(s) colour"),
    ({"name": "a/b", "kind": "binary"}, "without '/'"),
])
def test_malformed_declarations_name_the_task_and_the_problem(entry: dict, words: str) -> None:
    with pytest.raises(TaskDeclarationError) as raised:
        parse_task_declaration(entry, "tasks.yaml")
    assert "tasks.yaml" in str(raised.value) and words in str(raised.value)


def test_flipping_swaps_left_and_right_points_and_keeps_the_others() -> None:
    assert get_task("landmarks").flip_order() == [1, 0, 2, 4, 3]
    spec = parse_task_declaration({"name": "p", "kind": "landmarks", "points": ["chin", "leftEar", "rightEar", "tip"]})
    assert spec.flip_order() == [0, 2, 1, 3]
    assert parse_task_declaration({"name": "q", "kind": "landmarks",
                                   "points": ["ear_left", "chin", "ear_right"]}).flip_order() == [2, 1, 0]


def test_label_slices_give_landmarks_two_columns_per_point() -> None:
    tasks = [get_task("age"), get_task("landmarks"), get_task("gender")]
    assert label_slices(tasks) == [slice(0, 1), slice(1, 11), slice(11, 12)]


def test_two_datasets_declaring_a_task_differently_are_refused_naming_both(tmp_path: Path) -> None:
    from pipeline.data import DataConfigError, open_shard_set, resolve_tasks
    from pipeline.schema import forget_declared_tasks
    from tests.shard_helpers import shard

    folders = []
    for name, classes in (("plain", "[no, yes]"), ("worded", "[absent, present]")):
        tasks_file = tmp_path / f"{name}.yaml"
        tasks_file.write_text(f"tasks:\n  - {{name: Glasses, kind: binary, classes: {classes}}}\n")
        assert shard("synthetic", "--tasks-file", tasks_file, "--tasks", "Glasses", "--num-samples", "12",
                     "--size", "32", "--out", tmp_path / name) == 0
        forget_declared_tasks()  # each folder sharded as by its own command
        folders.append(open_shard_set(tmp_path / name))
    with pytest.raises(DataConfigError) as raised:
        resolve_tasks(folders, ["Glasses"])
    message = str(raised.value)
    assert "classes: ['absent', 'present']" in message and "classes: ['no', 'yes']" in message
    assert "plain/summary.json" in message and "worded/summary.json" in message
