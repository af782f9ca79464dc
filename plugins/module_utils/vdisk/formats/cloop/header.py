"""cloop on-disk structures: the version 2.0 header and the block offset table.

References: the cloop (compressed loop) v2 layout as QEMU 7.2 block/cloop.c reads it. A 128-byte
shell-script preamble, then big-endian ``block_size`` and ``n_blocks`` at offset 128, then
``n_blocks + 1`` big-endian 64-bit file offsets: block *i* is the zlib stream between offsets
*i* and *i+1* and inflates to exactly ``block_size`` bytes.

Parsing works on bytes; reading the file is the image's business.
"""
import array
import sys

from ...errors import CorruptImage, FormatError
from ...structure import Record, disk, record

MAGIC_V2 = (b"#!/bin/sh\n#V2.0 Format\n"
            b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
SECTOR = 512
MAX_BLOCK_SIZE = 64 * 1024 * 1024          # QEMU needs a buffer this big: it refuses more
MAX_N_BLOCKS = (0xFFFFFFFF - 1) // 8       # QEMU's guard against (n_blocks + 1) * 8 overflowing
MAX_OFFSETS_SIZE = 512 * 1024 * 1024       # QEMU: 16 TB at 256 KiB blocks
MAX_COMPRESSED_SIZE = 2 * MAX_BLOCK_SIZE   # a block that compressed badly, but not absurdly
OFFSET_MAX = (1 << 63) - 1                 # what a file offset can be


@record(">")
class Header(Record):
    """The v2 header, in its on-disk order (QEMU's names); the offset table follows it."""
    preamble: bytes = disk("128s", MAGIC_V2, shown="text")     # a shell script that mounts the image
    block_size: int = disk("I", 0, shown="hex")
    n_blocks: int = disk("I")

    @property
    def offsets_size(self) -> int:
        return (self.n_blocks + 1) * 8

    @property
    def virtual_size(self) -> int:
        return self.n_blocks * self.block_size


OFFSETS_START = Header.SIZE                # 136


def probe(header: bytes) -> bool:
    """The v2 preamble and a block size QEMU would accept (so a stray preamble stays raw)."""
    if header[:len(MAGIC_V2)] != MAGIC_V2 or len(header) < OFFSETS_START:
        return False
    h = Header.unpack(header)
    return 0 < h.block_size <= MAX_BLOCK_SIZE and h.block_size % SECTOR == 0 and h.n_blocks <= MAX_N_BLOCKS


def parse_header(buf: bytes, path: str) -> Header:
    """The header fields, validated in QEMU's order with its messages."""
    if len(buf) < OFFSETS_START:
        raise FormatError("cloop header is truncated (%d bytes)" % len(buf), path=path)
    h = Header.unpack(buf)
    block_size, n_blocks = h.block_size, h.n_blocks
    if block_size % SECTOR:
        raise FormatError("block_size %d must be a multiple of 512" % block_size, path=path, field="block_size")
    if block_size == 0:
        raise FormatError("block_size cannot be zero", path=path, field="block_size")
    if block_size > MAX_BLOCK_SIZE:
        raise FormatError("block_size %d must be %d MB or less" % (block_size, MAX_BLOCK_SIZE >> 20),
                          path=path, field="block_size")
    if n_blocks > MAX_N_BLOCKS:
        raise FormatError("n_blocks %d must be %d or less" % (n_blocks, MAX_N_BLOCKS), path=path, field="n_blocks")
    if h.offsets_size > MAX_OFFSETS_SIZE:
        raise FormatError("image requires too many offsets, try increasing block size", path=path,
                          field="n_blocks")
    return h


def parse_offsets(buf: bytes, n_blocks: int, path: str) -> "array.array[int]":
    """The ``n_blocks + 1`` block offsets: monotonic, no block over 128 MiB compressed."""
    offsets = array.array("Q", buf[:(n_blocks + 1) * 8])
    if sys.byteorder != "big":
        offsets.byteswap()
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1]:
            raise CorruptImage("offsets not monotonically increasing at index %d, image file is corrupt" % i,
                               path=path, field="offsets")
        if offsets[i] - offsets[i - 1] > MAX_COMPRESSED_SIZE:
            raise CorruptImage("invalid compressed block size at index %d, image file is corrupt" % i,
                               path=path, field="offsets")
    return offsets
