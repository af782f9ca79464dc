"""qed against qemu-img 7.2: create, read, write, backing files, need-check flag, info, check, mutations.

Both directions: images qemu-img creates and qemu writes read byte-identically through vdisk
(unaligned sizes, over 2 GiB, the last sector, backing files); images vdisk creates and writes
pass ``qemu-img check`` and ``qemu-img compare``; vdisk writes into qemu-made images and qemu
reads them back; check counts (leaks, invalid entries, repair) equal qemu-img's.
"""
import json
import os
import struct

import pytest

import helpers
import imgfmt_util as u
from helpers import MiB, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qed import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import probe_file

FMT = "qed"
CLUSTERS = ["4k", "64k", "1M"]
TABLES = ["2", "4", "16"]
SIZES = [1000000, 4 * MiB, 5 * MiB + 512]
KB = {"4k": 4096, "64k": 65536, "1M": MiB}


def opts(**kw):
    o = ",".join("%s=%s" % kv for kv in kw.items() if kv[1] is not None)
    return ["-o", o] if o else []


def qemu_create(path, size, backing=None, backing_fmt=None, **kw):
    extra = (["-b", backing, "-F", backing_fmt] if backing else [])
    helpers.run("qemu-img", "create", "-q", "-f", FMT, *opts(**kw), *extra, path, *([size] if size else []))
    return str(path)


def vdisk_create(path, size, backing=None, backing_fmt=None, **kw):
    extra = (["-b", backing, "-F", backing_fmt] if backing else [])
    helpers.vdisk_cli("create", "-q", "-f", FMT, *opts(**kw), *extra, path, *([size] if size else []), check=True)
    return str(path)


def vinfo(path):
    return json.loads(helpers.vdisk_cli("info", "--output=json", "-f", FMT, path, check=True).stdout)


def same_check(path):
    q = helpers.qemu_check(path, FMT)
    v = helpers.vdisk_cli("check", "--output=json", "-f", FMT, path)
    assert v.returncode == q["rc"], (v.stderr, q)
    assert json.loads(v.stdout) == {k: val for k, val in q.items() if k not in ("rc", "stderr")}
    return q


# -- create ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cluster", u.cells(CLUSTERS, ("4k", "64k")))
@pytest.mark.parametrize("table", u.cells(TABLES + ["1"], ("1", "4")))
def test_create_identical_to_qemu(tmp_path, cluster, table):
    a = qemu_create(tmp_path / "q.qed", 1000000, cluster_size=cluster, table_size=table)
    b = vdisk_create(tmp_path / "v.qed", 1000000, cluster_size=cluster, table_size=table)
    assert u.sha(a) == u.sha(b)
    if table == "1":
        # QEMU's table offset test refuses one-cluster tables: such images cannot be opened
        q = helpers.qemu_img("info", a)
        assert q.returncode == 1 and b"QED table offset is invalid" in q.stderr
        v = helpers.vdisk_cli("info", b)
        assert v.returncode == 1 and "QED table offset is invalid" in v.stderr
        return
    qa, va = helpers.qemu_info(a, FMT), vinfo(b)
    qa.pop("filename"), va.pop("filename")
    assert qa == va


@pytest.mark.parametrize("prealloc", u.cells(["off", "falloc", "full"], ("full",)))
def test_create_preallocation(tmp_path, prealloc):
    a = qemu_create(tmp_path / "q.qed", 3 * MiB, preallocation=prealloc)
    b = vdisk_create(tmp_path / "v.qed", 3 * MiB, preallocation=prealloc)
    assert u.sha(a) == u.sha(b)
    assert helpers.qemu_check(b, FMT)["rc"] == 0


