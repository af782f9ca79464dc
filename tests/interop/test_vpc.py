"""vpc (VHD) against qemu-img 7.2: create, CHS rounding, read, write, info, samples, bad input, mutations.

Both directions over every create option value (subformat dynamic/fixed x force_size off/on;
preallocation is accepted and, as in qemu-img 7.2, changes nothing): images qemu-img creates and
qemu-io writes read byte-identically through vdisk (unaligned sizes, sizes that CHS rounds up,
over 2 GiB, the last sector); images vdisk creates and writes pass ``qemu-img compare`` (qemu-img
has no check for vpc); vdisk writes into qemu-made images and qemu-io reads them back; the Hyper-V,
Virtual PC and Disk2VHD samples read like ``qemu-img convert -O raw``.
"""
import json
import os
import struct

import pytest

import helpers
import imgfmt_util as u
from helpers import MiB, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vpc import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver, probe_file

FMT = "vpc"
SUBFORMATS = ["dynamic", "fixed"]
FORCE = ["off", "on"]
# 1: the smallest geometry; 5222400: exactly 150x4x17; 10M: rounded up by CHS; 127G: the CHS table's
# top; 130000M: past what CHS describes (the maximum geometry, the exact size)
SIZES = [0, 1, 5222400, 10 * MiB, 3000000000, 127 * 1024 * MiB, 130000 * MiB]
MASK = ((24, 28), (64, 68), (68, 84))      # timestamp, checksum, UUID: differ in every image
SAMPLES = ["d2v-zerofilled.vhd", "hyperv2012r2-dynamic.vhd", "virtualpc-dynamic.vhd"]


def slow(values):
    return pytest.param(*values, marks=pytest.mark.slow)


def qemu_create(path, size, **opts):
    return u.create("qemu", path, FMT, size, **opts)


def vdisk_create(path, size, **opts):
    return u.create("vdisk", path, FMT, size, **opts)


def info_json(path, tool):
    return u.info_json(path, FMT, tool)


