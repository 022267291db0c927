"""Damaged shard folders are refused with one line naming the file and what is wrong, before Ray starts
and before anything is written; each test damages a copy of a small synthetic shard folder one way."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest

from pipeline.data import DataConfigError, TaskBalancedStream, open_shard_set
from pipeline.evaluate import main as evaluate_main
from pipeline.tar_format import TAR_BLOCK
from pipeline.train import main as train_main
from tests.test_train import TINY

HINT_SHARD = "run the python -m pipeline.shard command that wrote it again (it writes only missing shards)"


@pytest.fixture
def shards(synthetic_shards: dict[str, Path], tmp_path: Path) -> Path:
    """A copy of the UTKFace-like synthetic folder (360 samples at 32 px, 50 per shard), to damage."""
    return Path(shutil.copytree(synthetic_shards["utk"], tmp_path / "utk"))


def member_offsets(tar: Path) -> list[int]:
    """Byte offsets of the tar's member headers (every sample is a .jpg and a .json member)."""
    data, offsets, offset = tar.read_bytes(), [], 0
    while data[offset : offset + TAR_BLOCK].strip(b"\0"):
        offsets.append(offset)
        size = int(data[offset + 124 : offset + 136].split(b"\0")[0], 8)
        offset += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK
    return offsets


def cut(path: Path, size: int) -> None:
    with path.open("r+b") as handle:
        handle.truncate(size)


