"""Parallels (ploop) on-disk structures: the 64-byte header, the BAT, the format extension.

References: QEMU docs/interop/parallels.txt ("Header", "BAT", "Format Extension",
"Dirty bitmaps feature"). Everything is little-endian.

Parsing works on bytes; reading the file is the image's business.
"""
import hashlib
import struct
from dataclasses import dataclass
from typing import List

from ...errors import CorruptImage, FormatError
from ...structure import Record, disk, record

SECTOR = 512
MAGIC_V1 = b"WithoutFreeSpace"      # BAT entries count sectors
MAGIC_V2 = b"WithouFreSpacExt"      # BAT entries count clusters
VERSION = 2
INUSE_MAGIC = 0x746F6E59             # in_use "Ynot": the image was not closed cleanly
HEADS = 16                           # the geometry qemu-img writes (not used for addressing)
SECTORS_PER_CYLINDER = 32
DEFAULT_CLUSTER_SIZE = 1024 * 1024
MAX_IMAGE_FACTOR = 1 << 32           # image size < 2^32 clusters
INT_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1
MAX_TRACKS = INT_MAX // 513          # "Too big cluster"
MAX_BAT_ENTRIES = INT_MAX // 4       # "Catalog too large"

EXT_MAGIC = 0xAB234CEF23DCEA87
FEATURE_END = 0
FEATURE_DIRTY_BITMAP = 0x20385FAE252CB34A


