"""vmdk against qemu-img 7.2: what is specific to vmdk (the shared tests are in test_format_conformance):
subformats and descriptors, split extents, stream-optimized and compressed output, zeroed grains,
redundant directories, CIDs and backing files, extent paths, extent-file mutations.

Both directions over every subformat x option value: images vdisk creates and writes pass
``qemu-img check`` and ``qemu-img compare`` against the data written; images qemu-img creates and
qemu-io writes read identically through vdisk (unaligned sizes, over 2 GiB with split extents, the
last sector); the fuzzer-found crasher and extent paths leaving the descriptor's directory are
refused in one line.
"""
import json
import os
import random
import shutil
import struct

import pytest

import helpers
import imgfmt_util as u
from helpers import MiB, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vmdk import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver, probe_file

FMT = "vmdk"
SUBFORMATS = ["monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat", "streamOptimized"]
SPARSE = ("monolithicSparse", "twoGbMaxExtentSparse", "streamOptimized")
# one option value per cell: (name, value); zeroed_grain only where qemu-img allows it (sparse)
OPTION_VALUES = [(None, None), ("adapter_type", "ide"), ("adapter_type", "lsilogic"), ("adapter_type", "buslogic"),
                 ("adapter_type", "legacyESX"), ("hwversion", "7"), ("compat6", "on"), ("compat6", "off"),
                 ("zeroed_grain", "on"), ("zeroed_grain", "off"), ("toolsversion", "10240")]
SIZE = 5 * MiB + 3 * 512 + 77          # unaligned: rounded up to a sector, the last grain partial


def cells():
    out = []
    for sub in SUBFORMATS:
        for name, value in OPTION_VALUES:
            if name == "zeroed_grain" and value == "on" and sub not in SPARSE:
                continue
            fast = (name is None or (sub == "monolithicSparse" and value not in ("ide", "buslogic", "off"))
                    or (name == "zeroed_grain" and value == "on" and sub == "streamOptimized"))
            param = (sub, name, value)
            out.append(param if fast else pytest.param(*param, marks=pytest.mark.slow))
    return out


def opts_of(sub, name, value):
    o = {"subformat": sub}
    if name:
        o[name] = value
    return o


def writes(size):
    """Pattern writes: the start, across a grain boundary, a whole grain, the last sector."""
    return [(0, 4096), (64 * 1024 - 512, 1536), (2 * MiB, 64 * 1024), (size - 512, 512)]


def model_raw(path, size, ws):
    return helpers.make_raw(path, size, ws)


def engine_write(path, ws):
    u.write_engine(path, FMT, [(off, pattern(off, n)) for off, n in ws])


def assert_qemu_clean(path):
    res = helpers.qemu_check(path, FMT)
    assert res["rc"] == 0, res
    assert not res.get("corruptions"), res
    assert not res.get("leaks"), res


def specific(info):
    data = dict(info["format-specific"]["data"])
    data.pop("cid")
    for e in data["extents"]:
        e["filename"] = os.path.basename(e["filename"])
    return data


# -- create and options ---------------------------------------------------------------------------
@pytest.mark.parametrize("sub,name,value", cells())
def test_vdisk_created_and_written_passes_qemu(tmp_path, sub, name, value):
    opts = opts_of(sub, name, value)
    mine = u.create("vdisk", tmp_path / "v.vmdk", FMT, str(SIZE), **opts)
    ref = u.create("qemu", tmp_path / "q.vmdk", FMT, str(SIZE), **opts)
    assert_qemu_clean(mine)
    size = helpers.qemu_info(mine)["virtual-size"]
    assert size == helpers.qemu_info(ref)["virtual-size"]
    # the same descriptor data (geometry, adapter, versions) and format-specific info as qemu-img's
    mi, qi = helpers.qemu_info(mine), helpers.qemu_info(ref)
    assert specific(mi)["create-type"] == specific(qi)["create-type"]
    assert [e["format"] for e in specific(mi)["extents"]] == [e["format"] for e in specific(qi)["extents"]]
    assert [e["virtual-size"] for e in specific(mi)["extents"]] == [e["virtual-size"] for e in specific(qi)["extents"]]
    assert u.info_json(mine, FMT, "vdisk")["format-specific"]["data"]["create-type"] == sub
    ddb = lambda p: sorted(l for l in open(p, "rb").read().decode("latin-1").splitlines() if l.startswith("ddb."))
    assert ddb(mine) == ddb(ref)
    ws = writes(size)
    engine_write(mine, ws)
    assert_qemu_clean(mine)
    raw = model_raw(tmp_path / "model.raw", size, ws)
    assert helpers.qemu_compare(mine, raw, FMT, "raw")


