"""dmg: Apple disk images (UDIF: koly trailer, blkx chunk tables), read-only as in qemu-img.

References: QEMU 7.2 block/dmg.c for the layout, limits and behaviour. QEMU probes dmg by the
``.dmg`` file name only; vdisk probes the trailer itself, so a renamed image is still found.
"""
from ...driver import Driver
from ..signatures import TRAILERS, file_tail
from . import header as hdr
from .image import DmgImage


class DmgDriver(Driver):
    name = "dmg"
    image_class = DmgImage
    extensions = (".dmg",)
    capabilities = frozenset()

    def probe(self, header: bytes, filename: str) -> int:
        # the signature is at the end of the file, beyond the header the registry reads; only a
        # regular file has an end to look at
        found = file_tail(filename, TRAILERS["dmg"][0]) if filename else None
        if found is None or found.size < hdr.KOLY_SIZE:
            return 0
        return 90 if hdr.probe_trailer(found.data, found.offset, found.size) else 0


DRIVER = DmgDriver()
