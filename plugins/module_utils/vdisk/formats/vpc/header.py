"""VHD (vpc) on-disk structures: the hard disk footer, the dynamic disk header and its parent
locator entries (declared records, the specification's field names), CHS geometry.

References: Microsoft's "Virtual Hard Disk Image Format Specification" (October 2006): "Hard Disk
Footer Format", "Dynamic Disk Header Format", "Block Allocation Table and Data Blocks", appendix
"CHS Calculation"; QEMU 7.2 block/vpc.c for what qemu-img writes and how it sizes images it reads
(creator applications that use the CHS geometry, ``force_size``, the 2040 GiB limit). Everything is
big-endian. Parsing works on bytes; reading the file is the image's business.
"""
import time
import uuid
from typing import List, Optional, Tuple

from ...errors import CorruptImage, FormatError, InvalidOption
from ...structure import Record, disk, record

SECTOR = 512
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

PARENT_LOCATORS = 8                     # entries in a dynamic disk header
MAX_LOCATOR_DATA = 64 * 1024            # a path; vdisk never reads more than this of one
# how each platform code stores its path ("Mac " is an alias record, not a path)
LOCATOR_ENCODINGS = {b"W2ru": "utf-16-le", b"W2ku": "utf-16-le", b"Wi2r": "latin-1", b"Wi2k": "latin-1",
                     b"MacX": "utf-8"}


def checksum(buf: bytes, skip_at: int) -> int:
    """One's complement of the byte sum, the 4 checksum bytes at *skip_at* counted as zero."""
    return ~(sum(buf) - sum(buf[skip_at:skip_at + 4])) & 0xFFFFFFFF


@record(">")
class Footer(Record):
    """The hard disk footer (spec: "Hard Disk Footer Format"), at the end of every disk; a dynamic
    disk keeps a copy at offset 0."""
    cookie: bytes = disk("8s", COOKIE, shown="text")
    features: int = disk("I", FEATURES_RESERVED, shown="hex")
    file_format_version: int = disk("I", FORMAT_VERSION, shown="hex")
    data_offset: int = disk("Q", NO_OFFSET, shown="hex")
    time_stamp: int = disk("I")                   # seconds since TIMESTAMP_BASE
    creator_application: bytes = disk("4s", b"qemu", shown="text")
    creator_version: int = disk("I", 0x00050003, shown="hex")    # Virtual PC 2007's 5.3, as qemu-img writes it
    creator_host_os: bytes = disk("4s", b"Wi2k", shown="text")
    original_size: int = disk("Q")
    current_size: int = disk("Q")
    cylinders: int = disk("H")                    # the disk geometry: cylinders, heads, sectors per track
    heads: int = disk("B")
    sectors_per_track: int = disk("B")
    disk_type: int = disk("I", TYPE_DYNAMIC)
    checksum: int = disk("I", 0, shown="hex")
    unique_id: bytes = disk("16s")
    saved_state: int = disk("B")
    reserved: bytes = disk("427s")

    def pack(self) -> bytes:
        """The footer with a fresh checksum."""
        self.checksum = 0
        self.checksum = checksum(super().pack(), self.offset("checksum"))
        return super().pack()

    @property
    def creator_app(self) -> bytes:
        """The creator application (QEMU's name for it)."""
        return self.creator_application

    @property
    def chs_sectors(self) -> int:
        return self.cylinders * self.heads * self.sectors_per_track

    def uses_current_size(self) -> bool:
        """QEMU 7.2's rule: Hyper-V, new qemu-img (force_size) and others size the disk by current_size;
        Virtual PC and old qemu-img by CHS, unless the geometry is the maximum one."""
        return self.creator_application in SIZE_FROM_FOOTER_APPS or self.chs_sectors == MAX_GEOMETRY

    @property
    def virtual_sectors(self) -> int:
        return self.current_size // SECTOR if self.uses_current_size() else self.chs_sectors


FOOTER_SIZE = Footer.SIZE                # 512


def parse_footer(buf: bytes, path: Optional[str] = None) -> Footer:
    """A footer whose cookie has been found; the checksum must match (QEMU refuses the image otherwise)."""
    f = Footer.unpack(bytes(buf[:FOOTER_SIZE]).ljust(FOOTER_SIZE, b"\0"))
    if checksum(buf[:FOOTER_SIZE], Footer.offset("checksum")) != f.checksum:
        raise CorruptImage("Incorrect header checksum", path=path, field="footer checksum")
    return f


