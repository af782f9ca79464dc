"""vdisk measure against qemu-img measure: the same numbers, lines and JSON, the same refusals.

The --size matrix and the image matrix run the vdisk command in-process (the numbers are
what is tested; one subprocess test covers the real entry point); qemu-img runs as itself.
"""
import json
import os
import re
import subprocess

import pytest

import helpers
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main as vdisk_main

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

SIZES = [0, 1, 511, 512, 1000, 65535, 65536, 65537, MiB + 1, GiB, GiB + 512, 7 * GiB + 3, 10 * GiB, TiB,
         16 * TiB + 1, 256 * TiB]

# (-O, -o) pairs: every create option that changes qcow2's numbers, and some that do not
TARGETS = [
    ("raw", ""),
    ("raw", "preallocation=full"),
    ("qcow2", ""),
    ("qcow2", "cluster_size=512"),
    ("qcow2", "cluster_size=4k"),
    ("qcow2", "cluster_size=64k"),
    ("qcow2", "cluster_size=2M"),
    ("qcow2", "cluster_size=512,refcount_bits=1"),
    ("qcow2", "cluster_size=4k,refcount_bits=8"),
    ("qcow2", "cluster_size=512,refcount_bits=64"),
    ("qcow2", "extended_l2=on,cluster_size=16k"),
    ("qcow2", "extended_l2=on"),
    ("qcow2", "extended_l2=on,cluster_size=2M,refcount_bits=2"),
    ("qcow2", "preallocation=metadata,cluster_size=4k"),
    ("qcow2", "preallocation=falloc"),
    ("qcow2", "preallocation=full,cluster_size=1k"),
    ("qcow2", "compat=0.10"),
    ("qcow2", "compat=1.1,lazy_refcounts=on,compression_type=zstd"),
    ("qcow2", "backing_file=base.qcow2,backing_fmt=qcow2"),
]


def qemu_measure(*args, cwd=None):
    """qemu-img measure: (exit status, stdout, stderr) as text."""
    proc = subprocess.run(["qemu-img", "measure"] + [str(a) for a in args], capture_output=True, text=True,
                          cwd=None if cwd is None else str(cwd))
    return proc.returncode, proc.stdout, proc.stderr


def vdisk_measure(capsys, *args):
    """The vdisk command in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = vdisk_main(["measure"] + [str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_same(capsys, *args, cwd=None):
    """Same exit status and output; refusals: one line naming qemu-img's reason."""
    theirs = qemu_measure(*args, cwd=cwd)
    if cwd is not None:
        old = os.getcwd()
        os.chdir(str(cwd))
    try:
        mine = vdisk_measure(capsys, *args)
    finally:
        if cwd is not None:
            os.chdir(old)
    assert mine[0] == theirs[0], (args, mine, theirs)
    if theirs[0] == 0:
        if "--output=json" in args:
            assert json.loads(mine[1]) == json.loads(theirs[1]), args
            assert list(json.loads(mine[1])) == list(json.loads(theirs[1])), args   # even the key order
        else:
            assert mine[1] == theirs[1], args
    else:
        reason = theirs[2].splitlines()[0].replace("qemu-img: ", "", 1)
        reason = re.sub(r"^(Could not open '[^']*': )+", r"\1", reason)     # qemu-img says it twice
        assert mine[2].count("\n") == 1 and mine[2].startswith("vdisk: measure: "), mine[2]
        assert reason in mine[2], (reason, mine[2])
    return mine


@pytest.mark.parametrize("fmt,opts", TARGETS, ids=["%s:%s" % t for t in TARGETS])
def test_size_matrix(capsys, fmt, opts):
    for size in SIZES:
        args = ["-O", fmt] + (["-o", opts] if opts else []) + ["--size", size]
        assert_same(capsys, *args)
        if size in (0, 65537, 10 * GiB):
            assert_same(capsys, *args, "--output=json")


