"""qed: the QEMU Enhanced Disk format (two-level tables, backing files, need-check flag).

References: the QED specification (QEMU wiki, Features/QED/Specification); QEMU block/qed.c for
qemu-img's create options, limits and messages.
"""
from typing import Any, Dict

from ...driver import Driver, OptionSpec
from ...errors import InvalidOption
from ...io import AtomicOutput, HostFile
from ..raw import preallocation_option
from . import header as hdr
from .image import QedImage


class QedDriver(Driver):
    name = "qed"
    image_class = QedImage
    extensions = (".qed",)
    names_other_files = True
    capabilities = frozenset({"create", "write", "backing", "check", "repair", "preallocation"})
    create_options = (
        OptionSpec("size", "size", None, "Virtual disk size"),
        OptionSpec("backing_file", "str", None, "File name of a base image"),
        OptionSpec("backing_fmt", "str", None, "Image format of the base image"),
        OptionSpec("cluster_size", "size", hdr.DEFAULT_CLUSTER_SIZE, "Cluster size (in bytes)"),
        OptionSpec("table_size", "size", hdr.DEFAULT_TABLE_SIZE, "L1/L2 table size (in clusters)"),
        preallocation_option(),
    )

    def probe(self, header: bytes, filename: str) -> int:
        return 100 if hdr.probe(header) else 0

    def build_header(self, size: int, options: Dict[str, Any]) -> hdr.Header:
        cs = options.get("cluster_size")
        cs = hdr.DEFAULT_CLUSTER_SIZE if cs is None else int(cs)
        ts = options.get("table_size")
        ts = hdr.DEFAULT_TABLE_SIZE if ts is None else int(ts)
        if not hdr.cluster_size_valid(cs):
            raise InvalidOption("QED cluster size must be within range [%d, %d] and power of 2"
                                % (hdr.MIN_CLUSTER_SIZE, hdr.MAX_CLUSTER_SIZE), field="cluster_size")
        if not hdr.table_size_valid(ts):
            raise InvalidOption("QED table size must be within range [%d, %d] and power of 2"
                                % (hdr.MIN_TABLE_SIZE, hdr.MAX_TABLE_SIZE), field="table_size")
        if not hdr.image_size_valid(size, cs, ts):
            raise InvalidOption("QED image size must be a non-zero multiple of cluster size and less than %d bytes"
                                % hdr.max_image_size(cs, ts), field="size")
        backing = options.get("backing_file") or None
        if backing and len(backing.encode("utf-8", "surrogateescape")) > min(hdr.MAX_BACKING_NAME,
                                                                             cs - hdr.HEADER_SIZE):
            raise InvalidOption("backing file name is too long", field="backing_file")
        if options.get("backing_fmt") and not backing:
            raise InvalidOption("Backing format cannot be used without backing file", field="backing_fmt")
        return hdr.new_header(size, cs, ts, backing, options.get("backing_fmt"))

    def create(self, path: str, size: int, options: Dict[str, Any], sync: bool = True) -> None:
        h = self.build_header(size, options)
        mode = options.get("preallocation") or "off"
        out = AtomicOutput(path)
        try:
            with HostFile(out.tmp_path, writable=True) as host:
                end = h.l1_table_offset + h.table_bytes
                if mode == "falloc":
                    host.fallocate(0, end)
                elif mode == "full":
                    host.write_zeroes_full(0, end)
                cluster0 = bytearray(h.pack())
                if h.backing_file:
                    cluster0 += h.backing_file.encode("utf-8", "surrogateescape")
                host.pwrite(bytes(cluster0), 0)
                host.pwrite(bytes(h.table_bytes), h.l1_table_offset)   # the empty L1 table, written out
            out.commit(sync)
        except BaseException:
            out.abort()
            raise


DRIVER = QedDriver()
