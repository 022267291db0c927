"""The streams find samples where the manifest places them and take labels from its columns; folders whose
manifest predates offsets are read member by member, with the same batches."""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data import DataConfigError, EvalStream, TaskBalancedStream, open_shard_set
from pipeline.tar_format import member_at, tar_end, tar_member_bytes

TASKS = ["age", "gender", "race", "smile", "young", "emotion"]


def without_offsets(folder: Path, copy: Path) -> Path:
    """A copy of a shard folder as written before the manifest located samples in their tars."""
    shutil.copytree(folder, copy)
    manifest = pq.read_table(copy / "manifest.parquet")
    pq.write_table(manifest.drop_columns(["offset", "size"]), copy / "manifest.parquet")
    return copy


def batches(folders: list[Path], count: int) -> list[dict[str, torch.Tensor]]:
    sets = [open_shard_set(folder) for folder in folders]
    stream = TaskBalancedStream(sets, {s.name: 5 for s in sets}, TASKS, 24, shuffle_buffer=30, seed=4, rank=1, epoch=2)
    return list(itertools.islice(iter(stream), count))


def test_batches_from_manifest_offsets_equal_batches_from_every_member_of_an_older_folder(
        synthetic_shards: dict[str, Path], tmp_path: Path) -> None:
    current = [synthetic_shards["utk"], synthetic_shards["celeba"]]
    older = [without_offsets(folder, tmp_path / folder.name) for folder in current]
    for located, read in zip(batches(current, 12), batches(older, 12)):
        assert located.keys() == read.keys()
        for name in located:
            assert located[name].dtype == read[name].dtype and torch.equal(located[name], read[name]), name
    assert batches(current, 1)[0]["mask"].any(dim=0).tolist() == [True] * 5 + [False]  # no emotion in utk, celeba


def test_validation_of_an_older_folder_reads_the_same_samples_and_labels(synthetic_shards: dict[str, Path],
                                                                         tmp_path: Path) -> None:
    older = without_offsets(synthetic_shards["fer"], tmp_path / "fer")
    located, read = (list(EvalStream([open_shard_set(folder)], "val", TASKS, 32))
                     for folder in (synthetic_shards["fer"], older))
    assert [s["key"] for s in located] == [s["key"] for s in read] and len(located) > 0
    for a, b in zip(located, read):
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["labels"], b["labels"])
        assert torch.equal(a["mask"], b["mask"])


def test_a_tar_changed_after_sharding_is_named_where_the_manifest_places_a_sample(
        synthetic_shards: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(synthetic_shards["fer"], tmp_path / "fer"))
    tar = folder / "train-000000.tar"
    data = bytearray(tar.read_bytes())
    first_name = data[:100].split(b"\0", 1)[0]
    data[: len(first_name)] = b"x" * len(first_name)  # another sample's name where the first one lies
    shard_set = open_shard_set(folder)
    tar.write_bytes(bytes(data))
    stream = TaskBalancedStream([shard_set], {"fer": 8}, ["emotion"], 32, shuffle_buffer=1, seed=0)
    with pytest.raises(DataConfigError, match=rf"{tar} has no \S+\.jpg where its manifest places it \(byte 0\)"):
        list(itertools.islice(iter(stream), 100))


def test_a_manifest_that_disagrees_with_the_index_is_named(synthetic_shards: dict[str, Path], tmp_path: Path) -> None:
    folder = Path(shutil.copytree(synthetic_shards["fer"], tmp_path / "fer"))
    manifest = pq.read_table(folder / "manifest.parquet")
    pq.write_table(manifest.slice(1), folder / "manifest.parquet")  # one row lost
    with pytest.raises(DataConfigError, match=r"manifest.parquet lists \d+ samples of \S+\.tar, train.json records"):
        next(iter(TaskBalancedStream([open_shard_set(folder)], {"fer": 8}, ["emotion"], 32, 10, seed=0)))


def test_member_at_reads_the_member_an_index_points_to_long_names_included() -> None:
    first, second = tar_member_bytes("a.jpg", b"x" * 700), tar_member_bytes("k" * 150 + ".jpg", b"long name")
    data = first + second + tar_end()
    name, start, size, following = member_at(data, len(first), "t.tar")
    assert (name, data[start : start + size], following) == ("k" * 150 + ".jpg", b"long name", len(first + second))
    assert member_at(data, len(first + second), "t.tar") is None  # the end-of-archive blocks
