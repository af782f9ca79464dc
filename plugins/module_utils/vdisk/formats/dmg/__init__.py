"""dmg: Apple disk images (UDIF: koly trailer, blkx chunk tables), read-only as in qemu-img.

References: QEMU 7.2 block/dmg.c for the layout, limits and behaviour. QEMU probes dmg by the
``.dmg`` file name only; vdisk probes the trailer itself, so a renamed image is still found.
"""
import os
from typing import Optional

from ...driver import Driver, Policy
from . import header as hdr
from .image import DmgImage


class DmgDriver(Driver):
    name = "dmg"
    extensions = (".dmg",)
    capabilities = frozenset()

    def probe(self, header: bytes, filename: str) -> int:
        # the signature is at the end of the file, beyond the header the registry reads
        try:
            with open(filename, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < hdr.KOLY_SIZE:
                    return 0
                start = hdr.tail_window(size)
                f.seek(start)
                tail = f.read(hdr.KOLY_SEARCH + hdr.KOLY_SIZE)
        except (OSError, ValueError):
            return 0
        return 90 if hdr.probe_trailer(tail, start, size) else 0

    def open(self, path: str, writable: bool = False, policy: Optional[Policy] = None) -> DmgImage:
        return DmgImage(self, path, writable, policy or Policy())


DRIVER = DmgDriver()
