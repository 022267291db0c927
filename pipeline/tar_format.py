"""The tar format of our shards, read and written directly: fixed metadata, fast headers.

Python's ``tarfile`` spends ~80-100 us per member building or parsing a header, as much as encoding
or decoding a small JPEG; our shards need one layout only (GNU tar: regular files, ``././@LongLink``
for names over 100 bytes, mtime 0, uid/gid 0, mode 0644), so both directions are a few slices here.
GNU tar, Python's ``tarfile`` and ``webdataset`` read what :func:`tar_member_bytes` writes (tested).
Where an index (the shards' manifest) says where members lie, :func:`members_at` reads all their headers at once.
"""

from __future__ import annotations

import mmap
from typing import Iterator

import numpy as np

TAR_BLOCK = 512
TarBytes = bytes | bytearray | mmap.mmap  # a whole tar in memory, or mapped
_GNU_MAGIC = b"ustar  \0"
_MAGICS = (_GNU_MAGIC[:6], b"ustar\0")  # GNU and POSIX (ustar, pax) headers; a slice compare, not a checksum
_LONG_NAME = b"././@LongLink"
# Columns of a header that :func:`members_at` reads: name, the 11 octal digits of the size, type flag, magic.
_HEADER_FIELDS = np.r_[0:100, 124:135, 156, 257:263]
_OCTAL_PLACES = 8 ** np.arange(10, -1, -1, dtype=np.int64)
_MAGIC_ROWS = np.array([list(magic) for magic in _MAGICS], dtype=np.uint8)


# The header fields that are the same in every member; a header is the name, size and type flag set among
# them, and its checksum their byte sum plus this constant (a quarter of the cost of building and summing 512 bytes).
_MODE_AND_OWNER = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_MTIME = b"00000000000\0"  # mtime 0: same input, same bytes
_CHECKSUM_AS_SPACES = b" " * 8  # the checksum field counts as spaces while summing
_AFTER_KIND = b"\0" * 100 + _GNU_MAGIC + b"\0" * (TAR_BLOCK - 265)  # link name, magic, owner names etc. empty
_FIXED_SUM = sum(_MODE_AND_OWNER) + sum(_MTIME) + sum(_CHECKSUM_AS_SPACES) + sum(_AFTER_KIND)


def _header(name: bytes, size: int, kind: bytes) -> bytes:
    name_field = name[:100].ljust(100, b"\0")
    size_field = b"%011o\0" % size
    checksum = b"%06o\0 " % (_FIXED_SUM + sum(name_field) + sum(size_field) + kind[0])
    return b"".join((name_field, _MODE_AND_OWNER, size_field, _MTIME, checksum, kind, _AFTER_KIND))


def _padding(size: int) -> bytes:
    return b"\0" * (-size % TAR_BLOCK)


def tar_member_bytes(name: str, payload: bytes) -> bytes:
    """One regular-file member: header(s), payload, padding to the block size."""
    encoded = name.encode()
    parts = []
    if len(encoded) > 100:
        parts += [_header(_LONG_NAME, len(encoded) + 1, b"L"), encoded + b"\0", _padding(len(encoded) + 1)]
    parts += [_header(encoded, len(payload), b"0"), payload, _padding(len(payload))]
    return b"".join(parts)


def tar_end() -> bytes:
    """The end-of-archive marker: two zero blocks (then GNU tar's 10 KiB record padding is optional)."""
    return b"\0" * (2 * TAR_BLOCK)


class TarFormatError(ValueError):
    """A shard whose bytes are not a complete tar: truncated, or damaged where a header should be."""


def member_at(data: TarBytes, offset: int, url: str) -> tuple[str, int, int, int] | None:
    """The first regular file whose header (or GNU long-name header) starts at ``offset``: (name, payload start,
    payload size, offset of the next header); None at the end-of-archive blocks.

    Python's ``tarfile`` spends ~100 us per member parsing headers, more than decoding a 64 px JPEG;
    reading the headers' fixed fields directly is ~20x faster (bench/loader_throughput.py). A tar that
    ends before its end-of-archive blocks, or a block without the ustar magic where a header should be,
    raises :class:`TarFormatError` naming the file and the byte offset.
    """
    long_name = None
    while True:
        if offset + TAR_BLOCK > len(data):
            where = "before the end-of-archive marker" if offset == len(data) else f"inside the header at byte {offset}"
            raise TarFormatError(f"{url} is truncated at byte {len(data)} ({where})")
        header = data[offset : offset + TAR_BLOCK]
        if header[257:263] not in _MAGICS:
            if not header.strip(b"\0"):
                return None  # end-of-archive blocks
            raise TarFormatError(f"{url} is damaged: the bytes at {offset} are not a tar header (no ustar magic)")
        size_field = header[124:136].split(b"\0", 1)[0].strip()
        size = int(size_field, 8) if size_field else 0
        kind = header[156:157]
        start = offset + TAR_BLOCK
        end = start + size
        if end > len(data):
            raise TarFormatError(f"{url} is truncated at byte {len(data)} "
                                 f"(the member at byte {offset} needs {size} bytes)")
        offset = start + -(-size // TAR_BLOCK) * TAR_BLOCK
        if kind == b"L":  # GNU long name: the next member's name is this payload
            long_name = bytes(data[start:end]).split(b"\0", 1)[0].decode()
            continue
        if kind not in (b"0", b"\0"):
            continue  # directories, pax headers, links
        name = long_name or header[0:100].split(b"\0", 1)[0].decode()
        prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" and not long_name else b""
        return (f"{prefix.decode()}/{name}" if prefix else name), start, size, offset


def tar_members(data: TarBytes, url: str) -> Iterator[tuple[str, bytes]]:
    """(name, payload) of every regular file in an in-memory tar (ustar, GNU long names, pax skipped), read
    header by header with :func:`member_at` (whose errors it raises)."""
    offset = 0
    while (member := member_at(data, offset, url)) is not None:
        name, start, size, offset = member
        yield name, bytes(data[start : start + size])


def members_at(data: TarBytes, offsets: np.ndarray,
               names: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(payload start, payload size, found) of the members whose headers an index places at ``offsets``, all read
    at once: found where the block there is a regular-file header (GNU or ustar magic) named ``names`` (bytes),
    with an octal size whose payload lies inside ``data``. Where not (GNU long names, or a tar that changed after
    it was indexed) the caller walks the members with :func:`member_at`, which names what is wrong."""
    octets = np.frombuffer(data, dtype=np.uint8)
    starts = offsets + TAR_BLOCK
    if len(octets) < TAR_BLOCK:
        return starts, np.zeros_like(offsets), np.zeros(len(offsets), dtype=bool)
    inside = starts <= len(octets)
    fields = octets[np.where(inside, offsets, 0)[:, None] + _HEADER_FIELDS]
    header_names = np.ascontiguousarray(fields[:, :100]).view("S100")[:, 0]
    digits = fields[:, 100:111].astype(np.int64) - ord("0")
    sizes = (digits * _OCTAL_PLACES).sum(axis=1)
    magic = fields[:, None, 112:118] == _MAGIC_ROWS
    found = (inside & (header_names == names) & np.isin(fields[:, 111], (ord("0"), 0))
             & magic.all(axis=2).any(axis=1) & ((digits >= 0) & (digits <= 7)).all(axis=1)
             & (starts + sizes <= len(octets)))
    return starts, sizes, found
