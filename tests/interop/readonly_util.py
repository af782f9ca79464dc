"""Writers of the read-only formats' images (cloop v2, Bochs growing v1/v2, DMG/UDIF), faithful to
the layouts QEMU 7.2 reads (block/cloop.c, block/bochs.c, block/dmg.c), for interop, probing and
mutation tests; and the tools that make real ones where Debian packages them.

Every writer takes the guest bytes and returns the image bytes, so a test knows the content to
expect without a second reader.
"""
import base64
import bz2
import shutil
import struct
import zlib

import helpers

SECTOR = 512
CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
               b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")

# tool -> Debian package that provides it (for skip reasons and the CI's package list)
TOOLS = {"create_compressed_fs": "cloop-utils", "bximage": "bximage", "genisoimage": "genisoimage",
         "xorriso": "xorriso"}


def need_tool(name):
    """Skip (with the package to install) when the optional tool *name* is missing."""
    if shutil.which(name) is None:
        import pytest
        pytest.skip("%s not installed (Debian package %s)" % (name, TOOLS[name]))


def pattern_data(size, zero_ranges=()):
    """The fill pattern with some ranges zeroed (so writers can leave them out)."""
    data = bytearray(helpers.pattern(0, size))
    for start, length in zero_ranges:
        data[start:start + length] = bytes(length)
    return bytes(data)


