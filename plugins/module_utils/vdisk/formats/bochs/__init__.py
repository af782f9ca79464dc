"""bochs: Bochs "growing" redolog images (header versions 1.0 and 2.0), read-only as in qemu-img.

References: QEMU 7.2 block/bochs.c for the layout, limits and messages.
"""

from ...driver import Driver
from . import header as hdr
from .image import BochsImage


class BochsDriver(Driver):
    name = "bochs"
    image_class = BochsImage
    extensions = (".bochs",)
    capabilities = frozenset()

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if hdr.probe(header) else 0


DRIVER = BochsDriver()
