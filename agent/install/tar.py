"""A streaming tar reader for hostile layers: every header is bounded before a byte of it is kept.

Python's tarfile reads a PAX or GNU long-name header whole, at whatever size it declares,
before any cap can look at it (a 255 KiB layer declaring 1 GiB costs 1 GiB of memory). This
reader keeps at most MAX_EXT_HEADER_BYTES of header and one chunk of data in memory, reads
each byte of the stream once, and refuses what a driver image never needs (sparse files,
volume labels, multi-volume parts, global headers that rename members).

Formats read: POSIX ustar (name + prefix), pax ('x' and harmless 'g' records), GNU
('L'/'K' long names, base-256 sizes) and v7 headers. Every byte of the uncompressed stream,
trailing padding included, goes through `hasher`, so the caller can check a layer's diff_id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Protocol

from agent.errors import ImageRejected

BLOCK = 512
CHUNK_BYTES = 1 << 20
MAX_EXT_HEADER_BYTES = 64 << 10  # a pax or GNU long-name header; real ones are well under 1 KiB
MAX_NAME_BYTES = 4096  # PATH_MAX
MAX_SIZE_DIGITS = 20  # a pax size record longer than this is not a byte count
SPARSE_PREFIX = "GNU.sparse."

FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK_DEV, FIFO = "file", "dir", "symlink", "hardlink", "char", "block", "fifo"
_TYPES = {b"0": FILE, b"\0": FILE, b"7": FILE, b"1": HARDLINK, b"2": SYMLINK, b"3": CHAR, b"4": BLOCK_DEV,
          b"5": DIR, b"6": FIFO}
_REFUSED_TYPES = {b"S": "a GNU sparse file", b"V": "a GNU volume label", b"M": "a GNU multi-volume part",
                  b"N": "an old GNU long-name entry", b"D": "a GNU dump directory"}
_EXTENDED = (b"x", b"g", b"L", b"K")


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...


@dataclass(frozen=True)
class Member:
    """One entry of the archive, after its extended headers were applied."""

    name: str  # as written (pax path, GNU long name or ustar prefix/name), decoded with surrogateescape
    kind: str  # FILE, DIR, SYMLINK, HARDLINK, CHAR, BLOCK_DEV or FIFO
    mode: int
    size: int  # bytes of data that follow (FILE only; 0 for every other kind)
    linkname: str
    offset: int  # byte offset of the member's header in the uncompressed stream


class _Source:
    """The uncompressed stream in chunks: exact reads for headers, views of one chunk for data."""

    def __init__(self, raw: IO[bytes], hasher: Hasher | None) -> None:
        self._raw = raw
        self._hasher = hasher
        self._buf = memoryview(b"")
        self._pos = 0
        self.offset = 0  # bytes handed out so far

    def _fill(self) -> bool:
        chunk = self._raw.read(CHUNK_BYTES)
        if not chunk:
            return False
        if self._hasher is not None:
            self._hasher.update(chunk)
        self._buf, self._pos = memoryview(chunk), 0
        return True

    def take(self, limit: int) -> memoryview:
        """Up to `limit` bytes (at least one), or an empty view at the end of the stream."""
        if self._pos >= len(self._buf) and not self._fill():
            return memoryview(b"")
        view = self._buf[self._pos:self._pos + limit]
        self._pos += len(view)
        self.offset += len(view)
        return view

    def exact(self, n: int) -> bytes | None:
        """Exactly `n` bytes; None at a clean end of stream; ImageRejected if it ends inside them."""
        parts: list[bytes] = []
        got = 0
        while got < n:
            view = self.take(n - got)
            if not view:
                if got == 0:
                    return None
                raise ImageRejected(f"archive truncated at byte {self.offset}")
            parts.append(bytes(view))
            got += len(view)
        return b"".join(parts)

    def skip(self, n: int, what: str) -> None:
        while n > 0:
            view = self.take(n)
            if not view:
                raise ImageRejected(f"{what}: archive truncated at byte {self.offset}")
            n -= len(view)

    def drain(self, max_bytes: int | None = None) -> None:
        """Read to the end (padding after the end-of-archive blocks is part of the layer's digest), at most
        to `max_bytes` of the stream."""
        while self.take(CHUNK_BYTES):
            if max_bytes is not None and self.offset > max_bytes:
                raise ImageRejected(f"data after the end of the archive runs past byte {max_bytes}, the limit "
                                    "of what the layers may unpack to")


@dataclass(frozen=True)
class _Header:
    name: str
    mode: int
    size: int
    typeflag: bytes
    linkname: str


def _number(field: bytes, what: str) -> int:
    """An octal field (NUL/space padded) or GNU base-256 (high bit set); negative numbers are refused."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            raise ImageRejected(f"{what}: negative number in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.replace(b"\0", b" ").strip()
    if not text:
        return 0
    if not all(0x30 <= c <= 0x37 for c in text):
        raise ImageRejected(f"{what}: {bytes(field)!r} is not an octal number")
    return int(text, 8)


def _cstring(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def parse_header(block: bytes, offset: int) -> _Header | None:
    """One 512-byte header; None for an all-zero block (the end of the archive)."""
    if not any(block):
        return None
    raw_name = _cstring(block[0:100])
    where = f"tar header at byte {offset} ({_decode(raw_name)[:120]!r})"
    field = block[148:156]
    if not field.replace(b"\0", b" ").strip():  # GNU tar refuses a blank number too; every writer fills it in
        raise ImageRejected(f"{where}: no checksum (not a tar archive, or corrupt)")
    stored = _number(field, where)
    rest = block[:148] + block[156:]
    unsigned = sum(rest) + 8 * 0x20
    if stored != unsigned and stored != unsigned - 256 * sum(1 for b in rest if b > 127):  # old tars summed signed
        raise ImageRejected(f"{where}: bad checksum (not a tar archive, or corrupt)")
    magic = block[257:263]
    if magic == b"ustar\0":  # POSIX: a prefix field joins the name
        prefix = _cstring(block[345:500])
        if prefix:
            raw_name = prefix + b"/" + raw_name
    return _Header(name=_decode(raw_name), mode=_number(block[100:108], where) & 0o7777,
                   size=_number(block[124:136], where), typeflag=block[156:157],
                   linkname=_decode(_cstring(block[157:257])))


def parse_pax(data: bytes, where: str) -> dict[str, str]:
    """pax records `<length> <key>=<value>\\n`; each length is checked against the data it claims."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        if data[pos] == 0:  # NUL padding after the last record
            if any(data[pos:]):
                raise ImageRejected(f"{where}: data after the NUL padding of a pax header")
            break
        space = data.find(b" ", pos, pos + MAX_SIZE_DIGITS + 1)
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise ImageRejected(f"{where}: malformed pax record at offset {pos}")
        length = int(digits)
        end = pos + length
        if length <= len(digits) + 1 or end > len(data) or data[end - 1:end] != b"\n":
            raise ImageRejected(f"{where}: pax record at offset {pos} has a wrong length")
        key, sep, value = data[space + 1:end - 1].partition(b"=")
        if not sep or not key:
            raise ImageRejected(f"{where}: pax record at offset {pos} has no key=value")
        records[_decode(key)] = _decode(value)
        pos = end
    return records


class TarReader:
    """Iterate the members of a tar stream; read a FILE member's data with `data()` before the next.

    Data not read is skipped. Anything malformed or unsupported raises ImageRejected naming
    the member (or the header's byte offset when the member's name is not known yet).
    """

    def __init__(self, raw: IO[bytes], *, hasher: Hasher | None = None, max_bytes: int | None = None) -> None:
        self._src = _Source(raw, hasher)
        self._max_bytes = max_bytes  # what may follow the end-of-archive blocks is bounded too (a gzip bomb)
        self._left = 0  # unread data of the current member, then its padding
        self._pad = 0
        self._member: Member | None = None

    @property
    def offset(self) -> int:
        """Uncompressed bytes read so far."""
        return self._src.offset

    def __iter__(self) -> Iterator[Member]:
        pending: dict[str, str] = {}  # pax records and GNU long names for the next member
        pending_bytes = 0
        while True:
            self._finish_member()
            offset = self._src.offset
            block = self._src.exact(BLOCK)
            if block is None:  # a clean end without end-of-archive blocks, as tar accepts
                if pending:
                    raise ImageRejected(f"archive ends after an extended header at byte {offset}")
                return
            header = parse_header(block, offset)
            if header is None:
                if pending:
                    raise ImageRejected(f"archive ends after an extended header at byte {offset}")
                self._src.drain(self._max_bytes)
                return
            where = f"{header.name[:200]!r} (tar header at byte {offset})"
            if header.typeflag in _EXTENDED:
                pending_bytes += header.size
                if header.size > MAX_EXT_HEADER_BYTES or pending_bytes > MAX_EXT_HEADER_BYTES:
                    raise ImageRejected(f"{where}: extended header of {header.size} bytes; "
                                        f"more than {MAX_EXT_HEADER_BYTES} is not a driver image")
                data = self._src.exact(_padded(header.size))
                if data is None:
                    raise ImageRejected(f"{where}: archive truncated inside an extended header")
                self._extended(header, data[:header.size], pending, where)
                continue
            member = self._member_from(header, pending, offset)
            pending, pending_bytes = {}, 0
            self._member = member
            self._left, self._pad = member.size, _padded(member.size) - member.size
            yield member

    def data(self) -> Iterator[memoryview]:
        """The current FILE member's data, in views valid until the next iteration step."""
        member = self._member
        while self._left > 0:
            view = self._src.take(min(self._left, CHUNK_BYTES))
            if not view:
                name = member.name if member else "?"
                raise ImageRejected(f"{name[:200]!r}: archive truncated inside the file's data")
            self._left -= len(view)
            yield view

    def _finish_member(self) -> None:
        if self._member is not None:
            self._src.skip(self._left + self._pad, repr(self._member.name[:200]))
            self._left = self._pad = 0
            self._member = None

    def _extended(self, header: _Header, data: bytes, pending: dict[str, str], where: str) -> None:
        if header.typeflag in (b"L", b"K"):
            pending["path" if header.typeflag == b"L" else "linkpath"] = _decode(_cstring(data))
            return
        records = parse_pax(data, where)
        if any(k.startswith(SPARSE_PREFIX) for k in records):
            raise ImageRejected(f"{where}: GNU sparse files are not supported in a driver image")
        if header.typeflag == b"g":
            moving = sorted({"path", "linkpath", "size"} & set(records))
            if moving:
                raise ImageRejected(f"{where}: a global pax header sets {', '.join(moving)} for every member")
            return  # comments, mtimes and the like apply to nothing the agent keeps
        for key in ("path", "linkpath"):
            if key in records:
                pending[key] = records[key]  # checked with the member it names (_member_from)
        if "size" in records:
            size = records["size"]
            if not (size.isdigit() and size.isascii()) or len(size) > MAX_SIZE_DIGITS:
                raise ImageRejected(f"{where}: pax size {size[:40]!r} is not a byte count")
            pending["size"] = size

    def _member_from(self, header: _Header, pending: dict[str, str], offset: int) -> Member:
        name = pending.get("path", header.name)
        linkname = pending.get("linkpath", header.linkname)
        size = int(pending["size"]) if "size" in pending else header.size
        where = f"{name[:200]!r} (tar header at byte {offset})"
        for what, value in (("name", name), ("link target", linkname)):
            length = len(value.encode("utf-8", "surrogateescape"))
            if "\0" in value or length > MAX_NAME_BYTES:
                problem = "holds NUL" if "\0" in value else f"is {length} bytes, longer than {MAX_NAME_BYTES}"
                raise ImageRejected(f"{where}: its {what} {problem}")
        if header.typeflag in _REFUSED_TYPES:
            raise ImageRejected(f"{where}: {_REFUSED_TYPES[header.typeflag]} is not supported in a driver image")
        kind = _TYPES.get(header.typeflag)
        if kind is None:
            raise ImageRejected(f"{where}: unknown tar entry type {header.typeflag!r}")
        if kind == FILE and header.typeflag == b"\0" and name.endswith("/"):
            kind = DIR  # old tars mark directories only by the trailing slash
        if kind != FILE and size != 0:
            raise ImageRejected(f"{where}: a {kind} entry that claims {size} bytes of data")
        return Member(name=name, kind=kind, mode=header.mode, size=size, linkname=linkname, offset=offset)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK
