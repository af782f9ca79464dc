"""VMDK on-disk structures: the hosted sparse extent header, stream markers, the text descriptor.

References: VMware "Virtual Disk Format 1.1" (sections "Hosted Sparse Extent Header", "Grain
Directories and Grain Tables", "The Descriptor File", "Stream-Optimized Compressed Sparse
Extents"); QEMU 7.2 block/vmdk.c for the limits, the messages and the layout qemu-img writes.
Everything is little-endian; offsets and sizes in the header count 512-byte sectors.
"""
import re
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ...errors import CorruptImage, FormatError, UnsupportedFeature
from ...structure import Record, disk, record

SECTOR = 512
MAGIC = 0x564D444B                      # "KDMV"
VMDK3_MAGIC = 0x44574F43                # b"COWD" in the file (QEMU reads it big-endian): the ESX 2 / GSX sparse format
FLAG_NL_DETECT = 1 << 0                 # the four line-end characters below are valid
FLAG_RGD = 1 << 1                       # a redundant grain directory is kept
FLAG_ZERO_GRAIN = 1 << 2                # grain table entry 1 means "reads as zeros"
FLAG_COMPRESS = 1 << 16                 # grains are deflate-compressed
FLAG_MARKER = 1 << 17                   # grains and metadata carry markers (stream-optimized)
GD_AT_END = 0xFFFFFFFFFFFFFFFF          # the grain directory follows the grains; see the footer
COMPRESSION_DEFLATE = 1
GTE_ZEROED = 1

MAX_GTES_PER_GT = 512                   # QEMU: "L2 table size too big"
MAX_GRAIN_SECTORS = 0x200000            # 1 GiB: QEMU's "Invalid granularity"
MAX_GD_ENTRIES = 32 * 1024 * 1024       # QEMU: "L1 size too big"
MAX_DESCRIPTOR = (1 << 20) - 1          # QEMU reads at most this much of a descriptor
MAX_EXTENTS = 1024
DEFAULT_GRAIN_SECTORS = 128             # 64 KiB
DEFAULT_GTES = 512
DESC_OFFSET = 1                         # sectors: where qemu-img writes the embedded descriptor
DESC_SECTORS = 20
TWO_GB = 2 * 1024 * 1024 * 1024         # qemu-img's extent size for the twoGbMaxExtent* subformats

MARKER_EOS = 0
MARKER_GT = 1
MARKER_GD = 2
MARKER_FOOTER = 3

