"""qcow2 in-place operations against the qemu-img oracle: snapshots, resize, commit, rebase, amend.

Every result must pass ``qemu-img check`` and read, through qemu-img, as the content
the operation promises.
"""
import json
import os
import subprocess

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import ImageError
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.commit import commit
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.rebase import rebase
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver

MiB = 1 << 20
QCOW2 = get_driver("qcow2")


def run(*args, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check)


def qemu_check_json(path):
    out = run("qemu-img", "check", "--output=json", path, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def qemu_raw(path, tmp_path, snapshot=None, name="out.raw"):
    dest = tmp_path / name
    args = ["qemu-img", "convert", "-O", "raw"]
    if snapshot:
        args += ["-l", "snapshot.name=" + snapshot]
    run(*args, path, dest)
    return dest.read_bytes()


def make(path, size=4 * MiB, **options):
    QCOW2.create(str(path), size, QCOW2.parse_options(options))


def fill(image, offset, length, value):
    image.write(offset, bytes([value]) * length)


OPTION_CASES = [
    {},
    {"compat": "0.10"},
    {"cluster_size": "4k", "refcount_bits": "4"},
    {"extended_l2": "on", "cluster_size": "32k"},
    {"cluster_size": "512"},
]


@pytest.mark.parametrize("options", OPTION_CASES, ids=lambda o: ",".join("%s=%s" % kv for kv in o.items()) or "default")
def test_vdisk_snapshots_read_by_qemu(tmp_path, options):
    path = tmp_path / "s.qcow2"
    make(path, **options)
    img = open_image(str(path), "qcow2", writable=True)
    fill(img, 0, 300000, 1)
    fill(img, 2 * MiB + 100, 70000, 2)
    first = img.read(0, img.virtual_size)
    img.create_snapshot("one")
    fill(img, 100, 200000, 3)
    img.write_zeroes(2 * MiB, 65536, unmap=True)
    second = img.read(0, img.virtual_size)
    img.create_snapshot("two")
    fill(img, 3 * MiB, 1000, 4)
    active = img.read(0, img.virtual_size)
    close_chain(img)
    assert qemu_check_json(path).get("corruptions", 0) == 0
    listing = run("qemu-img", "snapshot", "-l", path).stdout
    assert [line.split()[:2] for line in listing.splitlines()[2:]] == [["1", "one"], ["2", "two"]]
    assert qemu_raw(path, tmp_path, "one", "one.raw") == first
    assert qemu_raw(path, tmp_path, "two", "two.raw") == second
    assert qemu_raw(path, tmp_path) == active
    # qemu applies and deletes what vdisk made
    run("qemu-img", "snapshot", "-a", "one", path)
    assert qemu_raw(path, tmp_path) == first
    run("qemu-img", "snapshot", "-d", "two", path)
    assert "leaks" not in qemu_check_json(path)


@pytest.mark.parametrize("options", [{}, {"compat": "0.10"}, {"extended_l2": "on"}], ids=["default", "v2", "extl2"])
def test_qemu_snapshots_applied_and_deleted_by_vdisk(tmp_path, options):
    path = tmp_path / "q.qcow2"
    opts = ",".join("%s=%s" % kv for kv in options.items())
    run("qemu-img", "create", "-f", "qcow2", *(["-o", opts] if opts else []), path, "4M")
    run("qemu-io", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x12 3M 64k", path)
    run("qemu-img", "snapshot", "-c", "base", path)
    before = qemu_raw(path, tmp_path, name="before.raw")
    run("qemu-io", "-c", "write -P 0x21 512k 1M", "-c", "write -z 3M 64k", path)
    run("qemu-img", "snapshot", "-c", "later", path)
    later = qemu_raw(path, tmp_path, name="later.raw")
    img = open_image(str(path), "qcow2", writable=True)
    assert [(s["id"], s["name"]) for s in img.snapshots()] == [("1", "base"), ("2", "later")]
    img.apply_snapshot("base")
    assert img.read(0, img.virtual_size) == before
    img.delete_snapshot("later")
    fill(img, 0, 4096, 0x99)
    close_chain(img)
    check = qemu_check_json(path)
    assert "corruptions" not in check and "leaks" not in check
    assert qemu_raw(path, tmp_path, name="after.raw") == b"\x99" * 4096 + before[4096:]
    assert len(later) == len(before)
    with pytest.raises(ImageError, match="not found"):
        img = open_image(str(path), "qcow2", writable=True)
        try:
            img.apply_snapshot("later")
        finally:
            close_chain(img)


@pytest.mark.parametrize("options", [{}, {"cluster_size": "4k"}, {"extended_l2": "on"}, {"compat": "0.10"}],
                         ids=["default", "4k", "extl2", "v2"])
def test_resize_grow_and_shrink(tmp_path, options):
    path = tmp_path / "r.qcow2"
    make(path, size=3 * MiB + 512, **options)
    img = open_image(str(path), "qcow2", writable=True)
    fill(img, 0, 3 * MiB + 512, 0x5A)
    img.resize(64 * MiB)          # the L1 table grows for 4k clusters
    fill(img, 40 * MiB, 4096, 0x6B)
    with pytest.raises(ImageError, match="--shrink"):
        img.resize(1 * MiB)
    img.resize(40 * MiB + 2048, shrink=True)
    close_chain(img)
    assert "corruptions" not in qemu_check_json(path)
    info = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    assert info["virtual-size"] == 40 * MiB + 2048
    data = qemu_raw(path, tmp_path)
    assert data[:3 * MiB + 512] == b"\x5A" * (3 * MiB + 512)
    assert data[3 * MiB + 512:40 * MiB] == bytes(40 * MiB - 3 * MiB - 512)   # grown area reads zeros
    assert data[40 * MiB:] == b"\x6B" * 2048


def test_resize_over_longer_backing_reads_zeros(tmp_path):
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-f", "qcow2", base, "8M")
    run("qemu-io", "-c", "write -P 0x33 0 8M", base)
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top, "2M")
    img = open_image(str(top), "qcow2", writable=True)
    img.resize(6 * MiB)
    close_chain(img)
    data = qemu_raw(top, tmp_path)
    assert data[:2 * MiB] == b"\x33" * (2 * MiB) and data[2 * MiB:] == bytes(4 * MiB)


def _chain(tmp_path):
    run("qemu-img", "create", "-f", "qcow2", tmp_path / "base.qcow2", "4M")
    run("qemu-io", "-c", "write -P 1 0 4M", tmp_path / "base.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "mid.qcow2", "6M")
    run("qemu-io", "-c", "write -P 2 1M 1M", "-c", "write -z 3M 100k", tmp_path / "mid.qcow2")
    run("qemu-img", "create", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", tmp_path / "top.qcow2", "6M")
    run("qemu-io", "-c", "write -P 3 1500k 1M", "-c", "write -P 4 5M 1000", tmp_path / "top.qcow2")
    return qemu_raw(tmp_path / "top.qcow2", tmp_path, name="want.raw")


def test_commit_into_backing_then_empty(tmp_path):
    want = _chain(tmp_path)
    target = commit(str(tmp_path / "top.qcow2"))
    assert os.path.samefile(target, tmp_path / "mid.qcow2")
    for name in ("top.qcow2", "mid.qcow2"):
        assert "corruptions" not in qemu_check_json(tmp_path / name)
    assert qemu_raw(tmp_path / "mid.qcow2", tmp_path, name="mid.raw") == want
    assert qemu_raw(tmp_path / "top.qcow2", tmp_path, name="top.raw") == want
    top_map = json.loads(run("qemu-img", "map", "--output=json", tmp_path / "top.qcow2").stdout)
    assert all(entry["depth"] > 0 for entry in top_map)   # emptied: everything comes from below


def test_commit_to_deeper_base_grows_it(tmp_path):
    want = _chain(tmp_path)
    commit(str(tmp_path / "top.qcow2"), base=str(tmp_path / "base.qcow2"), drop=True)
    assert "corruptions" not in qemu_check_json(tmp_path / "base.qcow2")
    assert qemu_raw(tmp_path / "base.qcow2", tmp_path, name="b.raw") == want


@pytest.mark.parametrize("new_backing", ["base.qcow2", ""], ids=["to-base", "standalone"])
def test_safe_rebase_keeps_content(tmp_path, new_backing):
    want = _chain(tmp_path)
    fmt = rebase(str(tmp_path / "top.qcow2"), new_backing)
    assert fmt == ("qcow2" if new_backing else None)
    assert "corruptions" not in qemu_check_json(tmp_path / "top.qcow2")
    assert qemu_raw(tmp_path / "top.qcow2", tmp_path, name="t.raw") == want
    info = json.loads(run("qemu-img", "info", "--output=json", tmp_path / "top.qcow2").stdout)
    assert info.get("backing-filename") == (new_backing or None)


def test_unsafe_rebase_only_rewrites_header(tmp_path):
    _chain(tmp_path)
    rebase(str(tmp_path / "top.qcow2"), "base.qcow2", "qcow2", unsafe=True)
    info = json.loads(run("qemu-img", "info", "--output=json", tmp_path / "top.qcow2").stdout)
    assert info["backing-filename"] == "base.qcow2" and info["backing-filename-format"] == "qcow2"
    with pytest.raises(ImageError, match="-F"):
        rebase(str(tmp_path / "top.qcow2"), "mid.qcow2", unsafe=True)


AMEND_CASES = [
    ("", {"compat": "0.10"}, {"compat": "0.10"}),
    ("", {"refcount_bits": "64"}, {"refcount-bits": 64}),
    ("", {"refcount_bits": "2"}, {"refcount-bits": 2}),
    ("compat=0.10", {"compat": "1.1", "lazy_refcounts": "on"}, {"compat": "1.1", "lazy-refcounts": True}),
    ("lazy_refcounts=on", {"lazy_refcounts": "off"}, {"lazy-refcounts": False}),
]


@pytest.mark.parametrize("create,amend,expect", AMEND_CASES, ids=[str(c[1]) for c in AMEND_CASES])
@pytest.mark.parametrize("with_backing", [False, True], ids=["alone", "backed"])
def test_amend_read_back_by_qemu(tmp_path, create, amend, expect, with_backing):
    path = tmp_path / "a.qcow2"
    args = ["qemu-img", "create", "-f", "qcow2"]
    if create:
        args += ["-o", create]
    if with_backing:
        run("qemu-img", "create", "-f", "qcow2", tmp_path / "b.qcow2", "4M")
        run("qemu-io", "-c", "write -P 7 0 4M", tmp_path / "b.qcow2")
        args += ["-b", "b.qcow2", "-F", "qcow2"]
    run(*args, path, "4M")
    zero_cmds = ["-c", "write -z 2M 64k", "-c", "write -z -u 0 64k"] if "compat=0.10" not in create else []
    run("qemu-io", "-c", "write -P 1 0 1M", *zero_cmds, path)
    run("qemu-img", "snapshot", "-c", "s1", path)
    run("qemu-io", "-c", "write -P 5 3M 4k", *(["-c", "write -z 1M 128k"] if zero_cmds else []), path)
    before = qemu_raw(path, tmp_path, name="before.raw")
    snap_before = qemu_raw(path, tmp_path, "s1", "sb.raw")
    img = open_image(str(path), "qcow2", writable=True)
    img.amend(QCOW2.parse_options(amend))
    close_chain(img)
    check = qemu_check_json(path)
    assert "corruptions" not in check and "leaks" not in check
    assert qemu_raw(path, tmp_path, name="after.raw") == before
    assert qemu_raw(path, tmp_path, "s1", "sa.raw") == snap_before
    data = json.loads(run("qemu-img", "info", "--output=json", path).stdout)["format-specific"]["data"]
    for key, value in expect.items():
        assert data[key] == value


def test_amend_refcount_bits_too_narrow_for_snapshots_fails_cleanly(tmp_path):
    path = tmp_path / "n.qcow2"
    make(path)
    img = open_image(str(path), "qcow2", writable=True)
    fill(img, 0, MiB, 1)
    img.create_snapshot("s")
    with pytest.raises(ImageError, match="refcount_bits=1"):
        img.amend(QCOW2.parse_options({"refcount_bits": "1"}))
    close_chain(img)
    check = qemu_check_json(path)
    assert "corruptions" not in check and "leaks" not in check
    data = json.loads(run("qemu-img", "info", "--output=json", path).stdout)["format-specific"]["data"]
    assert data["refcount-bits"] == 16


def test_amend_refuses_create_only_options(tmp_path):
    path = tmp_path / "a.qcow2"
    make(path)
    img = open_image(str(path), "qcow2", writable=True)
    try:
        for name, value in (("cluster_size", "4k"), ("extended_l2", "on"), ("preallocation", "metadata")):
            with pytest.raises(ImageError, match="only supported for image creation"):
                img.amend(QCOW2.parse_options({name: value}))
        with pytest.raises(ImageError, match="Invalid parameter 'foo'"):
            img.amend({"foo": "1"})
    finally:
        close_chain(img)


def test_check_repair_needs_writable_and_policy(tmp_path):
    path = tmp_path / "c.qcow2"
    make(path)
    img = open_image(str(path), "qcow2")
    try:
        assert img.check().to_json()["check-errors"] == 0
        with pytest.raises(ImageError):
            img.check("all")
    finally:
        close_chain(img)
    img = open_image(str(path), "qcow2", writable=True, policy=Policy(repair=True))
    try:
        assert img.check("all").corruptions == 0
    finally:
        close_chain(img)
