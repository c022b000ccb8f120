"""A byte-level tar writer for hostile layers: any header, valid or not, without Python's tarfile.

`Header` holds every field of a 512-byte ustar/GNU header; each numeric field is an int
(written as NUL-terminated octal, or GNU base-256 when it does not fit or when asked) or raw
bytes (written as given, NUL-padded or cut to the field's width). The checksum is computed
unless given. `TarWriter` appends headers, data, extended headers (pax 'x'/'g', GNU 'L'/'K')
and end blocks to one buffer and records where each member lies (`Span`), so a test knows
whether a cut falls inside a member. Nothing here checks anything: a name may hold NUL, a
size may lie, a pax record may misstate its own length.

    w = TarWriter()
    w.file(b"nvidia-driver/x", b"data", mode=0o4755)
    w.pax([pax_record(b"path", b"nvidia-driver/big")], declared_size=1 << 30)
    layer = gzip_bytes(w.getvalue())
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

BLOCK = 512
RECORD = 20 * BLOCK  # tar's default blocking factor pads archives to 10 KiB
USTAR_MAGIC = b"ustar\x00"  # POSIX ustar and pax, followed by version b"00"
USTAR_VERSION = b"00"
GNU_MAGIC = b"ustar "  # old GNU tar, followed by version b" \x00" ("ustar  \0" together)
GNU_VERSION = b" \x00"
V7_MAGIC = b""  # pre-POSIX: no magic at all, so no prefix field either

# (offset, width) of every header field.
FIELDS: dict[str, tuple[int, int]] = {
    "name": (0, 100), "mode": (100, 8), "uid": (108, 8), "gid": (116, 8), "size": (124, 12),
    "mtime": (136, 12), "checksum": (148, 8), "typeflag": (156, 1), "linkname": (157, 100),
    "magic": (257, 6), "version": (263, 2), "uname": (265, 32), "gname": (297, 32),
    "devmajor": (329, 8), "devminor": (337, 8), "prefix": (345, 155), "pad": (500, 12),
}
# Every typeflag a reader may meet: POSIX, pax, GNU, and old/odd ones.
TYPEFLAGS = (b"0", b"\x00", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"x", b"g", b"L", b"K",
             b"S", b"V", b"M", b"N", b"D", b"A", b"X", b"I")

Num = int | bytes


def octal(value: int, width: int) -> bytes:
    """`value` as zero-padded octal digits and a NUL in `width` bytes (too many digits are cut on the left)."""
    digits = format(value, "o").encode()
    return digits.rjust(width - 1, b"0")[-(width - 1):] + b"\x00"


def base256(value: int, width: int) -> bytes:
    """GNU base-256: first byte 0x80 (or 0xff for a negative value), then big-endian two's complement."""
    raw = (value % (1 << (8 * width))).to_bytes(width, "big")
    return bytes([0xFF if value < 0 else 0x80 | (raw[0] & 0x7F)]) + raw[1:]


def fits_octal(value: int, width: int) -> bool:
    """Whether `value` fits the octal form of a `width`-byte field (digits plus a NUL)."""
    return 0 <= value < 8 ** (width - 1)


def encode_field(value: Num | None, width: int, *, force_base256: bool = False) -> bytes:
    """A field's bytes: raw bytes NUL-padded/cut to `width`, an int as octal or base-256, None as NULs."""
    if value is None:
        return b"\x00" * width
    if isinstance(value, bytes):
        return value[:width].ljust(width, b"\x00")
    if force_base256 or not fits_octal(value, width):
        return base256(value, width)
    return octal(value, width)


@dataclass
class Header:
    """Every field of one 512-byte header; ints are encoded, bytes are written as they are."""

    name: bytes = b""
    mode: Num = 0o644
    uid: Num = 0
    gid: Num = 0
    size: Num = 0
    mtime: Num = 0
    typeflag: bytes = b"0"
    linkname: bytes = b""
    magic: bytes = USTAR_MAGIC
    version: bytes = USTAR_VERSION
    uname: bytes = b"root"
    gname: bytes = b"root"
    devmajor: Num = 0
    devminor: Num = 0
    prefix: bytes = b""  # ustar prefix; in GNU headers this area holds atime/ctime/sparse map
    pad: bytes = b""
    checksum: Num | None = None  # None: the correct one; an int is stored as octal; bytes as given
    bad_checksum: bool = False  # store a checksum that neither the unsigned nor the signed sum matches
    size_base256: bool = False  # write the size in base-256 even when octal would do


def checksum(block: bytes) -> int:
    """The unsigned tar checksum of a 512-byte block, counting the checksum field as 8 spaces."""
    return sum(block[:148]) + 8 * 0x20 + sum(block[156:BLOCK])


def signed_checksum(block: bytes) -> int:
    """The checksum old tars computed with signed chars (readers accept either)."""
    return sum((b - 256 if b > 127 else b) for b in block[:148] + b" " * 8 + block[156:BLOCK])


