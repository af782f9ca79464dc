"""Bochs on-disk structures: the 512-byte redolog header (v1 and current versions) and the catalog.

References: the Bochs "growing" redolog layout as QEMU 7.2 block/bochs.c reads it. Little-endian:
magic[32] type[16] subtype[16] version header catalog bitmap extent, then ``reserved disk`` (current
version 2.0) or ``disk`` (version 1.0). The catalog (``catalog`` 32-bit entries) starts at ``header``;
catalog entry *i* is 0xffffffff (extent never written) or the index of an extent stored as a
sector bitmap (``bitmap`` bytes, in whole sectors) followed by the extent's ``extent`` bytes.

Parsing works on bytes; reading the file is the image's business.
"""
import array
import sys
from typing import Union

from ...errors import FormatError
from ...structure import Record, record
from ...structure import disk as on_disk     # "disk" is also a field's name (the disk size)

MAGIC = b"Bochs Virtual HD Image"
TYPE_REDOLOG = b"Redolog"
SUBTYPE_GROWING = b"Growing"
VERSION = 0x00020000
VERSION_1 = 0x00010000
SECTOR = 512
HEADER_SIZE = 512                          # both versions
UNALLOCATED = 0xFFFFFFFF
MAX_CATALOG = 0x100000                     # QEMU: what the largest bximage image (~8 TB) needs
MIN_EXTENT = 512
MAX_EXTENT = 0x800000
U32 = 0xFFFFFFFF


@record("<")
class CommonHeader(Record):
    """The fields both header versions share, in their on-disk order (QEMU's names)."""
    magic: bytes = on_disk("32s", MAGIC, shown="text")
    type: bytes = on_disk("16s", TYPE_REDOLOG, shown="text")
    subtype: bytes = on_disk("16s", SUBTYPE_GROWING, shown="text")
    version: int = on_disk("I", VERSION, shown="hex")
    header: int = on_disk("I", HEADER_SIZE, shown="hex")     # where the catalog starts
    catalog: int = on_disk("I")                      # entries
    bitmap: int = on_disk("I")                       # bytes of the per-extent sector bitmap
    extent: int = on_disk("I")                       # bytes of data per extent

    # QEMU's 32-bit arithmetic, kept so hostile values map where QEMU maps them
    @property
    def bitmap_blocks(self) -> int:
        return ((self.bitmap - 1) & U32) // SECTOR + 1

    @property
    def extent_blocks(self) -> int:
        return ((self.extent - 1) & U32) // SECTOR + 1

    @property
    def data_offset(self) -> int:
        return (self.header + self.catalog * 4) & U32


@record("<")
class Header(CommonHeader):
    """The 512-byte header of the current version (2.0)."""
    reserved: int = on_disk("I")
    disk: int = on_disk("Q")                         # virtual size in bytes
    padding: bytes = on_disk("416s")                 # to HEADER_SIZE

    @property
    def virtual_size(self) -> int:
        return self.disk // SECTOR * SECTOR


@record("<")
class HeaderV1(CommonHeader):
    """The 512-byte header of version 1.0: no reserved word before the disk size."""
    disk: int = on_disk("Q")
    padding: bytes = on_disk("420s")                 # to HEADER_SIZE

    @property
    def virtual_size(self) -> int:
        return self.disk // SECTOR * SECTOR


def _cstr(field: bytes) -> bytes:
    """A NUL-terminated name as C's strcmp sees it (None-like b"\\xff" when it has no terminator)."""
    end = field.find(b"\0")
    return field[:end] if end >= 0 else b"\xff"


def probe(header: bytes) -> bool:
    """QEMU's rule: magic, "Redolog", "Growing" and a known version."""
    if len(header) < HEADER_SIZE:
        return False
    h = CommonHeader.unpack(header)
    return (_cstr(h.magic) == MAGIC and _cstr(h.type) == TYPE_REDOLOG and _cstr(h.subtype) == SUBTYPE_GROWING
            and h.version in (VERSION, VERSION_1))


def parse_header(buf: bytes, path: str) -> Union["Header", "HeaderV1"]:
    """The header of either version, validated in QEMU's order with its messages."""
    if not probe(buf):
        raise FormatError("Image not in Bochs format", path=path)
    h = (HeaderV1 if CommonHeader.unpack(buf).version == VERSION_1 else Header).unpack(buf)
    if h.disk >= 1 << 63:
        raise FormatError("disk size 0x%x is too large" % h.disk, path=path, field="disk")
    if h.catalog > MAX_CATALOG:
        raise FormatError("Catalog size is too large", path=path, field="catalog")
    if h.extent < MIN_EXTENT:
        raise FormatError("Extent size must be at least 512", path=path, field="extent")
    if h.extent & (h.extent - 1):
        raise FormatError("Extent size %d is not a power of two" % h.extent, path=path, field="extent")
    if h.extent > MAX_EXTENT:
        raise FormatError("Extent size %d is too large" % h.extent, path=path, field="extent")
    sectors_per_extent = h.extent // SECTOR
    if h.catalog < -(-(h.disk // SECTOR) // sectors_per_extent):
        raise FormatError("Catalog size is too small for this disk size", path=path, field="catalog")
    return h


def parse_catalog(buf: bytes) -> "array.array[int]":
    catalog = array.array("I", buf)
    if sys.byteorder != "little":
        catalog.byteswap()
    return catalog
