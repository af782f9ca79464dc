"""qcow2 header, header extensions and table-entry bit layouts.

References: QEMU docs/interop/qcow2.txt ("Header", "Header extensions", "Feature name table",
"Bitmaps extension", "Full disk encryption header pointer", "Cluster mapping", "Extended L2
Entries").  Every on-disk structure is a declared record (structure.py): its field table gives the
packing, the offsets of partial header writes and the ``vdisk inspect --dump`` lines.  Parsing
works on bytes; I/O is elsewhere.
"""
import struct
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type, TypeVar

from ...errors import FormatError, UnsupportedFeature
from ...structure import Record, disk, extra, record

MAGIC = b"QFI\xfb"
U64 = struct.Struct(">Q")                 # one table entry (L1, L2, refcount table): a plain array word

R = TypeVar("R", bound=Record)

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

# crypt_method values (qcow2.txt): the legacy AES-CBC method and LUKS (formats/qcow2/crypto.py)
CRYPT_NONE = 0
CRYPT_AES = 1
CRYPT_LUKS = 2

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
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS


def unpack_present(cls: Type[R], buf: bytes, length: int, **absent: Any) -> R:
    """The record of which only the first *length* bytes are stored at the start of *buf*: a field
    that does not lie wholly inside them is absent and takes its value from *absent*, or else its
    declared default.  qcow2 stores its additional header fields and a snapshot's extra data so."""
    raw = bytes(buf[:min(length, cls.SIZE)]).ljust(cls.SIZE, b"\0")
    rec = cls.unpack(raw)
    defaults = cls.defaults()
    for name in cls.LAYOUT.names:
        if cls.offset(name) + cls.LAYOUT.structs[name].size > length:
            setattr(rec, name, absent.get(name, defaults[name]))
    return rec


def view(cls: Type[R], rec: Record) -> R:
    """The fields of *cls* (a record *rec*'s class extends) taken from *rec*: what a shorter stored
    form of it holds, for ``vdisk inspect --dump``."""
    return cls(**{name: getattr(rec, name) for name in cls.LAYOUT.names})


# -- header extensions ------------------------------------------------------------------------
@record(">")
class ExtensionHeader(Record):
    """What precedes each header extension's data (which is padded to a multiple of 8 bytes)."""
    type: int = disk("I", EXT_END, shown="hex")
    length: int = disk("I")


@record(">")
class FeatureNameEntry(Record):
    """One entry of the feature name table extension."""
    type: int = disk("B")                  # 0 incompatible, 1 compatible, 2 autoclear
    bit_number: int = disk("B")
    name: bytes = disk("46s", shown="text")


@record(">")
class BitmapsExtension(Record):
    """The bitmaps extension: where the bitmap directory lies (bitmaps.py reads it)."""
    nb_bitmaps: int = disk("I")
    reserved: int = disk("I")              # must be zero
    bitmap_directory_size: int = disk("Q")
    bitmap_directory_offset: int = disk("Q", 0, shown="hex")


@record(">")
class CryptoHeaderPointer(Record):
    """The start of the full disk encryption header pointer extension: the clusters the crypt
    method's own header occupies (vdisk opens no encrypted image, but keeps them counted)."""
    encryption_header_offset: int = disk("Q", 0, shown="hex")
    encryption_header_length: int = disk("Q")


BITMAPS_EXTENSION = BitmapsExtension.LAYOUT.struct      # the payload as a struct (tests build it)


def extensions(data: bytes, start: int) -> Iterator[Tuple[int, ExtensionHeader]]:
    """The header extensions stored in *data* (cluster 0) from *start*: ``(offset of the
    extension's header, that header)`` up to the end marker or the end of *data* (a length is
    not checked against *data*: its payload may run past it)."""
    pos = start
    while pos + ExtensionHeader.SIZE <= len(data):
        ext = ExtensionHeader.unpack(data, pos)
        if ext.type == EXT_END:
            return
        yield pos, ext
        pos += ExtensionHeader.SIZE + ext.length + (-ext.length % 8)


