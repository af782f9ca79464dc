"""vdi against qemu-img 7.2: create, read, write, info, check, bad headers, mutations.

Both directions over every create option value (static off/on; preallocation is accepted and, as
in qemu-img 7.2, changes nothing): images qemu-img creates and qemu-io writes read byte-identically
through vdisk (unaligned sizes, sizes rounded to a sector, over 2 GiB, the last sector); images
vdisk creates and writes pass ``qemu-img check`` and ``qemu-img compare``; vdisk writes into
qemu-made images and qemu-io reads them back; check reports what qemu-img reports.
"""
import json
import os
import struct

import pytest

import helpers
import imgfmt_util as u
from helpers import MiB, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vdi import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver, probe_file

FMT = "vdi"
STATIC = ["off", "on"]
SIZES = [0, 12345, 1000000, 5 * MiB + 512, 3 * MiB]
UUID_FIELDS = (392, 424)          # uuid_image and uuid_last_snap: random in every image


def slow(values):
    return pytest.param(*values, marks=pytest.mark.slow)


def qemu_create(path, size, **opts):
    return u.create("qemu", path, FMT, size, **opts)


def vdisk_create(path, size, **opts):
    return u.create("vdisk", path, FMT, size, **opts)


def info_json(path, tool):
    return u.info_json(path, FMT, tool)


def masked(path):
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[UUID_FIELDS[0]:UUID_FIELDS[1]] = bytes(UUID_FIELDS[1] - UUID_FIELDS[0])
    return bytes(data)


def check_json(path):
    proc = u.vdisk("check", "--output=json", "-f", FMT, path)
    return proc, json.loads(proc.stdout)


# -- create ------------------------------------------------------------------------------------
@pytest.mark.parametrize("static", STATIC)
@pytest.mark.parametrize("size", u.cells(SIZES, (1000000,)))
def test_create_identical_to_qemu(tmp_path, static, size):
    a = qemu_create(tmp_path / "q.vdi", size, static=static)
    b = vdisk_create(tmp_path / "v.vdi", size, static=static)
    assert masked(a) == masked(b)
    assert os.path.getsize(a) == os.path.getsize(b)
    assert info_json(a, "qemu") == info_json(b, "vdisk")
    assert info_json(a, "vdisk") == info_json(a, "qemu")
    assert helpers.qemu_check(b, FMT)["rc"] == 0
    with open(b, "rb") as f:
        h = hdr.parse_header(f.read(512))
    # fresh version-4 UUIDs, stored in VirtualBox's byte order, as qemu-img writes them
    assert h.uuid("uuid_image").version == 4 and h.uuid("uuid_last_snap").version == 4
    assert h.uuid_image != h.uuid_last_snap
    assert (h.cylinders, h.heads, h.sectors, h.sector_size) == (0, 0, 0, 512)


@pytest.mark.parametrize("prealloc", u.cells(["falloc", "full"], ("full",)))
def test_create_preallocation_accepted_like_qemu(tmp_path, prealloc):
    a = qemu_create(tmp_path / "q.vdi", 3 * MiB, preallocation=prealloc)
    b = vdisk_create(tmp_path / "v.vdi", 3 * MiB, preallocation=prealloc)
    assert masked(a) == masked(b)


@pytest.mark.parametrize("opts,size,message", [
    ({}, "5P", "Unsupported VDI image size (size is 0x14000000000000, max supported is 0x1fffff8000000)"),
    slow(({"static": "maybe"}, "1M", "static")),
    slow(({"cluster_size": "2M"}, "1M", "cluster_size")),
])
def test_create_refused_like_qemu(tmp_path, opts, size, message):
    o = ",".join("%s=%s" % kv for kv in opts.items())
    q = helpers.qemu_img("create", "-f", FMT, *(["-o", o] if o else []), tmp_path / "q.vdi", size)
    assert q.returncode == 1 and message in helpers._txt(q.stderr)
    v = u.vdisk("create", "-f", FMT, *(["-o", o] if o else []), tmp_path / "v.vdi", size)
    assert v.returncode == 1 and message in v.stderr and len(v.stderr.splitlines()) == 1, v.stderr
    assert not os.path.exists(tmp_path / "v.vdi")


