"""Where each format's files carry a fixed signature: the registry's first test when it detects a
format, so that a file is probed only by the drivers whose signature it holds, and detecting a
qcow2 (or finding a file raw) imports no other driver: start-up time of every command and module
that is not told the format.

A signature is a necessary condition, not the rule: the driver's ``probe`` then decides (version,
sizes, ...) as QEMU's probe does.  The values are the header modules' constants at their fields'
offsets, kept beside them by a test (tests/unit/test_registry.py).  A format without a fixed
signature (raw matches anything) is always asked.  dmg's signature is in its trailer, at the end
of the file: :data:`TRAILERS`, read with :func:`file_tail` (which dmg's probe uses too).  vmdk has
two binary magics and text descriptors, whose rule (QEMU's vmdk_probe) lives here in full so that
it costs no import: :func:`vmdk_text_descriptor`.
"""
import os
import stat
from typing import Dict, NamedTuple, Optional, Tuple

QCOW_MAGIC = b"QFI\xfb"                   # qcow and qcow2, told apart by the version that follows

SIGNATURES: Dict[str, Tuple[Tuple[int, bytes], ...]] = {
    "qcow2": ((0, QCOW_MAGIC + b"\x00\x00\x00\x02"), (0, QCOW_MAGIC + b"\x00\x00\x00\x03")),
    "qcow": ((0, QCOW_MAGIC + b"\x00\x00\x00\x01"),),
    "qed": ((0, b"QED\x00"),),
    "vdi": ((0x40, b"\x7f\x10\xda\xbe"),),                    # 0xBEDA107F, little-endian
    "vhdx": ((0, b"vhdxfile"),),
    "vpc": ((0, b"conectix"),),                               # the footer's copy at 0 (dynamic disks)
    "luks": ((0, b"LUKS\xba\xbe"),),
    "parallels": ((0, b"WithoutFreeSpace"), (0, b"WithouFreSpacExt")),
    "bochs": ((0, b"Bochs Virtual HD Image\x00"),),
    "cloop": ((0, b"#!/bin/sh\n#V2.0 Format\n"),),
    "iso": ((16 * 2048 + 1, b"CD001"),),                      # the first volume descriptor's identifier
    "vmdk": ((0, b"KDMV"), (0, b"COWD")),                     # and text descriptors: see below
}
# the magic somewhere in the last N bytes of a regular file: dmg's "koly" where QEMU looks for it
# (the last 511 bytes of the second-last sector and the last sector)
TRAILERS: Dict[str, Tuple[int, bytes]] = {
    "dmg": (511 + 512, b"koly"),
}
VMDK_VERSIONS = (b"version=1", b"version=2", b"version=3")


def vmdk_text_descriptor(header: bytes) -> bool:
    """QEMU's vmdk_probe for a text descriptor: blank and comment lines, then ``version=N``."""
    for line in header.split(b"\n"):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        return line in VMDK_VERSIONS
    return False


class Tail(NamedTuple):
    """The last bytes of a file: ``data``, read from ``offset``, of a file of ``size`` bytes."""
    data: bytes
    offset: int
    size: int


def file_tail(filename: str, length: int) -> Optional[Tail]:
    """The last *length* bytes of the regular file *filename* (all of it when shorter), or None:
    not a regular file, or unreadable. Opened without blocking: a FIFO is never waited on."""
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK)
    except (OSError, ValueError, TypeError):
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        start = max(0, st.st_size - length)
        return Tail(os.pread(fd, st.st_size - start, start), start, st.st_size)
    except OSError:
        return None
    finally:
        os.close(fd)


def may_be(name: str, header: bytes, filename: Optional[str] = None) -> bool:
    """Whether the file *filename* whose first bytes are *header* can be format *name*: its
    signature is there, or the format has none (its driver decides)."""
    trailer = TRAILERS.get(name)
    if trailer is not None:
        found = file_tail(filename, trailer[0]) if filename else None
        return found is not None and trailer[1] in found.data
    signatures = SIGNATURES.get(name)
    if signatures is None:
        return True
    if any(header.startswith(magic, offset) for offset, magic in signatures):
        return True
    return name == "vmdk" and vmdk_text_descriptor(header)
