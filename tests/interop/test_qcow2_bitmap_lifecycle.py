"""Images with persistent bitmaps through check, repair, resize, snapshots, amend, commit and
``convert --bitmaps``: vdisk on one twin, qemu-img 7.2 on the other.

Afterwards both twins show the same bitmaps (``qemu-img info``), store the same bits (parsed
with vdisk's parser), ``qemu-img check`` is clean and the guest content is the same; where
qemu-nbd is installed QEMU's own view of a bitmap (``qemu-nbd -B`` read with ``qemu-img map``)
is the one vdisk stored.  Where qemu-img refuses, vdisk refuses with its message and changes
nothing.  Where vdisk deliberately differs (a check of bitmaps QEMU cannot open reports them,
and its repair drops them; a downgrade to compat=0.10 frees the bitmaps' clusters that QEMU
leaks) the test says so.
"""
import json
import os
import shutil
import struct
import subprocess

import pytest

import qcow2_util as u
from qcow2_util import MiB
from test_qcow2_bitmap_command import bits_of, info_bitmaps, normalized, twins
from test_qcow2_bitmaps import CS, QEMU_NBD, SIZE, nbd_dirty_ranges, ranges_of_bits, stored_bitmaps, vdisk_apply

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main as vdisk_main
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import bitmaps as bm
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import header as hdr

pytestmark = pytest.mark.skipif(not (u.QEMU_IMG and u.QEMU_IO), reason="needs qemu-img and qemu-io")


# -- helpers -------------------------------------------------------------------------------
def vdisk(capsys, *args):
    """``vdisk ARGS`` in this process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    rc = vdisk_main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def qemu(*args):
    return subprocess.run(["qemu-img"] + [str(a) for a in args], capture_output=True, text=True)


def directory(path):
    """(extension payload offset, entries, directory offset) of an image's bitmaps."""
    with open(path, "rb") as f:
        data = f.read()
    where = bm.find_extension(data[:CS], struct.unpack_from(">I", data, 100)[0], hdr.EXT_BITMAPS)
    count, dummy, dir_size, dir_offset = hdr.BITMAPS_EXTENSION.unpack_from(data, where)
    return where, bm.parse_directory(data[dir_offset:dir_offset + dir_size], count, CS, len(data)), dir_offset


def rewrite_directory(path, change):
    where, entries, dir_offset = directory(path)
    change(entries)
    u.raw_write(path, dir_offset, bm.pack_directory(entries))


def by_name(entries, name):
    return [e for e in entries if e.label == name][0]


def assert_same(ref, mine):
    assert info_bitmaps(mine) == info_bitmaps(ref)
    assert bits_of(mine) == bits_of(ref)
    u.assert_check_clean(mine)
    u.qemu_compare(ref, mine, "qcow2", "qcow2")


def assert_qemu_sees(path, tmp_path, names=("b0", "fine")):
    """QEMU's own view of each bitmap is the bits vdisk's parser reads."""
    if not QEMU_NBD:
        return
    size = json.loads(u.qemu_img("info", "--output=json", path).stdout)["virtual-size"]
    stored = stored_bitmaps(path)
    for name in names:
        flags, granularity, bits = stored[name][:3]
        assert nbd_dirty_ranges(path, name, tmp_path) == ranges_of_bits(bits, granularity, size), name


def message(err, command, path):
    """vdisk's one-line error without its prefix and the file name it starts with (qemu-img's
    messages do not always name the file)."""
    text = normalized(err, "vdisk: %s: " % command, path)
    return text[len(path) + 2:] if text.startswith(path + ": ") else text


def check_json(run_output):
    """The fields both tools report, from ``check --output=json``."""
    data = json.loads(run_output)
    keys = ("check-errors", "corruptions", "leaks", "image-end-offset", "total-clusters", "allocated-clusters")
    return {k: data.get(k, 0) for k in keys}


# -- check: the bitmaps' clusters counted as qemu-img counts them ------------------------------
def _table_entry(path, name, index, value):
    e = by_name(directory(path)[1], name)
    u.raw_write(path, e.table_offset + 8 * index, struct.pack(">Q", value))