# -- the header -------------------------------------------------------------------------------
@record(">")
class HeaderV2(Record):
    """The first 72 bytes of every header: all of a version 2 header.  The defaults are those of
    a new image (version 3, 64 KiB clusters)."""
    magic: bytes = disk("4s", MAGIC)
    version: int = disk("I", 3)
    backing_file_offset: int = disk("Q", 0, shown="hex")
    backing_file_size: int = disk("I")
    cluster_bits: int = disk("I", 16)
    size: int = disk("Q")
    crypt_method: int = disk("I")
    l1_size: int = disk("I")
    l1_table_offset: int = disk("Q", 0, shown="hex")
    refcount_table_offset: int = disk("Q", 0, shown="hex")
    refcount_table_clusters: int = disk("I")
    nb_snapshots: int = disk("I")
    snapshots_offset: int = disk("Q", 0, shown="hex")


@record(">")
class HeaderV3(HeaderV2):
    """A version 3 header up to header_length: the least one holds (104 bytes)."""
    incompatible_features: int = disk("Q", 0, shown="hex")
    compatible_features: int = disk("Q", 0, shown="hex")
    autoclear_features: int = disk("Q", 0, shown="hex")
    refcount_order: int = disk("I", 4)
    header_length: int = disk("I", 112)    # a new image's: through compression_type, padded to 8


@record(">")
class Header(HeaderV3):
    """The qcow2 header: the version 3 fields, the additional field compression_type (present
    when header_length reaches it), and what cluster 0 carries after the header."""
    compression_type: int = disk("B", COMPRESSION_ZLIB)
    backing_file: Optional[str] = None
    backing_format: Optional[str] = None
    data_file: Optional[str] = None
    # extensions vdisk does not interpret, kept byte for byte: (type, data)
    unknown_extensions: List[Tuple[int, bytes]] = extra(default_factory=list)
    bitmaps_extension: Optional[BitmapsExtension] = None
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

    @property
    def stored_length(self) -> int:
        """Bytes of cluster 0 the header takes (its extensions follow)."""
        return HEADER_V2_LENGTH if self.version == 2 else self.header_length

    def stored(self) -> HeaderV2:
        """The fields the stored header holds, as a record of its length (for the dump)."""
        if self.version == 2:
            return view(HeaderV2, self)
        return self if self.header_length >= Header.SIZE else view(HeaderV3, self)

    def crypto_header(self) -> Optional[CryptoHeaderPointer]:
        """Where the encryption header lies, when the extension is there and long enough."""
        if self.crypto_extension and len(self.crypto_extension) >= CryptoHeaderPointer.SIZE:
            return CryptoHeaderPointer.unpack(self.crypto_extension)
        return None