def footers(path):
    """The footer copy at 0 (dynamic) and the footer at the end, random fields masked; the metadata
    between them (dynamic header, BAT) as is. Reads only the ends of a sparse file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = bytearray(f.read(min(size, 1536 + 64 * 1024)))
        f.seek(size - 512)
        tail = bytearray(f.read(512))
    for buf in (head, tail):
        for at in range(0, len(buf), 512):
            if buf[at:at + 8] == hdr.COOKIE:
                for a, b in MASK:
                    buf[at + a:at + b] = bytes(b - a)
    return bytes(head if head[:8] == hdr.COOKIE else b""), bytes(tail), size


def poke_footer(path, offset, value, at_end=False):
    """Change footer bytes and fix its checksum (so only the change itself is tested)."""
    size = os.path.getsize(path)
    where = size - 512 if at_end else 0
    with open(path, "r+b") as f:
        f.seek(where)
        buf = bytearray(f.read(512))
        buf[offset:offset + len(value)] = value
        buf[64:68] = struct.pack(">I", hdr.checksum(bytes(buf), 64))
        f.seek(where)
        f.write(buf)


# -- create ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub", SUBFORMATS)
@pytest.mark.parametrize("force", FORCE)
@pytest.mark.parametrize("size", u.cells(SIZES, (10 * MiB,)))
def test_create_identical_to_qemu(tmp_path, sub, force, size):
    a = qemu_create(tmp_path / "q.vhd", size, subformat=sub, force_size=force)
    b = vdisk_create(tmp_path / "v.vhd", size, subformat=sub, force_size=force)
    assert footers(a) == footers(b)
    if sub == "fixed" and size == 0:
        # only a footer, at offset 0: QEMU takes it for a dynamic disk's copy and cannot open it
        for tool in (helpers.qemu_img, u.vdisk):
            proc = tool("info", "-f", FMT, a)
            assert proc.returncode == 1 and "Error reading dynamic VHD header" in helpers._txt(proc.stderr)
        return
    assert info_json(a, "qemu") == info_json(b, "vdisk")
    assert info_json(a, "vdisk") == info_json(a, "qemu")
    with open(b, "rb") as f:
        f.seek(os.path.getsize(b) - 512)
        foot = hdr.parse_footer(f.read(512))
    assert foot.creator_app == (b"qem2" if force == "on" else b"qemu")
    assert foot.disk_type == (hdr.TYPE_FIXED if sub == "fixed" else hdr.TYPE_DYNAMIC)


@pytest.mark.parametrize("size", u.cells([1, 34816 + 512, 10 * MiB, 127 * 1024 * MiB, 300 * 1024 * MiB],
                                         (10 * MiB,)))
def test_chs_rounding_like_qemu(size):
    # the virtual size qemu-img gives each request, and its geometry, without writing images
    drv = get_driver(FMT)
    assert drv.probe(b"conectix", "x") == 100
    vsize, chs = hdr.rounded_size(-(-size // 512) * 512, False)
    assert vsize >= size
    if chs != (hdr.CHS_MAX_C, hdr.CHS_MAX_H, hdr.CHS_MAX_S):
        assert vsize == chs[0] * chs[1] * chs[2] * 512
        assert hdr.calculate_geometry(vsize // 512) == chs


@pytest.mark.parametrize("prealloc", u.cells(["falloc", "full"], ("full",)))
@pytest.mark.parametrize("sub", SUBFORMATS)
def test_create_preallocation_accepted_like_qemu(tmp_path, prealloc, sub):
    a = qemu_create(tmp_path / "q.vhd", 3 * MiB, preallocation=prealloc, subformat=sub)
    b = vdisk_create(tmp_path / "v.vhd", 3 * MiB, preallocation=prealloc, subformat=sub)
    assert footers(a) == footers(b)


@pytest.mark.parametrize("opts,size,message", [
    ({}, "2041G", "The image size is too large for file format 'vpc'"),
    slow(({"force_size": "on"}, "3T", "The image size is too large for file format 'vpc'")),
    ({"subformat": "foo"}, "1M", "subformat"),
    slow(({"force_size": "maybe"}, "1M", "force_size")),
])
def test_create_refused_like_qemu(tmp_path, opts, size, message):
    o = u.options_text(opts)
    q = helpers.qemu_img("create", "-f", FMT, *(["-o", o] if o else []), tmp_path / "q.vhd", size)
    assert q.returncode == 1 and message in helpers._txt(q.stderr)
    v = u.vdisk("create", "-f", FMT, *(["-o", o] if o else []), tmp_path / "v.vhd", size)
    assert v.returncode == 1 and message in v.stderr and len(v.stderr.splitlines()) == 1, v.stderr
    assert not os.path.exists(tmp_path / "v.vhd")


def test_options_help_lists_qemu_options():
    q = helpers._txt(helpers.qemu_img("create", "-f", FMT, "-o", "help", "x").stdout)
    qlines = {l.split("=")[0].strip(): l for l in q.splitlines()[1:]}
    ours = u.vdisk("create", "-f", FMT, "-o", "help", check=True).stdout.splitlines()[1:]
    for line in ours:
        assert " ".join(line.split()) == " ".join(qlines[line.split("=")[0].strip()].split())
    assert {l.split("=")[0].strip() for l in ours} == {"size", "subformat", "force_size", "preallocation"}


def test_probe_and_check_like_qemu(tmp_path):
    dyn = qemu_create(tmp_path / "d.img", MiB)
    fixed = qemu_create(tmp_path / "f.img", MiB, subformat="fixed")
    assert probe_file(dyn) == FMT
    assert probe_file(fixed) == "raw"            # QEMU looks only at offset 0: a fixed VHD probes as raw
    assert helpers.qemu_img("info", "--output=json", fixed).stdout.count(b'"raw"') == 1
    for path in (dyn, fixed):
        assert helpers.qemu_img("check", "-f", FMT, path).returncode == 63
        assert u.vdisk("check", "-f", FMT, path).returncode == 63


# -- qemu writes, vdisk reads -------------------------------------------------------------------
def qemu_fill(path, size):
    wanted = [(0, 3000), (2 * MiB - 700, 2 * MiB + 1400), (size // 2 + 77, 1000), (size - 512, 512)]
    raw = helpers.make_raw(str(path) + ".src", size, [(o, min(n, size - o)) for o, n in wanted if 0 <= o < size])
    helpers.run("qemu-img", "convert", "-n", "-f", "raw", "-O", FMT, raw, path)
    return raw


@pytest.mark.parametrize("sub", SUBFORMATS)
@pytest.mark.parametrize("force", FORCE)
@pytest.mark.parametrize("size", u.cells([12345, 5222400, 10 * MiB + 512], (10 * MiB + 512,)))
def test_qemu_written_reads_identically(tmp_path, sub, force, size):
    path = qemu_create(tmp_path / "q.vhd", size, subformat=sub, force_size=force)
    vsize = info_json(path, "qemu")["virtual-size"]
    raw = qemu_fill(path, vsize)
    with open(raw, "rb") as f:
        assert u.read_all(path, FMT) == f.read()
    assert info_json(path, "vdisk") == info_json(path, "qemu")
    v = u.vdisk("map", "--output=json", "-f", FMT, path, check=True).stdout
    q = helpers._txt(helpers.qemu_img("map", "--output=json", "-f", FMT, path, check=True).stdout)
    assert json.loads(v) == json.loads(q)


@pytest.mark.parametrize("sub", u.cells(SUBFORMATS, ("dynamic",)))
def test_qemu_written_over_2g(tmp_path, sub):
    path = qemu_create(tmp_path / "big.vhd", 3 * 1024 * MiB, subformat=sub)
    size = info_json(path, "qemu")["virtual-size"]
    helpers.qemu_io(FMT, path, "write -P 0x11 0 4k", "write -P 0x22 %d 8k" % (2048 * MiB - 4096),
                    "write -P 0x33 %d 512" % (size - 512))
    img = u.open_image(path, FMT)
    try:
        assert img.virtual_size == size
        assert img.read(2048 * MiB - 4096, 8192) == b"\x22" * 8192
        assert img.read(size - 512, 512) == b"\x33" * 512
        assert img.read(1024 * MiB, 4096) == bytes(4096)
    finally:
        img.close()
    u.assert_same_as_qemu(path, FMT, tmp_path)


@pytest.mark.parametrize("name", SAMPLES)
def test_samples_read_like_qemu(tmp_path, name):
    path = u.sample(name, tmp_path)
    u.assert_same_as_qemu(path, FMT, tmp_path)
    assert info_json(path, "vdisk") == info_json(path, "qemu")


@pytest.mark.parametrize("app,uses_size", [(b"vpc ", False), slow((b"qemu", False)), (b"win ", True),
                                           slow((b"qem2", True)), slow((b"d2v ", True)), slow((b"CTXS", True)),
                                           (b"tap\0", True), slow((b"xyz ", False))])
def test_size_from_creator_app_like_qemu(tmp_path, app, uses_size):
    # current_size and the CHS geometry disagree; the creator application decides, as in QEMU 7.2
    path = qemu_create(tmp_path / "q.vhd", 10 * MiB)
    poke_footer(path, 28, app)
    poke_footer(path, 48, struct.pack(">Q", 8 * MiB))
    got = info_json(path, "vdisk")
    assert got == info_json(path, "qemu")
    assert got["virtual-size"] == (8 * MiB if uses_size else 10514432)


# -- vdisk writes, qemu reads -------------------------------------------------------------------
@pytest.mark.parametrize("sub", SUBFORMATS)
@pytest.mark.parametrize("force", FORCE)
def test_vdisk_convert_passes_qemu(tmp_path, sub, force):
    size = 5 * MiB + 512
    raw = helpers.make_raw(tmp_path / "src.raw", size, [(0, 70000), (2 * MiB - 100, 300000), (size - 512, 512)])
    out = tmp_path / "v.vhd"
    u.vdisk("convert", "-f", "raw", "-O", FMT, "-o", "subformat=%s,force_size=%s" % (sub, force),
            raw, out, check=True)
    assert helpers.qemu_compare(out, raw, FMT, "raw")
    info = info_json(out, "qemu")
    assert info == info_json(out, "vdisk")
    assert info["virtual-size"] == (size if force == "on" else hdr.rounded_size(size, False)[0])
    # the footer copy at 0 and the one at the end agree (dynamic)
    head, tail, dummy = footers(str(out))
    assert not head or head[:512] == tail


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_vdisk_writes_into_qemu_image(tmp_path, sub):
    path = qemu_create(tmp_path / "q.vhd", 5222400, subformat=sub)
    size = 5222400
    helpers.qemu_io(FMT, path, "write -P 0x41 0 8k", "write -P 0x42 %d 4k" % (4 * MiB))
    u.write_engine(path, FMT, [(4096, pattern(4096, 10000)), (MiB + 3, pattern(MiB + 3, 70001)),
                               (2 * MiB - 5, pattern(2 * MiB - 5, 10)), (size - 512, pattern(size - 512, 512))])
    helpers.qemu_io(FMT, path, "read -P 0x41 0 4k", "read -P 0x42 %d 4k" % (4 * MiB))
    ref = u.qemu_raw(path, FMT, tmp_path)
    assert ref[4096:14096] == pattern(4096, 10000)
    assert ref[MiB + 3:MiB + 70004] == pattern(MiB + 3, 70001)
    assert ref[2 * MiB - 5:2 * MiB + 5] == pattern(2 * MiB - 5, 10)
    assert ref[size - 512:] == pattern(size - 512, 512)
    assert ref == u.read_all(path, FMT)
    head, tail, dummy = footers(path)
    assert not head or head[:512] == tail


def test_sector_bitmaps_and_allocation_order(tmp_path):
    path = vdisk_create(tmp_path / "v.vhd", 5222400)
    img = u.open_image(path, FMT, writable=True)
    try:
        writes = []
        real = img.host.pwrite

        def logged(data, offset):
            writes.append((offset, len(data)))
            real(data, offset)
        img.host.pwrite = logged
        img.write(2 * MiB + 1024, b"\x01" * 512)          # a new block: bitmap, data, footer, BAT entry
        first = 2048
        assert writes == [(first, 512), (first + 512 + 1024, 512), (first + 512 + 2 * MiB, 512), (1536 + 4, 4)]
        img.host.pwrite = real
    finally:
        img.close()
    with open(path, "rb") as f:
        f.seek(first)
        assert f.read(512) == b"\xff" * 512               # every sector marked, as qemu-img does
    # a Hyper-V block with only some sectors marked: a write marks the sectors it covers
    u.poke(path, first, bytes(512))
    img = u.open_image(path, FMT, writable=True)
    try:
        img.write(2 * MiB + 4096 + 100, b"\x02" * 1000)   # sectors 8 to 10 of the block
    finally:
        img.close()
    with open(path, "rb") as f:
        f.seek(first)
        assert f.read(2) == b"\x00\xe0"
    assert u.read_all(path, FMT)[2 * MiB + 4196:2 * MiB + 5196] == b"\x02" * 1000


# -- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("offset,value,fix,message", [
    (100, b"\x01", False, "Incorrect header checksum"),
    (512 + 32, struct.pack(">I", 1000), True, "Invalid block size 1000"),
    slow((512 + 28, struct.pack(">I", 1), True, "Page table too small")),
    (512 + 28, struct.pack(">I", 0x7FFFFFFF), True, "Max Table Entries too large (2147483647)"),
    (1536, struct.pack(">I", 0x100000), True, "free_data_block_offset points after the end of file"),
    slow((16, struct.pack(">Q", 1 << 40), True, "Invalid header magic")),
    (16, struct.pack(">Q", (1 << 64) - 1), True, "Error reading dynamic VHD header"),
    (512, b"cxsparsf", True, "Invalid header magic"),
])
def test_bad_input_refused_like_qemu(tmp_path, offset, value, fix, message):
    path = qemu_create(tmp_path / "q.vhd", 5222400)
    if fix and offset < 512:
        poke_footer(path, offset, value)
    else:
        u.poke(path, offset, value)
    before = u.sha(path)
    q = helpers.qemu_img("info", "-f", FMT, path)
    assert q.returncode == 1 and message in helpers._txt(q.stderr), helpers._txt(q.stderr)
    v = u.vdisk("info", "-f", FMT, path)
    assert v.returncode == 1 and message in v.stderr and len(v.stderr.splitlines()) == 1, v.stderr
    assert u.sha(path) == before


def test_too_large_and_not_vhd_refused(tmp_path):
    path = qemu_create(tmp_path / "q.vhd", 5222400)
    poke_footer(path, 28, b"win ")
    poke_footer(path, 48, struct.pack(">Q", 1 << 45))
    q = helpers.qemu_img("info", "-f", FMT, path)
    assert q.returncode == 1 and b"File too large" in q.stderr
    v = u.vdisk("info", "-f", FMT, path)
    assert v.returncode == 1 and "File too large" in v.stderr
    raw = helpers.make_raw(tmp_path / "x.raw", 4096, [(0, 4096)])
    v = u.vdisk("info", "-f", FMT, raw)
    assert v.returncode == 1 and "invalid VPC image" in v.stderr


def test_hostile_bat_entry_not_written(tmp_path):
    path = qemu_create(tmp_path / "q.vhd", 5222400)
    os.truncate(path, os.path.getsize(path) + 3 * MiB)
    u.poke(path, 1536, struct.pack(">I", 1))            # block 0 "lives" on the dynamic header
    img = u.open_image(path, FMT, writable=True)
    try:
        with pytest.raises(errors.CorruptImage):
            img.write(0, b"x" * 512)
    finally:
        img.close()


def test_fixed_footer_claiming_more_than_the_file(tmp_path):
    path = qemu_create(tmp_path / "q.vhd", 5222400, subformat="fixed")
    poke_footer(path, 56, struct.pack(">HBB", 300, 4, 17), at_end=True)     # CHS of a bigger disk
    assert info_json(path, "vdisk") == info_json(path, "qemu")
    img = u.open_image(path, FMT, writable=True)
    try:
        with pytest.raises(errors.CorruptImage):
            img.write(img.virtual_size - 512, b"x" * 512)   # would overwrite the footer
    finally:
        img.close()
    u.assert_same_as_qemu(path, FMT, tmp_path)


# -- mutations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sub", SUBFORMATS)
@pytest.mark.parametrize("seed", u.cells([1, 2, 3], (1,)))
def test_mutations(tmp_path, sub, seed):
    good = qemu_create(tmp_path / "good.vhd", 5222400, subformat=sub)
    helpers.qemu_io(FMT, good, "write -P 1 0 12k", "write -P 2 3M 8k", "write -P 3 %d 4k" % (5222400 - 4096))
    size = os.path.getsize(good)
    if sub == "dynamic":
        regions = [(0, 512), (16, 8), (40, 48), (512, 1024), (512, 48), (1536, 512)]
    else:
        regions = [(size - 512, 512), (size - 472, 48)]
    out = u.mutation_run(good, FMT, regions, seed, 30, tmp_path, cli_every=15)
    assert out["error"] + out["clean"] == 30