def _drop_last_entry(path):
    where, entries, dir_offset = directory(path)
    u.raw_write(path, where, struct.pack(">I", len(entries) - 1))
    u.raw_write(path, where + 8, struct.pack(">Q", len(bm.pack_directory(entries[:-1]))))


def _clear_autoclear(path):
    with open(path, "rb") as f:
        f.seek(88)
        value = struct.unpack(">Q", f.read(8))[0]
    u.raw_write(path, 88, struct.pack(">Q", value & ~hdr.AUTOCLEAR_BITMAPS))


def _set(name, **fields):
    def change(entries):
        for key, value in fields.items():
            setattr(by_name(entries, name), key, value)
    return lambda path: rewrite_directory(path, change)


def _in_use(name):
    def change(entries):
        by_name(entries, name).flags |= bm.FLAG_IN_USE
    return lambda path: rewrite_directory(path, change)


OPENED_BY_QEMU = {
    "clean": lambda path: None,
    "in-use": _in_use("fine"),
    "table-past-the-end": _set("off", table_offset=1 << 40),
    "data-in-the-header": lambda path: _table_entry(path, "off", 0, CS),
    "all-ones-entry": lambda path: _table_entry(path, "off", 0, bm.TABLE_ALL_ONES),
    "bitmap-dropped-from-directory": _drop_last_entry,
    "autoclear-cleared": _clear_autoclear,
}


@pytest.mark.parametrize("case", sorted(OPENED_BY_QEMU))
def test_check_counts_the_bitmaps_as_qemu_img(tmp_path, capsys, case):
    ref, mine = twins(tmp_path)
    for path in (ref, mine):
        OPENED_BY_QEMU[case](path)
    theirs = qemu("check", "--output=json", ref)
    rc, out, err = vdisk(capsys, "check", "--output=json", mine)
    assert rc == theirs.returncode, (out, err, theirs.stdout, theirs.stderr)
    assert check_json(out) == check_json(theirs.stdout)


QEMU_CANNOT_OPEN = {
    "reserved-bits-in-table-entry": (lambda path: _table_entry(path, "off", 0, 0x200 | 2), "reserved bits set"),
    "unaligned-table": (_set("b0", table_offset=None), "not cluster aligned"),
    "granularity-bits-40": (_set("b0", granularity_bits=40), "granularity bits 40"),
    "table-size-mismatch": (_set("off", table_size=2), "table size 2 does not match the disk size"),
}


@pytest.mark.parametrize("case", sorted(QEMU_CANNOT_OPEN))
def test_check_reports_bitmaps_qemu_cannot_load_and_repair_drops_them(tmp_path, capsys, case):
    """qemu-img refuses to open these images ("Could not open"); vdisk's check reports the bitmaps
    as a corruption, and ``-r all`` drops them, leaving an image qemu-img opens and finds clean."""
    path = str(tmp_path / "a.qcow2")
    ref = twins(tmp_path)[0]
    shutil.copy(ref, path)
    mutate, words = QEMU_CANNOT_OPEN[case]
    if case == "unaligned-table":
        e = by_name(directory(path)[1], "b0")
        mutate = _set("b0", table_offset=e.table_offset + 512)
    mutate(path)
    assert qemu("check", path).returncode == 1
    guest = u.qemu_to_raw(ref)
    rc, out, err = vdisk(capsys, "check", path)
    assert rc == 2
    assert [line for line in err.splitlines() if line.startswith("ERROR bitmaps:") and words in line], err
    rc, out, err = vdisk(capsys, "check", "-r", "all", path)
    assert rc == 0, (out, err)
    assert "Repair dropped the persistent bitmaps" in err
    u.assert_check_clean(path)
    assert info_bitmaps(path) == []
    assert u.qemu_to_raw(path) == guest


@pytest.mark.parametrize("mode", ["leaks", "all"])
def test_repair_of_leaks_keeps_the_bitmaps(tmp_path, capsys, mode):
    ref, mine = twins(tmp_path)
    for path in (ref, mine):
        _drop_last_entry(path)        # "off" leaves the directory: its table leaks
        assert qemu("check", path).returncode == 3
    before = bits_of(mine)
    assert qemu("check", "-r", mode, ref).returncode == 0
    rc, out, err = vdisk(capsys, "check", "-r", mode, mine)
    assert rc == 0, (out, err)
    assert "Leaked cluster" in err
    assert_same(ref, mine)
    assert bits_of(mine) == before
    assert_qemu_sees(mine, tmp_path)


