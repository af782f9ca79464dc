"""parallels against qemu-img 7.2: create, read, write, info, check, samples, mutations.

Both directions: images qemu-img creates and qemu-io writes read byte-identically through
vdisk (unaligned sizes, sizes rounded to sectors, over 2 GiB, the last sector); images vdisk
creates and writes pass ``qemu-img check`` and ``qemu-img compare``; vdisk writes into
qemu-made images and qemu-io reads them back. The check cases are those QEMU's iotests and
tests/parallels-checks poke (BAT entry past EOF, leaked tail, in-use flag, duplicate entries).
"""
import json
import os
import struct

import pytest

import helpers
import imgfmt_util as u
from helpers import MiB, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.parallels import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver, probe_file

FMT = "parallels"
CLUSTERS = ["512", "1000", "4k", "64k", "1M"]          # 1000: qemu-img rounds it up to 1024
SIZES = [1000000, 4 * MiB, 5 * MiB + 512, 12345]


def qemu_create(path, size, **opts):
    o = ",".join("%s=%s" % kv for kv in opts.items())
    helpers.run("qemu-img", "create", "-q", "-f", FMT, *(["-o", o] if o else []), path, size)
    return str(path)


def vdisk_create(path, size, **opts):
    o = ",".join("%s=%s" % kv for kv in opts.items())
    helpers.vdisk_cli("create", "-q", "-f", FMT, *(["-o", o] if o else []), path, size, check=True)
    return str(path)


def info_json(path, tool):
    if tool == "qemu":
        return helpers.qemu_info(path, FMT)
    return json.loads(helpers.vdisk_cli("info", "--output=json", "-f", FMT, path, check=True).stdout)


# -- create ------------------------------------------------------------------------------------
@pytest.mark.parametrize("cluster", u.cells(CLUSTERS, ("1000", "1M")))
@pytest.mark.parametrize("size", [1000000, 5 * MiB + 512])
def test_create_identical_to_qemu(tmp_path, cluster, size):
    a = qemu_create(tmp_path / "q.prl", size, cluster_size=cluster)
    b = vdisk_create(tmp_path / "v.prl", size, cluster_size=cluster)
    with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read()
    qa, va = info_json(a, "qemu"), info_json(b, "vdisk")
    qa.pop("filename"), va.pop("filename")
    assert qa == va


@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
def test_create_preallocation(tmp_path, prealloc):
    a = qemu_create(tmp_path / "q.prl", 3 * MiB, preallocation=prealloc)
    b = vdisk_create(tmp_path / "v.prl", 3 * MiB, preallocation=prealloc)
    assert u.sha(a) == u.sha(b)
    assert helpers.qemu_check(b, FMT)["rc"] == 0


@pytest.mark.parametrize("opts,message", [
    ({"cluster_size": "0"}, "Image size is too large for this cluster size"),
    ({"cluster_size": "4G"}, "Cluster size is too large"),
])
def test_create_refused_like_qemu(tmp_path, opts, message):
    q = helpers.qemu_img("create", "-f", FMT, "-o", ",".join("%s=%s" % kv for kv in opts.items()),
                         tmp_path / "q.prl", "1M")
    assert q.returncode == 1 and message in helpers._txt(q.stderr)
    v = helpers.vdisk_cli("create", "-f", FMT, "-o", ",".join("%s=%s" % kv for kv in opts.items()),
                          tmp_path / "v.prl", "1M")
    assert v.returncode == 1 and message in v.stderr and len(v.stderr.splitlines()) == 1
    assert not os.path.exists(tmp_path / "v.prl")


def test_options_help_lists_qemu_options():
    q = helpers._txt(helpers.qemu_img("create", "-f", FMT, "-o", "help", "x").stdout)
    ours = helpers.vdisk_cli("create", "-f", FMT, "-o", "help", check=True).stdout.splitlines()[1:]
    qlines = {l.split("=")[0].strip(): l for l in q.splitlines()[1:]}
    for line in ours:
        name = line.split("=")[0].strip()
        assert " ".join(line.split()) == " ".join(qlines[name].split())
    assert {"cluster_size", "preallocation", "size"} <= {l.split("=")[0].strip() for l in ours}


