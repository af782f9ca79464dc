"""An open QED image: two-level lookups, reads through the backing chain, allocating writes.

References: QED specification "Tables", "Cluster allocation", "Consistency checking"; QEMU
block/qed.c for the order of writes. New clusters are appended at the end of the file. The
data (with copy-on-write padding from the backing file or zeros) is written first, then a
new L2 table (complete) and the L1 entry pointing to it, or the L2 entries; so an
interruption leaves at most leaked clusters. Without a backing file, QEMU does not flush
before the table update but sets the need-check flag before its first allocating write, and
clears it after a flush when the image is closed; vdisk does the same, and a read-write open
of an image with the flag set runs ``check`` with repair first, as QEMU does.
"""
import array
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...driver import DATA, UNALLOCATED, ZERO, Extent, Image, Policy, merge_runs
from ...errors import CorruptImage
from ...structure import Record
from . import header as hdr
from .check import check as check_image
from .table import pack_table, unpack_table

L2_CACHE_BYTES = 32 * 1024 * 1024


class QedImage(Image):
    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self.repairing = policy.repair      # a file left unclean opens only for check -r
        self._open_host(policy)

    def _open(self) -> None:
        size = self.host.size()
        h = hdr.parse_header(self.host.pread(min(size, hdr.HEADER_SIZE), 0), self.path,
                             lambda off, n: self.host.pread(max(0, min(n, size - off)), off))
        self.header = h
        self.cs = h.cluster_size
        self.cluster_size = self.cs
        self.nelems = h.table_entries
        self.l2_span = self.nelems * self.cs
        self.virtual_size = h.image_size
        self.backing_filename = h.backing_file
        self.backing_format = "raw" if h.features & hdr.F_BACKING_FORMAT_NO_PROBE else None
        self.need_check = bool(h.features & hdr.F_NEED_CHECK)   # qemu-img info never shows it as dirty
        self.file_size = size - size % self.cs        # QEMU: the file ends at its last whole cluster
        if not self.table_offset_valid(h.l1_table_offset):
            raise CorruptImage("QED table offset is invalid", path=self.path, field="l1_table_offset")
        self.l1 = unpack_table(self.host.pread(h.table_bytes, h.l1_table_offset))
        self._l2_cache: "OrderedDict[int, array.array]" = OrderedDict()
        if self.writable:
            if h.autoclear_features & ~hdr.AUTOCLEAR_FEATURE_MASK:
                h.autoclear_features &= hdr.AUTOCLEAR_FEATURE_MASK
                self.host.pwrite(*h.pack_fields("autoclear_features"))
            if self.need_check and not self.repairing:
                # not closed cleanly: check and repair first, as QEMU does on a read-write open
                result = check_image(self, "all")
                if result.corruptions:
                    raise CorruptImage("image was not closed cleanly and could not be repaired", path=self.path,
                                       field="need check")

    # -- validity (QEMU's qed_check_cluster_offset / qed_check_table_offset) -----------
    def cluster_offset_valid(self, offset: int) -> bool:
        if offset % self.cs:
            return False
        return self.header.header_size * self.cs <= offset < self.file_size

    def table_offset_valid(self, offset: int) -> bool:
        end = offset + (self.header.table_size - 1) * self.cs
        if end <= offset:     # QEMU's overflow test: refuses one-cluster tables, as qemu-img 7.2 does
            return False
        return self.cluster_offset_valid(offset) and self.cluster_offset_valid(end)

    # -- header ------------------------------------------------------------------------
    def _set_need_check(self, on: bool) -> None:
        h = self.header
        if bool(h.features & hdr.F_NEED_CHECK) == on:
            return
        self.host.flush()
        h.features = h.features | hdr.F_NEED_CHECK if on else h.features & ~hdr.F_NEED_CHECK
        self.host.pwrite(*h.pack_fields("features"))
        self.host.flush()
        self.need_check = on

    # -- tables --------------------------------------------------------------------------
    def l2_table(self, l1i: int) -> Optional[array.array]:
        off = self.l1[l1i]
        if not off:
            return None
        table = self._l2_cache.get(off)
        if table is None:
            if not self.table_offset_valid(off):
                raise CorruptImage("L2 table offset 0x%x is invalid (L1 index %d)" % (off, l1i), path=self.path,
                                   field="L1 table")
            table = unpack_table(self.host.pread(self.header.table_bytes, off))
            self._l2_cache[off] = table
            while len(self._l2_cache) * self.header.table_bytes > L2_CACHE_BYTES and len(self._l2_cache) > 1:
                self._l2_cache.popitem(last=False)
        else:
            self._l2_cache.move_to_end(off)
        return table

    def _entry(self, ci: int) -> int:
        table = self.l2_table(ci // self.nelems)
        if table is None:
            return hdr.UNALLOCATED
        entry = table[ci % self.nelems]
        if entry > hdr.ZERO_CLUSTER and not self.cluster_offset_valid(entry):
            raise CorruptImage("data cluster offset 0x%x is invalid (cluster %d)" % (entry, ci), path=self.path,
                               field="L2 table")
        return entry

    def _runs(self, offset: int, length: int) -> Iterator[Tuple[int, int, int]]:
        """``(offset, length, entry)``; entry 0 unallocated, 1 zero, else host offset of *offset*."""
        return merge_runs(self._pieces(offset, length), is_host=lambda e: e > hdr.ZERO_CLUSTER)

    def _pieces(self, offset: int, length: int) -> Iterator[Tuple[int, int, int]]:
        end = offset + length
        while offset < end:
            ci = offset // self.cs
            if self.l1[ci // self.nelems] == 0:
                n = min(end, (ci // self.nelems + 1) * self.l2_span) - offset
                e = hdr.UNALLOCATED
            else:
                n = min(end, (ci + 1) * self.cs) - offset
                e = self._entry(ci)
                if e > hdr.ZERO_CLUSTER:
                    e += offset % self.cs
            yield offset, n, e
            offset += n

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts = []
        for start, n, e in self._runs(offset, length):
            if e == hdr.UNALLOCATED:
                parts.append(self.read_backing(start, n))
            elif e == hdr.ZERO_CLUSTER:
                parts.append(bytes(n))
            else:
                parts.append(self.host.pread(n, e))
        return b"".join(parts)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self._extent_end(offset, length)
        if end <= offset:
            return
        for start, n, e in self._runs(offset, end - offset):
            if e == hdr.UNALLOCATED:
                yield Extent(start, n, UNALLOCATED)
            elif e == hdr.ZERO_CLUSTER:
                yield Extent(start, n, ZERO)
            else:
                yield Extent(start, n, DATA, e)

    # -- writes ------------------------------------------------------------------------
    def _alloc(self, n: int) -> int:
        off = self.file_size
        self.file_size += n * self.cs
        return off

    def write(self, offset: int, data) -> None:
        view = self._write_view(offset, data)
        end = offset + len(view)
        pos = offset
        while pos < end:
            ci = pos // self.cs
            e = self._entry(ci)
            if e > hdr.ZERO_CLUSTER:
                stop = min(end, (ci + 1) * self.cs)
                self.host.pwrite(view[pos - offset:stop - offset], e + pos % self.cs)
                pos = stop
                continue
            # a run of clusters needing allocation, inside one L2 table
            last = ci
            table_end = (ci // self.nelems + 1) * self.nelems
            while (last + 1) * self.cs < end and last + 1 < table_end and self._entry(last + 1) <= hdr.ZERO_CLUSTER:
                last += 1
            stop = min(end, (last + 1) * self.cs)
            self._allocating_write(ci, last, pos, view[pos - offset:stop - offset])
            pos = stop

    def _allocating_write(self, first: int, last: int, offset: int, data: memoryview) -> None:
        count = last - first + 1
        start = first * self.cs
        buf = bytearray(count * self.cs)
        # copy-on-write padding: the head and tail clusters' old content (backing data, or zeros)
        head, tail = offset - start, start + count * self.cs - (offset + len(data))
        if head:
            buf[:head] = self._old_content(first, start, head)
        if tail:
            pos = offset + len(data)
            buf[pos - start:] = self._old_content(last, pos, tail)
        buf[head:head + len(data)] = data
        has_backing = self.backing_filename is not None
        if not has_backing:
            self._set_need_check(True)
        host = self._alloc(count)
        self.host.pwrite(buf, host)
        if has_backing:
            self.host.flush()        # data before the table update: the backing file must not show through
        self._update_l2(first, [host + i * self.cs for i in range(count)])

    def _old_content(self, ci: int, offset: int, length: int) -> bytes:
        e = self._entry(ci)
        if e == hdr.ZERO_CLUSTER:
            return bytes(length)
        avail = max(0, min(length, self.virtual_size - offset))
        data = self.read_backing(offset, avail) if avail else b""
        return data + bytes(length - len(data))

    def _update_l2(self, first: int, entries: List[int]) -> None:
        l1i = first // self.nelems
        idx = first % self.nelems
        table = self.l2_table(l1i)
        if table is None:
            # a new, complete L2 table, then the L1 entry that points to it
            table = array.array("Q", bytes(self.header.table_bytes))
            table[idx:idx + len(entries)] = array.array("Q", entries)
            off = self._alloc(self.header.table_size)
            self.host.pwrite(pack_table(table), off)
            self.host.flush()
            self._l2_cache[off] = table
            self.l1[l1i] = off
            self.host.pwrite(pack_table([off]), self.header.l1_table_offset + 8 * l1i)
        else:
            table[idx:idx + len(entries)] = array.array("Q", entries)
            self.host.pwrite(pack_table(entries), self.l1[l1i] + 8 * idx)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Whole unallocated clusters become zero clusters (entry 1); the rest is written as zeros."""
        self._check_writable()
        self._check_range(offset, length)
        end = offset + length
        pos = offset
        while pos < end:
            ci = pos // self.cs
            stop = min(end, (ci + 1) * self.cs)
            cluster_end = min((ci + 1) * self.cs, self.virtual_size)
            whole = pos == ci * self.cs and stop == cluster_end
            e = self._entry(ci)
            if e == hdr.ZERO_CLUSTER or (e == hdr.UNALLOCATED and self.backing_filename is None):
                pass                # already reads as zeros
            elif whole and e == hdr.UNALLOCATED and self.l1[ci // self.nelems]:
                self._update_l2(ci, [hdr.ZERO_CLUSTER])
            else:
                self.write(pos, bytes(stop - pos))
            pos = stop

    # -- metadata ------------------------------------------------------------------------
    def structures(self) -> List[Tuple[str, int, Record]]:
        """The header (``vdisk inspect --dump``)."""
        return [("header", 0, self.header)]

    def info(self) -> Dict[str, Any]:
        return {"cluster-size": self.cs}

    def check(self, repair: Optional[str] = None):
        if repair:
            self._check_writable()
        return check_image(self, repair)

    def _close_writes(self) -> None:
        self.host.flush()                   # the data are stable before the header says so
        self._set_need_check(False)