def test_repair_drops_a_stale_bitmaps_extension(tmp_path, capsys):
    """A program without bitmap support cleared the autoclear bit: the bitmaps are ignored and
    their clusters leaked (qemu-img check says so); the repair frees them and drops the extension,
    so qemu-img no longer warns about it."""
    path = twins(tmp_path)[1]
    _clear_autoclear(path)
    assert "all bitmaps are now considered inconsistent" in qemu("check", path).stderr
    rc, out, err = vdisk(capsys, "check", "-r", "leaks", path)
    assert rc == 0, (out, err)
    result = qemu("check", path)
    assert result.returncode == 0 and result.stderr == ""
    assert info_bitmaps(path) == []


# -- resize -----------------------------------------------------------------------------------
RESIZES = {
    "grow": 12 * MiB,
    "grow-unaligned": SIZE + 512,
    "shrink": 5 * MiB + 1024,
    "shrink-to-one-granule": 64 * 1024,
}


@pytest.mark.parametrize("case", sorted(RESIZES))
def test_resize_as_qemu_img(tmp_path, capsys, case):
    ref, mine = twins(tmp_path)
    size = RESIZES[case]
    shrink = ["--shrink"] if size < SIZE else []
    assert qemu("resize", *shrink, ref, size).returncode == 0
    rc, out, err = vdisk(capsys, "resize", *shrink, mine, size)
    assert rc == 0, err
    assert_same(ref, mine)
    assert_qemu_sees(mine, tmp_path)
    # writes after the resize are tracked at the new size as QEMU tracks them
    ops = [("write", size - 4096, 4096), ("write", 0, 512)]
    vdisk_apply(mine, ops)
    u.qemu_io(ref, "write -P 7 %d 4096" % (size - 4096), "write -P 7 0 512")
    assert_same(ref, mine)


def test_resize_with_an_inconsistent_bitmap_is_refused_as_qemu_img(tmp_path, capsys):
    ref, mine = twins(tmp_path)
    for path in (ref, mine):
        _in_use("fine")(path)
    before = open(mine, "rb").read()
    theirs = qemu("resize", ref, 12 * MiB)
    rc, out, err = vdisk(capsys, "resize", mine, 12 * MiB)
    assert theirs.returncode == rc == 1
    assert message(err, "resize", mine) in normalized(theirs.stderr, "qemu-img: ", ref)
    assert open(mine, "rb").read() == before


# -- internal snapshots -------------------------------------------------------------------------
def test_snapshots_keep_the_bitmaps_as_qemu_img(tmp_path, capsys):
    ref, mine = twins(tmp_path)
    assert qemu("snapshot", "-c", "s1", ref).returncode == 0
    assert vdisk(capsys, "snapshot", "-c", "s1", mine)[0] == 0
    assert_same(ref, mine)
    u.qemu_io(ref, "write -P 7 1M 64k", "write -P 7 6M 1k")
    vdisk_apply(mine, [("write", 1 * MiB, 64 * 1024), ("write", 6 * MiB, 1024)])
    assert qemu("snapshot", "-c", "s2", ref).returncode == 0
    assert vdisk(capsys, "snapshot", "-c", "s2", mine)[0] == 0
    assert qemu("snapshot", "-d", "s1", ref).returncode == 0
    assert vdisk(capsys, "snapshot", "-d", "s1", mine)[0] == 0
    assert_same(ref, mine)
    assert_qemu_sees(mine, tmp_path)


def test_applying_a_snapshot_is_refused_as_qemu_img(tmp_path, capsys):
    ref, mine = twins(tmp_path)
    for path in (ref, mine):
        assert qemu("snapshot", "-c", "s1", path).returncode == 0
    before = open(mine, "rb").read()
    theirs = qemu("snapshot", "-a", "s1", ref)
    rc, out, err = vdisk(capsys, "snapshot", "-a", "s1", mine)
    assert theirs.returncode == rc == 1
    assert message(err, "snapshot", mine) == normalized(theirs.stderr, "qemu-img: ", ref) == \
        "Could not apply snapshot 's1': Device has active dirty bitmaps"
    assert open(mine, "rb").read() == before


