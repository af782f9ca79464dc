"""The qcow2 on-disk structures as declared records (formats/qcow2 with structure.py): their layouts
are the spec's, each record packs back to the bytes it was read from, vdisk writes cluster 0 as
qemu-img does, partial header writes land on the spec's offsets, and ``vdisk inspect --dump`` shows
a qemu-written image's header, extensions, bitmap directory and snapshot table."""
import os
import struct

import pytest

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import bitmaps as bm
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2.snapshot_table import (
    Snapshot, SnapshotExtra, pack_snapshot_table, parse_snapshot_table)
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.inspect import dump_structures

MiB = 1024 * 1024

# (field, offset, width) of docs/interop/qcow2.txt "Header"
SPEC_HEADER = [("magic", 0, 4), ("version", 4, 4), ("backing_file_offset", 8, 8), ("backing_file_size", 16, 4),
               ("cluster_bits", 20, 4), ("size", 24, 8), ("crypt_method", 32, 4), ("l1_size", 36, 4),
               ("l1_table_offset", 40, 8), ("refcount_table_offset", 48, 8), ("refcount_table_clusters", 56, 4),
               ("nb_snapshots", 60, 4), ("snapshots_offset", 64, 8), ("incompatible_features", 72, 8),
               ("compatible_features", 80, 8), ("autoclear_features", 88, 8), ("refcount_order", 96, 4),
               ("header_length", 100, 4), ("compression_type", 104, 1)]


def test_header_layout_is_the_spec_s():
    assert [(n, hdr.Header.offset(n), hdr.Header.LAYOUT.structs[n].size) for n in hdr.Header.LAYOUT.names] == \
        SPEC_HEADER
    assert (hdr.HEADER_V2_LENGTH, hdr.HEADER_V3_LENGTH, hdr.HEADER_V3_WRITTEN_LENGTH) == (72, 104, 112)
    assert hdr.Header().header_length == hdr.HEADER_V3_WRITTEN_LENGTH
    assert hdr.HeaderV2.LAYOUT.names == hdr.Header.LAYOUT.names[:13]


@pytest.mark.parametrize("fields, offset", [(("size",), 24), (("l1_size", "l1_table_offset"), 36),
                                            (("refcount_table_offset", "refcount_table_clusters"), 48),
                                            (("nb_snapshots", "snapshots_offset"), 60),
                                            (("incompatible_features",), 72), (("compatible_features",), 80),
                                            (("autoclear_features",), 88)])
def test_partial_header_writes_land_on_the_spec_s_offsets(fields, offset):
    h = hdr.Header(size=5 * MiB, l1_size=3, l1_table_offset=0x30000, refcount_table_offset=0x10000,
                   refcount_table_clusters=1, nb_snapshots=2, snapshots_offset=0x50000, incompatible_features=1,
                   compatible_features=1, autoclear_features=2)
    data, where = h.pack_fields(*fields)
    assert where == offset
    assert data == h.pack()[offset:offset + len(data)]


@pytest.mark.parametrize("options", ["compat=1.1", "compat=0.10", "cluster_size=2M,refcount_bits=1",
                                     "extended_l2=on,refcount_bits=64"])
def test_cluster0_packs_back_byte_for_byte(tmp_path, options):
    """vdisk's header, extensions and backing file name for a qemu-img image are qemu-img's bytes."""
    base = str(tmp_path / "base.qcow2")
    path = str(tmp_path / "a.qcow2")
    helpers.qemu_img("create", "-q", "-f", "qcow2", base, "1M", check=True)
    helpers.qemu_img("create", "-q", "-f", "qcow2", "-o", options, "-b", base, "-F", "qcow2", path, "4M",
                     check=True)
    with open(path, "rb") as f:
        data = f.read(2 * MiB)
    h = hdr.parse_header(data, path, os.path.getsize(path))
    packed = hdr.pack_header(h)
    assert packed == data[:len(packed)]
    assert h.stored().SIZE == (72 if "0.10" in options else 105)


@pytest.mark.parametrize("record", [
    hdr.ExtensionHeader(hdr.EXT_BITMAPS, 24),
    hdr.FeatureNameEntry(2, 1, b"raw external data".ljust(46, b"\0")),
    hdr.BitmapsExtension(nb_bitmaps=3, bitmap_directory_size=96, bitmap_directory_offset=0x20000),
    hdr.CryptoHeaderPointer(0x30000, 2 * MiB),
    SnapshotExtra(1 << 40, 5 * MiB, -1),
])
def test_fixed_records_round_trip(record):
    raw = record.pack()
    assert len(raw) == type(record).SIZE
    assert type(record).unpack(b"\xaa" + raw, 1) == record


