"""DMG (UDIF) on-disk structures: the koly trailer, the blkx (mish) chunk tables and where they live.

References: Apple's UDIF layout as QEMU 7.2 block/dmg.c reads it. All fields are big-endian.
The 512-byte ``koly`` trailer sits at the end of the file (QEMU looks for its magic in the last
515 bytes, as the file size need not be a multiple of 512) and gives the data fork, the resource
fork, the XML property list and the sector count. The chunk tables are ``mish`` blocks: either
resources of the resource fork, or base64 ``<data>`` elements of the XML plist (QEMU takes every
``<data>`` element and skips those that are no mish block). A chunk maps ``sector_count`` guest
sectors from ``sector_number`` (relative to its table's first sector) to ``compressed_length``
bytes at ``data fork + table data offset + compressed_offset``.

Parsing works on bytes; reading the file is the image's business.
"""
import binascii
import re
import struct
from dataclasses import dataclass
from typing import Iterator, List, Optional

from ...errors import CorruptImage, FormatError
from ...structure import Record, disk, record

KOLY_MAGIC = b"koly"
KOLY_SEARCH = 515                          # the last 511 bytes of the second-last sector + 4
SECTOR = 512
INT64_MAX = (1 << 63) - 1
MISH_MAGIC = 0x6D697368                    # "mish"


@record(">")
class Koly(Record):
    """The UDIF trailer (``UDIFResourceFile``), in its on-disk order (Apple's names, in snake case)."""
    signature: bytes = disk("4s", KOLY_MAGIC, shown="text")
    version: int = disk("I", 4)
    header_size: int = disk("I", 512)
    flags: int = disk("I", 0, shown="hex")
    running_data_fork_offset: int = disk("Q", 0, shown="hex")
    data_fork_offset: int = disk("Q", 0, shown="hex")
    data_fork_length: int = disk("Q")
    rsrc_fork_offset: int = disk("Q", 0, shown="hex")
    rsrc_fork_length: int = disk("Q")
    segment_number: int = disk("I")
    segment_count: int = disk("I")
    segment_id: bytes = disk("16s")
    data_checksum_type: int = disk("I")
    data_checksum_size: int = disk("I")
    data_checksum: bytes = disk("128s")
    xml_offset: int = disk("Q", 0, shown="hex")
    xml_length: int = disk("Q")
    reserved1: bytes = disk("120s")
    checksum_type: int = disk("I")
    checksum_size: int = disk("I")
    checksum: bytes = disk("128s")
    image_variant: int = disk("I")
    sector_count: int = disk("Q")
    reserved2: int = disk("I")
    reserved3: int = disk("I")
    reserved4: int = disk("I")


KOLY_SIZE = Koly.SIZE                      # 512


@record(">")
class BlkxTable(Record):
    """The header of a ``mish`` block (``BLKXTable``); its chunk entries follow it."""
    signature: int = disk("I", MISH_MAGIC, shown="hex")
    version: int = disk("I", 1)
    sector_number: int = disk("Q")           # the first guest sector the table maps
    sector_count: int = disk("Q")
    data_offset: int = disk("Q", 0, shown="hex")     # the chunks' offsets count from here (in the data fork)
    buffers_needed: int = disk("I")
    block_descriptors: int = disk("I")
    reserved: bytes = disk("24s")
    checksum_type: int = disk("I")
    checksum_size: int = disk("I")
    checksum: bytes = disk("128s")
    number_of_block_chunks: int = disk("I")


@record(">")
class BlkxChunkEntry(Record):
    """One chunk entry of a ``mish`` block (``BLKXChunkEntry``)."""
    entry_type: int = disk("I", 0, shown="hex")
    comment: int = disk("I")
    sector_number: int = disk("Q")           # relative to the table's sector_number
    sector_count: int = disk("Q")
    compressed_offset: int = disk("Q", 0, shown="hex")   # relative to the table's data_offset
    compressed_length: int = disk("Q")


@record(">")
class ResourceForkHeader(Record):
    """The start of a resource fork: where its data area and its map lie (offsets from the fork)."""
    data_offset: int = disk("I", 0, shown="hex")
    map_offset: int = disk("I", 0, shown="hex")
    data_length: int = disk("I")
    map_length: int = disk("I")