@record("<")
class Header(Record):
    """The 64-byte header ("Header"); the BAT follows it."""
    magic: bytes = disk("16s", MAGIC_V2, shown="text")
    version: int = disk("I", VERSION)
    heads: int = disk("I", HEADS)
    cylinders: int = disk("I")
    tracks: int = disk("I", DEFAULT_CLUSTER_SIZE // SECTOR)     # sectors per cluster
    nb_bat_entries: int = disk("I")
    nb_sectors: int = disk("Q")
    in_use: int = disk("I", 0, shown="hex")
    data_off: int = disk("I")                                   # sectors
    flags: int = disk("I", 0, shown="hex")
    ext_off: int = disk("Q")                                    # sectors

    @property
    def cluster_size(self) -> int:
        return self.tracks * SECTOR

    @property
    def off_multiplier(self) -> int:
        """Sectors per unit of a BAT entry."""
        return 1 if self.magic == MAGIC_V1 else self.tracks

    @property
    def virtual_sectors(self) -> int:
        return self.nb_sectors & 0xFFFFFFFF if self.magic == MAGIC_V1 else self.nb_sectors


HEADER_SIZE = Header.SIZE                   # 64


@record("<")
class ExtensionHeader(Record):
    """The start of the Format Extension cluster ("Format Extension"); feature sections follow."""
    magic: int = disk("Q", EXT_MAGIC, shown="hex")
    check_sum: bytes = disk("16s")              # MD5 of the rest of the cluster


@record("<")
class FeatureHeader(Record):
    """A feature section's header; *data_size* bytes of data follow it, padded to 8 bytes."""
    magic: int = disk("Q", FEATURE_END, shown="hex")
    flags: int = disk("Q", 0, shown="hex")
    data_size: int = disk("I")
    unused32: int = disk("I")


@record("<")
class DirtyBitmapFeature(Record):
    """The data of a dirty bitmap feature ("Dirty bitmaps feature"); its L1 table follows it."""
    size: int = disk("Q")                       # sectors
    id: bytes = disk("16s")
    granularity: int = disk("I")                # sectors
    l1_size: int = disk("I")


def probe(buf: bytes) -> bool:
    if len(buf) < HEADER_SIZE:
        return False
    h = Header.unpack(buf)
    return h.magic in (MAGIC_V1, MAGIC_V2) and h.version == VERSION


def parse_header(buf: bytes, path: str) -> Header:
    """The header from the first 64 bytes, validated as QEMU validates it on open."""
    if len(buf) < HEADER_SIZE:
        raise FormatError("Image not in Parallels format (file too short for a header)", path=path, field="header")
    h = Header.unpack(buf)
    if h.version != VERSION or h.magic not in (MAGIC_V1, MAGIC_V2):
        raise FormatError("Image not in Parallels format", path=path, field="magic")
    if h.tracks == 0:
        raise FormatError("Invalid image: Zero sectors per track", path=path, field="tracks")
    if h.tracks > MAX_TRACKS:
        raise FormatError("Invalid image: Too big cluster", path=path, field="tracks")
    if h.nb_bat_entries > MAX_BAT_ENTRIES:
        raise FormatError("Catalog too large", path=path, field="nb_bat_entries")
    if h.virtual_sectors * SECTOR > INT64_MAX:
        raise FormatError("Invalid image: disk size %d sectors is too large" % h.virtual_sectors, path=path,
                          field="nb_sectors")
    return h


def bat_offset(index: int) -> int:
    """File offset of BAT entry *index*."""
    return HEADER_SIZE + 4 * index


def new_header(size: int, cluster_size: int) -> Header:
    """The header qemu-img create writes for a *size*-byte disk with *cluster_size* clusters."""
    entries = -(-size // cluster_size)
    bat_bytes = -(-bat_offset(entries) // cluster_size) * cluster_size
    return Header(magic=MAGIC_V2, heads=HEADS, cylinders=size // SECTOR // HEADS // SECTORS_PER_CYLINDER,
                  tracks=cluster_size // SECTOR, nb_bat_entries=entries, nb_sectors=-(-size // SECTOR),
                  data_off=bat_bytes // SECTOR)


@dataclass
class DirtyBitmap:
    uuid: str
    granularity: int        # bytes
    size_sectors: int
    l1: List[int]


def parse_format_extension(cluster: bytes, cluster_size: int, virtual_sectors: int, path: str) -> List[DirtyBitmap]:
    """Validate the format extension cluster as QEMU does on a read-only open; returns its dirty bitmaps.

    The bitmaps do not change guest data: vdisk only checks them (so an image QEMU refuses is refused).
    """
    ext = ExtensionHeader.unpack(cluster)
    if ext.magic != EXT_MAGIC:
        raise CorruptImage("Wrong parallels Format Extension magic: 0x%x, expected: 0x%x" % (ext.magic, EXT_MAGIC),
                           path=path, field="format extension")
    pos = ExtensionHeader.SIZE
    if hashlib.md5(cluster[pos:cluster_size]).digest() != ext.check_sum:
        raise CorruptImage("Wrong checksum in Format Extension header. Format extension is corrupted.",
                           path=path, field="format extension")
    bitmaps: List[DirtyBitmap] = []
    while True:
        remaining = cluster_size - pos
        if remaining < FeatureHeader.SIZE:
            raise CorruptImage("Can not read feature header, as remaining bytes (%d) in Format Extension is less "
                               "than Feature header size (%d)" % (remaining, FeatureHeader.SIZE), path=path,
                               field="format extension")
        feature = FeatureHeader.unpack(cluster, pos)
        pos += FeatureHeader.SIZE
        remaining -= FeatureHeader.SIZE
        if feature.flags:
            raise CorruptImage("Flags for extension feature are unsupported", path=path, field="format extension")
        padded = -(-feature.data_size // 8) * 8
        if padded > remaining:
            raise CorruptImage("Feature data_size exceedes Format Extension cluster", path=path,
                               field="format extension")
        if feature.magic == FEATURE_END:
            return bitmaps
        if feature.magic != FEATURE_DIRTY_BITMAP:
            raise CorruptImage("Unknown feature: 0x%x" % feature.magic, path=path, field="format extension")
        bitmaps.append(_parse_bitmap(cluster[pos:pos + feature.data_size], cluster_size, virtual_sectors, path))
        pos += padded


def _parse_bitmap(data: bytes, cluster_size: int, virtual_sectors: int, path: str) -> DirtyBitmap:
    if len(data) < DirtyBitmapFeature.SIZE:
        raise CorruptImage("Too small Bitmap Feature area in Parallels Format Extension: %d bytes, expected at "
                           "least %d bytes" % (len(data), DirtyBitmapFeature.SIZE), path=path, field="dirty bitmap")
    feature = DirtyBitmapFeature.unpack(data)
    size, ident, gran, l1_size = feature.size, feature.id, feature.granularity, feature.l1_size
    if size != virtual_sectors:
        raise CorruptImage("Bitmap size (in sectors) %d differs from disk size in sectors %d"
                           % (size, virtual_sectors), path=path, field="dirty bitmap")
    granularity = gran * SECTOR
    if granularity < SECTOR or granularity & (granularity - 1):
        raise CorruptImage("Invalid bitmap granularity %d, expected a power of two of at least %d bytes"
                           % (granularity, SECTOR), path=path, field="dirty bitmap")
    if l1_size * 8 > len(data) - DirtyBitmapFeature.SIZE:
        raise CorruptImage("Bitmaps feature corrupted: l1 table exceeds extension data_size", path=path,
                           field="dirty bitmap")
    bits = -(-size * SECTOR // granularity)
    expected = -(-(-(-bits // 64) * 8) // cluster_size)   # serialized as 64-bit words
    if l1_size != expected:
        raise CorruptImage("Bitmap table size %d does not correspond to bitmap size and cluster size. Expected %d"
                           % (l1_size, expected), path=path, field="dirty bitmap")
    l1 = list(struct.unpack_from("<%dQ" % l1_size, data, DirtyBitmapFeature.SIZE))
    h = ident.hex()
    uuid = "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])
    return DirtyBitmap(uuid, granularity, size, l1)
