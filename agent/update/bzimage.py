"""The kernel release a bzImage carries, read from its header without booting or mounting anything.

Linux x86 boot protocol (Documentation/arch/x86/boot.rst): the setup header has the magic
"HdrS" at 0x202 and the protocol version at 0x206; from 2.00 on, the 16-bit `kernel_version`
at 0x20E, when non-zero, points at a NUL-terminated version string at that value + 0x200. The
string begins with the release (`uname -r`), then a space: "6.1.0-57-amd64 (debian-kernel@...) #1 SMP ...".
Flatcar's update writes such a kernel (`/boot/flatcar/vmlinuz-a|b`) for the next OS version, so
the next kernel is known before the reboot.
"""

from __future__ import annotations

import re
import struct

HEADER_MAGIC_AT = 0x202
PROTOCOL_AT = 0x206
KERNEL_VERSION_AT = 0x20E
VERSION_BASE = 0x200
MAX_VERSION = 512  # the string is "release (builder) #n SMP date": a few hundred bytes at most
# What `uname -r` can be, as far as the agent will use it in a path and an image tag.
RELEASE = re.compile(r"[0-9]+\.[0-9]+[A-Za-z0-9._+~-]*")
# Enough of the file for any kernel built since boot protocol 2.00: setup is at most 32 KiB + header.
HEAD_BYTES = 0x8000 + 0x200


class NotABzImage(ValueError):
    """The bytes are not a bzImage whose header names its release."""


def kernel_release(head: bytes) -> str:
    """The release of the kernel whose first bytes (at least to the end of its version string) are `head`."""
    if len(head) < KERNEL_VERSION_AT + 2 or head[HEADER_MAGIC_AT:HEADER_MAGIC_AT + 4] != b"HdrS":
        raise NotABzImage("no Linux boot header (magic HdrS at 0x202)")
    (protocol,) = struct.unpack_from("<H", head, PROTOCOL_AT)
    if protocol < 0x200:
        raise NotABzImage(f"boot protocol {protocol >> 8}.{protocol & 0xff:02d} has no kernel_version field")
    (pointer,) = struct.unpack_from("<H", head, KERNEL_VERSION_AT)
    if pointer == 0:
        raise NotABzImage("the header carries no kernel version string")
    start = pointer + VERSION_BASE
    if start >= len(head):
        raise NotABzImage(f"the version string at {start:#x} lies past the {len(head)} bytes read")
    end = head.find(b"\0", start, start + MAX_VERSION)
    if end < 0:
        raise NotABzImage(f"no NUL within {MAX_VERSION} bytes of the version string at {start:#x}")
    text = head[start:end].decode("ascii", errors="replace")
    release = text.split(" ", 1)[0]
    if not RELEASE.fullmatch(release):
        raise NotABzImage(f"the version string does not begin with a kernel release: {text[:80]!r}")
    return release
