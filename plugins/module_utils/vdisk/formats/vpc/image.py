"""An open VHD image: fixed (raw data + footer) or dynamic (BAT, sector bitmaps, data blocks).

References: Microsoft's VHD specification; QEMU 7.2 block/vpc.c for behaviour. The footer is
looked for at offset 0 (dynamic disks keep a copy there) and then in the last 512 bytes (fixed
disks); its checksum must match. Reads of a dynamic disk go by the BAT only, as QEMU's do (sector
bitmaps are not consulted). A new block is placed where the footer is at the end of the file:
its bitmap and data are written first (the rest of the block stays a hole, zeros), then the footer
at the new end, then the BAT entry, so an interruption leaves at most an unreferenced block. A write
into a block sets the bitmap bits of the sectors it covers, so Virtual PC and Hyper-V see the data.
"""
import array
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...block_table import BlockTableImage
from ...driver import DATA, Extent, Policy
from ...errors import CorruptImage, FormatError, ImageError
from ...overlap import MetadataMap
from ...structure import Record
from . import header as hdr
from .header import SECTOR


class VpcImage(BlockTableImage):
    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self._open_host(policy)

    def _open(self) -> None:
        file_size = self.host.size()
        buf = self.host.pread(hdr.FOOTER_SIZE, 0)
        self.fixed = False
        if not buf.startswith(hdr.COOKIE):
            if file_size < hdr.FOOTER_SIZE:
                raise FormatError("File too small for a VHD header", path=self.path, field="footer")
            buf = self.host.pread(hdr.FOOTER_SIZE, file_size - hdr.FOOTER_SIZE)
            if not buf.startswith(hdr.COOKIE):
                raise FormatError("invalid VPC image", path=self.path, field="footer")
            self.fixed = True
        self.footer_offset = file_size - hdr.FOOTER_SIZE if self.fixed else 0
        self.footer_bytes = bytes(buf)
        f = hdr.parse_footer(buf, self.path)
        self.footer = f
        sectors = f.virtual_sectors
        if sectors > hdr.MAX_SECTORS:
            raise CorruptImage("Could not open: File too large (%d sectors, at most %d)" % (sectors, hdr.MAX_SECTORS),
                               path=self.path, field="current_size")
        self.virtual_size = sectors * SECTOR
        # data beyond the end of the data area would overwrite the footer
        self.data_end = file_size - hdr.FOOTER_SIZE
        if self.fixed:
            return
        # a dynamic disk: the dynamic header, the BAT, the blocks after it
        doff = f.data_offset
        if doff > hdr.INT64_MAX - hdr.DYN_HEADER_SIZE:      # QEMU cannot even issue that read
            raise FormatError("Error reading dynamic VHD header (offset 0x%x)" % doff, path=self.path,
                              field="data_offset")
        # past the end of the file reads as zeros, which then lack the magic
        dbuf = self.host.pread(hdr.DYN_HEADER_SIZE, doff) if doff < file_size else bytes(hdr.DYN_HEADER_SIZE)
        d = hdr.parse_dyn_header(dbuf, sectors, self.path)
        self.dyn = d
        self.bs = d.block_size
        self.cluster_size = self.bs
        # qemu-img convert detects zeros per 4 KiB in a VHD (no write-zeroes alignment), leaving holes
        # inside the blocks it allocates
        self.allocation_unit = 4096
        self.bitmap_size = d.bitmap_size
        self.bat_offset = d.table_offset
        entries = d.max_table_entries
        bat_end = -(-(self.bat_offset + entries * 4) // SECTOR) * SECTOR
        # checked before anything is read, so the BAT held in memory is never larger than the file
        if bat_end > file_size:
            raise CorruptImage("block-vpc: free_data_block_offset points after the end of file. The image has "
                               "been truncated.", path=self.path, field="table_offset")
        self.bat = array.array("I", self.host.pread(entries * 4, self.bat_offset))
        if sys.byteorder != "big":
            self.bat.byteswap()
        free = bat_end
        top = max((e for e in self.bat if e != hdr.BAT_UNUSED), default=None)
        if top is not None:
            free = max(free, top * SECTOR + self.bitmap_size + self.bs)
        if free > file_size:
            raise CorruptImage("block-vpc: free_data_block_offset points after the end of file. The image has "
                               "been truncated.", path=self.path, field="BAT")
        self.free = free                         # where the next block goes (the footer is there)
        # guest data never goes over the footer copy, the dynamic header or the BAT (a hostile BAT entry)
        self.metadata = MetadataMap.from_ranges([("footer copy", 0, hdr.FOOTER_SIZE),
                                                 ("dynamic header", doff, hdr.DYN_HEADER_SIZE),
                                                 ("BAT", self.bat_offset, bat_end - self.bat_offset)])
        self.bitmaps: Dict[int, bytearray] = {}  # sector bitmaps of blocks written through this image

    # -- mapping ------------------------------------------------------------------------
    def _block_host(self, index: int) -> Optional[int]:
        """Host offset of the data of block *index*, None when unallocated."""
        if index >= len(self.bat) or self.bat[index] == hdr.BAT_UNUSED:
            return None
        return self.bat[index] * SECTOR + self.bitmap_size

    def _runs(self, offset: int, length: int):
        """``(offset, length, host offset or None)``, host-contiguous runs merged."""
        if self.fixed:
            return iter([(offset, length, offset)])
        return super()._runs(offset, length)

    def host_range(self, offset: int, length: int):
        if self.fixed and offset + length <= min(self.virtual_size, self.data_end):
            return self.host, offset
        return None

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self._extent_end(offset, length)
        if end <= offset:
            return
        if self.fixed:
            # QEMU looks through to the file: holes there are known zeros
            for start, n, is_data in self.host.data_extents(offset, end - offset):
                yield Extent(start, n, DATA, start, reads_zero=not is_data)
            return
        yield from super().extents(offset, end - offset)

    # -- writes ---------------------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        view = self._write_view(offset, data)
        if self.fixed:
            if offset + len(view) > self.data_end:
                raise CorruptImage("the footer claims %d bytes but the file holds %d before its footer"
                                   % (self.virtual_size, self.data_end), path=self.path, field="current_size")
            self.host.pwrite(view, offset)
            return
        end = offset + len(view)
        pos = offset
        while pos < end:
            idx = pos // self.bs
            stop = min(end, (idx + 1) * self.bs)
            chunk = view[pos - offset:stop - offset]
            if self._block_host(idx) is None:
                self._allocate(idx, pos % self.bs, chunk)
            else:
                self._write_block(idx, pos % self.bs, chunk)
            pos = stop

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Unallocated blocks of a dynamic disk already read as zeros: only allocated ranges are written."""
        self._check_writable()
        self._check_range(offset, length)
        for start, n, host in self._runs(offset, length):
            if host is None:
                continue
            pos = 0
            while pos < n:
                k = min(4 * 1024 * 1024, n - pos)
                self.write(start + pos, bytes(k))
                pos += k

    def _write_block(self, idx: int, in_block: int, chunk: memoryview) -> None:
        base = self.bat[idx] * SECTOR
        self.metadata.check(base, self.bitmap_size + self.bs, self.path, field="BAT")
        self.host.pwrite(chunk, base + self.bitmap_size + in_block)
        bitmap = self.bitmaps.get(idx)
        if bitmap is None:
            bitmap = self.bitmaps[idx] = bytearray(self.host.pread(self.bitmap_size, base))
        first, last = in_block // SECTOR, (in_block + len(chunk) - 1) // SECTOR
        span = bitmap[first >> 3:(last >> 3) + 1]
        if span.count(0xFF) == len(span):       # every sector already marked (blocks vdisk allocates)
            return
        changed = False
        for s in range(first, last + 1):        # bit 7 of byte 0 is the block's first sector
            mask = 0x80 >> (s & 7)
            if not bitmap[s >> 3] & mask:
                bitmap[s >> 3] |= mask
                changed = True
        if changed:
            lo, hi = first >> 3, (last >> 3) + 1
            self.host.pwrite(bytes(bitmap[lo:hi]), base + lo)

    def _allocate(self, idx: int, in_block: int, chunk: memoryview) -> None:
        start = self.free
        if start // SECTOR >= hdr.BAT_UNUSED:
            raise ImageError("the image file cannot grow beyond what its BAT can address", path=self.path,
                             field="BAT")
        self.metadata.check(start, 1, self.path, field="BAT")
        size = self.bitmap_size + self.bs
        file_size = self.host.size()
        # bitmap (every sector in use, as qemu-img writes it) and data; the rest of the block is written
        # as zeros only where the file already has bytes (anything but the old footer there would
        # otherwise show through); past the end of the file it is a hole
        old_bytes = min(size, file_size - start)
        if old_bytes > self.bitmap_size:
            buf = bytearray(max(old_bytes, self.bitmap_size + in_block + len(chunk)))
            buf[:self.bitmap_size] = b"\xff" * self.bitmap_size
            buf[self.bitmap_size + in_block:self.bitmap_size + in_block + len(chunk)] = chunk
            self.host.pwrite(buf, start)
        else:
            self.host.pwrite(b"\xff" * self.bitmap_size, start)
            self.host.pwrite(chunk, start + self.bitmap_size + in_block)
        self.bitmaps[idx] = bytearray(b"\xff" * self.bitmap_size)
        self.free = start + size
        self.host.flush()
        self.host.pwrite(self.footer_bytes, self.free)                  # the footer at the new end
        self.data_end = self.free
        self.host.flush()
        self.bat[idx] = start // SECTOR
        self.host.pwrite((start // SECTOR).to_bytes(4, "big"), self.bat_offset + 4 * idx)

    # -- metadata ---------------------------------------------------------------------------
    def structures(self) -> List[Tuple[str, int, Record]]:
        """The footer read at open; a dynamic disk's dynamic header, used parent locator entries and
        the footer at the end of the file (the one Microsoft's tools read), as stored."""
        if self.fixed:
            return [("footer", self.footer_offset, self.footer)]
        doff = self.footer.data_offset
        out: List[Tuple[str, int, Record]] = [("footer copy", 0, self.footer), ("dynamic header", doff, self.dyn)]
        for i in range(hdr.PARENT_LOCATORS):
            entry = self.dyn.locator_entry(i)
            if entry.used:
                out.append(("parent locator entry %d" % (i + 1), doff + self.dyn.locator_offset(i), entry))
        if self.data_end > 0:
            out.append(("footer", self.data_end, hdr.Footer.unpack(self.host.pread(hdr.FOOTER_SIZE, self.data_end))))
        return out

    def info(self) -> Dict[str, Any]:
        return {} if self.fixed else {"cluster-size": self.bs}
