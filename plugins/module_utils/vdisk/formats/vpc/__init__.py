"""vpc: Microsoft Virtual PC / Hyper-V VHD images, fixed and dynamic.

References: Microsoft's "Virtual Hard Disk Image Format Specification"; QEMU 7.2 block/vpc.c for
qemu-img's options (``subformat``, ``force_size``), CHS rounding, limits and messages.
"""
from typing import Any, Dict, List, Tuple

from ...driver import Driver, OptionSpec, Policy
from ...errors import ImageError
from ...io import AtomicOutput, HostFile
from ..raw import preallocation_option
from . import header as hdr
from .image import VpcImage

SUBFORMATS = ("dynamic", "fixed")


class VpcDriver(Driver):
    name = "vpc"
    image_class = VpcImage
    extensions = (".vhd", ".vpc")
    capabilities = frozenset({"create", "write", "preallocation"})
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size"),
        OptionSpec("subformat", "enum", "dynamic", "Type of virtual hard disk format. Supported formats are "
                   "{dynamic (default) | fixed} ", SUBFORMATS),
        OptionSpec("force_size", "bool", False, "Force disk size calculation to use the actual size specified, "
                   "rather than using the nearest CHS-based calculation"),
        preallocation_option(),
    )

    def probe(self, header: bytes, filename: str) -> int:
        # QEMU's rule: the footer copy at offset 0 (dynamic disks); a fixed disk, with its footer only at
        # the end, probes as raw
        return 100 if header.startswith(hdr.COOKIE) else 0

    def references(self, path: str, checked=None) -> List[Tuple[str, str]]:
        """The parent locators of a differencing disk, as (kind, stored path), for ``vdisk inspect``.
        They are never opened: like QEMU, vdisk reads a differencing disk without its parent."""
        with self.open(path, False, Policy(lock=False, opening=checked)) as image:
            if image.fixed or image.footer.disk_type != hdr.TYPE_DIFFERENCING:
                return []
            size = image.host.size()
            out = []
            for loc in image.dyn.parent_locators():
                length, offset = loc.platform_data_length, loc.platform_data_offset
                if length > hdr.MAX_LOCATOR_DATA or offset > size - length:
                    continue        # not a path vdisk reads (QEMU does not read them at all)
                name = loc.decode(image.host.pread(length, offset))
                if name:
                    out.append(("parent locator", name))
            return out

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        fixed = (options.get("subformat") or "dynamic") == "fixed"
        force = bool(options.get("force_size"))
        size = -(-size // hdr.SECTOR) * hdr.SECTOR
        try:
            size, chs = hdr.rounded_size(size, force)
        except ImageError as exc:
            exc.path = path
            raise
        footer = hdr.new_footer(size, chs, fixed, force).pack()
        out = AtomicOutput(path)
        try:
            with HostFile(out.tmp_path, writable=True) as host:
                if fixed:
                    # QEMU's file layer writes the first block of a file it grows from empty (for its
                    # alignment probing): the same disk usage as qemu-img's image
                    host.pwrite(bytes(min(4096, size)), 0)
                    host.truncate(size + hdr.FOOTER_SIZE)
                    host.pwrite(footer, size)
                else:
                    entries = -(-size // hdr.DEFAULT_BLOCK_SIZE)
                    table = hdr.bat_bytes(entries)
                    dyn = hdr.DynHeader(max_table_entries=entries)
                    host.pwrite(footer + dyn.pack() + b"\xff" * table + footer, 0)
            out.commit(sync)
        except BaseException:
            out.abort()
            raise


DRIVER = VpcDriver()
