"""dmg: Apple disk images (UDIF: koly trailer, blkx chunk tables), read-only as in qemu-img.

References: QEMU 7.2 block/dmg.c for the layout, limits and behaviour. QEMU probes dmg by the
``.dmg`` file name only; vdisk probes the trailer itself, so a renamed image is still found.
"""
import os
import stat

from ...driver import Driver
from . import header as hdr
from .image import DmgImage


class DmgDriver(Driver):
    name = "dmg"
    image_class = DmgImage
    extensions = (".dmg",)
    capabilities = frozenset()

    def probe(self, header: bytes, filename: str) -> int:
        # the signature is at the end of the file, beyond the header the registry reads; only a
        # regular file has an end to look at (a FIFO is never waited on)
        try:
            fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK)
        except (OSError, ValueError):
            return 0
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < hdr.KOLY_SIZE:
                return 0
            size = st.st_size
            start = hdr.tail_window(size)
            tail = os.pread(fd, hdr.KOLY_SEARCH + hdr.KOLY_SIZE, start)
        except OSError:
            return 0
        finally:
            os.close(fd)
        return 90 if hdr.probe_trailer(tail, start, size) else 0


DRIVER = DmgDriver()
