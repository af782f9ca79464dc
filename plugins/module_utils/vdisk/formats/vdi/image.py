"""An open VDI image: block map lookups, reads, allocating writes, check.

References: QEMU 7.2 block/vdi.c for behaviour. A block map entry below 0xfffffffe is the index of
a 1 MiB data block at ``offset_data + index * 1 MiB``; 0xffffffff (never written) and 0xfffffffe
(discarded) read as zeros. A new block takes index ``blocks_allocated``: the whole block is written
first (the guest data padded with zeros), then the header with the incremented count, then the block
map sector that points to it, so an interruption leaves at most an unreferenced block at the end.
"""
import array
import sys
from typing import Any, Dict, Iterator, Optional

from ...block_table import BlockTableImage
from ...driver import DATA, ZERO, CheckResult, Extent, Policy
from ...errors import CorruptImage, ImageError, UnsupportedFeature
from ...overlap import MetadataMap
from . import header as hdr
from .header import SECTOR


class VdiImage(BlockTableImage):
    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)
        self.driver = driver
        self._open_host(policy)

    def _open(self) -> None:
        file_size = self.host.size()
        h = hdr.parse_header(self.host.pread(hdr.HEADER_SIZE, 0), self.path)
        self.header = h
        self.bs = h.block_size
        self.virtual_size = h.virtual_size
        self.cluster_size = self.bs
        self.static = h.image_type == hdr.TYPE_STATIC
        # the map is held in memory (4 bytes a block, as QEMU does); a map that the file does not hold
        # is refused before anything is allocated, so a hostile block count costs no memory
        if h.offset_bmap + h.bmap_bytes > file_size:
            raise CorruptImage("the block map (%d entries at offset 0x%x) extends beyond the end of the file "
                               "(%d bytes)" % (h.blocks_in_image, h.offset_bmap, file_size), path=self.path,
                               field="blocks_in_image")
        self.bmap = array.array("I", self.host.pread(h.blocks_in_image * 4, h.offset_bmap))
        if sys.byteorder != "little":
            self.bmap.byteswap()
        used = [e for e in self.bmap if e < hdr.DISCARDED]
        self.max_used = max(used) if used else -1
        # guest data never goes over the header or the block map (a hostile offset_data)
        self.metadata = MetadataMap.from_ranges([("header", 0, hdr.HEADER_SIZE),
                                                 ("block map", h.offset_bmap, h.bmap_bytes)])

    # -- mapping ------------------------------------------------------------------------
    def _block_host(self, index: int) -> Optional[int]:
        entry = self.bmap[index] if index < len(self.bmap) else hdr.UNALLOCATED
        if not hdr.is_allocated(entry):
            return None
        return self.header.offset_data + entry * self.bs

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self._extent_end(offset, length)
        if end <= offset:
            return
        for start, n, host in self._runs(offset, end - offset):
            if host is None:
                yield Extent(start, n, ZERO)
            elif self.static:
                # QEMU looks through to the file for static images: holes there are known zeros
                for hstart, hn, is_data in self.host.data_extents(host, n):
                    yield Extent(start + hstart - host, hn, DATA, hstart, reads_zero=not is_data)
            else:
                yield Extent(start, n, DATA, host)

    # -- writes ---------------------------------------------------------------------------
    def write(self, offset: int, data) -> None:
        view = self._write_view(offset, data)
        end = offset + len(view)
        pos = offset
        allocated = []
        while pos < end:
            idx = pos // self.bs
            stop = min(end, (idx + 1) * self.bs)
            chunk = view[pos - offset:stop - offset]
            host = self._block_host(idx)
            if host is None:
                self._allocate_data(idx, pos % self.bs, chunk)
                allocated.append(idx)
            else:
                self.metadata.check(host, self.bs, self.path, field="offset_data")
                self.host.pwrite(chunk, host + pos % self.bs)
            pos = stop
        if allocated:
            self._commit_allocations(allocated)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        """Unallocated and discarded blocks already read as zeros: only allocated ones are written."""
        self._check_writable()
        self._check_range(offset, length)
        for start, n, host in self._runs(offset, length):
            if host is not None:
                pos = 0
                while pos < n:
                    k = min(4 * 1024 * 1024, n - pos)
                    self.metadata.check(host + pos, k, self.path, field="offset_data")
                    self.host.pwrite(bytes(k), host + pos)
                    pos += k

    def _allocate_data(self, idx: int, offset_in_block: int, chunk: memoryview) -> None:
        h = self.header
        new = h.blocks_allocated
        if new <= self.max_used:
            raise CorruptImage("the header counts %d allocated blocks but the block map uses block %d; run "
                               "'vdisk check'" % (new, self.max_used), path=self.path, field="blocks_allocated")
        if new >= hdr.DISCARDED:
            raise ImageError("no block index left to allocate", path=self.path, field="blocks_allocated")
        host = h.offset_data + new * self.bs
        self.metadata.check(host, self.bs, self.path, field="offset_data")
        # 1. the data.  A whole block is written as it is; a part of one past the end of the file is
        # written where it goes and the file extended over the rest, which reads as zeros (a hole);
        # only inside the file are the block's other bytes written as zeros
        if offset_in_block == 0 and len(chunk) == self.bs:
            self.host.pwrite(chunk, host)
        elif host >= self.host.size():
            self.host.pwrite(chunk, host + offset_in_block)
            if self.host.size() < host + self.bs:
                self.host.truncate(host + self.bs)
        else:
            block = bytearray(self.bs)
            block[offset_in_block:offset_in_block + len(chunk)] = chunk
            self.host.pwrite(block, host)
        self.bmap[idx] = new
        self.max_used = new
        h.blocks_allocated = new + 1

    def _commit_allocations(self, indexes) -> None:
        self.host.flush()
        self.host.pwrite(self.header.pack(), 0)        # 2. the header counting the new blocks
        self.host.flush()
        per_sector = SECTOR // 4                       # 3. the block map sectors pointing to them
        first, last = min(indexes) // per_sector, max(indexes) // per_sector
        entries = self.bmap[first * per_sector:min(len(self.bmap), (last + 1) * per_sector)]
        if sys.byteorder != "little":
            entries = array.array("I", entries)
            entries.byteswap()
        self.host.pwrite(entries.tobytes(), self.header.offset_bmap + first * SECTOR)

    # -- metadata ---------------------------------------------------------------------------
    def structures(self):
        return [("header", 0, self.header)]

    def info(self) -> Dict[str, Any]:
        return {"cluster-size": self.bs}

    def check(self, repair: Optional[str] = None) -> CheckResult:
        """qemu-img check for VDI: block indexes out of range or used twice, and the allocated count."""
        if repair:
            raise UnsupportedFeature("This image format does not support checks", path=self.path)
        res = CheckResult(self.path, "vdi")
        h = self.header
        owner: Dict[int, int] = {}
        count = 0
        for block, entry in enumerate(self.bmap):
            if not hdr.is_allocated(entry):
                continue
            if entry < h.blocks_in_image:
                count += 1
                if entry in owner:
                    # QEMU's message names the entry twice (it prints the map value it stored)
                    res.messages.append("ERROR: block index %d also used by %d" % (entry, entry))
                    res.corruptions += 1
                else:
                    owner[entry] = block
            else:
                res.messages.append("ERROR: block index %d too large, is %d" % (block, entry))
                res.corruptions += 1
        if count != h.blocks_allocated:
            res.messages.append("ERROR: allocated blocks mismatch, is %d, should be %d"
                                % (count, h.blocks_allocated))
            res.corruptions += 1
        return res
