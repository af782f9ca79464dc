"""vdi: VirtualBox Virtual Disk Images (version 1.1 header, block map, 1 MiB blocks).

References: the VirtualBox VDI header layout; QEMU 7.2 block/vdi.c for qemu-img's options
(``static``), limits, messages, block allocation order and check.
"""
import array
import sys
from typing import Any, Dict

from ...driver import Driver, OptionSpec
from ...errors import ImageError, UnsupportedFeature
from ...io import AtomicOutput, HostFile
from ..raw import preallocation_option
from . import header as hdr
from .image import VdiImage


class VdiDriver(Driver):
    name = "vdi"
    image_class = VdiImage
    extensions = (".vdi",)
    capabilities = frozenset({"create", "write", "check", "preallocation"})
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size"),
        OptionSpec("static", "bool", False, "VDI static (pre-allocated) image"),
        preallocation_option(),
    )

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if hdr.probe(header) else 0

    def build_header(self, size: int, options: Dict[str, Any]) -> hdr.Header:
        size = -(-size // hdr.SECTOR) * hdr.SECTOR          # qemu-img rounds up silently
        if size > hdr.DISK_SIZE_MAX:
            raise UnsupportedFeature("Unsupported VDI image size (size is 0x%x, max supported is 0x%x)"
                                     % (size, hdr.DISK_SIZE_MAX), field="size")
        return hdr.new_header(size, bool(options.get("static")))

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        try:
            h = self.build_header(size, options)
        except ImageError as exc:
            exc.path = path
            raise
        out = AtomicOutput(path)
        try:
            with HostFile(out.tmp_path, writable=True) as host:
                host.pwrite(h.pack(), 0)
                if h.blocks_in_image:
                    if h.image_type == hdr.TYPE_STATIC:
                        entries = array.array("I", range(h.blocks_in_image))
                        if sys.byteorder != "little":
                            entries.byteswap()
                        bmap = entries.tobytes()
                    else:
                        bmap = b"\xff\xff\xff\xff" * h.blocks_in_image
                    host.pwrite(bmap.ljust(h.bmap_bytes, b"\0"), h.offset_bmap)
                if h.image_type == hdr.TYPE_STATIC:
                    # the data area is reserved by size only (a sparse file), as qemu-img does
                    host.truncate(h.offset_data + h.blocks_in_image * h.block_size)
            out.commit(sync)
        except BaseException:
            out.abort()
            raise


DRIVER = VdiDriver()
