"""An open Parallels image: BAT lookups, reads, allocating writes, the in-use flag, check.

References: QEMU docs/interop/parallels.txt. Behaviour follows QEMU 7.2's parallels driver:
a read-write open marks the header "in use" (0x746F6E59) and a clean close clears it; an image
left in use is refused for writing until ``check -r all``; new clusters are appended at the end
of the data area, data first, then the BAT entry that points to it, so an interruption leaves
at most space leaked at the end of the file; a clean close truncates the file to the data end.
"""
import array
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...driver import DATA, UNALLOCATED, CheckResult, Extent, Image, Policy, merge_runs
from ...errors import CorruptImage, ImageError, UnsupportedFeature
from ...overlap import MetadataMap
from ...structure import Record
from . import header as hdr
from .header import SECTOR

MAX_BAT_IN_MEMORY = 64 * 1024 * 1024   # bytes of BAT read at most (the rest lies beyond the end of file)


class ParallelsImage(Image):
    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self.dirty = None          # qemu-img info shows no dirty flag for parallels
        self.repairing = policy.repair      # a file left unclean opens only for check -r
        self._open_host(policy)

    # -- open -------------------------------------------------------------------------
    def _open(self) -> None:
        file_size = self.host.size()
        h = hdr.parse_header(self.host.pread(min(file_size, hdr.HEADER_SIZE), 0), self.path)
        self.header = h
        self.cs = h.cluster_size
        self.tracks = h.tracks
        self.mult = h.off_multiplier
        self.virtual_size = h.virtual_sectors * SECTOR
        # entries past the end of the file read as zero (unallocated): read only what the file holds
        in_file = max(0, min(h.nb_bat_entries, (file_size - hdr.HEADER_SIZE) // 4, MAX_BAT_IN_MEMORY // 4))
        self.bat = array.array("I", self.host.pread(in_file * 4, hdr.HEADER_SIZE))
        if sys.byteorder != "little":
            self.bat.byteswap()
        data_end = h.data_off or -(-hdr.bat_offset(h.nb_bat_entries) // SECTOR)
        top = max(self.bat) if self.bat else 0
        if top:
            data_end = max(data_end, top * self.mult + self.tracks)
        self.data_end = data_end            # sectors
        # guest data never goes over the header or the BAT (a hostile BAT entry): the shared overlap check
        self.metadata = MetadataMap.from_ranges([("header", 0, hdr.HEADER_SIZE),
                                                 ("BAT", hdr.HEADER_SIZE, 4 * h.nb_bat_entries)])
        self.unclean = h.in_use == hdr.INUSE_MAGIC
        self.bitmaps: List[hdr.DirtyBitmap] = []
        if h.ext_off:
            if self.writable:
                raise UnsupportedFeature("images with a Parallels Format Extension (dirty bitmaps) can only be "
                                         "opened read-only", path=self.path, field="ext_off")
            ext = h.ext_off * SECTOR
            if ext + self.cs > file_size:
                raise CorruptImage("Failed to read Format Extension cluster: offset 0x%x is beyond the end of the "
                                   "file" % ext, path=self.path, field="ext_off")
            self.bitmaps = hdr.parse_format_extension(self.host.pread(self.cs, ext), self.cs, h.virtual_sectors,
                                                      self.path)
        if self.writable:
            if self.unclean and not self.repairing:
                raise CorruptImage("parallels: Image was not closed correctly; cannot be opened read/write",
                                   path=self.path, field="in_use")
            self._set_inuse(hdr.INUSE_MAGIC)

    def _set_inuse(self, value: int) -> None:
        self.header.in_use = value
        self.host.pwrite(*self.header.pack_fields("in_use"))
        self.host.flush()

    # -- mapping ----------------------------------------------------------------------
    def bat_entry(self, index: int) -> int:
        return self.bat[index] if index < len(self.bat) else 0

    def host_offset(self, index: int) -> int:
        """Host byte offset of cluster *index*, 0 when unallocated."""
        if index >= self.header.nb_bat_entries:
            return 0
        return self.bat_entry(index) * self.mult * SECTOR

    def _runs(self, offset: int, length: int):
        """Yield ``(offset, length, host offset or 0)``, host-contiguous runs merged."""
        return merge_runs(self._pieces(offset, length), is_host=bool)

    def _pieces(self, offset: int, length: int):
        end = offset + length
        mapped_end = min(self.header.nb_bat_entries, len(self.bat)) * self.cs   # nothing is mapped past it
        while offset < end:
            idx = offset // self.cs
            if offset >= mapped_end:
                n, host = end - offset, 0
            else:
                n = min(end, (idx + 1) * self.cs) - offset
                host = self.host_offset(idx)
                host = host + offset % self.cs if host else 0
            yield offset, n, host
            offset += n

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts = []
        for start, n, host in self._runs(offset, length):
            parts.append(self.host.pread(n, host) if host else self.read_backing(start, n))
        return b"".join(parts)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self._extent_end(offset, length)
        if end <= offset:
            return
        for start, n, host in self._runs(offset, end - offset):
            yield Extent(start, n, DATA, host) if host else Extent(start, n, UNALLOCATED)

    # -- writes -----------------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        view = self._write_view(offset, data)
        end = offset + len(view)
        pos = offset
        while pos < end:
            idx = pos // self.cs
            if self.host_offset(idx):
                stop = min(end, (idx + 1) * self.cs)
                host = self.host_offset(idx) + pos % self.cs
                self.metadata.check(host, stop - pos, self.path, field="BAT")
                self.host.pwrite(view[pos - offset:stop - offset], host)
                pos = stop
                continue
            # a run of unallocated clusters: written in one piece at the end of the data area
            last = idx
            while (last + 1) * self.cs < end and not self.host_offset(last + 1):
                last += 1
            self._allocate(idx, last, pos, view[pos - offset:min(end, (last + 1) * self.cs) - offset])
            pos = min(end, (last + 1) * self.cs)

    def _allocate(self, first: int, last: int, offset: int, data: memoryview) -> None:
        count = last - first + 1
        start = first * self.cs
        buf = bytearray(self.read_backing(start, count * self.cs) if self.backing else bytes(count * self.cs))
        buf[offset - start:offset - start + len(data)] = data
        # a new cluster starts at a multiple of the BAT unit
        if last >= self.header.nb_bat_entries or len(self.bat) < self.header.nb_bat_entries:
            raise CorruptImage("the BAT does not cover guest offset %d (it has %d entries, %d in the file)"
                               % (offset, self.header.nb_bat_entries, len(self.bat)), path=self.path, field="BAT")
        # never below the BAT (a hostile data_off); a new cluster starts at a multiple of the BAT unit
        pos = max(self.data_end, -(-hdr.bat_offset(self.header.nb_bat_entries) // SECTOR))
        pos = -(-pos // self.mult) * self.mult
        if (pos + count * self.tracks) // self.mult > 0xFFFFFFFF:
            raise ImageError("the image file cannot grow beyond what its BAT can address", path=self.path,
                             field="BAT")
        self.host.pwrite(buf, pos * SECTOR)
        entries = array.array("I", ((pos + i * self.tracks) // self.mult for i in range(count)))
        self.bat[first:last + 1] = entries
        if sys.byteorder != "little":
            entries.byteswap()
        self.host.pwrite(entries.tobytes(), hdr.bat_offset(first))
        self.data_end = pos + count * self.tracks

    # -- metadata ---------------------------------------------------------------------
    def structures(self) -> List[Tuple[str, int, Record]]:
        """The header and, when there is one, the Format Extension's header."""
        out: List[Tuple[str, int, Record]] = [("header", 0, self.header)]
        if self.header.ext_off:
            at = self.header.ext_off * SECTOR
            ext = hdr.ExtensionHeader.unpack(self.host.pread(hdr.ExtensionHeader.SIZE, at))
            out.append(("format extension", at, ext))
        return out

    def info(self) -> Dict[str, Any]:
        return {}

    def check(self, repair: Optional[str] = None) -> CheckResult:
        from .check import check
        if repair:
            self._check_writable()
        return check(self, repair)

    def _close_writes(self) -> None:
        self.host.flush()
        if self.host.size() > self.data_end * SECTOR:
            self.host.truncate(self.data_end * SECTOR)
        self._set_inuse(0)
