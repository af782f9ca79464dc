"""qcow2 persistent dirty bitmaps: the bitmap directory, the bitmap tables and the bits.

References: docs/interop/qcow2.txt "Bitmaps extension", "Bitmaps" ("Bitmap directory",
"Bitmap table", "Bitmap data", "Dirty tracking bitmaps").

A dirty tracking bitmap with the ``auto`` flag is *enabled*: every guest write must set the bits
of the ranges it touches.  The spec lets a writer keep the bits in memory while the image is open
if it first sets ``in_use`` on disk; a bitmap found ``in_use`` was not saved correctly and is
never trusted again.  vdisk follows QEMU (block/qcow2-bitmap.c):

- before the first guest write, ``in_use`` is set on every enabled bitmap by rewriting the
  directory in place -- with the autoclear bit cleared around the rewrite, so a torn directory
  is ignored rather than trusted;
- on close the bits are stored in new clusters (data clusters, then the table, then a new
  directory, each refcounted before anything points to it), the extension is switched to the new
  directory with one write, and the old clusters are freed last;
- a bitmap already ``in_use`` at open is left as it is (qemu-img opens such an image read-write
  too, and keeps the flag); a disabled bitmap is not touched.

``qemu-img bitmap`` (``Editor``) adds, removes, clears, enables, disables and merges bitmaps with
QEMU's rules and messages (block/qcow2-bitmap.c check_constraints_on_bitmap and
qcow2_co_can_store_new_dirty_bitmap, block/dirty-bitmap.c, block/monitor/bitmap-qmp-cmds.c);
its changes are stored in the same order: new data clusters and tables, a new directory, the
extension switched with one write (or cluster 0 rewritten when the extension comes or goes),
the old clusters freed last.

Parsing works on bytes (``parse_directory``, ``parse_table``); ``Tracker`` and ``Editor`` do the
I/O.
"""
import struct
from typing import Callable, Dict, Iterator, List, Optional, Tuple

from ...errors import CorruptImage, ImageError, InvalidOption, UnsupportedFeature
from ...structure import Record, disk, record
from . import header as hdr

# -- on-disk structures --------------------------------------------------------------------
TABLE_ENTRY = struct.Struct(">Q")

FLAG_IN_USE = 1 << 0                  # not saved correctly: may be inconsistent
FLAG_AUTO = 1 << 1                    # enabled: must reflect every write
FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2   # unknown extra data may be ignored
RESERVED_FLAGS = 0xFFFFFFFF & ~(FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE)
TYPE_DIRTY_TRACKING = 1

# QEMU's limits (block/qcow2-bitmap.c: BME_MIN/MAX_GRANULARITY_BITS, BME_MAX_NAME_SIZE,
# BME_MAX_TABLE_SIZE; the count and directory size are the extension's, in header.py)
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023
MAX_TABLE_SIZE = 0x8000000            # entries of one bitmap table
MAX_PHYS_SIZE = 0x20000000            # QEMU's BME_MAX_PHYS_SIZE: bounds a bitmap's size in memory
DEFAULT_GRANULARITY_MIN = 4096        # a new bitmap's default granularity: the cluster size,
DEFAULT_GRANULARITY_MAX = 65536       # kept within these (block/dirty-bitmap.c)
MAX_BITMAPS = hdr.MAX_BITMAPS
MAX_DIRECTORY_SIZE = hdr.MAX_BITMAP_DIRECTORY_SIZE

# bitmap table entry: bits 9-55 a cluster offset; with no offset, bit 0 says "all ones"
TABLE_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_ALL_ONES = 1
TABLE_RESERVED_MASK = 0xFF000000000001FE


@record(">")
class DirectoryEntry(Record):
    """One bitmap directory entry: the fixed part, then the extra data and the name (not declared
    on disk: their sizes are), padded to 8 bytes.  ``pack`` gives the whole entry and sets the
    size fields to match it."""
    bitmap_table_offset: int = disk("Q", 0, shown="hex")
    bitmap_table_size: int = disk("I")
    flags: int = disk("I", 0, shown="hex")
    type: int = disk("B", TYPE_DIRTY_TRACKING)
    granularity_bits: int = disk("B")
    name_size: int = disk("H")
    extra_data_size: int = disk("I")
    extra_data: bytes = b""
    name: bytes = b""                     # as stored

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def auto(self) -> bool:
        return bool(self.flags & FLAG_AUTO)

    @property
    def label(self) -> str:
        return self.name.decode("utf-8", "replace")

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    # the short names callers used before the record (bitmap_table_offset and bitmap_table_size)
    @property
    def table_offset(self) -> int:
        return self.bitmap_table_offset

    @table_offset.setter
    def table_offset(self, value: int) -> None:
        self.bitmap_table_offset = value

    @property
    def table_size(self) -> int:
        return self.bitmap_table_size

    @table_size.setter
    def table_size(self, value: int) -> None:
        self.bitmap_table_size = value

    @property
    def entry_size(self) -> int:
        """Bytes the entry takes in the directory, as its size fields say."""
        size = self.SIZE + self.extra_data_size + self.name_size
        return size + (-size % 8)

    def pack(self) -> bytes:
        """The whole entry as stored."""
        self.name_size, self.extra_data_size = len(self.name), len(self.extra_data)
        raw = Record.pack(self) + self.extra_data + self.name
        return raw + bytes(-len(raw) % 8)


