"""qcow2 host-cluster reference counts: the two-level refcount table, allocation and freeing.

References: docs/interop/qcow2.txt "Host cluster management".  Writes are ordered
so that an interruption leaves at most leaked clusters: a new refcount block is
written before the table entry that points to it, a grown refcount table is
complete on disk before the header switches to it, and the old table is freed last.
A whole new structure (check's repair, snapshots, a new refcount width) is laid out
past the end of the file and switched to with one header write.
"""
import sys
from array import array
from typing import Dict, List, Optional, Set

from ...errors import CorruptImage, ImageError
from .header import MAX_HOST_OFFSET, MAX_REFTABLE_SIZE, REFT_OFFSET_MASK, REFT_RESERVED, U64
from .metadata import REFCOUNT_BLOCK


_ARRAY_CODES = {16: "H", 32: "I" if array("I").itemsize == 4 else "L", 64: "Q"}


def decode_refblock(raw: bytes, bits: int):
    """The refcounts in *raw* (a whole block or a byte slice of one) as a sequence of ints."""
    if bits == 8:
        return raw
    if bits >= 16:
        values = array(_ARRAY_CODES[bits], raw)
        if sys.byteorder == "little":
            values.byteswap()
        return values
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return [(byte >> (k * bits)) & mask for byte in raw for k in range(per_byte)]


