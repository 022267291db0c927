"""CelebA's 40 attributes and 5 landmarks on the real attribute file, with a landmark file in the real format."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.data import declare_shard_tasks, open_shard_set, shard_task_declarations
from pipeline.schema import get_task, load_tasks_file
from pipeline.sources.celeba import CELEBA_ATTRIBUTES, read_celeba_table
from tests.conftest import SHARED_DATA, requires_shared_data, write_face_jpeg
from tests.shard_helpers import REPO, read_rejected, read_samples, shard

ATTRIBUTE_FILE = SHARED_DATA / "celeba-labels" / "list_attr_celeba_first20000.txt"
LANDMARK_HEADER = ("lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y "
                   "leftmouth_x leftmouth_y rightmouth_x rightmouth_y")
IMAGES = 12


def landmark_row(index: int) -> list[int]:
    """000001.jpg's real row, then rows moved a pixel per image (pixels of the 178x218 aligned image)."""
    return [value + (index - 1) * (1 if position % 2 else -1) for position, value in
            enumerate((69, 109, 106, 113, 77, 142, 73, 152, 108, 154))]


@requires_shared_data("celeba-labels/list_attr_celeba_first20000.txt")
def test_real_celeba_attribute_file_gives_40_named_attributes_the_built_in_three_and_landmarks(tmp_path: Path) -> None:
    columns, rows = read_celeba_table(ATTRIBUTE_FILE)
    assert tuple(columns) == CELEBA_ATTRIBUTES
    root = tmp_path / "celeba"
    for index in range(1, IMAGES + 1):
        write_face_jpeg(root / "img_align_celeba" / f"{index:06d}.jpg", index, size=(178, 218))
    landmark_lines = [f"{index:06d}.jpg " + " ".join(map(str, landmark_row(index))) for index in range(1, IMAGES + 1)]
    landmark_file = f"202599\n{LANDMARK_HEADER}\n" + "\n".join(landmark_lines) + "\n"  # CelebA's count line
    (root / "list_landmarks_align_celeba.txt").write_text(landmark_file)
    out = tmp_path / "out"
    assert shard("celeba", root, "--attr-file", ATTRIBUTE_FILE, "--out", out, "--size", "64") == 0
    samples = read_samples(out)
    assert len(samples) == IMAGES and len(read_rejected(out)) == 20000 - IMAGES
    for key, sample in samples.items():
        codes, labels = rows[f"{key}.jpg"], sample["json"]["labels"]
        assert {name: labels[name] for name in columns} == {name: int(code == "1")
                                                            for name, code in zip(columns, codes)}
        assert [labels["gender"], labels["smile"], labels["young"]] == [labels[n] for n in ("Male", "Smiling", "Young")]
        # 178x218 -> 52x64 (round(178 / 218 * 64)), 6 px of padding on the left
        pixels = landmark_row(int(key))
        expected = [(6 + (x + 0.5) * 52 / 178) / 64 if axis == 0 else (x + 0.5) / 218 for axis, x in
                    ((position % 2, value) for position, value in enumerate(pixels))]
        assert labels["landmarks"] == pytest.approx(expected, abs=1e-12)
    first = samples["000001"]["json"]["labels"]  # the real row: -1 1 1 -1 ... (Arched_Eyebrows, Attractive: 1)
    assert [first[n] for n in ("Arched_Eyebrows", "Attractive", "Male", "Smiling", "Young")] == [1, 1, 0, 1, 1]

    # what training reads back from the folder matches configs/tasks/celeba40.yaml, so synthetic proof and
    # real CelebA shards declare the same tasks
    shard_set = open_shard_set(out)
    declared = {spec.name: spec for spec in shard_task_declarations(shard_set)}
    for spec in load_tasks_file(REPO / "configs" / "tasks" / "celeba40.yaml"):
        assert declared[spec.name] == spec
    assert declared["landmarks"] == get_task("landmarks")
    assert shard_set.labelled_fraction("landmarks") == shard_set.labelled_fraction("Eyeglasses") == 1.0
    declare_shard_tasks([shard_set])
    assert get_task("Wearing_Necktie").classes == ("no", "yes")