@pytest.mark.parametrize("o,size,message", [
    ({"cluster_size": "2k"}, "1M", "QED cluster size must be within range [4096, 67108864] and power of 2"),
    ({"cluster_size": "96k"}, "1M", "QED cluster size must be within range"),
    ({"table_size": "3"}, "1M", "QED table size must be within range [1, 16] and power of 2"),
    ({"table_size": "32"}, "1M", "QED table size must be within range"),
    ({"cluster_size": "4k", "table_size": "1"}, "2049M", "QED image size must be a non-zero multiple of cluster "
                                                         "size and less than 1073741824 bytes"),
])
def test_create_refused_like_qemu(tmp_path, o, size, message):
    q = helpers.qemu_img("create", "-f", FMT, *opts(**o), tmp_path / "q.qed", size)
    assert q.returncode == 1 and message in helpers._txt(q.stderr)
    v = helpers.vdisk_cli("create", "-f", FMT, *opts(**o), tmp_path / "v.qed", size)
    assert v.returncode == 1 and message in v.stderr and len(v.stderr.splitlines()) == 1
    assert not os.path.exists(tmp_path / "v.qed")


def test_options_help_lists_qemu_options():
    q = helpers._txt(helpers.qemu_img("create", "-f", FMT, "-o", "help", "x").stdout)
    ours = helpers.vdisk_cli("create", "-f", FMT, "-o", "help", check=True).stdout.splitlines()[1:]
    qlines = {l.split("=")[0].strip(): l for l in q.splitlines()[1:]}
    for line in ours:
        assert " ".join(line.split()) == " ".join(qlines[line.split("=")[0].strip()].split())
    assert len(ours) == 6


def test_probe(tmp_path):
    assert probe_file(qemu_create(tmp_path / "q.img", MiB)) == FMT


