"""``list_files``: which entries of a folder tree count as files, in which order, and what an unreadable folder does."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pipeline.sources.base import SourceListing, list_files
from pipeline.sources.utkface import list_utkface
from tests.conftest import write_face_jpeg


def make_tree(root: Path) -> Path:
    """Regular files at three depths, names that sort differently as paths and as strings, and every kind of
    entry that is not a regular file."""
    for relative in ("b.jpg", "a/z.jpg", "a/b/c.jpg", "a-b/x.jpg", "a.b/y.jpg", "A/upper.jpg"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")
    outside = root.parent / "outside"
    outside.mkdir()
    (outside / "hidden.jpg").write_bytes(b"x")
    (root / "link-to-file.jpg").symlink_to(root / "b.jpg")
    (root / "broken-link.jpg").symlink_to(root / "missing.jpg")
    (root / "linked-folder").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "a" / "fifo.jpg")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(root / "sock.jpg"))
    server.close()
    return root


def test_regular_files_and_links_to_them_in_pathlib_order(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    files = list_files(root, SourceListing("x"))
    assert [path.relative_to(root).as_posix() for path in files] == [
        "A/upper.jpg", "a/b/c.jpg", "a/z.jpg", "a-b/x.jpg", "a.b/y.jpg", "b.jpg", "link-to-file.jpg"]
    # the same as the pathlib spelling it replaces, stat per file and all
    assert files == sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.parts)


def test_not_recursive_lists_only_the_folder_itself(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "tree")
    assert [path.name for path in list_files(root, SourceListing("x"), recursive=False)] == [
        "b.jpg", "link-to-file.jpg"]


def test_an_unreadable_folder_is_rejected_and_the_rest_listed(tmp_path: Path, monkeypatch) -> None:
    root = make_tree(tmp_path / "tree")
    unreadable = root / "a"
    real_scandir = os.scandir

    def scandir(path="."):  # root reads every folder whatever its mode, so the refusal is simulated
        if not isinstance(path, int) and Path(path) == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    listing = SourceListing("x")
    files = list_files(root, listing)
    assert [path.relative_to(root).as_posix() for path in files] == [
        "A/upper.jpg", "a-b/x.jpg", "a.b/y.jpg", "b.jpg", "link-to-file.jpg"]
    assert [(r.source_id, r.reason) for r in listing.rejections] == [
        (str(unreadable), "cannot read this folder: Permission denied")]


def test_utkface_reports_split_csv_rows_whose_image_is_not_a_file(tmp_path: Path) -> None:
    root = tmp_path / "UTKFace"
    write_face_jpeg(root / "30_0_1_20170101000000001.jpg.chip.jpg", 1)
    (root / "31_1_2_20170101000000002.jpg.chip.jpg").mkdir()  # a folder with an image's name is not the image
    csv_dir = tmp_path / "coral"
    csv_dir.mkdir()
    (csv_dir / "utk_train.csv").write_text("file,age\n30_0_1_20170101000000001.jpg.chip.jpg,9\n")
    (csv_dir / "utk_test.csv").write_text("file,age\n31_1_2_20170101000000002.jpg.chip.jpg,10\n")
    listing = list_utkface(root, csv_dir)
    assert [record.key for record in listing.records] == ["30_0_1_20170101000000001"]
    assert [r.reason for r in listing.rejections] == ["listed in the split csv, image not found"]
    assert listing.rejections[0].source_id.endswith("utk_test.csv:31_1_2_20170101000000002.jpg.chip.jpg")


@pytest.mark.parametrize("recursive", [True, False])
def test_an_empty_folder_lists_nothing(tmp_path: Path, recursive: bool) -> None:
    listing = SourceListing("x")
    assert list_files(tmp_path, listing, recursive=recursive) == [] and listing.rejections == []