CHUNKS_START = BlkxTable.SIZE              # 204
MISH_MIN_SIZE = CHUNKS_START + BlkxChunkEntry.SIZE      # 244: a header and one chunk entry

# chunk types
UDZE = 0x00000000                          # zeros
UDRW = 0x00000001                          # raw
UDIG = 0x00000002                          # ignore (reads as zeros)
UDCO = 0x80000004                          # ADC compressed
UDZO = 0x80000005                          # zlib
UDBZ = 0x80000006                          # bzip2
ULFO = 0x80000007                          # lzfse
UDCM = 0x7FFFFFFE                          # comment
UDLE = 0xFFFFFFFF                          # last entry
TYPE_NAMES = {UDZE: "zero", UDRW: "raw", UDIG: "ignore", UDCO: "adc", UDZO: "zlib", UDBZ: "bzip2",
              ULFO: "lzfse"}
ZERO_TYPES = (UDZE, UDIG)
DATA_TYPES = (UDRW, UDZO, UDBZ)             # the types vdisk reads from the file
SKIPPED_TYPES = (UDCM, UDLE)               # carry no data: dropped as QEMU drops them

# QEMU's caps: no chunk longer than 64 MiB in the file or (unless it reads as zeros) once expanded
LENGTHS_MAX = 64 * 1024 * 1024
SECTORCOUNTS_MAX = LENGTHS_MAX // SECTOR
XML_MAX = 16 * 1024 * 1024                 # QEMU's cap on the XML plist


@dataclass(frozen=True)
class Chunk:
    type: int
    sector: int              # first guest sector
    sectors: int             # guest sectors covered
    offset: int              # where its bytes are in the file
    length: int              # bytes in the file


def find_koly(tail: bytes, tail_offset: int) -> Optional[int]:
    """The file offset of the first ``koly`` magic in *tail* (the file's last bytes from *tail_offset*)."""
    at = tail.find(KOLY_MAGIC)
    return None if at < 0 else tail_offset + at


def tail_window(file_size: int) -> int:
    """Where QEMU starts looking for the trailer magic."""
    return file_size - 511 - 512 if file_size > 511 + 512 else 0


def parse_koly(buf: bytes, offset: int, path: str) -> Koly:
    """The trailer at file *offset* (*buf*: its 512 bytes, zeros past the end of the file),
    validated as QEMU validates it before any table is read."""
    k = Koly.unpack(buf.ljust(KOLY_SIZE, b"\0"))
    if k.data_fork_offset > offset:
        raise CorruptImage("data fork offset 0x%x is past the UDIF trailer" % k.data_fork_offset, path=path,
                           field="DataForkOffset")
    if k.rsrc_fork_offset >= offset or k.rsrc_fork_length > offset - k.rsrc_fork_offset:
        raise CorruptImage("resource fork (offset 0x%x, length %d) is not before the UDIF trailer"
                           % (k.rsrc_fork_offset, k.rsrc_fork_length), path=path, field="RsrcForkOffset")
    if k.xml_offset >= offset or k.xml_length > offset - k.xml_offset:
        raise CorruptImage("XML property list (offset 0x%x, length %d) is not before the UDIF trailer"
                           % (k.xml_offset, k.xml_length), path=path, field="XMLOffset")
    if k.sector_count > INT64_MAX // SECTOR:
        raise CorruptImage("sector count %d is too large" % k.sector_count, path=path, field="SectorCount")
    if not k.rsrc_fork_length and not k.xml_length:
        raise CorruptImage("the image has neither a resource fork nor an XML property list", path=path)
    return k


def probe_trailer(tail: bytes, tail_offset: int, file_size: int) -> bool:
    """A koly trailer where QEMU looks for it, with version 4, the 512-byte size and sane forks."""
    at = find_koly(tail, tail_offset)
    if at is None:
        return False
    buf = tail[at - tail_offset:at - tail_offset + KOLY_SIZE]
    if len(buf) < Koly.offset("flags"):         # the file ends before the version and the size
        return False
    try:
        k = parse_koly(buf, at, "")
    except CorruptImage:
        return False
    return k.version == 4 and k.header_size == KOLY_SIZE and at < file_size


