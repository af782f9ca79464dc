"""VHDX on-disk structures: file identifier, headers, region table, metadata, BAT entries, log records.

References: Microsoft's "VHDX Format Specification" v1.00 (MS-VHDX): 2.2 "Header Section" (file
type identifier, headers, region table), 2.3 "Log", 2.5 "BAT" (payload and sector bitmap block
states, chunk ratio), 2.6 "Metadata Region" (file parameters, virtual disk size, page 83 data,
logical and physical sector size); QEMU 7.2 block/vhdx.c, vhdx-log.c for what qemu-img writes
and the validation it applies. Everything is little-endian; GUIDs are stored in Microsoft's mixed
endian layout (``uuid.UUID.bytes_le``). Parsing works on bytes; reading the file is the image's.
"""
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Type, Union

from ...errors import CorruptImage, FormatError, UnsupportedFeature
from ...structure import Record, disk, record
from .crc32c import checksum

KiB = 1024
MiB = 1024 * KiB
TiB = 1024 * 1024 * MiB

FILE_SIGNATURE = b"vhdxfile"
HEADER_SIGNATURE = b"head"
REGION_SIGNATURE = b"regi"
METADATA_SIGNATURE = b"metadata"
LOG_SIGNATURE = b"loge"
DESC_SIGNATURE = b"desc"
ZERO_SIGNATURE = b"zero"
DATA_SIGNATURE = b"data"

BLOCK_64K = 64 * KiB                 # each object of the header section
HEADER1_OFFSET = 1 * BLOCK_64K
HEADER2_OFFSET = 2 * BLOCK_64K
REGION1_OFFSET = 3 * BLOCK_64K
REGION2_OFFSET = 4 * BLOCK_64K
HEADER_SECTION_END = 1 * MiB
HEADER_SIZE = 4 * KiB                # the header's checksum covers 4 KiB
REGION_TABLE_SIZE = 64 * KiB         # so does the region table's, 64 KiB
MAX_REGION_ENTRIES = 2047
METADATA_TABLE_SIZE = 64 * KiB
MAX_METADATA_ENTRIES = 2047
METADATA_ITEM_MAX = 1 * MiB          # "Length ... MUST be less than or equal to 1 MB"

BLOCK_SIZE_MIN = 1 * MiB
BLOCK_SIZE_MAX = 256 * MiB
MAX_IMAGE_SIZE = 64 * TiB
MAX_SECTORS_PER_BLOCK = 1 << 23      # the chunk ratio's numerator
DEFAULT_LOG_SIZE = 1 * MiB
LOG_SECTOR = 4 * KiB

# payload block states (low 3 bits of a BAT entry); QEMU 7.2 also reads 5, the v0.95 "unmapped"
PAYLOAD_BLOCK_NOT_PRESENT = 0
PAYLOAD_BLOCK_UNDEFINED = 1
PAYLOAD_BLOCK_ZERO = 2
PAYLOAD_BLOCK_UNMAPPED = 3
PAYLOAD_BLOCK_UNMAPPED_V095 = 5
PAYLOAD_BLOCK_FULLY_PRESENT = 6
PAYLOAD_BLOCK_PARTIALLY_PRESENT = 7
ZERO_STATES = frozenset((PAYLOAD_BLOCK_NOT_PRESENT, PAYLOAD_BLOCK_UNDEFINED, PAYLOAD_BLOCK_ZERO,
                         PAYLOAD_BLOCK_UNMAPPED, PAYLOAD_BLOCK_UNMAPPED_V095))
SB_BLOCK_NOT_PRESENT = 0
SB_BLOCK_PRESENT = 6
BAT_STATE_MASK = 0x7
BAT_OFFSET_MASK = 0xFFFFFFFFFFF00000   # FileOffsetMB, bits 20..63, already in bytes

