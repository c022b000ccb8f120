"""The streaming tar reader: real archives from tarfile and GNU tar read right, hostile headers refused early."""

from __future__ import annotations

import hashlib
import io
import tarfile
from typing import IO

import pytest

from agent.errors import ImageRejected
from agent.install.tar import (
    DIR,
    FILE,
    HARDLINK,
    MAX_EXT_HEADER_BYTES,
    SYMLINK,
    Member,
    TarReader,
    parse_header,
    parse_pax,
)


def archive(fmt: int, *entries: tuple[str, str, bytes | str]) -> bytes:
    """An archive written by Python's tarfile in format `fmt` (kind: file, dir, symlink, link)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            if kind == "file":
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "link": tarfile.LNKTYPE}[kind]
            info.linkname = str(payload)
            tar.addfile(info)
    return out.getvalue()


def read_all(data: bytes | IO[bytes]) -> list[tuple[Member, bytes]]:
    reader = TarReader(io.BytesIO(data) if isinstance(data, bytes) else data)
    return [(m, b"".join(bytes(v) for v in reader.data())) for m in reader]


LONG = "nvidia-driver/" + "/".join(["d" * 60] * 4) + "/libcuda.so.535.261.03"  # 261 bytes: past ustar's 100+155


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_reads_what_tarfile_writes_in_every_format(fmt: int) -> None:
    """Names (long ones through the ustar prefix, GNU 'L' or pax 'path'), kinds, link targets and data."""
    name = "nvidia-driver/lib64/x" if fmt == tarfile.USTAR_FORMAT else LONG
    data = archive(fmt, ("nvidia-driver/", "dir", ""), (name, "file", b"\x7fELF" * 1000),
                   ("nvidia-driver/lib64/x.1", "symlink", "x"), ("nvidia-driver/y", "link", name))
    got = read_all(data)
    assert [(m.name.rstrip("/"), m.kind, m.linkname, payload[:4]) for m, payload in got] == [
        ("nvidia-driver", DIR, "", b""), (name, FILE, "", b"\x7fELF"),
        ("nvidia-driver/lib64/x.1", SYMLINK, "x", b""), ("nvidia-driver/y", HARDLINK, name, b"")]
    assert len(got[1][1]) == 4000


def test_every_byte_goes_through_the_hasher_padding_included() -> None:
    """The digest of the stream the reader saw equals the layer's diff_id (sha256 of the whole tar)."""
    data = archive(tarfile.PAX_FORMAT, ("a", "file", b"x" * 5000)) + b"\0" * 4096  # trailing record padding
    hasher = hashlib.sha256()
    reader = TarReader(io.BytesIO(data), hasher=hasher)
    assert [m.name for m in reader] == ["a"]  # data not read: skipped, still hashed
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_what_follows_the_end_of_the_archive_is_bounded_too() -> None:
    """Padding after the end-of-archive blocks is read (it is part of the diff_id), but not without end: a
    stream that goes on past the layers' budget there (a gzip bomb after the archive) is refused."""
    data = archive(tarfile.PAX_FORMAT, ("a", "file", b"x"))
    assert [m.name for m in TarReader(io.BytesIO(data + bytes(8192)), max_bytes=len(data) + 8192)] == ["a"]
    with pytest.raises(ImageRejected, match="after the end of the archive runs past byte"):
        list(TarReader(io.BytesIO(data + bytes(3 << 20)), max_bytes=len(data) + (1 << 20)))


def header(name: bytes = b"f", size: bytes = b"00000000000", typeflag: bytes = b"0", *,
           checksum: bytes | None = None) -> bytes:
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:124 + len(size)] = size
    block[156:157] = typeflag
    block[257:263] = b"ustar\0"
    block[263:265] = b"00"
    block[148:156] = b" " * 8
    block[148:156] = checksum if checksum is not None else b"%06o\0 " % sum(block)
    return bytes(block)


def test_gnu_base_256_sizes_are_read_and_negative_ones_refused() -> None:
    """GNU writes sizes past 8 GiB in base 256 (high bit set); a negative one is nonsense."""
    big = bytes([0x80]) + (9 << 30).to_bytes(11, "big")
    parsed = parse_header(header(size=big), 0)
    assert parsed is not None and parsed.size == 9 << 30
    with pytest.raises(ImageRejected, match="negative number"):
        parse_header(header(size=b"\xff" * 12), 0)


@pytest.mark.parametrize(("block", "message"), [
    (header(checksum=b"0000001\0"), "bad checksum"),
    # garbage whose signed byte sum is exactly 0 "matches" a blank checksum field (found by the fuzz suite)
    (b"\x06\x0f\x0f\x10\x15\x18&\x93\x9b\xa0\xab".ljust(512, b"\0"), "no checksum"),
    (header(checksum=b" " * 8), "no checksum"),
    (header(size=b"0000000009x"), "not an octal number"),
])
def test_malformed_headers_are_refused_naming_the_offset(block: bytes, message: str) -> None:
    """A header that does not add up is an image problem, reported with where it was."""
    with pytest.raises(ImageRejected, match=f"byte 1024.*{message}"):
        parse_header(block, 1024)