def test_bitmap_directory_entry_round_trip():
    entry = bm.BitmapEntry(b"daily", 0x40000, 2, bm.FLAG_AUTO, 16)
    raw = entry.pack()
    assert len(raw) == entry.entry_size == 32
    assert raw[:24] == struct.pack(">QIIBBHI", 0x40000, 2, bm.FLAG_AUTO, 1, 16, 5, 0)
    assert raw[24:] == b"daily\0\0\0"
    back = bm.parse_directory(raw, 1, 65536, 1 << 30)[0]
    assert back == entry
    assert back.table_offset == 0x40000
    assert back.table_size == 2


def test_snapshot_entry_round_trip_keeps_unknown_extra_data():
    extra = struct.pack(">QQq", 7, 3 * MiB, 9) + b"future!!"
    entry = struct.pack(">QIHHIIQII", 0x70000, 1, 1, 4, 1234, 5678, 999, 7, len(extra)) + extra + b"1" + b"name"
    entry += bytes(-len(entry) % 8)
    (snap,) = parse_snapshot_table(entry, 1, "x", MiB)
    assert (snap.id, snap.name, snap.disk_size, snap.extra_fields.icount) == ("1", "name", 3 * MiB, 9)
    assert snap.entry_size == len(entry) and pack_snapshot_table([snap]) == entry


def test_snapshot_extra_data_absent_fields_take_their_defaults():
    # a version 2 entry without extra data: the 32-bit VM state size, the image's size, no icount
    entry = struct.pack(">QIHHIIQII", 0x70000, 1, 1, 1, 0, 0, 0, 4096, 0) + b"1" + b"a"
    entry += bytes(-len(entry) % 8)
    (snap,) = parse_snapshot_table(entry, 1, "x", 2 * MiB)
    assert snap.extra_fields == SnapshotExtra(4096, 2 * MiB, -1)
    assert snap.to_info()["vm-state-size"] == 4096 and "icount" not in snap.to_info()
    repacked = snap.pack()            # rewritten with QEMU's 24 bytes of extra data
    assert Snapshot.unpack(repacked).extra_data_size == 24 and snap.extra_data_size == 24
    assert repacked[40:64] == struct.pack(">QQq", 4096, 2 * MiB, -1)


def test_unpack_present_reads_only_the_stored_length():
    data = hdr.Header(incompatible_features=8, compression_type=1, header_length=104).pack()
    h = hdr.unpack_present(hdr.Header, data, 104)
    assert h.incompatible_features == 8 and h.compression_type == hdr.COMPRESSION_ZLIB
    v2 = hdr.unpack_present(hdr.Header, data[:72], 72, header_length=72)
    assert (v2.incompatible_features, v2.refcount_order, v2.header_length) == (0, 4, 72)


def test_dump_of_a_qemu_written_image(tmp_path):
    path = str(tmp_path / "a.qcow2")
    helpers.qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", path, "4M", check=True)
    helpers.qemu_img("bitmap", "--add", path, "b0", check=True)
    helpers.qemu_img("snapshot", "-c", "first", path, check=True)
    with open(path, "rb") as f:
        data = f.read()
    lines = dump_structures(path, "qcow2")
    titles = [line for line in lines if not line.startswith(" ")]
    assert titles[0] == "header (Header, 105 bytes at 0x0):"
    assert any(t.startswith("bitmaps extension (BitmapsExtension, 24 bytes at 0x") for t in titles)
    entry = [t for t in titles if t.startswith("bitmap directory entry 'b0'")]
    snapshot = [t for t in titles if t.startswith("snapshot table entry 0")]
    assert entry and snapshot
    dir_offset = int(entry[0].rsplit(" ", 1)[1].rstrip("):"), 16)
    snap_offset = int(snapshot[0].rsplit(" ", 1)[1].rstrip("):"), 16)
    assert snap_offset == struct.unpack_from(">Q", data, 64)[0]
    assert data[dir_offset + 24:dir_offset + 26] == b"b0"
    assert "  0x58       autoclear_features       0x1" in lines
