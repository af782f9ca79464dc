"""An open cloop image: the offset table in memory, one inflated block cached, reads.

References: QEMU 7.2 block/cloop.c for behaviour: the table is validated on open; a block must
inflate (zlib stream) to exactly ``block_size`` bytes, or the read fails; the most recent block
is kept, as sequential reads touch each block many times.
"""
from typing import Any, Dict, List, Tuple

from ... import deflate_codecs
from ...driver import Image, Policy
from ...errors import CorruptImage
from ...structure import Record
from . import header as hdr


class CloopImage(Image):
    identity_mapped = False       # QEMU has no block status for cloop: all data, no host offset

    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)       # never writable: the driver has no "write" capability
        self.driver = driver
        self.dirty = None        # qemu-img shows no dirty flag for cloop
        self._open_host(policy)

    def _open(self) -> None:
        h = hdr.parse_header(self.host.pread(hdr.OFFSETS_START, 0), self.path)
        # QEMU would read a table past the end of the file as zeros; a table the file does not hold
        # is refused before it is read, so a hostile n_blocks costs no memory
        file_size = self.host.size()
        if hdr.OFFSETS_START + h.offsets_size > file_size:
            raise CorruptImage("the offset table (%d entries) extends beyond the end of the file (%d bytes)"
                               % (h.n_blocks + 1, file_size), path=self.path, field="n_blocks")
        self.header = h
        self.offsets = hdr.parse_offsets(self.host.pread(h.offsets_size, hdr.OFFSETS_START), h.n_blocks,
                                         self.path)
        self.block_size = h.block_size
        self.virtual_size = h.virtual_size
        self._cached_index = -1
        self._cached = b""

    def _block(self, index: int) -> bytes:
        """Block *index* inflated; exactly ``block_size`` bytes or an error."""
        if index != self._cached_index:
            start, end = self.offsets[index], self.offsets[index + 1]
            if end > hdr.OFFSET_MAX:
                raise CorruptImage("block %d lies beyond the largest file offset (0x%x)" % (index, start),
                                   path=self.path)
            data = self.host.pread(end - start, start)
            d = deflate_codecs.decompressobj()
            try:
                out = d.decompress(data, self.block_size)
            except deflate_codecs.errors() as exc:
                raise CorruptImage("block %d at offset 0x%x could not be decompressed: %s" % (index, start, exc),
                                   path=self.path) from None
            if not d.eof or len(out) != self.block_size:
                raise CorruptImage("block %d at offset 0x%x does not inflate to %d bytes"
                                   % (index, start, self.block_size), path=self.path)
            self._cached_index, self._cached = index, out
        return self._cached

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts = []
        end = offset + length
        while offset < end:
            index, inside = divmod(offset, self.block_size)
            n = min(end - offset, self.block_size - inside)
            parts.append(self._block(index)[inside:inside + n])
            offset += n
        return b"".join(parts)

    def structures(self) -> List[Tuple[str, int, Record]]:
        """The header (``vdisk inspect --dump``)."""
        return [("header", 0, self.header)]

    def info(self) -> Dict[str, Any]:
        return {}
