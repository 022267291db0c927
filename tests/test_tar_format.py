"""Our tar writer and reader against the reference implementations: GNU tar, tarfile, webdataset."""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import webdataset as wds

from pipeline.data import tar_samples
from pipeline.tar_format import tar_end, tar_member_bytes, tar_members

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


def test_reader_agrees_with_tarfile_on_tarfiles_own_output(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, payload in MEMBERS:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert list(tar_members(buffer.getvalue(), "t.tar")) == MEMBERS


def test_reader_groups_samples_and_names_a_truncated_shard(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    data = write_tar(path)
    assert [s["__key__"] for s in tar_samples([{"url": str(path)}])] == ["a", "k" * 150, "b"]
    path.write_bytes(data[:1000])
    with pytest.raises(ValueError, match="t.tar: truncated tar"):
        list(tar_samples([{"url": str(path)}]))