def parse_mish(buf: bytes, data_fork_offset: int, first_index: int, path: str) -> List[Chunk]:
    """The chunks of one blkx table (*buf*); not a mish block (wrong magic, too short): none.

    Comment and last-entry chunks are dropped; sizes are capped as QEMU caps them (the chunk
    index in messages counts every kept chunk of the image, from *first_index*).  Entries are
    read to the end of *buf*, whatever ``number_of_block_chunks`` says, as QEMU reads them."""
    if len(buf) < MISH_MIN_SIZE:
        return []
    table = BlkxTable.unpack(buf)
    if table.signature != MISH_MAGIC:
        return []
    base = data_fork_offset + table.data_offset
    chunks: List[Chunk] = []
    for at in range(CHUNKS_START, len(buf) - BlkxChunkEntry.SIZE + 1, BlkxChunkEntry.SIZE):
        e = BlkxChunkEntry.unpack(buf, at)
        if e.entry_type in SKIPPED_TYPES:
            continue
        index = first_index + len(chunks)
        if e.entry_type not in ZERO_TYPES and e.sector_count > SECTORCOUNTS_MAX:
            raise CorruptImage("sector count %d for chunk %d is larger than max (%d)"
                               % (e.sector_count, index, SECTORCOUNTS_MAX), path=path, field="blkx")
        if e.compressed_length > LENGTHS_MAX:
            raise CorruptImage("length %d for chunk %d is larger than max (%d)"
                               % (e.compressed_length, index, LENGTHS_MAX), path=path, field="blkx")
        chunks.append(Chunk(e.entry_type, table.sector_number + e.sector_number, e.sector_count,
                            base + e.compressed_offset, e.compressed_length))
    return chunks


def resource_fork_tables(read, info_begin: int, info_length: int, path: str) -> Iterator[bytes]:
    """The resources of the resource fork's data area (``read(length, offset)`` reads the file)."""
    fork = ResourceForkHeader.unpack(read(ResourceForkHeader.SIZE, info_begin))
    data_offset, count = fork.data_offset, fork.data_length
    if data_offset > info_length:
        raise CorruptImage("resource data offset %d is past the resource fork" % data_offset, path=path,
                           field="RsrcForkOffset")
    if count == 0 or data_offset + count > info_length:
        raise CorruptImage("resource data length %d does not fit the resource fork" % count, path=path,
                           field="RsrcForkLength")
    offset = info_begin + data_offset
    end = offset + count
    while offset < end:
        (size,) = struct.unpack(">I", read(4, offset))
        if size == 0 or size > end - offset:
            raise CorruptImage("resource at 0x%x has an invalid length %d" % (offset, size), path=path,
                               field="RsrcForkLength")
        offset += 4
        yield read(size, offset)
        offset += size


def plist_tables(xml: bytes, path: str) -> Iterator[bytes]:
    """The base64-decoded content of every ``<data>`` element of the XML plist, as QEMU scans it
    (a bounded text search: no XML parser is exposed to the hostile document)."""
    if not xml or len(xml) > XML_MAX:
        raise CorruptImage("XML property list length %d is not within 1..%d" % (len(xml), XML_MAX), path=path,
                           field="XMLLength")
    end_nul = xml.find(b"\0")
    if end_nul >= 0:         # QEMU reads the plist as a C string
        xml = xml[:end_nul]
    pos = 0
    while True:
        begin = xml.find(b"<data>", pos)
        if begin < 0:
            return
        begin += 6
        end = xml.find(b"</data>", begin)
        if end < 0:
            raise CorruptImage("malformed XML property list: <data> without </data>", path=path, field="plist")
        yield _base64(xml[begin:end], path)
        pos = end + 7


def _base64(text: bytes, path: str) -> bytes:
    """Decode base64 skipping whitespace and other stray characters (as glib's decoder does)."""
    clean = _NOT_B64.sub(b"", text).split(b"=", 1)[0]
    if len(clean) % 4 == 1:             # a lone trailing character carries no whole byte
        clean = clean[:-1]
    try:
        return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))
    except binascii.Error:
        raise FormatError("invalid base64 data in the XML property list", path=path, field="plist") from None


_NOT_B64 = re.compile(rb"[^A-Za-z0-9+/=]")