# -- qemu-img writes, vdisk reads ---------------------------------------------------------------
@pytest.mark.parametrize("sub,zeroed", [(s, "off") for s in SUBFORMATS] +
                         [pytest.param(s, "on", marks=pytest.mark.slow) for s in SPARSE])   # flat: refused
def test_qemu_written_reads_identically(tmp_path, sub, zeroed):
    path = u.create("qemu", tmp_path / "q.vmdk", FMT, str(SIZE), subformat=sub, zeroed_grain=zeroed)
    size = helpers.qemu_info(path)["virtual-size"]
    if sub == "streamOptimized":
        src = helpers.make_raw(tmp_path / "src.raw", size, writes(size))
        os.unlink(path)
        helpers.run("qemu-img", "convert", "-O", FMT, "-o", "subformat=%s,zeroed_grain=%s" % (sub, zeroed), src, path)
    else:
        helpers.qemu_io(FMT, path, *["write -P %d %d %d" % (i + 1, off, n) for i, (off, n) in enumerate(writes(size))])
        helpers.qemu_io(FMT, path, "write -z 3M 128k", "write -z %d 512" % (size - 512))
    assert u.read_all(path, FMT) == u.qemu_raw(path, FMT, tmp_path)
    assert get_driver(FMT).name == probe_file(path)


@pytest.mark.parametrize("sub", u.cells(SUBFORMATS, ("twoGbMaxExtentSparse", "streamOptimized")))
def test_over_2g_both_ways(tmp_path, sub):
    """3 GiB + 1 sector: split extents; data on both sides of the 2 GiB boundary and in the last sector."""
    size = 3 * 1024 * MiB + 512
    ws = [(0, 4096), (2 * 1024 * MiB - 4096, 8192), (size - 512, 512)]
    src = helpers.make_raw(tmp_path / "src.raw", size, ws)
    mine = str(tmp_path / "v.vmdk")
    u.vdisk("convert", "-O", FMT, "-o", "subformat=" + sub, src, mine, check=True)
    assert_qemu_clean(mine)
    assert helpers.qemu_compare(mine, src, FMT, "raw")
    q = str(tmp_path / "q.vmdk")
    helpers.run("qemu-img", "convert", "-O", FMT, "-o", "subformat=" + sub, src, q)
    img = u.open_image(q, FMT)
    try:
        for off, n in ws:
            assert img.read(off, n) == pattern(off, n)
        assert img.read(4096, 4096) == bytes(4096)
    finally:
        u.close_chain(img)


# -- streamOptimized and -c ---------------------------------------------------------------------
@pytest.mark.parametrize("how", [("-o", "subformat=streamOptimized"), ("-c", "-o", "subformat=streamOptimized"),
                                 ("-c",)])