# -- cloop ------------------------------------------------------------------------------------
def make_cloop(data, block_size=64 * 1024):
    """A cloop v2 image: preamble, block_size/n_blocks, n+1 offsets, zlib blocks (last padded)."""
    n = -(-len(data) // block_size)
    data = data.ljust(n * block_size, b"\0")
    head = CLOOP_MAGIC.ljust(128, b"\0") + struct.pack(">II", block_size, n)
    blocks = [zlib.compress(data[i * block_size:(i + 1) * block_size], 9) for i in range(n)]
    offsets = [len(head) + 8 * (n + 1)]
    for b in blocks:
        offsets.append(offsets[-1] + len(b))
    return head + struct.pack(">%dQ" % (n + 1), *offsets) + b"".join(blocks)


# -- bochs ------------------------------------------------------------------------------------
def make_bochs(data, extent=32 * 1024, version=2, size=None, reverse=True):
    """A Bochs growing redolog: extents with no non-zero sector are left unallocated, zero sectors
    have their bitmap bit clear; extents are stored in reverse order by default (so the catalog,
    not the position, decides)."""
    size = len(data) if size is None else size
    n = max(1, -(-size // extent))
    spe = extent // SECTOR
    bitmap_size = max(1, spe // 8)
    bitmap_blocks = -(-bitmap_size // SECTOR)
    catalog = [0xFFFFFFFF] * n
    stored = []
    for i in range(n):
        chunk = data[i * extent:(i + 1) * extent].ljust(extent, b"\0")
        bits = bytearray(bitmap_blocks * SECTOR)
        for s in range(spe):
            if any(chunk[s * SECTOR:(s + 1) * SECTOR]):
                bits[s // 8] |= 1 << (s % 8)
        if any(bits):
            stored.append((i, bytes(bits) + chunk))
    if reverse:
        stored.reverse()
    for pos, (i, dummy) in enumerate(stored):
        catalog[i] = pos
    head = struct.pack("<32s16s16sIIIII", b"Bochs Virtual HD Image", b"Redolog", b"Growing",
                       0x00020000 if version == 2 else 0x00010000, 512, n, bitmap_size, extent)
    head += struct.pack("<IQ", 0, size) if version == 2 else struct.pack("<Q", size)
    head = head.ljust(512, b"\0")
    return head + struct.pack("<%dI" % n, *catalog) + b"".join(blob for dummy, blob in stored)


# -- dmg --------------------------------------------------------------------------------------
UDZE, UDRW, UDIG, UDCO, UDZO, UDBZ, ULFO, UDCM, UDLE = (0, 1, 2, 0x80000004, 0x80000005, 0x80000006,
                                                        0x80000007, 0x7FFFFFFE, 0xFFFFFFFF)


def _payload(kind, raw):
    if kind == UDRW:
        return raw
    if kind == UDZO:
        return zlib.compress(raw)
    if kind == UDBZ:
        return bz2.compress(raw)
    if kind in (ULFO, UDCO):
        return b"bvx2" + bytes(12)      # a stand-in: vdisk reports the type before decoding anything
    return b""


def _mish(first_sector, chunks, data_offset):
    """A blkx table: *chunks* are ``(type, sector relative to the table, sectors, offset, length)``."""
    sectors = sum(c[2] for c in chunks)
    head = struct.pack(">IIQQQII", 0x6D697368, 1, first_sector, sectors, data_offset, 0, len(chunks))
    head = head.ljust(200, b"\0") + struct.pack(">I", len(chunks))
    return head + b"".join(struct.pack(">IIQQQQ", *c[:1], 0, *c[1:]) for c in chunks)


def make_dmg(data, layout, xml=True, tables=2):
    """A UDIF image of *data* (a multiple of 512): *layout* is ``[(type, sectors), ...]`` covering
    it in order; the chunks are split over *tables* blkx tables (each with its own first sector
    and data offset), ended by comment and last-entry chunks, described by an XML plist (*xml*)
    or a resource fork; zero/ignore chunks must cover zero bytes."""
    assert len(data) % SECTOR == 0 and sum(n for dummy, n in layout) * SECTOR == len(data)
    fork = bytearray()
    per = -(-len(layout) // tables)
    groups = [layout[i * per:(i + 1) * per] for i in range(tables) if layout[i * per:(i + 1) * per]]
    blkx = []
    sector = 0
    for group in groups:
        table_first = sector
        table_data = len(fork)
        entries = []
        rel = 0
        for kind, n in group:
            raw = data[sector * SECTOR:(sector + n) * SECTOR]
            payload = _payload(kind, raw)
            entries.append((kind, rel, n, len(fork) - table_data, len(payload)))
            fork += payload
            rel += n
            sector += n
        entries.append((UDCM, rel, 0, len(fork) - table_data, 0))
        entries.append((UDLE, rel, 0, len(fork) - table_data, 0))
        blkx.append(_mish(table_first, entries, table_data))
    data_len = len(fork)
    rsrc_off = rsrc_len = xml_off = xml_len = 0
    if xml:
        items = "".join("<dict><key>Attributes</key><string>0x0050</string><key>Data</key><data>\n%s\n</data>"
                        "<key>ID</key><string>%d</string><key>Name</key><string>part %d</string></dict>\n"
                        % ("\n".join("\t\t\t" + line for line in _wrap(base64.b64encode(t).decode(), 52)), i, i)
                        for i, t in enumerate(blkx))
        plst = base64.b64encode(bytes(range(40)) * 5).decode()
        text = ('<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" '
                '"http://www.apple.com/DTDs/PropertyList-1.0.dtd">\n<plist version="1.0">\n<dict>\n'
                '<key>resource-fork</key>\n<dict>\n<key>blkx</key>\n<array>\n%s</array>\n<key>plst</key>\n'
                '<array><dict><key>Data</key><data>%s</data></dict></array>\n</dict>\n</dict>\n</plist>\n'
                % (items, plst))
        xml_off, xml_len = len(fork), len(text)
        fork += text.encode()
    else:
        resources = b"".join(struct.pack(">I", len(r)) + r for r in blkx + [b"plst" + bytes(200)])
        header = struct.pack(">IIII", 256, 256 + len(resources), len(resources), 50).ljust(256, b"\0")
        rsrc_off, rsrc_len = len(fork), 256 + len(resources) + 50
        fork += header + resources + bytes(50)
    koly = struct.pack(">4sIIIQQQQQII16sII128sQQ120sII128sIQ12s", b"koly", 4, 512, 1, 0, 0, data_len,
                       rsrc_off, rsrc_len, 1, 1, bytes(16), 0, 0, bytes(128), xml_off, xml_len, bytes(120),
                       0, 0, bytes(128), 1, len(data) // SECTOR, bytes(12))
    return bytes(fork) + koly


def _wrap(text, width):
    return [text[i:i + width] for i in range(0, len(text), width)] or [""]


# -- files -------------------------------------------------------------------------------------
def write(path, blob):
    with open(str(path), "wb") as f:
        f.write(blob)
    return str(path)