HEADER_V2_LENGTH = HeaderV2.SIZE                        # 72
HEADER_V3_LENGTH = HeaderV3.SIZE                        # 104
HEADER_V3_WRITTEN_LENGTH = -(-Header.SIZE // 8) * 8     # 112: what qemu-img writes


def parse_header(data: bytes, path: str, file_size: int) -> Header:
    """Parse and validate cluster 0 (at least the first cluster's bytes) of a qcow2 file."""
    if len(data) < HEADER_V2_LENGTH:
        raise FormatError("file too short for a qcow2 header (%d bytes)" % len(data), path=path, field="header")
    # a version 2 header stores the first fields only: the others take the values version 2 implies
    h = unpack_present(Header, data, HEADER_V2_LENGTH, header_length=HEADER_V2_LENGTH)
    if h.magic != MAGIC:
        raise FormatError("Image is not in qcow2 format", path=path, field="magic")
    if h.version not in (2, 3):
        raise UnsupportedFeature("Unsupported qcow2 version %d" % h.version, path=path, field="version")
    if not MIN_CLUSTER_BITS <= h.cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError("Unsupported cluster size: 2^%d" % h.cluster_bits, path=path, field="cluster_bits")
    if h.version == 3:
        h = _parse_v3(data, path)
    _check_features(data, h, path)
    _check_tables(h, path, file_size)
    _parse_extensions(data, h, path)
    if h.backing_file_offset:
        h.backing_file = _backing_file(data, h, path)
    return h


def _parse_v3(data: bytes, path: str) -> Header:
    """A version 3 header: its length checked, the additional fields it reaches read."""
    if len(data) < HEADER_V3_LENGTH:
        raise FormatError("file too short for a qcow2 v3 header", path=path, field="header")
    h = unpack_present(Header, data, HEADER_V3_LENGTH)
    if h.header_length < HEADER_V3_LENGTH:
        raise FormatError("qcow2 header too short", path=path, field="header_length")
    if h.header_length > h.cluster_size:
        raise FormatError("qcow2 header exceeds cluster size", path=path, field="header_length")
    if h.header_length % 8:
        raise FormatError("qcow2 header length is not a multiple of 8", path=path, field="header_length")
    h = unpack_present(Header, data, h.header_length)
    if h.refcount_order > 6:
        raise FormatError("Reference count entry width too large; may not exceed 64 bits",
                          path=path, field="refcount_order")
    return h


def _check_features(data: bytes, h: Header, path: str) -> None:
    """Refuse what vdisk cannot read: unknown incompatible features, a bad compression type,
    encryption, extended L2 entries with small clusters."""
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
    if h.crypt_method not in (CRYPT_NONE, CRYPT_AES, CRYPT_LUKS):
        raise UnsupportedFeature("Unsupported encryption method: %d" % h.crypt_method, path=path, field="crypt_method")
    if h.extended_l2 and h.cluster_bits < 14:
        raise FormatError("Extended L2 entries are only supported with cluster sizes of at least 16384 bytes",
                          path=path, field="cluster_bits")


def _check_tables(h: Header, path: str, file_size: int) -> None:
    """The tables' sizes bounded by QEMU's limits and by the file, before anything is allocated;
    a table's offset must be cluster-aligned even when it has no entries (QEMU refuses it too)."""
    cs = h.cluster_size
    rt_off, rt_clusters = h.refcount_table_offset, h.refcount_table_clusters
    if rt_clusters == 0 or rt_clusters * cs > MAX_REFTABLE_SIZE:
        raise FormatError("Reference count table too large" if rt_clusters else "Image does not contain a "
                          "reference count table", path=path, field="refcount_table_clusters")
    if rt_off % cs or rt_off == 0 or rt_off >= max(file_size, cs) or rt_off >= MAX_HOST_OFFSET:
        raise FormatError("Reference count table offset invalid", path=path, field="refcount_table_offset")
    if h.l1_size > MAX_L1_SIZE // 8:
        raise FormatError("Active L1 table too large", path=path, field="l1_size")
    if h.l1_table_offset % cs or (h.l1_size and (h.l1_table_offset == 0 or h.l1_table_offset >= MAX_HOST_OFFSET)):
        raise FormatError("Active L1 table offset invalid", path=path, field="l1_table_offset")
    if h.size > h.l1_size * h.l2_entries * cs:
        raise FormatError("L1 table is too small", path=path, field="l1_size")
    if h.nb_snapshots > MAX_SNAPSHOTS:
        raise FormatError("Snapshot table too large", path=path, field="nb_snapshots")
    if h.snapshots_offset % cs or (h.nb_snapshots and h.snapshots_offset >= MAX_HOST_OFFSET):
        raise FormatError("Snapshot table offset invalid", path=path, field="snapshots_offset")


def _backing_file(data: bytes, h: Header, path: str) -> str:
    """The backing file name cluster 0 stores where the header says, checked as QEMU checks it."""
    cs, bfo, bfs = h.cluster_size, h.backing_file_offset, h.backing_file_size
    if bfo > cs:
        raise FormatError("Invalid backing file offset", path=path, field="backing_file_offset")
    if bfs > MAX_BACKING_NAME or bfs == 0:
        raise FormatError("Backing file name too long", path=path, field="backing_file_size")
    if bfo + bfs > cs or bfo + bfs > len(data):
        raise FormatError("Invalid backing file offset", path=path, field="backing_file_offset")
    try:
        return data[bfo:bfo + bfs].decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("backing file name is not valid UTF-8", path=path, field="backing_file") from None


def _feature_names(data: bytes, h: Header, bits: int) -> str:
    table: Dict[int, str] = {}
    try:
        for pos, ext in extensions(data, h.header_length):
            if ext.type != EXT_FEATURE_TABLE:
                continue
            first = pos + ExtensionHeader.SIZE
            for i in range(ext.length // FeatureNameEntry.SIZE):
                entry = FeatureNameEntry.unpack(data, first + i * FeatureNameEntry.SIZE)
                if entry.type == 0:
                    table[entry.bit_number] = entry.name.rstrip(b"\0").decode("utf-8", "replace")
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
        if off + ExtensionHeader.SIZE > end:
            if off >= end and h.version == 2:
                return   # v2 images may have no extension area at all
            raise FormatError("Invalid header extension area", path=path, field="header extensions")
        ext = ExtensionHeader.unpack(data, off)
        off += ExtensionHeader.SIZE
        if ext.type == EXT_END:
            return
        if ext.length > end - off:
            raise FormatError("Header extension too large", path=path, field="header extension 0x%x" % ext.type)
        _take_extension(h, ext.type, data[off:off + ext.length], path)
        off += ext.length + (-ext.length % 8)


def _take_extension(h: Header, etype: int, payload: bytes, path: str) -> None:
    if etype == EXT_BACKING_FORMAT:
        h.backing_format = payload.decode("utf-8", "replace").rstrip("\0")
    elif etype == EXT_FEATURE_TABLE:
        pass   # regenerated on write
    elif etype == EXT_DATA_FILE:
        h.data_file = payload.decode("utf-8", "replace")
    elif etype == EXT_BITMAPS:
        h.bitmaps_extension = _check_bitmaps_extension(payload, h, path)
    elif etype == EXT_CRYPTO_HEADER:
        h.crypto_extension = payload
    else:
        h.unknown_extensions.append((etype, payload))


def _check_bitmaps_extension(payload: bytes, h: Header, path: str) -> BitmapsExtension:
    """Refuse a bitmaps extension QEMU refuses at open (its length always; the rest only when the
    autoclear bit says the bitmaps are valid: without it they are ignored)."""
    field = "bitmaps extension"
    if len(payload) != BitmapsExtension.SIZE:
        raise FormatError("bitmaps_ext: Invalid extension length", path=path, field=field)
    ext = BitmapsExtension.unpack(payload)
    if not h.autoclear_features & AUTOCLEAR_BITMAPS:
        return ext
    if ext.reserved:
        raise FormatError("bitmaps_ext: Reserved field is not zero", path=path, field=field)
    if ext.nb_bitmaps > MAX_BITMAPS:
        raise FormatError("bitmaps_ext: Image has %d bitmaps, exceeding the QEMU supported maximum of %d"
                          % (ext.nb_bitmaps, MAX_BITMAPS), path=path, field=field)
    if ext.nb_bitmaps == 0:
        raise FormatError("found bitmaps extension with zero bitmaps", path=path, field=field)
    if ext.bitmap_directory_offset % h.cluster_size:
        raise FormatError("bitmaps_ext: invalid bitmap directory offset", path=path, field=field)
    if ext.bitmap_directory_size > MAX_BITMAP_DIRECTORY_SIZE:
        raise FormatError("bitmaps_ext: bitmap directory size (%d) exceeds the maximum supported size (%d)"
                          % (ext.bitmap_directory_size, MAX_BITMAP_DIRECTORY_SIZE), path=path, field=field)
    return ext


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
    exts = bytearray()

    def ext(etype: int, payload: bytes) -> None:
        exts.extend(ExtensionHeader(etype, len(payload)).pack())
        exts.extend(payload)
        exts.extend(bytes((-len(payload)) % 8))

    if h.backing_format:
        ext(EXT_BACKING_FORMAT, h.backing_format.encode("utf-8"))
    if h.data_file:
        ext(EXT_DATA_FILE, h.data_file.encode("utf-8"))
    if h.crypto_extension is not None:
        ext(EXT_CRYPTO_HEADER, h.crypto_extension)
    if h.bitmaps_extension is not None:
        ext(EXT_BITMAPS, h.bitmaps_extension.pack())
    if feature_table:
        ext(EXT_FEATURE_TABLE, b"".join(FeatureNameEntry(t, b, n.encode()).pack() for t, b, n in FEATURE_NAMES))
    for etype, payload in h.unknown_extensions:
        ext(etype, payload)
    if h.version == 3 or exts:
        exts.extend(ExtensionHeader(EXT_END, 0).pack())
    backing = h.backing_file.encode("utf-8") if h.backing_file else b""
    if len(backing) > MAX_BACKING_NAME:
        raise FormatError("Backing file name too long", field="backing_file")
    length = h.stored_length
    h.backing_file_offset = length + len(exts) if backing else 0
    h.backing_file_size = len(backing)
    # the fields past the stored length are not written; past the last field, zeros (the padding)
    body = h.pack()[:length].ljust(length, b"\0")
    return body + bytes(exts) + backing