def test_convert_compressed(tmp_path, how):
    size = 9 * MiB + 512
    ws = [(0, 3 * MiB), (5 * MiB + 512, 70000), (size - 512, 512)]
    src = helpers.make_raw(tmp_path / "src.raw", size, ws)
    out = str(tmp_path / "c.vmdk")
    u.vdisk("convert", "-O", FMT, *how, src, out, check=True)
    assert_qemu_clean(out)
    assert helpers.qemu_compare(out, src, FMT, "raw")
    info = helpers.qemu_info(out)
    stream = "subformat=streamOptimized" in how
    assert info["format-specific"]["data"]["create-type"] == ("streamOptimized" if stream else "monolithicSparse")
    assert info["format-specific"]["data"]["extents"][0].get("compressed", False) == stream
    if stream:
        # VMware's layout: directory at the end, grain markers, footer and end-of-stream marker
        with open(out, "rb") as f:
            data = f.read()
        h = hdr.SparseHeader.unpack(data[:512])
        assert h.gd_offset == hdr.GD_AT_END
        assert h.version == 3
        assert h.flags & hdr.FLAG_MARKER
        assert data[-512:] == bytes(512)                   # end of stream
        assert struct.unpack_from("<QII", data, len(data) - 1536)[2] == hdr.MARKER_FOOTER
        lba, clen = struct.unpack_from("<QI", data, h.overhead * 512)
        assert lba == 0
        assert 0 < clen < 65536
        assert os.path.getsize(out) < 600 * 1024           # compressed
        qraw = str(tmp_path / "q.raw")
        helpers.run("qemu-img", "convert", "-f", FMT, "-O", "raw", out, qraw)
        assert helpers.qemu_compare(qraw, src, "raw", "raw")


def test_stream_written_out_of_order_and_partially(tmp_path):
    """Grains written in any order and in parts are compressed once complete (or on close)."""
    size = 2 * MiB
    path = u.create("vdisk", tmp_path / "s.vmdk", FMT, str(size), subformat="streamOptimized")
    ws = [(MiB, 4096), (0, 512), (MiB + 4096, 64 * 1024 - 4096), (size - 512, 512)]
    engine_write(path, ws)
    img = u.open_image(path, FMT, writable=True)
    try:
        with pytest.raises(errors.ImageError, match="allocated cluster"):
            img.write(MiB, b"x" * 512)
    finally:
        u.close_chain(img)
    assert_qemu_clean(path)
    assert helpers.qemu_compare(path, model_raw(tmp_path / "m.raw", size, ws), FMT, "raw")
    engine_write(path, [(512 * 1024, 4096)])      # reopened: appended after the old grains
    ws.append((512 * 1024, 4096))
    assert_qemu_clean(path)
    assert helpers.qemu_compare(path, model_raw(tmp_path / "m2.raw", size, ws), FMT, "raw")


def test_writes_into_qemu_stream_image(tmp_path):
    """qemu-img 7.2's stream images keep the directory at the front: new grains are appended and
    their entries written in place, as QEMU does."""
    size = 4 * MiB
    src = helpers.make_raw(tmp_path / "src.raw", size, [(0, MiB)])
    path = str(tmp_path / "q.vmdk")
    helpers.run("qemu-img", "convert", "-O", FMT, "-o", "subformat=streamOptimized", src, path)
    engine_write(path, [(2 * MiB, 64 * 1024 + 100)])
    assert_qemu_clean(path)
    expected = model_raw(tmp_path / "m.raw", size, [(0, MiB), (2 * MiB, 64 * 1024 + 100)])
    assert helpers.qemu_compare(path, expected, FMT, "raw")


def test_convert_with_new_backing_file(tmp_path):
    size = 4 * MiB
    base = str(tmp_path / "base.vmdk")
    helpers.run("qemu-img", "create", "-f", FMT, base, size)
    helpers.qemu_io(FMT, base, "write -P 5 0 2M", "write -P 6 3M 1M")
    src = helpers.make_raw(tmp_path / "src.raw", size, [(MiB, MiB)])
    out = str(tmp_path / "out.vmdk")
    u.vdisk("convert", "-O", FMT, "-B", "base.vmdk", "-F", FMT, src, out, check=True)
    assert helpers.qemu_info(out)["backing-filename"] == "base.vmdk"
    assert_qemu_clean(out)
    assert helpers.qemu_compare(out, src, FMT, "raw")


# -- zeroed grains, backing files, info, check -------------------------------------------------
def _tables(path, gd_sector, count):
    with open(path, "rb") as f:
        f.seek(gd_sector * 512)
        gd = struct.unpack("<%dI" % count, f.read(4 * count))
        out = []
        for gt in gd:
            f.seek(gt * 512)
            out.append(struct.unpack("<512I", f.read(2048)))
    return out


