"""VHDX on-disk structures: file identifier, headers, region table, metadata, BAT entries, log records.

References: Microsoft's "VHDX Format Specification" v1.00 (MS-VHDX): 2.2 "Header Section" (file
type identifier, headers, region table), 2.3 "Log", 2.5 "BAT" (payload and sector bitmap block
states, chunk ratio), 2.6 "Metadata Region" (file parameters, virtual disk size, page 83 data,
logical and physical sector size); QEMU 7.2 block/vhdx.c, vhdx-log.c for what qemu-img writes
and the validation it applies. Everything is little-endian; GUIDs are stored in Microsoft's mixed
endian layout (``uuid.UUID.bytes_le``). Parsing works on bytes; reading the file is the image's.
"""
import struct
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ...errors import CorruptImage, FormatError, UnsupportedFeature
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

# signature checksum sequence_number file_write_guid data_write_guid log_guid log_version version
# log_length log_offset (then reserved up to 4 KiB)
HEADER = struct.Struct("<4sIQ16s16s16sHHIQ")
HEADER_FIELDS = ("signature", "checksum", "sequence_number", "file_write_guid", "data_write_guid", "log_guid",
                 "log_version", "version", "log_length", "log_offset")
# signature checksum entry_count reserved / guid file_offset length data_bits
REGION_HEADER = struct.Struct("<4sIII")
REGION_ENTRY = struct.Struct("<16sQII")
# signature reserved entry_count reserved2[20] / item_id offset length data_bits reserved
METADATA_HEADER = struct.Struct("<8sHH20s")
METADATA_ENTRY = struct.Struct("<16sIIII")
# the parent locator item: locator type GUID, reserved, key-value count; then the entries: key
# offset, value offset (from the start of the item), key length, value length (UTF-16LE bytes)
LOCATOR_HEADER = struct.Struct("<16sHH")
LOCATOR_ENTRY = struct.Struct("<IIHH")
LOCATOR_PATH_KEYS = ("relative_path", "volume_path", "absolute_win32_path")
# signature checksum entry_length tail sequence_number descriptor_count reserved log_guid
# flushed_file_offset last_file_offset
LOG_HEADER = struct.Struct("<4sIIIQII16sQQ")
# signature trailing_bytes|reserved leading_bytes|zero_length file_offset sequence_number
LOG_DESC = struct.Struct("<4sI8sQQ")
LOG_DATA_HEAD = struct.Struct("<4sI")      # "data" sequence_high; data[4084]; sequence_low (u32)


@dataclass
class Header:
    signature: bytes = HEADER_SIGNATURE
    checksum: int = 0
    sequence_number: int = 0
    file_write_guid: bytes = ZERO_GUID
    data_write_guid: bytes = ZERO_GUID
    log_guid: bytes = ZERO_GUID
    log_version: int = 0
    version: int = 1
    log_length: int = DEFAULT_LOG_SIZE
    log_offset: int = HEADER_SECTION_END

    def pack(self, reserved: bytes = b"") -> bytes:
        """The 4 KiB header block with a fresh checksum; *reserved* is what follows the fields (the
        checksum covers it: an update keeps the bytes another writer may have left there)."""
        buf = bytearray(HEADER_SIZE)
        HEADER.pack_into(buf, 0, *(0 if n == "checksum" else getattr(self, n) for n in HEADER_FIELDS))
        buf[HEADER.size:HEADER.size + len(reserved)] = reserved[:HEADER_SIZE - HEADER.size]
        self.checksum = checksum(buf, 4)
        struct.pack_into("<I", buf, 4, self.checksum)
        return bytes(buf)


