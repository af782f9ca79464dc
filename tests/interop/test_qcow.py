"""qcow (version 1) against qemu-img 7.2: what is specific to qcow (the shared tests are in
test_format_conformance): compressed clusters, other geometries, backing files, commit, layout.

Both directions: images qemu-img converts (also ``convert -c``) and qemu-io writes read
byte-identically through vdisk (unaligned sizes, the last sector, backing files); images vdisk
converts and writes pass ``qemu-img compare`` and are byte-identical to qemu-img's where both
write the same thing (qcow has no random fields: mtime is 0), so cluster and L2 allocation follow
QEMU's layout.  qemu-img has no check for qcow (exit 63), so none is asserted.
"""
import json
import os
import struct

import pytest

import helpers
import imgfmt_util as u
from conformance import BY_NAME
from helpers import MiB, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow import header as hdr

FMT = "qcow"
KiB = 1024
QCOW = BY_NAME[FMT]
qemu_create, vdisk_create, info_json, qemu_convert_c = QCOW.qemu_create, QCOW.vdisk_create, QCOW.info, QCOW.convert_c


def same_file(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def map_json(path, tool):
    if tool == "qemu":
        return json.loads(helpers._txt(helpers.qemu_img("map", "--output=json", "-f", FMT, path, check=True).stdout))
    return json.loads(u.vdisk("map", "--output=json", "-f", FMT, path, check=True).stdout)


def base_raw(tmp_path, size=3 * MiB):
    return helpers.make_raw(tmp_path / "base.raw", size, [(0, size)])


def test_resize_unsupported_like_qemu(tmp_path):
    path = qemu_create(tmp_path / "q.qcow", "1M")
    assert helpers.qemu_img("resize", "-f", FMT, path, "2M").returncode == 1
    v = u.vdisk("resize", "-f", FMT, path, "2M")
    assert v.returncode == 1
    assert "does not support resize" in v.stderr


# -- qemu writes, vdisk reads -------------------------------------------------------------------
def fill_extents(size):
    wanted = [(0, 3000), (MiB - 700, 70000), (2 * MiB + 4096, 8192), (size // 2 + 77, 1000), (size - 512, 512)]
    return [(o, min(n, size - o)) for o, n in wanted if 0 <= o < size]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("size", u.cells([12345, 5 * MiB + 512, 40 * MiB], (5 * MiB + 512,)))
def test_qemu_converted_reads_identically(tmp_path, size, compress):
    vsize = -(-size // 512) * 512
    raw = helpers.make_raw(tmp_path / "src.raw", vsize, fill_extents(vsize))
    path = str(tmp_path / "q.qcow")
    if compress:
        qemu_convert_c(raw, path)
    else:
        helpers.run("qemu-img", "convert", "-f", "raw", "-O", FMT, raw, path)
    with open(raw, "rb") as f:
        assert u.read_all(path, FMT) == f.read()
    assert info_json(path, "vdisk") == info_json(path, "qemu")
    assert map_json(path, "vdisk") == map_json(path, "qemu")
    # and vdisk's own convert writes the same file, byte for byte
    mine = str(tmp_path / "v.qcow")
    u.vdisk("convert", *(["-c"] if compress else []), "-f", "raw", "-O", FMT, raw, mine, check=True)
    assert same_file(path, mine)


def test_qemu_io_writes_read_identically(tmp_path):
    size = 7 * MiB + 512                          # unaligned to the cluster: the last cluster is short
    path = qemu_create(tmp_path / "q.qcow", size)
    helpers.qemu_io(FMT, path, "write -P 0x11 0 4k", "write -P 0x22 1536 1k", "write -P 0x33 %d 9000" % (MiB - 17),
                    "write -P 0x44 %d 512" % (size - 512), "write -z %d 4k" % (3 * MiB))
    u.assert_same_as_qemu(path, FMT, tmp_path)
    img = u.open_image(path, FMT)
    try:
        assert img.read(size - 512, 512) == b"\x44" * 512
    finally:
        img.close()
    assert map_json(path, "vdisk") == map_json(path, "qemu")


@pytest.mark.parametrize("geometry", u.cells([(9, 6), (16, 13), (12, 9), (16, 6)], ((16, 6),)),
                         ids=lambda g: "c%d-l%d" % g)
def test_other_geometries_read_like_qemu(tmp_path, geometry):
    cluster_bits, l2_bits = geometry
    # qemu-img create picks two geometries; QEMU opens any in its bounds: poke them into an empty image
    size = 6 * MiB
    path = qemu_create(tmp_path / "q.qcow", size)
    u.poke(path, 32, bytes([cluster_bits, l2_bits]))
    l1 = hdr.l1_entries(size, cluster_bits, l2_bits)
    with open(path, "r+b") as f:
        f.truncate(48 + 8 * l1)
        f.seek(48)
        f.write(bytes(8 * l1))
    helpers.qemu_io(FMT, path, "write -P 0x61 0 3k", "write -P 0x62 %d 70k" % (2 * MiB - 5000),
                    "write -P 0x63 %d 512" % (size - 512))
    u.assert_same_as_qemu(path, FMT, tmp_path)
    u.write_engine(path, FMT, [(3 * MiB + 100, pattern(3 * MiB + 100, 100000)), (1024, pattern(1024, 4000))])
    u.assert_same_as_qemu(path, FMT, tmp_path)
    helpers.qemu_io(FMT, path, "read -P 0x62 %d 60k" % (2 * MiB - 5000))


def test_backing_file_chain_reads_like_qemu(tmp_path):
    base = base_raw(tmp_path)
    path = qemu_create(tmp_path / "ov.qcow", 4 * MiB, backing_file="base.raw", backing_fmt="raw")
    helpers.qemu_io(FMT, path, "write -P 0x55 1000 3000", "write -P 0x66 %d 512" % (4 * MiB - 512))
    assert info_json(path, "vdisk") == info_json(path, "qemu")
    u.assert_same_as_qemu(path, FMT, tmp_path)       # past the backing file's end: zeros
    data = u.read_all(path, FMT)
    with open(base, "rb") as f:
        b = f.read()
    assert data[:512] == b[:512]
    assert data[4096:3 * MiB] == b[4096:3 * MiB]
    assert data[3 * MiB:4 * MiB - 512] == bytes(MiB - 512)
    assert map_json(path, "vdisk") == map_json(path, "qemu")


# -- vdisk writes, qemu reads -------------------------------------------------------------------
def test_vdisk_writes_lay_out_like_qemu(tmp_path):
    # the same writes through qemu-io and vdisk give the same file: L2 tables allocated on demand and
    # clusters appended at the end of the file as QEMU does
    size = 9 * MiB + 512
    writes = [(0, 4096), (2 * MiB + 4096, 12288), (MiB, 512), (size - 512, 512), (4096, 8192), (8 * MiB, 4096)]
    q = qemu_create(tmp_path / "q.qcow", size)
    helpers.qemu_io(FMT, q, *("write -P 0x%x %d %d" % (i + 1, o, n) for i, (o, n) in enumerate(writes)))
    v = vdisk_create(tmp_path / "v.qcow", size)
    u.write_engine(v, FMT, [(o, bytes([i + 1]) * n) for i, (o, n) in enumerate(writes)])
    assert same_file(q, v)


def test_vdisk_writes_into_compressed_and_qemu_reads(tmp_path):
    size = 3 * MiB
    raw = helpers.make_raw(tmp_path / "src.raw", size, [(0, size)])
    path = str(tmp_path / "c.qcow")
    qemu_convert_c(raw, path)
    writes = [(100, pattern(7, 50)), (8192, b"\x01" * 4096), (MiB - 10, b"\x02" * 20), (size - 1, b"\x03")]
    u.write_engine(path, FMT, writes)
    with open(raw, "r+b") as f:
        for o, d in writes:
            f.seek(o)
            f.write(d)
    assert helpers.qemu_compare(path, raw, FMT, "raw")
    with open(raw, "rb") as f:
        assert u.read_all(path, FMT) == f.read()


def test_vdisk_overlay_and_convert_with_backing(tmp_path):
    base = base_raw(tmp_path)
    path = vdisk_create(tmp_path / "ov.qcow", 4 * MiB, backing_file="base.raw", backing_fmt="raw")
    writes = [(700, b"\x09" * 300), (MiB + 5, b"\x0a" * 70000), (4 * MiB - 512, b"\x0b" * 512)]
    u.write_engine(path, FMT, writes)
    with open(base, "rb") as f:
        model = bytearray(f.read()) + bytearray(MiB)
    for o, d in writes:
        model[o:o + len(d)] = d
    ref = helpers.make_raw(tmp_path / "model.raw", 4 * MiB)
    with open(ref, "r+b") as f:
        f.write(model)
    assert helpers.qemu_compare(path, ref, FMT, "raw")
    # convert -B: only what differs from the backing file is stored
    out = tmp_path / "conv.qcow"
    u.vdisk("convert", "-f", "raw", "-O", FMT, "-B", "base.raw", "-F", "raw", ref, out, check=True)
    assert helpers.qemu_compare(out, ref, FMT, "raw")
    assert info_json(out, "vdisk") == info_json(out, "qemu")
    assert os.path.getsize(out) < os.path.getsize(path) + 64 * KiB


def test_commit_like_qemu(tmp_path):
    # commit copies the overlay into its base and empties it as QEMU does (zeroed L1, file cut after it)
    for tool in ("qemu", "vdisk"):
        d = tmp_path / tool
        d.mkdir()
        helpers.make_raw(d / "base.raw", 2 * MiB, [(0, 2 * MiB)])
        qemu_create(d / "ov.qcow", 2 * MiB, backing_file="base.raw", backing_fmt="raw")
        helpers.qemu_io(FMT, d / "ov.qcow", "write -P 7 0 64k", "write -P 8 1m 3k", "write -P 9 %d 512" % (2 * MiB - 512))
        if tool == "qemu":
            helpers.run("qemu-img", "commit", "-q", "-f", FMT, d / "ov.qcow")
        else:
            u.vdisk("commit", "-q", "-f", FMT, d / "ov.qcow", check=True)
    for name in ("ov.qcow", "base.raw"):
        assert same_file(tmp_path / "qemu" / name, tmp_path / "vdisk" / name)
    assert os.path.getsize(tmp_path / "vdisk" / "ov.qcow") == 48 + 8 + 8    # header, name, one L1 entry


def test_write_zeroes_and_unaligned_writes(tmp_path):
    size = 2 * MiB + 512
    path = vdisk_create(tmp_path / "v.qcow", size)
    img = u.open_image(path, FMT, writable=True)
    try:
        img.write(5, b"\x07" * 10000)
        img.write_zeroes(4096, 4096)
        img.write_zeroes(MiB, 8192)               # unallocated, no backing file: nothing written
        end = os.path.getsize(path)
        img.write(size - 3, b"xyz")
        assert img.read(0, 12000) == bytes(5) + b"\x07" * 4091 + bytes(4096) + b"\x07" * 1813 + bytes(1995)
    finally:
        img.close()
    assert os.path.getsize(path) == end + 8192          # the last sector: a new L2 table and its cluster
    helpers.qemu_io(FMT, path, "read -P 0 4096 4k", "read -P 0x07 5 4091", "read -v %d 3" % (size - 3))


# -- bad input ------------------------------------------------------------------------------------
def test_hostile_entries(tmp_path):
    path = qemu_create(tmp_path / "q.qcow", "2M")
    helpers.qemu_io(FMT, path, "write -P 1 0 4k")
    l2 = struct.unpack(">Q", open(path, "rb").read()[48:56])[0]
    u.poke(path, l2, struct.pack(">Q", 512))               # cluster 0 "lives" on the header and L1
    img = u.open_image(path, FMT, writable=True)
    try:
        img.read(0, 4096)
        with pytest.raises(errors.CorruptImage):
            img.write(0, b"x" * 512)
    finally:
        img.close()
    u.poke(path, 48, struct.pack(">Q", 8))                  # the L2 table on top of the header
    img = u.open_image(path, FMT, writable=True)
    try:
        with pytest.raises(errors.CorruptImage):
            img.write(8192, b"x" * 512)
    finally:
        img.close()
    u.poke(path, 48, struct.pack(">Q", l2))
    u.poke(path, l2, struct.pack(">Q", 4096 + 7))           # not sector aligned: QEMU returns EIO
    v = u.vdisk("convert", "-f", FMT, "-O", "raw", path, tmp_path / "o.raw")
    assert v.returncode == 1
    assert "not sector aligned" in v.stderr
    u.poke(path, l2, struct.pack(">Q", hdr.compressed_entry(1 << 40, 100, 12)))   # compressed, past EOF
    v = u.vdisk("convert", "-f", FMT, "-O", "raw", path, tmp_path / "o.raw")
    assert v.returncode == 1
    assert "beyond the end of the file" in v.stderr
