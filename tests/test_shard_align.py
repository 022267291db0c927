"""``pipeline.shard --align``: photos in, one aligned sample per kept face out, a rejection for a photo without one.

The photos are made here from real UTKFace crops (../shared/data) pasted rotated, scaled and shifted onto larger
random backgrounds (tests/test_align.py), listed by the ``table`` source with labels and landmark labels. The
real detector runs; those tests skip with the reason without the ``align`` extra or the data. The policy and
rejection logic is also tested with a stub detector, which needs neither.
"""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from pipeline import shard_writer
from pipeline.align import (
    LANDMARK_NAMES,
    AlignSettings,
    DetectedFace,
    MtcnnDetector,
    apply_transform,
    one_torch_thread,
)
from pipeline.shard_writer import EncodeSettings, ShardPlan, write_shard
from pipeline.sources.base import FileImage, SourceRecord
from tests.shard_helpers import read_manifest, read_rejected, shard, tar_bytes
from tests.test_align import (
    paste_face,
    random_background,
    random_placement,
    read_utkface_crops,
    requires_align_extra,
    requires_utkface,
)

SIZE = 64
LANDMARK_COLUMNS = [f"{name}_{axis}" for name in ("le", "re", "n", "ml", "mr") for axis in ("x", "y")]
LANDMARK_MAP = ",".join(f"{column}=landmarks:{index // 2}{column[-1]}" for index, column in enumerate(LANDMARK_COLUMNS))


