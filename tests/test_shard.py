"""The shard contract: members, keys, labels, indices, bad input, interruption, determinism, array split,
the manifest's offsets, folders of the older manifest format, image statistics per split."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from pipeline.data import EvalStream, open_shard_set
from pipeline.schema import TASKS
from pipeline.shard import plan_shards, select_records, shards_for_task, sharpness_warnings
from pipeline.shard_writer import GREY_STATS_EVERY, ImageStats
from pipeline.sources.base import FileImage, SourceListing
from tests.conftest import write_face_jpeg
from tests.shard_helpers import (
    REPO,
    read_manifest,
    read_rejected,
    read_samples,
    rewrite_in_older_format,
    sample_members,
    shard,
    shard_cli,
    tar_bytes,
)


def test_every_sample_has_image_and_labels_and_tools_agree_on_the_contents(utkface_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "7", "--size", "96") == 0
    samples = read_samples(out)
    manifest = read_manifest(out)
    assert len(samples) == len(manifest) == 30
    assert all(s["members"] == ["jpg", "json"] for s in samples.values())
    assert all("." not in key for key in samples)
    # GNU tar reads every shard and lists exactly <key>.jpg and <key>.json members.
    for tar_path in out.glob("*.tar"):
        listing = subprocess.run(["tar", "-tf", str(tar_path)], capture_output=True, text=True,
                                 check=True).stdout.split()
        keys = {name.rsplit(".", 1)[0] for name in listing}
        assert sorted(listing) == sorted([f"{k}.jpg" for k in keys] + [f"{k}.json" for k in keys])
    for row in manifest:
        sample = samples[row["key"]]
        assert row["shard"] == sample["url"]
        assert row["sha256"] == hashlib.sha256(sample["jpg"]).hexdigest()
        assert {task: row[task] for task in TASKS} == sample["json"]["labels"]
    assert {Image.open(io.BytesIO(sample["jpg"])).size for sample in samples.values()} == {(96, 96)}


def test_wids_index_lists_every_shard_with_its_sample_count(utkface_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "5") == 0
    manifest = read_manifest(out)
    for split in {row["split"] for row in manifest}:
        index = json.loads((out / f"{split}.json").read_text())
        assert index["__kind__"] == "wids-shard-index-v1" and index["wids_version"] == 1
        for entry in index["shardlist"]:
            assert (out / entry["url"]).stat().st_size == entry["filesize"]
            assert entry["nsamples"] == sum(row["shard"] == entry["url"] for row in manifest)
        assert sum(e["nsamples"] for e in index["shardlist"]) == sum(row["split"] == split for row in manifest)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_samples"] == 30 and set(summary["tasks"]) == {"age", "gender", "race"}


def test_corrupt_truncated_and_non_image_files_are_rejected_with_path_and_reason(
        utkface_dir: Path, tmp_path: Path) -> None:
    good = sorted(utkface_dir.iterdir())
    corrupt, truncated, text = good[0], good[1], good[2]
    corrupt.write_bytes(os.urandom(2000))
    truncated.write_bytes(truncated.read_bytes()[:400])
    text.write_text("this is not a JPEG")
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out) == 0
    rejected = {row["source_id"]: row for row in read_rejected(out)}
    assert {Path(r).name for r in rejected} == {corrupt.name, truncated.name, text.name}
    assert all(row["stage"] == "image" and row["reason"] for row in rejected.values())
    assert any("truncated" in row["reason"] for row in rejected.values())
    assert len(read_manifest(out)) == 27


def test_nothing_usable_or_missing_input_fails_with_a_clear_message(tmp_path: Path) -> None:
    root = tmp_path / "UTKFace"
    root.mkdir()
    (root / "1_0_0_20170101000000000.jpg").write_bytes(b"garbage")
    result = shard_cli("utkface", root, "--out", tmp_path / "out")
    assert result.returncode == 2 and "no usable sample" in result.stderr
    result = shard_cli("utkface", tmp_path / "does-not-exist", "--out", tmp_path / "out2")
    assert result.returncode == 2 and "UTKFace folder not found" in result.stderr


def test_two_runs_and_any_worker_count_give_byte_identical_shards_manifest_and_summary(
    utkface_dir: Path, tmp_path: Path
) -> None:
    runs = []
    for name, workers in (("a", "1"), ("b", "1"), ("c", "2")):
        out = tmp_path / name
        assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "6", "--workers", workers) == 0
        runs.append((tar_bytes(out), (out / "manifest.parquet").read_bytes(), (out / "summary.json").read_bytes()))
    assert runs[0] == runs[1] == runs[2]
    assert len(runs[0][0]) >= 4 and json.loads(runs[0][2])["image_stats"]["train"]["sharpness"] > 0


def test_rerun_skips_complete_shards_and_finishes_the_missing_ones(utkface_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "4") == 0
    reference = tar_bytes(out)
    victim = sorted(out.glob("*.tar"))[1]
    victim.rename(victim.with_name(victim.name + ".tmp"))  # as if killed before the final rename
    kept = sorted(out.glob("*.tar"))[0]
    kept_mtime = kept.stat().st_mtime_ns
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "4") == 0
    assert tar_bytes(out) == reference
    assert kept.stat().st_mtime_ns == kept_mtime  # not rewritten
    assert not list(out.glob("*.tmp"))


def test_changing_the_settings_on_an_existing_output_is_refused(utkface_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out) == 0
    assert shard("utkface", utkface_dir, "--out", out, "--size", "64") == 2
    assert "different input or settings" in capsys.readouterr().err
    assert shard("utkface", utkface_dir, "--out", out, "--size", "64", "--overwrite") == 0


@pytest.mark.slow
def test_a_killed_run_leaves_no_complete_looking_tar_and_resumes_to_the_same_bytes(tmp_path: Path) -> None:
    args = ["synthetic", "--num-samples", "600", "--tasks", "age,gender", "--samples-per-shard", "40", "--size", "64"]
    reference = tmp_path / "reference"
    assert shard(*args, "--out", reference) == 0
    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-m", "pipeline.shard", *args, "--out", str(out)], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while len(list(out.glob("*.tar"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / "manifest.parquet").exists()
    for tar_path in out.glob("*.tar"):  # whatever carries the final name is whole
        assert tar_bytes(out)[tar_path.name] == (reference / tar_path.name).read_bytes()
    assert shard(*args, "--out", out) == 0
    assert tar_bytes(out) == tar_bytes(reference)


def test_array_parts_together_hold_exactly_the_samples_of_one_run(utkface_dir: Path, tmp_path: Path, capsys) -> None:
    single = tmp_path / "single"
    assert shard("utkface", utkface_dir, "--out", single, "--samples-per-shard", "3") == 0
    parts = tmp_path / "parts"
    for task_index in (2, 0):
        assert shard("utkface", utkface_dir, "--out", parts, "--samples-per-shard", "3",
                     "--task-index", str(task_index), "--num-tasks", "3") == 0
    assert not (parts / "manifest.parquet").exists()
    assert shard("merge", parts) == 2
    assert "not complete yet" in capsys.readouterr().err
    assert shard("utkface", utkface_dir, "--out", parts, "--samples-per-shard", "3",
                 "--task-index", "1", "--num-tasks", "3") == 0
    assert (parts / "manifest.parquet").exists()  # the last part merged
    assert tar_bytes(parts) == tar_bytes(single)
    assert read_manifest(parts) == read_manifest(single)
    assert shard("merge", parts) == 0


def test_array_task_index_comes_from_slurm_environment(utkface_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2"}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pipeline.shard", "utkface", str(utkface_dir), "--out", str(out),
                             "--samples-per-shard", "5"], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    plan = json.loads((out / "_parts" / "plan.json").read_text())
    assert sorted(p.name[:-4] for p in out.glob("*.tar")) == sorted([s["name"] for s in plan["shards"]][1::2])
    assert "part 2/2 done" in result.stdout


def _listing(keys: list[tuple[str, str]]) -> SourceListing:
    listing = SourceListing("toy")
    for key, split in keys:
        listing.add(key, split, {"age": 30}, f"src/{key}", FileImage(f"/nowhere/{key}.jpg"))
    return listing


def test_plan_cuts_each_split_in_order_and_tasks_take_every_kth_shard() -> None:
    listing = _listing([(f"k{i:02d}", "train" if i < 7 else "test") for i in range(10)])
    plans = plan_shards(listing.records, samples_per_shard=3)
    assert [(p.name, [r.key for r in p.records]) for p in plans] == [
        ("train-000000", ["k00", "k01", "k02"]), ("train-000001", ["k03", "k04", "k05"]),
        ("train-000002", ["k06"]), ("test-000000", ["k07", "k08", "k09"]),
    ]
    assert [p.name for p in shards_for_task(plans, 1, 2)] == ["train-000001", "test-000000"]


def test_records_are_grouped_by_split_and_shuffled_within_it_by_seed() -> None:
    # UTKFace-like keys: the name starts with the age, so key order would put one age range in each shard.
    keys = [(f"{age}_{i}", "test" if i % 5 == 0 else "train") for age in range(21, 61) for i in range(5)]
    records = select_records(_listing(keys), None, seed=0)
    splits = [r.split for r in records]
    assert splits == sorted(splits, key=["train", "val", "test"].index)
    train_keys = [r.key for r in records if r.split == "train"]
    assert sorted(train_keys) == sorted(k for k, split in keys if split == "train") and train_keys != sorted(train_keys)
    first_shard_ages = [int(key.split("_")[0]) for key in train_keys[:20]]
    assert max(first_shard_ages) - min(first_shard_ages) > 30  # key order would give 21-25 only
    assert [r.key for r in select_records(_listing(keys), None, seed=0)] == [r.key for r in records]
    assert [r.key for r in select_records(_listing(keys), None, seed=1)] != [r.key for r in records]


def test_duplicate_keys_are_rejected_and_limit_takes_a_seeded_subset() -> None:
    listing = _listing([("a", "train"), ("a", "test"), ("b", "train")] + [(f"x{i}", "val") for i in range(20)])
    records = select_records(listing, None, 0)
    assert [r.key for r in records].count("a") == 1
    assert [r.reason for r in listing.rejections] == ["duplicate sample key 'a' (also src/a)"]
    subset = [r.key for r in select_records(_listing([(f"x{i:02d}", "train") for i in range(50)]), 10, seed=1)]
    assert len(subset) == 10 and subset != [f"x{i:02d}" for i in range(10)]
    assert subset == [r.key for r in select_records(_listing([(f"x{i:02d}", "train") for i in range(50)]), 10, seed=1)]


def test_tar_members_have_fixed_metadata(utkface_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out) == 0
    with tarfile.open(next(out.glob("*.tar"))) as tar:
        assert {(m.mtime, m.uid, m.gid, m.mode) for m in tar.getmembers()} == {(0, 0, 0, 0o644)}


# ---------------------------------------------------------------- the manifest: where each sample lies


def test_manifest_offset_and_size_seek_to_exactly_the_samples_members(tmp_path: Path) -> None:
    images = tmp_path / "images"
    names = ["short", "n" * 130, "m" * 95]  # a key over 100 bytes needs a GNU long-name header before its member
    for index in range(12):
        write_face_jpeg(images / f"{names[index % 3]}{index}.jpg", seed=index)
    table = tmp_path / "labels.csv"
    table.write_text("image,age\n" + "".join(f"{names[i % 3]}{i}.jpg,{20 + i}\n" for i in range(12)))
    out = tmp_path / "out"
    assert shard("table", table, "--image-root", images, "--map", "age=age", "--out", out,
                 "--samples-per-shard", "5") == 0
    samples = read_samples(out)
    manifest = read_manifest(out)
    assert "image" not in manifest[0] and len(manifest) == 12
    for row in manifest:
        members = sample_members(out / row["shard"], row["offset"], row["size"])
        assert [name for name, _ in members] == [f"{row['key']}.jpg", f"{row['key']}.json"]
        jpeg, metadata = members[0][1], json.loads(members[1][1])
        assert hashlib.sha256(jpeg).hexdigest() == row["sha256"] and jpeg == samples[row["key"]]["jpg"]
        assert metadata["labels"]["age"] == row["age"]
    for tar_path in out.glob("*.tar"):  # the samples tile their tar: nothing between them, the end marker after
        rows = sorted((r for r in manifest if r["shard"] == tar_path.name), key=lambda r: r["offset"])
        assert [r["offset"] for r in rows] == [0, *itertools.accumulate(r["size"] for r in rows[:-1])]
        assert rows[-1]["offset"] + rows[-1]["size"] + 1024 == tar_path.stat().st_size


def test_manifest_is_a_small_fraction_of_the_tars(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert shard("synthetic", "--num-samples", "400", "--tasks", "age,gender", "--size", "64", "--out", out,
                 "--samples-per-shard", "100") == 0
    manifest_bytes = (out / "manifest.parquet").stat().st_size
    tar_bytes_total = sum(path.stat().st_size for path in out.glob("*.tar"))
    assert manifest_bytes <= 0.05 * tar_bytes_total
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["manifest_bytes"], summary["tar_bytes"]) == (manifest_bytes, tar_bytes_total)


# ---------------------------------------------------------------- folders written by the older format


def test_readers_read_a_folder_whose_manifest_still_holds_the_images(utkface_dir: Path, tmp_path: Path) -> None:
    current, older = tmp_path / "current", tmp_path / "older"
    for out in (current, older):
        assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "7") == 0
    rewrite_in_older_format(older)
    assert "image" in pq.read_schema(older / "manifest.parquet").names
    current_set, older_set = open_shard_set(current), open_shard_set(older)
    for split in ("train", "test"):
        assert older_set.labels("age", split) == current_set.labels("age", split)
    assert [sample["key"] for sample in EvalStream([older_set], "train", ["age", "gender"], 32)] == \
           [sample["key"] for sample in EvalStream([current_set], "train", ["age", "gender"], 32)]


def test_a_complete_older_folder_is_kept_whole_and_its_summary_says_it_can_be_rewritten(
    utkface_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "7") == 0
    rewrite_in_older_format(out)
    older_manifest, older_tars = read_manifest(out), tar_bytes(out)
    capsys.readouterr()
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "7") == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["manifest_format"] == 1 and summary["image_stats"] == {}
    assert any("older pipeline.shard" in note and "--overwrite" in note for note in summary["notes"])
    assert "older pipeline.shard" in printed and "--overwrite" in printed
    assert read_manifest(out) == older_manifest and tar_bytes(out) == older_tars  # one format, nothing re-encoded
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "7", "--overwrite") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["manifest_format"] == 2 and not any("older" in note for note in summary["notes"])
    assert "image" not in read_manifest(out)[0] and tar_bytes(out) == older_tars


def test_an_incomplete_older_folder_is_not_finished_in_the_new_format(
    utkface_dir: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "7") == 0
    rewrite_in_older_format(out)
    missing = sorted(out.glob("*.tar"))[1]
    missing.unlink()
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "7") == 2
    error = capsys.readouterr().err
    assert "older pipeline.shard" in error and "mix two manifest formats" in error and "--overwrite" in error
    assert not missing.exists()


def test_merge_refuses_parts_of_two_manifest_formats(utkface_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert shard("utkface", utkface_dir, "--out", out, "--samples-per-shard", "7") == 0
    rewrite_in_older_format(out, names=["train-000001"])
    assert shard("merge", out) == 2
    assert "mixes shards of two manifest formats" in capsys.readouterr().err


# ---------------------------------------------------------------- image statistics per split


def _fer_folders_with_train_blurred(root: Path, blur_radius: float) -> Path:
    """The FER2013 folder layout with textured 48 px grey faces; train's blurred as in the broken copy."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("test", 3)):
        for emotion in ("angry", "happy", "sad"):
            for index in range(count):
                texture = rng.integers(0, 256, (12, 12), dtype=np.uint8)
                face = Image.fromarray(texture, mode="L").resize((48, 48), Image.Resampling.NEAREST)
                if split == "train" and blur_radius:
                    face = face.filter(ImageFilter.GaussianBlur(blur_radius))
                (root / split / emotion).mkdir(parents=True, exist_ok=True)
                face.save(root / split / emotion / f"{index}.png")
    return root