def new_entry(name: bytes, table_offset: int, table_size: int, flags: int, granularity_bits: int,
              type: int = TYPE_DIRTY_TRACKING, extra_data: bytes = b"") -> DirectoryEntry:
    """The directory entry of a bitmap named *name* (a dirty tracking bitmap by default)."""
    return DirectoryEntry(bitmap_table_offset=table_offset, bitmap_table_size=table_size, flags=flags, type=type,
                          granularity_bits=granularity_bits, name_size=len(name), extra_data_size=len(extra_data),
                          extra_data=extra_data, name=name)


BitmapEntry = new_entry       # the constructor's former name and argument order


# -- parsing (bytes only) -------------------------------------------------------------------
def parse_directory(data: bytes, count: int, cluster_size: int, file_size: int,
                    path: Optional[str] = None) -> List[DirectoryEntry]:
    """The *count* entries of a bitmap directory, each checked against QEMU's bounds
    (block/qcow2-bitmap.c check_dir_entry); *data* is exactly the directory."""
    def bad(text: str) -> CorruptImage:
        return CorruptImage("bitmap directory: " + text, path=path, field="bitmaps")

    if not 0 < count <= MAX_BITMAPS:
        raise bad("%d bitmaps (1 to %d allowed)" % (count, MAX_BITMAPS))
    if len(data) > MAX_DIRECTORY_SIZE:
        raise bad("%d bytes exceed the maximum of %d" % (len(data), MAX_DIRECTORY_SIZE))
    entries: List[DirectoryEntry] = []
    names = set()
    pos = 0
    for i in range(count):
        if pos + DirectoryEntry.SIZE > len(data):
            raise bad("entry %d lies past the directory's end" % i)
        entry = DirectoryEntry.unpack(data, pos)
        extra_at = pos + DirectoryEntry.SIZE
        end = extra_at + entry.extra_data_size + entry.name_size
        padded = end + (-end % 8)
        if padded > len(data):
            raise bad("entry %d lies past the directory's end" % i)
        entry.extra_data = bytes(data[extra_at:extra_at + entry.extra_data_size])
        entry.name = bytes(data[end - entry.name_size:end])
        if any(data[end:padded]):
            raise bad("entry %d has non-zero padding" % i)
        _check_entry(entry, cluster_size, file_size, bad)
        if entry.name in names:
            raise bad("duplicate bitmap name '%s'" % entry.label)
        names.add(entry.name)
        entries.append(entry)
        pos = padded
    if pos != len(data):
        raise bad("%d bytes after the last entry" % (len(data) - pos))
    return entries


def _check_entry(e: DirectoryEntry, cluster_size: int, file_size: int, bad) -> None:
    where = "bitmap '%s'" % e.label
    if not e.name:
        raise bad("a bitmap has an empty name")
    if len(e.name) > MAX_NAME_SIZE:
        raise bad("%s: name longer than %d bytes" % (where, MAX_NAME_SIZE))
    if e.type != TYPE_DIRTY_TRACKING:
        raise bad("%s: unknown type %d" % (where, e.type))
    if e.flags & RESERVED_FLAGS:
        raise bad("%s: reserved flags 0x%x set" % (where, e.flags & RESERVED_FLAGS))
    if not MIN_GRANULARITY_BITS <= e.granularity_bits <= MAX_GRANULARITY_BITS:
        raise bad("%s: granularity bits %d outside %d..%d"
                  % (where, e.granularity_bits, MIN_GRANULARITY_BITS, MAX_GRANULARITY_BITS))
    if e.extra_data:
        raise bad("%s: bitmap extra data is not supported" % where)
    if not 0 < e.bitmap_table_size <= MAX_TABLE_SIZE:
        raise bad("%s: table size %d outside 1..%d" % (where, e.bitmap_table_size, MAX_TABLE_SIZE))
    if not e.bitmap_table_offset or e.bitmap_table_offset % cluster_size:
        raise bad("%s: table offset 0x%x is not cluster aligned" % (where, e.bitmap_table_offset))
    # every entry may point to a cluster of its own: that much must fit in the file (QEMU's bound)
    if e.bitmap_table_size * cluster_size > file_size:
        raise bad("%s: table of %d entries is larger than the file allows" % (where, e.bitmap_table_size))