REGION_REQUIRED = 0x1
META_IS_USER = 0x1
META_IS_VIRTUAL_DISK = 0x2
META_IS_REQUIRED = 0x4
PARAMS_LEAVE_BLOCKS_ALLOCATED = 0x1
PARAMS_HAS_PARENT = 0x2


def _guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


BAT_GUID = _guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS_GUID = _guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE_GUID = _guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE83_GUID = _guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_GUID = _guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_GUID = _guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR_GUID = _guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
ZERO_GUID = bytes(16)


def _seal(buf: bytearray, head: Record) -> None:
    """Set the CRC-32C of *buf* (the checksum field of *head*, at the start of *buf*, counted as
    zeros) in *head* and in *buf*."""
    head.checksum = checksum(buf, head.offset("checksum"))
    data, at = head.pack_fields("checksum")
    buf[at:at + len(data)] = data


@record("<")
class FileIdentifier(Record):
    """The file type identifier (2.2.1) at offset 0 (the rest of its 64 KiB is reserved)."""
    signature: bytes = disk("8s", FILE_SIGNATURE, shown="text")
    creator: bytes = disk("512s")                 # UTF-16LE: the application that created the file


@record("<")
class Header(Record):
    """A header (2.2.2), at HEADER1_OFFSET and HEADER2_OFFSET. Its checksum covers HEADER_SIZE
    bytes: the fields and the reserved bytes after them, which are not a field (an update keeps
    the ones on disk, see :meth:`pack`)."""
    signature: bytes = disk("4s", HEADER_SIGNATURE, shown="text")
    checksum: int = disk("I", 0, shown="hex")
    sequence_number: int = disk("Q")
    file_write_guid: bytes = disk("16s", ZERO_GUID)
    data_write_guid: bytes = disk("16s", ZERO_GUID)
    log_guid: bytes = disk("16s", ZERO_GUID)
    log_version: int = disk("H")
    version: int = disk("H", 1)
    log_length: int = disk("I", DEFAULT_LOG_SIZE, shown="hex")
    log_offset: int = disk("Q", HEADER_SECTION_END, shown="hex")

    def pack(self, reserved: bytes = b"") -> bytes:
        """The 4 KiB header block with a fresh checksum; *reserved* is what follows the fields (the
        checksum covers it: an update keeps the bytes another writer may have left there)."""
        buf = bytearray(HEADER_SIZE)
        self.checksum = 0
        buf[:self.SIZE] = super().pack()
        buf[self.SIZE:self.SIZE + len(reserved)] = reserved[:HEADER_SIZE - self.SIZE]
        _seal(buf, self)
        return bytes(buf)


HEADER = Header.LAYOUT.struct                # the fields alone (80 bytes)