@pytest.mark.parametrize("blur_radius", [0, 2])
def test_summary_warns_when_train_and_test_images_differ_in_sharpness(
    tmp_path: Path, capsys, blur_radius: float
) -> None:
    source = _fer_folders_with_train_blurred(tmp_path / "fer2013", blur_radius)
    out = tmp_path / "out"
    assert shard("fer2013", source, "--size", "48", "--val-fraction", "0.3", "--out", out) == 0
    summary = json.loads((out / "summary.json").read_text())
    stats = summary["image_stats"]
    measured = {split: math.ceil(count / GREY_STATS_EVERY) for split, count in summary["samples_per_split"].items()}
    assert sum(summary["samples_per_split"].values()) == 27  # in one shard a split, its first crop and every 4th
    assert {split: s["num_images"] for split, s in stats.items()} == measured
    assert all(0 < s["mean"] < 255 and s["std"] > 0 for s in stats.values())
    warnings = [note for note in summary["notes"] if note.startswith("WARNING")]
    printed = capsys.readouterr().out
    if blur_radius:
        assert stats["test"]["sharpness"] > 1.5 * stats["train"]["sharpness"]
        assert len(warnings) == 1 and "train and test images differ in sharpness" in warnings[0]
        assert warnings[0] in printed
    else:
        assert warnings == [] and "WARNING" not in printed


