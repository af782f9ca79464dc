"""qcow2 metadata overlap checks (QEMU's Qcow2OverlapCheck, iotest 060), against qemu-io/qemu-img.

An L2 entry (with COPIED, so the cluster is written in place) points a guest cluster at one kind of
metadata; or a refcount of 0 on a metadata cluster lets the allocator hand it out.  QEMU refuses the
write ("Preventing invalid write on metadata (overlaps with <kind>)", qemu-io: "write failed:
Input/output error") and marks the image corrupt (incompatible feature bit 1, nothing else changes on
disk).  vdisk must do the same for an engine write, ``convert -n``, ``commit`` and ``rebase``: refuse
with a one-line error naming the kind, leave the metadata as it was and set the corrupt bit exactly
as QEMU sets it, so later writable opens are refused.

Also QEMU's check class for an L1 entry with flags but no offset (issue 14 item 5).
"""
import json
import shutil
import struct
import subprocess
import sys

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import CorruptImage
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.overlap import MetadataMap, MetadataOverlap
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver

QCOW2 = get_driver("qcow2")
CS = 65536
COPIED = 1 << 63
MASK = 0x00FFFFFFFFFFFE00
GUEST = 2 * 1024 * 1024           # the guest cluster whose L2 entry is made to point at metadata
CORRUPT_BYTE = 79                 # the low byte of incompatible_features (header offset 72..79)
VDISK = [sys.executable, "-m", "ansible_collections.vdisk.images.plugins.module_utils.vdisk"]

# QEMU's default ("cached") set, plus the inactive L2 tables, which vdisk checks too
KINDS = ["active L1 table", "active L2 table", "refcount table", "refcount block", "snapshot table",
         "inactive L1 table", "inactive L2 table"]
# metadata clusters a refcount of 0 lets the allocator hand out (qemu-img's layout of a new image)
ALLOC_KINDS = ["qcow2_header", "refcount table", "refcount block", "active L1 table", "active L2 table"]


def run(*args, check=False):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check)


def vdisk(*args):
    return run(*VDISK, *args)


def u64_at(data, offset):
    return struct.unpack_from(">Q", data, offset)[0]


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def layout(path):
    """Host offsets of each kind of metadata in an image (first L2 table / refblock / snapshot)."""
    data = path.read_bytes()
    l1 = u64_at(data, 40)
    reftable = u64_at(data, 48)
    out = {"qcow2_header": 0, "active L1 table": l1, "refcount table": reftable,
           "refcount block": u64_at(data, reftable) & MASK, "active L2 table": u64_at(data, l1) & MASK}
    if struct.unpack_from(">I", data, 60)[0]:
        snaps = u64_at(data, 64)
        snap_l1 = u64_at(data, snaps)
        out.update({"snapshot table": snaps, "inactive L1 table": snap_l1,
                    "inactive L2 table": u64_at(data, snap_l1) & MASK})
    return out