def test_redundant_directory_kept_consistent(tmp_path):
    size = 40 * MiB
    path = u.create("vdisk", tmp_path / "r.vmdk", FMT, str(size), zeroed_grain="on")
    engine_write(path, [(0, 70000), (33 * MiB + 512, 3 * MiB), (size - 512, 512)])
    img = u.open_image(path, FMT, writable=True)
    try:
        img.write_zeroes(34 * MiB, MiB)
    finally:
        u.close_chain(img)
    with open(path, "rb") as f:
        h = hdr.SparseHeader.unpack(f.read(512))
    main, redundant = _tables(path, h.gd_offset, h.gd_entries), _tables(path, h.rgd_offset, h.gd_entries)
    assert main == redundant
    assert any(any(t) for t in main)
    assert hdr.GTE_ZEROED in main[1]
    assert_qemu_clean(path)


def test_zeroed_grain_write_zeroes(tmp_path):
    size = 4 * MiB
    path = u.create("vdisk", tmp_path / "z.vmdk", FMT, str(size), zeroed_grain="on")
    engine_write(path, [(0, 2 * MiB)])
    img = u.open_image(path, FMT, writable=True)
    try:
        img.write_zeroes(64 * 1024, 128 * 1024)
        img.write_zeroes(3 * MiB, 64 * 1024)
        kinds = [(e.offset, e.kind) for e in img.extents(0, size)]
    finally:
        u.close_chain(img)
    assert (64 * 1024, "zero") in kinds
    expected = bytearray(pattern(0, 2 * MiB)) + bytearray(2 * MiB)
    expected[64 * 1024:192 * 1024] = bytes(128 * 1024)
    raw = tmp_path / "m.raw"
    raw.write_bytes(bytes(expected))
    assert_qemu_clean(path)
    assert helpers.qemu_compare(path, str(raw), FMT, "raw")
    assert helpers.qemu_img("map", "--output=json", path).returncode == 0


@pytest.mark.parametrize("sub", u.cells(SUBFORMATS, ("monolithicSparse", "twoGbMaxExtentSparse")))
def test_backing_file_both_ways(tmp_path, sub):
    size = 3 * MiB
    base = u.create("qemu", tmp_path / "base.vmdk", FMT, str(size))
    helpers.qemu_io(FMT, base, "write -P 9 0 3M")
    # vdisk overlay over a qemu-img base: reads through, copy-on-write of partial grains
    u.vdisk("create", "-f", FMT, "-o", "subformat=" + sub, "-b", "base.vmdk", "-F", FMT,
                      tmp_path / "top.vmdk", check=True)
    top = str(tmp_path / "top.vmdk")
    engine_write(top, [(4096, 512)] if sub != "streamOptimized" else [(64 * 1024, 64 * 1024)])
    qi = helpers.qemu_info(top)
    assert qi["backing-filename"] == "base.vmdk"
    assert qi["backing-filename-format"] == FMT
    bi = helpers.qemu_info(base)
    assert qi["format-specific"]["data"]["parent-cid"] == bi["format-specific"]["data"]["cid"]
    assert_qemu_clean(top)
    assert u.read_all(top, FMT) == u.qemu_raw(top, FMT, tmp_path)
    # qemu-img overlay read by vdisk
    helpers.run("qemu-img", "create", "-f", FMT, "-b", "base.vmdk", "-F", FMT, tmp_path / "q.vmdk")
    helpers.qemu_io(FMT, str(tmp_path / "q.vmdk"), "write -P 3 1000 3000")
    assert u.read_all(str(tmp_path / "q.vmdk"), FMT) == u.qemu_raw(str(tmp_path / "q.vmdk"), FMT, tmp_path, "q.raw")


