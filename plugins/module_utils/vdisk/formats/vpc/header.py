"""VHD (vpc) on-disk structures: the hard disk footer, the dynamic disk header, CHS geometry.

References: Microsoft's "Virtual Hard Disk Image Format Specification" (October 2006): "Hard Disk
Footer Format", "Dynamic Disk Header Format", "Block Allocation Table and Data Blocks", appendix
"CHS Calculation"; QEMU 7.2 block/vpc.c for what qemu-img writes and how it sizes images it reads
(creator applications that use the CHS geometry, ``force_size``, the 2040 GiB limit). Everything is
big-endian. Parsing works on bytes; reading the file is the image's business.
"""
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from ...errors import CorruptImage, FormatError, InvalidOption

SECTOR = 512
FOOTER_SIZE = 512
COOKIE = b"conectix"
DYN_COOKIE = b"cxsparse"
FEATURES_RESERVED = 0x00000002          # "always set"
FORMAT_VERSION = 0x00010000
DYN_VERSION = 0x00010000
TYPE_FIXED = 2
TYPE_DYNAMIC = 3
TYPE_DIFFERENCING = 4
NO_OFFSET = 0xFFFFFFFFFFFFFFFF          # "next structure": none (MS tools want all 64 bits set)
TIMESTAMP_BASE = 946684800              # 2000-01-01 00:00:00 UTC
BAT_UNUSED = 0xFFFFFFFF
DEFAULT_BLOCK_SIZE = 0x200000           # 2 MiB, what qemu-img writes
BAT_OFFSET = 3 * SECTOR                 # footer copy, dynamic header (1024 bytes), then the BAT

CHS_MAX_C = 65535
CHS_MAX_H = 16
CHS_MAX_S = 255
MAX_GEOMETRY = CHS_MAX_C * CHS_MAX_H * CHS_MAX_S      # sectors; the CHS that means "use current_size"
MAX_SECTORS = 0xFF000000                               # 2040 GiB: QEMU's limit
INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1

# creator applications whose images are sized by current_size rather than by CHS (QEMU 7.2's table;
# Virtual PC "vpc " and old qemu-img "qemu" use the geometry)
SIZE_FROM_FOOTER_APPS = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")

# cookie features version data_offset timestamp creator_app creator_version(major, minor) creator_os
# original_size current_size cylinders heads sectors disk_type checksum uuid saved_state reserved
FOOTER = struct.Struct(">8sIIQI4sHH4sQQHBBII16sB427s")
FOOTER_FIELDS = ("cookie", "features", "version", "data_offset", "timestamp", "creator_app", "major", "minor",
                 "creator_os", "orig_size", "current_size", "cylinders", "heads", "secs_per_cyl", "disk_type",
                 "checksum", "uuid", "saved_state", "reserved")
CHECKSUM_AT = 64                         # byte offset of the footer's checksum field

# cookie data_offset table_offset header_version max_table_entries block_size checksum parent_uuid
# parent_timestamp reserved parent_unicode_name[512] parent_locators[8 * 24] reserved2[256]
DYN_HEADER = struct.Struct(">8sQQIIII16sII512s192s256s")
DYN_HEADER_SIZE = DYN_HEADER.size        # 1024 (struct format above)
DYN_FIELDS = ("cookie", "data_offset", "table_offset", "version", "max_table_entries", "block_size", "checksum",
              "parent_uuid", "parent_timestamp", "reserved", "parent_name", "parent_locators", "reserved2")
DYN_CHECKSUM_AT = 36

# a parent locator entry of a differencing disk: platform code, platform data space, platform data
# length (bytes), reserved, platform data offset (bytes from the start of the file)
PARENT_LOCATOR = struct.Struct(">4sIIIQ")
PARENT_LOCATORS = 8
MAX_LOCATOR_DATA = 64 * 1024            # a path; vdisk never reads more than this of one
# how each platform code stores its path ("Mac " is an alias record, not a path)
LOCATOR_ENCODINGS = {b"W2ru": "utf-16-le", b"W2ku": "utf-16-le", b"Wi2r": "latin-1", b"Wi2k": "latin-1",
                     b"MacX": "utf-8"}


