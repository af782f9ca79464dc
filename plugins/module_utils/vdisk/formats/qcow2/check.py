"""qcow2 consistency check and repair, with qemu-img's classes, counters and messages.

The check counts every reference to every host cluster (header, L1/L2 tables of the
active layer and of each snapshot, data and compressed clusters, the snapshot table,
the refcount table and blocks) and compares the counts with the stored refcounts.
Repair (``-r leaks``) lowers leaked refcounts in place; ``-r all`` also drops
references that cannot be valid (unaligned, past the end of the file, into the
header), fixes the COPIED flags and rebuilds the refcount structure in a new area
at the end of the file, switching the header to it only once it is complete.

With an external data file, data clusters live in that file and are not refcounted
(qcow2.txt, incompatible bit 2): they are counted as allocated (and fragmented) but
add no references, and their COPIED flag must be set (QEMU takes their refcount as one).
"""
import struct
import sys
from array import array
from functools import lru_cache, reduce
from operator import and_, or_
from typing import Dict, List, Optional, Tuple

from ...driver import CheckResult
from ...errors import ImageError
from . import bitmaps
from . import header as hdr
from .refcount import decode_refblock, encode_refblock, rebuild_refcounts
from .snapshot_table import MAX_TABLE_SIZE, Snapshot, pack_snapshot_table

U64 = struct.Struct(">Q")


