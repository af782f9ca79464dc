"""Where each format's files carry a fixed signature: the registry's first test when it detects a
format, so that a file is probed only by the drivers whose signature it holds, and detecting a
qcow2 (or finding a file raw) imports no other driver: start-up time of every command and module
that is not told the format.

A signature is a necessary condition, not the rule: the driver's ``probe`` then decides (version,
sizes, ...) as QEMU's probe does.  The values are the header modules' constants at their fields'
offsets, kept beside them by a test (tests/unit/test_registry.py).  A format without a fixed
signature (dmg's trailer is at the end of the file; raw matches anything) is always asked.
vmdk has two binary magics and text descriptors, whose rule (QEMU's vmdk_probe) lives here in
full so that it costs no import: :func:`vmdk_text_descriptor`.
"""
from typing import Dict, Tuple

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
VMDK_VERSIONS = (b"version=1", b"version=2", b"version=3")


def vmdk_text_descriptor(header: bytes) -> bool:
    """QEMU's vmdk_probe for a text descriptor: blank and comment lines, then ``version=N``."""
    for line in header.split(b"\n"):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        return line in VMDK_VERSIONS
    return False


def may_be(name: str, header: bytes) -> bool:
    """Whether *header* (a file's first bytes) can be format *name*: its signature is there, or the
    format has none (its driver decides)."""
    signatures = SIGNATURES.get(name)
    if signatures is None:
        return True
    if any(header.startswith(magic, offset) for offset, magic in signatures):
        return True
    return name == "vmdk" and vmdk_text_descriptor(header)
