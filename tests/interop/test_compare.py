"""vdisk compare against qemu-img compare: the same message, offset and exit status.

Images are made by qemu-img/qemu-io (and the fill pattern for raw files).  vdisk runs
in-process for the matrices (one subprocess test covers the real entry point), qemu-img
as itself.  Offsets include unaligned ones: qemu-img names the first differing sector.
"""
import os
import subprocess

import pytest

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main as vdisk_main
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2.image import Qcow2Image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.raw import RawImage

MiB = 1 << 20
SIZE = 6 * MiB
EXTENTS = [(0, MiB), (2 * MiB + 4096, 300 * 1024), (5 * MiB, 512)]      # the rest are holes


def qemu_compare(*args):
    proc = subprocess.run(["qemu-img", "compare"] + [str(a) for a in args], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def vdisk_compare(capsys, *args):
    """The vdisk command in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = vdisk_main(["compare"] + [str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_same(capsys, *args):
    """Same exit status and stdout as qemu-img; an error is one line on stderr."""
    theirs = qemu_compare(*args)
    mine = vdisk_compare(capsys, *args)
    assert (mine[0], mine[1]) == (theirs[0], theirs[1]), (args, mine, theirs)
    if theirs[0] >= 2:
        assert mine[2].count("\n") == 1 and mine[2].startswith("vdisk: compare: "), mine[2]
    return mine


def poke(path, offset, data=b"\xaa"):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def qcow2_of(src, dst, opts="", compress=False):
    args = ["qemu-img", "convert", "-f", "raw", "-O", "qcow2"] + (["-c"] if compress else []) + \
        (["-o", opts] if opts else []) + [src, dst]
    helpers.run(*args)
    return dst


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    out = {"dir": d}
    out["a.raw"] = helpers.make_raw(d / "a.raw", SIZE, EXTENTS)
    out["a-512.qcow2"] = qcow2_of(out["a.raw"], str(d / "a-512.qcow2"), "cluster_size=512")
    out["a-64k.qcow2"] = qcow2_of(out["a.raw"], str(d / "a-64k.qcow2"))
    out["a-2M.qcow2"] = qcow2_of(out["a.raw"], str(d / "a-2M.qcow2"), "cluster_size=2M")
    out["a-c.qcow2"] = qcow2_of(out["a.raw"], str(d / "a-c.qcow2"), compress=True)
    out["a-extl2.qcow2"] = qcow2_of(out["a.raw"], str(d / "a-extl2.qcow2"), "extended_l2=on")
    return out


# offsets inside data, inside a hole, unaligned, the first and the last byte, across 2 MiB requests
OFFSETS = [0, 1, 12345, MiB - 1, MiB + 100, 2 * MiB + 4096 + 300 * 1024 - 1, 4 * MiB + 513, SIZE - 1]


@pytest.fixture(scope="module")
def variants(images):
    """For each offset: the pattern image with one byte changed there, as raw and as qcow2."""
    d = images["dir"]
    out = {}
    for off in OFFSETS:
        raw = helpers.make_raw(d / ("b%d.raw" % off), SIZE, EXTENTS)
        poke(raw, off)
        out[off] = (raw, qcow2_of(raw, str(d / ("b%d.qcow2" % off)), "cluster_size=4k"))
    return out


PAIRS = [("a.raw", "raw"), ("a-64k.qcow2", "qcow2"), ("a-512.qcow2", "qcow2"), ("a-2M.qcow2", "qcow2"),
         ("a-c.qcow2", "qcow2"), ("a-extl2.qcow2", "qcow2")]


@pytest.mark.parametrize("name,fmt", PAIRS)
def test_identical(capsys, images, name, fmt):
    for other in ("a.raw", "a-64k.qcow2", "a-c.qcow2"):
        out = assert_same(capsys, images[name], images[other])[1]
        assert out == "Images are identical.\n"
        assert_same(capsys, "-f", fmt, images[other], images[name])


@pytest.mark.parametrize("off", OFFSETS)
def test_difference_at(capsys, images, variants, off):
    raw, qcow2 = variants[off]
    want = "Content mismatch at offset %d!\n" % (off // 512 * 512)
    for name in ("a.raw", "a-64k.qcow2", "a-2M.qcow2", "a-c.qcow2"):
        for x, y in ((images[name], raw), (qcow2, images[name])):
            rc, out, _ = assert_same(capsys, x, y)
            assert (rc, out) == (1, want)
    # strict mode stops at the first status difference before or at the content difference
    assert_same(capsys, "-s", images["a.raw"], raw)
    assert_same(capsys, "-s", images["a-64k.qcow2"], qcow2)


def test_strict_allocation_mismatch(capsys, images, tmp_path):
    # same content, different block status: holes of a raw file are allocated zeros, unallocated
    # qcow2 clusters are not; 512-byte clusters split status at every L2 table (32 KiB)
    for x, y in (("a.raw", "a-64k.qcow2"), ("a-64k.qcow2", "a-2M.qcow2"), ("a.raw", "a-512.qcow2"),
                 ("a-c.qcow2", "a-64k.qcow2"), ("a-extl2.qcow2", "a-64k.qcow2")):
        assert_same(capsys, images[x], images[y])
        rc, out, _ = assert_same(capsys, "-s", images[x], images[y])
        assert rc == 1 and "block status mismatch!" in out
    # zero clusters against unallocated ones
    z = str(tmp_path / "z.qcow2")
    u = str(tmp_path / "u.qcow2")
    helpers.run("qemu-img", "create", "-f", "qcow2", z, "2M")
    helpers.run("qemu-img", "create", "-f", "qcow2", u, "2M")
    helpers.qemu_io("qcow2", z, "write -P 1 0 64k", "write -z 1M 64k")
    helpers.qemu_io("qcow2", u, "write -P 1 0 64k")
    assert_same(capsys, z, u)
    # not at 1 MiB: the unallocated run before it already differs, as it does not reach the end
    assert assert_same(capsys, "-s", z, u)[1] == "Strict mode: Offset 65536 block status mismatch!\n"
    # a full raw against qcow2 data that QEMU reports in several runs
    full = helpers.make_raw(tmp_path / "full.raw", MiB, [(0, MiB)])
    for cs in ("512", "64k"):
        q = qcow2_of(full, str(tmp_path / ("full-%s.qcow2" % cs)), "cluster_size=%s,preallocation=full" % cs)
        helpers.qemu_io("qcow2", q, "write -P 1 0 64k")
        helpers.run("qemu-img", "convert", "-O", "raw", q, str(tmp_path / "x.raw"))
        assert_same(capsys, "-s", str(tmp_path / "x.raw"), q)


def test_size_mismatch(capsys, images, tmp_path):
    a = images["a.raw"]
    longer = helpers.make_raw(tmp_path / "longer.raw", SIZE + MiB, EXTENTS)
    data_tail = helpers.make_raw(tmp_path / "tail.raw", SIZE + MiB, EXTENTS + [(SIZE + 777, 100)])
    shorter = helpers.make_raw(tmp_path / "shorter.raw", 5 * MiB, EXTENTS[:2])
    shorter_diff = helpers.make_raw(tmp_path / "shorter-diff.raw", 5 * MiB, EXTENTS[:2])
    poke(shorter_diff, 4096)
    tail_q = qcow2_of(data_tail, str(tmp_path / "tail.qcow2"))
    assert assert_same(capsys, a, longer)[1] == "Warning: Image size mismatch!\nImages are identical.\n"
    assert assert_same(capsys, longer, a)[0] == 0
    assert assert_same(capsys, a, data_tail)[1] == \
        "Warning: Image size mismatch!\nContent mismatch at offset %d!\n" % (SIZE + 512)
    assert_same(capsys, tail_q, images["a-64k.qcow2"])
    assert_same(capsys, shorter, a)
    # a difference in the common part is reported without the size warning
    assert assert_same(capsys, shorter_diff, a)[1] == "Content mismatch at offset 4096!\n"
    for x, y in ((a, longer), (shorter, a), (tail_q, a)):
        assert assert_same(capsys, "-s", x, y)[1] == "Strict mode: Image size mismatch!\n"


def test_unaligned_raw_size_is_whole_sectors(capsys, tmp_path):
    small = str(tmp_path / "small.raw")
    with open(small, "wb") as f:
        f.write(bytes(range(256)) * 3 + b"\x01" * 232)          # 1000 bytes
    padded = str(tmp_path / "padded.raw")
    with open(padded, "wb") as f:
        f.write(open(small, "rb").read() + bytes(24))
    other = str(tmp_path / "other.raw")
    with open(other, "wb") as f:
        f.write(open(small, "rb").read() + b"\x02" + bytes(23))
    assert assert_same(capsys, small, padded)[1] == "Images are identical.\n"
    assert assert_same(capsys, small, other)[1] == "Content mismatch at offset 1000!\n"
    assert_same(capsys, "-s", small, padded)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """base.qcow2 (4 MiB, 4k clusters) <- overlay.qcow2 (6 MiB): writes, a zero write hiding base data."""
    d = tmp_path_factory.mktemp("chain")
    base, overlay = str(d / "base.qcow2"), str(d / "overlay.qcow2")
    helpers.run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", base, "4M")
    helpers.qemu_io("qcow2", base, "write -P 5 0 2M", "write -P 6 3M 4k")
    helpers.run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay, "6M")
    helpers.qemu_io("qcow2", overlay, "write -P 7 512k 64k", "write -z 1M 128k", "write -P 8 5M 4k")
    flat_raw, flat_q = str(d / "flat.raw"), str(d / "flat.qcow2")
    helpers.run("qemu-img", "convert", "-O", "raw", overlay, flat_raw)
    helpers.run("qemu-img", "convert", "-O", "qcow2", overlay, flat_q)
    changed = str(d / "changed.raw")
    helpers.run("qemu-img", "convert", "-O", "raw", overlay, changed)
    poke(changed, 3 * MiB + 4000)          # under data that comes from the backing file
    return {"base": base, "overlay": overlay, "flat.raw": flat_raw, "flat.qcow2": flat_q, "changed": changed}


def test_backing_chains(capsys, chain):
    ov = chain["overlay"]
    for other in ("flat.raw", "flat.qcow2"):
        assert assert_same(capsys, ov, chain[other])[0] == 0
        assert_same(capsys, chain[other], ov)
        assert_same(capsys, "-s", ov, chain[other])
    assert assert_same(capsys, ov, chain["changed"])[1] == "Content mismatch at offset %d!\n" % (3 * MiB + 3584)
    assert assert_same(capsys, ov, chain["base"])[1] == "Content mismatch at offset %d!\n" % (512 * 1024)
    assert_same(capsys, chain["base"], ov)
    assert_same(capsys, "-s", chain["base"], ov)


def test_quiet(capsys, images, variants):
    rc, out, err = assert_same(capsys, "-q", images["a.raw"], variants[12345][0])
    assert (rc, out, err) == (1, "", "")
    assert assert_same(capsys, "-q", images["a.raw"], images["a-c.qcow2"])[:2] == (0, "")


def test_progress(images):
    proc = helpers.vdisk_cli("compare", "-p", images["a.raw"], images["a-64k.qcow2"])
    assert proc.returncode == 0
    lines = proc.stdout.splitlines()
    assert lines[-1] == "Images are identical."
    assert "(100.00/100%)" in proc.stdout and len(lines) > 2
    assert helpers.vdisk_cli("compare", "-p", "-q", images["a.raw"], images["a-64k.qcow2"]).stdout == ""


def test_errors_exit_2(capsys, images, tmp_path):
    a = images["a.raw"]
    missing = str(tmp_path / "missing.qcow2")
    for args in ([missing, a], [a, missing], ["-f", "qcow2", a, a], ["-F", "foo", a, a]):
        rc, out, err = assert_same(capsys, *args)
        assert rc == 2 and out == ""
    # a backing file that is gone
    helpers.run("qemu-img", "create", "-f", "qcow2", str(tmp_path / "gone.qcow2"), "1M")
    ov = str(tmp_path / "ov.qcow2")
    helpers.run("qemu-img", "create", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", ov)
    os.unlink(str(tmp_path / "gone.qcow2"))
    assert assert_same(capsys, ov, a)[0] == 2
    # the real command: one line, exit 2; a usage error stays 1 as in qemu-img
    proc = helpers.vdisk_cli("compare", missing, a)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "missing.qcow2" in proc.stderr and proc.stderr.startswith("vdisk: compare: ")
    assert helpers.vdisk_cli("compare", a).returncode == 1 == qemu_compare(a)[0]


def test_sparse_ranges_are_never_read(capsys, tmp_path, monkeypatch):
    """Two 4 GiB guests with 1 MiB of data: only the data is read, in large requests."""
    big = 4 << 30
    raw = helpers.make_raw(tmp_path / "sparse.raw", big, [(3 << 30, MiB)])
    q = str(tmp_path / "sparse.qcow2")
    helpers.run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q)
    reads = []
    for cls in (RawImage, Qcow2Image):
        original = cls.read

        def counting(self, offset, length, _original=original):
            reads.append(length)
            return _original(self, offset, length)
        monkeypatch.setattr(cls, "read", counting)
    assert vdisk_compare(capsys, raw, q)[:2] == (0, "Images are identical.\n")
    # the raw file's first 4 KiB may be allocated too (qemu-img's file driver does that)
    assert sum(reads) <= 2 * (MiB + 64 * 1024) and len(reads) <= 6, reads
    reads.clear()
    assert vdisk_compare(capsys, "-s", raw, q)[0] == 1