def test_options_help_lists_qemu_options():
    q = helpers._txt(helpers.qemu_img("create", "-f", FMT, "-o", "help", "x").stdout)
    qlines = {l.split("=")[0].strip(): l for l in q.splitlines()[1:]}
    ours = u.vdisk("create", "-f", FMT, "-o", "help", check=True).stdout.splitlines()[1:]
    for line in ours:
        assert " ".join(line.split()) == " ".join(qlines[line.split("=")[0].strip()].split())
    assert {l.split("=")[0].strip() for l in ours} == {"size", "static", "preallocation"}


def test_probe(tmp_path):
    path = qemu_create(tmp_path / "q.img", MiB)
    assert probe_file(path) == FMT
    with open(path, "rb") as f:
        head = f.read(512)
    assert get_driver(FMT).probe(head, "x") == 100
    assert get_driver(FMT).probe(head[:511], "x") == 0     # QEMU wants a whole header


# -- qemu writes, vdisk reads -------------------------------------------------------------------
def qemu_fill(path, size):
    """The fill pattern written by qemu-img at the start, across blocks, unaligned, at the last sector."""
    wanted = [(0, 3000), (MiB - 700, MiB + 1400), (size // 2 + 77, 1000), (size - 512, 512)]
    raw = helpers.make_raw(str(path) + ".src", size, [(o, min(n, size - o)) for o, n in wanted if 0 <= o < size])
    helpers.run("qemu-img", "convert", "-n", "-f", "raw", "-O", FMT, raw, path)
    return raw


@pytest.mark.parametrize("static", STATIC)
@pytest.mark.parametrize("size", u.cells(SIZES[1:], (5 * MiB + 512,)))
def test_qemu_written_reads_identically(tmp_path, static, size):
    path = qemu_create(tmp_path / "q.vdi", size, static=static)
    raw = qemu_fill(path, -(-size // 512) * 512)
    with open(raw, "rb") as f:
        assert u.read_all(path, FMT) == f.read()
    u.assert_same_as_qemu(path, FMT, tmp_path)
    assert info_json(path, "vdisk") == info_json(path, "qemu")
    v = u.vdisk("map", "--output=json", "-f", FMT, path, check=True).stdout
    q = helpers._txt(helpers.qemu_img("map", "--output=json", "-f", FMT, path, check=True).stdout)
    assert json.loads(v) == json.loads(q)


@pytest.mark.parametrize("static", u.cells(STATIC, ("off",)))
def test_qemu_written_over_2g(tmp_path, static):
    size = 3 * 1024 * MiB + 512
    path = qemu_create(tmp_path / "big.vdi", size, static=static)
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


def test_odd_disk_size_rounded_up_like_qemu(tmp_path):
    # VBoxManage convertfromraw writes sizes that are not whole sectors: QEMU rounds them up
    path = qemu_create(tmp_path / "q.vdi", 3 * MiB)
    u.poke(path, 368, struct.pack("<Q", 2 * MiB + 100))
    assert info_json(path, "vdisk") == info_json(path, "qemu")
    assert info_json(path, "vdisk")["virtual-size"] == 2 * MiB + 512


# -- vdisk writes, qemu reads -------------------------------------------------------------------
@pytest.mark.parametrize("static", STATIC)
@pytest.mark.parametrize("size", u.cells([5 * MiB + 512, 12345, 3 * MiB], (5 * MiB + 512,)))
def test_vdisk_convert_passes_qemu(tmp_path, static, size):
    raw = helpers.make_raw(tmp_path / "src.raw", size,
                           [(0, min(size, 70000)), (min(MiB - 100, size // 2), min(300000, size // 3)),
                            (size - 512, 512)])
    out = tmp_path / "v.vdi"
    u.vdisk("convert", "-f", "raw", "-O", FMT, "-o", "static=%s" % static, raw, out, check=True)
    c = helpers.qemu_check(out, FMT)
    assert c["rc"] == 0 and "corruptions" not in c, c
    assert helpers.qemu_compare(out, raw, FMT, "raw")
    assert info_json(out, "vdisk") == info_json(out, "qemu")


@pytest.mark.parametrize("static", STATIC)
def test_vdisk_writes_into_qemu_image(tmp_path, static):
    size = 4 * MiB + 1536
    path = qemu_create(tmp_path / "q.vdi", size, static=static)
    helpers.qemu_io(FMT, path, "write -P 0x41 0 8k", "write -P 0x42 %d 4k" % (3 * MiB))
    u.write_engine(path, FMT, [(4096, pattern(4096, 10000)), (MiB + 3, pattern(MiB + 3, 70001)),
                               (2 * MiB - 5, pattern(2 * MiB - 5, 10)), (size - 512, pattern(size - 512, 512))])
    helpers.qemu_io(FMT, path, "read -P 0x41 0 4k", "read -P 0x42 %d 4k" % (3 * MiB))
    c = helpers.qemu_check(path, FMT)
    assert c["rc"] == 0, c
    ref = u.qemu_raw(path, FMT, tmp_path)
    assert ref[4096:14096] == pattern(4096, 10000)
    assert ref[MiB + 3:MiB + 70004] == pattern(MiB + 3, 70001)
    assert ref[2 * MiB - 5:2 * MiB + 5] == pattern(2 * MiB - 5, 10)
    assert ref[size - 512:] == pattern(size - 512, 512)
    assert ref == u.read_all(path, FMT)


def test_write_zeroes_and_allocation_order(tmp_path):
    path = vdisk_create(tmp_path / "v.vdi", 4 * MiB)
    img = u.open_image(path, FMT, writable=True)
    try:
        img.write(MiB, b"\x01" * 4096)
        img.write_zeroes(0, 4 * MiB)          # unallocated blocks stay unallocated
        assert img.read(0, 4 * MiB) == bytes(4 * MiB)
        assert [e for e in img.bmap] == [hdr.UNALLOCATED, 0, hdr.UNALLOCATED, hdr.UNALLOCATED]
        # an interrupted allocation: data and header written, the block map sector not
        writes = []
        real = img.host.pwrite

        def failing(data, offset):
            writes.append(offset)
            if offset == hdr.BMAP_OFFSET:
                raise OSError("interrupted")
            real(data, offset)
        img.host.pwrite = failing
        with pytest.raises(OSError):
            img.write(3 * MiB, b"\x02" * 512)
        assert writes == [img.header.offset_data + MiB, 0, hdr.BMAP_OFFSET]
    finally:
        img.host.pwrite = real
        img.close()
    assert u.read_all(path, FMT) == bytes(4 * MiB)       # the new block is not referenced
    q = helpers.qemu_check(path, FMT)
    v, vj = check_json(path)
    # qemu-img counts the unreferenced block as a mismatch of the allocated count; nothing else
    assert q["rc"] == v.returncode == 2 and q["corruptions"] == vj["corruptions"] == 1
    assert "allocated blocks mismatch, is 1, should be 2" in q["stderr"] and v.stderr == q["stderr"]


# -- check --------------------------------------------------------------------------------------
def damaged(tmp_path, how):
    path = qemu_create(tmp_path / "q.vdi", 4 * MiB)
    helpers.qemu_io(FMT, path, "write -P 1 0 1M", "write -P 2 2M 4k")
    if how == "duplicate":
        u.poke(path, hdr.BMAP_OFFSET + 8, struct.pack("<I", 0))
    elif how == "too-large":
        u.poke(path, hdr.BMAP_OFFSET + 4, struct.pack("<I", 9))
    elif how == "count":
        u.poke(path, 388, struct.pack("<I", 5))
    elif how == "discarded":
        u.poke(path, hdr.BMAP_OFFSET + 8, struct.pack("<I", hdr.DISCARDED))
    return path


@pytest.mark.parametrize("how", u.cells(["clean", "duplicate", "too-large", "count", "discarded"],
                                        ("duplicate", "too-large")))
def test_check_like_qemu(tmp_path, how):
    path = damaged(tmp_path, how)
    q = helpers.qemu_check(path, FMT)
    v, vj = check_json(path)
    assert v.returncode == q["rc"]
    assert vj == {k: val for k, val in q.items() if k not in ("rc", "stderr")}
    assert v.stderr.splitlines() == q["stderr"].splitlines()
    human_q = helpers._txt(helpers.qemu_img("check", "-f", FMT, path).stdout)
    assert u.vdisk("check", "-f", FMT, path).stdout == human_q


@pytest.mark.parametrize("mode", u.cells(["leaks", "all"], ("all",)))
def test_check_repair_unsupported_like_qemu(tmp_path, mode):
    path = damaged(tmp_path, "count")
    q = helpers.qemu_img("check", "-r", mode, "-f", FMT, path)
    v = u.vdisk("check", "-r", mode, "-f", FMT, path)
    assert q.returncode == v.returncode == 63
    assert "does not support checks" in v.stderr


# -- bad headers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("offset,value,message", [
    (64, struct.pack("<I", 0xBEDA1070), "Image not in VDI format (bad signature beda1070)"),
    (68, struct.pack("<I", 0x00020001), "unsupported VDI image (version 2.1)"),
    slow((340, struct.pack("<I", 0x201), "unaligned block map offset 0x201")),
    slow((344, struct.pack("<I", 0x401), "unaligned data offset 0x401")),
    slow((360, struct.pack("<I", 4096), "sector size 4096 is not 512")),
    (376, struct.pack("<I", 2 * MiB), "block size 2097152 is not 1048576"),
    slow((384, struct.pack("<I", 1), "image bitmap has room for 1048576")),
    (384, struct.pack("<I", 0x7FFFFFFF), "too many blocks 2147483647, max is 536870784"),
    (368, struct.pack("<Q", 1 << 60), "Unsupported VDI image size"),
    slow((424, b"\x01", "non-NULL link UUID")),
    (440, b"\x01", "non-NULL parent UUID"),
])
def test_bad_header_refused_like_qemu(tmp_path, offset, value, message):
    path = qemu_create(tmp_path / "q.vdi", 3 * MiB)
    u.poke(path, offset, value)
    if offset == 384 and value == struct.pack("<I", 0x7FFFFFFF):
        u.poke(path, 368, struct.pack("<Q", 1 << 40))       # so that the map has room for the disk
    before = u.sha(path)
    q = helpers.qemu_img("info", "-f", FMT, path)
    assert q.returncode == 1 and message in helpers._txt(q.stderr), helpers._txt(q.stderr)
    v = u.vdisk("info", "-f", FMT, path)
    assert v.returncode == 1 and message in v.stderr and len(v.stderr.splitlines()) == 1, v.stderr
    assert u.sha(path) == before


def test_block_map_beyond_file_refused(tmp_path):
    path = qemu_create(tmp_path / "q.vdi", 3 * MiB)
    u.poke(path, 384, struct.pack("<I", 0x1FFFFF80))            # a 2 GiB block map in a 1 KiB file
    u.poke(path, 368, struct.pack("<Q", 1 << 40))
    with pytest.raises(errors.CorruptImage, match="block map"):
        u.open_image(path, FMT)


def test_hostile_data_offset_not_written(tmp_path):
    path = qemu_create(tmp_path / "q.vdi", 3 * MiB)
    u.poke(path, 344, struct.pack("<I", 0))                     # data blocks would start on the header
    img = u.open_image(path, FMT, writable=True)
    try:
        with pytest.raises(errors.CorruptImage):
            img.write(0, b"x" * 512)
    finally:
        img.close()


# -- mutations ------------------------------------------------------------------------------------
@pytest.mark.parametrize("static", u.cells(STATIC, ("off",)))
@pytest.mark.parametrize("seed", u.cells([1, 2, 3], (1,)))
def test_mutations(tmp_path, static, seed):
    good = qemu_create(tmp_path / "good.vdi", 6 * MiB, static=static)
    helpers.qemu_io(FMT, good, "write -P 1 0 12k", "write -P 2 3M 8k", "write -P 3 %d 4k" % (6 * MiB - 4096))
    regions = [(0, 512), (64, 32), (336, 120), (512, 512)]
    out = u.mutation_run(good, FMT, regions, seed, 30, tmp_path, cli_every=15)
    assert out["error"] + out["clean"] == 30
