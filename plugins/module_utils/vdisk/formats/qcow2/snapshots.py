"""qcow2 internal snapshots: create, apply (goto), delete, and the table write.

Reference: docs/interop/qcow2.txt "Snapshots".  Order of writes, as QEMU's
block/qcow2-snapshot.c: references are added before anything points to them and
dropped only after nothing does, so an interruption leaves at most leaked clusters.
"""
import struct
import time
from typing import Dict, List, Optional, Tuple

from ...errors import ImageError
from . import header as hdr
from .snapshot_table import MAX_EXTRA_DATA, MAX_TABLE_SIZE, SNAPSHOT_HEADER, Snapshot

U64 = struct.Struct(">Q")
EXTRA_V3 = struct.Struct(">QQq")   # vm_state_size_large, disk_size, icount


def pack_snapshot_table(snaps: List[Snapshot]) -> bytes:
    """Serialize snapshot entries (id, name and unknown extra data preserved), each padded to 8."""
    out = bytearray()
    for s in snaps:
        ident, name = s.id.encode("utf-8"), s.name.encode("utf-8")
        # refresh the fields vdisk knows and keep the rest; a new entry gets QEMU's 24 bytes
        known = EXTRA_V3.pack(s.vm_state_size, s.disk_size, s.icount)
        extra = bytearray(s.extra) if s.extra else bytearray(24)
        n = min(len(extra), 24)
        extra[:n] = known[:n]
        out += SNAPSHOT_HEADER.pack(s.l1_table_offset, s.l1_size, len(ident), len(name), s.date_sec, s.date_nsec,
                                    s.vm_clock_nsec, min(s.vm_state_size, 0xFFFFFFFF), len(extra))
        out += extra + ident + name
        out += bytes((-len(out)) % 8)
    return bytes(out)


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


def _tree_refs(img, l1_entries: List[int]) -> Tuple[Dict[int, int], List[int]]:
    """Host clusters referenced from an L1 table: ``{cluster index: count}`` and the L2 table offsets."""
    cs = img.cs
    refs: Dict[int, int] = {}
    l2s = []
    x = 62 - (img.cb - 8)
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


def _apply_refs(img, refs: Dict[int, int], sign: int) -> None:
    """Change refcounts by ``sign * count``; runs of neighbours with equal counts go in one call."""
    rc = img.refcounts
    run_start, run_len, run_count = -1, 0, 0
    for cluster in sorted(refs):
        count = refs[cluster]
        if run_len and cluster == run_start + run_len and count == run_count:
            run_len += 1
            continue
        if run_len:
            rc.change(run_start, run_len, sign * run_count)
        run_start, run_len, run_count = cluster, 1, count
    if run_len:
        rc.change(run_start, run_len, sign * run_count)


