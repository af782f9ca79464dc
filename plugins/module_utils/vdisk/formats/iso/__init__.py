"""iso: ISO 9660 (CD/DVD) images, recognised by their volume descriptors and read as raw.

References: ECMA-119 (ISO 9660) section 8: volume descriptors start at logical sector 16 (byte
32768, 2048-byte sectors), each beginning with a type byte (0 boot record, 1 primary, 2
supplementary, 3 partition, 255 terminator), the identifier ``CD001`` and version 1. qemu-img has
no iso format: it reads such files as raw. vdisk finds them (so a file that is an ISO and also
another format's image is seen as the polyglot it is), reads the bytes as they are, and refuses to
write them on a guess, so a probed installer image or config drive is never changed by accident.
``info`` calls the format raw, as qemu-img does (scripts and the state layer see the same format
whether or not ``-f raw`` was given), and shows the file system and volume id as format-specific
data of type iso.
"""
from typing import Any, Dict

from ...driver import Driver
from ..raw import RawImage

DESCRIPTOR_OFFSET = 16 * 2048
IDENTIFIER = b"CD001"
DESCRIPTOR_TYPES = (0, 1, 2, 3, 255)
VOLUME_ID = slice(40, 72)                  # in the primary volume descriptor (type 1)


def probe(header: bytes) -> bool:
    d = header[DESCRIPTOR_OFFSET:DESCRIPTOR_OFFSET + 7]
    return len(d) == 7 and d[1:6] == IDENTIFIER and d[0] in DESCRIPTOR_TYPES and d[6] == 1


class IsoImage(RawImage):
    """A raw image that is never opened for writing."""

    def info(self) -> Dict[str, Any]:
        data: Dict[str, Any] = {"filesystem": "iso9660"}
        pvd = self.host.pread(2048, DESCRIPTOR_OFFSET)
        if pvd[0] == 1 and probe(bytes(DESCRIPTOR_OFFSET) + pvd):
            name = pvd[VOLUME_ID].decode("ascii", "replace").strip()
            if name:
                data["volume-id"] = name
        return {"format": "raw", "format-specific": {"type": "iso", "data": data}}


class IsoDriver(Driver):
    name = "iso"
    image_class = IsoImage
    raw_view = True
    read_only_reason = "format iso is read-only; open the file with -f raw to change it"
    extensions = (".iso",)
    capabilities = frozenset()

    def probe(self, header: bytes, filename: str) -> int:
        # below every format with a signature at offset 0: an ISO's first 32 KiB are free for a
        # boot sector, so an image of another format found there wins (or makes a polyglot error)
        return 50 if probe(header) else 0


DRIVER = IsoDriver()