# -- amend --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", ["1", "8", "64"])
def test_amend_refcount_bits_keeps_the_bitmaps(tmp_path, capsys, bits):
    ref, mine = twins(tmp_path)
    assert qemu("amend", "-o", "refcount_bits=" + bits, ref).returncode == 0
    rc, out, err = vdisk(capsys, "amend", "-o", "refcount_bits=" + bits, mine)
    assert rc == 0, err
    assert_same(ref, mine)
    assert_qemu_sees(mine, tmp_path)


def test_downgrade_removes_the_bitmaps_without_leaking(tmp_path, capsys):
    """qemu-img amend -o compat=0.10 leaves the bitmaps in the version 2 header, invalid, and their
    clusters leaked (its next check says so); vdisk removes them first: no bitmaps either way, but
    qemu-img check finds vdisk's image clean."""
    ref, mine = twins(tmp_path)
    assert qemu("amend", "-o", "compat=0.10", ref).returncode == 0
    assert qemu("check", ref).returncode == 3
    rc, out, err = vdisk(capsys, "amend", "-o", "compat=0.10", mine)
    assert rc == 0, err
    assert info_bitmaps(mine) == info_bitmaps(ref) == []
    result = qemu("check", mine)
    assert result.returncode == 0 and result.stderr == ""
    u.qemu_compare(ref, mine, "qcow2", "qcow2")


# -- commit -------------------------------------------------------------------------------------
def test_commit_marks_the_base_and_leaves_the_top_as_qemu_img(tmp_path, capsys):
    chains = []
    for who in ("qemu", "vdisk"):
        base, top = str(tmp_path / ("%s-base.qcow2" % who)), str(tmp_path / ("%s-top.qcow2" % who))
        u.qemu_create(base, SIZE)
        u.qemu_io(base, "write -P 1 0 1M")
        u.qemu_img("bitmap", "--add", base, "b0")
        u.qemu_img("bitmap", "--add", "-g", "4k", base, "fine")
        u.qemu_create(top, SIZE, backing=base, backing_fmt="qcow2")
        u.qemu_img("bitmap", "--add", top, "b0")
        u.qemu_img("bitmap", "--add", "-g", "4k", top, "fine")
        u.qemu_io(top, "write -P 2 3M 100k", "write -z 5M 64k", "write -P 3 7M 512")
        chains.append((base, top))
    (ref_base, ref_top), (base, top) = chains
    assert qemu("commit", ref_top).returncode == 0
    rc, out, err = vdisk(capsys, "commit", top)
    assert rc == 0, err
    assert_same(ref_base, base)
    assert info_bitmaps(top) == info_bitmaps(ref_top)
    assert bits_of(top) == bits_of(ref_top)
    u.assert_check_clean(top)
    assert_qemu_sees(base, tmp_path)


# -- convert --bitmaps ----------------------------------------------------------------------------
CONVERTS = {
    "default": [],
    "4k-clusters": ["-o", "cluster_size=4096"],
    "compressed": ["-c"],
    "backing": ["-B", "BASE", "-F", "qcow2"],
}


@pytest.mark.parametrize("case", sorted(CONVERTS))
def test_convert_copies_the_bitmaps_as_qemu_img(tmp_path, capsys, case):
    src = twins(tmp_path)[0]
    base = str(tmp_path / "base.qcow2")
    ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
    args = [base if a == "BASE" else a for a in CONVERTS[case]]
    assert qemu("convert", "--bitmaps", "-O", "qcow2", *args, src, ref).returncode == 0
    rc, out, err = vdisk(capsys, "convert", "--bitmaps", "-O", "qcow2", *args, src, mine)
    assert rc == 0, err
    assert info_bitmaps(mine) == info_bitmaps(ref) == info_bitmaps(src)
    assert bits_of(mine) == bits_of(ref) == bits_of(src)
    u.assert_check_clean(mine)
    u.qemu_compare(src, mine, "qcow2", "qcow2")
    assert_qemu_sees(mine, tmp_path)


