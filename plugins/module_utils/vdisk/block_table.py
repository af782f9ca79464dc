"""Images whose guest disk is cut into equal blocks, each stored whole at a host offset that a
table gives, or not stored at all (VDI, VHD, VHDX): the read path and the allocation status are
written once here, against the one question each format answers, ``_block_host(index)``."""
from typing import Iterator, Optional

from .driver import DATA, ZERO, Extent, Image, merge_runs, unit_pieces


class BlockTableImage(Image):
    """An image of equal blocks of ``self.bs`` bytes; an unstored block reads as zeros (these
    formats have no backing files, or read them themselves)."""

    bs = 0

    def _block_host(self, index: int) -> Optional[int]:
        """Host offset of the data of block *index*, None when the block is not stored."""
        raise NotImplementedError

    def _runs(self, offset: int, length: int) -> Iterator:
        """``(offset, length, host offset or None)``, host-contiguous runs merged."""
        return merge_runs(unit_pieces(offset, length, self.bs, self._block_host))

    def read(self, offset: int, length: int) -> bytes:
        self._check_range(offset, length)
        return b"".join(bytes(n) if host is None else self.host.pread(n, host)
                        for dummy, n, host in self._runs(offset, length))

    def read_into(self, offset: int, view: memoryview) -> None:
        """Read straight into the caller's buffer (convert's workers reuse theirs)."""
        view = view.cast("B") if view.format != "B" else view
        self._check_range(offset, len(view))
        pos = 0
        for dummy, n, host in self._runs(offset, len(view)):
            if host is None:
                view[pos:pos + n] = bytes(n)
            else:
                self.host.pread_into(view[pos:pos + n], host)
            pos += n

    def extents(self, offset: int = 0, length: Optional[int] = None) -> Iterator[Extent]:
        end = self._extent_end(offset, length)
        for start, n, host in self._runs(offset, max(0, end - offset)):
            yield Extent(start, n, ZERO) if host is None else Extent(start, n, DATA, host)
