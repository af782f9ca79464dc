"""Block status of an image's guest view, as QEMU's block layer reports it to qemu-img.

``compare`` (its strict mode prints the first offset where two images' status differs) and
``measure`` (it counts the clusters that hold data) decide from the flags QEMU's
``bdrv_block_status_above`` gives for a whole backing chain.  This module derives the same
flags from the engine's :meth:`Image.extents`:

* DATA: the range holds data somewhere in the chain; ZERO: it reads as zeros (zero clusters,
  holes of a raw file, data clusters over host holes, past the end of a backing file, an
  unallocated range with no backing file);
* ALLOCATED: some layer of the chain decides the content (not so for ranges unallocated in
  every layer, which read as zeros);
* OFFSET_VALID: the range maps to a known host offset (not for compressed clusters or zero
  clusters without a host cluster);
* EOF: the run reaches the end of the image.  QEMU's runs stop where a layer's mapping
  changes (host discontinuity, one L2 table's range in qcow2), so two images with equal
  content can still differ here: QEMU's strict compare reports it, and so do we.

QEMU rounds an image's length up to whole 512-byte sectors (a 1000-byte raw file is 1024
bytes long); the added tail reads as zeros.
"""
from typing import Iterator, Optional, Tuple

from ..driver import UNALLOCATED, ZERO, Image

SECTOR = 512

# flag values as QEMU's BDRV_BLOCK_* bits, so a debug print reads the same as in QEMU
S_DATA = 0x01
S_ZERO = 0x02
S_OFFSET_VALID = 0x04
S_ALLOCATED = 0x10
S_EOF = 0x20

Run = Tuple[int, int, int]      # (guest offset, length, flags without S_EOF)


def guest_length(image: Image) -> int:
    """The image's length as QEMU sees it: the virtual size rounded up to whole sectors."""
    return -(-image.virtual_size // SECTOR) * SECTOR


def status_runs(image: Image, offset: int = 0, length: Optional[int] = None) -> Iterator[Run]:
    """``(offset, length, flags)`` runs covering ``[offset, offset+length)`` of *image*'s chain,
    up to :func:`guest_length`; S_EOF is left to the caller (a run reaching the end has it)."""
    size = guest_length(image)
    end = size if length is None else min(size, offset + length)
    if end <= offset:
        return
    inside = max(0, min(end, image.virtual_size) - offset)
    if inside:
        yield from _layer_runs(image, offset, inside)
    if offset + inside < end:
        # the sector tail past an unaligned end: QEMU's file driver reports a trailing hole
        yield offset + inside, end - offset - inside, S_ZERO | S_OFFSET_VALID | S_ALLOCATED


def _layer_runs(image: Image, offset: int, length: int) -> Iterator[Run]:
    span = image.driver.status_span(image)
    for ext in image.extents(offset, length):
        for start, n in _split(ext.offset, ext.length, span):
            if ext.kind == UNALLOCATED:
                yield from _below(image, start, n, ext.host_offset is not None)
            elif ext.kind == ZERO:
                yield start, n, S_ZERO | S_ALLOCATED | (S_OFFSET_VALID if ext.host_offset is not None else 0)
            elif ext.compressed:
                yield start, n, S_DATA | S_ALLOCATED
            elif ext.reads_zero:
                yield start, n, S_DATA | S_ZERO | S_OFFSET_VALID | S_ALLOCATED
            else:
                yield start, n, S_DATA | S_OFFSET_VALID | S_ALLOCATED


def _below(image: Image, start: int, n: int, has_host: bool) -> Iterator[Run]:
    """An unallocated range of *image*: the backing file decides, zeros past its end."""
    backing = image.backing
    if backing is None:
        # nothing below: zeros, and QEMU does not count the range as allocated
        yield start, n, S_ZERO | (S_OFFSET_VALID if has_host else 0)
        return
    inside = max(0, min(start + n, backing.virtual_size) - start)
    if inside:
        yield from _layer_runs(backing, start, inside)
    if inside < n:
        # a short backing file: QEMU treats the zeros past its end as allocated there
        yield start + inside, n - inside, S_ZERO | S_ALLOCATED


def _split(offset: int, length: int, span: Optional[int]) -> Iterator[Tuple[int, int]]:
    if not span:
        yield offset, length
        return
    end = offset + length
    while offset < end:
        n = min(span - offset % span, end - offset)
        yield offset, n
        offset += n


def allocated_bytes(image: Image, cluster_size: int) -> int:
    """Bytes of the *cluster_size* clusters that hold data (qemu-img measure's "required" data).

    A cluster counts when any part of it is data that does not read as zero anywhere in the
    chain; zero, unallocated and past-the-backing-end ranges do not count.
    """
    total = 0
    counted_until = 0      # clusters below this offset are already counted
    for start, n, flags in status_runs(image):
        if flags & S_ZERO or not (flags & S_DATA and flags & S_ALLOCATED):
            continue
        first = max(start // cluster_size * cluster_size, counted_until)
        last = -(-(start + n) // cluster_size) * cluster_size
        if last > first:
            total += last - first
            counted_until = last
    return total
