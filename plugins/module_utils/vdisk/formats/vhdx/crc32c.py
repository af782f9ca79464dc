"""CRC-32C (Castagnoli), the checksum of VHDX headers, region tables and log entries.

Pure Python, table-driven, slicing by 8: about 10 MB/s, plenty for the 4 KiB headers, the
64 KiB region table and the log entries (at most the log's size) it is used for.
"""
import struct

POLY = 0x82F63B78          # reflected Castagnoli polynomial


def _tables():
    first = []
    for n in range(256):
        c = n
        for dummy in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        first.append(c)
    tables = [first]
    for dummy in range(7):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ first[prev[n] & 0xFF] for n in range(256)])
    return tables


_T = _tables()
_Q = struct.Struct("<%dQ" % 512)        # 4 KiB at a time


def crc32c(data, crc: int = 0) -> int:
    """CRC-32C of *data*, continuing from *crc* (the result of an earlier call)."""
    t0, t1, t2, t3, t4, t5, t6, t7 = _T[0], _T[1], _T[2], _T[3], _T[4], _T[5], _T[6], _T[7]
    view = memoryview(data).cast("B")
    crc ^= 0xFFFFFFFF
    n = len(view)
    pos = 0
    while n - pos >= 4096:
        for word in _Q.unpack_from(view, pos):
            x = crc ^ (word & 0xFFFFFFFF)
            hi = word >> 32
            crc = (t7[x & 0xFF] ^ t6[(x >> 8) & 0xFF] ^ t5[(x >> 16) & 0xFF] ^ t4[x >> 24]
                   ^ t3[hi & 0xFF] ^ t2[(hi >> 8) & 0xFF] ^ t1[(hi >> 16) & 0xFF] ^ t0[hi >> 24])
        pos += 4096
    for b in view[pos:]:
        crc = t0[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def checksum(buf, at: int = 4) -> int:
    """The CRC-32C of *buf* with its 4 checksum bytes at *at* counted as zeros (VHDX's rule)."""
    view = memoryview(buf).cast("B")
    crc = crc32c(view[:at])
    crc = crc32c(b"\0\0\0\0", crc)
    return crc32c(view[at + 4:], crc)