def encode_refblock(values, bits: int, size: int) -> bytes:
    """Inverse of :func:`decode_refblock`; *size* is the byte length to produce."""
    if bits == 8:
        return array("B", values).tobytes()   # not bytes(values): an array would give its raw buffer
    if bits >= 16:
        arr = array(_ARRAY_CODES[bits], values)
        if sys.byteorder == "little":
            arr.byteswap()
        return arr.tobytes()
    per_byte = 8 // bits
    out = bytearray(size)
    for i, v in enumerate(values):
        if v:
            out[i // per_byte] |= v << ((i % per_byte) * bits)
    return bytes(out)


class Refcounts:
    """Refcounts of one qcow2 file.  *owner* provides ``host``, ``path`` and ``header``."""

    def __init__(self, owner):
        self.owner = owner
        self.host = owner.host
        h = owner.header
        self.cs = h.cluster_size
        self.cluster_bits = h.cluster_bits
        self.bits = h.refcount_bits
        self.max_refcount = (1 << self.bits) - 1
        self.epb = self.cs * 8 // self.bits            # entries per refcount block
        self.table: List[int] = []
        self.blocks: Dict[int, bytearray] = {}
        self.reserved: Set[int] = set()
        self.free_hint = 0
        # end of the last compressed payload when it stops inside a host cluster (0: none); the next
        # compressed write continues there, as QEMU packs compressed clusters
        self.compressed_tail = 0
        self._load_table()

    # -- table ------------------------------------------------------------------------
    def _load_table(self) -> None:
        h = self.owner.header
        raw = self.host.pread(h.refcount_table_clusters * self.cs, h.refcount_table_offset)
        self.table = [U64.unpack_from(raw, i)[0] for i in range(0, len(raw), 8)]

    def block_offset(self, bi: int) -> int:
        """Host offset of refcount block *bi* (0 when not allocated); validates the entry."""
        if bi >= len(self.table):
            return 0
        entry = self.table[bi]
        off = entry & REFT_OFFSET_MASK
        if entry & REFT_RESERVED or off % self.cs:
            raise CorruptImage("Refblock offset 0x%x unaligned (reftable index: 0x%x)" % (entry, bi),
                               path=self.owner.path, field="refcount table")
        if off >= MAX_HOST_OFFSET:
            raise CorruptImage("Refblock at offset 0x%x is beyond the maximum host offset (reftable index: 0x%x)"
                               % (off, bi), path=self.owner.path, field="refcount table")
        return off

    def _block(self, bi: int) -> Optional[bytearray]:
        block = self.blocks.get(bi)
        if block is None:
            off = self.block_offset(bi)
            if not off:
                return None
            block = bytearray(self.host.pread(self.cs, off))
            self.blocks[bi] = block
        return block

    # -- entries ----------------------------------------------------------------------
    def _get_entry(self, block: bytearray, i: int) -> int:
        bits = self.bits
        if bits >= 8:
            n = bits // 8
            return int.from_bytes(block[i * n:(i + 1) * n], "big")
        per_byte = 8 // bits
        return (block[i // per_byte] >> ((i % per_byte) * bits)) & self.max_refcount

    def _set_entry(self, block: bytearray, i: int, value: int) -> None:
        bits = self.bits
        if bits >= 8:
            n = bits // 8
            block[i * n:(i + 1) * n] = value.to_bytes(n, "big")
            return
        per_byte = 8 // bits
        shift = (i % per_byte) * bits
        byte = block[i // per_byte] & ~(self.max_refcount << shift)
        block[i // per_byte] = byte | (value << shift)

    def _byte_span(self, first: int, last: int):
        """Byte range in a block holding entries first..last (inclusive)."""
        if self.bits >= 8:
            n = self.bits // 8
            return first * n, (last + 1) * n
        per_byte = 8 // self.bits
        return first // per_byte, last // per_byte + 1

    def get(self, cluster: int) -> int:
        """Refcount of host cluster index *cluster*."""
        block = self._block(cluster // self.epb)
        if block is None:
            return 0
        return self._get_entry(block, cluster % self.epb)

    def change(self, first: int, count: int, delta: int) -> None:
        """Add *delta* to the refcounts of clusters ``first .. first+count-1``, writing each block once."""
        cluster = first
        end = first + count
        if delta < 0 and self.compressed_tail and first <= self.compressed_tail // self.cs < end:
            self.compressed_tail = 0      # that cluster may be freed and reused: never append to it again
        while cluster < end:
            bi = cluster // self.epb
            if delta > 0:
                self._ensure_block(bi)
            block = self._block(bi)
            stop = min(end, (bi + 1) * self.epb)
            if block is None:
                raise CorruptImage("refcount of cluster %d would drop below zero (no refcount block)" % cluster,
                                   path=self.owner.path, field="refcount block")
            lo = cluster - bi * self.epb
            hi = stop - 1 - bi * self.epb
            a, b = self._byte_span(lo, hi)
            if self.bits >= 8:
                values = decode_refblock(bytes(block[a:b]), self.bits)
                new = [v + delta for v in values]
                low, high = min(new), max(new)
                if low < 0 or high > self.max_refcount:
                    bad = next(i for i, v in enumerate(new) if v < 0 or v > self.max_refcount)
                    self._range_error(bi * self.epb + lo + bad, new[bad])
                block[a:b] = encode_refblock(new, self.bits, b - a)
            else:
                for i in range(lo, hi + 1):
                    value = self._get_entry(block, i) + delta
                    if value < 0 or value > self.max_refcount:
                        self._range_error(bi * self.epb + i, value)
                    self._set_entry(block, i, value)
            self.host.pwrite(bytes(block[a:b]), self.block_offset(bi) + a)
            if delta < 0:
                self.free_hint = min(self.free_hint, cluster)
            cluster = stop

    def _range_error(self, cluster: int, value: int) -> None:
        if value < 0:
            raise CorruptImage("refcount of cluster %d would drop below zero" % cluster, path=self.owner.path,
                               field="refcount block")
        raise ImageError("refcount overflow at cluster %d (refcount_bits=%d); use amend to increase the "
                         "refcount entry size" % (cluster, self.bits), path=self.owner.path, field="refcount_bits")

    # -- allocation -------------------------------------------------------------------
    def find_free(self, count: int) -> int:
        """First cluster index of *count* contiguous free, unreserved clusters."""
        epb = self.epb
        covered = len(self.table) * epb
        reserved = self.reserved
        cluster = self.free_hint
        start, run = cluster, 0
        while True:
            if cluster >= covered and not any(c >= cluster for c in reserved):
                return start if run else cluster   # nothing is used from here on
            bi = cluster // epb
            block = self._block(bi)
            block_end = (bi + 1) * epb
            base = bi * epb
            # fast path: the rest of this block is free (no refcounts, nothing reserved there)
            if not any(cluster <= c < block_end for c in reserved):
                a, dummy = self._byte_span(cluster - base, cluster - base)
                if block is None or block.count(0, a) == len(block) - a and (cluster - base) % max(1, 8 // self.bits) == 0:
                    if run == 0:
                        start = cluster
                    run += block_end - cluster
                    if run >= count:
                        return start
                    cluster = block_end
                    continue
            # decoded only when the block is searched entry by entry
            if block is None:
                values = None
            elif self.bits >= 8:
                values = decode_refblock(bytes(block), self.bits)
            else:
                values = [self._get_entry(block, i) for i in range(epb)]
            while cluster < block_end:
                used = (values is not None and values[cluster - base]) or (reserved and cluster in reserved)
                if used:
                    run = 0
                    if cluster == self.free_hint:
                        self.free_hint = cluster + 1
                else:
                    if run == 0:
                        start = cluster
                    run += 1
                    if run == count:
                        return start
                cluster += 1

    def alloc(self, count: int) -> int:
        """Allocate *count* contiguous clusters (refcount 1); return the host offset of the first."""
        while True:
            first = self.find_free(count)
            missing = [bi for bi in range(first // self.epb, (first + count - 1) // self.epb + 1)
                       if not self.block_offset(bi)]
            if not missing:
                break
            self._ensure_block(missing[0])   # takes space; look again
        if (first + count) * self.cs > MAX_HOST_OFFSET:
            raise ImageError("image file would exceed the maximum host offset", path=self.owner.path)
        self._check_free_space(first, count)
        self.change(first, count, +1)
        if first == self.free_hint:
            self.free_hint = first + count
        return first * self.cs

    def free(self, offset: int, length: int) -> None:
        """Drop one reference from every cluster touched by the host byte range."""
        if length <= 0:
            return
        first = offset // self.cs
        last = (offset + length - 1) // self.cs
        self.change(first, last - first + 1, -1)

    def _ensure_block(self, bi: int) -> None:
        if bi < len(self.table) and self.block_offset(bi):
            return
        while True:
            if bi >= len(self.table):
                self._grow_table(bi + 1)
                if self.block_offset(bi):
                    return
            where = self.find_free(1)
            self._check_free_space(where, 1)
            wb = where // self.epb
            if wb == bi:
                block = bytearray(self.cs)
                self._set_entry(block, where % self.epb, 1)   # describes itself
                self._install_block(bi, where, block)
                return
            if wb < len(self.table) and self.block_offset(wb):
                self.reserved.add(where)
                try:
                    self.change(where, 1, +1)
                finally:
                    self.reserved.discard(where)
                self._install_block(bi, where, bytearray(self.cs))
                return
            self._ensure_block(wb)   # *where* becomes that block; try again

    def _install_block(self, bi: int, cluster: int, block: bytearray) -> None:
        offset = cluster * self.cs
        self.host.pwrite(bytes(block), offset)       # the block first ...
        self.blocks[bi] = block
        self.table[bi] = offset
        self.owner.note_metadata(REFCOUNT_BLOCK, offset, self.cs)
        self.host.pwrite(U64.pack(offset), self.owner.header.refcount_table_offset + bi * 8)  # ... then its entry

    def _grow_table(self, min_entries: int) -> None:
        """Move the refcount table to a larger area; the header switches only once it is complete."""
        h = self.owner.header
        old_offset, old_clusters = h.refcount_table_offset, h.refcount_table_clusters
        per_cluster = self.cs // 8
        entries = max(min_entries, len(self.table) * 2)
        while True:
            clusters = -(-entries // per_cluster)
            where = self.find_free(clusters)
            needed = (where + clusters + 2) // self.epb + 2   # cover the new table and a few new blocks
            if entries >= needed:
                break
            entries = needed
        if clusters * self.cs > MAX_REFTABLE_SIZE:
            raise ImageError("refcount table would exceed %d bytes" % MAX_REFTABLE_SIZE, path=self.owner.path,
                             field="refcount table")
        self._check_free_space(where, clusters)
        new_table = self.table + [0] * (clusters * per_cluster - len(self.table))
        old_table = self.table
        self.table = new_table
        # while building, new blocks are written into the (not yet live) new table area
        h.refcount_table_offset = where * self.cs
        self.reserved.update(range(where, where + clusters))
        try:
            self.host.pwrite(b"".join(U64.pack(e) for e in new_table), where * self.cs)
            self.change(where, clusters, +1)
        except BaseException:
            self.table = old_table
            h.refcount_table_offset = old_offset
            raise
        finally:
            self.reserved.difference_update(range(where, where + clusters))
        self.host.pwrite(b"".join(U64.pack(e) for e in self.table), where * self.cs)
        h.refcount_table_clusters = clusters
        self.owner.write_reftable_pointer()
        self.owner.forget_metadata_map()          # the table moved: its old place is no longer metadata
        self.free(old_offset, old_clusters * self.cs)

    def _check_free_space(self, first: int, count: int) -> None:
        """Clusters the refcounts call free must not hold metadata (a refcount of 0 on a table would
        otherwise hand it out): QEMU's overlap check on the write that follows, made before it."""
        self.owner.check_overlap(first * self.cs, count * self.cs)

    def used_end(self) -> int:
        """Host offset just past the last cluster with a non-zero refcount."""
        for bi in range(len(self.table) - 1, -1, -1):
            block = self._block(bi)
            if block is None:
                continue
            for i in range(self.epb - 1, -1, -1):
                if self._get_entry(block, i):
                    return (bi * self.epb + i + 1) * self.cs
        return 0


# -- a whole new refcount structure ------------------------------------------------------------
def build_refcount_structure(refs, start: int, bits: int, cs: int, path: str):
    """Lay out a complete refcount table and blocks for *refs* at cluster *start* (they count themselves).

    Returns ``(table_offset, table_clusters, writes)`` with *writes* a list of ``(offset, bytes)``.
    """
    max_refcount = (1 << bits) - 1
    if any(r > max_refcount for r in refs):
        raise ImageError("a refcount would exceed %d, the maximum of refcount_bits=%d" % (max_refcount, bits),
                         path=path, field="refcount_bits")
    epb = cs * 8 // bits
    start = max(start, len(refs))
    blocks, rt_clusters = 1, 1
    while True:
        area_end = start + rt_clusters + blocks
        need_blocks = -(-area_end // epb)
        need_rt = -(-need_blocks * 8 // cs)
        if need_blocks <= blocks and need_rt <= rt_clusters:
            break
        blocks, rt_clusters = max(blocks, need_blocks), max(rt_clusters, need_rt)
    if rt_clusters * cs > MAX_REFTABLE_SIZE:
        raise ImageError("refcount table would be too large", path=path, field="refcount table")
    total = start + rt_clusters + blocks
    values = array("Q", refs) + array("Q", bytes(8 * (blocks * epb - len(refs))))
    for c in range(start, total):
        values[c] = 1
    blocks_start = start + rt_clusters
    table = bytearray(rt_clusters * cs)
    writes = []
    for b in range(blocks):
        chunk = values[b * epb:(b + 1) * epb]
        writes.append(((blocks_start + b) * cs, encode_refblock(chunk, bits, cs)))
        table[b * 8:b * 8 + 8] = ((blocks_start + b) * cs).to_bytes(8, "big")
    writes.append((start * cs, bytes(table)))
    return start * cs, rt_clusters, writes


def file_end_cluster(img) -> int:
    """First cluster past the end of the file: nothing live lies there, so new structures can go there."""
    return -(-img.host.size() // img.header.cluster_size)


def rebuild_refcounts(img, refs, refcount_order: Optional[int] = None) -> None:
    """Write a complete new refcount table and blocks past the end of the file, then switch to it.

    With *refcount_order* the new structure has that entry width, and the header
    (order and table pointer) switches in one write.
    """
    h = img.header
    order = h.refcount_order if refcount_order is None else refcount_order
    end = len(refs)
    while end > 0 and refs[end - 1] == 0:
        end -= 1
    offset, clusters, writes = build_refcount_structure(refs[:end], file_end_cluster(img), 1 << order,
                                                        h.cluster_size, img.path)
    for where, data in writes:
        img.host.pwrite(data, where)
    img.host.flush()
    h.refcount_table_offset = offset
    h.refcount_table_clusters = clusters
    if refcount_order is None:
        img.write_reftable_pointer()
    else:
        h.refcount_order = refcount_order
        img.write_header()
    img.host.flush()
