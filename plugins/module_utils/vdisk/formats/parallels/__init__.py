"""parallels: the Parallels / OpenVZ ploop image format (header, BAT, data clusters).

References: QEMU docs/interop/parallels.txt. vdisk creates version-2 ("WithouFreSpacExt")
images as qemu-img 7.2 does and reads version-1 ("WithoutFreeSpace") images too.
"""
from typing import Any, Dict

from ...driver import Driver, OptionSpec
from ...errors import InvalidOption
from ...io import AtomicOutput, HostFile
from ..raw import preallocation_option
from . import header as hdr
from .image import ParallelsImage


class ParallelsDriver(Driver):
    name = "parallels"
    image_class = ParallelsImage
    extensions = (".hds", ".hdd")
    capabilities = frozenset({"create", "write", "check", "repair", "preallocation"})
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size"),
        OptionSpec("cluster_size", "size", hdr.DEFAULT_CLUSTER_SIZE, "Parallels image cluster size"),
        preallocation_option(),
    )

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if hdr.probe(header) else 0

    def build_header(self, size: int, options: Dict[str, Any]) -> hdr.Header:
        cluster_size = options.get("cluster_size")
        cluster_size = hdr.DEFAULT_CLUSTER_SIZE if cluster_size is None else int(cluster_size)
        size = -(-size // hdr.SECTOR) * hdr.SECTOR
        cluster_size = -(-cluster_size // hdr.SECTOR) * hdr.SECTOR     # qemu-img rounds both up silently
        if cluster_size >= hdr.INT64_MAX // hdr.MAX_IMAGE_FACTOR:
            raise InvalidOption("Cluster size is too large", field="cluster_size")
        if size >= hdr.MAX_IMAGE_FACTOR * cluster_size:
            raise InvalidOption("Image size is too large for this cluster size", field="size")
        return hdr.new_header(size, cluster_size)

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        h = self.build_header(size, options)
        mode = options.get("preallocation") or "off"
        out = AtomicOutput(path)
        try:
            with HostFile(out.tmp_path, writable=True) as host:
                # header and BAT area written out (allocated), as qemu-img does; the data area starts empty
                end = h.data_off * hdr.SECTOR
                if mode == "falloc":
                    host.fallocate(0, end)
                host.write_zeroes_full(0, end)
                host.pwrite(h.pack(), 0)
            out.commit(sync)
        except BaseException:
            out.abort()
            raise


DRIVER = ParallelsDriver()