class _Checker:
    def __init__(self, img, result: CheckResult, fix_refs: bool):
        self.img = img
        self.res = result
        self.fix_refs = fix_refs          # -r all: drop invalid references while walking the tables
        h = img.header
        self.h = h
        self.cs = h.cluster_size
        self.file_size = img.host.size()
        self.nb_clusters = -(-self.file_size // self.cs)
        self.refs = array("Q", bytes(8 * self.nb_clusters)) if self.nb_clusters else array("Q")
        self.lost: List[Tuple[int, int]] = []       # guest ranges whose references were dropped
        self.l2_fixes: Dict[int, Dict[int, Tuple[int, int]]] = {}   # l2 offset -> {index: (entry, bitmap)}
        self.l1_fixes: Dict[int, int] = {}
        self.snapshot_l1_fixes: Dict[int, int] = {}                  # host offset of a snapshot L1 entry -> value
        self.bad_snapshots: List[int] = []                           # indexes of unusable snapshot entries
        self.contiguous: Dict[int, Tuple[int, bool]] = {}  # active L2 offset -> (first cluster, COPIED) of its run
        self.bitmap_problems: List[str] = []

    def msg(self, text: str) -> None:
        self.res.messages.append(text)

    def corruption(self, text: str) -> None:
        self.msg(text)
        self.res.corruptions += 1

    # -- reference counting ------------------------------------------------------------
    def count(self, offset: int, size: int) -> bool:
        """Add one reference to each cluster of the host range; False if it lies past the file end."""
        if size <= 0:
            return True
        cs = self.cs
        first = offset // cs
        last = (offset + size - 1) // cs
        if last >= self.nb_clusters:
            self.corruption("ERROR: counting reference for region exceeding the end of the file by one cluster "
                            "or more: offset 0x%x size 0x%x" % (offset, size))
            last = self.nb_clusters - 1
        refs = self.refs
        for c in range(first, last + 1):
            refs[c] += 1
        return True

    def in_file(self, offset: int, size: int) -> bool:
        return offset + size <= self.nb_clusters * self.cs

    def count_all(self) -> None:
        """Count every reference but the refcount structure's own: the header, the encryption
        header, the active and the snapshots' tables and data, the persistent bitmaps."""
        h = self.h
        self.count(0, self.cs)
        crypto = h.crypto_header()
        if crypto is not None:
            self.count(crypto.encryption_header_offset, crypto.encryption_header_length)
        self.walk_l1(h.l1_table_offset, h.l1_size, True, "active")
        self.walk_snapshots()
        self.walk_bitmaps()

    def walk_bitmaps(self) -> None:
        """The bitmap directory, tables and data clusters (QEMU's qcow2_check_bitmaps_refcounts);
        what QEMU would refuse to load is a corruption here."""
        problems: List[str] = []
        for offset, length in bitmaps.referenced_ranges(self.img, problems.append):
            self.count(offset, length)
        for problem in problems:
            self.corruption("ERROR bitmaps: %s" % problem)
        self.bitmap_problems = problems

    # -- tables -----------------------------------------------------------------------
    def walk_l1(self, l1_offset: int, l1_size: int, active: bool, label: str) -> None:
        cs = self.cs
        if l1_size == 0:
            return
        raw = self.img.host.pread(l1_size * 8, l1_offset)
        l1 = struct.unpack(">%dQ" % l1_size, raw)
        self.count(l1_offset, l1_size * 8)
        span = self.img.l2e * cs
        for l1i, entry in enumerate(l1):
            if not entry:
                continue
            off = entry & hdr.OFFSET_MASK
            if not off:
                # flags without a table: reads see no L2 table, but qemu-img's check takes the entry for
                # one at offset 0 (the header) and reports corruption; the repair clears the entry
                self.corruption("ERROR l1_entry=%x (L1 index: 0x%x): L2 table offset is 0 but the entry is not; "
                                "L1 entry corrupted" % (entry, l1i))
                if self.fix_refs:
                    if active:
                        self.l1_fixes[l1i] = 0
                    else:
                        self.snapshot_l1_fixes[l1_offset + 8 * l1i] = 0
                continue
            bad = None
            if off % cs:
                bad = "ERROR l2_offset=%x: Table is not cluster aligned; L1 entry corrupted" % off
            elif off + cs > self.nb_clusters * cs:
                bad = ("ERROR l2_offset=%x: L2 table is beyond the end of the file; L1 entry corrupted" % off)
            elif off < cs:
                bad = "ERROR l2_offset=%x: L2 table overlaps the image header; L1 entry corrupted" % off
            if bad:
                self.corruption(bad)
                if active and self.fix_refs:
                    self.l1_fixes[l1i] = 0
                    self.lost.append((l1i * span, span))
                continue
            self.count(off, cs)
            self.walk_l2(off, l1i, active)

    def _walk_l2_plain(self, words, l1i: int, active: bool) -> bool:
        """The common table at C-ish speed: only uncompressed, aligned clusters inside the file,
        none in the header, all inside the guest.  False (nothing counted) for anything else."""
        img, cs = self.img, self.cs
        n = img.l2e
        if (l1i + 1) * n > -(-img.virtual_size // cs):
            return False
        present = [e for e in words if e]
        if not present:
            return True
        flags = reduce(or_, present)
        if flags & hdr.OFLAG_COMPRESSED:
            return False
        offsets = [e & hdr.OFFSET_MASK for e in present]
        if 0 in offsets:
            # zero clusters without an offset: drop them, they count nothing
            offsets = [o for o in offsets if o]
            if not offsets:
                return True
        if reduce(or_, offsets) & (cs - 1) or min(offsets) < cs or max(offsets) + cs > self.nb_clusters * cs:
            return False
        refs = self.refs
        cb = img.cb
        first = offsets[0] >> cb
        count = len(offsets)
        if offsets == list(range(offsets[0], offsets[0] + count * cs, cs)):
            # one contiguous host run (a freshly written image): add to the slice at once
            if refs[first:first + count] == array("Q", bytes(8 * count)):
                refs[first:first + count] = array("Q", [1]) * count
            else:
                refs[first:first + count] = array("Q", [r + 1 for r in refs[first:first + count]])
            fragmented = 0
        else:
            for o in offsets:
                refs[o >> cb] += 1
            fragmented = sum(1 for a, b in zip(offsets, offsets[1:]) if b != a + cs)
        if active:
            res = self.res
            res.allocated_clusters += count
            res.fragmented_clusters += fragmented
        return True

    def _walk_l2_contiguous(self, raw: bytes, l2_off: int, l1i: int, active: bool) -> bool:
        """The table of a freshly written image, tested with one comparison: all its entries map
        consecutive host clusters inside the file, with the same flags (none, or COPIED only).
        False (nothing counted) for anything else."""
        img, cs = self.img, self.cs
        n = img.l2e
        if img.ext or (l1i + 1) * n > -(-img.virtual_size // cs):
            return False
        first = U64.unpack_from(raw)[0]
        flags = first & ~hdr.OFFSET_MASK
        start = first & hdr.OFFSET_MASK
        if flags not in (0, hdr.OFLAG_COPIED) or start < cs or start % cs or start + n * cs > self.nb_clusters * cs:
            return False
        ones, steps = _progression_terms(n, cs)
        if int.from_bytes(raw, "big") != first * ones + steps:
            return False
        c0 = start >> img.cb
        refs = self.refs
        if refs[c0:c0 + n] == _zeros(n):
            refs[c0:c0 + n] = _ones(n)
        else:
            refs[c0:c0 + n] = array("Q", [r + 1 for r in refs[c0:c0 + n]])
        if active:
            self.res.allocated_clusters += n
            self.contiguous[l2_off] = (c0, bool(flags))
        return True

    def _walk_l2_data_file(self, words, l2_off: int, l1i: int, active: bool) -> None:
        """An L2 table of an image with an external data file: nothing it maps is in this file."""
        img, cs = self.img, self.cs
        n = img.l2e
        step = 2 if img.ext else 1
        nb_guest = -(-img.virtual_size // cs)
        res = self.res
        next_contig = None
        for idx in range(n):
            entry = words[idx * step]
            bitmap = words[idx * step + 1] if img.ext else 0
            guest = (l1i * n + idx) * cs
            if entry & hdr.OFLAG_COMPRESSED:
                self.corruption("ERROR compressed cluster %d with data file, entry=0x%x" % (l1i * n + idx, entry))
                if active and self.fix_refs:
                    self._drop(l2_off, idx, guest)
                continue
            off = entry & hdr.OFFSET_MASK
            mapped = bool(off or entry & hdr.OFLAG_COPIED)
            if img.ext and bitmap & 0xFFFFFFFF & (bitmap >> 32 | (0 if mapped else 0xFFFFFFFF)):
                self.corruption("ERROR invalid cluster entry found (L2 offset: 0x%x, L2 index: 0x%x)" % (l2_off, idx))
                if active and self.fix_refs:
                    self._drop(l2_off, idx, guest)
                continue
            if not mapped or (entry & hdr.OFLAG_ZERO and not off and not img.ext):
                continue
            if off % cs:
                self.corruption("ERROR offset=%x: Data cluster is not properly aligned; L2 entry corrupted." % off)
                if active and self.fix_refs:
                    self._drop(l2_off, idx, guest)
                continue
            if active and l1i * n + idx < nb_guest:
                res.allocated_clusters += 1
                if next_contig is not None and off != next_contig:
                    res.fragmented_clusters += 1
                next_contig = off + cs

    def walk_l2(self, l2_off: int, l1i: int, active: bool) -> None:
        img, cs = self.img, self.cs
        raw = img.host.pread(cs, l2_off)
        if img.data_file is not None:
            words = struct.unpack(">%dQ" % (img.l2e * (2 if img.ext else 1)), raw)
            self._walk_l2_data_file(words, l2_off, l1i, active)
            return
        if self._walk_l2_contiguous(raw, l2_off, l1i, active):
            return
        ext = img.ext
        n = img.l2e
        words = struct.unpack(">%dQ" % (n * (2 if ext else 1)), raw)
        if not ext and self._walk_l2_plain(words, l1i, active):
            return
        res = self.res
        x = 62 - (img.cb - 8)
        nb_guest = -(-img.virtual_size // cs)
        next_contig = None
        for idx in range(n):
            entry = words[idx * 2] if ext else words[idx]
            bitmap = words[idx * 2 + 1] if ext else 0
            if not entry and not bitmap:
                continue
            guest = (l1i * n + idx) * cs
            if entry & hdr.OFLAG_COMPRESSED:
                coff = entry & ((1 << x) - 1)
                sectors = ((entry >> x) & ((1 << (62 - x)) - 1)) + 1
                clen = sectors * 512 - (coff & 511)
                if entry & hdr.OFLAG_COPIED:
                    self.corruption("ERROR: coffset=0x%x: Compressed cluster has COPIED flag set" % coff)
                    if active and self.fix_refs:
                        self.l2_fixes.setdefault(l2_off, {})[idx] = (entry & ~hdr.OFLAG_COPIED, bitmap)
                if not self.in_file(coff, clen) and coff // cs >= self.nb_clusters:
                    self.corruption("ERROR compressed cluster %d: offset 0x%x is beyond the end of the file"
                                    % (l1i * n + idx, coff))
                    if active and self.fix_refs:
                        self._drop(l2_off, idx, guest)
                    continue
                self.count(coff, clen)
                if active:
                    # compressed clusters count as fragmented: adjacent ones still share sectors (as QEMU)
                    res.allocated_clusters += 1
                    res.compressed_clusters += 1
                    res.fragmented_clusters += 1
                continue
            off = entry & hdr.OFFSET_MASK
            if ext:
                alloc = bitmap & 0xFFFFFFFF
                zero = bitmap >> 32
                if alloc & zero or (alloc and not off):
                    self.corruption("ERROR invalid cluster entry found (L2 offset: 0x%x, L2 index: 0x%x)"
                                    % (l2_off, idx))
                    if active and self.fix_refs:
                        self._drop(l2_off, idx, guest)
                    continue
            if not off:
                continue
            if off % cs:
                self.corruption("ERROR offset=%x: Data cluster is not properly aligned; L2 entry corrupted." % off)
                if self.fix_refs:
                    if active:
                        self._drop(l2_off, idx, guest)
                    continue
                off -= off % cs   # counted where QEMU counts it, so the classes match qemu-img's
            if off + cs > self.nb_clusters * cs or off < cs:
                if off < cs:
                    self.corruption("ERROR offset=%x: Data cluster overlaps the image header; L2 entry corrupted."
                                    % off)
                else:
                    self.corruption("ERROR: counting reference for region exceeding the end of the file by one "
                                    "cluster or more: offset 0x%x size 0x%x" % (off, cs))
                if active and self.fix_refs:
                    self._drop(l2_off, idx, guest)
                continue
            self.count(off, cs)
            if active and (l1i * n + idx) < nb_guest:
                res.allocated_clusters += 1
                if next_contig is not None and off != next_contig:
                    res.fragmented_clusters += 1
                next_contig = off + cs

    def _drop(self, l2_off: int, idx: int, guest: int) -> None:
        self.l2_fixes.setdefault(l2_off, {})[idx] = (0, 0)
        self.lost.append((guest, self.cs))

    def walk_snapshots(self) -> None:
        h = self.h
        if not h.nb_snapshots:
            return
        try:
            snaps = self.img.snapshots_table()
        except ImageError as exc:
            self.corruption("ERROR snapshot table: %s" % exc)
            return
        # the table's size is what its entries take
        size = 0
        for s in snaps:
            size += Snapshot.SIZE + len(s.extra) + len(s.stored_id()) + len(s.stored_name())
            size = (size + 7) & ~7
        self.count(h.snapshots_offset, min(size, MAX_TABLE_SIZE))
        for number, s in enumerate(snaps):
            if s.l1_table_offset % self.cs:
                self.corruption("ERROR snapshot %s (%s) l1_offset=%#x: L1 table is not cluster aligned; snapshot "
                                "table entry corrupted" % (s.id, s.name, s.l1_table_offset))
                self.bad_snapshots.append(number)
                continue
            if s.l1_size * 8 > hdr.MAX_L1_SIZE or not self.in_file(s.l1_table_offset, s.l1_size * 8):
                self.corruption("ERROR snapshot %s (%s) l1_size=%#x: L1 table is too large; snapshot table entry "
                                "corrupted" % (s.id, s.name, s.l1_size))
                self.bad_snapshots.append(number)
                continue
            self.walk_l1(s.l1_table_offset, s.l1_size, False, "snapshot %s" % s.id)

    def walk_refcount_structure(self) -> List[int]:
        """Count the refcount table and its blocks; returns the valid block offsets by index."""
        h = self.h
        cs = self.cs
        self.count(h.refcount_table_offset, h.refcount_table_clusters * cs)
        raw = self.img.host.pread(h.refcount_table_clusters * cs, h.refcount_table_offset)
        table = list(struct.unpack(">%dQ" % (len(raw) // 8), raw))
        blocks = []
        for i, entry in enumerate(table):
            off = entry & hdr.REFT_OFFSET_MASK
            if not off:
                blocks.append(0)
                continue
            if off % cs or entry & hdr.REFT_RESERVED:
                self.corruption("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted" % i)
                blocks.append(0)
                continue
            if off // cs >= self.nb_clusters:
                self.corruption("ERROR refcount block %d is outside image" % i)
                blocks.append(0)
                continue
            self.count(off, cs)
            blocks.append(off)
        return blocks

    def stored_refcounts(self, blocks: List[int]) -> array:
        """The refcounts the image claims, for every cluster of the file."""
        cs, bits = self.cs, self.h.refcount_bits
        epb = cs * 8 // bits
        stored = array("Q", bytes(8 * self.nb_clusters)) if self.nb_clusters else array("Q")
        all_ones, all_zeros = encode_refblock([1] * epb, bits, cs), bytes(cs)
        for bi, off in enumerate(blocks):
            if not off or bi * epb >= self.nb_clusters:
                continue
            raw = self.img.host.pread(cs, off)
            n = min(epb, self.nb_clusters - bi * epb)
            if raw == all_ones:        # the usual block, without decoding it value by value
                stored[bi * epb:bi * epb + n] = _ones(epb)[:n]
            elif raw != all_zeros:
                # iterated: 8-bit refcounts decode to bytes, which array() would take as raw items
                stored[bi * epb:bi * epb + n] = array("Q", iter(decode_refblock(raw, bits)[:n]))
        return stored


@lru_cache(maxsize=4)
def _progression_terms(n: int, step: int) -> Tuple[int, int]:
    """A table of n big-endian 64-bit words a, a+step, a+2*step, ... read as one big integer equals
    a * ones + steps (no word overflows into its neighbour): one multiplication tests a whole table."""
    ones = int.from_bytes(b"\0\0\0\0\0\0\0\1" * n, "big")
    counting = array("Q", range(0, n * step, step))
    if sys.byteorder == "little":
        counting.byteswap()
    return ones, int.from_bytes(counting.tobytes(), "big")


@lru_cache(maxsize=4)
def _zeros(n: int) -> array:
    return array("Q", bytes(8 * n))


@lru_cache(maxsize=4)
def _ones(n: int) -> array:
    return array("Q", [1]) * n


def check(img, repair: Optional[str] = None) -> CheckResult:
    """Check *img*; with *repair* 'leaks' or 'all' (image opened writable) fix what can be fixed."""
    res = CheckResult(img.path, "qcow2")
    dropped = _drop_unusable_bitmaps(img, res) if repair else 0
    _run(img, res, repair)
    res.corruptions += dropped
    res.corruptions_fixed += dropped
    if repair and (res.leaks_fixed or res.corruptions_fixed):
        first = res
        res = CheckResult(img.path, "qcow2")
        img._l2_cache.clear()
        img._snapshots = None
        _run(img, res, None)
        res.leaks_fixed = first.leaks_fixed
        res.corruptions_fixed = first.corruptions_fixed
        res.messages = first.messages + ["Double checking the fixed image now..."] + res.messages
    if repair and not res.corruptions:
        img.mark_clean()
    return res


def _run(img, res: CheckResult, repair: Optional[str]) -> None:
    ck = _Checker(img, res, fix_refs=(repair == "all"))
    cs = ck.cs
    res.total_clusters = -(-img.virtual_size // cs)
    ck.count_all()
    blocks = ck.walk_refcount_structure()
    stored = ck.stored_refcounts(blocks)
    refs = ck.refs
    leaked: List[int] = []
    differing = [] if stored == refs else [c for c, (s, r) in enumerate(zip(stored, refs)) if s != r]
    for c in differing:
        s, r = stored[c], refs[c]
        if s > r:
            ck.msg("Leaked cluster %d refcount=%d reference=%d" % (c, s, r))
            res.leaks += 1
            leaked.append(c)
        else:
            ck.msg("ERROR cluster %d refcount=%d reference=%d" % (c, s, r))
            res.corruptions += 1
    # COPIED flags of the active tables must say "refcount is exactly one"
    copied_fixes = _check_copied(ck, img, stored)
    end = ck.nb_clusters
    while end > 0 and refs[end - 1] == 0 and stored[end - 1] == 0:
        end -= 1
    res.image_end_offset = end * cs
    if not repair:
        return
    if repair == "all" and (res.corruptions or ck.l1_fixes or ck.snapshot_l1_fixes or ck.l2_fixes or copied_fixes):
        # drop what cannot be valid, recount, write a fresh refcount structure, then fix COPIED against it
        _apply_table_fixes(ck, img, {})
        if ck.bad_snapshots:
            _drop_snapshots(img, ck.bad_snapshots)
            for index in ck.bad_snapshots:
                ck.msg("Repair dropped snapshot table entry %d: its L1 table is invalid" % (index + 1))
        ck.msg("Rebuilding refcount structure")
        new_refs = count_references(img, strict=False)
        rebuild_refcounts(img, new_refs)
        after = _Checker(img, CheckResult(img.path, "qcow2"), fix_refs=False)
        _apply_table_fixes(after, img, _check_copied(after, img, new_refs))
        for start, length in ck.lost:
            ck.msg("Repair dropped an invalid reference: guest bytes 0x%x..0x%x now read from the backing file "
                   "or as zeros" % (start, start + length - 1))
        res.corruptions_fixed = res.corruptions
        res.leaks_fixed = res.leaks
        return
    if leaked:
        _fix_leaks(img, ck, leaked, refs, blocks)
        res.leaks_fixed = len(leaked)


def _drop_unusable_bitmaps(img, res: CheckResult) -> int:
    """Before a repair: bitmaps QEMU would refuse to load (a broken directory or table) cannot be
    mended, and a bitmaps extension a program without bitmap support invalidated (autoclear bit
    cleared) is stale.  Both are dropped from the header -- the autoclear bit cleared first, the
    spec's "ignore these bitmaps", so an interruption leaves them ignored -- and their clusters
    become leaks the repair frees."""
    h = img.header
    if h.version < 3 or h.bitmaps_extension is None:
        return 0
    problems: List[str] = []
    if bitmaps.present(img):
        bitmaps.referenced_ranges(img, problems.append)
        if not problems:
            return 0
    if h.autoclear_features & hdr.AUTOCLEAR_BITMAPS:
        h.autoclear_features &= ~hdr.AUTOCLEAR_BITMAPS
        img.host.pwrite(*h.pack_fields("autoclear_features"))
        img.host.flush()
    h.bitmaps_extension = None
    img.write_header()
    img.host.flush()
    img.forget_metadata_map()
    if problems:
        res.messages.append("ERROR bitmaps: %s" % problems[0])
        res.messages.append("Repair dropped the persistent bitmaps: QEMU cannot load them")
    return 1 if problems else 0


def _drop_snapshots(img, indexes: List[int]) -> None:
    """Rewrite the snapshot table in place without the given entries, then the header's count."""
    h = img.header
    keep = [s for i, s in enumerate(img.snapshots_table()) if i not in set(indexes)]
    data = pack_snapshot_table(keep)
    if data:
        img.host.pwrite(data, h.snapshots_offset)
    img.host.flush()
    h.nb_snapshots = len(keep)
    if not keep:
        h.snapshots_offset = 0
    img.host.pwrite(*h.pack_fields("nb_snapshots", "snapshots_offset"))
    img.host.flush()
    img._snapshots = keep


def _check_copied(ck: _Checker, img, refcounts) -> Dict[Tuple[str, int, int], int]:
    """Compare COPIED flags in the active L1/L2 tables with the refcounts; returns the fixes."""
    fixes: Dict[Tuple[str, int, int], int] = {}
    h = img.header
    cs = ck.cs
    if not h.l1_size:
        return fixes
    raw = img.host.pread(h.l1_size * 8, h.l1_table_offset)
    l1 = struct.unpack(">%dQ" % h.l1_size, raw)
    x_ext = img.ext
    for l1i, entry in enumerate(l1):
        off = entry & hdr.OFFSET_MASK
        if not off or l1i in ck.l1_fixes:
            continue
        rc = refcounts[off // cs] if off // cs < ck.nb_clusters else 0
        want = rc == 1
        if bool(entry & hdr.OFLAG_COPIED) != want:
            ck.corruption("ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d" % (l1i, entry, rc))
            fixes[("l1", l1i, 0)] = (entry | hdr.OFLAG_COPIED) if want else (entry & ~hdr.OFLAG_COPIED)
        if off % cs or off // cs >= ck.nb_clusters or off < cs:
            continue
        n = img.l2e
        run = ck.contiguous.get(off)
        if run is not None and isinstance(refcounts, array):
            c0, copied = run
            counts = refcounts[c0:c0 + n]
            if (counts == _ones(n)) if copied else min(counts) > 1:
                continue
        l2raw = img.host.pread(cs, off)
        words = struct.unpack(">%dQ" % (n * (2 if x_ext else 1)), l2raw)
        entries = words[::2] if x_ext else words
        if img.data_file is not None:
            _check_copied_data_file(ck, entries, off, fixes)
            continue
        if _copied_flags_agree(entries, refcounts, img.cb, ck.nb_clusters):
            continue
        for idx in range(n):
            e = words[idx * 2] if x_ext else words[idx]
            if e & hdr.OFLAG_COMPRESSED:
                continue
            doff = e & hdr.OFFSET_MASK
            if not doff or idx in ck.l2_fixes.get(off, {}):
                continue
            rc = refcounts[doff // cs] if doff // cs < ck.nb_clusters else 0
            want = rc == 1
            if bool(e & hdr.OFLAG_COPIED) != want:
                ck.corruption("ERROR OFLAG_COPIED data cluster: l2_entry=%x refcount=%d" % (e, rc))
                fixes[("l2", off, idx)] = (e | hdr.OFLAG_COPIED) if want else (e & ~hdr.OFLAG_COPIED)
    return fixes


def _check_copied_data_file(ck: _Checker, entries, l2_off: int, fixes) -> None:
    """Data-file clusters are not refcounted and count as referenced once: COPIED must be set on
    every entry with an offset (one without an offset and without COPIED is unallocated)."""
    for idx, e in enumerate(entries):
        if e & hdr.OFLAG_COMPRESSED or not e & hdr.OFFSET_MASK or e & hdr.OFLAG_COPIED:
            continue
        if idx in ck.l2_fixes.get(l2_off, {}):
            continue
        ck.corruption("ERROR OFLAG_COPIED data cluster: l2_entry=%x refcount=1" % e)
        fixes[("l2", l2_off, idx)] = e | hdr.OFLAG_COPIED


def _copied_flags_agree(entries, refcounts, cb: int, limit: int) -> bool:
    """Fast test for one L2 table: every uncompressed data cluster has COPIED exactly when its
    refcount is one (all set with refcounts 1, or none set with refcounts above 1)."""
    mask = hdr.OFFSET_MASK
    data = [e for e in entries if e & mask and not e & hdr.OFLAG_COMPRESSED]
    if not data:
        return True
    clusters = [(e & mask) >> cb for e in data]
    if max(clusters) >= limit:
        return False
    counts = list(map(refcounts.__getitem__, clusters))
    if reduce(and_, data) & hdr.OFLAG_COPIED:
        return min(counts) == 1 == max(counts)
    if not reduce(or_, data) & hdr.OFLAG_COPIED:
        return min(counts) > 1
    return False


def _apply_table_fixes(ck: _Checker, img, copied_fixes) -> None:
    h = img.header
    es = 16 if img.ext else 8
    for l2_off, entries in ck.l2_fixes.items():
        for idx, (entry, bitmap) in entries.items():
            data = struct.pack(">QQ", entry, bitmap) if img.ext else U64.pack(entry)
            img.host.pwrite(data, l2_off + idx * es)
    for (kind, where, idx), entry in copied_fixes.items():
        if kind == "l1":
            img.host.pwrite(U64.pack(entry), h.l1_table_offset + where * 8)
        else:
            img.host.pwrite(U64.pack(entry), where + idx * es)
    for l1i, entry in ck.l1_fixes.items():
        img.host.pwrite(U64.pack(entry), h.l1_table_offset + l1i * 8)
    for where, entry in ck.snapshot_l1_fixes.items():
        img.host.pwrite(U64.pack(entry), where)
    img.host.flush()
    raw = img.host.pread(h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
    img.l1 = [U64.unpack_from(raw, i)[0] for i in range(0, len(raw), 8)]
    img._l2_cache.clear()


def _fix_leaks(img, ck: _Checker, leaked: List[int], refs, blocks: List[int]) -> None:
    """Lower leaked refcounts in place, one block write each."""
    cs, bits = ck.cs, ck.h.refcount_bits
    epb = cs * 8 // bits
    by_block: Dict[int, List[int]] = {}
    for c in leaked:
        by_block.setdefault(c // epb, []).append(c)
    for bi, clusters in by_block.items():
        off = blocks[bi]
        values = list(decode_refblock(img.host.pread(cs, off), bits))
        for c in clusters:
            values[c - bi * epb] = refs[c]
        img.host.pwrite(encode_refblock(values, bits, cs), off)
    img.host.flush()


def count_references(img, strict: bool = True):
    """References to every host cluster from everything but the refcount structure itself."""
    ck = _Checker(img, CheckResult(img.path, "qcow2"), fix_refs=False)
    ck.count_all()
    if strict and ck.res.corruptions:
        raise ImageError("image has corruptions (%s); run check -r all first" % ck.res.messages[0], path=img.path)
    return ck.refs