def crafted(directory, kind, name="t.qcow2"):
    """An image with a snapshot whose active L2 entry for GUEST points (COPIED) at *kind*."""
    directory.mkdir(exist_ok=True)
    path = directory / name
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "4M", check=True)
    run("qemu-io", "-c", "write -P 1 0 200k", path, check=True)
    run("qemu-img", "snapshot", "-c", "s", path, check=True)
    run("qemu-io", "-c", "write -P 2 1M 64k", path, check=True)    # the active L2 table is now its own
    lay = layout(path)
    assert len(set(lay.values())) == len(lay), lay
    poke(path, lay["active L2 table"] + (GUEST // CS) * 8, struct.pack(">Q", COPIED | lay[kind]))
    return path, lay[kind]


def marked_corrupt(before):
    """The file QEMU leaves behind: the same bytes with the corrupt bit set."""
    out = bytearray(before)
    out[CORRUPT_BYTE] |= 2
    return bytes(out)


def qemu_says_corrupt(path):
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", path, check=True).stdout)
    return info["format-specific"]["data"]["corrupt"]


def assert_refused(proc, kind):
    """vdisk's CLI failed with one line naming the metadata kind."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "Preventing invalid write on metadata (overlaps with %s)" % kind in lines[0], lines[0]


def qemu_io_write(path, kind, cmd="write -P 0x2a 2M 4k"):
    """The oracle: qemu-io refuses the write (QEMU checks inactive L2 tables only when asked)."""
    if kind == "inactive L2 table":
        proc = run("qemu-io", "--image-opts", "-c", cmd, "driver=qcow2,file.filename=%s,overlap-check=all" % path)
    else:
        proc = run("qemu-io", "-f", "qcow2", "-c", cmd, path)
    assert "write failed: Input/output error" in proc.stdout, proc.stdout + proc.stderr
    assert "Preventing invalid write on metadata (overlaps with %s)" % kind in proc.stderr, proc.stderr
    return proc


# -- guest writes into metadata through an L2 entry ------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_engine_write_refused_like_qemu(tmp_path, kind):
    ours, target = crafted(tmp_path / "v", kind)
    theirs = tmp_path / "q.qcow2"
    shutil.copyfile(ours, theirs)
    before = ours.read_bytes()
    qemu_io_write(theirs, kind)
    assert theirs.read_bytes() == marked_corrupt(before)      # what QEMU does, and all it does

    img = QCOW2.open(str(ours), writable=True, policy=Policy())
    try:
        with pytest.raises(CorruptImage) as exc:
            img.write(GUEST, b"\x2a" * 4096)
        text = str(exc.value)
        assert "Preventing invalid write on metadata (overlaps with %s)" % kind in text and "\n" not in text
        with pytest.raises(CorruptImage):
            img.write(0, b"\x2b" * 512)                         # no further writes, as QEMU's BDS is dead
    finally:
        img.close()
    after = ours.read_bytes()
    assert after[target:target + CS] == before[target:target + CS], "metadata overwritten"
    assert after == theirs.read_bytes()
    assert qemu_says_corrupt(ours)
    with pytest.raises(CorruptImage, match="corrupt"):
        QCOW2.open(str(ours), writable=True, policy=Policy())
    assert vdisk("info", ours).returncode == 0                  # still readable


def test_version_2_refused_without_a_corrupt_bit(tmp_path):
    """A version 2 header has no field for the corrupt bit: QEMU refuses the write and changes nothing."""
    ours = tmp_path / "v2.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", ours, "4M", check=True)
    run("qemu-io", "-c", "write -P 1 0 200k", ours, check=True)
    lay = layout(ours)
    poke(ours, lay["active L2 table"] + (GUEST // CS) * 8, struct.pack(">Q", COPIED | lay["active L1 table"]))
    theirs = tmp_path / "q.qcow2"
    shutil.copyfile(ours, theirs)
    before = ours.read_bytes()
    qemu_io_write(theirs, "active L1 table")
    img = QCOW2.open(str(ours), writable=True, policy=Policy())
    try:
        with pytest.raises(CorruptImage, match="overlaps with active L1 table"):
            img.write(GUEST, b"\x2a" * 4096)
    finally:
        img.close()
    assert ours.read_bytes() == theirs.read_bytes() == before


@pytest.mark.parametrize("kind", KINDS)
def test_convert_n_refused(tmp_path, kind):
    path, target = crafted(tmp_path, kind)
    src = tmp_path / "src.raw"
    run("qemu-img", "convert", "-O", "raw", path, src, check=True)
    poke(src, GUEST, b"\x2a" * 4096)
    before = path.read_bytes()
    if kind != "inactive L2 table":
        copy = tmp_path / "q.qcow2"
        shutil.copyfile(path, copy)
        q = run("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", src, copy)
        assert q.returncode == 1 and "overlaps with %s" % kind in q.stderr, q.stderr
    proc = vdisk("convert", "-n", "-f", "raw", "-O", "qcow2", src, path)
    assert_refused(proc, kind)
    after = path.read_bytes()
    assert after[:CS] == marked_corrupt(before)[:CS]
    if kind in ("active L2 table", "refcount block"):
        # convert legitimately rewrote other entries of these tables, but never put guest data in them
        assert b"\x2a" * 64 not in after[target:target + CS]
        assert u64_at(after, layout(path)["active L2 table"] + (GUEST // CS) * 8) == COPIED | target
    else:
        assert after[target:target + CS] == before[target:target + CS]
    assert qemu_says_corrupt(path)


@pytest.mark.parametrize("kind", KINDS)
def test_commit_refused(tmp_path, kind):
    results = {}
    original, target = crafted(tmp_path / "orig", kind, "base.qcow2")
    for who in ("qemu", "vdisk"):
        if who == "qemu" and kind == "inactive L2 table":
            continue
        (tmp_path / who).mkdir()
        base = tmp_path / who / "base.qcow2"
        shutil.copyfile(original, base)
        top = tmp_path / who / "top.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, check=True)
        run("qemu-io", "-c", "write -P 0x2a 2M 4k", top, check=True)
        before = base.read_bytes()
        if who == "qemu":
            proc = run("qemu-img", "commit", top)
            assert proc.returncode == 1 and "overlaps with %s" % kind in proc.stderr, proc.stderr
        else:
            assert_refused(vdisk("commit", top), kind)
        results[who] = base.read_bytes()
        assert results[who] == marked_corrupt(before)
    if "qemu" in results:
        assert results["vdisk"] == results["qemu"]


# -- the allocator handing out a metadata cluster whose refcount says it is free ------------------
def alloc_image(directory):
    """An overlay (backing old.qcow2, data at 2M) whose own data is at 0..200k; new.qcow2 is empty."""
    directory.mkdir(exist_ok=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", directory / "old.qcow2", "4M", check=True)
    run("qemu-io", "-c", "write -P 3 2M 64k", directory / "old.qcow2", check=True)
    run("qemu-img", "create", "-q", "-f", "qcow2", directory / "new.qcow2", "4M", check=True)
    ov = directory / "ov.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "old.qcow2", "-F", "qcow2", ov, check=True)
    run("qemu-io", "-c", "write -P 1 0 200k", ov, check=True)
    return ov


def free_metadata_cluster(path, kind):
    """Set the refcount of *kind*'s first cluster to 0 (16-bit refcounts, first refcount block)."""
    lay = layout(path)
    poke(path, lay["refcount block"] + 2 * (lay[kind] // CS), b"\0\0")
    return lay[kind]


@pytest.mark.parametrize("kind", ALLOC_KINDS)
def test_allocation_refused_engine_write(tmp_path, kind):
    ov = alloc_image(tmp_path)
    target = free_metadata_cluster(ov, kind)
    theirs = tmp_path / "q.qcow2"
    shutil.copyfile(ov, theirs)
    before = ov.read_bytes()
    qemu_io_write(theirs, kind)
    assert theirs.read_bytes() == marked_corrupt(before)
    img = QCOW2.open(str(ov), writable=True, policy=Policy())
    try:
        with pytest.raises(CorruptImage, match="overlaps with %s" % kind):
            img.write(GUEST, b"\x2a" * 4096)
    finally:
        img.close()
    after = ov.read_bytes()
    assert after[target:target + CS] == marked_corrupt(before)[target:target + CS], "metadata overwritten"
    assert after == theirs.read_bytes()


@pytest.mark.parametrize("kind", ALLOC_KINDS)
def test_allocation_refused_rebase(tmp_path, kind):
    results = {}
    for who in ("qemu", "vdisk"):
        ov = alloc_image(tmp_path / who)
        free_metadata_cluster(ov, kind)
        before = ov.read_bytes()
        if who == "qemu":
            proc = run("qemu-img", "rebase", "-b", "new.qcow2", "-F", "qcow2", ov)
            assert proc.returncode == 1 and "overlaps with %s" % kind in proc.stderr, proc.stderr
        else:
            assert_refused(vdisk("rebase", "-b", "new.qcow2", "-F", "qcow2", ov), kind)
        results[who] = ov.read_bytes()
        assert results[who] == marked_corrupt(before)
    assert results["vdisk"] == results["qemu"]


def test_clean_images_still_written(tmp_path):
    """Snapshots, growing L1 and refcount tables, L2 copies: nothing legitimate is refused."""
    path = tmp_path / "g.qcow2"
    QCOW2.create(str(path), 64 * 1024 * 1024, QCOW2.parse_options({"cluster_size": "512"}))
    img = QCOW2.open(str(path), writable=True, policy=Policy())
    try:
        img.write(0, b"\x01" * 300000)
        img.create_snapshot("a")
        img.write(1000, b"\x02" * 400000)               # copies of shared L2 tables, new refcount blocks
        img.resize(128 * 1024 * 1024)                   # a larger L1 table elsewhere
        img.write(100 * 1024 * 1024, b"\x03" * 70000)
        img.delete_snapshot("a")
        img.write(5000, b"\x04" * 200000)               # into clusters freed by the snapshot's deletion
    finally:
        img.close()
    proc = run("qemu-img", "check", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not qemu_says_corrupt(path)


# -- the shared mechanism ----------------------------------------------------------------------------
def test_metadata_map():
    m = MetadataMap.from_ranges([("b", 100, 10), ("a", 0, 50), ("c", 100, 10), ("d", 105, 20)], order=["a", "c"])
    assert m.find(50, 50) is None and m.find(125, 1000) is None
    assert m.find(49, 1) == "a" and m.find(0, 1000) == "a"
    assert m.find(109, 1) == "c"                        # coinciding ranges keep both names; order decides
    assert m.find(120, 2) == "d"                        # a partial overlap (damaged image) is found too
    assert m.find(100, 10, ignore=("c",)) == "b"
    m.discard("c", 100, 10)
    m.discard("b", 100, 10)
    assert m.find(100, 5) is None and m.find(106, 1) == "d"
    m.add("e", 60, 5)
    assert m.find(0, 62) == "a" and m.find(55, 7) == "e"
    with pytest.raises(MetadataOverlap) as exc:
        m.check(61, 2, path="x")
    assert exc.value.kind == "e" and "overlaps with e" in str(exc.value)
    assert isinstance(exc.value, CorruptImage)
    # uniform runs (many tables of one size) merge with the rest; each run keeps its own name
    m = MetadataMap.from_ranges([("h", 0, 64)], ["h", "l1", "l2", "rb"],
                                [("l2", [128, 256, 1024], 64), ("rb", [64, 256], 64), ("l1", [1 << 70], 64)])
    assert [m.find(o, 1) for o in (0, 64, 128, 192, 256, 1024, 1088)] == ["h", "rb", "l2", None, "l2", "l2", None]
    m.discard("l2", 256, 64)
    assert m.find(256, 1) == "rb"
    m.discard("rb", 256, 64)
    assert m.find(256, 1) is None
    assert m.find(1 << 66, 1 << 62) is None
    assert len(m) == 4


# -- item 5: an L1 entry with flags but no offset ---------------------------------------------------
@pytest.mark.parametrize("size,index,table", [("4M", 0, "active"), ("1G", 1, "active"), ("1G", 1, "snapshot")])
def test_l1_entry_flags_without_offset(tmp_path, size, index, table):
    path = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, size, check=True)
    run("qemu-io", "-c", "write -P 1 0 200k", "-c", "write -P 2 1M 64k", path, check=True)
    if table == "snapshot":
        run("qemu-img", "snapshot", "-c", "s", path, check=True)
    lay = layout(path)
    l1 = lay["inactive L1 table" if table == "snapshot" else "active L1 table"]
    poke(path, l1 + 8 * index, struct.pack(">Q", COPIED))
    assert run("qemu-img", "check", path).returncode == 2        # qemu-img: corruption
    before = path.read_bytes()
    proc = vdisk("check", "--output=json", path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert json.loads(proc.stdout).get("corruptions", 0) >= 1
    assert path.read_bytes() == before
    theirs = tmp_path / "q.qcow2"
    shutil.copyfile(path, theirs)
    run("qemu-img", "check", "-r", "all", theirs)                 # qemu-img's own repair (it gives up)
    proc = vdisk("check", "-r", "all", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    after = run("qemu-img", "check", "--output=json", path)
    assert after.returncode == 0, after.stdout + after.stderr
    report = json.loads(after.stdout)
    assert "corruptions" not in report and "leaks" not in report
    assert u64_at(path.read_bytes(), l1 + 8 * index) == 0
    # the data reads as it did before the repair, and as qemu-img's repaired copy reads
    cmp = run("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", path, theirs)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
