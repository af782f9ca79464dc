"""VDI on-disk structures: the 512-byte header (version 1.1) and the block map.

References: the VirtualBox VDI header layout (VDIHEADER1 in VirtualBox's VDICore.h, also described
in the thread linked from QEMU's block/vdi.c); QEMU 7.2 block/vdi.c for what qemu-img accepts,
writes and reports. Everything is little-endian; the four UUIDs are stored in the IPRT (Windows
GUID) byte order, i.e. Python's ``uuid.UUID.bytes_le``.

Parsing works on bytes; reading the file is the image's business.
"""
import struct
import uuid
from typing import Optional

from ...errors import FormatError, UnsupportedFeature
from ...structure import Record, disk, record

SECTOR = 512
SIGNATURE = 0xBEDA107F
VERSION_1_1 = 0x00010001
TYPE_DYNAMIC = 1
TYPE_STATIC = 2
HEADER_SIZE_FIELD = 0x180                  # the "header size" qemu-img writes (the v1.1 header proper)
TEXT = b"<<< QEMU VM Virtual Disk Image >>>\n"
BLOCK_SIZE = 1024 * 1024                   # the only block size QEMU reads or writes
BMAP_OFFSET = 0x200                        # where qemu-img puts the block map

UNALLOCATED = 0xFFFFFFFF                   # a block never written: reads as zeros
DISCARDED = 0xFFFFFFFE                     # a block given back: reads as zeros
INT_MAX = (1 << 31) - 1
# the block map is read in one piece whose sector-rounded size stays <= INT_MAX (QEMU's limit)
BLOCKS_IN_IMAGE_MAX = (INT_MAX + 1 - SECTOR) // 4          # 0x1fffff80
DISK_SIZE_MAX = BLOCKS_IN_IMAGE_MAX * BLOCK_SIZE

NULL_UUID = bytes(16)


def is_allocated(entry: int) -> bool:
    return entry < DISCARDED