def pack_directory(entries: List[DirectoryEntry]) -> bytes:
    return b"".join(e.pack() for e in entries)


def check_table_entry(entry: int, cluster_size: int, file_size: Optional[int]) -> Optional[str]:
    """What is wrong with a bitmap table entry (None when it is valid).  QEMU's check_table_entry
    does not look at the file's end (*file_size* None); a reader of the bits does."""
    offset = entry & TABLE_OFFSET_MASK
    if entry & TABLE_RESERVED_MASK:
        return "reserved bits set"
    if offset and entry & TABLE_ALL_ONES:
        return "all-ones flag set on an allocated entry"
    if offset % cluster_size:
        return "offset 0x%x is not cluster aligned" % offset
    if offset and file_size is not None and offset + cluster_size > file_size:
        return "offset 0x%x lies past the end of the file" % offset
    return None


def parse_table(raw: bytes, cluster_size: int, file_size: int, label: str,
                path: Optional[str] = None) -> List[int]:
    """The entries of one bitmap table, each valid (one-line CorruptImage otherwise)."""
    entries = [e for (e,) in TABLE_ENTRY.iter_unpack(raw)]
    for i, e in enumerate(entries):
        problem = check_table_entry(e, cluster_size, file_size)
        if problem:
            raise CorruptImage("bitmap '%s': table entry %d: %s" % (label, i, problem), path=path, field="bitmaps")
    return entries


