"""QED on-disk structures: the header, the backing file name, L1/L2 tables.

References: the QED specification (QEMU wiki "Features/QED/Specification") and QEMU's
block/qed.h. Everything is little-endian. A table is ``table_size`` clusters of 64-bit
offsets (read and written by table.py); an L2 entry of 0 is unallocated (read the backing
file), 1 a zero cluster.
"""
import struct
from typing import Callable, Optional

from ...errors import CorruptImage, FormatError, UnsupportedFeature
from ...structure import Record, disk, record

MAGIC = 0x00444551                     # "QED\0"
F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02                    # set while allocating writes may be in flight
F_BACKING_FORMAT_NO_PROBE = 0x04       # the backing file is raw
FEATURE_MASK = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
COMPAT_FEATURE_MASK = 0
AUTOCLEAR_FEATURE_MASK = 0

MIN_CLUSTER_SIZE = 4 * 1024
MAX_CLUSTER_SIZE = 64 * 1024 * 1024
DEFAULT_CLUSTER_SIZE = 64 * 1024
MIN_TABLE_SIZE = 1
MAX_TABLE_SIZE = 16
DEFAULT_TABLE_SIZE = 4
MAX_BACKING_NAME = 1023                # QEMU keeps the name in a PATH_MAX-ish buffer; refuse longer ones

UNALLOCATED = 0
ZERO_CLUSTER = 1


@record("<")
class Header(Record):
    """The header at the start of cluster 0, in its on-disk order (the names are the spec's)."""
    magic: int = disk("I", MAGIC, shown="hex")
    cluster_size: int = disk("I", DEFAULT_CLUSTER_SIZE, shown="hex")
    table_size: int = disk("I", DEFAULT_TABLE_SIZE)        # clusters per table
    header_size: int = disk("I", 1)                        # clusters
    features: int = disk("Q", 0, shown="hex")
    compat_features: int = disk("Q", 0, shown="hex")
    autoclear_features: int = disk("Q", 0, shown="hex")
    l1_table_offset: int = disk("Q", 0, shown="hex")
    image_size: int = disk("Q")
    backing_filename_offset: int = disk("I", 0, shown="hex")   # bytes from the start of the header
    backing_filename_size: int = disk("I")
    backing_file: Optional[str] = None                     # not on disk: the name those two fields locate

    @property
    def table_entries(self) -> int:
        return self.table_size * self.cluster_size // 8

    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size


HEADER_SIZE = Header.SIZE               # 64


def is_power_of_2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


def cluster_size_valid(n: int) -> bool:
    return is_power_of_2(n) and MIN_CLUSTER_SIZE <= n <= MAX_CLUSTER_SIZE


def table_size_valid(n: int) -> bool:
    return is_power_of_2(n) and MIN_TABLE_SIZE <= n <= MAX_TABLE_SIZE


def max_image_size(cluster_size: int, table_size: int) -> int:
    entries = table_size * cluster_size // 8
    return entries * entries * cluster_size


def image_size_valid(size: int, cluster_size: int, table_size: int) -> bool:
    return size % 512 == 0 and size <= max_image_size(cluster_size, table_size)


def probe(buf: bytes) -> bool:
    at = Header.offset("magic")
    return len(buf) >= at + 4 and struct.unpack_from("<I", buf, at)[0] == MAGIC


def parse_header(buf: bytes, path: str, read: Callable[[int, int], bytes]) -> Header:
    """The header from the first 64 bytes *buf* and the backing file name (``read(offset, length)``
    returns what the file holds there), validated as QEMU validates them on open."""
    if len(buf) < HEADER_SIZE:
        raise FormatError("Image not in QED format (file too short for a header)", path=path, field="header")
    h = Header.unpack(buf)
    if h.magic != MAGIC:
        raise FormatError("Image not in QED format", path=path, field="magic")
    if h.features & ~FEATURE_MASK:
        raise UnsupportedFeature("Unsupported QED features: %x" % (h.features & ~FEATURE_MASK), path=path,
                                 field="features")
    if not cluster_size_valid(h.cluster_size):
        raise FormatError("QED cluster size %d is invalid" % h.cluster_size, path=path, field="cluster_size")
    if not table_size_valid(h.table_size):
        raise FormatError("QED table size %d is invalid" % h.table_size, path=path, field="table_size")
    if not image_size_valid(h.image_size, h.cluster_size, h.table_size):
        raise FormatError("QED image size %d is invalid" % h.image_size, path=path, field="image_size")
    if h.header_size == 0 or h.header_size * h.cluster_size > (1 << 32):
        raise FormatError("QED header size %d is invalid" % h.header_size, path=path, field="header_size")
    if h.features & F_BACKING_FILE:
        end = h.backing_filename_offset + h.backing_filename_size
        if end > h.cluster_size * h.header_size or h.backing_filename_size > MAX_BACKING_NAME:
            raise CorruptImage("QED backing file name (offset %d, %d bytes) does not fit the header"
                               % (h.backing_filename_offset, h.backing_filename_size), path=path,
                               field="backing_filename_offset")
        raw = read(h.backing_filename_offset, h.backing_filename_size)
        if len(raw) < h.backing_filename_size:
            raise CorruptImage("QED backing file name lies beyond the end of the file", path=path,
                               field="backing_filename_offset")
        h.backing_file = raw.decode("utf-8", "surrogateescape")
    return h


def new_header(size: int, cluster_size: int, table_size: int, backing_file: Optional[str],
               backing_fmt: Optional[str]) -> Header:
    h = Header(cluster_size=cluster_size, table_size=table_size, header_size=1, l1_table_offset=cluster_size,
               image_size=size)
    if backing_file:
        h.features |= F_BACKING_FILE
        h.backing_filename_offset = HEADER_SIZE
        h.backing_filename_size = len(backing_file.encode("utf-8", "surrogateescape"))
        h.backing_file = backing_file
        if backing_fmt == "raw":
            h.features |= F_BACKING_FORMAT_NO_PROBE
    return h