@pytest.mark.parametrize("size", ["1k", "1.5M", "0x10000", "1b", "10G", "3T", "100", "1023"])
def test_size_suffixes(capsys, size):
    assert_same(capsys, "-O", "qcow2", "--size", size)
    assert_same(capsys, "-O", "raw", "--size", size)


def test_reference_value(capsys):
    # REFERENCE.md: --size 10G -O qcow2 -> required 1900544, fully-allocated 10739318784
    rc, out, _ = vdisk_measure(capsys, "-O", "qcow2", "--size", "10G", "--output=json")
    assert rc == 0 and json.loads(out) == {"required": 1900544, "fully-allocated": 10739318784}


REFUSALS = [
    [],
    ["--size", "1G", "x.raw"],
    ["-O", "foo", "--size", "1G"],
    ["-O", "qcow2", "--size", "abc"],
    ["-O", "qcow2", "--size", "-5"],
    ["--size", "9E"],
    ["-O", "qcow2", "--size", "1kb"],
    ["-O", "qcow2", "-o", "cluster_size=3000", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=4M", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=abc", "--size", "1G"],
    ["-O", "qcow2", "-o", "refcount_bits=3", "--size", "1G"],
    ["-O", "qcow2", "-o", "refcount_bits=128", "--size", "1G"],
    ["-O", "qcow2", "-o", "refcount_bits=abc", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=0.10,refcount_bits=8", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=1.2", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=v3", "--size", "1G"],
    ["-O", "qcow2", "-o", "extended_l2=on,cluster_size=4k", "--size", "1G"],
    ["-O", "qcow2", "-o", "extended_l2=ON", "--size", "1G"],
    ["-O", "qcow2", "-o", "preallocation=bad", "--size", "1G"],
    ["-O", "qcow2", "-o", "foo=1", "--size", "1G"],
    ["-O", "raw", "-o", "cluster_size=64k", "--size", "1G"],
    ["-O", "qcow2", "-o", "help", "--size", "1G"],
    ["-O", "qcow2", "-o", "size=2G"],
    ["-O", "qcow2", "--size", "100T", "-o", "cluster_size=512"],
    ["--output=xml", "--size", "1G"],
    ["--size", "1G", "extra1", "extra2"],
    ["-O", "qcow2", "missing.qcow2"],
    ["-O", "qcow2", "-o", "encrypt.format=luks", "--size", "1G"],
]
ACCEPTED_UNCHECKED = [
    # measure accepts what create would refuse: these only look at what changes the numbers
    ["-O", "qcow2", "-o", "compat=0.10,extended_l2=on", "--size", "1G"],
    ["-O", "qcow2", "-o", "compat=0.10,lazy_refcounts=on", "--size", "1G"],
    ["-O", "raw", "-o", "preallocation=metadata", "--size", "1G"],
    ["-O", "raw", "-o", "preallocation=bad", "--size", "1G"],
    ["-O", "qcow2", "-o", "extended_l2=yes,refcount_bits=010", "--size", "1G"],
    ["-O", "qcow2", "-o", "cluster_size=4k", "-o", "cluster_size=8k", "--size", "1G"],
    ["-O", "qcow2", "-o", "size=5G", "--size", "1G"],
    ["-O", "qcow2", "-o", "nocow=on,extent_size_hint=1M", "--size", "1G"],
    ["-O", "qcow2", "-o", "encryption=on", "--size", "1G"],
    ["--size", "1G", "--size", "2G", "-O", "qcow2"],
    ["--size=1G", "-Oqcow2"],
]


@pytest.mark.parametrize("args", REFUSALS + ACCEPTED_UNCHECKED, ids=lambda a: " ".join(a) or "no-args")
def test_arguments_as_qemu_img(capsys, tmp_path, args):
    assert_same(capsys, *args, cwd=tmp_path)


# -- from images ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Source images made by qemu-img/qemu-io, name -> (format, path)."""
    d = tmp_path_factory.mktemp("measure")

    def q(*args):
        helpers.run(*args)

    out = {}
    # raw with holes and an unaligned size (qemu counts whole sectors)
    raw = helpers.make_raw(d / "holes.raw", 6 * MiB + 1000,
                           [(0, 4096), (MiB, 64 * 1024), (3 * MiB + 512, 512), (6 * MiB, 1000)])
    out["raw-holes"] = ("raw", raw)
    # qcow2: data, zero clusters, discarded clusters, never written clusters, a partial-cluster write
    mixed = str(d / "mixed.qcow2")
    q("qemu-img", "create", "-f", "qcow2", mixed, "8M")
    helpers.qemu_io("qcow2", mixed, "write -P 1 0 256k", "write -z 64k 64k", "write -P 2 1M 4k",
                    "discard 128k 64k", "write -P 3 5000k 1k", "write -z 6M 1M", "write -P 0 7M 64k")
    out["qcow2-mixed"] = ("qcow2", mixed)
    # a backing chain: the overlay is larger than its backing file and hides some of its data
    base = str(d / "base.qcow2")
    q("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4k", base, "4M")
    helpers.qemu_io("qcow2", base, "write -P 5 0 2M", "write -P 6 3M 4k")
    overlay = str(d / "overlay.qcow2")
    q("qemu-img", "create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", overlay, "9M")
    helpers.qemu_io("qcow2", overlay, "write -P 7 512k 64k", "write -z 1M 128k", "write -P 8 8M 4k")
    out["qcow2-overlay"] = ("qcow2", overlay)
    # compressed clusters
    comp = str(d / "compressed.qcow2")
    q("qemu-img", "convert", "-c", "-O", "qcow2", "-f", "raw", raw, comp)
    out["qcow2-compressed"] = ("qcow2", comp)
    # persistent bitmaps (the "bitmaps size" line counts them)
    bm = str(d / "bitmaps.qcow2")
    q("qemu-img", "create", "-f", "qcow2", bm, "10M")
    helpers.qemu_io("qcow2", bm, "write -P 1 0 1M")
    q("qemu-img", "bitmap", "--add", bm, "bm0")
    q("qemu-img", "bitmap", "--add", "-g", "4k", bm, "a-longer-bitmap-name")
    out["qcow2-bitmaps"] = ("qcow2", bm)
    many = str(d / "many-bitmaps.qcow2")      # a directory larger than a small cluster
    q("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=512", many, "3M")
    for i in range(12):
        q("qemu-img", "bitmap", "--add", "-g", "%dk" % (1 << (i % 6)), many, "bitmap-%02d-with-a-longer-name" % i)
    out["qcow2-many-bitmaps"] = ("qcow2", many)
    # version 2 (cannot carry bitmaps: no bitmaps line), 512-byte clusters, extended L2 subclusters
    v2 = str(d / "v2.qcow2")
    q("qemu-img", "create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", v2, "3M")
    helpers.qemu_io("qcow2", v2, "write -P 1 1000k 100k", "write -z 2M 64k")
    out["qcow2-v2-512"] = ("qcow2", v2)
    ext = str(d / "extl2.qcow2")
    q("qemu-img", "create", "-f", "qcow2", "-o", "extended_l2=on", ext, "4M")
    helpers.qemu_io("qcow2", ext, "write -P 1 4k 4k", "write -P 2 1M 2k", "write -z 2M 64k")
    out["qcow2-extl2"] = ("qcow2", ext)
    # metadata preallocation: data clusters over host holes read as zeros
    pre = str(d / "prealloc.qcow2")
    q("qemu-img", "create", "-f", "qcow2", "-o", "preallocation=metadata", pre, "5M")
    helpers.qemu_io("qcow2", pre, "write -P 1 1M 64k")
    out["qcow2-prealloc-metadata"] = ("qcow2", pre)
    # an internal snapshot (measured with -l)
    snap = str(d / "snap.qcow2")
    q("qemu-img", "create", "-f", "qcow2", snap, "6M")
    helpers.qemu_io("qcow2", snap, "write -P 1 0 1M")
    q("qemu-img", "snapshot", "-c", "snap1", snap)
    helpers.qemu_io("qcow2", snap, "write -P 2 2M 3M")
    out["qcow2-snapshot"] = ("qcow2", snap)
    return out


IMAGE_TARGETS = [
    ("raw", ""),
    ("qcow2", ""),
    ("qcow2", "cluster_size=512"),
    ("qcow2", "cluster_size=4k,refcount_bits=1"),
    ("qcow2", "cluster_size=2M"),
    ("qcow2", "extended_l2=on,cluster_size=32k"),
    ("qcow2", "preallocation=metadata"),
    ("qcow2", "preallocation=full,cluster_size=16k"),
    ("qcow2", "compat=0.10"),
    ("qcow2", "backing_file=base.qcow2"),
    ("qcow2", "size=1G"),
]
SOURCE_NAMES = ["raw-holes", "qcow2-mixed", "qcow2-overlay", "qcow2-compressed", "qcow2-bitmaps", "qcow2-many-bitmaps",
                "qcow2-v2-512", "qcow2-extl2", "qcow2-prealloc-metadata", "qcow2-snapshot"]


@pytest.mark.parametrize("name", SOURCE_NAMES)
def test_from_image(capsys, sources, name):
    fmt, path = sources[name]
    for out_fmt, opts in IMAGE_TARGETS:
        args = ["-O", out_fmt] + (["-o", opts] if opts else [])
        assert_same(capsys, *args, path)                      # probed format
        assert_same(capsys, *args, "-f", fmt, path, "--output=json")


def test_bitmaps_line_only_for_v3_qcow2_source_and_target(capsys, sources):
    _, bm = sources["qcow2-bitmaps"]
    out = assert_same(capsys, "-O", "qcow2", bm)[1]
    assert "bitmaps size: 327680\n" in out
    assert "bitmaps" not in assert_same(capsys, "-O", "qcow2", "-o", "compat=0.10", bm)[1]
    assert "bitmaps" not in assert_same(capsys, "-O", "qcow2", "-f", "raw", bm)[1]     # read as raw
    assert "bitmaps" not in assert_same(capsys, "-O", "qcow2", sources["raw-holes"][1])[1]
    assert "bitmaps" not in assert_same(capsys, "-O", "qcow2", sources["qcow2-v2-512"][1])[1]
    assert "bitmaps" not in assert_same(capsys, "-O", "raw", bm)[1]


def test_data_counts_clusters_of_the_target(capsys, sources):
    # zero, discarded and unallocated clusters are not counted: far less than fully allocated
    _, mixed = sources["qcow2-mixed"]
    rc, out, _ = vdisk_measure(capsys, "-O", "qcow2", "--output=json", mixed)
    sizes = json.loads(out)
    assert rc == 0 and sizes["required"] < sizes["fully-allocated"] - 6 * MiB


@pytest.mark.parametrize("param", ["snap1", "1", "snapshot.name=snap1", "snapshot.id=1", "nosuch"])
def test_snapshot_param(capsys, sources, param):
    _, snap = sources["qcow2-snapshot"]
    assert_same(capsys, "-O", "qcow2", "-l", param, snap)


def test_snapshot_param_needs_a_file(capsys):
    assert_same(capsys, "-O", "qcow2", "-l", "snap1", "--size", "1G")
    assert_same(capsys, "-O", "qcow2", "-f", "qcow2", "--size", "1G")


def test_command_line_entry_point(sources):
    """The installed command (python -m): output, JSON and a refusal, as qemu-img."""
    _, bm = sources["qcow2-bitmaps"]
    for args in (["-O", "qcow2", bm], ["-O", "qcow2", "--output=json", "--size", "3G"]):
        mine = helpers.vdisk_cli("measure", *args)
        theirs = helpers.qemu_img("measure", *args)
        assert mine.returncode == 0 == theirs.returncode
        assert mine.stdout == helpers._txt(theirs.stdout)
    bad = helpers.vdisk_cli("measure", "--size", "1G", bm)
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == "vdisk: measure: --size N cannot be used together with a filename.\n"
