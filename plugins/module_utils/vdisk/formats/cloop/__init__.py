"""cloop: compressed loop images (version 2.0 header, zlib blocks), read-only as in qemu-img.

References: QEMU 7.2 block/cloop.c for the layout, limits and messages.
"""

from ...driver import Driver
from . import header as hdr
from .image import CloopImage


class CloopDriver(Driver):
    name = "cloop"
    image_class = CloopImage
    extensions = (".cloop",)
    capabilities = frozenset()

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if hdr.probe(header) else 0


DRIVER = CloopDriver()