def parse_header(buf: bytes) -> Optional[Header]:
    """A header that QEMU counts as valid (checksum over 4 KiB, signature, version 1), else None."""
    buf = bytes(buf[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
    h = Header.unpack(buf)
    if checksum(buf, Header.offset("checksum")) != h.checksum or h.signature != HEADER_SIGNATURE or h.version != 1:
        return None
    return h


def pick_header(h1: Optional[Header], h2: Optional[Header], path: Optional[str] = None) -> int:
    """Index (0, 1) of the current header: the valid one with the higher sequence number. Equal
    numbers are an error unless both headers are identical (Disk2VHD writes two such headers)."""
    if h1 is None and h2 is None:
        raise FormatError("No valid VHDX header found", path=path, field="header")
    if h2 is None:
        return 0
    if h1 is None:
        return 1
    if h1.sequence_number != h2.sequence_number:
        return 0 if h1.sequence_number > h2.sequence_number else 1
    if h1 == h2:
        return 0
    raise CorruptImage("No valid VHDX header found: both headers have sequence number %d" % h1.sequence_number,
                       path=path, field="header")


@record("<")
class RegionTableHeader(Record):
    """The region table header (2.2.3.1); the table's checksum covers REGION_TABLE_SIZE bytes."""
    signature: bytes = disk("4s", REGION_SIGNATURE, shown="text")
    checksum: int = disk("I", 0, shown="hex")
    entry_count: int = disk("I")
    reserved: int = disk("I")


@record("<")
class RegionTableEntry(Record):
    """A region table entry (2.2.3.2): where the region of type *guid* lies."""
    guid: bytes = disk("16s")
    file_offset: int = disk("Q", shown="hex")
    length: int = disk("I", shown="hex")
    required: int = disk("I", shown="hex")        # bit 0: Required; bits 1..31 reserved


def region_entry_offset(index: int) -> int:
    """Where region table entry *index* starts, from the start of the table."""
    return RegionTableHeader.SIZE + index * RegionTableEntry.SIZE


def region_entries(buf: bytes, count: int) -> List[RegionTableEntry]:
    """The first *count* entries of the region table *buf*, as stored."""
    return [RegionTableEntry.unpack(buf, region_entry_offset(i)) for i in range(count)]


def pack_region_table(entries: List[RegionTableEntry]) -> bytes:
    """The 64 KiB region table of *entries*, with its checksum."""
    head = RegionTableHeader(entry_count=len(entries))
    raw = head.pack() + b"".join(e.pack() for e in entries)
    buf = bytearray(REGION_TABLE_SIZE)
    buf[:len(raw)] = raw
    _seal(buf, head)
    return bytes(buf)


def parse_region_table(buf: bytes, path: Optional[str] = None) -> Tuple[RegionTableEntry, RegionTableEntry]:
    """The BAT and metadata regions of a 64 KiB region table (checksum, signature, at most 2047
    entries, no overlaps with each other or the header section, both regions present once,
    unknown required regions refused)."""
    buf = bytes(buf[:REGION_TABLE_SIZE]).ljust(REGION_TABLE_SIZE, b"\0")
    head = RegionTableHeader.unpack(buf)
    if checksum(buf, RegionTableHeader.offset("checksum")) != head.checksum:
        raise CorruptImage("region table checksum mismatch", path=path, field="region table")
    if head.signature != REGION_SIGNATURE:
        raise FormatError("region table signature is not 'regi'", path=path, field="region table")
    count = head.entry_count
    if count > MAX_REGION_ENTRIES:
        raise CorruptImage("region table has %d entries (at most %d)" % (count, MAX_REGION_ENTRIES), path=path,
                           field="region table")
    found: Dict[bytes, RegionTableEntry] = {}
    for i, r in enumerate(region_entries(buf, count)):
        if r.guid in (BAT_GUID, METADATA_GUID):
            if r.guid in found:
                raise CorruptImage("region table lists the %s region twice" % _region_name(r.guid), path=path,
                                   field="region table")
            found[r.guid] = r
        elif r.required & REGION_REQUIRED:
            raise UnsupportedFeature("region table entry %d is a required region of unknown type %s"
                                     % (i, uuid.UUID(bytes_le=r.guid)), path=path, field="region table")
    for guid in (BAT_GUID, METADATA_GUID):
        if guid not in found:
            raise CorruptImage("region table has no %s region" % _region_name(guid), path=path, field="region table")
    bat, meta = found[BAT_GUID], found[METADATA_GUID]
    for r in (bat, meta):
        name = _region_name(r.guid)
        if r.file_offset < HEADER_SECTION_END or r.file_offset % MiB or r.length % MiB or not r.length:
            raise CorruptImage("%s region at 0x%x (length 0x%x) is not a non-empty 1 MiB-aligned range past the "
                               "header section" % (name, r.file_offset, r.length), path=path, field="region table")
    if overlaps(bat.file_offset, bat.length, meta.file_offset, meta.length):
        raise CorruptImage("BAT and metadata regions overlap", path=path, field="region table")
    return bat, meta


def _region_name(guid: bytes) -> str:
    return "BAT" if guid == BAT_GUID else "metadata"


def overlaps(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


@dataclass
class Metadata:
    """What the required metadata items say, validated (held in memory, not a stored structure)."""
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_disk_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83: bytes


@record("<")
class MetadataTableHeader(Record):
    """The metadata table header (2.6.1.1), at the start of the metadata region."""
    signature: bytes = disk("8s", METADATA_SIGNATURE, shown="text")
    reserved: int = disk("H")
    entry_count: int = disk("H")
    reserved2: bytes = disk("20s")


@record("<")
class MetadataTableEntry(Record):
    """A metadata table entry (2.6.1.2): where item *item_id* lies in the metadata region."""
    item_id: bytes = disk("16s")
    item_offset: int = disk("I", shown="hex")     # the spec's Offset (``offset`` is the record's method)
    length: int = disk("I")
    flags: int = disk("I", shown="hex")           # bits 0..2: IsUser, IsVirtualDisk, IsRequired; the rest reserved
    reserved2: int = disk("I")


def metadata_entry_offset(index: int) -> int:
    """Where metadata table entry *index* starts, from the start of the table."""
    return MetadataTableHeader.SIZE + index * MetadataTableEntry.SIZE


def metadata_entries(buf: bytes, count: int) -> List[MetadataTableEntry]:
    """The first *count* entries of the metadata table *buf*, as stored."""
    return [MetadataTableEntry.unpack(buf, metadata_entry_offset(i)) for i in range(count)]


def pack_metadata_table(entries: List[MetadataTableEntry]) -> bytes:
    """The 64 KiB metadata table of *entries* (it has no checksum)."""
    raw = MetadataTableHeader(entry_count=len(entries)).pack() + b"".join(e.pack() for e in entries)
    return raw.ljust(METADATA_TABLE_SIZE, b"\0")


@record("<")
class FileParameters(Record):
    """The file parameters item (2.6.2.1)."""
    block_size: int = disk("I", shown="hex")
    flags: int = disk("I", shown="hex")           # bit 0: LeaveBlockAllocated, bit 1: HasParent; the rest reserved


@record("<")
class VirtualDiskSize(Record):
    """The virtual disk size item (2.6.2.2), in bytes."""
    virtual_disk_size: int = disk("Q")


@record("<")
class Page83Data(Record):
    """The page 83 data item (2.6.2.3)."""
    page_83_data: bytes = disk("16s")             # a GUID: the disk's SCSI identity


@record("<")
class LogicalSectorSize(Record):
    """The logical sector size item (2.6.2.4)."""
    logical_sector_size: int = disk("I")


@record("<")
class PhysicalSectorSize(Record):
    """The physical sector size item (2.6.2.5)."""
    physical_sector_size: int = disk("I")


@record("<")
class ParentLocatorHeader(Record):
    """The parent locator item's header (2.6.2.6.1), then its key-value entries."""
    locator_type: bytes = disk("16s")
    reserved: int = disk("H")
    key_value_count: int = disk("H")


@record("<")
class ParentLocatorEntry(Record):
    """A parent locator key-value entry (2.6.2.6.2): offsets from the start of the item, lengths in
    bytes of UTF-16LE."""
    key_offset: int = disk("I", shown="hex")
    value_offset: int = disk("I", shown="hex")
    key_length: int = disk("H")
    value_length: int = disk("H")


LOCATOR_PATH_KEYS = ("relative_path", "volume_path", "absolute_win32_path")    # the keys whose values are paths

# item guid -> (name, record); the parent locator has no minimum length (its entries vary)
METADATA_ITEMS: Dict[bytes, Tuple[str, Optional[Type[Record]]]] = {
    FILE_PARAMETERS_GUID: ("file parameters", FileParameters),
    VIRTUAL_DISK_SIZE_GUID: ("virtual disk size", VirtualDiskSize),
    PAGE83_GUID: ("page 83 data", Page83Data),
    LOGICAL_SECTOR_GUID: ("logical sector size", LogicalSectorSize),
    PHYSICAL_SECTOR_GUID: ("physical sector size", PhysicalSectorSize),
    PARENT_LOCATOR_GUID: ("parent locator", None)}


def parse_metadata_table(buf: bytes, region_length: int, path: Optional[str] = None) -> Dict[bytes, Tuple[int, int]]:
    """``item guid -> (offset in the region, length)`` of the known items of the 64 KiB metadata table;
    every required item present once and inside the region."""
    buf = bytes(buf[:METADATA_TABLE_SIZE]).ljust(METADATA_TABLE_SIZE, b"\0")
    head = MetadataTableHeader.unpack(buf)
    if head.signature != METADATA_SIGNATURE:
        raise FormatError("metadata table signature is not 'metadata'", path=path, field="metadata")
    count = head.entry_count
    if count > MAX_METADATA_ENTRIES:
        raise CorruptImage("metadata table has %d entries (at most %d)" % (count, MAX_METADATA_ENTRIES),
                           path=path, field="metadata")
    items: Dict[bytes, Tuple[int, int]] = {}
    for e in metadata_entries(buf, count):
        known = METADATA_ITEMS.get(e.item_id)
        if known is None:
            if e.flags & META_IS_REQUIRED:
                raise UnsupportedFeature("metadata item %s is required but unknown" % uuid.UUID(bytes_le=e.item_id),
                                         path=path, field="metadata")
            continue
        name, rec = known
        offset, length = e.item_offset, e.length
        if e.item_id in items:
            raise CorruptImage("metadata table lists the %s item twice" % name, path=path, field="metadata")
        if length < (rec.SIZE if rec else 0) or length > METADATA_ITEM_MAX or offset < METADATA_TABLE_SIZE \
                or offset + length > region_length:
            raise CorruptImage("metadata item %s at 0x%x (length %d) lies outside the metadata region"
                               % (name, offset, length), path=path, field="metadata")
        items[e.item_id] = (offset, length)
    for guid, (name, dummy) in METADATA_ITEMS.items():
        if guid != PARENT_LOCATOR_GUID and guid not in items:
            raise CorruptImage("metadata item %s is missing" % name, path=path, field="metadata")
    return items


def parse_metadata_items(raw: Dict[bytes, bytes], has_locator: bool, path: Optional[str] = None) -> Metadata:
    """The values of the five required items (bytes of each item, at least its record), validated."""
    params = FileParameters.unpack(raw[FILE_PARAMETERS_GUID])
    block_size, bits = params.block_size, params.flags
    size = VirtualDiskSize.unpack(raw[VIRTUAL_DISK_SIZE_GUID]).virtual_disk_size
    lss = LogicalSectorSize.unpack(raw[LOGICAL_SECTOR_GUID]).logical_sector_size
    pss = PhysicalSectorSize.unpack(raw[PHYSICAL_SECTOR_GUID]).physical_sector_size
    md = Metadata(block_size, bool(bits & PARAMS_LEAVE_BLOCKS_ALLOCATED), bool(bits & PARAMS_HAS_PARENT), size,
                  lss, pss, Page83Data.unpack(raw[PAGE83_GUID]).page_83_data)
    if md.has_parent:
        if not has_locator:
            raise CorruptImage("has_parent is set but there is no parent locator", path=path, field="file parameters")
        raise UnsupportedFeature("differencing VHDX images (with a parent) are not supported", path=path,
                                 field="file parameters")
    if not BLOCK_SIZE_MIN <= block_size <= BLOCK_SIZE_MAX or block_size & (block_size - 1):
        raise CorruptImage("block size %d is not a power of two between 1 MiB and 256 MiB" % block_size, path=path,
                           field="block_size")
    if lss not in (512, 4096):
        raise CorruptImage("logical sector size %d is neither 512 nor 4096" % lss, path=path,
                           field="logical sector size")
    if pss not in (512, 4096):
        raise CorruptImage("physical sector size %d is neither 512 nor 4096" % pss, path=path,
                           field="physical sector size")
    if size > MAX_IMAGE_SIZE or size % lss:
        raise CorruptImage("virtual disk size %d is not a multiple of the sector size up to 64 TiB" % size,
                           path=path, field="virtual disk size")
    return md


def chunk_ratio(block_size: int, logical_sector_size: int) -> int:
    """Payload blocks per sector bitmap block: the BAT has one bitmap entry after each this many."""
    return MAX_SECTORS_PER_BLOCK * logical_sector_size // block_size


def bat_entries(virtual_size: int, block_size: int, ratio: int) -> int:
    """BAT entries of an image without a parent, payload and interleaved bitmap entries, computed in
    32 bits as QEMU 7.2 does (a 0-byte image gets the entries of -1 blocks: its BAT is 64 MiB)."""
    blocks = -(-virtual_size // block_size)
    return (blocks + (((blocks - 1) & 0xFFFFFFFF) // ratio)) & 0xFFFFFFFF


def bat_index(block: int, ratio: int) -> int:
    """The BAT entry of payload block *block*: a sector bitmap entry follows every *ratio* of them."""
    return block + block // ratio


# -- log records (2.3.1) -----------------------------------------------------------------
@record("<")
class LogEntryHeader(Record):
    """A log entry's header (2.3.1.1); its descriptors follow it, its data sectors follow them, and
    its checksum covers the whole entry."""
    signature: bytes = disk("4s", LOG_SIGNATURE, shown="text")
    checksum: int = disk("I", 0, shown="hex")
    entry_length: int = disk("I", shown="hex")
    tail: int = disk("I", shown="hex")
    sequence_number: int = disk("Q")
    descriptor_count: int = disk("I")
    reserved: int = disk("I")
    log_guid: bytes = disk("16s", ZERO_GUID)
    flushed_file_offset: int = disk("Q", shown="hex")
    last_file_offset: int = disk("Q", shown="hex")


@record("<")
class ZeroDescriptor(Record):
    """A zero descriptor (2.3.1.2): *zero_length* bytes of zeros at *file_offset*."""
    zero_signature: bytes = disk("4s", ZERO_SIGNATURE, shown="text")
    reserved: int = disk("I")
    zero_length: int = disk("Q", shown="hex")
    file_offset: int = disk("Q", shown="hex")
    sequence_number: int = disk("Q")


@record("<")
class DataDescriptor(Record):
    """A data descriptor (2.3.1.3): one data sector for the 4 KiB at *file_offset*, whose first 8
    and last 4 bytes it holds itself."""
    data_signature: bytes = disk("4s", DESC_SIGNATURE, shown="text")
    trailing_bytes: int = disk("I", shown="hex")  # the 4 bytes as a little-endian number (as QEMU reads them)
    leading_bytes: bytes = disk("8s")
    file_offset: int = disk("Q", shown="hex")
    sequence_number: int = disk("Q")

    @property
    def trailing(self) -> bytes:
        """The last 4 bytes of the sector, as stored."""
        return self.trailing_bytes.to_bytes(4, "little")


@record("<")
class DataSector(Record):
    """A data sector (2.3.1.4): the middle 4084 bytes of an update, between halves of the sequence number."""
    data_signature: bytes = disk("4s", DATA_SIGNATURE, shown="text")
    sequence_high: int = disk("I", shown="hex")
    data: bytes = disk("4084s")
    sequence_low: int = disk("I", shown="hex")

    @property
    def sequence_number(self) -> int:
        return self.sequence_high << 32 | self.sequence_low


LOG_HEADER = LogEntryHeader.LAYOUT.struct
LOG_DESC = DataDescriptor.LAYOUT.struct      # a zero descriptor's bytes pack through it as well


def parse_log_header(buf: bytes) -> LogEntryHeader:
    return LogEntryHeader.unpack(bytes(buf[:LogEntryHeader.SIZE]).ljust(LogEntryHeader.SIZE, b"\0"))


def descriptor_offset(index: int) -> int:
    """Where descriptor *index* of a log entry starts, from the start of the entry."""
    return LogEntryHeader.SIZE + index * DataDescriptor.SIZE


def parse_descriptor(buf: bytes, index: int) -> Union[ZeroDescriptor, DataDescriptor]:
    """Descriptor *index* of the entry starting *buf*: a zero descriptor by its signature, else a
    data descriptor (whose signature the caller checks)."""
    d = DataDescriptor.unpack(buf, descriptor_offset(index))
    return ZeroDescriptor.unpack(buf, descriptor_offset(index)) if d.data_signature == ZERO_SIGNATURE else d


def desc_sectors(count: int) -> int:
    """4 KiB sectors holding the entry header and *count* descriptors."""
    return -(-descriptor_offset(count) // LOG_SECTOR)


def pack_log_entry(sequence: int, tail: int, log_guid: bytes, file_size: int,
                   sectors: List[Tuple[int, bytes]]) -> bytes:
    """A log entry writing whole 4 KiB *sectors* ``(file offset, data)``: header, data descriptors,
    data sectors, the CRC-32C over all of it."""
    nd = desc_sectors(len(sectors))
    total = (nd + len(sectors)) * LOG_SECTOR
    buf = bytearray(total)
    head = LogEntryHeader(entry_length=total, tail=tail, sequence_number=sequence, descriptor_count=len(sectors),
                          log_guid=log_guid, flushed_file_offset=file_size, last_file_offset=file_size)
    buf[:head.SIZE] = head.pack()
    # the descriptor keeps the bytes of the update that the data sector's signature and
    # sequence number take
    lead, trail = DataSector.offset("data"), DataSector.offset("sequence_low")
    for i, (offset, data) in enumerate(sectors):
        desc = DataDescriptor(trailing_bytes=int.from_bytes(data[trail:trail + 4], "little"),
                              leading_bytes=bytes(data[:lead]), file_offset=offset, sequence_number=sequence)
        at = descriptor_offset(i)
        buf[at:at + desc.SIZE] = desc.pack()
        at = (nd + i) * LOG_SECTOR
        buf[at:at + LOG_SECTOR] = DataSector(sequence_high=sequence >> 32, data=bytes(data[lead:trail]),
                                             sequence_low=sequence & 0xFFFFFFFF).pack()
    _seal(buf, head)
    return bytes(buf)


def parse_parent_locator(buf: bytes, path: Optional[str] = None) -> List[Tuple[str, str]]:
    """The ``(key, value)`` pairs of a parent locator item (*buf* is the whole item)."""
    if len(buf) < ParentLocatorHeader.SIZE:
        raise CorruptImage("the parent locator is truncated", path=path, field="parent locator")
    count = ParentLocatorHeader.unpack(buf).key_value_count
    if ParentLocatorHeader.SIZE + count * ParentLocatorEntry.SIZE > len(buf):
        raise CorruptImage("the parent locator's %d entries do not fit in it" % count, path=path,
                           field="parent locator")
    out = []
    for i in range(count):
        e = ParentLocatorEntry.unpack(buf, ParentLocatorHeader.SIZE + i * ParentLocatorEntry.SIZE)
        koff, voff, klen, vlen = e.key_offset, e.value_offset, e.key_length, e.value_length
        if koff + klen > len(buf) or voff + vlen > len(buf):
            raise CorruptImage("parent locator entry %d lies outside the item" % i, path=path, field="parent locator")
        out.append((buf[koff:koff + klen].decode("utf-16-le", "replace"),
                    buf[voff:voff + vlen].decode("utf-16-le", "replace")))
    return out
