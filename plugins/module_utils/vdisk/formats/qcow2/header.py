"""qcow2 header, header extensions and table-entry bit layouts.

References: QEMU docs/interop/qcow2.txt ("Header", "Header extensions",
"Cluster mapping", "Extended L2 Entries").  Parsing works on bytes; I/O is elsewhere.
"""
import struct
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ...errors import FormatError, UnsupportedFeature

MAGIC = b"QFI\xfb"

# header fields, version 2 part (72 bytes) and version 3 additions (up to 104 bytes)
HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
HEADER_V3 = struct.Struct(">QQQII")
HEADER_V2_LENGTH = 72
HEADER_V3_LENGTH = 104
HEADER_V3_WRITTEN_LENGTH = 112          # with compression_type and its 7 bytes of padding
EXTENSION_HEADER = struct.Struct(">II")
BITMAPS_EXTENSION = struct.Struct(">IIQQ")     # nb_bitmaps, reserved, directory size, directory offset
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS
U64 = struct.Struct(">Q")

# header extension types
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_DATA_FILE = 0x44415441

# feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_KNOWN = AUTOCLEAR_BITMAPS | AUTOCLEAR_DATA_FILE_RAW

FEATURE_NAMES: List[Tuple[int, int, str]] = [   # (type 0 incompat/1 compat/2 autoclear, bit, name)
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"), (0, 3, "compression type"),
    (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
]
FEATURE_ENTRY = struct.Struct(">BB46s")

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1
COMPRESSION_NAMES = {COMPRESSION_ZLIB: "zlib", COMPRESSION_ZSTD: "zstd"}

# table entry layout
OFFSET_MASK = 0x00FFFFFFFFFFFE00      # bits 9-55
L1E_RESERVED = 0x7F000000000001FF
L2E_RESERVED = 0x3F000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
REFT_RESERVED = 0x1FF

# limits as QEMU's (block/qcow2.h)
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_SIZE = 32 * 1024 * 1024            # bytes
MAX_REFTABLE_SIZE = 8 * 1024 * 1024       # bytes
MAX_SNAPSHOTS = 65536
MAX_BACKING_NAME = 1023
MAX_HOST_OFFSET = 1 << 56
SUBCLUSTERS = 32


@dataclass
class Header:
    """The qcow2 header, with the extensions it carries."""
    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = HEADER_V3_WRITTEN_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: Optional[str] = None
    backing_format: Optional[str] = None
    data_file: Optional[str] = None
    # extensions vdisk does not interpret, kept byte for byte: (type, data)
    unknown_extensions: List[Tuple[int, bytes]] = field(default_factory=list)
    bitmaps_extension: Optional[bytes] = None
    crypto_extension: Optional[bytes] = None

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // self.l2_entry_size


def parse_header(data: bytes, path: str, file_size: int) -> Header:
    """Parse and validate cluster 0 (at least the first cluster's bytes) of a qcow2 file."""
    if len(data) < HEADER_V2_LENGTH:
        raise FormatError("file too short for a qcow2 header (%d bytes)" % len(data), path=path, field="header")
    (magic, version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off, rt_off, rt_clusters,
     nb_snap, snap_off) = HEADER_V2.unpack_from(data, 0)
    if magic != MAGIC:
        raise FormatError("Image is not in qcow2 format", path=path, field="magic")
    if version not in (2, 3):
        raise UnsupportedFeature("Unsupported qcow2 version %d" % version, path=path, field="version")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError("Unsupported cluster size: 2^%d" % cluster_bits, path=path, field="cluster_bits")
    h = Header(version=version, backing_file_offset=bfo, backing_file_size=bfs, cluster_bits=cluster_bits,
               size=size, crypt_method=crypt, l1_size=l1_size, l1_table_offset=l1_off,
               refcount_table_offset=rt_off, refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
               snapshots_offset=snap_off)
    cs = h.cluster_size
    if version == 3:
        if len(data) < HEADER_V3_LENGTH:
            raise FormatError("file too short for a qcow2 v3 header", path=path, field="header")
        (h.incompatible_features, h.compatible_features, h.autoclear_features, h.refcount_order,
         h.header_length) = HEADER_V3.unpack_from(data, HEADER_V2_LENGTH)
        if h.header_length < HEADER_V3_LENGTH:
            raise FormatError("qcow2 header too short", path=path, field="header_length")
        if h.header_length > cs:
            raise FormatError("qcow2 header exceeds cluster size", path=path, field="header_length")
        if h.header_length % 8:
            raise FormatError("qcow2 header length is not a multiple of 8", path=path, field="header_length")
        if h.header_length > HEADER_V3_LENGTH:
            h.compression_type = data[HEADER_V3_LENGTH]
        if h.refcount_order > 6:
            raise FormatError("Reference count entry width too large; may not exceed 64 bits",
                              path=path, field="refcount_order")
    else:
        h.header_length = HEADER_V2_LENGTH
        h.refcount_order = 4
    unknown = h.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        names = _feature_names(data, h, unknown)
        raise UnsupportedFeature("Unsupported qcow2 feature(s): %s" % names, path=path,
                                 field="incompatible_features")
    if h.incompatible_features & INCOMPAT_COMPRESSION:
        if h.header_length <= HEADER_V3_LENGTH:
            raise FormatError("compression type feature bit set but header has no compression_type field",
                              path=path, field="compression_type")
        if h.compression_type not in COMPRESSION_NAMES:
            raise UnsupportedFeature("Unknown compression type %d" % h.compression_type, path=path,
                                     field="compression_type")
    elif h.compression_type != COMPRESSION_ZLIB:
        raise FormatError("compression_type %d set but the compression type feature bit is not"
                          % h.compression_type, path=path, field="compression_type")
    if h.crypt_method:
        raise UnsupportedFeature("encrypted images are not supported", path=path, field="crypt_method")
    if h.extended_l2 and cluster_bits < 14:
        raise FormatError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
                          path=path, field="cluster_bits")
    # tables: sizes bounded by QEMU's limits and by the file before anything is allocated
    if rt_clusters == 0 or rt_clusters * cs > MAX_REFTABLE_SIZE:
        raise FormatError("Reference count table too large" if rt_clusters else "Image does not contain a "
                          "reference count table", path=path, field="refcount_table_clusters")
    if rt_off % cs or rt_off == 0 or rt_off >= max(file_size, cs) or rt_off >= MAX_HOST_OFFSET:
        raise FormatError("Reference count table offset invalid", path=path, field="refcount_table_offset")
    if l1_size > MAX_L1_SIZE // 8:
        raise FormatError("Active L1 table too large", path=path, field="l1_size")
    # a table's offset must be cluster-aligned even when it has no entries (QEMU refuses it too)
    if l1_off % cs or (l1_size and (l1_off == 0 or l1_off >= MAX_HOST_OFFSET)):
        raise FormatError("Active L1 table offset invalid", path=path, field="l1_table_offset")
    if size > l1_size * h.l2_entries * cs:
        raise FormatError("L1 table is too small", path=path, field="l1_size")
    if nb_snap > MAX_SNAPSHOTS:
        raise FormatError("Snapshot table too large", path=path, field="nb_snapshots")
    if snap_off % cs or (nb_snap and snap_off >= MAX_HOST_OFFSET):
        raise FormatError("Snapshot table offset invalid", path=path, field="snapshots_offset")
    _parse_extensions(data, h, path)
    if bfo:
        if bfo > cs:
            raise FormatError("Invalid backing file offset", path=path, field="backing_file_offset")
        if bfs > MAX_BACKING_NAME or bfs == 0:
            raise FormatError("Backing file name too long", path=path, field="backing_file_size")
        if bfo + bfs > cs or bfo + bfs > len(data):
            raise FormatError("Invalid backing file offset", path=path, field="backing_file_offset")
        try:
            h.backing_file = data[bfo:bfo + bfs].decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError("backing file name is not valid UTF-8", path=path, field="backing_file") from None
    return h


