"""An open qcow2 image: cluster mapping, reads, copy-on-write writes, zero writes and discards.

References: docs/interop/qcow2.txt "Cluster mapping", "Extended L2 Entries".
Write ordering follows QEMU's: new clusters are refcounted before data is written
into them, data is written before the L2 entry that points to it, a new L2 table
is complete before the L1 entry that points to it, and references are dropped
last, so an interruption leaves at most leaked clusters.

External data file (qcow2.txt, incompatible feature bit 2): guest clusters live in a
second file, each at its guest offset, and are not refcounted; the qcow2 file holds only
metadata.  Offset 0 is then a valid data offset, so an L2 entry is allocated when it has an
offset *or* COPIED (QEMU's rule: every data-file cluster has refcount one, so COPIED is set).
With data_file_raw (autoclear bit 1) the data file is also a valid raw image of the disk:
zeroing and discarding zero the data file too, so both views always read the same.
"""
import re
import struct
import sys
from array import array
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...driver import DATA, UNALLOCATED, ZERO, Extent, Image, Policy, ResolvedPath
from ...errors import CorruptImage, FormatError, ImageError, UnsupportedFeature
from ...io import HostFile
from ...overlap import MetadataMap, MetadataOverlap
from . import header as hdr
from .compress import decompress_cluster
from . import bitmaps
from . import metadata
from .refcount import Refcounts
from .snapshot_table import MAX_TABLE_SIZE, Snapshot, parse_snapshot_table

U64 = struct.Struct(">Q")
U128 = struct.Struct(">QQ")

# kinds of a run inside the mapping
K_DATA = "data"
K_ZERO = "zero"
K_UNALLOC = "unalloc"
K_COMPRESSED = "compressed"

ALL_ALLOC = 0xFFFFFFFF
ALL_ZERO = 0xFFFFFFFF << 32
L2_CACHE_BYTES = 32 * 1024 * 1024
DUMPED_SNAPSHOTS = 8                  # snapshot table entries ``vdisk inspect --dump`` shows


_NONZERO = re.compile(rb"[^\x00]")


