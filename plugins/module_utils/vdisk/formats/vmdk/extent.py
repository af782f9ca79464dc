"""VMDK extents: FLAT and ZERO ranges, and hosted sparse extents (grain directory and grain tables,
uncompressed or stream-optimized with compressed grains).

References: VMware "Virtual Disk Format 1.1" ("Grain Directories and Grain Tables", "Stream-Optimized
Compressed Sparse Extents"); QEMU 7.2 block/vmdk.c for the allocation order qemu-img uses: a new grain
is written whole (the parts not written come from the backing file, or are zeros) at the end of the
file, then its entry in the grain table and in the redundant grain table.  Compressed grains are
appended sector-aligned, each behind a grain marker; an extent whose directory sits at the end
(stream-optimized as VMware writes it) keeps its tables in memory while it is written and appends
them, the directory, the footer and the end-of-stream marker on close.
"""
import array
import sys
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Tuple

from ... import deflate_codecs
from ...driver import DATA, UNALLOCATED, ZERO
from ...errors import CorruptImage, ImageError
from ...interrupt import main_thread_only
from ...io import HostFile
from ...structure import Record
from . import header as hdr

SECTOR = hdr.SECTOR
GT_CACHE = 4096                  # grain tables kept (2 KiB each with 512 entries)
WRITE_BATCH = 4 * 1024 * 1024    # compressed grains gathered before one pwrite
PENDING = 64                     # compressed grains in flight in the worker threads


def _u32(raw: bytes) -> array.array:
    t = array.array("I", raw)
    if sys.byteorder != "little":
        t.byteswap()
    return t


def _pack32(t) -> bytes:
    t = array.array("I", t)
    if sys.byteorder != "little":
        t.byteswap()
    return t.tobytes()


def compress_grain(data: bytes, grain_bytes: int) -> bytes:
    """A grain as stream-optimized extents store it: a zlib stream of the whole grain (QEMU's
    ``compress()``, level 6); a short last grain is padded with zeros."""
    if len(data) < grain_bytes:
        data = bytes(data) + bytes(grain_bytes - len(data))
    return deflate_codecs.zlib_compress(bytes(data), 6)


class FlatExtent:
    """Guest bytes stored as they are in a host file, from byte *start*."""
    kind = "FLAT"
    desc_type = "FLAT"
    cluster_bytes = None
    compressed = False

    def __init__(self, host: HostFile, filename: str, start: int, size: int):
        self.host = host
        self.filename = filename
        self.start = start
        self.size = size

    def pieces(self, off: int, n: int) -> Iterator[Tuple[int, int, str, Optional[int]]]:
        yield off, n, DATA, self.start + off

    def read_data(self, host_off: int, n: int, view: memoryview, off: int = 0) -> None:
        self.host.pread_into(view[:n], host_off)

    def write(self, off: int, data, backing) -> None:
        self.host.pwrite(data, self.start + off)

    def close(self) -> None:
        self.host.close()


class ZeroExtent:
    """A ZERO extent: reads as zeros, holds nothing (writes are refused)."""
    kind = "ZERO"
    desc_type = "ZERO"
    cluster_bytes = None
    compressed = False
    host = None

    def __init__(self, filename: str, size: int):
        self.filename = filename
        self.size = size

    def pieces(self, off: int, n: int) -> Iterator[Tuple[int, int, str, Optional[int]]]:
        yield off, n, ZERO, None

    def write(self, off: int, data, backing) -> None:
        raise ImageError("cannot write into a ZERO extent", field="extent")

    def close(self) -> None:
        pass