def test_probe(tmp_path):
    path = qemu_create(tmp_path / "q.img", MiB)
    assert probe_file(path) == FMT
    assert get_driver(FMT).probe(b"WithoutFreeSpace" + struct.pack("<I", 2) + bytes(44), "x") == 100
    assert get_driver(FMT).probe(b"WithoutFreeSpace" + struct.pack("<I", 3) + bytes(44), "x") == 0


# -- qemu writes, vdisk reads -------------------------------------------------------------------
def qemu_fill(path, size, cluster):
    """qemu-io writes of the fill pattern: start, a run crossing clusters, unaligned bits, the last sector."""
    wanted = [(0, 3000), (max(0, cluster - 700), 2 * cluster + 1400), (size // 2 + 77, 1000), (size - 512, 512)]
    raw = helpers.make_raw(str(path) + ".src", size, [(o, min(n, size - o)) for o, n in wanted if o < size])
    helpers.run("qemu-img", "convert", "-n", "-f", "raw", "-O", FMT, raw, path)
    return raw


@pytest.mark.parametrize("cluster", u.cells(CLUSTERS, ("512", "64k")))
@pytest.mark.parametrize("size", u.cells(SIZES, (5 * MiB + 512, 12345)))
def test_qemu_written_reads_identically(tmp_path, cluster, size):
    path = qemu_create(tmp_path / "q.prl", size, cluster_size=cluster)
    raw = qemu_fill(path, -(-size // 512) * 512, helpers_size(cluster))
    assert u.read_all(path, FMT) == open(raw, "rb").read()
    assert u.read_all(path, FMT) == u.qemu_raw(path, FMT, tmp_path)
    assert info_json(path, "vdisk") == info_json(path, "qemu")


def helpers_size(text):
    return {"512": 512, "1000": 1024, "4k": 4096, "64k": 65536, "1M": MiB}[text]


def test_qemu_written_over_2g(tmp_path):
    size = 3 * 1024 * MiB + 512
    path = qemu_create(tmp_path / "big.prl", size, cluster_size="64k")
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


@pytest.mark.parametrize("name", ["parallels-v1", "parallels-v2", "parallels-with-bitmap", "fake.parallels"])
def test_samples_read_like_qemu(tmp_path, name):
    path = u.sample(name, tmp_path)
    u.assert_same_as_qemu(path, FMT, tmp_path)
    q = helpers.qemu_check(path, FMT)
    v = helpers.vdisk_cli("check", "--output=json", "-f", FMT, path)
    assert v.returncode == q["rc"]
    assert json.loads(v.stdout) == {k: val for k, val in q.items() if k not in ("rc", "stderr")}
    assert info_json(path, "vdisk") == info_json(path, "qemu")


def test_format_extension_checksum_refused_like_qemu(tmp_path):
    path = u.sample("parallels-with-bitmap", tmp_path)
    u.poke(path, 2 * MiB + 100, b"\xff")          # inside the extension cluster: MD5 no longer matches
    q = helpers.qemu_img("info", "-f", FMT, path)
    assert q.returncode == 1 and b"Wrong checksum" in q.stderr
    v = helpers.vdisk_cli("info", "-f", FMT, path)
    assert v.returncode == 1 and "Wrong checksum" in v.stderr and len(v.stderr.splitlines()) == 1


def test_format_extension_not_written(tmp_path):
    path = u.sample("parallels-with-bitmap", tmp_path)
    with pytest.raises(errors.UnsupportedFeature):
        u.open_image(path, FMT, writable=True)


# -- vdisk writes, qemu reads -------------------------------------------------------------------
@pytest.mark.parametrize("cluster", u.cells(CLUSTERS, ("1000", "4k", "1M")))
@pytest.mark.parametrize("prealloc", u.cells(["off", "full"], ("off",)))
def test_vdisk_convert_passes_qemu(tmp_path, cluster, prealloc):
    size = 5 * MiB + 512
    raw = helpers.make_raw(tmp_path / "src.raw", size, [(0, 70000), (MiB - 100, 300000), (size - 512, 512)])
    out = tmp_path / "v.prl"
    helpers.vdisk_cli("convert", "-f", "raw", "-O", FMT, "-o", "cluster_size=%s,preallocation=%s"
                      % (cluster, prealloc), raw, out, check=True)
    c = helpers.qemu_check(out, FMT)
    assert c["rc"] == 0 and "corruptions" not in c and "leaks" not in c, c
    assert helpers.qemu_compare(out, raw, FMT, "raw")
    v = json.loads(helpers.vdisk_cli("check", "--output=json", "-f", FMT, out).stdout)
    assert v == {k: val for k, val in c.items() if k not in ("rc", "stderr")}


@pytest.mark.parametrize("cluster", u.cells(CLUSTERS, ("512", "64k")))
def test_vdisk_writes_into_qemu_image(tmp_path, cluster):
    size = 4 * MiB + 1536
    path = qemu_create(tmp_path / "q.prl", size, cluster_size=cluster)
    helpers.qemu_io(FMT, path, "write -P 0x41 0 8k")
    u.write_engine(path, FMT, [(4096, pattern(4096, 10000)), (MiB + 3, pattern(MiB + 3, 70001)),
                               (size - 512, pattern(size - 512, 512))])
    helpers.qemu_io(FMT, path, "read -P 0x41 0 4k")
    assert u.read_all(path, FMT)[4096:14096] == pattern(4096, 10000)
    c = helpers.qemu_check(path, FMT)
    assert c["rc"] == 0, c
    ref = u.qemu_raw(path, FMT, tmp_path)
    assert ref[MiB + 3:MiB + 70004] == pattern(MiB + 3, 70001)
    assert ref[size - 512:] == pattern(size - 512, 512)
    assert ref == u.read_all(path, FMT)
    with open(path, "rb") as f:
        assert struct.unpack_from("<I", f.read(64), 44)[0] == 0     # in-use flag cleared on close


def test_inuse_flag_set_while_open_and_refused_like_qemu(tmp_path):
    path = qemu_create(tmp_path / "q.prl", MiB, cluster_size="64k")
    img = u.open_image(path, FMT, writable=True)
    try:
        with open(path, "rb") as f:
            assert struct.unpack_from("<I", f.read(64), 44)[0] == hdr.INUSE_MAGIC
        img.write(0, b"x" * 512)
    finally:
        img.close()
    u.poke(path, 44, struct.pack("<I", hdr.INUSE_MAGIC))
    q = helpers.run("qemu-io", "-f", FMT, "-c", "write 0 512", path, check=False)
    assert b"not closed correctly" in q.stderr + q.stdout
    with pytest.raises(errors.CorruptImage, match="not closed correctly"):
        u.open_image(path, FMT, writable=True)
    assert u.read_all(path, FMT)[:512] == b"x" * 512     # read-only opens still work
    v = helpers.vdisk_cli("check", "--output=json", "-f", FMT, path)
    q = helpers.qemu_check(path, FMT)
    assert v.returncode == q["rc"] == 2
    assert json.loads(v.stdout) == {k: val for k, val in q.items() if k not in ("rc", "stderr")}
    assert helpers.vdisk_cli("check", "-r", "all", "-f", FMT, path).returncode == 0
    assert helpers.qemu_check(path, FMT)["rc"] == 0


# -- check ----------------------------------------------------------------------------------------
def damaged(tmp_path, how):
    path = qemu_create(tmp_path / "q.prl", MiB, cluster_size="64k")
    helpers.qemu_io(FMT, path, "write -P 1 0 64k", "write -P 2 128k 4k", "write -P 3 512k 64k")
    if how == "outside":
        u.poke(path, hdr.bat_offset(2), struct.pack("<I", 64))
    elif how == "leak":
        os.truncate(path, os.path.getsize(path) + 100000)
    elif how == "truncated":
        os.truncate(path, os.path.getsize(path) - 30000)
    elif how == "duplicate":
        u.poke(path, hdr.bat_offset(8), struct.pack("<I", 1))
    elif how == "outside-and-leak":
        u.poke(path, hdr.bat_offset(2), struct.pack("<I", 1000))
        os.truncate(path, os.path.getsize(path) + 65536 * 3)
    return path


@pytest.mark.parametrize("how", ["outside", "leak", "truncated", "outside-and-leak"])
def test_check_like_qemu(tmp_path, how):
    path = damaged(tmp_path, how)
    q = helpers.qemu_check(path, FMT)
    v = helpers.vdisk_cli("check", "--output=json", "-f", FMT, path)
    assert v.returncode == q["rc"]
    assert json.loads(v.stdout) == {k: val for k, val in q.items() if k not in ("rc", "stderr")}
    assert [l for l in v.stderr.splitlines()] == [l for l in q["stderr"].splitlines()]
    human_q = helpers._txt(helpers.qemu_img("check", "-f", FMT, path).stdout)
    assert helpers.vdisk_cli("check", "-f", FMT, path).stdout == human_q


@pytest.mark.parametrize("how", ["outside", "leak", "outside-and-leak", "duplicate"])
@pytest.mark.parametrize("mode", u.cells(["leaks", "all"], ("all",)))
def test_check_repair(tmp_path, how, mode):
    path = damaged(tmp_path, how)
    before = u.read_all(path, FMT)
    v = helpers.vdisk_cli("check", "-r", mode, "--output=json", "-f", FMT, path)
    result = json.loads(v.stdout)
    q = helpers.qemu_check(path, FMT)
    if mode == "all" or how == "leak":
        assert v.returncode == 0 and q["rc"] == 0, (v.stderr, q)
        assert result.get("leaks-fixed", 0) + result.get("corruptions-fixed", 0) > 0
    else:
        assert v.returncode == 2 and "leaks" not in result
    if how in ("leak", "duplicate"):
        assert u.read_all(path, FMT) == before
    if how == "duplicate" and mode == "all":
        # the copy is independent now: a write to one no longer shows in the other
        u.write_engine(path, FMT, [(8 * 65536, b"\x09" * 512)])
        data = u.read_all(path, FMT)
        assert data[65536:65536 + 512] == before[65536:65536 + 512]


def test_duplicate_reported(tmp_path):
    # qemu-img 7.2 does not look for BAT entries sharing a cluster (QEMU 8.1 does): vdisk reports them
    path = damaged(tmp_path, "duplicate")
    v = helpers.vdisk_cli("check", "--output=json", "-f", FMT, path)
    assert v.returncode == 2 and json.loads(v.stdout)["corruptions"] == 1
    assert "BAT entry 8 refers to cluster 1" in v.stderr


# -- mutations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", u.cells([1, 2], (1,)))
def test_mutations(tmp_path, seed):
    good = qemu_create(tmp_path / "good.prl", 2 * MiB, cluster_size="4k")
    helpers.qemu_io(FMT, good, "write -P 1 0 12k", "write -P 2 1M 8k", "write -P 3 %d 4k" % (2 * MiB - 4096))
    regions = [(0, 64), (64, 4 * 512)]
    out = u.mutation_run(good, FMT, regions, seed, 25, tmp_path)
    assert out["error"] + out["clean"] == 25


def test_mutations_format_extension(tmp_path):
    good = u.sample("parallels-with-bitmap", tmp_path)
    out = u.mutation_run(good, FMT, [(0, 64), (2 * MiB, 256)], 7, 20, tmp_path, cli_every=5)
    assert out["error"] > 0


def test_write_over_bat_refused_by_the_overlap_check(tmp_path):
    # 512-byte clusters: BAT entry 1 means host sector 1, inside the BAT (entries 0..2047 at 64..8256)
    path = qemu_create(tmp_path / "q.prl", MiB, cluster_size="512")
    u.poke(path, hdr.bat_offset(0), struct.pack("<I", 1))
    with open(path, "rb") as f:
        before = f.read()
    with pytest.raises(errors.CorruptImage, match=r"Preventing invalid write on metadata \(overlaps with BAT\)"):
        u.write_engine(path, FMT, [(0, b"\xee" * 512)])
    with open(path, "rb") as f:
        after = f.read()
    assert after[hdr.HEADER_SIZE:] == before[hdr.HEADER_SIZE:]     # the BAT and data as they were