def refused_training(folder: Path, runs: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Train (on Ray, as a user would) on ``folder``: exit 2, one ``error:`` line, no Ray, no run folder."""
    import ray

    assert train_main([f"data.datasets=[{folder}]", f"runs_dir={runs}", "name=r", *TINY]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not ray.is_initialized()
    assert not (runs / "r").exists()
    return lines[0].removeprefix("error: ")


def test_a_train_tar_cut_inside_a_header_is_named_truncated_with_its_size(shards: Path, tmp_path: Path, capsys) -> None:
    tar = shards / "train-000000.tar"
    recorded = tar.stat().st_size
    half = member_offsets(tar)[len(member_offsets(tar)) // 2] + 200
    cut(tar, half)
    assert refused_training(shards, tmp_path / "runs", capsys) == (
        f"{tar} is truncated at byte {half}: train.json records {recorded} bytes; delete it and {HINT_SHARD}")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda d: (d / "summary.json").write_text("garbage{"),
         "{d}/summary.json is not valid JSON (Expecting value: line 1 column 1 (char 0)); "
         "rebuild it with python -m pipeline.shard merge {d}"),
        (lambda d: (d / "summary.json").write_text("{}"),
         "{d}/summary.json lacks dataset, samples_per_split, labelled_per_task; "
         "rebuild it with python -m pipeline.shard merge {d}"),
        (lambda d: (d / "train.json").unlink(),
         "no training split in {d}: train.json is missing, though summary.json counts {train} train samples; "
         "rebuild it with python -m pipeline.shard merge {d}"),
        (lambda d: (d / "train.json").write_text("[1, 2"),
         "{d}/train.json is not valid JSON (Expecting ',' delimiter: line 1 column 6 (char 5)); "
         "rebuild it with python -m pipeline.shard merge {d}"),
        (lambda d: (d / "manifest.parquet").unlink(),
         "{d}/manifest.parquet is missing; rebuild it with python -m pipeline.shard merge {d}"),
        (lambda d: (d / "val.json").unlink(),
         "no validation split in {d}: val.json is missing, though summary.json counts {val} val samples; "
         "rebuild it with python -m pipeline.shard merge {d}"),
    ],
    ids=["summary-garbage", "summary-empty", "train-index-missing", "train-index-garbage", "manifest-missing",
         "no-val-index"],
)
def test_a_damaged_or_missing_metadata_file_is_named_before_ray_starts(shards: Path, tmp_path: Path, capsys,
                                                                      damage, expected: str) -> None:
    counts = json.loads((shards / "summary.json").read_text())["samples_per_split"]
    damage(shards)
    assert refused_training(shards, tmp_path / "runs", capsys) == expected.format(d=shards, **counts)


def test_a_folder_sharded_without_a_validation_split_is_refused_before_training(tmp_path: Path, capsys) -> None:
    from tests.shard_helpers import shard

    folder = tmp_path / "no-val"
    assert shard("synthetic", "--num-samples", "30", "--size", "32", "--val-fraction", "0", "--out", folder) == 0
    capsys.readouterr()
    assert refused_training(folder, tmp_path / "runs", capsys).startswith(f"no validation split in {folder}; ")


@pytest.fixture(scope="module")
def checkpoint(synthetic_shards: dict[str, Path], tmp_path_factory) -> Path:
    """One training step on the intact folder: evaluate needs a model, not a good one."""
    runs = tmp_path_factory.mktemp("damaged-runs")
    assert train_main(["--local", f"data.datasets=[{synthetic_shards['utk']}]", f"runs_dir={runs}", "name=r", *TINY,
                       "max_epochs=1", "data.steps_per_epoch=1", "data.loader_workers=0"]) == 0
    return runs / "r" / "best_model.pt"


def test_evaluate_refuses_a_val_tar_cut_at_a_sample_boundary(checkpoint: Path, shards: Path, tmp_path: Path,
                                                             capsys) -> None:
    tar = shards / "val-000000.tar"
    recorded = tar.stat().st_size
    boundary = member_offsets(tar)[20]  # after 10 of its samples
    cut(tar, boundary)
    out = tmp_path / "evaluation"
    assert evaluate_main([str(checkpoint), "--split", "val", "--data", str(shards), "--out", str(out),
                          "--loader-workers", "0"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tar} is truncated at byte {boundary}: val.json records {recorded} bytes; delete it and {HINT_SHARD}"]
    assert not out.exists()


def test_a_tar_longer_than_its_index_records_is_refused(shards: Path, tmp_path: Path, capsys) -> None:
    tar = shards / "test-000000.tar"
    recorded = tar.stat().st_size
    with tar.open("ab") as handle:
        handle.write(b"\0" * TAR_BLOCK)
    assert refused_training(shards, tmp_path / "runs", capsys) == (
        f"{tar} has {recorded + TAR_BLOCK} bytes, test.json records {recorded}: it changed after sharding; "
        f"delete it and {HINT_SHARD}")


def test_an_index_that_disagrees_with_the_summary_is_refused(shards: Path, tmp_path: Path, capsys) -> None:
    index = json.loads((shards / "val.json").read_text())
    counted = sum(entry["nsamples"] for entry in index["shardlist"])
    index["shardlist"][0]["nsamples"] -= 1
    (shards / "val.json").write_text(json.dumps(index))
    assert refused_training(shards, tmp_path / "runs", capsys) == (f"{shards}/val.json lists {counted - 1} samples, "
                                                                   f"summary.json counts {counted}; rebuild it with "
                                                                   f"python -m pipeline.shard merge {shards}")


def test_evaluate_names_a_shard_damaged_where_its_size_does_not_show(checkpoint, shards, tmp_path, capsys) -> None:
    tar = shards / "val-000000.tar"
    data = bytearray(tar.read_bytes())
    data[:TAR_BLOCK] = b"\x5a" * TAR_BLOCK
    tar.write_bytes(bytes(data))
    out = tmp_path / "evaluation"
    assert evaluate_main([str(checkpoint), "--split", "val", "--data", str(shards), "--out", str(out),
                          "--loader-workers", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tar} is damaged: the bytes at 0 are not a tar header (no ustar magic); delete it and {HINT_SHARD}"]
    assert not out.exists()


def spoil_jpeg(tar: Path, sample: int) -> str:
    """Overwrite the JPEG bytes of the tar's ``sample``-th sample (same size, so no size check sees it); its key."""
    header = member_offsets(tar)[2 * sample]
    data = bytearray(tar.read_bytes())
    name = bytes(data[header : header + 100]).split(b"\0")[0].decode()
    size = int(data[header + 124 : header + 136].split(b"\0")[0], 8)
    data[header + TAR_BLOCK : header + TAR_BLOCK + size] = b"\x5a" * size
    tar.write_bytes(bytes(data))
    return name.removesuffix(".jpg")


def test_the_training_stream_names_the_tar_and_sample_of_a_jpeg_that_does_not_decode(shards: Path) -> None:
    tars = sorted(shards.glob("train-*.tar"))
    # a sample of every tar, so that the first batches meet one (the last tar may hold a single sample)
    keys = {tar: spoil_jpeg(tar, min(3, len(member_offsets(tar)) // 2 - 1)) for tar in tars}
    stream = TaskBalancedStream([open_shard_set(shards)], {"utk": 16}, ["age"], 32, shuffle_buffer=10, seed=0)
    with pytest.raises(DataConfigError) as raised:
        for _ in itertools.islice(stream, 40):
            pass
    message = str(raised.value)
    tar = next(tar for tar in tars if message.startswith(f"{tar} is damaged"))
    assert f"the JPEG of sample {keys[tar]} does not decode (" in message
    assert message.endswith(f"; delete it and {HINT_SHARD}")


def test_evaluate_names_the_tar_and_sample_of_a_jpeg_that_does_not_decode(checkpoint: Path, shards: Path,
                                                                          tmp_path: Path, capsys) -> None:
    tar = shards / "val-000000.tar"
    key = spoil_jpeg(tar, 7)
    out = tmp_path / "evaluation"
    assert evaluate_main([str(checkpoint), "--split", "val", "--data", str(shards), "--out", str(out),
                          "--loader-workers", "1"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {tar} is damaged: the JPEG of sample {key} does not decode (")
    assert line.endswith(f"; delete it and {HINT_SHARD}")
    assert not out.exists()