def checksum(buf: bytes, skip_at: int) -> int:
    """One's complement of the byte sum, the 4 checksum bytes at *skip_at* counted as zero."""
    return ~(sum(buf) - sum(buf[skip_at:skip_at + 4])) & 0xFFFFFFFF


@dataclass
class Footer:
    cookie: bytes = COOKIE
    features: int = FEATURES_RESERVED
    version: int = FORMAT_VERSION
    data_offset: int = NO_OFFSET
    timestamp: int = 0
    creator_app: bytes = b"qemu"
    major: int = 5                       # Virtual PC 2007's version, as qemu-img writes it
    minor: int = 3
    creator_os: bytes = b"Wi2k"
    orig_size: int = 0
    current_size: int = 0
    cylinders: int = 0
    heads: int = 0
    secs_per_cyl: int = 0
    disk_type: int = TYPE_DYNAMIC
    checksum: int = 0
    uuid: bytes = bytes(16)
    saved_state: int = 0
    reserved: bytes = field(default=bytes(427))

    def pack(self) -> bytes:
        """The footer with a fresh checksum."""
        self.checksum = 0
        raw = FOOTER.pack(*(getattr(self, n) for n in FOOTER_FIELDS))
        self.checksum = checksum(raw, CHECKSUM_AT)
        return FOOTER.pack(*(getattr(self, n) for n in FOOTER_FIELDS))

    @property
    def chs_sectors(self) -> int:
        return self.cylinders * self.heads * self.secs_per_cyl

    def uses_current_size(self) -> bool:
        """QEMU 7.2's rule: Hyper-V, new qemu-img (force_size) and others size the disk by current_size;
        Virtual PC and old qemu-img by CHS, unless the geometry is the maximum one."""
        return self.creator_app in SIZE_FROM_FOOTER_APPS or self.chs_sectors == MAX_GEOMETRY

    @property
    def virtual_sectors(self) -> int:
        return self.current_size // SECTOR if self.uses_current_size() else self.chs_sectors


def parse_footer(buf: bytes, path: Optional[str] = None) -> Footer:
    """A footer whose cookie has been found; the checksum must match (QEMU refuses the image otherwise)."""
    f = Footer(*FOOTER.unpack(bytes(buf[:FOOTER_SIZE]).ljust(FOOTER_SIZE, b"\0")))
    if checksum(buf[:FOOTER_SIZE], CHECKSUM_AT) != f.checksum:
        raise CorruptImage("Incorrect header checksum", path=path, field="footer checksum")
    return f