@record("<")
class Header(Record):
    """VDIHEADER1, in its on-disk order (the names are VirtualBox's)."""
    text: bytes = disk("64s", TEXT, shown="text")
    signature: int = disk("I", SIGNATURE, shown="hex")
    version: int = disk("I", VERSION_1_1, shown="hex")
    header_size: int = disk("I", HEADER_SIZE_FIELD, shown="hex")
    image_type: int = disk("I", TYPE_DYNAMIC)
    image_flags: int = disk("I", 0, shown="hex")
    description: bytes = disk("256s", b"", shown="text")
    offset_bmap: int = disk("I", BMAP_OFFSET, shown="hex")
    offset_data: int = disk("I", 0, shown="hex")
    cylinders: int = disk("I")               # legacy geometry: qemu-img leaves it zero
    heads: int = disk("I")
    sectors: int = disk("I")
    sector_size: int = disk("I", SECTOR)
    unused1: int = disk("I")
    disk_size: int = disk("Q")
    block_size: int = disk("I", BLOCK_SIZE, shown="hex")
    block_extra: int = disk("I")
    blocks_in_image: int = disk("I")
    blocks_allocated: int = disk("I")
    uuid_image: bytes = disk("16s", NULL_UUID)          # as stored (IPRT byte order)
    uuid_last_snap: bytes = disk("16s", NULL_UUID)
    uuid_link: bytes = disk("16s", NULL_UUID)
    uuid_parent: bytes = disk("16s", NULL_UUID)
    unused2: bytes = disk("56s")

    @property
    def bmap_bytes(self) -> int:
        """The block map as stored: one 32-bit entry per block, in whole sectors."""
        return -(-self.blocks_in_image * 4 // SECTOR) * SECTOR

    @property
    def virtual_size(self) -> int:
        """The guest size: VBoxManage may write odd sizes, QEMU rounds them up to a sector."""
        return -(-self.disk_size // SECTOR) * SECTOR

    def uuid(self, name: str) -> uuid.UUID:
        return uuid.UUID(bytes_le=getattr(self, name))


HEADER_SIZE = Header.SIZE                   # 512


def probe(buf: bytes) -> bool:
    """QEMU's rule: a full header whose signature matches."""
    return len(buf) >= HEADER_SIZE and struct.unpack_from("<I", buf, Header.offset("signature"))[0] == SIGNATURE


def parse_header(buf: bytes, path: Optional[str] = None) -> Header:
    """The header from the first 512 bytes, validated in the order and with the messages of QEMU 7.2."""
    buf = bytes(buf[:HEADER_SIZE]).ljust(HEADER_SIZE, b"\0")
    h = Header.unpack(buf)
    if h.disk_size > DISK_SIZE_MAX:
        raise UnsupportedFeature("Unsupported VDI image size (size is 0x%x, max supported is 0x%x)"
                                 % (h.disk_size, DISK_SIZE_MAX), path=path, field="disk_size")
    if h.signature != SIGNATURE:
        raise FormatError("Image not in VDI format (bad signature %08x)" % h.signature, path=path,
                          field="signature")
    if h.version != VERSION_1_1:
        raise UnsupportedFeature("unsupported VDI image (version %d.%d)" % (h.version >> 16, h.version & 0xFFFF),
                                 path=path, field="version")
    if h.offset_bmap % SECTOR:
        raise UnsupportedFeature("unsupported VDI image (unaligned block map offset 0x%x)" % h.offset_bmap,
                                 path=path, field="offset_bmap")
    if h.offset_data % SECTOR:
        raise UnsupportedFeature("unsupported VDI image (unaligned data offset 0x%x)" % h.offset_data,
                                 path=path, field="offset_data")
    if h.sector_size != SECTOR:
        raise UnsupportedFeature("unsupported VDI image (sector size %d is not %d)" % (h.sector_size, SECTOR),
                                 path=path, field="sector_size")
    if h.block_size != BLOCK_SIZE:
        raise UnsupportedFeature("unsupported VDI image (block size %d is not %d)" % (h.block_size, BLOCK_SIZE),
                                 path=path, field="block_size")
    if h.virtual_size > h.blocks_in_image * h.block_size:
        raise UnsupportedFeature("unsupported VDI image (disk size %d, image bitmap has room for %d)"
                                 % (h.virtual_size, h.blocks_in_image * h.block_size), path=path,
                                 field="blocks_in_image")
    if h.uuid_link != NULL_UUID:
        raise UnsupportedFeature("unsupported VDI image (non-NULL link UUID)", path=path, field="uuid_link")
    if h.uuid_parent != NULL_UUID:
        raise UnsupportedFeature("unsupported VDI image (non-NULL parent UUID)", path=path, field="uuid_parent")
    if h.blocks_in_image > BLOCKS_IN_IMAGE_MAX:
        raise UnsupportedFeature("unsupported VDI image (too many blocks %d, max is %d)"
                                 % (h.blocks_in_image, BLOCKS_IN_IMAGE_MAX), path=path, field="blocks_in_image")
    return h


def new_header(size: int, static: bool) -> Header:
    """The header qemu-img create writes: its text, block map at 0x200, data after the sector-rounded
    map, fresh random image and last-snapshot UUIDs, zero geometry."""
    blocks = -(-size // BLOCK_SIZE)
    bmap_bytes = -(-blocks * 4 // SECTOR) * SECTOR
    return Header(image_type=TYPE_STATIC if static else TYPE_DYNAMIC, offset_bmap=BMAP_OFFSET,
                  offset_data=BMAP_OFFSET + bmap_bytes, disk_size=size, blocks_in_image=blocks,
                  blocks_allocated=blocks if static else 0, uuid_image=uuid.uuid4().bytes_le,
                  uuid_last_snap=uuid.uuid4().bytes_le)
