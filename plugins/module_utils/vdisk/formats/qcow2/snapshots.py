"""qcow2 internal snapshots: create, apply (goto) and delete, each one atomic.

Reference: docs/interop/qcow2.txt "Snapshots".  A snapshot moves data clusters from
"COPIED, refcount 1" to "not COPIED, refcount 2" (and back): the flag lives in an L2
table and the count in a refcount block, so no order of in-place writes avoids a
moment where one disagrees with the other.  vdisk therefore writes the whole new
state beside the old one -- fresh copies of the active L2 tables with the right
COPIED flags, a new active L1 table, the new snapshot table and a complete new
refcount structure -- past the end of the file, and switches to it with a single
write of the header fields that point to them.  Interrupted before that write, the
image is the old one (the new clusters are not even counted); after it, the new one.
"""
import re
import struct
import time
from array import array
from typing import Dict, List, Optional, Tuple

from ...errors import CorruptImage, ImageError
from . import bitmaps
from . import header as hdr
from .refcount import build_refcount_structure, file_end_cluster
from .snapshot_table import MAX_TABLE_SIZE, Snapshot, SnapshotExtra, name_bytes, pack_snapshot_table

U64 = struct.Struct(">Q")
# the header fields one switch rewrites, adjacent: the size and the three tables' pointers
SWITCHED_FIELDS = ("size", "crypt_method", "l1_size", "l1_table_offset", "refcount_table_offset",
                   "refcount_table_clusters", "nb_snapshots", "snapshots_offset")


def find_snapshot(img, name: str) -> Tuple[int, Snapshot]:
    """Look a snapshot up by id first, then by name, as qemu-img does."""
    snaps = img.snapshots_table()
    for i, s in enumerate(snaps):
        if s.id == name:
            return i, s
    for i, s in enumerate(snaps):
        if s.name == name:
            return i, s
    raise ImageError("snapshot '%s' not found" % name, path=img.path, field="snapshot")


def find_snapshot_exact(img, ident: Optional[str], name: Optional[str]) -> Snapshot:
    """The snapshot matching every given key (``snapshot.id=`` and/or ``snapshot.name=``)."""
    for s in img.snapshots_table():
        if (ident is None or s.id == ident) and (name is None or s.name == name):
            return s
    raise ImageError("Failed to load snapshot: Can't find snapshot", path=img.path, field="snapshot")