@dataclass
class DynHeader:
    cookie: bytes = DYN_COOKIE
    data_offset: int = NO_OFFSET
    table_offset: int = BAT_OFFSET
    version: int = DYN_VERSION
    max_table_entries: int = 0
    block_size: int = DEFAULT_BLOCK_SIZE
    checksum: int = 0
    parent_uuid: bytes = bytes(16)
    parent_timestamp: int = 0
    reserved: int = 0
    parent_name: bytes = bytes(512)
    parent_locators: bytes = bytes(192)
    reserved2: bytes = bytes(256)

    def pack(self) -> bytes:
        self.checksum = 0
        raw = DYN_HEADER.pack(*(getattr(self, n) for n in DYN_FIELDS))
        self.checksum = checksum(raw, DYN_CHECKSUM_AT)
        return DYN_HEADER.pack(*(getattr(self, n) for n in DYN_FIELDS))

    @property
    def bitmap_size(self) -> int:
        """Bytes of the sector bitmap before each data block (one bit a sector, whole sectors)."""
        return -(-(self.block_size // (8 * SECTOR)) // SECTOR) * SECTOR


def parse_dyn_header(buf: bytes, virtual_sectors: int, path: Optional[str] = None) -> DynHeader:
    """The dynamic disk header, validated as QEMU 7.2 validates it (it does not check its checksum)."""
    d = DynHeader(*DYN_HEADER.unpack(bytes(buf[:DYN_HEADER_SIZE]).ljust(DYN_HEADER_SIZE, b"\0")))
    if d.cookie != DYN_COOKIE:
        raise FormatError("Invalid header magic", path=path, field="dynamic header")
    bs = d.block_size
    if bs < SECTOR or bs & (bs - 1):
        raise CorruptImage("Invalid block size %d" % bs, path=path, field="block_size")
    if virtual_sectors * SECTOR // bs > 0xFFFFFFFF:
        raise CorruptImage("Too many blocks", path=path, field="block_size")
    if d.max_table_entries * bs < virtual_sectors * SECTOR:
        raise CorruptImage("Page table too small", path=path, field="max_table_entries")
    if d.max_table_entries > INT_MAX // 4:
        raise CorruptImage("Max Table Entries too large (%d)" % _int32(d.max_table_entries), path=path,
                           field="max_table_entries")
    return d


def _int32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


def calculate_geometry(total_sectors: int) -> Tuple[int, int, int]:
    """(cylinders, heads, sectors per track) for *total_sectors*: the spec's algorithm with QEMU's
    extension past 127 GB (16 heads, 255 sectors). The geometry may round the size down."""
    total_sectors = min(total_sectors, MAX_GEOMETRY)
    if total_sectors >= CHS_MAX_C * 16 * 63:
        spc, heads = 255, 16
        cth = total_sectors // spc
    else:
        spc = 17
        cth = total_sectors // spc
        heads = max(4, -(-cth // 1024))
        if cth >= heads * 1024 or heads > 16:
            spc, heads = 31, 16
            cth = total_sectors // spc
        if cth >= heads * 1024:
            spc, heads = 63, 16
            cth = total_sectors // spc
    return cth // heads, heads, spc


def rounded_size(size: int, force_size: bool) -> Tuple[int, Tuple[int, int, int]]:
    """(virtual size in bytes, CHS) qemu-img create gives a *size*-byte request (a multiple of 512).

    Without force_size the size grows until a geometry covers it (so convert never truncates);
    a size past what CHS can describe gets the maximum geometry and keeps its exact size."""
    if force_size:
        chs = (CHS_MAX_C, CHS_MAX_H, CHS_MAX_S)
    else:
        total = min(MAX_GEOMETRY, size // SECTOR)
        chs = (0, 0, 0)
        i = 0
        while total > chs[0] * chs[1] * chs[2]:
            chs = calculate_geometry(total + i)
            i += 1
    if chs[0] * chs[1] * chs[2] == MAX_GEOMETRY:
        sectors = size // SECTOR
        if sectors > MAX_SECTORS:
            raise InvalidOption("The image size is too large for file format 'vpc'", field="size")
    else:
        sectors = chs[0] * chs[1] * chs[2]
    return sectors * SECTOR, chs


def new_footer(size: int, chs: Tuple[int, int, int], fixed: bool, force_size: bool,
               data_offset: int = SECTOR) -> Footer:
    """The footer qemu-img create writes (creator "qem2" when force_size, so readers take current_size)."""
    return Footer(data_offset=NO_OFFSET if fixed else data_offset,
                  timestamp=(int(time.time()) - TIMESTAMP_BASE) & 0xFFFFFFFF,
                  creator_app=b"qem2" if force_size else b"qemu", orig_size=size, current_size=size,
                  cylinders=chs[0], heads=chs[1], secs_per_cyl=chs[2],
                  disk_type=TYPE_FIXED if fixed else TYPE_DYNAMIC, uuid=uuid.uuid4().bytes)


def bat_bytes(entries: int) -> int:
    return -(-entries * 4 // SECTOR) * SECTOR


@dataclass(frozen=True)
class ParentLocator:
    code: bytes
    length: int
    offset: int

    def decode(self, data: bytes) -> Optional[str]:
        """The path this locator stores in *data*, or None for a platform code that is not a path."""
        encoding = LOCATOR_ENCODINGS.get(self.code)
        return data.decode(encoding, "replace").rstrip("\0") if encoding else None


def parent_locators(d: "DynHeader") -> List[ParentLocator]:
    """The used parent locator entries of a dynamic header (a differencing disk's links to its parent)."""
    out = []
    for i in range(PARENT_LOCATORS):
        code, dummy, length, dummy2, offset = PARENT_LOCATOR.unpack_from(d.parent_locators, i * PARENT_LOCATOR.size)
        if code != bytes(4) and length:
            out.append(ParentLocator(code, length, offset))
    return out