class Qcow2Image(Image):
    """One qcow2 layer.  Reads fall through to ``self.backing`` where clusters are unallocated."""

    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self.host = policy.open_host(path, writable)
        self.data_file: Optional[ResolvedPath] = None    # the external data file, as the policy resolved it
        self.data_raw = False                             # data_file_raw: the data file is a raw image too
        self._data_host: Optional[HostFile] = None        # opened on first use (see _data)
        # a writer always locks the data file: it is a named file, not the temporary output a caller
        # may have locked itself (convert and create open their new image with lock=False)
        self._data_lock = policy.locks(writable) or writable
        self._data_sync = policy.sync
        self._data_mark = 0                               # OFLAG_COPIED with a data file (see _mapped)
        try:
            self._open_layer(policy)
        except BaseException:
            self._close_files()
            raise

    # -- open -------------------------------------------------------------------------
    def _open_layer(self, policy: Policy) -> None:
        """Read and check the header and tables; *policy* rules the data file and repair opens."""
        file_size = self.host.size()
        first = self.host.pread(min(max(file_size, hdr.HEADER_V2_LENGTH), 1 << hdr.MAX_CLUSTER_BITS), 0)
        if file_size < hdr.HEADER_V2_LENGTH:
            raise FormatError("file too short for a qcow2 header (%d bytes)" % file_size, path=self.path,
                              field="header")
        h = hdr.parse_header(first, self.path, file_size)
        self.header = h
        self.cs = h.cluster_size
        self.cb = h.cluster_bits
        self.l2e = h.l2_entries
        self.ext = h.extended_l2
        self.sc = self.cs // hdr.SUBCLUSTERS if self.ext else self.cs
        self.virtual_size = h.size
        self.cluster_size = self.cs
        self.allocation_unit = self.sc
        self.compression_unit = self.cs
        self.backing_filename = h.backing_file
        self.backing_format = h.backing_format
        self.dirty = bool(h.incompatible_features & hdr.INCOMPAT_DIRTY)
        self.corrupt = bool(h.incompatible_features & hdr.INCOMPAT_CORRUPT)
        if h.incompatible_features & hdr.INCOMPAT_DATA_FILE:
            self._resolve_data_file(policy)
        elif h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW:
            raise FormatError("data-file-raw requires a data file", path=self.path, field="data_file_raw")
        if self.writable and not policy.repair:
            if self.corrupt:
                raise CorruptImage("qcow2: Image is corrupt; cannot be opened read/write", path=self.path,
                                   field="corrupt bit")
        self.crypto: Optional[Any] = None       # crypto.Encryption or crypto.LegacyAes
        if h.crypt_method == hdr.CRYPT_LUKS:
            # the header is read now (info needs no key); the key is unlocked only with a passphrase, and
            # without one the first data access fails with QEMU's message
            from .crypto import Encryption      # pylint: disable=import-outside-toplevel
            self.crypto = Encryption(self.host, h, self.path)
        elif h.crypt_method == hdr.CRYPT_AES:
            if h.crypto_extension is not None:
                raise FormatError("CRYPTO header extension only expected with LUKS encryption method",
                                  path=self.path, field="crypto header extension")
            from .crypto import LegacyAes       # pylint: disable=import-outside-toplevel
            self.crypto = LegacyAes(self.path)
            if self.writable:
                self.crypto.refuse_writing()     # read only: no write, amend, resize, snapshot, repair
        if self.crypto is not None:
            self.encrypted = True
            self.zero_init = False
            if policy.passphrase is not None:
                self.crypto.unlock(policy.passphrase)
        raw = self.host.pread(h.l1_size * 8, h.l1_table_offset) if h.l1_size else b""
        self.l1: List[int] = [U64.unpack_from(raw, i)[0] for i in range(0, len(raw), 8)]
        self._l2_cache: "OrderedDict[int, bytearray]" = OrderedDict()
        self._compressed_cache: Tuple[int, bytes] = (-1, b"")
        self._metadata: Optional[MetadataMap] = None      # built on the first overlap check
        self._metadata_of: Tuple[Any, Any] = (None, None)   # the refcounts and L1 list it was built from
        self.refcounts: Optional[Refcounts] = Refcounts(self) if self.writable else None
        self._set_dirty_on_write = self.writable and bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)
        self._snapshots: Optional[List[Snapshot]] = None
        self._preallocation_guess: Optional[bool] = None
        if self.writable and self.dirty and not policy.repair:
            # not closed cleanly (lazy refcounts, or an interrupted metadata update): repair first, as QEMU
            # does on a read-write open
            from .check import check as check_image  # pylint: disable=import-outside-toplevel
            result = check_image(self, "all")
            if result.corruptions:
                raise CorruptImage("image was not closed cleanly and could not be repaired (%d corruptions "
                                   "left)" % result.corruptions, path=self.path, field="dirty bit")
            self.refcounts = Refcounts(self)
        if self.writable and h.version == 3 and h.autoclear_features & ~hdr.AUTOCLEAR_KNOWN:
            # unknown autoclear bits must be cleared before the image is modified
            h.autoclear_features &= hdr.AUTOCLEAR_KNOWN
            self.host.pwrite(*h.pack_fields("autoclear_features"))
        # enabled persistent bitmaps must see every guest write; an image whose bitmaps cannot be
        # kept valid is refused here, before anything is written
        self._bitmaps: Optional[bitmaps.Tracker] = None
        if self.writable and not policy.repair:
            try:
                self._bitmaps = bitmaps.Tracker.open(self)
            except CorruptImage as exc:
                raise CorruptImage("cannot open for writing: %s" % exc.message, path=self.path,
                                   field="bitmaps") from None

    # -- the external data file ---------------------------------------------------------
    def _resolve_data_file(self, policy: Policy) -> None:
        """Check the data file the header names against the policy (the one path rule).

        A writer opens it at once, so its locks are held before anything is written; a reader
        opens it on the first access to guest data, so ``info`` never opens it (as qemu-img
        since CVE-2024-4467) and shows an image whose data file is missing."""
        h = self.header
        if not h.data_file:
            raise FormatError("'data-file' is required for this image", path=self.path, field="data_file")
        self.data_file = policy.resolve(h.data_file, self.path, "data file")
        self.data_raw = bool(h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW)
        self._data_mark = hdr.OFLAG_COPIED
        if self.writable:
            self._data()

    def _data(self) -> HostFile:
        """The file guest data clusters live in: the data file (opened through its checked
        reference: real path, O_NOFOLLOW, descriptor verified) or the image file itself."""
        if self.data_file is None:
            return self.host
        if self._data_host is None:
            ref = self.data_file
            if ref.ident is None:
                raise ImageError("Could not open '%s': No such file or directory" % ref.display, path=self.path,
                                 field="data file")
            self._data_host = HostFile(ref.display, writable=self.writable, lock=self._data_lock,
                                       sync=self._data_sync, checked=ref)
        return self._data_host

    def open_data_file(self) -> None:
        """Open the data file now (``check`` fails on a missing one, as qemu-img check does)."""
        self._data()

    @property
    def data_path(self) -> str:
        """The name of the file that holds guest data (``map`` shows it), as qemu-img shows it."""
        return self.data_file.display if self.data_file is not None else self.path

    def _mapped(self, entry: int) -> bool:
        """Whether a (non-compressed) L2 entry points to a host cluster: an offset, or with a data
        file COPIED (offset 0 is the data file's first cluster)."""
        return bool(entry & hdr.OFFSET_MASK or entry & self._data_mark)

    def _zero_data_file(self, offset: int, length: int) -> None:
        """Make a guest range read as zeros in a raw data file too (data_file_raw)."""
        host = self._data()
        length = min(length, max(0, host.size() - offset))   # past its end it reads zeros already
        if length > 0 and not host.punch_hole(offset, length):
            host.write_zeroes_full(offset, length)

    # -- header updates ---------------------------------------------------------------
    def write_reftable_pointer(self) -> None:
        """Switch the header to the current refcount table (offset and cluster count in one write)."""
        h = self.header
        self.host.flush()
        self.host.pwrite(*h.pack_fields("refcount_table_offset", "refcount_table_clusters"))

    def _write_incompat(self) -> None:
        self.host.pwrite(*self.header.pack_fields("incompatible_features"))

    # -- metadata overlap checks (QEMU's qcow2_pre_write_overlap_check) ------------------
    def metadata_map(self) -> MetadataMap:
        """Where the metadata lies; rebuilt when the refcount structure or the L1 list is replaced."""
        m = self._metadata
        if m is None or self._metadata_of[0] is not self.refcounts or self._metadata_of[1] is not self.l1:
            m = self._metadata = metadata.build(self)
            self._metadata_of = (self.refcounts, self.l1)
        return m

    def forget_metadata_map(self) -> None:
        self._metadata = None

    def note_metadata(self, kind: str, offset: int, length: int, old: int = 0) -> None:
        """A table was added (and the one at *old* dropped) in place: keep a built map current."""
        m = self._metadata
        if m is not None:
            if old:
                m.discard(kind, old, length)
            m.add(kind, offset, length)

    def check_overlap(self, offset: int, length: int, ignore: Tuple[str, ...] = ()) -> None:
        """Refuse a write (or an allocation) over metadata: the image is marked corrupt, as QEMU does."""
        try:
            self.metadata_map().check(offset, length, self.path, ignore)
        except MetadataOverlap as exc:
            raise metadata.signal_corruption(self, exc) from None

    def write_header(self) -> None:
        """Rewrite cluster 0 (header, extensions, backing file name) from ``self.header``."""
        self.host.pwrite(hdr.pack_header(self.header), 0)

    # -- tables -----------------------------------------------------------------------
    def _l2_offset(self, l1i: int) -> int:
        entry = self.l1[l1i] if l1i < len(self.l1) else 0
        off = entry & hdr.OFFSET_MASK
        if off and off % self.cs:
            raise CorruptImage("L2 table offset 0x%x unaligned (L1 index: 0x%x)" % (off, l1i), path=self.path,
                               field="L1 table")
        return off

    def _l2_table(self, l1i: int) -> Optional[bytearray]:
        off = self._l2_offset(l1i)
        if not off:
            return None
        table = self._l2_cache.get(off)
        if table is None:
            if off + self.cs > self.host.size():
                raise CorruptImage("L2 table at offset 0x%x is beyond the end of the file (L1 index: 0x%x)"
                                   % (off, l1i), path=self.path, field="L1 table")
            table = bytearray(self.host.pread(self.cs, off))
            self._l2_cache[off] = table
            self._trim_cache()
        else:
            self._l2_cache.move_to_end(off)
        return table

    def _trim_cache(self) -> None:
        while len(self._l2_cache) * self.cs > L2_CACHE_BYTES and len(self._l2_cache) > 1:
            self._l2_cache.popitem(last=False)

    def _entry(self, table: bytearray, idx: int) -> Tuple[int, int]:
        if self.ext:
            return U128.unpack_from(table, idx * 16)
        return U64.unpack_from(table, idx * 8)[0], 0

    def _set_entry(self, table: bytearray, idx: int, entry: int, bitmap: int = 0) -> None:
        if self.ext:
            U128.pack_into(table, idx * 16, entry, bitmap)
        else:
            U64.pack_into(table, idx * 8, entry)

    def _compressed_location(self, entry: int) -> Tuple[int, int]:
        """Host byte offset and length of a compressed cluster's data."""
        x = 62 - (self.cb - 8)
        offset = entry & ((1 << x) - 1)
        sectors = ((entry >> x) & ((1 << (62 - x)) - 1)) + 1
        return offset, sectors * 512 - (offset & 511)

    def _cluster_runs(self, table: bytearray, idx: int, cstart: int, l2_off: int):
        """The runs of one guest cluster: ``(start, length, kind, host_offset or None, entry)``."""
        entry, bitmap = self._entry(table, idx)
        cs = self.cs
        if entry & hdr.OFLAG_COMPRESSED:
            return [(cstart, cs, K_COMPRESSED, None, entry)]
        off = entry & hdr.OFFSET_MASK
        if off and off % cs:
            raise CorruptImage("Cluster allocation offset 0x%x unaligned (L2 offset: 0x%x, L2 index: 0x%x)"
                               % (off, l2_off, idx), path=self.path, field="L2 table")
        mapped = self._mapped(entry)
        if not self.ext:
            if entry & hdr.OFLAG_ZERO:
                return [(cstart, cs, K_ZERO, off or None, entry)]
            if mapped:
                return [(cstart, cs, K_DATA, off, entry)]
            return [(cstart, cs, K_UNALLOC, None, entry)]
        alloc = bitmap & ALL_ALLOC
        zero = bitmap >> 32
        if alloc & zero or (alloc and not mapped):
            raise CorruptImage("Invalid cluster entry found (L2 offset: 0x%x, L2 index: 0x%x)" % (l2_off, idx),
                               path=self.path, field="L2 table")
        if alloc == ALL_ALLOC:
            return [(cstart, cs, K_DATA, off, entry)]
        if zero == ALL_ALLOC:
            return [(cstart, cs, K_ZERO, off or None, entry)]
        if not alloc and not zero:
            return [(cstart, cs, K_UNALLOC, None, entry)]
        runs = []
        sc = self.sc
        for i in range(hdr.SUBCLUSTERS):
            bit = 1 << i
            kind = K_DATA if alloc & bit else K_ZERO if zero & bit else K_UNALLOC
            host = off + i * sc if mapped else None   # QEMU reports the offset of allocated clusters' subclusters
            if runs and runs[-1][2] == kind:
                s, n, k, h0, e = runs[-1]
                runs[-1] = (s, n + sc, k, h0, e)
            else:
                runs.append((cstart + i * sc, sc, kind, host, entry))
        return runs

    def _plain_runs(self, table: bytearray, first_ci: int, last_ci: int, l2_off: int):
        """:meth:`_cluster_runs` of clusters ``first_ci..last_ci`` of a standard (not extended) L2 table,
        already merged: one unpack and one loop per table instead of a call per cluster."""
        cs, l2e = self.cs, self.l2e
        base = first_ci % l2e
        entries = struct.unpack_from(">%dQ" % (last_ci - first_ci + 1), table, base * 8)
        runs = []
        cur = None                      # [guest start, length, kind, host, entry] being extended
        g = first_ci << self.cb
        i, count = 0, len(entries)
        while i < count:
            e = entries[i]
            if not e:
                # unallocated entries up to the next nonzero byte, found at C speed: an overlay's
                # tables are mostly zeros, and a Python step per entry was most of a -B convert
                found = _NONZERO.search(table, (base + i) * 8, (base + count) * 8)
                j = count if found is None else found.start() // 8 - base
                if cur and cur[2] == K_UNALLOC and cur[3] is None:
                    cur[1] += (j - i) * cs
                else:
                    if cur:
                        runs.append(tuple(cur))
                    cur = [g, (j - i) * cs, K_UNALLOC, None, 0]
                g += (j - i) * cs
                i = j
                continue
            i += 1
            if e & hdr.OFLAG_COMPRESSED:
                if cur:
                    runs.append(tuple(cur))
                    cur = None
                runs.append((g, cs, K_COMPRESSED, None, e))
                g += cs
                continue
            off = e & hdr.OFFSET_MASK
            if off % cs:
                raise CorruptImage("Cluster allocation offset 0x%x unaligned (L2 offset: 0x%x, L2 index: 0x%x)"
                                   % (off, l2_off, base + i - 1), path=self.path, field="L2 table")
            kind = K_ZERO if e & hdr.OFLAG_ZERO else K_DATA if off or e & self._data_mark else K_UNALLOC
            host = off if kind == K_DATA else off or None
            if cur and cur[2] == kind and (cur[3] is None if host is None else
                                           cur[3] is not None and cur[3] + cur[1] == host):
                cur[1] += cs
            else:
                if cur:
                    runs.append(tuple(cur))
                cur = [g, cs, kind, host, e]
            g += cs
        if cur:
            runs.append(tuple(cur))
        return runs

    def _segments(self, offset: int, length: int) -> Iterator[Tuple[int, int, str, Optional[int], int]]:
        """Merged runs ``(guest_offset, length, kind, host_offset, entry)`` covering the range."""
        end = offset + length
        pos = offset
        cs, cb, l2e = self.cs, self.cb, self.l2e
        pending = None
        while pos < end:
            l1i = (pos >> cb) // l2e
            stop = min(end, (l1i + 1) * l2e * cs)
            table = self._l2_table(l1i)
            if table is None:
                runs_iter = [(pos, stop - pos, K_UNALLOC, None, 0)]
            else:
                l2_off = self._l2_offset(l1i)
                if not self.ext:
                    runs_iter = self._plain_runs(table, pos >> cb, (stop - 1) >> cb, l2_off)
                else:
                    runs_iter = []
                    ci = pos >> cb
                    while (ci << cb) < stop:
                        runs_iter.extend(self._cluster_runs(table, ci % l2e, ci << cb, l2_off))
                        ci += 1
            for rs, rn, kind, host, entry in runs_iter:
                a = max(rs, pos)
                b = min(rs + rn, stop)
                if a >= b:
                    continue
                if host is not None and kind != K_COMPRESSED:
                    host += a - rs
                if pending is not None:
                    ps, pn, pk, ph, pe = pending
                    if pk == kind and kind != K_COMPRESSED and ps + pn == a and (
                            (kind == K_DATA and ph + pn == host) or
                            (kind != K_DATA and (ph is None) == (host is None) and
                             (ph is None or ph + pn == host))):
                        pending = (ps, pn + b - a, pk, ph, pe)
                        continue
                    yield pending
                pending = (a, b - a, kind, host, entry)
            pos = stop
        if pending is not None:
            yield pending

    # -- reading ----------------------------------------------------------------------
    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ImageError("request beyond the end of the image (offset %d, length %d, size %d)"
                             % (offset, length, self.virtual_size), path=self.path)

    def _compressed_cluster(self, entry: int) -> bytes:
        if self._compressed_cache[0] == entry:
            return self._compressed_cache[1]
        if self.data_file is not None:
            raise CorruptImage("compressed cluster in an image with an external data file (the feature forbids "
                               "them)", path=self.path, field="L2 table")
        coff, clen = self._compressed_location(entry)
        if coff >= hdr.MAX_HOST_OFFSET or coff + clen > self.host.size() + 512:
            raise CorruptImage("compressed cluster at host offset 0x%x is beyond the end of the file" % coff,
                               path=self.path, field="L2 table")
        raw = self.host.pread(clen, coff)
        data = decompress_cluster(raw, self.cs, self.header.compression_type, self.path, "0x%x" % coff)
        self._compressed_cache = (entry, data)
        return data

    def _data_pread(self, length: int, host: int, guest: int) -> bytes:
        """Guest data for *guest* stored at *host*: decrypted when the image is encrypted (units
        numbered by host offset with LUKS, by guest offset with the legacy AES method)."""
        if self.crypto is not None:
            return self.crypto.pread(self._data(), length, host, guest)
        return self._data().pread(length, host)

    def _data_pwrite(self, data, host: int) -> None:
        """Write guest data at *host*, encrypted when the image is."""
        if self.crypto is not None:
            self.crypto.pwrite(self._data(), data, host)
        else:
            self._data().pwrite(data, host)

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        out = bytearray(length)
        for g, n, kind, host, entry in self._segments(offset, length):
            o = g - offset
            if kind == K_DATA:
                out[o:o + n] = self._data_pread(n, host, g)
            elif kind == K_UNALLOC:
                if self.backing is not None:
                    out[o:o + n] = self.read_backing(g, n)
            elif kind == K_COMPRESSED:
                c = self._compressed_cluster(entry)
                co = g & (self.cs - 1)
                out[o:o + n] = c[co:co + n]
        return bytes(out)

    def read_into(self, offset: int, view: memoryview) -> None:
        length = len(view)
        self._check_range(offset, length)
        for g, n, kind, host, entry in self._segments(offset, length):
            o = g - offset
            if kind == K_DATA:
                if self.crypto is not None:
                    view[o:o + n] = self._data_pread(n, host, g)
                else:
                    self._data().pread_into(view[o:o + n], host)
            elif kind == K_UNALLOC and self.backing is not None:
                view[o:o + n] = self.read_backing(g, n)
            elif kind == K_COMPRESSED:
                c = self._compressed_cluster(entry)
                co = g & (self.cs - 1)
                view[o:o + n] = c[co:co + n]
            else:
                view[o:o + n] = bytes(n)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self.virtual_size if length is None else min(self.virtual_size, offset + length)
        if end <= offset:
            return
        self._data()        # as qemu-img map: a missing data file is an error even where nothing is mapped
        look_into_data_file = self.data_file is None or self._metadata_preallocated()
        for g, n, kind, host, _entry in self._segments(offset, end - offset):
            if self.crypto is not None and kind in (K_DATA, K_ZERO):
                # QEMU's block status gives no host offset with encryption (the host bytes are ciphertext),
                # and never looks into the file: a hole there decrypts to noise, not zeros
                yield Extent(g, n, DATA if kind == K_DATA else ZERO, None)
            elif kind == K_DATA and not look_into_data_file:
                yield Extent(g, n, DATA, host)
            elif kind == K_DATA:
                # a data cluster over a hole of the host file reads as zeros (QEMU reports zero:true)
                for hs, hn, is_data in self._data().data_extents(host, n):
                    yield Extent(g + hs - host, hn, DATA, hs, False, not is_data)
            elif kind == K_ZERO:
                yield Extent(g, n, ZERO, host)
            elif kind == K_UNALLOC:
                yield Extent(g, n, UNALLOCATED, host)
            else:
                yield Extent(g, n, DATA, None, True)

    def _metadata_preallocated(self) -> bool:
        """QEMU's guess whether the image was preallocated (qcow2_detect_metadata_preallocation):
        the refcounts count at least max(10/9 of, 2 more than) the clusters the qcow2 file has
        allocated on the host.  Only then does its block status look into the data file for holes,
        so only then does ``map`` report them as zeros; vdisk makes the same guess, so the maps agree."""
        if self._preallocation_guess is None:
            cs = self.cs
            real = self.host.allocated_bytes() // cs
            threshold = max(real * 10 // 9, real + 2)
            counts = self.refcounts if self.refcounts is not None else Refcounts(self)
            used = 0
            for cluster in range(-(-self.host.size() // cs)):
                used += bool(counts.get(cluster))
                if used >= threshold:
                    break
            self._preallocation_guess = used >= threshold
        return self._preallocation_guess

    # -- writing ----------------------------------------------------------------------
    def _prepare_write(self, offset: int, length: int) -> None:
        self._check_writable()
        self._check_range(offset, length)
        if self.corrupt:
            raise CorruptImage("qcow2: Image is corrupt; cannot be written", path=self.path, field="corrupt bit")
        if self._set_dirty_on_write and not self.dirty:
            self.header.incompatible_features |= hdr.INCOMPAT_DIRTY
            self._write_incompat()
            self.host.flush()
            self.dirty = True
        if self._bitmaps is not None:
            self._bitmaps.mark(offset, length)

    def _writable_l2(self, l1i: int) -> Tuple[int, bytearray]:
        """The L2 table for *l1i*, allocated or copied (if shared with a snapshot) so it can be changed."""
        entry = self.l1[l1i]
        old = self._l2_offset(l1i)
        if old and entry & hdr.OFLAG_COPIED:
            return old, self._l2_table(l1i)
        content = bytearray(self._l2_table(l1i)) if old else bytearray(self.cs)
        new = self.refcounts.alloc(1)
        self.host.pwrite(bytes(content), new)
        self.l1[l1i] = new | hdr.OFLAG_COPIED
        self.note_metadata(metadata.ACTIVE_L2, new, self.cs, old)
        self.host.pwrite(U64.pack(self.l1[l1i]), self.header.l1_table_offset + l1i * 8)
        self._l2_cache[new] = content
        self._trim_cache()
        if old:
            self._l2_cache.pop(old, None)
            self.refcounts.free(old, self.cs)
        return new, content

    def _old_cluster_content(self, cstart: int) -> bytearray:
        n = min(self.cs, self.virtual_size - cstart)
        data = bytearray(self.read(cstart, n))
        if n < self.cs:
            data.extend(bytes(self.cs - n))
        return data

    def _release(self, kind: str, host: Optional[int], entry: int) -> None:
        """Drop this layer's reference to the host cluster behind an entry being replaced."""
        if self.data_file is not None:
            return      # data-file clusters are not refcounted
        if kind == K_COMPRESSED:
            coff, clen = self._compressed_location(entry)
            self.refcounts.free(coff, clen)
        elif host:
            self.refcounts.free(host, self.cs)

    def write(self, offset: int, data) -> None:
        length = len(data)
        if not length:
            return
        self._prepare_write(offset, length)
        view = memoryview(data).cast("B")
        pos = offset
        end = offset + length
        span = self.l2e * self.cs
        while pos < end:
            l1i = pos // span
            stop = min(end, (l1i + 1) * span)
            self._write_in_table(l1i, pos, view[pos - offset:stop - offset])
            pos = stop

    def _write_in_table(self, l1i: int, offset: int, data: memoryview) -> None:
        cs, cb, l2e = self.cs, self.cb, self.l2e
        end = offset + len(data)
        first_ci = offset >> cb
        last_ci = (end - 1) >> cb
        l2_off, table = self._writable_l2(l1i)
        if not self.ext and offset == first_ci << cb and end == (last_ci + 1) << cb:
            first, count = first_ci % l2e, last_ci - first_ci + 1
            if table.count(0, first * 8, (first + count) * 8) == count * 8:
                self._write_new_clusters(l2_off, table, first_ci, first, count, data)
                return
        # classify every cluster: written in place, or given a new host cluster
        plan = []   # (ci, in_place_host or None, entry, bitmap)
        # guest data in an external data file cannot overwrite this file's metadata (QEMU skips that check)
        overlaps = None if self.header.incompatible_features & hdr.INCOMPAT_DATA_FILE else self.metadata_map().find
        for ci in range(first_ci, last_ci + 1):
            entry, bitmap = self._entry(table, ci % l2e)
            off = entry & hdr.OFFSET_MASK
            in_place = None
            if self._mapped(entry) and entry & hdr.OFLAG_COPIED and not entry & hdr.OFLAG_COMPRESSED:
                if off % cs:
                    raise CorruptImage("Cluster allocation offset 0x%x unaligned (L2 offset: 0x%x, L2 index: 0x%x)"
                                       % (off, l2_off, ci % l2e), path=self.path, field="L2 table")
                if overlaps is not None and overlaps(off, cs) is not None:
                    self.check_overlap(off, cs)
                in_place = off
            plan.append((ci, in_place, entry, bitmap))
        releases = []
        i = 0
        while i < len(plan):
            ci, in_place, entry, bitmap = plan[i]
            if in_place is not None:
                self._write_cluster_in_place(table, ci, in_place, entry, bitmap, offset, end, data)
                i += 1
                continue
            # a run of clusters needing new host clusters: allocate them together, write them in one go
            j = i
            while j < len(plan) and plan[j][1] is None:
                j += 1
            count = j - i
            host = self._alloc_data(plan[i][0], count)
            segments = []          # (host offset, buffer): whole clusters are written from *data* itself
            run = None             # (host offset, data start, data end) of consecutive whole clusters
            for k in range(i, j):
                ci_k, dummy, entry_k, bitmap_k = plan[k]
                cstart = ci_k << cb
                a = max(offset, cstart)
                b = min(end, cstart + cs)
                new_host = host + (k - i) * cs
                if a == cstart and b - a == cs:
                    run = (run[0], run[1], b - offset) if run else (new_host, a - offset, b - offset)
                else:
                    if run:
                        segments.append((run[0], data[run[1]:run[2]]))
                        run = None
                    content = self._old_cluster_content(cstart)
                    content[a - cstart:b - cstart] = data[a - offset:b - offset]
                    segments.append((new_host, content))
                new_bitmap = 0
                if self.ext:
                    new_bitmap = self._bitmap_after_cow(entry_k, bitmap_k, a - cstart, b - cstart)
                if entry_k & (hdr.OFFSET_MASK | hdr.OFLAG_COMPRESSED) and self.data_file is None:
                    old_runs = self._cluster_runs(table, ci_k % l2e, cstart, l2_off)
                    releases.append(old_runs[0] if old_runs[0][2] == K_COMPRESSED else
                                    (cstart, cs, K_DATA, entry_k & hdr.OFFSET_MASK or None, entry_k))
                plan[k] = (ci_k, new_host, (new_host | hdr.OFLAG_COPIED), new_bitmap)
            if run:
                segments.append((run[0], data[run[1]:run[2]]))
            for seg_host, seg in segments:
                self._data_pwrite(seg, seg_host)
            for k in range(i, j):
                ci_k, new_host, new_entry, new_bitmap = plan[k]
                self._set_entry(table, ci_k % l2e, new_entry, new_bitmap)
            i = j
        self._write_l2_span(l2_off, table, first_ci % l2e, last_ci % l2e)
        for _s, _n, kind, host, entry in releases:
            if kind == K_COMPRESSED or host:
                self._release(kind, host, entry)

    def _write_new_clusters(self, l2_off: int, table: bytearray, first_cluster: int, first: int, count: int,
                            data: memoryview) -> None:
        """Whole clusters that were all unallocated (a new image being filled: convert's usual case)
        get one run of new host clusters, their data in one write, then their L2 entries, without a
        step per cluster; the order is the general path's (data before the entries that point to it)."""
        host = self._alloc_data(first_cluster, count)
        self._data_pwrite(data, host)
        start = host | hdr.OFLAG_COPIED
        entries = array("Q", range(start, start + count * self.cs, self.cs))
        if sys.byteorder == "little":
            entries.byteswap()
        table[first * 8:(first + count) * 8] = entries.tobytes()
        self._write_l2_span(l2_off, table, first, first + count - 1)

    def _alloc_data(self, first_cluster: int, count: int) -> int:
        """Host offset for *count* new guest clusters from *first_cluster* on: in a data file each
        sits at its guest offset, unrefcounted (QEMU's do_alloc_cluster_offset); otherwise the
        refcount allocator hands out a contiguous run of the image file."""
        if self.data_file is not None:
            return first_cluster << self.cb
        return self.refcounts.alloc(count)

    def _bitmap_after_cow(self, entry: int, bitmap: int, a: int, b: int) -> int:
        """Subcluster bitmap of a newly allocated cluster: the written and previously-data subclusters
        are allocated (their content was copied), the others keep their zero/unallocated state."""
        if entry & hdr.OFLAG_COMPRESSED:
            return ALL_ALLOC
        sc = self.sc
        touched = 0
        for s in range(a // sc, (b - 1) // sc + 1):
            touched |= 1 << s
        alloc = bitmap & ALL_ALLOC if self._mapped(entry) else 0
        zero = (bitmap >> 32) & ~touched
        return ((alloc | touched) & ALL_ALLOC) | (zero << 32)

    def _write_cluster_in_place(self, table, ci, host, entry, bitmap, offset, end, data) -> None:
        cs, cb, l2e = self.cs, self.cb, self.l2e
        cstart = ci << cb
        a = max(offset, cstart)
        b = min(end, cstart + cs)
        if not self.ext:
            if entry & hdr.OFLAG_ZERO:
                # a preallocated zero cluster: the rest of it must become real zeros
                content = bytearray(cs)
                content[a - cstart:b - cstart] = data[a - offset:b - offset]
                self._data_pwrite(content, host)
                self._set_entry(table, ci % l2e, host | hdr.OFLAG_COPIED)
            else:
                self._data_pwrite(data[a - offset:b - offset], host + a - cstart)
            return
        sc = self.sc
        alloc = bitmap & ALL_ALLOC
        zero = bitmap >> 32
        for s in range((a - cstart) // sc, (b - 1 - cstart) // sc + 1):
            bit = 1 << s
            s0 = cstart + s * sc
            sa, sb = max(a, s0), min(b, s0 + sc)
            if alloc & bit:
                self._data_pwrite(data[sa - offset:sb - offset], host + sa - cstart)
                continue
            if sa == s0 and sb == s0 + sc:
                content = bytearray(data[sa - offset:sb - offset])
            else:
                content = bytearray(sc) if zero & bit else bytearray(self._read_sub_old(s0, sc))
                content[sa - s0:sb - s0] = data[sa - offset:sb - offset]
            self._data_pwrite(content, host + s * sc)
            alloc |= bit
            zero &= ~bit
        self._set_entry(table, ci % l2e, entry, (alloc & ALL_ALLOC) | (zero << 32))

    def _read_sub_old(self, start: int, length: int) -> bytes:
        """Current content of an unallocated subcluster: the backing file's, or zeros."""
        n = max(0, min(length, self.virtual_size - start))
        data = self.read_backing(start, n) if n else b""
        return data + bytes(length - n)

    def _write_l2_span(self, l2_off: int, table: bytearray, first: int, last: int) -> None:
        es = 16 if self.ext else 8
        self.check_overlap(l2_off, self.cs, (metadata.ACTIVE_L2,))
        self.host.pwrite(bytes(table[first * es:(last + 1) * es]), l2_off + first * es)

    # -- compressed clusters ------------------------------------------------------------
    def _refuse_compressed_encryption(self) -> None:
        if self.crypto is not None:
            # qemu-img convert -c refuses an encrypted qcow2 output with this message (compressed clusters
            # would hold plaintext)
            raise UnsupportedFeature("Compression and encryption not supported at the same time", path=self.path,
                                     field="encrypt.format")

    def compress_block(self, data: bytes) -> Optional[bytes]:
        self._refuse_compressed_encryption()
        from . import compressed_write  # pylint: disable=import-outside-toplevel
        return compressed_write.compress_for_cluster(data, self.cs, self.header.compression_type)

    def write_compressed(self, offset: int, blocks) -> None:
        self._refuse_compressed_encryption()
        if self.data_file is not None:
            # qcow2.txt: an image with an external data file has no compressed clusters (qemu-img: ENOTSUP)
            raise UnsupportedFeature("Operation not supported: compressed clusters are not allowed with an "
                                     "external data file", path=self.path, field="data_file")
        from . import compressed_write  # pylint: disable=import-outside-toplevel
        compressed_write.write_compressed(self, offset, blocks)

    # -- zeroing and discarding -------------------------------------------------------
    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        if not length:
            return
        self._prepare_write(offset, length)
        end = offset + length
        gran = self.sc if self.ext else self.cs
        a = -(-offset // gran) * gran
        b = self.virtual_size if end == self.virtual_size else end // gran * gran
        if a >= b:
            self.write(offset, bytes(length))
            return
        if offset < a:
            self.write(offset, bytes(a - offset))
        if self.data_raw:
            self._zero_data_file(a, b - a)       # first, as QEMU: the raw view reads zeros there too
        if self.header.version < 3:
            self._zero_v2(a, b - a, unmap)
        else:
            self._change_entries(a, b - a, "zero", unmap)
        if b < end:
            self.write(b, bytes(end - b))

    @property
    def _has_backing(self) -> bool:
        """Whether unallocated clusters show a backing file (opened or not): zeroing must then be explicit."""
        return self.backing is not None or bool(self.backing_filename)

    def _zero_v2(self, offset: int, length: int, unmap: bool) -> None:
        """Version 2 has no zero flag: unallocated clusters without a backing file already read as zeros."""
        if not self._has_backing and unmap:
            self._change_entries(offset, length, "discard-v2", True)
            return
        chunk = 4 * 1024 * 1024
        for g, n, kind, _host, _e in list(self._segments(offset, length)):
            if kind == K_UNALLOC and not self._has_backing:
                continue
            for p in range(g, g + n, chunk):
                self.write(p, bytes(min(chunk, g + n - p)))

    def discard(self, offset: int, length: int) -> None:
        """Discard whole clusters (partial clusters are left alone, as QEMU does).

        Version 2 cannot say "zero" over a backing file, so there, as in QEMU, discard does nothing.
        """
        if not length:
            return
        self._prepare_write(offset, length)
        if self.header.version < 3 and self.backing_filename:
            return
        start = -(-offset // self.cs) * self.cs
        end = offset + length
        if end != self.virtual_size:
            end = end // self.cs * self.cs
        if start < end:
            if self.data_raw:
                self._zero_data_file(start, end - start)
            self._change_entries(start, end - start, "discard", True)

    def _change_entries(self, offset: int, length: int, op: str, unmap: bool) -> None:
        """Rewrite the L2 entries of whole clusters (or whole subclusters) for zero/discard operations."""
        cs, cb, l2e = self.cs, self.cb, self.l2e
        end = offset + length
        pos = offset
        span = l2e * cs
        while pos < end:
            l1i = pos // span
            stop = min(end, (l1i + 1) * span)
            if self._l2_offset(l1i) == 0 and (op == "full-discard" or not self._has_backing and op != "zero"):
                pos = stop
                continue
            if self._l2_offset(l1i) == 0 and not self._has_backing and op == "zero" and \
                    self.header.version >= 3 and not self.ext:
                pos = stop   # unallocated without a backing file already reads as zeros
                continue
            l2_off, table = self._writable_l2(l1i)
            releases = []
            partial_compressed = []   # compressed clusters have no subclusters: zeroed by writing zeros
            first = pos >> cb
            last = (stop - 1) >> cb
            for ci in range(first, last + 1):
                cstart = ci << cb
                a, b = max(pos, cstart), min(stop, cstart + cs)
                idx = ci % l2e
                entry, bitmap = self._entry(table, idx)
                off = entry & hdr.OFFSET_MASK
                compressed = bool(entry & hdr.OFLAG_COMPRESSED)
                copied = bool(entry & hdr.OFLAG_COPIED)
                whole = a == cstart and (b - a == cs or b == self.virtual_size)
                if self.ext and not whole and compressed:
                    if op == "zero":
                        partial_compressed.append((a, b))
                    continue
                if self.ext and not whole:
                    # whole subclusters inside the cluster
                    mask = 0
                    for s in range((a - cstart) // self.sc, (b - cstart + self.sc - 1) // self.sc):
                        mask |= 1 << s
                    alloc = bitmap & ALL_ALLOC & ~mask
                    zero = (bitmap >> 32) | mask
                    if op == "discard" and not self._has_backing and not self._mapped(entry):
                        zero = bitmap >> 32   # nothing there to discard
                    self._set_entry(table, idx, entry, alloc | ((zero & ALL_ALLOC) << 32))
                    continue
                new_entry, new_bitmap, release = self._new_entry(op, unmap, entry, bitmap, off, compressed, copied)
                self._set_entry(table, idx, new_entry, new_bitmap)
                if release:
                    releases.append(release)
            self._write_l2_span(l2_off, table, first % l2e, last % l2e)
            for kind, host, entry in releases:
                self._release(kind, host, entry)
            for a, b in partial_compressed:
                self.write(a, bytes(b - a))
            pos = stop

    def _new_entry(self, op, unmap, entry, bitmap, off, compressed, copied):
        """New (entry, bitmap, release) of a whole cluster for zero/discard."""
        allocated = compressed or self._mapped(entry)
        release = None
        if compressed:
            release = (K_COMPRESSED, None, entry)
        elif off and (unmap or not copied or op != "zero"):
            release = (K_DATA, off, entry)
        if op == "zero":
            keep = allocated and copied and not unmap and not compressed
            if self.ext:
                return (off | hdr.OFLAG_COPIED if keep else 0), ALL_ZERO, release
            return ((off | hdr.OFLAG_COPIED | hdr.OFLAG_ZERO) if keep else hdr.OFLAG_ZERO), 0, release
        if op in ("discard-v2", "full-discard"):
            return 0, 0, release
        # discard: v3 reads zeros afterwards where something was there or a backing file shows through
        if self._has_backing or allocated:
            if self.ext:
                return 0, ALL_ZERO, release
            if self.header.version >= 3:
                return hdr.OFLAG_ZERO, 0, release
            return 0, 0, release
        return entry, bitmap, None

    # -- metadata ---------------------------------------------------------------------
    def snapshots_table(self) -> List[Snapshot]:
        """The internal snapshots (parsed once, bounded by QEMU's table size limit)."""
        if self._snapshots is None:
            h = self.header
            if not h.nb_snapshots:
                self._snapshots = []
            else:
                size = min(MAX_TABLE_SIZE, max(0, self.host.size() - h.snapshots_offset))
                data = self.host.pread(size, h.snapshots_offset)
                self._snapshots = parse_snapshot_table(data, h.nb_snapshots, self.path, self.virtual_size)
        return self._snapshots

    def snapshots(self) -> List[Dict[str, Any]]:
        return [s.to_info() for s in self.snapshots_table()]

    # -- vdisk inspect --dump -----------------------------------------------------------
    def structures(self) -> List[Tuple[str, int, Any]]:
        """The header, each header extension's header (and the bitmaps extension), the bitmap
        directory entries and the first snapshot table entries, each at its file offset.  A
        corrupt directory or snapshot table is left out: the rest is still shown."""
        h = self.header
        out: List[Tuple[str, int, Any]] = [("header", 0, h.stored())]
        # the extension area ends where the backing file name starts
        area = self.host.pread(h.backing_file_offset or self.cs, 0)
        for pos, ext in hdr.extensions(area, h.stored_length):
            out.append(("header extension 0x%08x" % ext.type, pos, ext))
            payload = pos + hdr.ExtensionHeader.SIZE
            if ext.type == hdr.EXT_BITMAPS and h.bitmaps_extension is not None:
                out.append(("bitmaps extension", payload, h.bitmaps_extension))
            elif ext.type == hdr.EXT_CRYPTO_HEADER and h.crypto_header() is not None:
                out.append(("full disk encryption header pointer", payload, h.crypto_header()))
        try:
            out.extend(self._directory_structures())
            out.extend(self._snapshot_structures())
        except CorruptImage:
            pass
        return out

    def _directory_structures(self) -> List[Tuple[str, int, Any]]:
        out: List[Tuple[str, int, Any]] = []
        if bitmaps.present(self):
            entries, pos, dummy = bitmaps.read_directory(self, tables_in_file=False)
            for e in entries:
                out.append(("bitmap directory entry '%s'" % e.label, pos, e))
                pos += e.entry_size
        return out

    def _snapshot_structures(self) -> List[Tuple[str, int, Any]]:
        out: List[Tuple[str, int, Any]] = []
        pos = self.header.snapshots_offset
        for index, snap in enumerate(self.snapshots_table()[:DUMPED_SNAPSHOTS]):
            out.append(("snapshot table entry %d (id %s)" % (index, snap.id[:32]), pos, snap))
            pos += snap.entry_size
        return out

    def info(self) -> Dict[str, Any]:
        h = self.header
        data: Dict[str, Any] = {"compat": "1.1" if h.version >= 3 else "0.10",
                                "compression-type": hdr.COMPRESSION_NAMES.get(h.compression_type, "zlib")}
        if h.version >= 3:
            data["lazy-refcounts"] = bool(h.compatible_features & hdr.COMPAT_LAZY_REFCOUNTS)
            from .measure import bitmap_info  # pylint: disable=import-outside-toplevel
            listed = bitmap_info(self)
            if listed:
                data["bitmaps"] = listed
        data["refcount-bits"] = h.refcount_bits
        # qemu-img 7.2's text shows its dict in this order: the data file's name, the encrypt block, then data-file-raw
        if h.data_file:
            data["data-file"] = h.data_file
        if self.crypto is not None:
            data["encrypt"] = self.crypto.info()
        if h.data_file:
            data["data-file-raw"] = bool(h.autoclear_features & hdr.AUTOCLEAR_DATA_FILE_RAW)
        if h.version >= 3:
            data["corrupt"] = self.corrupt
            data["extended-l2"] = self.ext
        out: Dict[str, Any] = {"cluster-size": self.cs, "dirty-flag": self.dirty,
                               "format-specific": {"type": "qcow2", "data": data}}
        snaps = self.snapshots()
        if snaps:
            out["snapshots"] = snaps
        return out

    # -- persistent bitmaps (qemu-img bitmap) -----------------------------------------
    @property
    def supports_persistent_bitmaps(self) -> bool:
        return self.header.version >= 3

    def bitmap_editor(self) -> bitmaps.Editor:
        """The persistent bitmaps, to change them (``commit_bitmaps``) or, read-only, to merge
        from.  The bits earlier writes of this session set are stored first."""
        if self._bitmaps is not None:
            self._bitmaps.store()
        return bitmaps.Editor(self)

    def commit_bitmaps(self, editor: bitmaps.Editor) -> None:
        """Store what *editor* changed; later writes then track the bitmaps enabled now."""
        self._check_writable()
        editor.commit()
        self._bitmaps = bitmaps.Tracker.open(self)

    # -- snapshots --------------------------------------------------------------------
    def _check_snapshots_possible(self, name: str) -> None:
        self._check_writable()
        if self.data_file is not None:
            # qcow2.txt: no internal snapshots with an external data file (qemu-img: ENOTSUP)
            raise UnsupportedFeature("snapshot '%s': internal snapshots are not supported with an external data "
                                     "file (Operation not supported)" % name, path=self.path, field="snapshot")

    def create_snapshot(self, name: str) -> None:
        from . import snapshots  # pylint: disable=import-outside-toplevel
        self._check_snapshots_possible(name)
        snapshots.create_snapshot(self, name)

    def apply_snapshot(self, name: str) -> None:
        from . import snapshots  # pylint: disable=import-outside-toplevel
        self._check_snapshots_possible(name)
        if bitmaps.present(self):
            # QEMU's bdrv_snapshot_goto: the bitmaps would no longer describe the disk
            raise ImageError("Device has active dirty bitmaps", path=self.path, field="snapshot")
        snapshots.apply_snapshot(self, name)

    def delete_snapshot(self, name: str) -> None:
        from . import snapshots  # pylint: disable=import-outside-toplevel
        self._check_snapshots_possible(name)
        snapshots.delete_snapshot(self, name)

    def select_snapshot(self, ident: Optional[str] = None, name: Optional[str] = None) -> None:
        from . import snapshots  # pylint: disable=import-outside-toplevel
        if self.writable:
            raise ImageError("a snapshot is shown only on a read-only image", path=self.path, field="snapshot")
        if name is None and ident is not None:
            try:
                snap = snapshots.find_snapshot(self, ident)[1]
            except ImageError:
                raise ImageError("Failed to load snapshot: Can't find snapshot", path=self.path,
                                 field="snapshot") from None
        else:
            snap = snapshots.find_snapshot_exact(self, ident, name)
        # the disk keeps its current size, as in qemu-img convert -l: a smaller snapshot reads as
        # unallocated past its own L1 table
        self.l1 = snapshots.read_l1(self, snap.l1_table_offset, snap.l1_size)
        self._l2_cache.clear()
        self._compressed_cache = (-1, b"")

    def reload_state(self, l1: List[int], snaps) -> None:
        """Forget cached metadata after the header switched to a new state."""
        self.l1 = list(l1)
        self.virtual_size = self.header.size
        self._l2_cache.clear()
        self._compressed_cache = (-1, b"")
        self._snapshots = list(snaps)
        self.refcounts = Refcounts(self)

    # -- size -------------------------------------------------------------------------
    def set_size_field(self, size: int) -> None:
        """Write the virtual size into the header (after the L1 table covers it)."""
        self.header.size = size
        self.virtual_size = size
        self.host.pwrite(*self.header.pack_fields("size"))

    def grow_l1(self, entries: int) -> None:
        """Move the active L1 table to a larger area; the header switches in one write."""
        h = self.header
        if entries <= len(self.l1):
            return
        if entries * 8 > hdr.MAX_L1_SIZE:
            raise ImageError("Active L1 table too large", path=self.path, field="l1_size")
        old_offset, old_size = h.l1_table_offset, len(self.l1)
        new_l1 = self.l1 + [0] * (entries - len(self.l1))
        clusters = -(-entries * 8 // self.cs)
        new_offset = self.refcounts.alloc(clusters)
        self.host.pwrite(b"".join(U64.pack(e) for e in new_l1), new_offset)
        self.host.flush()
        h.l1_size, h.l1_table_offset = entries, new_offset
        self.host.pwrite(*h.pack_fields("l1_size", "l1_table_offset"))
        self.host.flush()
        self.l1 = new_l1
        if old_offset and old_size:
            self.refcounts.free(old_offset, old_size * 8)

    def resize(self, size: int, shrink: bool = False, preallocation: str = "off") -> None:
        self._check_writable()
        old = self.virtual_size
        size = -(-size // 512) * 512
        if size == old:
            return
        if size < old and not shrink:
            raise ImageError("Use the --shrink option to perform a shrink operation", path=self.path,
                             field="size")
        if size < old and preallocation != "off":
            raise ImageError("Preallocation can only be used for growing images", path=self.path,
                             field="preallocation")
        clusters = -(-size // self.cs)
        entries = -(-clusters // self.l2e)
        if entries * 8 > hdr.MAX_L1_SIZE:
            raise ImageError("The image size is too large for file format 'qcow2'", path=self.path, field="size")
        editor = None
        if bitmaps.present(self):
            editor = self.bitmap_editor()       # what earlier writes set is stored first
            editor.begin_resize()
            self._bitmaps = None                # the size change itself dirties nothing (QEMU's truncate)
        self._resize(old, size, preallocation)
        if editor is not None:
            editor.end_resize(size)
            self._bitmaps = bitmaps.Tracker.open(self)

    def _resize(self, old: int, size: int, preallocation: str) -> None:
        clusters = -(-size // self.cs)
        entries = -(-clusters // self.l2e)
        if size > old:
            self.grow_l1(entries)
            if self.data_file is not None:
                self._data().truncate(size)     # the data file follows the disk's size, as in QEMU
            self.set_size_field(size)
            # what lies between the old end and the end of its cluster, or what a longer backing file
            # holds past the old end, must read as zeros now
            tail = min(size, -(-old // self.cs) * self.cs)
            backing_end = min(size, self.backing.virtual_size) if self.backing is not None else 0
            zero_end = max(tail, backing_end)
            if zero_end > old:
                self.write_zeroes(old, zero_end - old)
            if self.data_raw and preallocation == "off":
                preallocation = "metadata"      # a raw data file maps every cluster, the new ones too
            if preallocation != "off":
                from .preallocation import preallocate  # pylint: disable=import-outside-toplevel
                preallocate(self, old, size - old, preallocation)
        else:
            # drop every whole cluster past the new end (the snapshots keep their own references)
            first = -(-size // self.cs) * self.cs
            if first < old:
                self._change_entries(first, old - first, "full-discard", True)
            self.set_size_field(size)
            if self.data_file is not None:
                self._data().truncate(size)
        self.flush()

    # -- backing file and options -----------------------------------------------------
    def set_backing(self, path: Optional[str], fmt: Optional[str]) -> None:
        """Rewrite the header with a new backing file name and format (nothing else changes)."""
        self._check_writable()
        h = self.header
        if path and self.data_raw:
            raise ImageError("Backing file and data-file-raw cannot be used at the same time", path=self.path,
                             field="backing_file")
        h.backing_file = path or None
        h.backing_format = (fmt or None) if path else None
        self.write_header()
        self.host.flush()
        self.backing_filename, self.backing_format = h.backing_file, h.backing_format

    def amend(self, options: Dict[str, Any], force: bool = False) -> None:
        self._check_writable()
        from .amend import amend as amend_options  # pylint: disable=import-outside-toplevel
        amend_options(self, options, force)

    def make_empty(self) -> None:
        """Unmap every cluster of the active layer so it reads from its backing file (commit)."""
        self._check_writable()
        if self.virtual_size:
            # the guest sees the same disk through the backing file the data went to: nothing is
            # dirty (QEMU's qcow2_make_empty discards below the block layer's dirty tracking)
            self._change_entries(0, self.virtual_size, "full-discard", True)
        self.host.flush()

    def check(self, repair: Optional[str] = None):
        self.open_data_file()       # qemu-img check opens it too: a missing data file is an error
        if repair:
            self._check_writable()
        from .check import check as check_image  # pylint: disable=import-outside-toplevel
        result = check_image(self, repair)
        if repair:
            self.refcounts = Refcounts(self)   # the refcount structure may have been rebuilt
        return result

    def mark_clean(self) -> None:
        """Clear the dirty and corrupt bits after a successful repair."""
        h = self.header
        if h.incompatible_features & (hdr.INCOMPAT_DIRTY | hdr.INCOMPAT_CORRUPT):
            h.incompatible_features &= ~(hdr.INCOMPAT_DIRTY | hdr.INCOMPAT_CORRUPT)
            self.host.flush()
            self._write_incompat()
            self.host.flush()
            self.dirty = self.corrupt = False

    def flush(self) -> None:
        if self.writable:
            if self._data_host is not None:
                self._data_host.flush()         # guest data before the metadata that points to it
            self.host.flush()

    def _close_files(self) -> None:
        if self._data_host is not None:
            self._data_host.close()
        self.host.close()

    def close(self) -> None:
        if self.host.fd < 0:
            return
        try:
            if self.writable:
                self.flush()
                if self._bitmaps is not None:
                    self._bitmaps.store()
                if self.dirty and self._set_dirty_on_write:
                    # refcounts are always kept up to date here, so a clean close may clear the bit
                    self.header.incompatible_features &= ~hdr.INCOMPAT_DIRTY
                    self._write_incompat()
                    self.host.flush()
                    self.dirty = False
        finally:
            self._close_files()
