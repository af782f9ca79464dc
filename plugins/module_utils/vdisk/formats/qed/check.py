"""qemu-img check for QED, counted as QEMU 7.2 counts.

References: QED specification "Consistency checking"; QEMU block/qed-check.c for what is
counted. Every L2 table and data cluster must lie inside the file, cluster aligned, after the
header, and be referenced once (corruptions); clusters of the file nobody references are leaks
(QEMU never repairs those). ``-r all`` clears invalid table entries and, when no corruption is
left, the need-check flag. total = clusters of the virtual disk; allocated and fragmented
clusters are counted per L2 table.
"""
from typing import Optional

from ...driver import CheckResult
from . import header as hdr
from .table import pack_table, unpack_table


class _Used:
    """A bitmap of the file's clusters: which ones something references."""

    def __init__(self, nclusters: int):
        self.n = nclusters
        self.bits = bytearray((nclusters + 7) // 8)

    def mark(self, cluster: int, count: int) -> bool:
        """Mark *count* clusters; False if one was referenced already (a corruption)."""
        ok = True
        for c in range(cluster, cluster + count):
            if c >= self.n:
                continue
            if self.bits[c >> 3] & (1 << (c & 7)):
                ok = False
            self.bits[c >> 3] |= 1 << (c & 7)
        return ok

    def unused(self, start: int) -> int:
        count = 0
        for c in range(start, self.n):
            if not self.bits[c >> 3] & (1 << (c & 7)):
                count += 1
        return count


def check(img, repair: Optional[str] = None) -> CheckResult:
    first = _check(img, repair == "all")
    if repair and first.corruptions_fixed:
        second = _check(img, False)
        second.corruptions_fixed = first.corruptions_fixed
        second.messages = first.messages + second.messages
        return second
    return first


def _check(img, fix: bool) -> CheckResult:
    res = CheckResult(img.path, "qed")
    h = img.header
    cs = img.cs
    res.total_clusters = -(-h.image_size // cs)
    used = _Used(img.file_size // cs)
    if not used.mark(h.l1_table_offset // cs, h.table_size):
        res.corruptions += 1
    l1_fixed = False
    for l1i, off in enumerate(img.l1):
        if not off:
            continue
        if not img.table_offset_valid(off):
            if fix:
                img.l1[l1i] = 0
                res.corruptions_fixed += 1
                l1_fixed = True
            else:
                res.corruptions += 1
                res.messages.append("ERROR L2 table offset 0x%x is invalid (L1 index %d)" % (off, l1i))
            continue
        if not used.mark(off // cs, h.table_size):
            res.corruptions += 1
            continue
        table = unpack_table(img.host.pread(h.table_bytes, off))
        last = 0
        fixed = False
        for i, entry in enumerate(table):
            if entry <= hdr.ZERO_CLUSTER:
                continue
            res.allocated_clusters += 1
            if last and last + cs != entry:
                res.fragmented_clusters += 1
            last = entry
            if not img.cluster_offset_valid(entry):
                if fix:
                    table[i] = 0
                    res.corruptions_fixed += 1
                    fixed = True
                else:
                    res.corruptions += 1
                    res.messages.append("ERROR data cluster offset 0x%x is invalid (L1 index %d, L2 index %d)"
                                        % (entry, l1i, i))
                continue
            if not used.mark(entry // cs, 1):
                res.corruptions += 1
        if fixed:
            img.host.pwrite(pack_table(table), off)
            img._l2_cache.pop(off, None)
    if l1_fixed:
        img.host.pwrite(pack_table(img.l1), h.l1_table_offset)
    res.leaks = used.unused(h.header_size)
    if fix and not res.corruptions and not res.check_errors:
        img._set_need_check(False)
    return res
