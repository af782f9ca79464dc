"""QED L1 and L2 tables as stored: ``table_size`` clusters of little-endian 64-bit offsets.

Shared by the image (lookups, allocating writes) and the check (repairs), neither of which owns
the layout of a table.
"""
import array
import sys
from typing import Iterable


def unpack_table(raw: bytes) -> array.array:
    """The entries of a table read from the file."""
    t = array.array("Q", raw)
    if sys.byteorder != "little":
        t.byteswap()
    return t


def pack_table(entries: Iterable[int]) -> bytes:
    """*entries* (a whole table, or a run of entries for a partial write) as stored."""
    t = array.array("Q", entries)
    if sys.byteorder != "little":
        t.byteswap()
    return t.tobytes()
