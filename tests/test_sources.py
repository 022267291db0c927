"""Each dataset reader against small fixtures in its real layout, end to end through pipeline.shard."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from pipeline.sources.utkface import parse_utkface_name
from tests.conftest import UTK_LABELS, write_face_jpeg
from tests.shard_helpers import read_manifest, read_rejected, read_samples, shard

NULL_TASKS_UTK = ("smile", "young", "emotion")


def test_utkface_labels_follow_the_file_names_with_gender_mapped_to_the_schema(
        utkface_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "8") == 0
    samples = read_samples(out)
    assert len(samples) == 30
    expected = {f"{a}_{g}_{r}": (a, g, r) for a, g, r in UTK_LABELS}
    for key, sample in samples.items():
        age, utk_gender, race = expected["_".join(key.split("_")[:3])]
        labels = sample["json"]["labels"]
        assert labels["age"] == age and labels["race"] == race
        assert labels["gender"] == (1 if utk_gender == 0 else 0)  # UTKFace 0 = male -> schema 1 = male
        assert all(labels[task] is None for task in NULL_TASKS_UTK)
        assert sample["json"]["dataset"] == "utkface"
        assert Path(sample["json"]["source_id"]).parent == utkface_dir
    splits = {row["split"] for row in read_manifest(out)}
    assert splits <= {"train", "val", "test"} and "train" in splits


def test_utkface_odd_names_parse_and_bad_names_and_codes_are_rejected(tmp_path: Path) -> None:
    root = tmp_path / "UTKFace"
    write_face_jpeg(root / "39_1_20170116174525125.jpg.chip.jpg", 1)  # no race field (as in the release)
    write_face_jpeg(root / "61_1_3_20170109150557335jpg.chip.jpg", 2)  # no dot before "jpg" (as in the release)
    write_face_jpeg(root / "25_0_1_20170116174525125.jpg", 3)  # plain .jpg
    write_face_jpeg(root / "not_a_utkface_name.jpg", 4)
    write_face_jpeg(root / "30_7_1_20170116174525125.jpg.chip.jpg", 5)  # gender code 7
    write_face_jpeg(root / "150_0_1_20170116174525125.jpg.chip.jpg", 6)  # age 150 > 120
    (root / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    assert shard("utkface", root, "--out", out) == 0
    labels = {key: s["json"]["labels"] for key, s in read_samples(out).items()}
    assert labels["39_1_20170116174525125"]["race"] is None
    assert labels["39_1_20170116174525125"]["gender"] == 0
    assert (labels["61_1_3_20170109150557335jpg"]["age"], labels["61_1_3_20170109150557335jpg"]["race"]) == (61, 3)
    assert labels["25_0_1_20170116174525125"]["gender"] == 1
    rejected = {Path(r["source_id"]).name: r["reason"] for r in read_rejected(out)}
    assert set(rejected) == {
        "not_a_utkface_name.jpg", "30_7_1_20170116174525125.jpg.chip.jpg",
        "150_0_1_20170116174525125.jpg.chip.jpg", "notes.txt",
    }
    assert "gender code 7" in rejected["30_7_1_20170116174525125.jpg.chip.jpg"]
    assert "outside [0, 120]" in rejected["150_0_1_20170116174525125.jpg.chip.jpg"]


def test_parse_utkface_name_rejects_what_is_not_age_gender_race_datetime() -> None:
    assert parse_utkface_name("1_0_0_20161219140623097.jpg.chip.jpg") == {"age": 1, "gender": 0, "race": 0}
    for bad in ("abc_0_0_1.jpg", "1_0_0.jpg", "1-0-0-2016.jpg"):
        try:
            parse_utkface_name(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad} parsed")


def _write_coral_csv(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["", "file", "age"])
        for index, (name, age) in enumerate(rows):
            writer.writerow([index, name, age])


def test_utkface_coral_split_keeps_protocol_ages_holds_out_validation_and_reports_missing_rows(tmp_path: Path) -> None:
    root = tmp_path / "UTKFace"
    in_protocol = [f"{21 + i}_{i % 2}_{i % 5}_2017011{i:03d}000.jpg.chip.jpg" for i in range(40)]
    for index, name in enumerate(in_protocol):
        write_face_jpeg(root / name, index)
    write_face_jpeg(root / "5_0_0_20170110000000.jpg.chip.jpg", 99)  # age 5: outside the protocol
    split_dir = tmp_path / "coral"
    split_dir.mkdir()
    train_rows = [(name, int(name.split("_")[0]) - 21) for name in in_protocol[:30]]
    test_rows = [(name, int(name.split("_")[0]) - 21) for name in in_protocol[30:]]
    test_rows[0] = (test_rows[0][0], 0)  # csv age disagrees with the file name
    train_rows.append(("44_1_0_20170199999999.jpg.chip.jpg", 23))  # row without an image
    _write_coral_csv(split_dir / "utk_train.csv", train_rows)
    _write_coral_csv(split_dir / "utk_test.csv", test_rows)

    out = tmp_path / "out"
    assert shard("utkface", root, "--split-csv", split_dir, "--out", out) == 0
    manifest = read_manifest(out)
    by_split = {split: [r for r in manifest if r["split"] == split] for split in ("train", "val", "test")}
    assert len(by_split["train"]) + len(by_split["val"]) == 30 and len(by_split["test"]) == 9
    assert 1 <= len(by_split["val"]) <= 14  # seeded ~20 % hold-out of CORAL's train
    assert all(21 <= r["age"] <= 60 for r in manifest)
    reasons = {Path(r["source_id"].split(":")[-1]).name: r["reason"] for r in read_rejected(out)}
    assert "disagrees" in reasons[test_rows[0][0]]
    assert "image not found" in reasons["44_1_0_20170199999999.jpg.chip.jpg"]


def test_fer2013_csv_follows_usage_and_rejects_bad_rows(fer_csv: Path, tmp_path: Path) -> None:
    with fer_csv.open("a", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([3, "1 2 3", "Training"])  # too few pixels
        writer.writerow([9, " ".join(["7"] * 2304), "Training"])  # emotion 9 does not exist
        writer.writerow([2, " ".join(["7"] * 2304), "Holdout"])  # unknown Usage
    out = tmp_path / "out"
    assert shard("fer2013", fer_csv, "--out", out) == 0
    manifest = read_manifest(out)
    counts = {split: sum(r["split"] == split for r in manifest) for split in ("train", "val", "test")}
    assert counts == {"train": 14, "val": 3, "test": 3}
    assert [r["emotion"] for r in sorted(manifest, key=lambda r: r["key"])] == [i % 7 for i in range(20)]
    assert all(r["age"] is None and r["gender"] is None for r in manifest)
    rejected = read_rejected(out)
    assert {r["source_id"].rsplit(":", 1)[1] for r in rejected} == {"22", "23", "24"}
    assert any("emotion: class 9" in r["reason"] for r in rejected)


def test_fer2013_folders_map_class_folders_and_hold_out_validation(fer_folders: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert shard("fer2013", fer_folders, "--out", out, "--val-fraction", "0.3") == 0
    manifest = read_manifest(out)
    assert len(manifest) == 28
    assert sum(r["split"] == "test" for r in manifest) == 7
    assert sum(r["split"] == "val" for r in manifest) >= 1
    for row in manifest:
        folder_emotion = row["key"].split("_")[1]
        assert ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"][row["emotion"]] == folder_emotion


def test_celeba_emits_every_attribute_feeds_gender_smile_young_and_moves_landmarks_into_the_crop(
        celeba_dir: Path, tmp_path: Path) -> None:
    (celeba_dir / "img_align_celeba" / "000012.jpg").unlink()  # annotated, image missing
    out = tmp_path / "out"
    assert shard("celeba", celeba_dir, "--out", out, "--size", "64") == 0
    samples = read_samples(out)
    assert len(samples) == 11
    first = samples["000001"]["json"]
    # row 1: values are 1 where (1 + col) is odd -> 5_o_Clock_Shadow (col 0) = 1, Male (col 1) = -1,
    # Smiling (col 2) = 1, Young (col 3) = -1, Wearing_Hat (col 4) = 1
    attributes = {"5_o_Clock_Shadow": 1, "Male": 0, "Smiling": 1, "Young": 0, "Wearing_Hat": 1}
    assert first["labels"] == {"age": None, "gender": 0, "race": None, "smile": 1, "young": 0, "emotion": None,
                               "landmarks": first["labels"]["landmarks"], **attributes}
    # 178x218 -> 64 px: scaled to 52x64 (round(178 / 218 * 64)) and padded 6 px on the left
    x_pixels, y_pixels = [float(61 + k) for k in range(0, 10, 2)], [float(61 + k) for k in range(1, 10, 2)]
    expected = [coordinate for x, y in zip(x_pixels, y_pixels)
                for coordinate in ((6 + (x + 0.5) * 52 / 178) / 64, (y + 0.5) * 64 / 218 / 64)]
    assert first["labels"]["landmarks"] == pytest.approx(expected, abs=1e-12)
    declared = {entry["name"]: entry for entry in json.loads((out / "summary.json").read_text())["task_declarations"]}
    assert declared["Wearing_Hat"] == {"name": "Wearing_Hat", "kind": "binary", "classes": ["no", "yes"],
                                       "metric": "accuracy"}
    manifest = read_manifest(out)
    assert {r["key"]: r["split"] for r in manifest}["000009"] == "val"
    assert [r["reason"] for r in read_rejected(out)] == [f"image not found in {celeba_dir / 'img_align_celeba'}"]


def test_a_folder_the_reader_cannot_read_is_a_clear_error_not_a_traceback(
        celeba_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    image_dir = celeba_dir / "img_align_celeba"
    real_iterdir = Path.iterdir

    def iterdir(self: Path):  # root reads every folder whatever its mode, so the refusal is simulated
        if self == image_dir:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    assert shard("celeba", celeba_dir, "--out", tmp_path / "out") == 2
    assert f"error: [Errno 13] Permission denied: '{image_dir}'" in capsys.readouterr().err


def test_celeba_without_attribute_file_is_a_clear_error(celeba_dir: Path, tmp_path: Path, capsys) -> None:
    (celeba_dir / "list_attr_celeba.txt").unlink()
    assert shard("celeba", celeba_dir, "--out", tmp_path / "out") == 2
    assert "CelebA attribute file not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_chalearn_uses_the_mean_apparent_age_and_keeps_its_std(chalearn_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert shard("chalearn", chalearn_dir, "--out", out) == 0
    samples = read_samples(out)
    assert len(samples) == 9
    sample = samples["train_000002"]["json"]
    assert sample["labels"]["age"] == 22.5 and sample["age_std"] == 3.45
    assert {r["split"] for r in read_manifest(out)} == {"train", "val"}


def test_table_maps_named_columns_and_class_names(tmp_path: Path) -> None:
    images = tmp_path / "images"
    rows = [("a.jpg", "34", "M", "happy", "train"), ("b.jpg", "61", "female", "Sad", "test"),
            ("c.jpg", "", "f", "", "valid"), ("missing.jpg", "20", "m", "fear", "train"),
            ("d.jpg", "30", "robot", "happy", "train")]
    for index, row in enumerate(rows):
        if row[0] != "missing.jpg":
            write_face_jpeg(images / row[0], index)
    table = tmp_path / "labels.csv"
    table.write_text("path,Age,Sex,Mood,split\n" + "\n".join(",".join(r) for r in rows) + "\n")
    out = tmp_path / "out"
    code = shard("table", table, "--image-root", images, "--image-column", "path",
                 "--map", "Age=age,Sex=gender,Mood=emotion", "--out", out)
    assert code == 0
    by_key = {r["key"]: r for r in read_manifest(out)}
    assert (by_key["a"]["age"], by_key["a"]["gender"], by_key["a"]["emotion"], by_key["a"]["split"]) == \
        (34.0, 1, 3, "train")
    assert (by_key["b"]["gender"], by_key["b"]["emotion"], by_key["b"]["split"]) == (0, 4, "test")
    assert (by_key["c"]["age"], by_key["c"]["gender"], by_key["c"]["emotion"], by_key["c"]["split"]) == \
        (None, 0, None, "val")
    reasons = {r["source_id"].rsplit(":", 1)[1]: r["reason"] for r in read_rejected(out)}
    assert set(reasons) == {"5", "6"} and "not found" in reasons["5"] and "robot" in reasons["6"]


def test_table_with_a_missing_column_names_it(tmp_path: Path, capsys) -> None:
    table = tmp_path / "labels.csv"
    table.write_text("image,Age\nx.jpg,3\n")
    (tmp_path / "images").mkdir()
    assert shard("table", table, "--image-root", tmp_path / "images", "--map", "Sex=gender",
                 "--out", tmp_path / "o") == 2
    assert "column(s) ['Sex'] not found" in capsys.readouterr().err


def test_a_csv_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for index in range(3):
        write_face_jpeg(images / f"{index}.jpg", index)
    table = tmp_path / "labels.csv"
    table.write_text("image,Age\n" + "".join(f"{index}.jpg,{20 + index}\n" for index in range(3)), encoding="utf-8-sig")
    assert table.read_bytes().startswith(b"\xef\xbb\xbf")
    out = tmp_path / "out"
    assert shard("table", table, "--image-root", images, "--map", "Age=age", "--out", out) == 0
    assert sorted(r["age"] for r in read_manifest(out)) == [20.0, 21.0, 22.0]


def test_table_rejections_cite_the_csv_row_and_conflicting_duplicates_reject_every_row(tmp_path: Path) -> None:
    images = tmp_path / "images"
    for index, name in enumerate("abcde"):
        write_face_jpeg(images / f"{name}.jpg", index)
    rows = ["a.jpg,30", "b.jpg,abc", "c.jpg,200", "a.jpg,31", "d.jpg,40", "d.jpg,40", "e.jpg,50"]  # csv rows 2-8
    table = tmp_path / "labels.csv"
    table.write_text("image,Age\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"
    assert shard("table", table, "--image-root", images, "--map", "Age=age", "--out", out) == 0
    assert sorted((r["key"], r["age"]) for r in read_manifest(out)) == [("d", 40.0), ("e", 50.0)]
    assert {r["source_id"]: r["reason"] for r in read_rejected(out)} == {
        f"{table}:3": "label out of range: age: 'abc' is not a number",
        f"{table}:4": "label out of range: age: 200 is outside [0, 120]",
        f"{table}:2": f"conflicting duplicate of {table}:5 (same sample key 'a'): age 30.0 here, 31.0 there",
        f"{table}:5": f"conflicting duplicate of {table}:2 (same sample key 'a'): age 31.0 here, 30.0 there",
        f"{table}:7": f"duplicate sample key 'd' (also {table}:6)",
    }


def test_synthetic_source_labels_only_the_requested_tasks(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert shard("synthetic", "--num-samples", "40", "--tasks", "emotion", "--out", out, "--size", "64") == 0
    manifest = read_manifest(out)
    assert len(manifest) == 40
    assert all(r["emotion"] is not None and r["age"] is None and r["gender"] is None for r in manifest)