def encode_header(h: Header) -> bytes:
    """The 512 bytes of `h`, with the correct checksum unless `h.checksum` says otherwise."""
    block = bytearray(BLOCK)
    for name, (offset, width) in FIELDS.items():
        if name == "checksum":
            continue
        value = getattr(h, name)
        block[offset:offset + width] = encode_field(value, width, force_base256=name == "size" and h.size_base256)
    if h.bad_checksum:
        block[148:156] = b"%06o\x00 " % _wrong_checksum(bytes(block))
    elif h.checksum is None:
        block[148:156] = b"%06o\x00 " % checksum(bytes(block))
    else:
        block[148:156] = encode_field(h.checksum, 8) if isinstance(h.checksum, bytes) else octal(h.checksum, 8)
    return bytes(block)


def _wrong_checksum(block: bytes) -> int:
    """A checksum for `block` that neither the unsigned nor the signed sum matches."""
    bad = (checksum(block) + 1) % (8 ** 6)
    while bad in (checksum(block), signed_checksum(block) % (8 ** 6)):
        bad = (bad + 1) % (8 ** 6)
    return bad


def padding(n: int) -> bytes:
    """The NULs that pad `n` bytes of data to a whole number of blocks."""
    return b"\x00" * (-n % BLOCK)


def pax_record(key: bytes, value: bytes, *, length: Num | None = None) -> bytes:
    """One pax record `<len> key=value\\n` with its true length, or `length` (an int or raw digits) to lie."""
    body = b" " + key + b"=" + value + b"\n"
    if length is None:
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        return str(n).encode() + body
    return (length if isinstance(length, bytes) else str(length).encode()) + body


def pax_data(records: dict[bytes, bytes] | Iterable[bytes]) -> bytes:
    """The data of a pax header from a key->value mapping (true lengths) or from ready-made records."""
    if isinstance(records, dict):
        return b"".join(pax_record(k, v) for k, v in records.items())
    return b"".join(records)


def gnu_sparse_area(chunks: Sequence[tuple[int, int]], realsize: int, *, extended: bool = False) -> bytes:
    """The 155 bytes an old GNU 'S' header keeps after devminor: up to 4 (offset, numbytes) and the real size."""
    area = bytearray(155)  # atime 12, ctime 12, offset 12, longnames 4, unused 1: left as NULs
    for i, (off, num) in enumerate(chunks[:4]):
        at = 41 + 24 * i
        area[at:at + 12] = encode_field(off, 12)
        area[at + 12:at + 24] = encode_field(num, 12)
    area[137] = 1 if extended else 0
    area[138:150] = encode_field(realsize, 12)
    return bytes(area)


@dataclass
class Span:
    """Where one member lies in the stream: its first header, its data, and the end of its padding."""

    label: str
    start: int
    data_start: int
    end: int