def parse_header(buf: bytes) -> Optional[Header]:
    """A header that QEMU counts as valid (checksum over 4 KiB, signature, version 1), else None."""
    buf = bytes(buf[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
    h = Header(*HEADER.unpack_from(buf))
    if checksum(buf, 4) != h.checksum or h.signature != HEADER_SIGNATURE or h.version != 1:
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


@dataclass(frozen=True)
class Region:
    guid: bytes
    file_offset: int
    length: int
    data_bits: int


def parse_region_table(buf: bytes, path: Optional[str] = None) -> Tuple[Region, Region]:
    """The BAT and metadata regions of a 64 KiB region table (checksum, signature, at most 2047
    entries, no overlaps with each other or the header section, both regions present once,
    unknown required regions refused)."""
    buf = bytes(buf[:REGION_TABLE_SIZE]).ljust(REGION_TABLE_SIZE, b"\0")
    sig, crc, count, dummy = REGION_HEADER.unpack_from(buf)
    if checksum(buf, 4) != crc:
        raise CorruptImage("region table checksum mismatch", path=path, field="region table")
    if sig != REGION_SIGNATURE:
        raise FormatError("region table signature is not 'regi'", path=path, field="region table")
    if count > MAX_REGION_ENTRIES:
        raise CorruptImage("region table has %d entries (at most %d)" % (count, MAX_REGION_ENTRIES), path=path,
                           field="region table")
    found: Dict[bytes, Region] = {}
    for i in range(count):
        r = Region(*REGION_ENTRY.unpack_from(buf, REGION_HEADER.size + i * REGION_ENTRY.size))
        if r.guid in (BAT_GUID, METADATA_GUID):
            if r.guid in found:
                raise CorruptImage("region table lists the %s region twice" % _region_name(r.guid), path=path,
                                   field="region table")
            found[r.guid] = r
        elif r.data_bits & REGION_REQUIRED:
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
    block_size: int
    leave_blocks_allocated: bool
    has_parent: bool
    virtual_disk_size: int
    logical_sector_size: int
    physical_sector_size: int
    page83: bytes


_ITEMS = {FILE_PARAMETERS_GUID: ("file parameters", 8), VIRTUAL_DISK_SIZE_GUID: ("virtual disk size", 8),
          PAGE83_GUID: ("page 83 data", 16), LOGICAL_SECTOR_GUID: ("logical sector size", 4),
          PHYSICAL_SECTOR_GUID: ("physical sector size", 4), PARENT_LOCATOR_GUID: ("parent locator", 0)}


def parse_metadata_table(buf: bytes, region_length: int, path: Optional[str] = None) -> Dict[bytes, Tuple[int, int]]:
    """``item guid -> (offset in the region, length)`` of the known items of the 64 KiB metadata table;
    every required item present once and inside the region."""
    buf = bytes(buf[:METADATA_TABLE_SIZE]).ljust(METADATA_TABLE_SIZE, b"\0")
    sig, dummy, count, dummy2 = METADATA_HEADER.unpack_from(buf)
    if sig != METADATA_SIGNATURE:
        raise FormatError("metadata table signature is not 'metadata'", path=path, field="metadata")
    if count > MAX_METADATA_ENTRIES:
        raise CorruptImage("metadata table has %d entries (at most %d)" % (count, MAX_METADATA_ENTRIES),
                           path=path, field="metadata")
    items: Dict[bytes, Tuple[int, int]] = {}
    for i in range(count):
        guid, offset, length, bits, dummy = METADATA_ENTRY.unpack_from(buf, METADATA_HEADER.size
                                                                       + i * METADATA_ENTRY.size)
        known = _ITEMS.get(guid)
        if known is None:
            if bits & META_IS_REQUIRED:
                raise UnsupportedFeature("metadata item %s is required but unknown" % uuid.UUID(bytes_le=guid),
                                         path=path, field="metadata")
            continue
        name, need = known
        if guid in items:
            raise CorruptImage("metadata table lists the %s item twice" % name, path=path, field="metadata")
        if length < need or length > METADATA_ITEM_MAX or offset < METADATA_TABLE_SIZE \
                or offset + length > region_length:
            raise CorruptImage("metadata item %s at 0x%x (length %d) lies outside the metadata region"
                               % (name, offset, length), path=path, field="metadata")
        items[guid] = (offset, length)
    for guid, (name, dummy) in _ITEMS.items():
        if guid != PARENT_LOCATOR_GUID and guid not in items:
            raise CorruptImage("metadata item %s is missing" % name, path=path, field="metadata")
    return items


def parse_metadata_items(raw: Dict[bytes, bytes], has_locator: bool, path: Optional[str] = None) -> Metadata:
    """The values of the five required items (bytes of each item, in the order of _ITEMS), validated."""
    block_size, bits = struct.unpack_from("<II", raw[FILE_PARAMETERS_GUID])
    size, = struct.unpack_from("<Q", raw[VIRTUAL_DISK_SIZE_GUID])
    lss, = struct.unpack_from("<I", raw[LOGICAL_SECTOR_GUID])
    pss, = struct.unpack_from("<I", raw[PHYSICAL_SECTOR_GUID])
    md = Metadata(block_size, bool(bits & PARAMS_LEAVE_BLOCKS_ALLOCATED), bool(bits & PARAMS_HAS_PARENT), size,
                  lss, pss, bytes(raw[PAGE83_GUID][:16]))
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


# -- log records -------------------------------------------------------------------------
@dataclass
class LogEntryHeader:
    signature: bytes
    checksum: int
    entry_length: int
    tail: int
    sequence_number: int
    descriptor_count: int
    reserved: int
    log_guid: bytes
    flushed_file_offset: int
    last_file_offset: int


def parse_log_header(buf: bytes) -> LogEntryHeader:
    return LogEntryHeader(*LOG_HEADER.unpack_from(bytes(buf[:LOG_HEADER.size]).ljust(LOG_HEADER.size, b"\0")))


def desc_sectors(count: int) -> int:
    """4 KiB sectors holding the entry header (64 bytes, two descriptors' room) and *count* descriptors."""
    return -(-(count + 2) // 128)


def pack_log_entry(sequence: int, tail: int, log_guid: bytes, file_size: int,
                   sectors: List[Tuple[int, bytes]]) -> bytes:
    """A log entry writing whole 4 KiB *sectors* ``(file offset, data)``: header, data descriptors,
    data sectors, the CRC-32C over all of it."""
    nd = desc_sectors(len(sectors))
    total = (nd + len(sectors)) * LOG_SECTOR
    buf = bytearray(total)
    LOG_HEADER.pack_into(buf, 0, LOG_SIGNATURE, 0, total, tail, sequence, len(sectors), 0, log_guid, file_size,
                         file_size)
    for i, (offset, data) in enumerate(sectors):
        LOG_DESC.pack_into(buf, LOG_HEADER.size + i * LOG_DESC.size, DESC_SIGNATURE,
                           struct.unpack_from("<I", data, 4092)[0], bytes(data[:8]), offset, sequence)
        at = (nd + i) * LOG_SECTOR
        LOG_DATA_HEAD.pack_into(buf, at, DATA_SIGNATURE, sequence >> 32)
        buf[at + 8:at + 4092] = data[8:4092]
        struct.pack_into("<I", buf, at + 4092, sequence & 0xFFFFFFFF)
    struct.pack_into("<I", buf, 4, checksum(buf, 4))
    return bytes(buf)


def parse_parent_locator(buf: bytes, path: Optional[str] = None) -> List[Tuple[str, str]]:
    """The ``(key, value)`` pairs of a parent locator item (*buf* is the whole item)."""
    if len(buf) < LOCATOR_HEADER.size:
        raise CorruptImage("the parent locator is truncated", path=path, field="parent locator")
    dummy, dummy2, count = LOCATOR_HEADER.unpack_from(buf)
    if LOCATOR_HEADER.size + count * LOCATOR_ENTRY.size > len(buf):
        raise CorruptImage("the parent locator's %d entries do not fit in it" % count, path=path,
                           field="parent locator")
    out = []
    for i in range(count):
        koff, voff, klen, vlen = LOCATOR_ENTRY.unpack_from(buf, LOCATOR_HEADER.size + i * LOCATOR_ENTRY.size)
        if koff + klen > len(buf) or voff + vlen > len(buf):
            raise CorruptImage("parent locator entry %d lies outside the item" % i, path=path, field="parent locator")
        out.append((buf[koff:koff + klen].decode("utf-16-le", "replace"),
                    buf[voff:voff + vlen].decode("utf-16-le", "replace")))
    return out