def data_bytes(virtual_size: int, granularity_bits: int) -> int:
    """Bytes of bitmap data for a disk: one bit per granule, bits in order from bit 0 of byte 0."""
    granules = -(-virtual_size >> granularity_bits)
    return -(-granules // 8)


def table_size(virtual_size: int, granularity_bits: int, cluster_size: int) -> int:
    """Entries of the bitmap table that covers the disk (at least one, as QEMU stores it)."""
    return max(1, -(-data_bytes(virtual_size, granularity_bits) // cluster_size))


def set_bits(bits: bytearray, granularity_bits: int, offset: int, length: int) -> None:
    """Mark the guest byte range dirty: every granule it touches."""
    if length <= 0:
        return
    first = offset >> granularity_bits
    last = min((offset + length - 1) >> granularity_bits, len(bits) * 8 - 1)
    while first <= last and first % 8:
        bits[first >> 3] |= 1 << (first & 7)
        first += 1
    full_end = (last + 1) // 8
    if first // 8 < full_end:
        bits[first // 8:full_end] = b"\xff" * (full_end - first // 8)
        first = full_end * 8
    while first <= last:
        bits[first >> 3] |= 1 << (first & 7)
        first += 1


def find_extension(cluster0: bytes, header_length: int, etype: int) -> Optional[int]:
    """Where the payload of header extension *etype* lies in cluster 0 (None: not there)."""
    for pos, ext in hdr.extensions(cluster0, header_length):
        if ext.type == etype:
            return pos + hdr.ExtensionHeader.SIZE
    return None


# -- I/O ------------------------------------------------------------------------------------
def read_directory(img, tables_in_file: bool = True) -> Tuple[List[DirectoryEntry], int, int]:
    """The bitmap directory of an open image: ``(entries, offset, size)``, each entry checked (and,
    for a reader or writer of the bits, *tables_in_file*, each table inside the file).
    No extension, or one whose autoclear bit a program without bitmap support cleared (stale
    bitmaps, ignored as QEMU ignores them): no entries."""
    h = img.header
    if h.bitmaps_extension is None or not h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        return [], 0, 0
    ext = h.bitmaps_extension
    count, dir_size, dir_offset = ext.nb_bitmaps, ext.bitmap_directory_size, ext.bitmap_directory_offset
    file_size = img.host.size()
    if dir_offset + dir_size > file_size:
        raise CorruptImage("bitmap directory lies past the end of the file", path=img.path, field="bitmaps")
    entries = parse_directory(img.host.pread(dir_size, dir_offset), count, img.cs, file_size, img.path)
    for e in entries if tables_in_file else ():
        if e.bitmap_table_offset + e.bitmap_table_size * 8 > file_size:
            raise CorruptImage("bitmap '%s': table (%d entries at 0x%x) lies past the end of the file"
                               % (e.label, e.bitmap_table_size, e.bitmap_table_offset), path=img.path,
                               field="bitmaps")
    return entries, dir_offset, dir_size


def present(img) -> bool:
    """Whether the image has bitmaps QEMU would load: a bitmaps extension with the autoclear bit
    that says it is valid (a version 2 header has no autoclear bits)."""
    h = img.header
    return h.version >= 3 and h.bitmaps_extension is not None and bool(h.autoclear_features & hdr.AUTOCLEAR_BITMAPS)


def referenced_ranges(img, report: Callable[[str], None]) -> List[Tuple[int, int]]:
    """The host ranges ``(offset, length)`` the bitmaps occupy -- the directory, each table and each
    data cluster -- as QEMU's qcow2_check_bitmaps_refcounts counts them.  Every problem found is
    passed to *report* as one line (a strict caller raises there); the walk goes on where it can:
    a directory that cannot be parsed ends it, a table past the file's end reads as zeros."""
    if not present(img):
        return []
    cs = img.cs
    ext = img.header.bitmaps_extension
    count, dir_size, dir_offset = ext.nb_bitmaps, ext.bitmap_directory_size, ext.bitmap_directory_offset
    file_size = img.host.size()
    out = [(dir_offset, dir_size)]
    try:
        entries = parse_directory(img.host.pread(dir_size, dir_offset), count, cs, file_size, img.path)
    except CorruptImage as exc:
        report(exc.message)
        return out
    for e in entries:
        out.append((e.bitmap_table_offset, e.bitmap_table_size * 8))
        if not e.in_use and e.bitmap_table_size != table_size(img.virtual_size, e.granularity_bits, cs):
            report("bitmap '%s': table size %d does not match the disk size" % (e.label, e.bitmap_table_size))
        # bounded by parse_directory: table_size * cluster_size <= file size
        raw = img.host.pread(e.bitmap_table_size * 8, e.bitmap_table_offset)
        raw += bytes(e.bitmap_table_size * 8 - len(raw))
        for i, (entry,) in enumerate(TABLE_ENTRY.iter_unpack(raw)):
            problem = check_table_entry(entry, cs, None)
            if problem:
                report("bitmap '%s': table entry %d: %s" % (e.label, i, problem))
            elif entry & TABLE_OFFSET_MASK:
                out.append((entry & TABLE_OFFSET_MASK, cs))
    return out


def strict_ranges(img) -> List[Tuple[int, int]]:
    """``referenced_ranges`` of bitmaps that must be valid: the first problem is a CorruptImage."""
    def refuse(problem: str) -> None:
        raise CorruptImage("bitmaps: %s; run 'check -r all' first" % problem, path=img.path, field="bitmaps")
    return referenced_ranges(img, refuse)


def read_bits(img, e: DirectoryEntry) -> bytearray:
    """The bits of one bitmap (its table must cover exactly the disk, as QEMU's load_bitmap_data
    requires); the unused bits of the last byte read as zero."""
    cs = img.cs
    if e.bitmap_table_size != table_size(img.virtual_size, e.granularity_bits, cs):
        raise CorruptImage("bitmap '%s': table size %d does not match the disk size" % (e.label, e.bitmap_table_size),
                           path=img.path, field="bitmaps")
    table = parse_table(img.host.pread(e.bitmap_table_size * 8, e.bitmap_table_offset), cs, img.host.size(),
                        e.label, img.path)
    out = bytearray()
    for entry in table:
        offset = entry & TABLE_OFFSET_MASK
        if offset:
            out += img.host.pread(cs, offset)
        else:
            out += (b"\xff" if entry & TABLE_ALL_ONES else b"\x00") * cs
    del out[data_bytes(img.virtual_size, e.granularity_bits):]
    granules = -(-img.virtual_size >> e.granularity_bits)
    if granules % 8:
        out[-1] &= (1 << (granules % 8)) - 1
    return out


def stored_clusters(img, e: DirectoryEntry) -> List[Tuple[int, int]]:
    """``(offset, length)`` of the clusters one bitmap occupies: its table and its data clusters."""
    table = parse_table(img.host.pread(e.bitmap_table_size * 8, e.bitmap_table_offset), img.cs, img.host.size(),
                        e.label, img.path)
    data = [(t & TABLE_OFFSET_MASK, img.cs) for t in table if t & TABLE_OFFSET_MASK]
    return [(e.bitmap_table_offset, e.bitmap_table_size * 8)] + data


def write_bits(img, bits: bytearray, entries: int) -> int:
    """Store bits in new clusters: the data clusters (all-zero ones stay unallocated, as QEMU
    stores them), then the table of *entries* entries that points to them.  Returns its offset."""
    cs = img.cs
    table = bytearray()
    for start in range(0, entries * cs, cs):
        chunk = bytes(bits[start:start + cs])
        offset = alloc_write(img, chunk + bytes(cs - len(chunk))) if chunk.count(0) != len(chunk) else 0
        table += TABLE_ENTRY.pack(offset)
    return alloc_write(img, bytes(table))


def alloc_write(img, data: bytes) -> int:
    """New clusters for *data* (refcounted first, checked against the metadata), written."""
    clusters = -(-len(data) // img.cs)
    offset = img.refcounts.alloc(clusters)
    img.check_overlap(offset, clusters * img.cs)
    img.host.pwrite(data + bytes(clusters * img.cs - len(data)), offset)
    return offset


def switch_directory(img, entries: List[DirectoryEntry], old_clusters: List[Tuple[int, int]]) -> Tuple[int, int]:
    """Write a new directory for *entries* (refcounted first) and switch the header to it with one
    write: the extension's payload in place, or cluster 0 rewritten when the extension comes, goes
    (no bitmaps left: extension and autoclear bit dropped, as QEMU drops them) or replaces a stale
    one.  *old_clusters* are freed after the switch.  Returns the new directory's offset and size."""
    h = img.header
    directory = pack_directory(entries)
    consistent = bool(h.autoclear_features & hdr.AUTOCLEAR_BITMAPS)
    in_place = bool(entries) and h.bitmaps_extension is not None and consistent
    where = find_extension(img.host.pread(img.cs, 0), h.header_length, hdr.EXT_BITMAPS) if in_place else None
    if in_place and where is None:
        raise CorruptImage("bitmaps extension vanished from the header", path=img.path, field="bitmaps")
    if not in_place:
        # a header that would not fit in cluster 0 is refused before anything is allocated
        saved = h.bitmaps_extension
        h.bitmaps_extension = hdr.BitmapsExtension() if entries else None
        try:
            hdr.pack_header(h)
        finally:
            h.bitmaps_extension = saved
    dir_offset = alloc_write(img, directory) if entries else 0
    img.host.flush()
    payload = hdr.BitmapsExtension(nb_bitmaps=len(entries), bitmap_directory_size=len(directory),
                                   bitmap_directory_offset=dir_offset) if entries else None
    if where is not None:
        img.host.pwrite(payload.pack(), where)
        h.bitmaps_extension = payload
    else:
        h.bitmaps_extension = payload
        if entries:
            h.autoclear_features |= hdr.AUTOCLEAR_BITMAPS
        else:
            h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
        img.write_header()
    img.host.flush()
    img.forget_metadata_map()
    for offset, length in old_clusters:
        img.refcounts.free(offset, length)
    img.host.flush()
    return dir_offset, len(directory)


def write_in_place(img, entries: List[DirectoryEntry], dir_offset: int) -> None:
    """Rewrite the directory in place with the entries' new flags (same names, same size): QEMU's
    update_ext_header_and_dir_in_place clears the autoclear bit around the rewrite, so an
    interrupted one leaves bitmaps that are ignored rather than trusted."""
    h = img.header
    _write_autoclear(img, h.autoclear_features & ~hdr.AUTOCLEAR_BITMAPS)
    img.host.pwrite(pack_directory(entries), dir_offset)
    img.host.flush()
    _write_autoclear(img, h.autoclear_features)


def _write_autoclear(img, value: int) -> None:
    """Store *value* as the autoclear bits (the header in memory keeps its own)."""
    img.host.pwrite(*img.header.replace(autoclear_features=value).pack_fields("autoclear_features"))
    img.host.flush()


class Tracker:
    """The enabled bitmaps of an image open for writing: their bits, kept in memory from the
    first guest write (``in_use`` set on disk) until close (bits stored, ``in_use`` cleared)."""

    def __init__(self, img, entries: List[DirectoryEntry], dir_offset: int, dir_size: int):
        self.img = img
        self.entries = entries
        self.dir_offset = dir_offset
        self.dir_size = dir_size
        self.bits: Dict[int, bytearray] = {}     # entry index -> bits of an enabled, consistent bitmap
        self.active = False                      # in_use is set on disk

    @classmethod
    def open(cls, img) -> Optional["Tracker"]:
        """Read and validate the bitmaps of *img*; None when none of them is enabled and consistent
        (nothing will ever need to change).  Refuses, with one line, what vdisk cannot keep valid."""
        entries, dir_offset, dir_size = read_directory(img)
        tracker = cls(img, entries, dir_offset, dir_size)
        for i, e in enumerate(entries):
            if e.in_use or not e.auto:
                continue
            tracker.bits[i] = read_bits(img, e)
        return tracker if tracker.bits else None

    def mark(self, offset: int, length: int) -> None:
        """A guest write is about to touch the range: make sure ``in_use`` is on disk, set the bits."""
        if not self.active:
            self._set_in_use()
        for i, bits in self.bits.items():
            set_bits(bits, self.entries[i].granularity_bits, offset, length)

    def _set_in_use(self) -> None:
        for i in self.bits:
            self.entries[i].flags |= FLAG_IN_USE
        write_in_place(self.img, self.entries, self.dir_offset)
        self.active = True

    def store(self) -> None:
        """Write the bits of the tracked bitmaps to new clusters and switch to a new directory
        that points to them with ``in_use`` cleared; free the old clusters last."""
        if not self.active:
            return
        img = self.img
        old_clusters: List[Tuple[int, int]] = [(self.dir_offset, self.dir_size)]
        new_entries = list(self.entries)
        for i, bits in self.bits.items():
            e = self.entries[i]
            old_clusters.extend(stored_clusters(img, e))
            new_entries[i] = e.replace(bitmap_table_offset=write_bits(img, bits, e.bitmap_table_size),
                                       flags=e.flags & ~FLAG_IN_USE)
        dir_offset, dir_size = switch_directory(img, new_entries, old_clusters)
        self.entries, self.dir_offset, self.dir_size = new_entries, dir_offset, dir_size
        self.active = False


# -- editing (qemu-img bitmap) ----------------------------------------------------------------
def default_granularity(cluster_size: int) -> int:
    """A new bitmap's granularity when none is given: the cluster size within 4 KiB..64 KiB."""
    return min(max(cluster_size, DEFAULT_GRANULARITY_MIN), DEFAULT_GRANULARITY_MAX)


def entry_size(name_size: int) -> int:
    """Bytes of a directory entry without extra data (padded to 8)."""
    return -(-(DirectoryEntry.SIZE + name_size) // 8) * 8


def constraints_problem(name: bytes, granularity: int, virtual_size: int, cluster_size: int) -> Optional[str]:
    """What keeps a new bitmap from being stored (QEMU's check_constraints_on_bitmap, its order and
    words); None when it can be.  *granularity* is a power of two."""
    bits = granularity.bit_length() - 1
    if bits > MAX_GRANULARITY_BITS:
        return "Granularity exceeds maximum (%d bytes)" % (1 << MAX_GRANULARITY_BITS)
    if bits < MIN_GRANULARITY_BITS:
        return "Granularity is under minimum (%d bytes)" % (1 << MIN_GRANULARITY_BITS)
    if virtual_size > MAX_PHYS_SIZE << bits or virtual_size > MAX_TABLE_SIZE * cluster_size << bits:
        return "Too much space will be occupied by the bitmap. Use larger granularity"
    if len(name) > MAX_NAME_SIZE:
        return "Name length exceeds maximum (%d characters)" % MAX_NAME_SIZE
    return None


def dirty_runs(bits: bytes, granularity_bits: int, virtual_size: int) -> Iterator[Tuple[int, int]]:
    """The guest byte ranges ``(offset, length)`` a bitmap marks dirty, adjacent granules joined."""
    start = None
    for index, byte in enumerate(bits):
        if byte in (0, 0xFF) and (start is None) == (byte == 0):
            continue                                  # a whole byte that continues the current state
        for bit in range(8):
            granule = index * 8 + bit
            if byte >> bit & 1:
                if start is None:
                    start = granule
            elif start is not None:
                first = start << granularity_bits
                yield first, min(virtual_size, granule << granularity_bits) - first
                start = None
    if start is not None:
        yield start << granularity_bits, virtual_size - (start << granularity_bits)


def merge_bits(dst: bytearray, dst_bits: int, src: bytes, src_bits: int, virtual_size: int) -> None:
    """OR the bits of *src* into *dst*; with another granularity every *dst* granule that a dirty
    *src* range touches becomes dirty (QEMU's hbitmap_merge)."""
    if dst_bits == src_bits:
        merged = int.from_bytes(dst, "little") | int.from_bytes(src, "little")
        dst[:] = merged.to_bytes(len(dst), "little")
        return
    for offset, length in dirty_runs(src, src_bits, virtual_size):
        set_bits(dst, dst_bits, offset, length)


class EditedBitmap:
    """One bitmap while ``qemu-img bitmap`` changes it: its directory entry, new bits when they
    change (None: the stored ones stay) and whether it is stored on disk yet."""

    def __init__(self, entry: DirectoryEntry, bits: Optional[bytearray] = None, stored: bool = True):
        self.entry = entry
        self.bits = bits
        self.stored = stored


class Editor:
    """The persistent bitmaps of an open image, changed as QEMU's QMP commands change them;
    ``commit`` stores the changes.  On an image opened read-only it serves as a merge source."""

    def __init__(self, img):
        self.img = img
        entries, self.dir_offset, self.dir_size = read_directory(img) if img.header.version >= 3 else ([], 0, 0)
        self.bitmaps: List[EditedBitmap] = [EditedBitmap(e) for e in entries]
        self.dropped: List[DirectoryEntry] = []        # removed bitmaps whose clusters are freed on commit
        self.released: List[Tuple[int, int]] = []   # other clusters freed on commit
        self.changed = False

    # -- lookups --------------------------------------------------------------------------
    def find(self, name: str) -> EditedBitmap:
        for bm in self.bitmaps:
            if bm.entry.name == name.encode("utf-8", "surrogateescape"):
                return bm
        raise ImageError("Dirty bitmap '%s' not found" % name)

    def usable(self, name: str) -> EditedBitmap:
        """A bitmap that can be read and changed: found and consistent (not ``in_use``)."""
        bm = self.find(name)
        if bm.entry.in_use:
            raise CorruptImage("Bitmap '%s' is inconsistent and cannot be used" % name)
        return bm

    def bits(self, bm: EditedBitmap) -> bytearray:
        if bm.bits is None:
            return read_bits(self.img, bm.entry)
        return bm.bits

    # -- the operations -------------------------------------------------------------------
    def add(self, name: str, granularity: Optional[int] = None, enabled: bool = True) -> None:
        """block-dirty-bitmap-add with persistent=on: the checks in QEMU's order and words."""
        img = self.img
        raw = name.encode("utf-8", "surrogateescape")
        if not raw:
            raise InvalidOption("Bitmap name cannot be empty")
        if granularity is None:
            granularity = default_granularity(img.cs)
        elif granularity < 512 or granularity & (granularity - 1):
            raise InvalidOption("Granularity must be power of 2 and at least 512")
        if any(bm.entry.name == raw for bm in self.bitmaps):
            raise ImageError("Bitmap already exists: %s" % name)
        where = "Can't make bitmap '%s' persistent in '%s': " % (name, img.path)
        if img.header.version < 3:
            raise UnsupportedFeature(where + "Cannot store dirty bitmaps in qcow2 v2 files")
        problem = constraints_problem(raw, granularity, img.virtual_size, img.cs)
        if problem:
            raise InvalidOption(where + problem)
        if len(self.bitmaps) + 1 > MAX_BITMAPS:
            raise InvalidOption(where + "Maximum number of persistent bitmaps is already reached")
        if sum(entry_size(len(bm.entry.name)) for bm in self.bitmaps) + entry_size(len(raw)) > MAX_DIRECTORY_SIZE:
            raise InvalidOption(where + "Not enough space in the bitmap directory")
        gbits = granularity.bit_length() - 1
        entry = new_entry(raw, 0, table_size(img.virtual_size, gbits, img.cs), FLAG_AUTO if enabled else 0, gbits)
        self.bitmaps.append(EditedBitmap(entry, bytearray(data_bytes(img.virtual_size, gbits)), stored=False))
        self.changed = True

    def remove(self, name: str) -> None:
        """block-dirty-bitmap-remove: an inconsistent bitmap may be removed too."""
        bm = self.find(name)
        self.bitmaps.remove(bm)
        if bm.stored:
            self.dropped.append(bm.entry)
        self.changed = True

    def clear(self, name: str) -> None:
        bm = self.usable(name)
        bm.bits = bytearray(data_bytes(self.img.virtual_size, bm.entry.granularity_bits))
        self.changed = True

    def set_enabled(self, name: str, enabled: bool) -> None:
        """block-dirty-bitmap-enable / -disable: the ``auto`` flag."""
        bm = self.usable(name)
        flags = bm.entry.flags | FLAG_AUTO if enabled else bm.entry.flags & ~FLAG_AUTO
        if flags != bm.entry.flags:
            bm.entry = bm.entry.replace(flags=flags)
            self.changed = True

    def merge(self, name: str, source: "Editor", source_name: str) -> None:
        """block-dirty-bitmap-merge of one source bitmap (of this image or of *source*'s) into
        *name*; granularities may differ, disk sizes may not."""
        dst = self.usable(name)
        src = source.usable(source_name)
        if source.img.virtual_size != self.img.virtual_size:
            raise ImageError("Bitmaps are of different sizes (destination size is %d, source size is %d) and "
                             "can't be merged" % (self.img.virtual_size, source.img.virtual_size))
        bits = bytearray(self.bits(dst))
        merge_bits(bits, dst.entry.granularity_bits, source.bits(src), src.entry.granularity_bits,
                   self.img.virtual_size)
        dst.bits = bits
        self.changed = True

    # -- storing --------------------------------------------------------------------------
    def commit(self) -> None:
        """Store the changes: new bits to new clusters, then a new directory and the switch to it,
        the old directory and the replaced or removed bitmaps' clusters freed last."""
        if not self.changed:
            return
        img = self.img
        old: List[Tuple[int, int]] = [(self.dir_offset, self.dir_size)] if self.dir_size else []
        old.extend(self.released)
        for e in self.dropped:
            old.extend(stored_clusters(img, e))
        for bm in self.bitmaps:
            if bm.bits is None:
                continue
            if bm.stored:
                old.extend(stored_clusters(img, bm.entry))
            bm.entry = bm.entry.replace(bitmap_table_offset=write_bits(img, bm.bits, bm.entry.bitmap_table_size),
                                        flags=bm.entry.flags & ~FLAG_IN_USE)
            bm.bits, bm.stored = None, True
        entries = [bm.entry for bm in self.bitmaps]
        self.dir_offset, self.dir_size = switch_directory(img, entries, old)
        self.dropped, self.released, self.changed = [], [], False

    # -- copies (qemu-img convert --bitmaps) -----------------------------------------------------
    def check_copyable(self, skip_broken: bool) -> None:
        """Before a copy is created: an inconsistent bitmap refuses it unless it is to be skipped.
        Bitmaps are visited last first, the order of QEMU's list (the first refused is the one it names)."""
        for bm in reversed(self.bitmaps):
            if bm.entry.in_use and not skip_broken:
                raise CorruptImage("Cannot copy inconsistent bitmap '%s'" % bm.entry.label, path=self.img.path,
                                   field="bitmap")

    def copy_from(self, source: "Editor", warn: Callable[[str], None]) -> None:
        """Add every consistent bitmap of *source* with its granularity, its enabled state and its
        bits (QEMU's convert_copy_bitmaps: add, then merge); inconsistent ones are skipped with a
        warning.  The copies keep the source's order; ``commit`` stores them."""
        chosen = []
        for bm in reversed(source.bitmaps):
            if bm.entry.in_use:
                warn("Skipping inconsistent bitmap '%s'" % bm.entry.label)
                continue
            if any(own.entry.name == bm.entry.name for own in self.bitmaps):
                raise ImageError("Failed to create bitmap %s: Bitmap already exists: %s"
                                 % (bm.entry.label, bm.entry.label), path=self.img.path, field="bitmap")
            chosen.append(bm)
        for bm in reversed(chosen):
            name = bm.entry.name.decode("utf-8", "surrogateescape")
            self.add(name, bm.entry.granularity, enabled=bm.entry.auto)
            self.merge(name, source, name)

    # -- the disk's size changes (qemu-img resize) ----------------------------------------------
    def begin_resize(self) -> None:
        """Before the disk's size changes: every bitmap read (an inconsistent one refuses the resize,
        as QEMU's qcow2_truncate_bitmaps_check does), then marked ``in_use`` on disk, so that an
        interruption before ``end_resize`` leaves bitmaps known to be inconsistent, never wrong ones."""
        for bm in self.bitmaps:
            if bm.entry.in_use:
                raise CorruptImage("Bitmap '%s' is inconsistent and cannot be used" % bm.entry.label,
                                   path=self.img.path)
        for bm in self.bitmaps:
            bm.bits = bytearray(self.bits(bm))
        if self.bitmaps and self.dir_size:
            for bm in self.bitmaps:
                bm.entry = bm.entry.replace(flags=bm.entry.flags | FLAG_IN_USE)
            write_in_place(self.img, [bm.entry for bm in self.bitmaps], self.dir_offset)

    def end_resize(self, size: int) -> None:
        """After the disk's size changed: each bitmap covers the new size (the granules past a
        shrunk end dropped, the new ones clean, as QEMU's hbitmap_truncate leaves them), stored."""
        cs = self.img.cs
        for bm in self.bitmaps:
            if bm.stored:
                self.released.extend(stored_clusters(self.img, bm.entry))
                bm.stored = False
            g = bm.entry.granularity_bits
            n = data_bytes(size, g)
            bits = bytearray(bm.bits[:n]) + bytearray(max(0, n - len(bm.bits)))
            granules = -(-size >> g)
            if granules % 8:
                bits[-1] &= (1 << (granules % 8)) - 1
            bm.bits = bits
            bm.entry = bm.entry.replace(bitmap_table_size=table_size(size, g, cs))
            self.changed = True
        self.commit()