@pytest.mark.parametrize("sub", ["monolithicSparse", "twoGbMaxExtentFlat", "streamOptimized"])
def test_write_changes_cid_as_qemu(tmp_path, sub):
    """QEMU writes a new CID before the first change of each session; so does vdisk."""
    path = u.create("vdisk", tmp_path / "a.vmdk", FMT, "1M", subformat=sub)
    cid = lambda: helpers.qemu_info(path)["format-specific"]["data"]["cid"]
    before = cid()
    engine_write(path, [(0, 512)])
    after = cid()
    assert after != before
    img = u.open_image(path, FMT)
    try:
        assert img.cid == after
        assert img.read(0, 512) == pattern(0, 512)
    finally:
        u.close_chain(img)
    assert_qemu_clean(path)


def test_changed_parent_refused_like_qemu(tmp_path):
    """A parent written after its child was made has a new CID: QEMU and vdisk refuse to read the
    child's unallocated grains through it."""
    base = u.create("qemu", tmp_path / "base.vmdk", FMT, "1M")
    helpers.run("qemu-img", "create", "-f", FMT, "-b", "base.vmdk", "-F", FMT, tmp_path / "top.vmdk")
    top = str(tmp_path / "top.vmdk")
    assert u.read_all(top, FMT) == bytes(MiB)
    engine_write(base, [(0, 512)])
    assert "failed" in helpers.qemu_io(FMT, top, "read 0 512", check=False)
    with pytest.raises(errors.CorruptImage, match="parentCID"):
        u.read_all(top, FMT)


@pytest.mark.parametrize("sub", SUBFORMATS)
def test_info_like_qemu(tmp_path, sub):
    path = u.create("qemu", tmp_path / "q.vmdk", FMT, str(3 * MiB), subformat=sub)
    mine, ref = u.info_json(path, FMT, "vdisk"), u.info_json(path, FMT, "qemu")
    assert mine.pop("actual-size") == ref.pop("actual-size")     # the extent files counted too
    assert mine["format-specific"]["data"]["cid"] == ref["format-specific"]["data"]["cid"]
    assert specific(mine) == specific(ref)
    assert mine == ref or {k: v for k, v in mine.items() if k != "format-specific"} == \
        {k: v for k, v in ref.items() if k != "format-specific"}
    text = u.vdisk("info", path, check=True).stdout
    assert "create type: %s" % sub in text
    assert "parent cid: 4294967295" in text


def test_check_reports_grain_past_eof_like_qemu(tmp_path):
    path = u.create("qemu", tmp_path / "q.vmdk", FMT, "1M")
    helpers.qemu_io(FMT, path, "write -P 1 0 64k")
    with open(path, "rb") as f:
        h = hdr.SparseHeader.unpack(f.read(512))
        f.seek(h.gd_offset * 512)
        gt = struct.unpack("<I", f.read(4))[0]
    u.poke(path, gt * 512 + 4, struct.pack("<I", 0x100000))
    ref = helpers.qemu_img("check", "-f", FMT, path)
    mine = u.vdisk("check", "-f", FMT, path)
    assert ref.returncode == mine.returncode == 1, (ref, mine.stderr)
    assert "points after EOF" in mine.stderr
    assert len(mine.stderr.splitlines()) == 1


# -- safety ----------------------------------------------------------------------------------------------
def test_fuzzer_crasher_refused(tmp_path):
    path = u.sample("afl9.vmdk", tmp_path)
    before = u.sha(path)
    for cmd in ("info", "check", "map"):
        proc, took = u.cli_limited(cmd, path)
        assert proc.returncode == 1
        assert took < 10
        u.assert_clean_cli(proc)
        assert "L1 size too big" in proc.stderr
    assert u.sha(path) == before


def _descriptor(tmp_path, line, name="d.vmdk"):
    path = tmp_path / name
    path.write_text('# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\ncreateType="monolithicFlat"\n'
                    '%s\n' % line)
    return str(path)


