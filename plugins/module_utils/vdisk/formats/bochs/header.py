"""Bochs on-disk structures: the 512-byte redolog header (v1 and current versions) and the catalog.

References: the Bochs "growing" redolog layout as QEMU 7.2 block/bochs.c reads it. Little-endian:
magic[32] type[16] subtype[16] version header catalog bitmap extent, then ``reserved disk`` (current
version 2.0) or ``disk`` (version 1.0). The catalog (``catalog`` 32-bit entries) starts at ``header``;
catalog entry *i* is 0xffffffff (extent never written) or the index of an extent stored as a
sector bitmap (``bitmap`` bytes, in whole sectors) followed by the extent's ``extent`` bytes.

Parsing works on bytes; reading the file is the image's business.
"""
import array
import struct
import sys
from dataclasses import dataclass

from ...errors import FormatError

MAGIC = b"Bochs Virtual HD Image"
TYPE_REDOLOG = b"Redolog"
SUBTYPE_GROWING = b"Growing"
VERSION = 0x00020000
VERSION_1 = 0x00010000
HEADER_SIZE = 512
SECTOR = 512
HEADER = struct.Struct("<32s16s16sIIIII")  # magic type subtype version header catalog bitmap extent
EXTRA_V2 = struct.Struct("<IQ")            # reserved disk
EXTRA_V1 = struct.Struct("<Q")             # disk
UNALLOCATED = 0xFFFFFFFF
MAX_CATALOG = 0x100000                     # QEMU: what the largest bximage image (~8 TB) needs
MIN_EXTENT = 512
MAX_EXTENT = 0x800000
U32 = 0xFFFFFFFF


def _cstr(field: bytes) -> bytes:
    """A NUL-terminated name as C's strcmp sees it (None-like b"\\xff" when it has no terminator)."""
    end = field.find(b"\0")
    return field[:end] if end >= 0 else b"\xff"


def probe(header: bytes) -> bool:
    """QEMU's rule: magic, "Redolog", "Growing" and a known version."""
    if len(header) < HEADER_SIZE:
        return False
    magic, kind, subtype, version = HEADER.unpack_from(header)[:4]
    return (_cstr(magic) == MAGIC and _cstr(kind) == TYPE_REDOLOG and _cstr(subtype) == SUBTYPE_GROWING
            and version in (VERSION, VERSION_1))


@dataclass(frozen=True)
class Header:
    version: int
    header: int          # where the catalog starts
    catalog: int         # entries
    bitmap: int          # bytes of the per-extent sector bitmap
    extent: int          # bytes of data per extent
    disk: int            # virtual size in bytes

    @property
    def virtual_size(self) -> int:
        return self.disk // SECTOR * SECTOR

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


def parse_header(buf: bytes, path: str) -> Header:
    """The header fields, validated in QEMU's order with its messages."""
    if not probe(buf):
        raise FormatError("Image not in Bochs format", path=path)
    dummy, dummy, dummy, version, header, catalog, bitmap, extent = HEADER.unpack_from(buf)
    if version == VERSION_1:
        (disk,) = EXTRA_V1.unpack_from(buf, HEADER.size)
    else:
        disk = EXTRA_V2.unpack_from(buf, HEADER.size)[1]
    if disk >= 1 << 63:
        raise FormatError("disk size 0x%x is too large" % disk, path=path, field="disk")
    if catalog > MAX_CATALOG:
        raise FormatError("Catalog size is too large", path=path, field="catalog")
    if extent < MIN_EXTENT:
        raise FormatError("Extent size must be at least 512", path=path, field="extent")
    if extent & (extent - 1):
        raise FormatError("Extent size %d is not a power of two" % extent, path=path, field="extent")
    if extent > MAX_EXTENT:
        raise FormatError("Extent size %d is too large" % extent, path=path, field="extent")
    h = Header(version, header, catalog, bitmap, extent, disk)
    sectors_per_extent = extent // SECTOR
    if catalog < -(-(disk // SECTOR) // sectors_per_extent):
        raise FormatError("Catalog size is too small for this disk size", path=path, field="catalog")
    return h


def parse_catalog(buf: bytes) -> "array.array[int]":
    catalog = array.array("I", buf)
    if sys.byteorder != "little":
        catalog.byteswap()
    return catalog
