"""parallels against qemu-img 7.2: what is specific to parallels (the shared tests are in
test_format_conformance).

An image with a format extension (dirty bitmaps) is never written, and mutations of it give
one-line errors; the in-use flag is set while vdisk has an image open and refused as QEMU refuses
it; ``check -r`` repairs BAT entries past the end, leaked tails and duplicate entries (which
qemu-img 7.2 does not look for).
"""
import json
import struct

import pytest

import helpers
import imgfmt_util as u
from conformance import BY_NAME, check_like_qemu
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.parallels import header as hdr

FMT = "parallels"
PARALLELS = BY_NAME[FMT]
qemu_create = PARALLELS.qemu_create


def in_use(path):
    with open(path, "rb") as f:
        return struct.unpack_from("<I", f.read(64), 44)[0]


def test_format_extension_not_written(tmp_path):
    path = u.sample("parallels-with-bitmap", tmp_path)
    with pytest.raises(errors.UnsupportedFeature):
        u.open_image(path, FMT, writable=True)


def test_inuse_flag_set_while_open_and_refused_like_qemu(tmp_path):
    path = qemu_create(tmp_path / "q.prl", MiB, cluster_size="64k")
    img = u.open_image(path, FMT, writable=True)
    try:
        assert in_use(path) == hdr.INUSE_MAGIC
        img.write(0, b"x" * 512)
    finally:
        img.close()
    assert in_use(path) == 0
    u.poke(path, 44, struct.pack("<I", hdr.INUSE_MAGIC))
    q = helpers.run("qemu-io", "-f", FMT, "-c", "write 0 512", path, check=False)
    assert b"not closed correctly" in q.stderr + q.stdout
    with pytest.raises(errors.CorruptImage, match="not closed correctly"):
        u.open_image(path, FMT, writable=True)
    assert u.read_all(path, FMT)[:512] == b"x" * 512     # read-only opens still work
    assert check_like_qemu(PARALLELS, path)["rc"] == 2
    assert u.vdisk("check", "-r", "all", "-f", FMT, path).returncode == 0
    assert helpers.qemu_check(path, FMT)["rc"] == 0


# -- check ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["outside", "leak", "outside-and-leak", "duplicate"])
@pytest.mark.parametrize("mode", u.cells(["leaks", "all"], ("all",)))
def test_check_repair(tmp_path, how, mode):
    path = PARALLELS.damaged(tmp_path, how)
    before = u.read_all(path, FMT)
    v = u.vdisk("check", "-r", mode, "--output=json", "-f", FMT, path)
    result = json.loads(v.stdout)
    q = helpers.qemu_check(path, FMT)
    if mode == "all" or how == "leak":
        assert v.returncode == 0, v.stderr
        assert q["rc"] == 0, q
        assert result.get("leaks-fixed", 0) + result.get("corruptions-fixed", 0) > 0
    else:
        assert v.returncode == 2
        assert "leaks" not in result
    if how in ("leak", "duplicate"):
        assert u.read_all(path, FMT) == before
    if how == "duplicate" and mode == "all":
        # the copy is independent now: a write to one no longer shows in the other
        u.write_engine(path, FMT, [(8 * 65536, b"\x09" * 512)])
        data = u.read_all(path, FMT)
        assert data[65536:65536 + 512] == before[65536:65536 + 512]


def test_duplicate_reported(tmp_path):
    # qemu-img 7.2 does not look for BAT entries sharing a cluster (QEMU 8.1 does): vdisk reports them
    path = PARALLELS.damaged(tmp_path, "duplicate")
    v = u.vdisk("check", "--output=json", "-f", FMT, path)
    assert v.returncode == 2
    assert json.loads(v.stdout)["corruptions"] == 1
    assert "BAT entry 8 refers to cluster 1" in v.stderr


# -- mutations ------------------------------------------------------------------------------------
def test_mutations_format_extension(tmp_path):
    good = u.sample("parallels-with-bitmap", tmp_path)
    out = u.mutation_run(good, FMT, [(0, 64), (2 * MiB, 256)], 7, 20, tmp_path, cli_every=5)
    # the seed fixes the flips: a different split means a check was added to or lost from the parser
    assert out == {"error": 19, "clean": 1}
