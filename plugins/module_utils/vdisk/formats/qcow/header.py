"""qcow (version 1) on-disk structures: the header, the backing file name, L1/L2 entries.

References: QEMU block/qcow.c (the format has no separate specification; facts only).
Everything is big-endian.  The 48-byte header is followed by the backing file name (no NUL)
and, at ``l1_table_offset``, the L1 table of 64-bit L2 table offsets.  An L2 table has
``2**l2_bits`` 64-bit entries: 0 is unallocated (read the backing file), bit 63 marks a
compressed cluster whose byte length sits in the ``cluster_bits`` bits below it and whose host
offset (QEMU puts it at a sector boundary; raw deflate with a 4 KiB window) in the bits below those; any other value
is the host offset of a whole cluster.  With ``crypt_method`` 1 (legacy AES-CBC, read only: see
formats/qcow2/crypto.py) the sectors of uncompressed clusters are encrypted, numbered by guest offset;
compressed clusters are stored in clear.
"""
from typing import Callable, Optional

from ...errors import FormatError, UnsupportedFeature
from ...structure import Record, disk, extra, record

MAGIC = 0x514649FB                       # "QFI\xfb"
VERSION = 1
CRYPT_NONE = 0
CRYPT_AES = 1
OFLAG_COMPRESSED = 1 << 63

MIN_CLUSTER_BITS = 9                     # 512 bytes
MAX_CLUSTER_BITS = 16                    # 64 KiB
MIN_L2_BITS = 9 - 3                      # L2 tables of 512 bytes ...
MAX_L2_BITS = 16 - 3                     # ... to 64 KiB
MAX_BACKING_NAME = 1023
MAX_L1_ENTRIES = 0x7FFFFFFF // 8         # QEMU: l1_size <= INT_MAX / sizeof(uint64_t)
U64 = (1 << 64) - 1
MAX_HOST_OFFSET = (1 << 63) - 1          # a file offset (off_t)

# qemu-img create's geometry: 512-byte clusters with a backing file (so a write never copies
# unmodified sectors from it), 4 KiB clusters otherwise
BACKING_CLUSTER_BITS, BACKING_L2_BITS = 9, 12
DEFAULT_CLUSTER_BITS, DEFAULT_L2_BITS = 12, 9


@record(">")
class Header(Record):
    """The 48-byte header (QEMU's QCowHeader); the backing file name follows it on disk."""
    magic: int = disk("I", MAGIC, shown="hex")
    version: int = disk("I", VERSION)
    backing_file_offset: int = disk("Q", shown="hex")
    backing_file_size: int = disk("I")
    mtime: int = disk("I")
    size: int = disk("Q")                     # bytes; the guest sees whole sectors of it
    cluster_bits: int = disk("B", DEFAULT_CLUSTER_BITS)
    l2_bits: int = disk("B", DEFAULT_L2_BITS)
    padding: int = disk("H")
    crypt_method: int = disk("I", CRYPT_NONE)
    l1_table_offset: int = disk("Q", shown="hex")
    backing_file: Optional[str] = extra(default=None, compare=False)     # read from the file, not a field

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def l2_size(self) -> int:
        """Entries per L2 table."""
        return 1 << self.l2_bits

    @property
    def l1_size(self) -> int:
        return l1_entries(self.size, self.cluster_bits, self.l2_bits)

    @property
    def offset_mask(self) -> int:
        """The host offset bits of a compressed cluster's entry."""
        return (1 << (63 - self.cluster_bits)) - 1


HEADER_SIZE = Header.SIZE                # 48


def l1_entries(size: int, cluster_bits: int, l2_bits: int) -> int:
    shift = cluster_bits + l2_bits
    return (size + (1 << shift) - 1) >> shift


def probe(buf: bytes) -> bool:
    if len(buf) < HEADER_SIZE:
        return False
    h = Header.unpack(buf)
    return (h.magic, h.version) == (MAGIC, VERSION)


def parse_header(buf: bytes, path: str, read: Callable[[int, int], bytes]) -> Header:
    """The header from the first 48 bytes *buf* and the backing file name (``read(offset, length)``
    gives the file's bytes, zeros past its end), validated in QEMU's order with its messages."""
    if len(buf) < HEADER_SIZE:
        raise FormatError("Image not in qcow format (file too short for a header)", path=path, field="header")
    h = Header.unpack(buf)
    if h.magic != MAGIC:
        raise FormatError("Image not in qcow format", path=path, field="magic")
    if h.version != VERSION:
        hint = " (try the 'qcow2' driver instead)" if h.version in (2, 3) else ""
        raise UnsupportedFeature("qcow (v1) does not support qcow version %d%s" % (h.version, hint), path=path,
                                 field="version")
    if h.size <= 1:
        raise FormatError("Image size is too small (must be at least 2 bytes)", path=path, field="size")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError("Cluster size must be between 512 and 64k", path=path, field="cluster_bits")
    if not MIN_L2_BITS <= h.l2_bits <= MAX_L2_BITS:
        raise FormatError("L2 table size must be between 512 and 64k", path=path, field="l2_bits")
    if h.crypt_method not in (CRYPT_NONE, CRYPT_AES):
        raise FormatError("invalid encryption method in qcow header", path=path, field="crypt_method")
    if h.size > U64 - (1 << (h.cluster_bits + h.l2_bits)) or h.l1_size > MAX_L1_ENTRIES:
        raise FormatError("Image too large", path=path, field="size")
    if h.l1_table_offset + 8 * h.l1_size > MAX_HOST_OFFSET:
        raise FormatError("L1 table offset 0x%x is invalid" % h.l1_table_offset, path=path, field="l1_table_offset")
    if h.backing_file_offset:
        if h.backing_file_size > MAX_BACKING_NAME:
            raise FormatError("Backing file name too long", path=path, field="backing_file_size")
        if h.backing_file_offset + h.backing_file_size > MAX_HOST_OFFSET:
            raise FormatError("Invalid backing file offset", path=path, field="backing_file_offset")
        raw = read(h.backing_file_offset, h.backing_file_size)
        # QEMU keeps the name as a C string: it ends at the first NUL
        name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        h.backing_file = name or None
    return h


def new_header(size: int, backing_file: Optional[str]) -> Header:
    """The header qemu-img create writes (mtime 0, L1 right after the header and name, 8-aligned)."""
    h = Header(size=size)
    end = HEADER_SIZE
    if backing_file is not None:
        name = backing_file.encode("utf-8", "surrogateescape")
        h.backing_file_offset = HEADER_SIZE
        h.backing_file_size = len(name)
        h.backing_file = backing_file
        h.cluster_bits, h.l2_bits = BACKING_CLUSTER_BITS, BACKING_L2_BITS
        end += len(name)
    h.l1_table_offset = (end + 7) & ~7
    return h


def compressed_entry(host_offset: int, length: int, cluster_bits: int) -> int:
    """The L2 entry of a compressed cluster: *length* bytes of deflate data at *host_offset*."""
    return OFLAG_COMPRESSED | (length << (63 - cluster_bits)) | host_offset


def split_compressed(entry: int, cluster_bits: int):
    """``(host offset, length)`` of a compressed cluster's entry (the length as QEMU masks it)."""
    return entry & ((1 << (63 - cluster_bits)) - 1), (entry >> (63 - cluster_bits)) & ((1 << cluster_bits) - 1)