def _tree_refs(img, l1_entries: List[int]) -> Tuple[Dict[int, int], List[int]]:
    """Host clusters referenced from an L1 table: ``{cluster index: count}`` and the L2 table offsets."""
    cs = img.cs
    x = 62 - (img.cb - 8)       # compressed descriptors: offset bits, then the sector count
    refs: Dict[int, int] = {}
    l2s = []
    for entry in l1_entries:
        l2_off = entry & hdr.OFFSET_MASK
        if not l2_off:
            continue
        l2s.append(l2_off)
        refs[l2_off // cs] = refs.get(l2_off // cs, 0) + 1
        raw = img.host.pread(cs, l2_off)
        n = img.l2e
        words = struct.unpack(">%dQ" % (n * (2 if img.ext else 1)), raw)
        step = 2 if img.ext else 1
        for e in words[::step]:
            if not e:
                continue
            if e & hdr.OFLAG_COMPRESSED:
                coff = e & ((1 << x) - 1)
                clen = (((e >> x) & ((1 << (62 - x)) - 1)) + 1) * 512 - (coff & 511)
                for c in range(coff // cs, (coff + clen - 1) // cs + 1):
                    refs[c] = refs.get(c, 0) + 1
                continue
            off = e & hdr.OFFSET_MASK
            if off:
                refs[off // cs] = refs.get(off // cs, 0) + 1
    return refs, l2s


def read_l1(img, offset: int, size: int) -> List[int]:
    if size * 8 > hdr.MAX_L1_SIZE:
        raise ImageError("Snapshot L1 table too large", path=img.path, field="snapshot")
    if offset % img.cs:
        raise ImageError("Snapshot L1 table offset invalid", path=img.path, field="snapshot")
    raw = img.host.pread(size * 8, offset) if size else b""
    return [U64.unpack_from(raw, i)[0] for i in range(0, len(raw), 8)]


def _add(refs: Dict[int, int], first: int, last: int) -> None:
    for c in range(first, last + 1):
        refs[c] = refs.get(c, 0) + 1


def switch_state(img, snaps: List[Snapshot], active_l1: List[int], size: int) -> None:
    """Make the image's state: these snapshots, an active layer whose tables are copies of the L2 tables
    *active_l1* points to, and *size* -- written beside the old state, then switched to in one write."""
    h = img.header
    cs = img.cs
    es = 16 if img.ext else 8
    table_data = pack_snapshot_table(snaps)
    if len(table_data) > MAX_TABLE_SIZE:
        raise ImageError("snapshot table would exceed %d bytes" % MAX_TABLE_SIZE, path=img.path)
    l1_size = max(len(active_l1), -(-(-(-size // cs)) // img.l2e))
    if l1_size * 8 > hdr.MAX_L1_SIZE:
        raise ImageError("Active L1 table too large", path=img.path, field="l1_size")
    # references of the new state (everything but the pieces placed below)
    refs: Dict[int, int] = {0: 1}
    crypto = h.crypto_header()
    if crypto is not None:
        coff, clen = crypto.encryption_header_offset, crypto.encryption_header_length
        _add(refs, coff // cs, (coff + clen - 1) // cs)
    for offset, length in bitmaps.strict_ranges(img):
        _add(refs, offset // cs, (offset + length - 1) // cs)
    for snap in snaps:
        l1 = read_l1(img, snap.l1_table_offset, snap.l1_size)
        if snap.l1_size:
            _add(refs, snap.l1_table_offset // cs, (snap.l1_table_offset + snap.l1_size * 8 - 1) // cs)
        tree, dummy = _tree_refs(img, l1)
        for c, n in tree.items():
            refs[c] = refs.get(c, 0) + n
    sources = [(i, e & hdr.OFFSET_MASK) for i, e in enumerate(active_l1) if e & hdr.OFFSET_MASK]
    tables = {}
    for i, off in sources:
        tree, dummy = _tree_refs(img, [off])      # the table itself and its data ...
        tree[off // cs] -= 1                  # ... but the active layer gets a copy of the table
        for c, n in tree.items():
            if n:
                refs[c] = refs.get(c, 0) + n
        tables[i] = bytearray(img.host.pread(cs, off))
    # placement past the end of the file: copies of the tables, the L1 table, the snapshot table
    nxt = file_end_cluster(img)
    if max(refs) >= nxt:
        raise CorruptImage("metadata points past the end of the file (cluster %d); run 'check -r all' first"
                           % max(refs), path=img.path, field="L2 table")
    new_tables = {}
    for i, _off in sources:
        new_tables[i] = nxt * cs
        refs[nxt] = 1
        nxt += 1
    l1_clusters = -(-l1_size * 8 // cs)
    l1_offset = nxt * cs if l1_size else 0
    _add(refs, nxt, nxt + l1_clusters - 1)
    nxt += l1_clusters
    snap_clusters = -(-len(table_data) // cs)
    snap_offset = nxt * cs if snaps else 0
    _add(refs, nxt, nxt + snap_clusters - 1)
    nxt += snap_clusters
    counts = array("Q", bytes(8 * max(nxt, max(refs) + 1)))
    for c, n in refs.items():
        counts[c] = n
    rt_offset, rt_clusters, writes = build_refcount_structure(counts, nxt, h.refcount_bits, cs, img.path)
    # the copies carry COPIED exactly where the new refcount is one
    for i, raw in tables.items():
        for idx in range(img.l2e):
            e = U64.unpack_from(raw, idx * es)[0]
            if e & hdr.OFLAG_COMPRESSED:
                e &= ~hdr.OFLAG_COPIED
            else:
                off = e & hdr.OFFSET_MASK
                if not off:
                    continue
                e = (e | hdr.OFLAG_COPIED) if counts[off // cs] == 1 else (e & ~hdr.OFLAG_COPIED)
            U64.pack_into(raw, idx * es, e)
        img.host.pwrite(bytes(raw), new_tables[i])
    new_l1 = [(new_tables[i] | hdr.OFLAG_COPIED) if i in new_tables else 0 for i in range(l1_size)]
    if l1_size:
        img.host.pwrite(b"".join(U64.pack(e) for e in new_l1), l1_offset)
    if snaps:
        img.host.pwrite(table_data, snap_offset)
    for where, data in writes:
        img.host.pwrite(data, where)
    img.host.flush()
    # the switch: size, L1 table, refcount table and snapshot table in one write of the header
    new = h.replace(size=size, l1_size=l1_size, l1_table_offset=l1_offset, refcount_table_offset=rt_offset,
                    refcount_table_clusters=rt_clusters, nb_snapshots=len(snaps), snapshots_offset=snap_offset)
    img.host.pwrite(*new.pack_fields(*SWITCHED_FIELDS))
    img.host.flush()
    for name in SWITCHED_FIELDS:
        setattr(h, name, getattr(new, name))
    img.reload_state(new_l1, snaps)


def create_snapshot(img, name: str) -> Snapshot:
    """Take an internal snapshot of the active layer (it keeps the current L1 table)."""
    if not name:
        raise ImageError("snapshot name must not be empty", path=img.path, field="snapshot")
    snaps = list(img.snapshots_table())
    if len(snaps) >= hdr.MAX_SNAPSHOTS:
        raise ImageError("too many snapshots", path=img.path, field="snapshot")
    new_id = str((max([_strtoul(s.id) for s in snaps], default=0) + 1) & ULONG_MAX)
    raw = name_bytes(name)      # at most 255 bytes, as qemu-img keeps them
    h = img.header
    now = time.time()
    snap = Snapshot(l1_table_offset=h.l1_table_offset, l1_size=h.l1_size, date_sec=int(now),
                    date_nsec=int((now % 1) * 1e9), id=new_id, name=raw.decode("utf-8", "replace"),
                    extra_fields=SnapshotExtra(disk_size=img.virtual_size, icount=0), raw_id=new_id.encode(),
                    raw_name=raw)
    switch_state(img, snaps + [snap], list(img.l1), img.virtual_size)
    return snap


ULONG_MAX = (1 << 64) - 1
_STRTOUL = re.compile(r"[ \t\n\v\f\r]*([+-]?)0*([0-9]*)")


def _strtoul(text: str) -> int:
    """An id as QEMU's find_new_snapshot_id() reads it: strtoul(id, NULL, 10) -- the leading decimal
    digits, 0 without any, ULONG_MAX past it (ERANGE), negated modulo 2**64 after a minus sign.
    Ids are text in the image (up to 65535 bytes): never int() of all of it."""
    sign, digits = _STRTOUL.match(text).groups()
    if not digits:
        return 0
    if len(digits) > 20 or int(digits) > ULONG_MAX:
        return ULONG_MAX
    return (-int(digits) & ULONG_MAX) if sign == "-" else int(digits)


def apply_snapshot(img, name: str) -> None:
    """Make the active layer equal to the snapshot (QEMU's snapshot goto)."""
    dummy, snap = find_snapshot(img, name)
    snap_l1 = read_l1(img, snap.l1_table_offset, snap.l1_size)
    switch_state(img, list(img.snapshots_table()), snap_l1, snap.disk_size)


def delete_snapshot(img, name: str) -> None:
    """Remove a snapshot; what only it used is freed by the new refcount structure."""
    index, dummy = find_snapshot(img, name)
    snaps = list(img.snapshots_table())
    del snaps[index]
    switch_state(img, snaps, list(img.l1), img.virtual_size)