def _stats_with_sharpness(sharpness: float) -> ImageStats:
    return ImageStats(num_images=10, num_pixels=1000, pixel_sum=100_000, pixel_square_sum=12_000_000,
                      abs_diff_sum=round(sharpness * 900), num_diffs=900)


@pytest.mark.parametrize(
    ("train", "val", "test", "warned"),
    [(10.0, 10.5, 14.9, []), (10.0, 10.0, 15.2, ["test"]), (14.0, 3.9, 11.6, ["val"]), (11.6, 11.7, 0.0, ["test"]),
     (0.0, 0.0, 0.0, [])],
)
def test_sharpness_warning_fires_beyond_a_ratio_of_one_and_a_half_either_way(train, val, test, warned) -> None:
    stats = {split: _stats_with_sharpness(value) for split, value in (("train", train), ("val", val), ("test", test))}
    assert [text.split(" images differ")[0].split()[-1] for text in sharpness_warnings(stats)] == warned


def test_image_statistics_are_exact_sums_of_the_grey_crops() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    stats = ImageStats.of(Image.fromarray(grey, mode="L").convert("RGB"))
    values = grey.astype(np.float64)
    assert (stats.num_images, stats.num_pixels, stats.num_diffs) == (1, 12, 9)
    assert stats.mean == pytest.approx(values.mean()) and stats.std == pytest.approx(values.std())
    assert stats.sharpness == 20.0
    assert stats + ImageStats() == stats and (stats + stats).mean == stats.mean
