"""Read a kernel module's `.modinfo` ELF section (vermagic, depends, version) without running modinfo."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MAX_SECTIONS = 65535
MAX_SECTION_BYTES = 4 << 20  # the section names or .modinfo: real modules have a few KiB of each


class ModinfoError(ValueError):
    """The file is not an ELF object with a readable .modinfo section."""


@dataclass(frozen=True)
class ModInfo:
    name: str
    vermagic: str
    version: str
    depends: tuple[str, ...]
    fields: dict[str, tuple[str, ...]]


def parse_modinfo(data: bytes) -> dict[str, tuple[str, ...]]:
    """The key=value strings of an ELF file's .modinfo section (keys may repeat, e.g. parm, alias)."""
    return _modinfo(lambda offset, size: data[offset:offset + size], len(data))


def _modinfo(read_at: Callable[[int, int], bytes], length: int) -> dict[str, tuple[str, ...]]:
    """.modinfo from the parts of the file it needs: the ELF header, the section headers, the section names
    and the section itself (a 60 MB nvidia.ko costs a few KiB of reads, not 60 MB of memory)."""
    head = read_at(0, 0x40)
    if len(head) < 0x40 or head[:4] != b"\x7fELF":
        raise ModinfoError("not an ELF file (or truncated)")
    elf_class, endian = head[4], head[5]
    if elf_class not in (1, 2) or endian not in (1, 2):
        raise ModinfoError("unknown ELF class or byte order")
    e = "<" if endian == 1 else ">"
    if elf_class == 2:
        shoff, = struct.unpack_from(e + "Q", head, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", head, 0x3A)
        sh_fmt, off_idx, size_idx = e + "IIQQQQIIQQ", 4, 5
    else:
        shoff, = struct.unpack_from(e + "I", head, 0x20)
        shentsize, shnum, shstrndx = struct.unpack_from(e + "HHH", head, 0x2E)
        sh_fmt, off_idx, size_idx = e + "IIIIIIIIII", 4, 5
    if shnum == 0 or shnum > MAX_SECTIONS or shstrndx >= shnum or shentsize < struct.calcsize(sh_fmt):
        raise ModinfoError("no usable section header table")
    table = _exactly(read_at, shoff, shnum * shentsize) if shoff + shnum * shentsize <= length else b""
    try:
        headers = [struct.unpack_from(sh_fmt, table, i * shentsize) for i in range(shnum)]
    except struct.error:
        raise ModinfoError("truncated ELF headers") from None

    def section(h: tuple[int, ...]) -> bytes:
        off, size = h[off_idx], h[size_idx]
        if off + size > length:
            raise ModinfoError("section extends past the end of the file")
        if size > MAX_SECTION_BYTES:
            raise ModinfoError(f"a section of {size} bytes where a module's names and .modinfo take a few KiB")
        return _exactly(read_at, off, size)

    names = section(headers[shstrndx])
    for h in headers:
        end = names.find(b"\0", h[0])
        if names[h[0]:end] == b".modinfo":
            fields: dict[str, list[str]] = {}
            for item in section(h).split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep:
                    fields.setdefault(key, []).append(value)
            return {k: tuple(v) for k, v in fields.items()}
    raise ModinfoError("no .modinfo section (not a kernel module)")


def _exactly(read_at: Callable[[int, int], bytes], offset: int, size: int) -> bytes:
    data = read_at(offset, size)
    if len(data) != size:
        raise ModinfoError("the file ends before its ELF headers say")
    return data


def read_modinfo(path: Path) -> ModInfo:
    with path.open("rb", buffering=0) as f:
        fd = f.fileno()
        fields = _modinfo(lambda offset, size: os.pread(fd, size, offset), os.fstat(fd).st_size)
    # depends= names modules by file name (nvidia-modeset); the kernel and
    # /sys/module use underscores (nvidia_modeset): compare in that form.
    depends = tuple(d.replace("-", "_") for d in ",".join(fields.get("depends", ())).split(",") if d)
    name = fields.get("name", (path.name.removesuffix(".ko").replace("-", "_"),))[0]
    return ModInfo(
        name=name,
        vermagic=fields.get("vermagic", ("",))[0],
        version=fields.get("version", ("",))[0],
        depends=depends,
        fields=fields,
    )


def vermagic_matches(vermagic: str, kernel_release: str) -> bool:
    """The kernel's own rule: vermagic starts with the release followed by a space."""
    return vermagic.startswith(kernel_release + " ")