@dataclass
class TarWriter:
    """Appends raw pieces of an archive to one buffer; records a `Span` per member written with `member`."""

    buf: bytearray = field(default_factory=bytearray)
    spans: list[Span] = field(default_factory=list)

    @property
    def offset(self) -> int:
        """How many bytes were written so far."""
        return len(self.buf)

    def raw(self, data: bytes) -> TarWriter:
        """Append bytes as they are (garbage, a lone zero block, half a header...)."""
        self.buf += data
        return self

    def header(self, h: Header) -> TarWriter:
        """Append one header block."""
        self.buf += encode_header(h)
        return self

    def data(self, content: bytes, *, pad: bool = True) -> TarWriter:
        """Append member data, padded to the block size unless pad=False."""
        self.buf += content
        if pad:
            self.buf += padding(len(content))
        return self

    def member(self, h: Header, content: bytes = b"", *, extended: Sequence[Header | bytes] = (),
               label: str = "") -> Span:
        """Append extended headers, a header (its size as given: it may lie) and its data; return its span."""
        start = self.offset
        for piece in extended:
            self.buf += encode_header(piece) if isinstance(piece, Header) else piece
        self.header(h)
        data_start = self.offset
        self.data(content)
        span = Span(label or h.name.decode("utf-8", "surrogateescape"), start, data_start, self.offset)
        self.spans.append(span)
        return span

    def pax(self, records: dict[bytes, bytes] | Iterable[bytes], *, glob: bool = False,
            declared_size: int | None = None, name: bytes = b"./PaxHeaders/x", **fields: object) -> TarWriter:
        """Append a pax header ('x', or 'g' with glob=True) whose size is the data's or `declared_size`."""
        self.buf += pax_block(records, glob=glob, declared_size=declared_size, name=name, **fields)
        return self

    def gnu_long(self, kind: bytes, value: bytes, *, declared_size: int | None = None, **fields: object) -> TarWriter:
        """Append a GNU long name ('L') or long link ('K') entry carrying `value` (NUL-terminated)."""
        self.buf += gnu_long_block(kind, value, declared_size=declared_size, **fields)
        return self

    def entry(self, name: bytes, typeflag: bytes = b"0", content: bytes = b"", *, long: str = "pax",
              linkname: bytes = b"", long_link: str = "pax", declared_size: int | None = None,
              pax_records: Sequence[bytes] = (), label: str = "", **fields: object) -> Span:
        """One member of any type; a long name goes in `long` (pax/gnu/ustar split/cut), a long link in `long_link`."""
        extended: list[bytes] = []
        records: dict[bytes, bytes] = {}
        head_name, prefix = name, fields.pop("prefix", b"")
        if len(name) > 100:
            cut = name.find(b"/", len(name) - 101)
            if long == "ustar" and cut > 0:
                prefix, head_name = name[:cut], name[cut + 1:]
            elif long == "gnu":
                extended.append(gnu_long_block(b"L", name))
                head_name = name[:100]
            elif long == "pax":
                records[b"path"] = name
                head_name = name[:100]
            else:
                head_name = name[:100]
        head_link = linkname
        if len(linkname) > 100:
            if long_link == "gnu":
                extended.append(gnu_long_block(b"K", linkname))
            elif long_link == "pax":
                records[b"linkpath"] = linkname
            head_link = linkname[:100]
        if records or pax_records:
            extended.insert(0, pax_block([*pax_records, *(pax_record(k, v) for k, v in records.items())]))
        size = len(content) if declared_size is None else declared_size
        h = Header(name=head_name, typeflag=typeflag, linkname=head_link, size=size,
                   prefix=prefix, **fields)
        return self.member(h, content, extended=extended, label=label or name.decode("utf-8", "surrogateescape"))

    def file(self, name: bytes, content: bytes = b"", *, mode: Num = 0o644, **kw: object) -> Span:
        """A regular file ('0')."""
        return self.entry(name, b"0", content, mode=mode, **kw)

    def dir(self, name: bytes, *, mode: Num = 0o755, **kw: object) -> Span:
        """A directory ('5')."""
        return self.entry(name, b"5", mode=mode, **kw)

    def symlink(self, name: bytes, target: bytes, **kw: object) -> Span:
        """A symbolic link ('2') to `target`."""
        return self.entry(name, b"2", linkname=target, mode=kw.pop("mode", 0o777), **kw)

    def hardlink(self, name: bytes, target: bytes, **kw: object) -> Span:
        """A hard link ('1') to the member named `target`."""
        return self.entry(name, b"1", linkname=target, **kw)

    def end(self, blocks: int = 2, *, record: int = 0) -> TarWriter:
        """Append end-of-archive zero blocks, then pad with zeros to a multiple of `record` bytes if given."""
        self.buf += b"\x00" * (BLOCK * blocks)
        if record:
            self.buf += b"\x00" * (-len(self.buf) % record)
        return self

    def getvalue(self, *, truncate_at: int | None = None) -> bytes:
        """The archive so far, cut after `truncate_at` bytes if given."""
        data = bytes(self.buf)
        return data if truncate_at is None else data[:truncate_at]

    def span_at(self, offset: int) -> Span | None:
        """The member whose bytes hold `offset` strictly inside them (a cut there splits it), if any."""
        for span in self.spans:
            if span.start < offset < span.end:
                return span
        return None


def pax_block(records: dict[bytes, bytes] | Iterable[bytes], *, glob: bool = False,
              declared_size: int | None = None, name: bytes = b"./PaxHeaders/x", **fields: object) -> bytes:
    """A pax header entry ('x' or 'g'): header plus padded record data; `declared_size` may lie."""
    data = pax_data(records)
    size = len(data) if declared_size is None else declared_size
    h = Header(name=name, typeflag=b"g" if glob else b"x", size=size, **fields)
    return encode_header(h) + data + padding(len(data))


def gnu_long_block(kind: bytes, value: bytes, *, declared_size: int | None = None, **fields: object) -> bytes:
    """A GNU 'L' or 'K' entry (old GNU magic): header plus NUL-terminated `value`; `declared_size` may lie."""
    data = value + b"\x00"
    size = len(data) if declared_size is None else declared_size
    h = Header(name=b"././@LongLink", typeflag=kind, size=size, magic=GNU_MAGIC, version=GNU_VERSION,
               **fields)
    return encode_header(h) + data + padding(len(data))


def gzip_bytes(data: bytes, *, level: int = 6) -> bytes:
    """`data` as one gzip member, reproducible (mtime 0)."""
    return gzip.compress(data, compresslevel=level, mtime=0)


def gzip_chunks(chunks: Iterable[bytes], *, level: int = 9) -> bytes:
    """One gzip member of the concatenated chunks, compressed as they come (a bomb never sits in memory)."""
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)  # wbits 31: gzip container, mtime 0
    out = [comp.compress(chunk) for chunk in chunks]
    out.append(comp.flush())
    return b"".join(out)


def zeros(total: int, *, chunk: int = 1 << 20) -> Iterable[bytes]:
    """`total` zero bytes in chunks, for `gzip_chunks`."""
    block = b"\x00" * chunk
    while total > 0:
        yield block[:min(chunk, total)]
        total -= chunk


def truncate(data: bytes, at: int) -> bytes:
    """The first `at` bytes of `data` (a negative `at` counts from the end)."""
    return data[:at]
