"""An open Bochs growing image: catalog lookups, sector bitmaps, reads.

References: QEMU 7.2 block/bochs.c for behaviour. A sector is stored when its extent has a
catalog entry and the extent's bitmap has its bit set (bit ``s % 8`` of byte ``s // 8``); every
other sector reads as zeros. Anything past the end of the file reads as zeros, as QEMU's file
layer returns them.
"""
from typing import Any, Dict, Iterator, List, Optional, Tuple

from ...driver import Image, Policy
from ...structure import Record
from . import header as hdr
from .header import SECTOR


class BochsImage(Image):
    identity_mapped = False       # QEMU has no block status for bochs: all data, no host offset

    def __init__(self, driver, path: str, writable: bool, policy: Policy):
        super().__init__(path, writable)       # never writable: the driver has no "write" capability
        self.driver = driver
        self.dirty = None        # qemu-img shows no dirty flag for bochs
        self._open_host(policy)

    def _open(self) -> None:
        h = hdr.parse_header(self.host.pread(hdr.HEADER_SIZE, 0), self.path)
        self.header = h
        self.file_size = self.host.size()
        # at most 4 MiB (MAX_CATALOG entries); entries past the end of the file read as zeros as in QEMU
        self.catalog = hdr.parse_catalog(self._pread(h.catalog * 4, h.header))
        self.extent = h.extent
        self.stride = SECTOR * (h.extent_blocks + h.bitmap_blocks)
        self.virtual_size = h.virtual_size

    def _pread(self, length: int, offset: int) -> bytes:
        """File bytes, zeros past its end (also at offsets too large for the OS)."""
        if offset >= self.file_size:
            return bytes(length)
        return self.host.pread(length, offset)

    def _bitmap_offset(self, index: int) -> Optional[int]:
        entry = self.catalog[index]
        if entry == hdr.UNALLOCATED:
            return None
        return (self.header.data_offset + entry * self.stride) & ((1 << 64) - 1)

    def _runs(self, offset: int, length: int) -> Iterator[Tuple[int, int, Optional[int]]]:
        """``(offset, length, host offset or None)`` over sector runs of one extent at a time."""
        end = offset + length
        bitmap_bytes = self.header.bitmap_blocks * SECTOR
        while offset < end:
            index, inside = divmod(offset, self.extent)
            n = min(end - offset, self.extent - inside)
            base = self._bitmap_offset(index)
            if base is None:
                yield offset, n, None
                offset += n
                continue
            first, last = inside // SECTOR, (inside + n - 1) // SECTOR
            bits = self._pread(last // 8 - first // 8 + 1, base + first // 8)
            data = base + bitmap_bytes
            pos = offset
            for run_first, run_last, stored in _bit_runs(bits, first, last):
                run_end = min(offset + n, offset - inside + (run_last + 1) * SECTOR)
                yield pos, run_end - pos, (data + pos - (offset - inside)) if stored else None
                pos = run_end
            offset += n

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        parts: List[bytes] = []
        for dummy, n, host in self._runs(offset, length):
            parts.append(bytes(n) if host is None else self._pread(n, host))
        return b"".join(parts)

    def structures(self) -> List[Tuple[str, int, Record]]:
        """The header (``vdisk inspect --dump``)."""
        return [("header", 0, self.header)]

    def info(self) -> Dict[str, Any]:
        return {}


def _bit_runs(bits: bytes, first: int, last: int) -> Iterator[Tuple[int, int, bool]]:
    """Runs ``(first sector, last sector, stored)`` of sectors *first*..*last* of an extent, given
    the bitmap bytes from byte ``first // 8`` on."""
    base = first // 8 * 8
    start = first
    state = bool(bits[0] >> (first % 8) & 1)
    for s in range(first + 1, last + 1):
        bit = bool(bits[(s - base) // 8] >> (s % 8) & 1)
        if bit != state:
            yield start, s - 1, state
            start, state = s, bit
    yield start, last, state