@pytest.fixture(scope="module")
def photo_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """photos/: three photos with one pasted face each (landmark labels: the crop's own points carried through the
    paste, in pixels with pixel i centred on i), one with two faces and one blank; photos.csv lists them."""
    folder = tmp_path_factory.mktemp("photos")
    crops_and_points = []
    with one_torch_thread():
        detector = MtcnnDetector()
        for crop in read_utkface_crops(every=150, limit=8):
            faces = detector.detect(np.asarray(crop))
            if len(faces) == 1:
                crops_and_points.append((crop, faces[0].landmarks))
            if len(crops_and_points) == 5:
                break
    rng = np.random.default_rng(5)
    rows = []
    for index, (crop, points) in enumerate(crops_and_points[:3]):
        photo, crop_to_photo = paste_face(random_background(rng), crop, *random_placement(rng, crop.width))
        photo.save(folder / f"one_{index}.png")
        in_photo = apply_transform(crop_to_photo, points) - 0.5  # continuous -> pixel i centred on i
        rows.append({"image": f"one_{index}.png", "age": 20 + index, **dict(zip(LANDMARK_COLUMNS, in_photo.ravel()))})
    two, _ = paste_face(random_background(rng), crops_and_points[3][0], 6.0, 0.7, (110, 180))
    two, _ = paste_face(two, crops_and_points[4][0], -9.0, 1.1, (340, 180))
    two.save(folder / "two.png")
    random_background(rng).save(folder / "blank.png")
    rows += [{"image": "two.png", "age": 40}, {"image": "blank.png", "age": 50}]
    with (folder / "photos.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["image", "split", "age", *LANDMARK_COLUMNS])
        writer.writeheader()
        writer.writerows({"split": "train", **row} for row in rows)
    return folder


def read_samples(out_dir: Path) -> dict[str, dict]:
    """key -> {"jpg", "json"} of every sample, read by the webdataset library from the shards the train index
    lists (a shard whose photos had no face is empty, and the index leaves it out as webdataset refuses it)."""
    index = json.loads((out_dir / "train.json").read_text())
    urls = [str(out_dir / entry["url"]) for entry in index["shardlist"]]
    return {sample["__key__"]: {"jpg": sample["jpg"], "json": json.loads(sample["json"])}
            for sample in wds.WebDataset(urls, shardshuffle=False)}


def shard_photos(photos: Path, out: Path, *options: str) -> int:
    return shard("table", photos / "photos.csv", "--image-root", photos, "--map", f"age=age,{LANDMARK_MAP}",
                 "--out", out, "--size", SIZE, "--samples-per-shard", "2", "--align", *options)


@pytest.fixture(scope="module")
def all_faces(photo_table: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("aligned") / "all"
    assert shard_photos(photo_table, out, "--faces", "all") == 0
    return out


@requires_align_extra
@requires_utkface
def test_every_pasted_face_becomes_an_aligned_sample_and_a_blank_photo_a_no_face_rejection(all_faces: Path) -> None:
    samples = read_samples(all_faces)  # the webdataset library reads the shards
    assert sorted(samples) == ["one_0_f0", "one_1_f0", "one_2_f0", "two_f0", "two_f1"]
    rejected = read_rejected(all_faces)
    assert [(Path(r["source_id"].split(":")[0]).name, r["stage"], r["reason"]) for r in rejected] == [
        ("photos.csv", "face", "no face found")]
    assert rejected[0]["source_id"].endswith(":6")  # the csv row of blank.png
    for key, sample in samples.items():
        face = sample["json"]["face"]
        assert Image.open(io.BytesIO(sample["jpg"])).size == (SIZE, SIZE)
        assert set(face) == {"box", "landmarks", "landmarks_in_crop", "score", "index"} and face["score"] > 0.9
        assert face["index"] == int(key[-1])
    boxes = [samples[key]["json"]["face"]["box"] for key in ("two_f0", "two_f1")]
    assert boxes[0][2] - boxes[0][0] > boxes[1][2] - boxes[1][0]  # largest first
    assert samples["two_f0"]["json"]["labels"]["age"] == samples["two_f1"]["json"]["labels"]["age"] == 40
    assert samples["two_f0"]["json"]["labels"]["landmarks"] is None
    summary = json.loads((all_faces / "summary.json").read_text())
    align = summary["align"]
    assert (align["policy"], align["min_face"], align["photos"], align["faces"], align["photos_without_face"]) == (
        "all", 40, 5, 5, 1)
    assert align["faces_per_second_per_worker"] > 0
    assert len(read_manifest(all_faces)) == 5


@requires_align_extra
@requires_utkface
def test_a_landmark_label_is_carried_into_the_crop_where_the_detected_points_land(all_faces: Path) -> None:
    for key, sample in read_samples(all_faces).items():
        if not key.startswith("one_"):
            continue
        label = np.asarray(sample["json"]["labels"]["landmarks"]).reshape(5, 2) * SIZE
        detected = np.asarray([sample["json"]["face"]["landmarks_in_crop"][name] for name in LANDMARK_NAMES])
        # The label is the crop's own points; the alignment fits the points found in the photo, which MTCNN moves
        # by a median 2.9 px of 200 per point (docs/align.md): at 64 px about 1 px. Measured 0.5-1.2 px.
        error = np.linalg.norm(label - detected, axis=1).mean()
        assert error < 2.0, f"{key}: landmark label {error:.2f} px of {SIZE} from the detected points"


@requires_align_extra
@requires_utkface
def test_gnu_tar_reads_the_aligned_shards(all_faces: Path) -> None:
    samples = read_samples(all_faces)
    listed = []
    for tar_path in sorted(all_faces.glob("*.tar")):
        listed += subprocess.run(["tar", "-tf", tar_path], capture_output=True, text=True, check=True).stdout.split()
        for name in subprocess.run(["tar", "-tf", tar_path], capture_output=True, text=True, check=True).stdout.split():
            if name.endswith(".json"):
                extracted = subprocess.run(["tar", "-xOf", tar_path, name], capture_output=True, check=True).stdout
                assert json.loads(extracted) == samples[name[: -len(".json")]]["json"]
    assert sorted(listed) == sorted(f"{key}.{ext}" for key in samples for ext in ("jpg", "json"))


@requires_align_extra
@requires_utkface
def test_aligned_shards_are_byte_identical_for_two_workers_and_after_a_resume(
        photo_table: Path, all_faces: Path, tmp_path: Path) -> None:
    out = tmp_path / "two-workers"
    assert shard_photos(photo_table, out, "--faces", "all", "--workers", "2") == 0
    assert tar_bytes(out) == tar_bytes(all_faces)
    victim = sorted(out.glob("*.tar"))[1]
    victim.rename(victim.with_name(victim.name + ".tmp"))  # as if killed before the final rename
    assert shard_photos(photo_table, out, "--faces", "all") == 0
    assert tar_bytes(out) == tar_bytes(all_faces)


@requires_align_extra
@requires_utkface
def test_the_largest_policy_keeps_one_face_per_photo_under_the_photo_s_own_key(
        photo_table: Path, all_faces: Path, tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    for name in ("two.png", "blank.png"):
        (tmp_path / "photos" / name).write_bytes((photo_table / name).read_bytes())
    (tmp_path / "photos" / "photos.csv").write_text("image,split,age\ntwo.png,train,40\nblank.png,train,50\n")
    out = tmp_path / "largest"
    assert shard("table", tmp_path / "photos" / "photos.csv", "--image-root", tmp_path / "photos", "--map", "age=age",
                 "--out", out, "--size", SIZE, "--align") == 0
    samples = read_samples(out)
    assert list(samples) == ["two"]
    assert samples["two"]["jpg"] == read_samples(all_faces)["two_f0"]["jpg"]


class StubDetector:
    """Gives the same faces for any photo: the policy and the rejections without MTCNN."""

    name = "stub"

    def __init__(self, sides: list[float]) -> None:
        self.faces = [DetectedFace(box=(10, 10, 10 + side, 10 + side), score=0.99,
                                   landmarks=np.array([[0.3, 0.3], [0.7, 0.3], [0.5, 0.5], [0.35, 0.7], [0.65, 0.7]])
                                   * side + 10) for side in sides]

    def detect(self, image: np.ndarray) -> list[DetectedFace]:
        return list(self.faces)


def test_a_photo_whose_faces_are_all_too_small_is_rejected_with_the_sizes_found(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_writer, "worker_detector", lambda min_face: StubDetector([30, 24]))
    Image.new("RGB", (200, 150), (90, 90, 90)).save(tmp_path / "photo.png")
    record = SourceRecord("photo", "train", {"age": 30.0}, "photo.png", FileImage(str(tmp_path / "photo.png")))
    settings = EncodeSettings(SIZE, 90, AlignSettings("all", min_face=40))
    (tmp_path / "_parts").mkdir()
    result = write_shard(ShardPlan("train-000000", "train", (record,)), tmp_path, "photos", settings)
    assert result.num_samples == 0
    assert [(r.stage, r.reason) for r in result.rejections] == [
        ("face", "no face of at least 40 px (found 2 smaller, the largest 30 px)")]
    status = json.loads((tmp_path / "_parts" / "train-000000.json").read_text())
    assert (status["align"]["photos"], status["align"]["faces"]) == (1, 0)


def test_face_options_without_align_and_align_without_the_extra_exit_2_saying_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    assert shard("synthetic", "--num-samples", "4", "--out", tmp_path / "a", "--faces", "all") == 2
    assert "need --align" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # what an absent package looks like to import
    assert shard("synthetic", "--num-samples", "4", "--out", tmp_path / "b", "--align") == 2
    assert "pip install 'facemtl[align]'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_plain_run_describes_its_encoding_as_before_align_existed() -> None:
    # plan.json and the plan's fingerprint hash this: a plain folder written before --align still resumes.
    assert EncodeSettings(96, 80).describe() == {"image_size": 96, "jpeg_quality": 80}
    assert EncodeSettings(96, 80, AlignSettings()).describe()["align"] == {
        "detector": "mtcnn", "policy": "largest", "min_face": 40}
