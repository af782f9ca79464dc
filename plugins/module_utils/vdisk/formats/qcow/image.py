"""An open qcow (v1) image: two-level lookups, compressed clusters, appending allocation.

References: QEMU block/qcow.c (get_cluster_offset, decompress_cluster, the write paths).
New space is taken at the end of the file, as QEMU takes it: a new L2 table at the end rounded
up to a cluster, a data cluster likewise, a compressed cluster at the end rounded up to a sector.
vdisk lays clusters out where QEMU would, but writes in the safe order: data first, then the
L2 table or entries, then the L1 entry, so an interruption leaves at most unreferenced space.

Legacy AES encryption (crypt_method 1) is read only, as in qcow2 (formats/qcow2/crypto.py,
``LegacyAes``): block/qcow.c decrypts an uncompressed cluster's sectors numbered by their guest
offset, reads compressed clusters in clear, and gives no host offset in its block status.
"""
import array
import sys
import zlib
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ... import deflate_codecs
from ...driver import DATA, UNALLOCATED, Extent, Image, Policy, merge_runs
from ...errors import CorruptImage, ImageError
from ...overlap import MetadataMap
from ...structure import Record
from . import header as hdr

L2_CACHE_TABLES = 64           # QEMU keeps 16; tables are at most 64 KiB
COMPRESS_LEVEL = 6             # zlib's Z_DEFAULT_COMPRESSION, as QEMU deflates (window -12, memLevel 9)

# a run's mapping in _pieces: a host offset (int), or one of these markers
_UNALLOC = "unallocated"

# the metadata guest data must not overwrite (QEMU's qcow driver has no such check; vdisk's own names)
OL_HEADER = "header"
OL_L1 = "L1 table"
OL_L2 = "L2 table"


def _table(raw: bytes) -> array.array:
    t = array.array("Q", raw)
    if sys.byteorder != "big":
        t.byteswap()
    return t


def _pack(values) -> bytes:
    t = array.array("Q", values)
    if sys.byteorder != "big":
        t.byteswap()
    return t.tobytes()