SUBFORMATS = ("monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
              "streamOptimized")
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
# separate descriptor files qemu-img opens (block/vmdk.c vmdk_open_desc_file)
DESCRIPTOR_TYPES = ("monolithicFlat", "vmfs", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat")
EXTENT_TYPES = ("SPARSE", "FLAT", "ZERO", "VMFS")


@record("<")
class SparseHeader(Record):
    """The 512-byte header of a hosted sparse extent (``SparseExtentHeader``), in its on-disk order
    (the spec's names, in snake case); sizes and offsets count sectors."""
    magic_number: int = disk("I", MAGIC, shown="hex")
    version: int = disk("I", 1)
    flags: int = disk("I", FLAG_NL_DETECT | FLAG_RGD, shown="hex")
    capacity: int = disk("Q")
    grain_size: int = disk("Q", DEFAULT_GRAIN_SECTORS)
    descriptor_offset: int = disk("Q")
    descriptor_size: int = disk("Q")
    num_gtes_per_gt: int = disk("I", DEFAULT_GTES)
    rgd_offset: int = disk("Q")
    gd_offset: int = disk("Q")
    overhead: int = disk("Q")                       # sectors before the first grain (the spec's overHead)
    unclean_shutdown: int = disk("B")
    # the line-end characters that FLAG_NL_DETECT vouches for (a transfer that mangles them shows)
    single_end_line_char: bytes = disk("c", b"\n")
    non_end_line_char: bytes = disk("c", b" ")
    double_end_line_char1: bytes = disk("c", b"\r")
    double_end_line_char2: bytes = disk("c", b"\n")
    compress_algorithm: int = disk("H")
    pad: bytes = disk("433s")

    @property
    def grain_bytes(self) -> int:
        return self.grain_size * SECTOR

    @property
    def gd_entries(self) -> int:
        span = self.num_gtes_per_gt * self.grain_size
        return -(-self.capacity // span)

    @property
    def gt_bytes(self) -> int:
        return self.num_gtes_per_gt * 4

    @property
    def compressed(self) -> bool:
        return self.compress_algorithm == COMPRESSION_DEFLATE

    @property
    def has_marker(self) -> bool:
        return bool(self.flags & FLAG_MARKER)

    @property
    def zero_grain(self) -> bool:
        return bool(self.flags & FLAG_ZERO_GRAIN)

    def footer(self, gd_offset: int) -> "SparseHeader":
        """The copy a stream-optimized extent ends with: this header, with the directory where it
        was written and a zero pad."""
        return self.replace(gd_offset=gd_offset, pad=bytes(len(self.pad)))


@record("<")
class Marker(Record):
    """A metadata marker of a stream-optimized extent (end of stream, grain table, grain directory,
    footer): it fills a sector, and the metadata it announces follows in the next ones."""
    val: int = disk("Q")                            # sectors of metadata that follow (0 for end of stream)
    size: int = disk("I")                           # always 0: what tells a marker from a grain
    type: int = disk("I")
    pad: bytes = disk("496s")


@record("<")
class GrainMarker(Record):
    """What precedes a compressed grain of a stream-optimized extent: its data follows at once."""
    lba: int = disk("Q")                            # the grain's first guest sector
    size: int = disk("I")                           # compressed bytes that follow


def magic_of(buf: bytes) -> int:
    at = SparseHeader.offset("magic_number")
    return struct.unpack_from("<I", buf, at)[0] if len(buf) >= at + 4 else 0


def validate_header(h: SparseHeader, file_size: int, path: str) -> None:
    """QEMU's checks of vmdk_open_vmdk4 / vmdk_add_extent, plus bounds by the file size, so that no
    table is allocated or read that the file cannot hold."""
    if h.magic_number != MAGIC:
        raise FormatError("not a VMDK sparse extent (bad magic)", path=path, field="magic")
    if h.version > 3:
        raise UnsupportedFeature("Unsupported VMDK version %d" % h.version, path=path, field="version")
    if h.num_gtes_per_gt > MAX_GTES_PER_GT:
        raise CorruptImage("L2 table size too big", path=path, field="numGTEsPerGT")
    if h.num_gtes_per_gt * h.grain_size == 0:
        raise CorruptImage("L1 entry size is invalid", path=path, field="grainSize")
    if file_size < h.overhead * SECTOR:
        raise CorruptImage("File truncated, expecting at least %d bytes" % (h.overhead * SECTOR), path=path,
                           field="overHead")
    if h.grain_size > MAX_GRAIN_SECTORS:
        raise CorruptImage("Invalid granularity, image may be corrupt", path=path, field="grainSize")
    if h.gd_entries > MAX_GD_ENTRIES:
        raise CorruptImage("L1 size too big", path=path, field="capacity")
    if h.capacity >= (1 << 63) // SECTOR:
        raise CorruptImage("capacity %d sectors is too large" % h.capacity, path=path, field="capacity")
    if h.compress_algorithm not in (0, COMPRESSION_DEFLATE):
        raise UnsupportedFeature("unknown compression algorithm %d" % h.compress_algorithm, path=path,
                                 field="compressAlgorithm")
    gd_bytes = h.gd_entries * 4
    for name, off in (("gdOffset", h.gd_offset), ("rgdOffset", h.rgd_offset if h.flags & FLAG_RGD else 0)):
        if name == "gdOffset" or off:
            if off == 0 and h.gd_entries:
                raise CorruptImage("grain directory offset is 0", path=path, field=name)
            if off * SECTOR + gd_bytes > file_size:
                raise CorruptImage("grain directory (sector %d, %d entries) lies beyond the end of the file"
                                   % (off, h.gd_entries), path=path, field=name)


def pack_marker(val: int, mtype: int) -> bytes:
    """A metadata marker, as a whole sector."""
    return Marker(val=val, type=mtype).pack()


def parse_footer(buf: bytes, path: str) -> SparseHeader:
    """The header copy of a stream-optimized extent: footer marker, footer, end-of-stream marker
    (the last three sectors of the file)."""
    if len(buf) < 3 * SECTOR:
        raise CorruptImage("Invalid footer", path=path, field="footer")
    mark = Marker.unpack(buf)
    footer = SparseHeader.unpack(buf, SECTOR)
    eos = Marker.unpack(buf, 2 * SECTOR)
    if (footer.magic_number != MAGIC or mark.size != 0 or mark.type != MARKER_FOOTER or eos.val != 0 or eos.size != 0
            or eos.type != MARKER_EOS):
        raise CorruptImage("Invalid footer", path=path, field="footer")
    return footer


# -- the descriptor ---------------------------------------------------------------------------
@dataclass
class ExtentLine:
    access: str
    sectors: int
    type: str
    filename: Optional[str] = None
    offset: int = 0                     # FLAT: the sector in the file where the extent starts


@dataclass
class Descriptor:
    values: Dict[str, str] = field(default_factory=dict)
    extents: List[ExtentLine] = field(default_factory=list)

    def get(self, key: str) -> Optional[str]:
        return self.values.get(key)

    def cid(self, key: str) -> int:
        text = self.values.get(key, "")
        m = re.match(r"[0-9a-fA-F]{1,8}", text)
        return int(m.group(0), 16) if m else 0

    @property
    def create_type(self) -> Optional[str]:
        return self.values.get("createType")

    @property
    def parent_hint(self) -> Optional[str]:
        return self.values.get("parentFileNameHint")


_EXTENT_RE = re.compile(r'^(RW|RDONLY|NOACCESS)\s+(\d+)\s+([A-Za-z]+)(?:\s+"([^"\r\n]*)"(?:\s+(\d+))?)?\s*$')
_KV_RE = re.compile(r'^([A-Za-z][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$')


def parse_descriptor(raw: bytes, path: str) -> Descriptor:
    """The descriptor text: ``key=value`` lines, extent lines; comments and the DDB are kept as values."""
    text = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    desc = Descriptor()
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _EXTENT_RE.match(line)
        if m:
            access, sectors, etype, name, offset = m.groups()
            if etype not in EXTENT_TYPES:
                raise UnsupportedFeature("unsupported extent type %r" % etype, path=path, field="extent")
            if etype in ("FLAT", "VMFS") and name is None or etype in ("SPARSE",) and name is None:
                raise CorruptImage("Invalid extent line: %s" % line[:80], path=path, field="extent")
            if etype == "FLAT" and offset is None:
                raise CorruptImage("Invalid extent line: %s" % line[:80], path=path, field="extent")
            if len(desc.extents) >= MAX_EXTENTS:
                raise CorruptImage("more than %d extents" % MAX_EXTENTS, path=path, field="extent")
            desc.extents.append(ExtentLine(access, int(sectors), etype, name, int(offset or 0)))
            continue
        if line.split(None, 1)[0] in ("RW", "RDONLY", "NOACCESS"):
            raise CorruptImage("Invalid extent line: %s" % line[:80], path=path, field="extent")
        m = _KV_RE.match(line)
        if m:
            value = m.group(2)
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = value[1:-1]
            desc.values[m.group(1)] = value
    return desc


def names_create_type(raw: bytes) -> bool:
    """Whether text read as a descriptor file mentions ``createType`` before its first NUL byte.

    QEMU's first test of a descriptor file (vmdk_open_desc_file), made before any extent line is
    read; a file that is no VMDK at all (a qcow2 image, any other text) fails it, whatever its size.
    """
    return b"createType" in raw.partition(b"\0")[0]


def geometry(size: int, adapter_type: str) -> Tuple[int, int]:
    """``(cylinders, heads)`` as qemu-img writes them into the DDB (63 sectors per track)."""
    heads = 16 if adapter_type == "ide" else 255
    return size // (heads * 63 * SECTOR), heads


def build_descriptor(cid: int, parent_cid: int, create_type: str, parent_hint: Optional[str],
                     extent_lines: List[str], hw_version: str, size: int, adapter_type: str,
                     tools_version: str) -> bytes:
    """The descriptor text in qemu-img's layout."""
    cylinders, heads = geometry(size, adapter_type)
    parent = 'parentFileNameHint="%s"' % parent_hint if parent_hint else ""
    text = ("# Disk DescriptorFile\nversion=1\nCID=%x\nparentCID=%x\ncreateType=\"%s\"\n%s\n"
            "# Extent description\n%s\n# The Disk Data Base\n#DDB\n\n"
            "ddb.virtualHWVersion = \"%s\"\nddb.geometry.cylinders = \"%d\"\nddb.geometry.heads = \"%d\"\n"
            "ddb.geometry.sectors = \"63\"\nddb.adapterType = \"%s\"\nddb.toolsVersion = \"%s\"\n"
            % (cid, parent_cid, create_type, parent, "".join(extent_lines), hw_version, cylinders, heads,
               adapter_type, tools_version))
    return text.encode("utf-8", "surrogateescape")


def sparse_layout(capacity: int, grain_sectors: int = DEFAULT_GRAIN_SECTORS, gtes: int = DEFAULT_GTES
                  ) -> Tuple[int, int, int, int]:
    """qemu-img's hosted sparse layout: ``(rgd_offset, gd_offset, overhead, gd_sectors)`` in sectors,
    with the descriptor area at sector 1, each directory followed by all its grain tables."""
    grains = -(-capacity // grain_sectors)
    gt_count = -(-grains // gtes)
    gt_sectors = -(-gtes * 4 // SECTOR)
    gd_sectors = -(-gt_count * 4 // SECTOR)
    rgd = DESC_OFFSET + DESC_SECTORS
    gd = rgd + gd_sectors + gt_sectors * gt_count
    end = gd + gd_sectors + gt_sectors * gt_count
    overhead = -(-end // grain_sectors) * grain_sectors
    return rgd, gd, overhead, gd_sectors