def _feature_names(data: bytes, h: Header, bits: int) -> str:
    table: Dict[int, str] = {}
    try:
        off = h.header_length
        while off + 8 <= len(data):
            etype, elen = EXTENSION_HEADER.unpack_from(data, off)
            if etype == EXT_END:
                break
            if etype == EXT_FEATURE_TABLE:
                for i in range(elen // 48):
                    ftype, bit, name = FEATURE_ENTRY.unpack_from(data, off + 8 + 48 * i)
                    if ftype == 0:
                        table[bit] = name.rstrip(b"\0").decode("utf-8", "replace")
            off += 8 + ((elen + 7) & ~7)
    except struct.error:
        pass
    names = []
    for bit in range(64):
        if bits & (1 << bit):
            names.append(table.get(bit, "Unknown incompatible feature: %x" % (1 << bit)))
    return ", ".join(names)


def _parse_extensions(data: bytes, h: Header, path: str) -> None:
    off = h.header_length if h.version == 3 else HEADER_V2_LENGTH
    end = min(len(data), h.cluster_size)
    if h.backing_file_offset:
        end = min(end, h.backing_file_offset)
    while True:
        if off + 8 > end:
            if off >= end and h.version == 2:
                return   # v2 images may have no extension area at all
            raise FormatError("Invalid header extension area", path=path, field="header extensions")
        etype, elen = EXTENSION_HEADER.unpack_from(data, off)
        off += 8
        if etype == EXT_END:
            return
        if elen > end - off:
            raise FormatError("Header extension too large", path=path, field="header extension 0x%x" % etype)
        payload = data[off:off + elen]
        if etype == EXT_BACKING_FORMAT:
            h.backing_format = payload.decode("utf-8", "replace").rstrip("\0")
        elif etype == EXT_FEATURE_TABLE:
            pass   # regenerated on write
        elif etype == EXT_DATA_FILE:
            h.data_file = payload.decode("utf-8", "replace")
        elif etype == EXT_BITMAPS:
            _check_bitmaps_extension(payload, h, path)
            h.bitmaps_extension = payload
        elif etype == EXT_CRYPTO_HEADER:
            h.crypto_extension = payload
        else:
            h.unknown_extensions.append((etype, payload))
        off += (elen + 7) & ~7


def _check_bitmaps_extension(payload: bytes, h: Header, path: str) -> None:
    """Refuse a bitmaps extension QEMU refuses at open (its length always; the rest only when the
    autoclear bit says the bitmaps are valid: without it they are ignored)."""
    field = "bitmaps extension"
    if len(payload) != BITMAPS_EXTENSION.size:
        raise FormatError("bitmaps_ext: Invalid extension length", path=path, field=field)
    if not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return
    count, reserved, dir_size, dir_offset = BITMAPS_EXTENSION.unpack(payload)
    if reserved:
        raise FormatError("bitmaps_ext: Reserved field is not zero", path=path, field=field)
    if count > MAX_BITMAPS:
        raise FormatError("bitmaps_ext: Image has %d bitmaps, exceeding the QEMU supported maximum of %d"
                          % (count, MAX_BITMAPS), path=path, field=field)
    if count == 0:
        raise FormatError("found bitmaps extension with zero bitmaps", path=path, field=field)
    if dir_offset % h.cluster_size:
        raise FormatError("bitmaps_ext: invalid bitmap directory offset", path=path, field=field)
    if dir_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise FormatError("bitmaps_ext: bitmap directory size (%d) exceeds the maximum supported size (%d)"
                          % (dir_size, MAX_BITMAP_DIRECTORY_SIZE), path=path, field=field)


def pack_header(h: Header) -> bytes:
    """Serialize the header, its extensions and the backing file name into cluster-0 bytes.

    Sets backing_file_offset/size on *h*.  The feature-name table is optional and, as
    QEMU does, left out when it would not leave room in the cluster.  Raises
    FormatError when the rest does not fit in one cluster.
    """
    out = _pack_header(h, feature_table=h.version == 3)
    if len(out) >= h.cluster_size and h.version == 3:
        out = _pack_header(h, feature_table=False)
    if len(out) > h.cluster_size:
        raise FormatError("header, extensions and backing file name do not fit in one cluster",
                          field="header")
    return out


def _pack_header(h: Header, feature_table: bool) -> bytes:
    body = bytearray(HEADER_V2.size if h.version == 2 else h.header_length)
    exts = bytearray()

    def ext(etype: int, payload: bytes) -> None:
        exts.extend(EXTENSION_HEADER.pack(etype, len(payload)))
        exts.extend(payload)
        exts.extend(bytes((-len(payload)) % 8))

    if h.backing_format:
        ext(EXT_BACKING_FORMAT, h.backing_format.encode("utf-8"))
    if h.data_file:
        ext(EXT_DATA_FILE, h.data_file.encode("utf-8"))
    if h.crypto_extension is not None:
        ext(EXT_CRYPTO_HEADER, h.crypto_extension)
    if h.bitmaps_extension is not None:
        ext(EXT_BITMAPS, h.bitmaps_extension)
    if feature_table:
        ext(EXT_FEATURE_TABLE, b"".join(FEATURE_ENTRY.pack(t, b, n.encode()) for t, b, n in FEATURE_NAMES))
    for etype, payload in h.unknown_extensions:
        ext(etype, payload)
    if h.version == 3 or exts:
        exts.extend(EXTENSION_HEADER.pack(EXT_END, 0))
    backing = h.backing_file.encode("utf-8") if h.backing_file else b""
    if len(backing) > MAX_BACKING_NAME:
        raise FormatError("Backing file name too long", field="backing_file")
    start = len(body) + len(exts)
    h.backing_file_offset = start if backing else 0
    h.backing_file_size = len(backing)
    HEADER_V2.pack_into(body, 0, MAGIC, h.version, h.backing_file_offset, h.backing_file_size, h.cluster_bits,
                        h.size, h.crypt_method, h.l1_size, h.l1_table_offset, h.refcount_table_offset,
                        h.refcount_table_clusters, h.nb_snapshots, h.snapshots_offset)
    if h.version == 3:
        HEADER_V3.pack_into(body, HEADER_V2_LENGTH, h.incompatible_features, h.compatible_features,
                            h.autoclear_features, h.refcount_order, h.header_length)
        if h.header_length > HEADER_V3_LENGTH:
            body[HEADER_V3_LENGTH] = h.compression_type
    return bytes(body) + bytes(exts) + backing
