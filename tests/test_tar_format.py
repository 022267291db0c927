"""Our tar writer and reader against the reference implementations: GNU tar, tarfile, webdataset."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.data import DataConfigError, tar_samples
from pipeline.tar_format import TarFormatError, tar_end, tar_member_bytes, tar_members

MEMBERS = [("a.jpg", b"x" * 700), ("a.json", b"{}"), ("k" * 150 + ".jpg", b"long name"), ("b.jpg", b"")]


def write_tar(path: Path) -> bytes:
    data = b"".join(tar_member_bytes(name, payload) for name, payload in MEMBERS) + tar_end()
    path.write_bytes(data)
    return data


def test_written_tars_read_back_identically_with_tarfile_gnu_tar_and_webdataset(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    write_tar(path)
    with tarfile.open(path) as tar:
        assert [(m.name, tar.extractfile(m).read(), m.mtime, m.mode) for m in tar.getmembers()] == [
            (name, payload, 0, 0o644) for name, payload in MEMBERS]
    listing = subprocess.run(["tar", "-tvf", str(path)], capture_output=True, text=True, check=True)
    assert [line.split()[-1] for line in listing.stdout.splitlines()] == [name for name, _ in MEMBERS]
    assert listing.stderr == ""
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in samples] == [
        ("a", ["jpg", "json"]), ("k" * 150, ["jpg"]), ("b", ["jpg"])]


def test_written_bytes_are_those_every_earlier_version_wrote(tmp_path: Path) -> None:
    # A resumed run keeps an earlier run's shards: the same input must give the same bytes across versions.
    digest = hashlib.sha256(write_tar(tmp_path / "t.tar")).hexdigest()
    assert digest == "4bb7873d6fccffe1cb66fd9b787dd947bdf388303a6c9042fe201ef0dd347bb2"


def test_reader_agrees_with_tarfile_on_tarfiles_own_output(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, payload in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert list(tar_members(buffer.getvalue(), "t.tar")) == MEMBERS


SAMPLES = [("a.jpg", b"x" * 700), ("a.json", b"{}"), ("k" * 150 + ".jpg", b"long name"), ("k" * 150 + ".json", b"{}")]


def write_sample_tar(path: Path) -> bytes:
    data = b"".join(tar_member_bytes(name, payload) for name, payload in SAMPLES) + tar_end()
    path.write_bytes(data)
    return data


def test_reader_groups_members_into_samples_by_key(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    write_sample_tar(path)
    samples = list(tar_samples([{"url": str(path)}]))
    assert [(s["__key__"], s["jpg"], s["json"]) for s in samples] == [
        ("a", b"x" * 700, b"{}"), ("k" * 150, b"long name", b"{}")]


@pytest.mark.parametrize(
    ("cut", "where"),
    [(512 * 3 + 100, "inside the header at byte 1536"),  # a.json's header, cut half way
     (512 + 300, r"the member at byte 0 needs 700 bytes"),  # inside a.jpg's payload
     (512 * 5, "before the end-of-archive marker")],  # at a sample boundary: the end blocks are missing
)
def test_a_cut_tar_is_named_truncated_with_the_byte_it_ends_at(tmp_path: Path, cut: int, where: str) -> None:
    data = write_sample_tar(tmp_path / "t.tar")
    with pytest.raises(TarFormatError, match=rf"t.tar is truncated at byte {cut} \({where}\)"):
        list(tar_members(data[:cut], "t.tar"))


def test_bytes_that_are_not_a_header_are_named_with_their_offset(tmp_path: Path) -> None:
    data = bytearray(write_sample_tar(tmp_path / "t.tar"))
    data[512 * 3 : 512 * 4] = bytes(range(256)) * 2  # a.json's header overwritten
    with pytest.raises(TarFormatError, match="t.tar is damaged: the bytes at 1536 are not a tar header"):
        list(tar_members(bytes(data), "t.tar"))


def test_a_sample_without_its_json_member_is_named(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    path.write_bytes(tar_member_bytes("a.jpg", b"x") + tar_end())
    with pytest.raises(DataConfigError, match="t.tar: sample 'a' has no .json member"):
        list(tar_samples([{"url": str(path)}]))