def test_convert_into_an_existing_image_copies_the_bitmaps(tmp_path, capsys):
    src = twins(tmp_path)[0]
    ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
    for path in (ref, mine):
        u.qemu_create(path, SIZE)
    assert qemu("convert", "-n", "--bitmaps", "-O", "qcow2", src, ref).returncode == 0
    assert vdisk(capsys, "convert", "-n", "--bitmaps", "-O", "qcow2", src, mine)[0] == 0
    assert_same(ref, mine)
    assert bits_of(mine) == bits_of(src)


def test_convert_skips_broken_bitmaps_with_a_warning(tmp_path, capsys):
    src = twins(tmp_path)[0]
    _in_use("fine")(src)
    ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
    theirs = qemu("convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, ref)
    rc, out, err = vdisk(capsys, "convert", "--bitmaps", "--skip-broken-bitmaps", "-O", "qcow2", src, mine)
    assert theirs.returncode == rc == 0
    assert err == "vdisk: convert: warning: Skipping inconsistent bitmap 'fine'\n"
    assert theirs.stderr.startswith("qemu-img: warning: Skipping inconsistent bitmap 'fine'")
    assert_same(ref, mine)
    assert "fine" not in [b[0] for b in info_bitmaps(mine)]


CONVERT_ERRORS = {
    "raw-target": (["-O", "raw"], "Format driver 'raw' does not support bitmaps"),
    "vmdk-target": (["-O", "vmdk"], "Format driver 'vmdk' does not support bitmaps"),
    "v2-target": (["-O", "qcow2", "-o", "compat=0.10"], "Format driver 'qcow2' does not support bitmaps"),
    "raw-source": (["-f", "raw", "-O", "qcow2"], "Source lacks bitmap support"),
    "two-sources": (["-O", "qcow2", "SRC"], "Copying bitmaps only possible with single source"),
    "inconsistent": (["-O", "qcow2"], "Cannot copy inconsistent bitmap 'fine'"),
    "skip-without-bitmaps": (["--skip-broken-bitmaps", "-O", "qcow2"], "Use of --skip-broken-bitmaps requires "
                             "--bitmaps"),
}


@pytest.mark.parametrize("case", sorted(CONVERT_ERRORS))
def test_convert_bitmaps_refused_as_qemu_img_and_nothing_left(tmp_path, capsys, case):
    src = twins(tmp_path)[0]
    if case == "inconsistent":
        _in_use("fine")(src)
    if case == "raw-source":
        src = str(tmp_path / "src.raw")
        u.make_raw(src, SIZE)
    args, words = CONVERT_ERRORS[case]
    args = [src if a == "SRC" else a for a in args]
    flag = [] if case == "skip-without-bitmaps" else ["--bitmaps"]
    ref, mine = str(tmp_path / "ref.out"), str(tmp_path / "mine.out")
    theirs = qemu("convert", *flag, *args, src, ref)
    rc, out, err = vdisk(capsys, "convert", *flag, *args, src, mine)
    assert theirs.returncode == rc == 1
    assert message(err, "convert", src if case in ("inconsistent", "raw-source") else mine) == \
        normalized(theirs.stderr, "qemu-img: ", ref) == words
    assert not [name for name in os.listdir(tmp_path) if "mine" in name]


def test_convert_into_an_image_that_has_the_bitmap_is_refused_as_qemu_img(tmp_path, capsys):
    src = twins(tmp_path)[0]
    ref, mine = str(tmp_path / "ref.qcow2"), str(tmp_path / "mine.qcow2")
    for path in (ref, mine):
        u.qemu_create(path, SIZE)
        u.qemu_img("bitmap", "--add", path, "off")
        u.qemu_img("bitmap", "--add", path, "b0")
    theirs = qemu("convert", "-n", "--bitmaps", "-O", "qcow2", src, ref)
    rc, out, err = vdisk(capsys, "convert", "-n", "--bitmaps", "-O", "qcow2", src, mine)
    assert theirs.returncode == rc == 1
    assert message(err, "convert", mine) == normalized(theirs.stderr, "qemu-img: ", ref) == \
        "Failed to create bitmap off: Bitmap already exists: off"
    u.assert_check_clean(mine)