# -- qemu writes, vdisk reads -------------------------------------------------------------------
def fill(path, size, cluster):
    wanted = [(0, 3000), (max(0, cluster - 700), 2 * cluster + 1400), (size // 2 + 77, 1000), (size - 512, 512)]
    raw = helpers.make_raw(str(path) + ".src", size, [(o, min(n, size - o)) for o, n in wanted if o < size])
    helpers.run("qemu-img", "convert", "-n", "-f", "raw", "-O", FMT, raw, path)
    return raw


@pytest.mark.parametrize("cluster", u.cells(CLUSTERS, ("4k",)))
@pytest.mark.parametrize("table", u.cells(TABLES, ("2",)))
@pytest.mark.parametrize("size", u.cells(SIZES, (1000000,)))
def test_qemu_written_reads_identically(tmp_path, cluster, table, size):
    path = qemu_create(tmp_path / "q.qed", size, cluster_size=cluster, table_size=table)
    raw = fill(path, -(-size // 512) * 512, KB[cluster])
    assert u.read_all(path, FMT) == open(raw, "rb").read()
    assert vinfo(path) == helpers.qemu_info(path, FMT)
    same_check(path)


def test_qemu_written_over_2g(tmp_path):
    size = 3 * 1024 * MiB + 512
    path = qemu_create(tmp_path / "big.qed", size, cluster_size="4k", table_size="1" if False else "2")
    helpers.qemu_io(FMT, path, "write -P 0x11 0 4k", "write -P 0x22 %d 8k" % (2048 * MiB - 4096),
                    "write -P 0x33 %d 512" % (size - 512), "write -z %d 64k" % (1024 * MiB))
    img = u.open_image(path, FMT)
    try:
        assert img.virtual_size == size
        assert img.read(2048 * MiB - 4096, 8192) == b"\x22" * 8192
        assert img.read(size - 512, 512) == b"\x33" * 512
        assert img.read(1024 * MiB, 4096) == bytes(4096)
    finally:
        img.close()
    u.assert_same_as_qemu(path, FMT, tmp_path)
    same_check(path)


# -- vdisk writes, qemu reads -------------------------------------------------------------------
@pytest.mark.parametrize("cluster", u.cells(CLUSTERS, ("4k", "1M")))
@pytest.mark.parametrize("table", u.cells(TABLES, ("2",)))
def test_vdisk_convert_passes_qemu(tmp_path, cluster, table):
    size = 5 * MiB + 512
    raw = helpers.make_raw(tmp_path / "src.raw", size, [(0, 70000), (MiB - 100, 300000), (size - 512, 512)])
    out = tmp_path / "v.qed"
    helpers.vdisk_cli("convert", "-f", "raw", "-O", FMT, "-o", "cluster_size=%s,table_size=%s" % (cluster, table),
                      raw, out, check=True)
    c = same_check(out)
    assert c["rc"] == 0, c
    assert helpers.qemu_compare(out, raw, FMT, "raw")
    assert vinfo(out) == helpers.qemu_info(out, FMT)


@pytest.mark.parametrize("cluster", u.cells(CLUSTERS, ("4k",)))
def test_vdisk_writes_into_qemu_image(tmp_path, cluster):
    size = 9 * MiB + 1536
    path = qemu_create(tmp_path / "q.qed", size, cluster_size=cluster, table_size="2")
    helpers.qemu_io(FMT, path, "write -P 0x41 0 8k")
    writes = [(4096, pattern(4096, 10000)), (MiB + 3, pattern(MiB + 3, 70001)), (8 * MiB + 5, pattern(0, 9)),
              (size - 512, pattern(size - 512, 512))]
    u.write_engine(path, FMT, writes)
    helpers.qemu_io(FMT, path, "read -P 0x41 0 4k")
    ref = u.qemu_raw(path, FMT, tmp_path)
    for off, data in writes:
        assert ref[off:off + len(data)] == data
    assert ref == u.read_all(path, FMT)
    assert same_check(path)["rc"] == 0
    with open(path, "rb") as f:
        assert struct.unpack_from("<Q", f.read(64), 16)[0] & hdr.F_NEED_CHECK == 0


def test_need_check_flag(tmp_path):
    path = qemu_create(tmp_path / "q.qed", 4 * MiB, cluster_size="4k")
    img = u.open_image(path, FMT, writable=True)
    try:
        img.write(0, b"x" * 4096)
        with open(path, "rb") as f:      # set before the first allocating write, as QEMU does
            assert struct.unpack_from("<Q", f.read(64), 16)[0] & hdr.F_NEED_CHECK
        # qemu-img 7.2 never reports the flag as "dirty-flag"
        assert helpers.qemu_info(path, FMT, "-U")["dirty-flag"] is False
    finally:
        img.close()
    # an interrupted allocation: flag set, a cluster leaked, an L2 entry past the end of the file
    with open(path, "r+b") as f:
        f.seek(16)
        f.write(struct.pack("<Q", hdr.F_NEED_CHECK))
    os.truncate(path, os.path.getsize(path) + 4096)
    assert vinfo(path) == helpers.qemu_info(path, FMT)
    u.write_engine(path, FMT, [(8192, b"y" * 512)])     # a read-write open checks and repairs first
    q = helpers.qemu_check(path, FMT)
    assert q["rc"] in (0, 3) and "corruptions" not in q
    assert u.read_all(path, FMT)[:4096] == b"x" * 4096


# -- backing files --------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["vdisk", "qemu"])
def test_backing_raw(tmp_path, writer):
    size = 3 * MiB + 512
    base = helpers.make_raw(tmp_path / "base.raw", size, [(0, size)])
    create = vdisk_create if writer == "vdisk" else qemu_create
    top = create(tmp_path / "top.qed", None, backing="base.raw", backing_fmt="raw", cluster_size="4k")
    if writer == "vdisk":
        u.write_engine(top, FMT, [(5000, b"\x01" * 3000), (2 * MiB + 4095, b"\x02" * 2)])
        img = u.open_image(top, FMT, writable=True)
        try:
            img.write_zeroes(MiB, 8192)
        finally:
            img.close()
    else:
        helpers.qemu_io(FMT, top, "write -P 1 5000 3000", "write -P 2 %d 2" % (2 * MiB + 4095),
                        "write -z %d 8k" % MiB)
    expected = bytearray(pattern(0, size))
    expected[5000:8000] = b"\x01" * 3000
    expected[2 * MiB + 4095:2 * MiB + 4097] = b"\x02\x02"
    expected[MiB:MiB + 8192] = bytes(8192)
    assert u.read_all(top, FMT) == bytes(expected)
    assert u.qemu_raw(top, FMT, tmp_path) == bytes(expected)
    assert same_check(top)["rc"] == 0
    assert vinfo(top) == helpers.qemu_info(top, FMT)


def test_backing_outside_tree_refused(tmp_path):
    (tmp_path / "a").mkdir()
    helpers.make_raw(tmp_path / "base.raw", MiB)
    top = qemu_create(tmp_path / "a" / "top.qed", None, backing="../base.raw", backing_fmt="raw")
    with pytest.raises(errors.PolicyError):
        u.open_image(top, FMT)


# -- check ----------------------------------------------------------------------------------------
def damaged(tmp_path, how):
    path = qemu_create(tmp_path / "q.qed", 8 * MiB, cluster_size="4k", table_size="2")
    helpers.qemu_io(FMT, path, "write -P 1 0 8k", "write -P 2 4M 4k")
    with open(path, "rb") as f:
        h = f.read(64)
        l1 = struct.unpack_from("<Q", h, 40)[0]
        f.seek(l1)
        l2 = struct.unpack("<Q", f.read(8))[0]
    if how == "leak":
        os.truncate(path, os.path.getsize(path) + 8192)
    elif how == "bad-data":
        u.poke(path, l2 + 8, struct.pack("<Q", 0x7FFF000))
    elif how == "unaligned-data":
        u.poke(path, l2 + 8, struct.pack("<Q", 0x8800))
    elif how == "bad-l2":
        u.poke(path, l1 + 8, struct.pack("<Q", 0x123000000))
    elif how == "double":
        with open(path, "rb") as f:
            f.seek(l2)
            first = f.read(8)
        u.poke(path, l2 + 8, first)
    return path


@pytest.mark.parametrize("how", ["leak", "bad-data", "unaligned-data", "bad-l2", "double"])
def test_check_like_qemu(tmp_path, how):
    path = damaged(tmp_path, how)
    same_check(path)
    human_q = helpers._txt(helpers.qemu_img("check", "-f", FMT, path).stdout)
    assert helpers.vdisk_cli("check", "-f", FMT, path).stdout == human_q


@pytest.mark.parametrize("how", ["leak", "bad-data", "bad-l2"])
def test_check_repair_like_qemu(tmp_path, how):
    a = damaged(tmp_path, how)
    b = str(tmp_path / "copy.qed")
    import shutil
    shutil.copyfile(a, b)
    q = helpers.qemu_img("check", "-r", "all", "--output=json", "-f", FMT, a)
    v = helpers.vdisk_cli("check", "-r", "all", "--output=json", "-f", FMT, b)
    assert v.returncode == q.returncode
    qj = json.loads(helpers._txt(q.stdout))
    vj = json.loads(v.stdout)
    qj.pop("filename"), vj.pop("filename")
    assert qj == vj
    assert "corruptions" not in helpers.qemu_check(b, FMT)


# -- mutations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", u.cells([1, 2], (1,)))
def test_mutations(tmp_path, seed):
    good = qemu_create(tmp_path / "good.qed", 8 * MiB, cluster_size="4k", table_size="1" if False else "2")
    helpers.qemu_io(FMT, good, "write -P 1 0 12k", "write -P 2 4M 8k", "write -P 3 %d 4k" % (8 * MiB - 4096))
    with open(good, "rb") as f:
        l1 = struct.unpack_from("<Q", f.read(64), 40)[0]
    regions = [(0, 64), (l1, 32), (l1 + 8192, 16 * 8 * 3)]
    out = u.mutation_run(good, FMT, regions, seed, 25, tmp_path)
    assert out["error"] > 0


def test_mutations_backing_header(tmp_path):
    helpers.make_raw(tmp_path / "base.raw", 2 * MiB, [(0, MiB)])
    good = qemu_create(tmp_path / "good.qed", None, backing="base.raw", backing_fmt="raw", cluster_size="4k")
    helpers.qemu_io(FMT, good, "write -P 1 0 4k")
    out = u.mutation_run(good, FMT, [(0, 80)], 11, 20, tmp_path, cli_every=5)
    assert out["error"] > 0