def _align(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class _Compressed(tuple):
    """A compressed cluster's ``(entry,)`` as a run marker: never merged with its neighbours."""


class QcowImage(Image):
    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self.crypto: Any = None              # qcow2's LegacyAes for an AES-encrypted image
        self._passphrase = policy.passphrase
        self._open_host(policy)

    def _open(self) -> None:
        size = self.host.size()
        h = hdr.parse_header(self.host.pread(min(size, hdr.HEADER_SIZE), 0), self.path,
                             lambda off, n: self.host.pread(n, off))
        self.header = h
        if h.crypt_method == hdr.CRYPT_AES:
            self._open_crypto()
        self.cb = h.cluster_bits
        self.cs = h.cluster_size
        self.cluster_size = self.cs
        self.l2_size = h.l2_size
        self.l2_bytes = 8 * h.l2_size
        self.l2_span = self.l2_size * self.cs
        self.virtual_size = h.size // 512 * 512      # QEMU counts whole sectors
        self.backing_filename = h.backing_file
        self.file_end = size
        self.l1_size = h.l1_size
        # QEMU reads the L1 table whole, zeros past the end of the file; only the part inside
        # the file is kept (the rest is zeros), so a hostile l1_size costs no memory
        inside = max(0, min(self.l1_size, (size - h.l1_table_offset) // 8)) if h.l1_table_offset < size else 0
        self.l1 = _table(self.host.pread(inside * 8, h.l1_table_offset)) if inside else array.array("Q")
        self._l2_cache: "OrderedDict[int, array.array]" = OrderedDict()
        self._zcache: Tuple[int, bytes] = (-1, b"")
        self._metadata: Optional[MetadataMap] = None      # built on the first write in place
        self.compression_unit = self.cs

    def _open_crypto(self) -> None:
        """The legacy AES method: read only; unlocked when a secret was given, else the first data
        read fails with QEMU's message (info needs no key)."""
        from ..qcow2.crypto import LegacyAes  # pylint: disable=import-outside-toplevel  # only for AES images
        self.crypto = LegacyAes(self.path, "qcow")
        if self.writable:
            self.crypto.refuse_writing()
        self.encrypted = True
        self.zero_init = False
        if self._passphrase is not None:
            self.crypto.unlock(self._passphrase)
        self._passphrase = None

    # -- tables ----------------------------------------------------------------------------
    def _l1_entry(self, l1i: int) -> int:
        return self.l1[l1i] if l1i < len(self.l1) else 0

    def _l2_table(self, l1i: int) -> Optional[array.array]:
        off = self._l1_entry(l1i)
        if not off:
            return None
        table = self._l2_cache.get(off)
        if table is None:
            if off + self.l2_bytes > hdr.MAX_HOST_OFFSET:
                raise CorruptImage("L2 table offset 0x%x is invalid (L1 index %d)" % (off, l1i), path=self.path,
                                   field="L1 table")
            table = _table(self.host.pread(self.l2_bytes, off))
            self._l2_cache[off] = table
            while len(self._l2_cache) > L2_CACHE_TABLES:
                self._l2_cache.popitem(last=False)
        else:
            self._l2_cache.move_to_end(off)
        return table

    def _entry(self, ci: int) -> int:
        table = self._l2_table(ci >> self.header.l2_bits)
        return 0 if table is None else table[ci & (self.l2_size - 1)]

    def _pieces(self, offset: int, length: int) -> Iterator[Tuple[int, int, Any]]:
        """``(offset, length, mapping)`` per cluster; mapping is a host offset, _UNALLOC or _Compressed."""
        end = offset + length
        while offset < end:
            ci = offset >> self.cb
            if not self._l1_entry(ci >> self.header.l2_bits):
                n = min(end, ((ci >> self.header.l2_bits) + 1) * self.l2_span) - offset
                yield offset, n, _UNALLOC
                offset += n
                continue
            n = min(end, (ci + 1) * self.cs) - offset
            e = self._entry(ci)
            if not e:
                yield offset, n, _UNALLOC
            elif e & hdr.OFLAG_COMPRESSED:
                yield offset, n, _Compressed((e,))
            else:
                if e % 512:
                    raise CorruptImage("cluster offset 0x%x is not sector aligned (cluster %d)" % (e, ci),
                                       path=self.path, field="L2 table")
                yield offset, n, e + offset % self.cs
            offset += n

    def _runs(self, offset: int, length: int) -> Iterator[Tuple[int, int, Any]]:
        return merge_runs(self._pieces(offset, length), is_host=lambda m: isinstance(m, int))

    # -- reads -----------------------------------------------------------------------------
    def _decompress(self, entry: int) -> bytes:
        host, csize = hdr.split_compressed(entry, self.cb)
        if self._zcache[0] == host:
            return self._zcache[1]
        raw = self.host.pread(csize, host) if host < self.file_end else b""
        if len(raw) < csize or host + csize > self.file_end:
            raise CorruptImage("compressed cluster at 0x%x (%d bytes) lies beyond the end of the file"
                               % (host, csize), path=self.path, field="L2 table")
        try:
            out = deflate_codecs.decompressobj(-12).decompress(raw, self.cs)
        except deflate_codecs.errors() as exc:
            raise CorruptImage("compressed cluster at 0x%x cannot be inflated: %s" % (host, exc), path=self.path,
                               field="compressed cluster") from None
        if len(out) != self.cs:
            raise CorruptImage("compressed cluster at 0x%x inflates to %d bytes, not %d" % (host, len(out), self.cs),
                               path=self.path, field="compressed cluster")
        self._zcache = (host, out)
        return out

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts = []
        for start, n, m in self._runs(offset, length):
            if m is _UNALLOC:
                parts.append(self.read_backing(start, n))
            elif isinstance(m, _Compressed):
                within = start % self.cs
                parts.append(self._decompress(m[0])[within:within + n])
            elif self.crypto is not None:
                parts.append(self.crypto.pread(self.host, n, m, start))
            else:
                parts.append(self.host.pread(n, m))
        return b"".join(parts)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self._extent_end(offset, length)
        if end <= offset:
            return
        for start, n, m in self._runs(offset, end - offset):
            if m is _UNALLOC:
                yield Extent(start, n, UNALLOCATED)
            elif isinstance(m, _Compressed):
                yield Extent(start, n, DATA, None, compressed=True)
            elif self.crypto is not None:
                yield Extent(start, n, DATA, None)          # ciphertext: no host offset (qcow_co_block_status)
            else:
                yield Extent(start, n, DATA, m)

    # -- allocation --------------------------------------------------------------------------
    def _take(self, n: int, align: int = 0) -> int:
        """*n* bytes at the end of the file rounded up to *align* (default: a cluster).  QEMU sees the
        file's length in whole sectors, so even compressed data starts at a sector boundary."""
        off = _align(self.file_end, align or self.cs)
        self._metadata_map().check(off, n, self.path)     # a table an entry places past the end of the file
        self.file_end = off + n
        return off

    def _metadata_map(self) -> MetadataMap:
        """The header and backing file name, the L1 table (qemu-img writes it in whole sectors) and
        the L2 tables it points to."""
        if self._metadata is None:
            h = self.header
            ranges = [(OL_HEADER, 0, hdr.HEADER_SIZE), (OL_L1, h.l1_table_offset,
                                                        _align(h.l1_table_offset + 8 * self.l1_size, 512) -
                                                        h.l1_table_offset)]
            if h.backing_file_offset:
                ranges.append((OL_HEADER, h.backing_file_offset, h.backing_file_size))
            ranges.extend((OL_L2, off, self.l2_bytes) for off in self.l1 if off)
            self._metadata = MetadataMap.from_ranges(ranges, (OL_HEADER, OL_L1, OL_L2))
        return self._metadata

    def _check_host(self, host: int, ci: int) -> None:
        """A data cluster vdisk is about to write into must lie inside the file and overlap no
        metadata (QEMU would write there; vdisk refuses)."""
        self._metadata_map().check(host, self.cs, self.path, field="L2 table")
        if host + self.cs > _align(self.file_end, self.cs):
            raise CorruptImage("cluster offset 0x%x of cluster %d lies beyond the end of the file; not writing "
                               "there" % (host, ci), path=self.path, field="L2 table")

    def _set_entries(self, first: int, entries: List[int], l2_off: Optional[int]) -> None:
        """Point clusters ``first..`` (inside one L2 table) at *entries*; *l2_off* is the place taken
        for a new L2 table (None: the table exists).  Called after the data is written."""
        l1i = first >> self.header.l2_bits
        idx = first & (self.l2_size - 1)
        if l2_off is None:
            table = self._l2_table(l1i)
            off = self._l1_entry(l1i)
            self._metadata_map().check(off, self.l2_bytes, self.path, ignore=(OL_L2,), field="L1 table")
            if off + self.l2_bytes > _align(self.file_end, 512):
                raise CorruptImage("L2 table offset 0x%x (L1 index %d) lies beyond the end of the file; not "
                                   "writing there" % (off, l1i), path=self.path, field="L1 table")
            table[idx:idx + len(entries)] = array.array("Q", entries)
            self.host.pwrite(_pack(entries), self._l1_entry(l1i) + 8 * idx)
            return
        table = array.array("Q", bytes(self.l2_bytes))
        table[idx:idx + len(entries)] = array.array("Q", entries)
        self.host.pwrite(_pack(table), l2_off)
        self.host.flush()              # the table before the L1 entry that makes it visible
        self._l2_cache[l2_off] = table
        if self._metadata is not None:
            self._metadata.add(OL_L2, l2_off, self.l2_bytes)
        if l1i >= len(self.l1):
            self.l1.extend([0] * (l1i + 1 - len(self.l1)))
        self.l1[l1i] = l2_off
        self.host.pwrite(_pack([l2_off]), self.header.l1_table_offset + 8 * l1i)

    def _new_l2(self, ci: int) -> Optional[int]:
        """The place of a new L2 table for cluster *ci* if it has none (taken before its clusters, as QEMU)."""
        if self._l1_entry(ci >> self.header.l2_bits):
            return None
        if self.header.l1_table_offset + 8 * self.l1_size > self.file_end:
            # QEMU would write the entry past the end of the file, where new clusters then go too
            raise CorruptImage("the L1 table lies beyond the end of the file; not allocating", path=self.path,
                               field="l1_table_offset")
        return self._take(self.l2_bytes)

    # -- writes ----------------------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        view = self._write_view(offset, data)
        self._zcache = (-1, b"")
        end = offset + len(view)
        pos = offset
        while pos < end:
            ci = pos >> self.cb
            e = self._entry(ci)
            if e and not e & hdr.OFLAG_COMPRESSED:
                if e % 512:
                    raise CorruptImage("cluster offset 0x%x is not sector aligned (cluster %d)" % (e, ci),
                                       path=self.path, field="L2 table")
                self._check_host(e, ci)
                stop = min(end, (ci + 1) * self.cs)
                self.host.pwrite(view[pos - offset:stop - offset], e + pos % self.cs)
                pos = stop
                continue
            # a run of clusters needing allocation, inside one L2 table
            last = ci
            table_end = ((ci >> self.header.l2_bits) + 1) << self.header.l2_bits
            while ((last + 1) << self.cb) < end and last + 1 < table_end:
                nxt = self._entry(last + 1)
                if nxt and not nxt & hdr.OFLAG_COMPRESSED:
                    break
                last += 1
            stop = min(end, (last + 1) << self.cb)
            self._allocating_write(ci, last, pos, view[pos - offset:stop - offset])
            pos = stop

    def _allocating_write(self, first: int, last: int, offset: int, data: memoryview) -> None:
        count = last - first + 1
        start = first << self.cb
        buf = bytearray(count * self.cs)
        head, tail = offset - start, start + count * self.cs - (offset + len(data))
        if head:
            buf[:head] = self._old_content(first, start, head)
        if tail:
            pos = offset + len(data)
            buf[pos - start:] = self._old_content(last, pos, tail)
        buf[head:head + len(data)] = data
        l2_off = self._new_l2(first)
        host = self._take(count * self.cs)
        self.host.pwrite(buf, host)
        if self.backing_filename is not None:
            self.host.flush()          # data before the entry: the backing file must not show through
        self._set_entries(first, [host + i * self.cs for i in range(count)], l2_off)

    def _old_content(self, ci: int, offset: int, length: int) -> bytes:
        """What a partly written new cluster keeps: a compressed cluster's data, else the backing file's."""
        e = self._entry(ci)
        if e & hdr.OFLAG_COMPRESSED:
            within = offset % self.cs
            return self._decompress(e)[within:within + length]
        avail = max(0, min(length, self.virtual_size - offset))
        data = self.read_backing(offset, avail) if avail else b""
        return data + bytes(length - len(data))

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Unallocated clusters without a backing file already read as zeros; the rest is written."""
        self._check_writable()
        self._check_range(offset, length)
        for start, n, m in list(self._runs(offset, length)):
            if m is _UNALLOC and self.backing_filename is None:
                continue
            pos, stop = start, start + n
            while pos < stop:
                k = min(stop - pos, 4 * 1024 * 1024)
                self.write(pos, bytes(k))
                pos += k

    # -- compressed clusters (convert -c) -----------------------------------------------------
    def compress_block(self, data: bytes) -> Optional[bytes]:
        if len(data) < self.cs:
            data = bytes(data) + bytes(self.cs - len(data))     # the short last cluster, zero-padded
        c = zlib.compressobj(COMPRESS_LEVEL, zlib.DEFLATED, -12, 9)
        payload = c.compress(data) + c.flush()
        return payload if len(payload) < self.cs else None

    def write_compressed(self, offset: int, blocks: Sequence[Tuple[bytes, Optional[bytes]]]) -> None:
        """Store consecutive clusters from cluster-aligned *offset*: each ``(data, payload)``; a cluster
        already allocated, or without a payload, is written uncompressed."""
        self._check_writable()
        if offset % self.cs:
            raise ImageError("compressed writes must start at a cluster boundary (offset %d)" % offset,
                             path=self.path, field="offset")
        self._check_range(offset, sum(len(d) for d, dummy in blocks))
        self._zcache = (-1, b"")
        pos = offset
        run: List[Tuple[int, bytes]] = []      # (cluster, payload) in one L2 table, to place together
        for data, payload in blocks:
            ci = pos >> self.cb
            if run and (ci >> self.header.l2_bits) != (run[0][0] >> self.header.l2_bits):
                self._place_compressed(run)
                run = []
            if payload is None or self._entry(ci):
                if run:
                    self._place_compressed(run)
                    run = []
                self.write(pos, data)
            else:
                if len(data) != self.cs and pos + len(data) != self.virtual_size:
                    raise ImageError("a compressed write covers whole clusters (offset %d, length %d)"
                                     % (pos, len(data)), path=self.path, field="length")
                run.append((ci, payload))
            pos += len(data)
        if run:
            self._place_compressed(run)

    def _place_compressed(self, run: List[Tuple[int, bytes]]) -> None:
        """Payloads at the end of the file, each from a sector boundary, then their entries (one L2 table)."""
        first = run[0][0]
        l2_off = self._new_l2(first)
        entries = {}
        start = _align(self.file_end, 512)
        buf = bytearray()
        for ci, payload in run:
            at = self._take(len(payload), align=512)
            buf += bytes(at - start - len(buf)) + payload
            entries[ci] = hdr.compressed_entry(at, len(payload), self.cb)
        self.host.pwrite(buf, start)
        lo, hi = first, run[-1][0]
        table = self._l2_table(first >> self.header.l2_bits)
        base = first & ~(self.l2_size - 1)
        current = [entries.get(ci, 0 if table is None else table[ci - base]) for ci in range(lo, hi + 1)]
        self._set_entries(lo, current, l2_off)

    def make_empty(self) -> None:
        """After ``commit``: drop every cluster, as QEMU does (a zeroed L1 table, the file cut
        right after it)."""
        self._check_writable()
        l1_bytes = 8 * self.l1_size
        pos = 0
        while pos < l1_bytes:
            n = min(l1_bytes - pos, 4 * 1024 * 1024)
            self.host.pwrite(bytes(n), self.header.l1_table_offset + pos)
            pos += n
        self.host.flush()              # the L1 table no longer points into what is cut off
        self.host.truncate(self.header.l1_table_offset + l1_bytes)
        self.l1 = array.array("Q")
        self._l2_cache.clear()
        self._metadata = None
        self._zcache = (-1, b"")
        self.file_end = self.header.l1_table_offset + l1_bytes

    # -- metadata ------------------------------------------------------------------------------
    def structures(self) -> List[Tuple[str, int, Record]]:
        return [("header", 0, self.header)]

    def info(self) -> Dict[str, Any]:
        return {"cluster-size": self.cs}