class SparseExtent:
    """A hosted sparse extent (``KDMV``), read through its grain directory and grain tables."""
    kind = "SPARSE"
    desc_type = ""           # as qemu-img shows a monolithic image's own extent; else the descriptor's type

    def __init__(self, host: HostFile, filename: str, path: str, head: hdr.SparseHeader, writable: bool):
        self.host = host
        self.filename = filename
        self.path = path
        self.writable = writable
        self.file_size = host.size()
        h = head
        self.at_end = h.gd_offset == hdr.GD_AT_END
        if self.at_end:
            # stream-optimized as VMware writes it: the real header is the footer
            if self.file_size < 4 * SECTOR:
                raise CorruptImage("Invalid footer", path=path, field="footer")
            h = hdr.parse_footer(host.pread(3 * SECTOR, self.file_size - 3 * SECTOR), path)
            if h.gd_offset == hdr.GD_AT_END:
                raise CorruptImage("Invalid footer", path=path, field="footer")
        hdr.validate_header(h, self.file_size, path)
        self.head = head         # as stored at the start of the file
        self.h = h               # the one in force: the footer of a stream whose directory is at the end
        self.version = head.version
        self.gs = h.grain_size
        self.gb = h.grain_bytes
        self.cluster_bytes = self.gb
        self.gtes = h.num_gtes_per_gt
        self.size = h.capacity * SECTOR
        self.compressed = h.compressed
        self.has_marker = h.has_marker
        self.zero_grain = h.zero_grain
        self.gd = _u32(host.pread(h.gd_entries * 4, h.gd_offset * SECTOR))
        self.rgd = None
        if h.flags & hdr.FLAG_RGD and h.rgd_offset and not self.at_end:
            self.rgd = _u32(host.pread(h.gd_entries * 4, h.rgd_offset * SECTOR))
        self._gts: "OrderedDict[int, array.array]" = OrderedDict()
        self._lock = threading.Lock()
        self._last_grain: Tuple[int, bytes] = (-1, b"")
        # writing
        self.next_sector = 0
        self.started = False
        self.mem_gts: Dict[int, array.array] = {}   # GD at end: every table, written on close
        self.partial: Dict[int, List] = {}          # compressed grains written in parts: [buffer, ranges]
        self.pending: deque = deque()               # (grain, future) compressing in order
        self.out = bytearray()                      # compressed grains not yet written
        self.out_start = 0
        self.pool: Optional[ThreadPoolExecutor] = None

    # -- lookups ---------------------------------------------------------------------------
    def gt(self, gdi: int) -> Optional[array.array]:
        if self.at_end and self.started:
            return self.mem_gts.get(gdi)
        off = self.gd[gdi]
        if not off:
            return None
        with self._lock:                # the cache may be used by a read-ahead thread too
            table = self._gts.get(gdi)
            if table is not None:
                self._gts.move_to_end(gdi)
                return table
        if off * SECTOR + self.gtes * 4 > self.file_size:
            raise CorruptImage("grain table %d (sector %d) lies beyond the end of the file" % (gdi, off),
                               path=self.path, field="grain directory")
        table = _u32(self.host.pread(self.gtes * 4, off * SECTOR))
        with self._lock:
            self._gts[gdi] = table
            if len(self._gts) > GT_CACHE:
                self._gts.popitem(last=False)
        return table

    def entry(self, g: int) -> int:
        table = self.gt(g // self.gtes)
        return 0 if table is None else table[g % self.gtes]

    def classify(self, e: int) -> Tuple[str, Optional[int]]:
        if e == 0:
            return UNALLOCATED, None
        if e == hdr.GTE_ZEROED and self.zero_grain:
            return ZERO, None
        return DATA, e * SECTOR

    def pieces(self, off: int, n: int) -> Iterator[Tuple[int, int, str, Optional[int]]]:
        """``(offset, length, kind, host offset)``: grains merged where they continue each other on
        the host (uncompressed) or share a kind without data; a compressed grain stands alone, with
        its grain marker's host offset."""
        cur = None
        for piece in self._grain_pieces(off, n):
            if cur is not None and piece[2] == cur[2] and (
                    (piece[3] is None and cur[3] is None) or
                    (not self.compressed and piece[3] is not None and cur[3] is not None and cur[3] >= 0
                     and piece[3] == cur[3] + cur[1])):
                cur = (cur[0], cur[1] + piece[1], cur[2], cur[3])
                continue
            if cur is not None:
                yield cur
            cur = piece
        if cur is not None:
            yield cur

    def _grain_pieces(self, off: int, n: int) -> Iterator[Tuple[int, int, str, Optional[int]]]:
        end = off + n
        span = self.gtes * self.gb
        if self.pending:
            self.flush_pending(0)
        while off < end:
            g = off // self.gb
            if self.partial and g in self.partial:
                stop = min(end, (g + 1) * self.gb)
                yield off, stop - off, DATA, -(g + 1)       # buffered, not yet compressed
                off = stop
                continue
            if self.gt(g // self.gtes) is None:
                stop = min(end, (g // self.gtes + 1) * span)
                yield off, stop - off, UNALLOCATED, None
                off = stop
                continue
            stop = min(end, (g + 1) * self.gb)
            kind, host = self.classify(self.entry(g))
            if host is not None:
                if host >= self.file_size and not self.started:
                    raise CorruptImage("grain %d (sector %d) lies beyond the end of the file"
                                       % (g, host // SECTOR), path=self.path, field="grain table")
                if not self.compressed:
                    host += off % self.gb
            yield off, stop - off, kind, host
            off = stop

    def structures(self) -> List[Tuple[str, int, Record]]:
        """The header at the start of the file and, for a directory at the end, the footer
        (``(title, offset in this extent's file, record)``)."""
        out: List[Tuple[str, int, Record]] = [("sparse extent header", 0, self.head)]
        if self.at_end and not self.started:
            out.append(("footer", self.file_size - 2 * SECTOR, self.h))
        return out

    def read_data(self, host_off: int, n: int, view: memoryview, off: int = 0) -> None:
        if host_off < 0:
            start = off % self.gb
            view[:n] = self.partial[-host_off - 1][0][start:start + n]
            return
        if not self.compressed:
            self.host.pread_into(view[:n], host_off)
            return
        grain = self._inflate(host_off)
        start = off % self.gb
        if start + n > len(grain):
            raise CorruptImage("compressed grain at sector %d holds %d bytes, not %d"
                               % (host_off // SECTOR, len(grain), start + n), path=self.path, field="grain")
        view[:n] = grain[start:start + n]

    def _inflate(self, host_off: int) -> bytes:
        if self._last_grain[0] == host_off:
            return self._last_grain[1]
        self.flush_out()
        # at most two grains (QEMU's bound), and only what the marker says when there is one
        marker = hdr.GrainMarker.SIZE
        avail = min(2 * self.gb + marker, max(0, self.file_size - host_off))
        if self.has_marker:
            raw = self.host.pread(min(avail, 8192), host_off)
            if len(raw) < marker:
                raise CorruptImage("grain marker at sector %d is truncated" % (host_off // SECTOR), path=self.path,
                                   field="grain")
            size = hdr.GrainMarker.unpack(raw).size
            if not size or size > avail - marker:
                raise CorruptImage("grain at sector %d has an invalid compressed size %d" % (host_off // SECTOR, size),
                                   path=self.path, field="grain")
            end = marker + size
            if end > len(raw):
                raw += self.host.pread(end - len(raw), host_off + len(raw))
            data = raw[marker:end]
        else:
            data = self.host.pread(avail, host_off)
        try:
            d = deflate_codecs.decompressobj()
            grain = d.decompress(data, self.gb)
            # a stream that inflates past one grain fails as it does in QEMU (uncompress() into a
            # grain-sized buffer); one more byte is all that is inflated to find out
            over = not d.eof and d.decompress(d.unconsumed_tail, 1)
        except deflate_codecs.errors() as exc:
            raise CorruptImage("compressed grain at sector %d cannot be inflated: %s" % (host_off // SECTOR, exc),
                               path=self.path, field="grain") from None
        if over:
            raise CorruptImage("compressed grain at sector %d inflates past the grain size (%d bytes)"
                               % (host_off // SECTOR, self.gb), path=self.path, field="grain")
        self._last_grain = (host_off, grain)
        return grain

    # -- writing: common -------------------------------------------------------------------
    def start_writing(self) -> None:
        """Where new grains go: after the file's content (the old metadata tail of a stream image)."""
        if self.started:
            return
        if self.at_end:
            for gdi in range(len(self.gd)):
                table = self.gt(gdi)
                if table is not None:
                    self.mem_gts[gdi] = array.array("I", table)
            self._gts.clear()
        self.started = True
        if self.at_end:
            if not self.mem_gts:
                self.next_sector = self.h.overhead
            else:
                # the old directory's marker starts the tail that is written anew on close
                mark = self.h.gd_offset - 1
                m = hdr.Marker.unpack(self.host.pread(hdr.Marker.SIZE, mark * SECTOR))
                ok = m.type == hdr.MARKER_GD and m.size == 0 and mark >= self.h.overhead
                self.next_sector = mark if ok else -(-self.file_size // SECTOR)
            self.host.truncate(self.next_sector * SECTOR)
            self.file_size = self.next_sector * SECTOR
        elif self.compressed:
            self.next_sector = -(-self.file_size // SECTOR)
        else:
            grains = -(-self.file_size // self.gb)
            self.next_sector = max(grains * self.gs, self.h.overhead)
        self.out_start = self.next_sector * SECTOR

    def _set_entries(self, g: int, values: List[int]) -> None:
        """Grain table entries for grains g.. (one table); on disk in both tables, or in memory."""
        gdi, idx = divmod(g, self.gtes)
        if self.at_end:
            table = self.mem_gts.get(gdi)
            if table is None:
                table = self.mem_gts[gdi] = array.array("I", bytes(self.gtes * 4))
            table[idx:idx + len(values)] = array.array("I", values)
            return
        table = self.gt(gdi)
        if table is None:
            table = self._new_gt(gdi)
        table[idx:idx + len(values)] = array.array("I", values)
        raw = _pack32(values)
        self.host.pwrite(raw, self.gd[gdi] * SECTOR + idx * 4)
        if self.rgd is not None and self.rgd[gdi]:
            self.host.pwrite(raw, self.rgd[gdi] * SECTOR + idx * 4)

    def _new_gt(self, gdi: int) -> array.array:
        """A grain table for a directory entry that has none (images made elsewhere): appended,
        written empty, then pointed to by the directory and the redundant directory."""
        self.flush_out()
        sectors = -(-self.gtes * 4 // SECTOR)
        table = array.array("I", bytes(self.gtes * 4))
        for gd, gd_off in ((self.gd, self.h.gd_offset), (self.rgd, self.h.rgd_offset)):
            if gd is None:
                continue
            at = self.next_sector
            self.next_sector += sectors
            self.host.pwrite(bytes(sectors * SECTOR), at * SECTOR)
            gd[gdi] = at
            self.host.pwrite(_pack32([at]), gd_off * SECTOR + gdi * 4)
        if not self.compressed:
            self.next_sector = -(-self.next_sector // self.gs) * self.gs
        self.out_start = self.next_sector * SECTOR
        self.file_size = max(self.file_size, self.next_sector * SECTOR)
        self._gts[gdi] = table
        return table

    def _old_grain(self, g: int, backing) -> bytes:
        """What a grain holds before its first write: backing data, or zeros."""
        base = g * self.gb
        kind, dummy = self.classify(self.entry(g))
        if kind == ZERO or backing is None:
            return bytes(self.gb)
        return backing(base, self.gb)

    def write(self, off: int, data, backing) -> None:
        """*backing(offset, length)* reads the guest data below this extent (for copy-on-write)."""
        self.start_writing()
        if self.compressed:
            self._write_compressed(off, memoryview(data).cast("B"), backing)
            return
        view = memoryview(data).cast("B")
        end = off + len(view)
        pos = off
        while pos < end:
            g = pos // self.gb
            kind, host = self.classify(self.entry(g))
            if kind == DATA:
                stop = min(end, (g + 1) * self.gb)
                self.host.pwrite(view[pos - off:stop - off], host + pos % self.gb)
                pos = stop
                continue
            last = g
            table_end = (g // self.gtes + 1) * self.gtes
            while ((last + 1) * self.gb < end and last + 1 < table_end
                   and self.classify(self.entry(last + 1))[0] != DATA):
                last += 1
            stop = min(end, (last + 1) * self.gb)
            self._allocate(g, last, pos, view[pos - off:stop - off], backing)
            pos = stop

    def _allocate(self, first: int, last: int, pos: int, data: memoryview, backing) -> None:
        count = last - first + 1
        base = first * self.gb
        head = pos - base
        tail_at = pos + len(data)
        tail = base + count * self.gb - tail_at
        if self.gt(first // self.gtes) is None:
            self._new_gt(first // self.gtes)
        at = self.next_sector
        self.next_sector += count * self.gs
        host = at * SECTOR
        # the whole grains: what the write does not cover comes from the backing file (or is zeros)
        if head:
            self.host.pwrite(self._old_grain(first, backing)[:head], host)
        self.host.pwrite(data, host + head)
        if tail:
            self.host.pwrite(self._old_grain(last, backing)[tail_at - last * self.gb:], host + head + len(data))
        self.file_size = max(self.file_size, self.next_sector * SECTOR)
        self._set_entries(first, [at + i * self.gs for i in range(count)])

    def write_zeroes(self, off: int, n: int, backing, has_backing: bool) -> None:
        self.start_writing()
        end = off + n
        pos = off
        while pos < end:
            g = pos // self.gb
            stop = min(end, (g + 1) * self.gb)
            whole = pos == g * self.gb and stop == min((g + 1) * self.gb, self.size)
            kind, dummy = self.classify(self.entry(g))
            if kind == ZERO or (kind == UNALLOCATED and not has_backing):
                pass
            elif whole and self.zero_grain and (kind == UNALLOCATED or not self.compressed):
                self.flush_pending(0)
                self._set_entries(g, [hdr.GTE_ZEROED])
            else:
                self.write(pos, bytes(stop - pos), backing)
            pos = stop

    # -- writing: compressed grains ----------------------------------------------------------
    def _grain_len(self, g: int) -> int:
        return min(self.gb, self.size - g * self.gb)

    def _write_compressed(self, off: int, view: memoryview, backing) -> None:
        end = off + len(view)
        pos = off
        while pos < end:
            g = pos // self.gb
            stop = min(end, (g + 1) * self.gb)
            if g not in self.partial and self.classify(self.entry(g))[0] == DATA:
                raise ImageError("Could not write to allocated cluster for streamOptimized", path=self.path,
                                 field="offset %d" % pos)
            piece = view[pos - off:stop - off]
            glen = self._grain_len(g)
            if pos == g * self.gb and stop - pos == glen and g not in self.partial:
                self._submit(g, bytes(piece))
            else:
                slot = self.partial.get(g)
                if slot is None:
                    slot = self.partial[g] = [bytearray(self._old_grain(g, backing)[:glen]), []]
                a = pos - g * self.gb
                slot[0][a:a + len(piece)] = piece
                slot[1].append((a, a + len(piece)))
                if _covered(slot[1]) >= glen:
                    del self.partial[g]
                    self._submit(g, bytes(slot[0]))
            pos = stop

    def _submit(self, g: int, data: bytes) -> None:
        if self.pool is None:
            import os
            self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, initializer=main_thread_only)
        self.pending.append((g, self.pool.submit(compress_grain, data, self.gb)))
        self.flush_pending(PENDING)

    def flush_pending(self, keep: int) -> None:
        while len(self.pending) > keep:
            g, fut = self.pending.popleft()
            self.append_grain(g, fut.result())

    def append_grain(self, g: int, payload: bytes) -> None:
        """Append one compressed grain behind its marker (sector-aligned) and point its entry at it."""
        self.start_writing()
        if self.classify(self.entry(g))[0] == DATA:
            raise ImageError("Could not write to allocated cluster for streamOptimized", path=self.path,
                             field="grain %d" % g)
        at = self.next_sector
        rec = hdr.GrainMarker(lba=g * self.gs, size=len(payload)).pack() if self.has_marker else b""
        total = len(rec) + len(payload)
        pad = -total % SECTOR
        self.out += rec
        self.out += payload
        self.out += bytes(pad)
        self.next_sector += (total + pad) // SECTOR
        if self.at_end:
            self._set_entries(g, [at])
            if len(self.out) >= WRITE_BATCH:
                self.flush_out()
        else:
            self.flush_out()               # the grain before the table entry that points to it
            self._set_entries(g, [at])

    def flush_out(self) -> None:
        if self.out:
            self.host.pwrite(self.out, self.out_start)
            self.out_start += len(self.out)
            self.file_size = max(self.file_size, self.out_start)
            self.out = bytearray()

    def finish(self) -> None:
        """Write what is buffered: grains in flight, partly written grains, and for a directory at the
        end the tables, the directory, the footer and the end-of-stream marker."""
        if not self.started:
            return
        self.flush_pending(0)
        for g in sorted(self.partial):
            buf, dummy = self.partial.pop(g)
            self.append_grain(g, compress_grain(bytes(buf), self.gb))
        self.flush_out()
        if not self.at_end:
            return
        gt_sectors = -(-self.gtes * 4 // SECTOR)
        gd = array.array("I", bytes(4 * len(self.gd)))
        tail = bytearray()
        pos = self.next_sector
        for gdi in sorted(self.mem_gts):
            table = self.mem_gts[gdi]
            if not any(table):
                continue
            tail += hdr.pack_marker(gt_sectors, hdr.MARKER_GT)
            gd[gdi] = pos + len(tail) // SECTOR
            raw = _pack32(table)
            tail += raw + bytes(gt_sectors * SECTOR - len(raw))
        gd_sectors = -(-len(gd) * 4 // SECTOR)
        tail += hdr.pack_marker(gd_sectors, hdr.MARKER_GD)
        gd_at = pos + len(tail) // SECTOR
        raw = _pack32(gd)
        tail += raw + bytes(gd_sectors * SECTOR - len(raw))
        footer = self.h.footer(gd_at)
        tail += hdr.pack_marker(1, hdr.MARKER_FOOTER) + footer.pack() + hdr.pack_marker(0, hdr.MARKER_EOS)
        self.host.pwrite(tail, pos * SECTOR)
        self.host.truncate(pos * SECTOR + len(tail))
        self.file_size = pos * SECTOR + len(tail)
        self.gd = gd
        self.h = footer
        self.started = False
        self.mem_gts = {}
        self._gts.clear()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.host.close()


def _covered(ranges: List[Tuple[int, int]]) -> int:
    """Bytes in the union of half-open *ranges*."""
    total = 0
    reach = 0
    for a, b in sorted(ranges):
        a = max(a, reach)
        if b > a:
            total += b - a
            reach = b
    return total