@pytest.mark.parametrize(("records", "message"), [
    (b"30 path=short\n", "wrong length"),
    (b"9999999999999999999999 path=x\n", "malformed pax record"),
    (b"11 path=ab\nxx", "malformed pax record"),
    (b"8 nokey\n", "no key=value"),
    (b"7 =abc\n", "no key=value"),
])
def test_pax_records_that_lie_about_their_length_are_refused(records: bytes, message: str) -> None:
    """Every record's length prefix is checked against the bytes it claims."""
    with pytest.raises(ImageRejected, match=message):
        parse_pax(records, "hdr")


def test_pax_records_parse() -> None:
    """Lengths count the whole record, digits and newline included; NUL padding ends the header."""
    assert parse_pax(b"17 path=a/b/c.so\n11 size=42\n\0\0", "hdr") == {"path": "a/b/c.so", "size": "42"}


def extended(typeflag: bytes, declared: int, body: bytes = b"") -> bytes:
    """An extended header that declares `declared` bytes, followed by `body` (maybe far less)."""
    size = bytes([0x80]) + declared.to_bytes(11, "big")
    return header(b"././@LongLink", size=size, typeflag=typeflag) + body


@pytest.mark.parametrize("typeflag", [b"x", b"g", b"L", b"K"])
def test_a_huge_extended_header_is_refused_before_it_is_read(typeflag: bytes) -> None:
    """A header declaring 1 GiB is refused from its size alone: nothing of it is read or kept."""

    class Counting(io.BytesIO):
        read_bytes = 0

        def read(self, size: int | None = -1) -> bytes:
            chunk = super().read(size)
            Counting.read_bytes += len(chunk)
            return chunk

    stream = Counting(extended(typeflag, 1 << 30, b"A" * 65536))
    with pytest.raises(ImageRejected, match="extended header of 1073741824 bytes"):
        list(TarReader(stream))
    assert Counting.read_bytes <= 512 + 65536  # the first read is one chunk at most; nothing more


def test_extended_headers_together_are_capped_too() -> None:
    """Many small pax headers in a row cannot add up to more than one may be."""
    record = b"3011 comment=" + b"c" * 2997 + b"\n"
    assert len(record) == 3011  # a well-formed record, its length counting itself
    pax = header(b"PaxHeader/x", size=b"%011o" % len(record), typeflag=b"x") + record.ljust(3072, b"\0")
    stream = pax * (MAX_EXT_HEADER_BYTES // 3000 + 2)
    with pytest.raises(ImageRejected, match="extended header"):
        list(TarReader(io.BytesIO(stream)))


def test_global_headers_may_not_rename_members() -> None:
    """A pax 'g' header with a comment (git archive writes one) is fine; one that sets a path is not."""
    ok = archive(tarfile.PAX_FORMAT, ("a", "file", b"1"))
    record = b"14 comment=hi\n"
    g = header(b"pax_global_header", size=b"%011o" % len(record), typeflag=b"g") + record.ljust(512, b"\0")
    assert [m.name for m, _ in read_all(g + ok)] == ["a"]
    record = b"15 path=/etc/x\n"
    g = header(b"pax_global_header", size=b"%011o" % len(record), typeflag=b"g") + record.ljust(512, b"\0")
    with pytest.raises(ImageRejected, match="global pax header sets path"):
        read_all(g + ok)


@pytest.mark.parametrize(("typeflag", "message"), [
    (b"S", "GNU sparse file"), (b"V", "volume label"), (b"M", "multi-volume"), (b"N", "old GNU long-name"),
    (b"D", "dump directory"), (b"Z", "unknown tar entry type"),
])
def test_entry_types_a_driver_never_needs_are_refused(typeflag: bytes, message: str) -> None:
    """Sparse files, volume labels, multi-volume parts and unknown types are refused, naming the entry."""
    with pytest.raises(ImageRejected, match=f"'f'.*{message}"):
        read_all(header(typeflag=typeflag) + b"\0" * 1024)


def test_data_on_an_entry_that_carries_none_is_refused() -> None:
    """A symlink that claims data would make everything after it read as headers by other readers."""
    with pytest.raises(ImageRejected, match="symlink entry that claims 512 bytes"):
        read_all(header(typeflag=b"2", size=b"00000001000") + b"\0" * 1536)


@pytest.mark.parametrize("cut", [100, 512 + 100, 1024 + 10])
def test_truncated_archives_are_refused(cut: int) -> None:
    """An archive that ends inside a header or a file's data is refused, not half-applied."""
    data = archive(tarfile.USTAR_FORMAT, ("a", "file", b"x" * 2000))
    with pytest.raises(ImageRejected, match="truncated"):
        read_all(data[:cut])


def test_an_archive_without_end_blocks_ends_at_a_header_boundary() -> None:
    """Like tar, a stream that stops cleanly after a member (no zero blocks) is complete."""
    data = archive(tarfile.USTAR_FORMAT, ("a", "file", b"x" * 10))
    assert [m.name for m, _ in read_all(data[:1024])] == ["a"]


def test_old_style_directories_are_known_by_their_slash() -> None:
    """A regular-file entry ('\\0') whose name ends in '/' is a directory, as old tars wrote them."""
    assert [(m.name, m.kind) for m, _ in read_all(header(b"d/", typeflag=b"\0") + b"\0" * 1024)] == [("d/", DIR)]
