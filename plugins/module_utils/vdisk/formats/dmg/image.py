"""An open DMG image: the chunk table in memory, one expanded chunk cached, reads.

References: QEMU 7.2 block/dmg.c for behaviour: raw chunks are copied, zero and ignore chunks
read as zeros, zlib and bzip2 chunks must expand to exactly their sector count; a sector no chunk
covers cannot be read. QEMU reads lzfse and ADC chunks only with optional modules; vdisk has no
decoder for them and says so when such a chunk is read.
"""
import bisect
import bz2
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ... import deflate_codecs
from ...driver import DATA, Extent, Image, Policy
from ...errors import CorruptImage, FormatError, UnsupportedFeature
from ...structure import Record
from . import header as hdr
from .header import SECTOR


class DmgImage(Image):
    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)       # never writable: the driver has no "write" capability
        self.driver = driver
        self.dirty = None        # qemu-img shows no dirty flag for dmg
        self._open_host(policy)

    def _open(self) -> None:
        size = self.host.size()
        if size < hdr.KOLY_SIZE:
            raise FormatError("dmg file must be at least 512 bytes long", path=self.path)
        start = hdr.tail_window(size)
        at = hdr.find_koly(self.host.pread(min(size, hdr.KOLY_SEARCH), start), start)
        if at is None:
            raise FormatError("Could not locate UDIF trailer in dmg file", path=self.path)
        k = hdr.parse_koly(self.host.pread(hdr.KOLY_SIZE, at), at, self.path)
        self.koly = k
        self.koly_offset = at
        self.virtual_size = k.sector_count * SECTOR
        # the tables lie before the trailer (checked above), so they cost at most the file's size
        if k.rsrc_fork_length:
            tables = hdr.resource_fork_tables(self.host.pread, k.rsrc_fork_offset, k.rsrc_fork_length, self.path)
        elif k.xml_length > hdr.XML_MAX:
            raise CorruptImage("XML property list length %d is larger than max (%d)" % (k.xml_length, hdr.XML_MAX),
                               path=self.path, field="XMLLength")
        else:
            tables = hdr.plist_tables(self.host.pread(k.xml_length, k.xml_offset), self.path)
        chunks: List[hdr.Chunk] = []
        for table in tables:
            chunks.extend(hdr.parse_mish(table, k.data_fork_offset, len(chunks), self.path))
        # chunks covering no sector are never read; the others are searched by first sector
        chunks = sorted((c for c in chunks if c.sectors), key=lambda c: c.sector)
        self.chunks = chunks
        self._starts = [c.sector for c in chunks]
        self._cached: Optional[hdr.Chunk] = None
        self._cached_data = b""

    # -- mapping ------------------------------------------------------------------------
    def _chunk_at(self, sector: int) -> hdr.Chunk:
        i = bisect.bisect_right(self._starts, sector) - 1
        if i >= 0:
            c = self.chunks[i]
            if sector < c.sector + c.sectors:
                return c
        raise CorruptImage("no chunk covers sector %d" % sector, path=self.path)

    def _expand(self, c: hdr.Chunk) -> bytes:
        """A data chunk's guest bytes (``sectors * 512``)."""
        if c is self._cached:
            return self._cached_data
        want = c.sectors * SECTOR
        if c.type in hdr.DATA_TYPES and c.offset + c.length > hdr.INT64_MAX:
            raise CorruptImage("%s chunk at sector %d lies beyond the largest file offset (0x%x)"
                               % (hdr.TYPE_NAMES[c.type], c.sector, c.offset), path=self.path)
        if c.type == hdr.UDRW:
            data = self.host.pread(min(c.length, want), c.offset).ljust(want, b"\0")
        elif c.type in (hdr.UDZO, hdr.UDBZ):
            raw = self.host.pread(c.length, c.offset)
            d = deflate_codecs.decompressobj() if c.type == hdr.UDZO else bz2.BZ2Decompressor()
            try:
                data = d.decompress(raw, want)
            except deflate_codecs.errors() + (OSError, EOFError, ValueError) as exc:
                raise CorruptImage("%s chunk at offset 0x%x could not be decompressed: %s"
                                   % (hdr.TYPE_NAMES[c.type], c.offset, exc), path=self.path) from None
            if not d.eof or len(data) != want:
                raise CorruptImage("%s chunk at offset 0x%x does not expand to %d bytes"
                                   % (hdr.TYPE_NAMES[c.type], c.offset, want), path=self.path)
        else:
            raise UnsupportedFeature("unsupported chunk type %s (0x%08x) at sector %d"
                                     % (hdr.TYPE_NAMES.get(c.type, "unknown"), c.type, c.sector),
                                     path=self.path, field="chunk type")
        self._cached, self._cached_data = c, data
        return data

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts = []
        end = offset + length
        while offset < end:
            c = self._chunk_at(offset // SECTOR)
            chunk_start = c.sector * SECTOR
            n = min(end, chunk_start + c.sectors * SECTOR) - offset
            if c.type in hdr.ZERO_TYPES:
                parts.append(bytes(n))
            else:
                inside = offset - chunk_start
                parts.append(self._expand(c)[inside:inside + n])
            offset += n
        return b"".join(parts)

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        # QEMU has no block status for dmg: all data, no host offset (as qemu-img map shows it)
        end = self._extent_end(offset, length)
        if end > offset:
            yield Extent(offset, end - offset, DATA)

    def structures(self) -> List[Tuple[str, int, Record]]:
        """The koly trailer and, when the chunk tables are resources, the resource fork's header."""
        out: List[Tuple[str, int, Record]] = [("koly trailer", self.koly_offset, self.koly)]
        k = self.koly
        if k.rsrc_fork_length:
            raw = self.host.pread(hdr.ResourceForkHeader.SIZE, k.rsrc_fork_offset)
            out.append(("resource fork header", k.rsrc_fork_offset, hdr.ResourceForkHeader.unpack(raw)))
        return out

    def info(self) -> Dict[str, Any]:
        return {}
