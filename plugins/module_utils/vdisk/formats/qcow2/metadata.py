"""The qcow2 metadata that guest data must never overwrite (a MetadataMap), and what a violation does.

References: QEMU block/qcow2-refcount.c qcow2_check_metadata_overlap (the kinds, their names and
the order they are tested in), block/qcow2.h (QCOW2_OL_CACHED, the default set), block/qcow2.c
qcow2_signal_corruption / qcow2_mark_corrupt.

vdisk checks QEMU's default set -- the header cluster, the active L1 table, every L2 table the
active L1 table points to, the refcount table, every refcount block it points to, the snapshot
table and the snapshots' L1 tables -- plus the bitmap directory (QEMU's constant set has it) and,
while the snapshots' L1 tables are small enough to read once (INACTIVE_L2_BUDGET), the snapshots'
L2 tables, which QEMU checks only with ``overlap-check=all``.  Every range is widened to whole
clusters, as QEMU widens the write it tests.
"""
import struct
from typing import List, Tuple

from ...overlap import MetadataMap, MetadataOverlap
from . import header as hdr
from .snapshot_table import MAX_TABLE_SIZE, Snapshot

HEADER = "qcow2_header"
ACTIVE_L1 = "active L1 table"
ACTIVE_L2 = "active L2 table"
REFCOUNT_TABLE = "refcount table"
REFCOUNT_BLOCK = "refcount block"
SNAPSHOT_TABLE = "snapshot table"
INACTIVE_L1 = "inactive L1 table"
INACTIVE_L2 = "inactive L2 table"
BITMAP_DIRECTORY = "bitmap directory"
# QEMU's test order: the first kind a write overlaps is the one it names
ORDER = (HEADER, ACTIVE_L1, REFCOUNT_TABLE, SNAPSHOT_TABLE, INACTIVE_L1, ACTIVE_L2, REFCOUNT_BLOCK, INACTIVE_L2,
         BITMAP_DIRECTORY)
INACTIVE_L2_BUDGET = 8 * 1024 * 1024      # bytes of snapshot L1 tables read to protect their L2 tables


def build(img) -> MetadataMap:
    """The map of *img*'s metadata from its current state (writable images: ``img.refcounts`` is set)."""
    h = img.header
    cs = img.cs
    ranges: List[Tuple[str, int, int]] = []
    uniform = []

    def add(name: str, offset: int, length: int) -> None:
        if length > 0:
            start = offset - offset % cs
            ranges.append((name, start, -(-(offset + length) // cs) * cs - start))

    def tables(name: str, entries, mask: int) -> None:
        """One-cluster tables the entries point to (many: kept as one sorted run of offsets)."""
        aligned = []
        for entry in entries:
            off = entry & mask
            if off % cs:
                add(name, off, cs)             # damaged: it spans two clusters
            elif off:
                aligned.append(off)
        aligned.sort()
        uniform.append((name, aligned, cs))

    add(HEADER, 0, cs)
    if h.l1_size:
        add(ACTIVE_L1, h.l1_table_offset, 8 * h.l1_size)
    tables(ACTIVE_L2, img.l1, hdr.OFFSET_MASK)
    add(REFCOUNT_TABLE, h.refcount_table_offset, h.refcount_table_clusters * cs)
    tables(REFCOUNT_BLOCK, img.refcounts.table if img.refcounts is not None else (), hdr.REFT_OFFSET_MASK)
    if h.nb_snapshots:
        snaps = img.snapshots_table()
        add(SNAPSHOT_TABLE, h.snapshots_offset, snapshot_table_size(img, snaps))
        for s in snaps:
            if s.l1_size:
                add(INACTIVE_L1, s.l1_table_offset, 8 * s.l1_size)
        if sum(8 * s.l1_size for s in snaps) <= INACTIVE_L2_BUDGET:
            entries: List[int] = []
            for s in snaps:
                raw = img.host.pread(8 * s.l1_size, s.l1_table_offset) if s.l1_size else b""
                entries.extend(e for (e,) in struct.iter_unpack(">Q", raw[:len(raw) // 8 * 8]))
            tables(INACTIVE_L2, entries, hdr.OFFSET_MASK)
    if h.bitmaps_extension is not None and h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        ext = h.bitmaps_extension
        add(BITMAP_DIRECTORY, ext.bitmap_directory_offset, ext.bitmap_directory_size)
    return MetadataMap.from_ranges(ranges, ORDER, uniform)


def snapshot_table_size(img, snaps) -> int:
    """The snapshot table's length on disk: its entries, each padded to 8 bytes (read again, bounded
    by what the parsed entries can take, so names that are not UTF-8 are measured exactly)."""
    bound = sum(Snapshot.SIZE + len(s.extra) + 4 * (len(s.id) + len(s.name)) + 7 for s in snaps)
    data = img.host.pread(min(bound, MAX_TABLE_SIZE), img.header.snapshots_offset)
    off = 0
    for dummy in snaps:
        if off + Snapshot.SIZE > len(data):
            return max(off, len(data))
        off += Snapshot.unpack(data, off).entry_size
    return off


def signal_corruption(img, exc: MetadataOverlap) -> MetadataOverlap:
    """Mark the image corrupt as QEMU does (incompatible bit 1, a version 3 header only: version 2 has
    no field for it) and return the error to raise; no further write goes through this image."""
    if not img.corrupt:
        img.corrupt = True
        h = img.header
        if h.version >= 3:
            h.incompatible_features |= hdr.INCOMPAT_CORRUPT
            img.host.flush()
            img.host.pwrite(*h.pack_fields("incompatible_features"))
            img.host.flush()
    return MetadataOverlap("qcow2: Marking image as corrupt: " + exc.message, exc.kind, exc.offset, exc.length,
                           path=img.path)