@pytest.mark.parametrize("line,message", [
    ('RW 2048 FLAT "/etc/passwd" 0', "absolute"),
    ('RW 2048 FLAT "../outside.img" 0', "leaves the descriptor's directory"),
    ('RW 2048 FLAT "sub/../../outside.img" 0', "leaves the descriptor's directory"),
    ('RW 2048 FLAT "dir" 0', "not a regular file"),
    ('RW 2048 FLAT "fifo" 0', "not a regular file"),
    ('RW 2048 FLAT "link" 0', "leaves the descriptor's directory"),
    ('RW 2048 FLAT "missing.img" 0', "No such file"),
    ('RW 2048 FLAT "data.img"', "Invalid extent line"),
])
def test_extent_paths_confined(tmp_path, line, message):
    d = tmp_path / "img"
    d.mkdir()
    (tmp_path / "outside.img").write_bytes(bytes(MiB))
    (d / "data.img").write_bytes(bytes(MiB))
    (d / "dir").mkdir()
    os.mkfifo(str(d / "fifo"))
    os.symlink(str(tmp_path / "outside.img"), str(d / "link"))
    path = _descriptor(d, line)
    proc, took = u.cli_limited("info", "-f", FMT, path)
    assert proc.returncode == 1, proc.stderr
    assert took < 10, proc.stderr
    assert message in proc.stderr, proc.stderr
    u.assert_clean_cli(proc)


def test_zero_extent_and_flat_offset(tmp_path):
    (tmp_path / "data.img").write_bytes(bytes(512) + pattern(0, 4096))
    path = _descriptor(tmp_path, 'RW 8 FLAT "data.img" 1\nRW 16 ZERO')
    img = u.open_image(path, FMT)
    try:
        assert img.virtual_size == 24 * 512
        assert img.read(0, 4096) == pattern(0, 4096)
        assert img.read(4096, 8192) == bytes(8192)
    finally:
        u.close_chain(img)


# -- mutations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", u.cells([1, 2], (1,)))
def test_extent_file_mutations(tmp_path, seed):
    """Byte flips in a split image's sparse extent (header, directories, tables): one-line errors,
    bounded time, the extent unchanged."""
    size = 3 * MiB
    src = helpers.make_raw(tmp_path / "src.raw", size, [(0, 200 * 1024), (size - 4096, 4096)])
    good = tmp_path / "good"
    good.mkdir()
    helpers.run("qemu-img", "convert", "-O", FMT, "-o", "subformat=twoGbMaxExtentSparse", src, good / "d.vmdk")
    ext = str(good / "d-s001.vmdk")
    with open(ext, "rb") as f:
        h = hdr.SparseHeader.unpack(f.read(512))
    regions = [(0, 80), (h.gd_offset * 512, 16), (h.rgd_offset * 512, 16), ((h.gd_offset + 1) * 512, 2048)]
    rng = random.Random(seed)
    for case in range(12):
        d = tmp_path / ("case%d" % case)
        shutil.copytree(str(good), str(d))
        u.flip_bytes(str(d / "d-s001.vmdk"), rng, regions, rng.randint(1, 4))
        before = u.sha(str(d / "d-s001.vmdk"))
        exc = u.exercise(str(d / "d.vmdk"), FMT)
        assert exc is None or "\n" not in str(exc)
        if case % 6 == 0:
            proc, took = u.cli_limited("info", "-f", FMT, d / "d.vmdk")
            assert took < 20
            u.assert_clean_cli(proc)
        assert u.sha(str(d / "d-s001.vmdk")) == before
        shutil.rmtree(str(d))


def test_random_reads_match_qemu(tmp_path):
    """Unaligned random reads across grains and extents equal qemu-img's raw conversion."""
    size = 5 * MiB + 512
    src = helpers.make_raw(tmp_path / "src.raw", size, [(0, MiB), (2 * MiB + 100, 300000), (size - 512, 512)])
    path = str(tmp_path / "q.vmdk")
    helpers.run("qemu-img", "convert", "-O", FMT, "-o", "subformat=streamOptimized", src, path)
    ref = open(src, "rb").read()
    rng = random.Random(5)
    img = u.open_image(path, FMT)
    try:
        for dummy in range(200):
            off = rng.randrange(size)
            n = rng.randrange(1, min(200000, size - off) + 1)
            assert img.read(off, n) == ref[off:off + n]
    finally:
        u.close_chain(img)
    assert json.loads(u.vdisk("map", "--output=json", path, check=True).stdout)