@record(">")
class ParentLocatorEntry(Record):
    """One of a dynamic header's eight parent locator entries: where a differencing disk stores a
    path of its parent, and how (the platform code)."""
    platform_code: bytes = disk("4s", shown="text")
    platform_data_space: int = disk("I")          # sectors reserved for the data
    platform_data_length: int = disk("I")         # bytes of data
    reserved: int = disk("I")
    platform_data_offset: int = disk("Q", shown="hex")

    @property
    def used(self) -> bool:
        return self.platform_code != bytes(4) and self.platform_data_length != 0

    def decode(self, data: bytes) -> Optional[str]:
        """The path this locator stores in *data*, or None for a platform code that is not a path."""
        encoding = LOCATOR_ENCODINGS.get(self.platform_code)
        return data.decode(encoding, "replace").rstrip("\0") if encoding else None


@record(">")
class DynHeader(Record):
    """The dynamic disk header (spec: "Dynamic Disk Header Format"), at the footer's data_offset."""
    cookie: bytes = disk("8s", DYN_COOKIE, shown="text")
    data_offset: int = disk("Q", NO_OFFSET, shown="hex")
    table_offset: int = disk("Q", BAT_OFFSET, shown="hex")
    header_version: int = disk("I", DYN_VERSION, shown="hex")
    max_table_entries: int = disk("I")
    block_size: int = disk("I", DEFAULT_BLOCK_SIZE, shown="hex")
    checksum: int = disk("I", 0, shown="hex")
    parent_unique_id: bytes = disk("16s")
    parent_time_stamp: int = disk("I")
    reserved: int = disk("I")
    parent_unicode_name: bytes = disk("512s")     # UTF-16 (big-endian)
    parent_locator_entries: bytes = disk("%ds" % (PARENT_LOCATORS * ParentLocatorEntry.SIZE))
    reserved2: bytes = disk("256s")

    def pack(self) -> bytes:
        """The header with a fresh checksum (QEMU does not check it; Microsoft's tools do)."""
        self.checksum = 0
        self.checksum = checksum(super().pack(), self.offset("checksum"))
        return super().pack()

    @property
    def bitmap_size(self) -> int:
        """Bytes of the sector bitmap before each data block (one bit a sector, whole sectors)."""
        return -(-(self.block_size // (8 * SECTOR)) // SECTOR) * SECTOR

    def locator_entry(self, index: int) -> ParentLocatorEntry:
        """Parent locator entry *index* (0..7); :meth:`locator_offset` is where it lies."""
        return ParentLocatorEntry.unpack(self.parent_locator_entries, index * ParentLocatorEntry.SIZE)

    @classmethod
    def locator_offset(cls, index: int) -> int:
        """Where parent locator entry *index* starts, from the start of the header."""
        return cls.offset("parent_locator_entries") + index * ParentLocatorEntry.SIZE

    def parent_locators(self) -> List[ParentLocatorEntry]:
        """The used parent locator entries (a differencing disk's links to its parent)."""
        return [e for e in map(self.locator_entry, range(PARENT_LOCATORS)) if e.used]


DYN_HEADER_SIZE = DynHeader.SIZE         # 1024


def parse_dyn_header(buf: bytes, virtual_sectors: int, path: Optional[str] = None) -> DynHeader:
    """The dynamic disk header, validated as QEMU 7.2 validates it (it does not check its checksum)."""
    d = DynHeader.unpack(bytes(buf[:DYN_HEADER_SIZE]).ljust(DYN_HEADER_SIZE, b"\0"))
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
                  time_stamp=(int(time.time()) - TIMESTAMP_BASE) & 0xFFFFFFFF,
                  creator_application=b"qem2" if force_size else b"qemu", original_size=size, current_size=size,
                  cylinders=chs[0], heads=chs[1], sectors_per_track=chs[2],
                  disk_type=TYPE_FIXED if fixed else TYPE_DYNAMIC, unique_id=uuid.uuid4().bytes)


def bat_bytes(entries: int) -> int:
    return -(-entries * 4 // SECTOR) * SECTOR