def update_copied_flags(img) -> None:
    """Make COPIED in the active L1/L2 tables say exactly "refcount is one"."""
    rc = img.refcounts
    cs = img.cs
    h = img.header
    for l1i, entry in enumerate(img.l1):
        l2_off = entry & hdr.OFFSET_MASK
        if not l2_off:
            continue
        want = rc.get(l2_off // cs) == 1
        new_entry = (entry | hdr.OFLAG_COPIED) if want else (entry & ~hdr.OFLAG_COPIED)
        table = img._l2_table(l1i)
        changed = []
        for idx in range(img.l2e):
            e, bitmap = img._entry(table, idx)
            off = e & hdr.OFFSET_MASK
            if not off or e & hdr.OFLAG_COMPRESSED:
                continue
            ne = (e | hdr.OFLAG_COPIED) if rc.get(off // cs) == 1 else (e & ~hdr.OFLAG_COPIED)
            if ne != e:
                img._set_entry(table, idx, ne, bitmap)
                changed.append(idx)
        if changed:
            img._write_l2_span(l2_off, table, min(changed), max(changed))
        if new_entry != entry:
            img.l1[l1i] = new_entry
            img.host.pwrite(U64.pack(new_entry), h.l1_table_offset + l1i * 8)


def clear_copied_flags(img, l1_entries: List[int]) -> None:
    """Clear COPIED in the L2 tables reached from *l1_entries* (and, for the active table, in its L1).

    A clear COPIED flag only forces copy-on-write, so clearing it before refcounts
    rise is the order in which an interruption can never let a write land in a
    cluster a snapshot still uses.
    """
    cs = img.cs
    es = 16 if img.ext else 8
    for entry in l1_entries:
        l2_off = entry & hdr.OFFSET_MASK
        if not l2_off:
            continue
        raw = bytearray(img.host.pread(cs, l2_off))
        changed = False
        for idx in range(img.l2e):
            e = U64.unpack_from(raw, idx * es)[0]
            if e & hdr.OFLAG_COPIED:
                U64.pack_into(raw, idx * es, e & ~hdr.OFLAG_COPIED)
                changed = True
        if changed:
            img.host.pwrite(bytes(raw), l2_off)
            img._l2_cache.pop(l2_off, None)


def _clear_active_l1_copied(img) -> None:
    h = img.header
    if any(e & hdr.OFLAG_COPIED for e in img.l1):
        img.l1 = [e & ~hdr.OFLAG_COPIED for e in img.l1]
        img.host.pwrite(b"".join(U64.pack(e) for e in img.l1), h.l1_table_offset)


def write_snapshot_table(img, snaps: List[Snapshot]) -> None:
    """Write a new snapshot table, switch the header to it in one write, then free the old one."""
    h = img.header
    data = pack_snapshot_table(snaps)
    if len(data) > MAX_TABLE_SIZE:
        raise ImageError("snapshot table would exceed %d bytes" % MAX_TABLE_SIZE, path=img.path)
    old_offset, old_size = h.snapshots_offset, _table_size(img)
    new_offset = 0
    if snaps:
        clusters = -(-len(data) // img.cs)
        new_offset = img.refcounts.alloc(clusters)
        img.host.pwrite(data, new_offset)
    img.host.flush()
    h.nb_snapshots = len(snaps)
    h.snapshots_offset = new_offset
    img.host.pwrite(struct.pack(">IQ", h.nb_snapshots, h.snapshots_offset), 60)
    img.host.flush()
    if old_offset and old_size:
        img.refcounts.free(old_offset, old_size)
    img._snapshots = list(snaps)


def _table_size(img) -> int:
    if not img.header.nb_snapshots:
        return 0
    return len(pack_snapshot_table(img.snapshots_table()))


def create_snapshot(img, name: str) -> Snapshot:
    """Take an internal snapshot of the active layer."""
    if not name:
        raise ImageError("snapshot name must not be empty", path=img.path, field="snapshot")
    snaps = list(img.snapshots_table())
    if len(snaps) >= hdr.MAX_SNAPSHOTS:
        raise ImageError("too many snapshots", path=img.path, field="snapshot")
    ids = [int(s.id) for s in snaps if s.id.isdigit()]
    new_id = str(max(ids) + 1 if ids else 1)
    # 1. the active tables stop claiming sole ownership (harmless if interrupted: it only forces COW)
    clear_copied_flags(img, img.l1)
    _clear_active_l1_copied(img)
    img.host.flush()
    # 2. a copy of the active L1 table
    l1_bytes = b"".join(U64.pack(e) for e in img.l1)
    l1_offset = img.refcounts.alloc(max(1, -(-len(l1_bytes) // img.cs))) if img.l1 else 0
    if l1_bytes:
        img.host.pwrite(l1_bytes, l1_offset)
    # 3. every table and cluster it reaches gains a reference
    refs, _ = _tree_refs(img, img.l1)
    _apply_refs(img, refs, +1)
    img.host.flush()
    now = time.time()
    snap = Snapshot(l1_offset, len(img.l1), new_id, name, int(now), int((now % 1) * 1e9), 0, 0, img.virtual_size,
                    0, b"")
    # 4. the table that makes it visible; then COPIED wherever a refcount is still one
    write_snapshot_table(img, snaps + [snap])
    update_copied_flags(img)
    img.host.flush()
    return snap


def _read_l1(img, offset: int, size: int) -> List[int]:
    if size * 8 > hdr.MAX_L1_SIZE:
        raise ImageError("Snapshot L1 table too large", path=img.path, field="snapshot")
    if offset % img.cs:
        raise ImageError("Snapshot L1 table offset invalid", path=img.path, field="snapshot")
    raw = img.host.pread(size * 8, offset) if size else b""
    return [U64.unpack_from(raw, i)[0] for i in range(0, len(raw), 8)]


def apply_snapshot(img, name: str) -> None:
    """Make the active layer equal to the snapshot (QEMU's snapshot goto)."""
    _, snap = find_snapshot(img, name)
    snap_l1 = _read_l1(img, snap.l1_table_offset, snap.l1_size)
    if len(snap_l1) > len(img.l1):
        img.grow_l1(len(snap_l1))
    old_l1 = list(img.l1)
    new_l1 = snap_l1 + [0] * (len(old_l1) - len(snap_l1))
    # the snapshot's tables become active: none of them may claim sole ownership yet
    clear_copied_flags(img, snap_l1)
    refs, _ = _tree_refs(img, snap_l1)
    _apply_refs(img, refs, +1)
    img.host.flush()
    img.l1 = [e & ~hdr.OFLAG_COPIED for e in new_l1]
    img.host.pwrite(b"".join(U64.pack(e) for e in img.l1), img.header.l1_table_offset)
    img.host.flush()
    img._l2_cache.clear()
    old_refs, _ = _tree_refs(img, old_l1)
    _apply_refs(img, old_refs, -1)
    update_copied_flags(img)
    if snap.disk_size != img.virtual_size:
        img.set_size_field(snap.disk_size)
    img.host.flush()


def delete_snapshot(img, name: str) -> None:
    """Remove a snapshot and free what only it used."""
    index, snap = find_snapshot(img, name)
    snaps = list(img.snapshots_table())
    del snaps[index]
    write_snapshot_table(img, snaps)
    snap_l1 = _read_l1(img, snap.l1_table_offset, snap.l1_size)
    refs, _ = _tree_refs(img, snap_l1)
    _apply_refs(img, refs, -1)
    if snap.l1_size:
        img.refcounts.free(snap.l1_table_offset, snap.l1_size * 8)
    img._l2_cache.clear()
    update_copied_flags(img)
    img.host.flush()
