"""qed against qemu-img 7.2: what is specific to qed (the shared tests are in test_format_conformance).

The need-check flag is set before the first allocating write, as QEMU does, and an interrupted
allocation is checked and repaired by the next read-write open; backing files (raw, written by
vdisk or by qemu-io, zero writes over them) read as qemu-img reads them and stay inside the
image's directory; ``check -r all`` repairs as ``qemu-img check -r all`` does; mutations of a
header with a backing file name give one-line errors.
"""
import json
import os
import shutil
import struct

import pytest

import helpers
import imgfmt_util as u
from conformance import BY_NAME, check_like_qemu
from helpers import MiB, pattern
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qed import header as hdr

FMT = "qed"
QED = BY_NAME[FMT]


def opts(**kw):
    o = ",".join("%s=%s" % kv for kv in kw.items() if kv[1] is not None)
    return ["-o", o] if o else []


def qemu_create(path, size, backing=None, backing_fmt=None, **kw):
    extra = (["-b", backing, "-F", backing_fmt] if backing else [])
    helpers.run("qemu-img", "create", "-q", "-f", FMT, *opts(**kw), *extra, path, *([size] if size else []))
    return str(path)


def vdisk_create(path, size, backing=None, backing_fmt=None, **kw):
    extra = (["-b", backing, "-F", backing_fmt] if backing else [])
    u.vdisk("create", "-q", "-f", FMT, *opts(**kw), *extra, path, *([size] if size else []), check=True)
    return str(path)


def info(path, tool):
    return u.info_json(path, FMT, tool)


def need_check(path):
    with open(path, "rb") as f:
        return struct.unpack_from("<Q", f.read(64), 16)[0] & hdr.F_NEED_CHECK


def test_need_check_flag(tmp_path):
    path = qemu_create(tmp_path / "q.qed", 4 * MiB, cluster_size="4k")
    img = u.open_image(path, FMT, writable=True)
    try:
        img.write(0, b"x" * 4096)
        assert need_check(path)             # set before the first allocating write, as QEMU does
        # qemu-img 7.2 never reports the flag as "dirty-flag"
        assert helpers.qemu_info(path, FMT, "-U")["dirty-flag"] is False
    finally:
        img.close()
    # an interrupted allocation: flag set, a cluster leaked, an L2 entry past the end of the file
    u.poke(path, 16, struct.pack("<Q", hdr.F_NEED_CHECK))
    os.truncate(path, os.path.getsize(path) + 4096)
    assert info(path, "vdisk") == info(path, "qemu")
    u.write_engine(path, FMT, [(8192, b"y" * 512)])     # a read-write open checks and repairs first
    q = helpers.qemu_check(path, FMT)
    assert q["rc"] in (0, 3)
    assert "corruptions" not in q
    assert u.read_all(path, FMT)[:4096] == b"x" * 4096


# -- backing files --------------------------------------------------------------------------------
@pytest.mark.parametrize("writer", ["vdisk", "qemu"])
def test_backing_raw(tmp_path, writer):
    size = 3 * MiB + 512
    helpers.make_raw(tmp_path / "base.raw", size, [(0, size)])
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
    assert check_like_qemu(QED, top)["rc"] == 0
    assert info(top, "vdisk") == info(top, "qemu")


def test_backing_outside_tree_refused(tmp_path):
    (tmp_path / "a").mkdir()
    helpers.make_raw(tmp_path / "base.raw", MiB)
    top = qemu_create(tmp_path / "a" / "top.qed", None, backing="../base.raw", backing_fmt="raw")
    with pytest.raises(errors.PolicyError):
        u.open_image(top, FMT)


# -- check ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["leak", "bad-data", "bad-l2"])
def test_check_repair_like_qemu(tmp_path, how):
    a = QED.damaged(tmp_path, how)
    b = str(tmp_path / "copy.qed")
    shutil.copyfile(a, b)
    q = helpers.qemu_img("check", "-r", "all", "--output=json", "-f", FMT, a)
    v = u.vdisk("check", "-r", "all", "--output=json", "-f", FMT, b)
    assert v.returncode == q.returncode
    qj = json.loads(helpers._txt(q.stdout))
    vj = json.loads(v.stdout)
    qj.pop("filename")
    vj.pop("filename")
    assert qj == vj
    assert "corruptions" not in helpers.qemu_check(b, FMT)


# -- mutations ------------------------------------------------------------------------------------
def test_mutations_backing_header(tmp_path):
    helpers.make_raw(tmp_path / "base.raw", 2 * MiB, [(0, MiB)])
    good = qemu_create(tmp_path / "good.qed", None, backing="base.raw", backing_fmt="raw", cluster_size="4k")
    helpers.qemu_io(FMT, good, "write -P 1 0 4k")
    out = u.mutation_run(good, FMT, [(0, 80)], 11, 20, tmp_path, cli_every=5)
    # the seed fixes the flips: a different split means a check was added to or lost from the parser
    assert out == {"error": 17, "clean": 3}
