"""``vdisk bitmap`` against ``qemu-img bitmap`` (7.2) on twin images.

Each case runs the same command lines through qemu-img on one copy and through vdisk on the
other.  Afterwards ``qemu-img info`` shows the same bitmaps (names, granularities, flags), the
stored bits are the same bit for bit (both images parsed with vdisk's parser), QEMU itself reads
the bits vdisk stored (``qemu-nbd -B`` + ``qemu-img map``), ``qemu-img check`` is clean and the
guest content is untouched.  Errors: qemu-img's message (its node name ``#blockNNN`` stands
for the file name in vdisk's) and exit status, and what succeeded before the error is kept by
both.  Images vdisk changed are then written by qemu-io and by vdisk, and their bitmaps still
match QEMU's.
"""
import json
import re
import shutil
import struct
import subprocess

import pytest

import qcow2_util as u
from test_qcow2_bitmaps import (CS, OPS, QEMU_NBD, SIZE, base_image, nbd_dirty_ranges, qemu_cmds, ranges_of_bits,
                                stored_bitmaps, vdisk_apply)

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main as vdisk_main
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import bitmaps as bm
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import header as hdr

pytestmark = pytest.mark.skipif(not (u.QEMU_IMG and u.QEMU_IO), reason="needs qemu-img and qemu-io")


# -- helpers -------------------------------------------------------------------------------
def qemu_bitmap(args):
    return subprocess.run(["qemu-img", "bitmap"] + [str(a) for a in args], capture_output=True, text=True)


def vdisk_bitmap(capsys, args):
    """(exit status, stderr) of ``vdisk bitmap ARGS`` run in this process."""
    capsys.readouterr()
    rc = vdisk_main(["bitmap"] + [str(a) for a in args])
    return rc, capsys.readouterr().err


def line(args, path):
    """A command line with the image's name before the bitmap's (the last word)."""
    return list(args[:-1]) + [path, args[-1]]


def info_bitmaps(path):
    info = json.loads(u.qemu_img("info", "--output=json", path).stdout)
    listed = info["format-specific"]["data"].get("bitmaps", [])
    return [(b["name"], b["granularity"], sorted(b["flags"])) for b in listed]


def bits_of(path):
    """{name: (flags, granularity, bits)}: the table offsets differ between writers."""
    if not info_bitmaps(path):
        return {}
    return {name: v[:3] for name, v in stored_bitmaps(path).items()}


def twins(tmp_path, size=SIZE):
    base = str(tmp_path / "base.qcow2")
    base_image(base, size)
    u.qemu_io(base, "write -P 3 2M 192k", "write -P 4 7M 8k")      # bits that differ between the bitmaps
    ref, mine = str(tmp_path / "qemu.qcow2"), str(tmp_path / "vdisk.qcow2")
    shutil.copy(base, ref)
    shutil.copy(base, mine)
    return ref, mine


def assert_same(ref, mine):
    assert info_bitmaps(mine) == info_bitmaps(ref)
    assert bits_of(mine) == bits_of(ref)
    u.assert_check_clean(mine)
    u.qemu_compare(ref, mine, "qcow2", "qcow2")


# -- each operation as qemu-img does it ------------------------------------------------------
CASES = {
    "add": [["--add", "new"]],
    "add-4k": [["--add", "-g", "4k", "new"]],
    "add-512": [["--add", "-g", "512", "new"]],
    "add-2G": [["--add", "-g", "2G", "new"]],
    "add-32-bit-wrap": [["--add", "-g", str((1 << 32) + 512), "new"]],
    "add-disabled": [["--add", "--disable", "new"]],
    "add-long-name": [["--add", "n" * 1023]],
    "remove-enabled": [["--remove", "b0"]],
    "remove-disabled": [["--remove", "off"]],
    "remove-all": [["--remove", "b0"], ["--remove", "fine"], ["--remove", "coarse"], ["--remove", "off"]],
    "remove-all-then-add": [["--remove", "b0"], ["--remove", "fine"], ["--remove", "coarse"], ["--remove", "off"],
                            ["--add", "-g", "8k", "again"]],
    "clear": [["--clear", "b0"]],
    "clear-disabled": [["--clear", "off"]],
    "enable": [["--enable", "off"]],
    "disable": [["--disable", "fine"]],
    "enable-enabled": [["--enable", "b0"]],
    "merge-same-granularity": [["--add", "copy"], ["--merge", "b0", "copy"]],
    "merge-finer-into-coarser": [["--merge", "fine", "coarse"]],
    "merge-coarser-into-finer": [["--merge", "coarse", "fine"]],
    "merge-into-disabled": [["--merge", "fine", "off"]],
    "merge-into-itself": [["--merge", "b0", "b0"]],
    "several-in-order": [["--add", "-g", "16k", "--merge", "coarse", "--disable", "--merge", "fine", "new"]],
    "clear-then-merge": [["--clear", "--merge", "coarse", "b0"]],
    "remove-then-add": [["--remove", "--add", "-g", "1M", "fine"]],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_operation_as_qemu_img(tmp_path, capsys, case):
    ref, mine = twins(tmp_path)
    for args in CASES[case]:
        theirs = qemu_bitmap(line(args, ref))
        assert theirs.returncode == 0, theirs.stderr
        assert vdisk_bitmap(capsys, line(args, mine)) == (0, "")
        u.assert_check_clean(mine)
    assert_same(ref, mine)


@pytest.mark.skipif(not QEMU_NBD, reason="needs qemu-nbd")
@pytest.mark.parametrize("case", ["merge-finer-into-coarser", "merge-coarser-into-finer", "several-in-order",
                                  "clear-then-merge"])
def test_qemu_reads_the_bits_vdisk_merged(tmp_path, capsys, case):
    ref, mine = twins(tmp_path)
    for args in CASES[case]:
        assert vdisk_bitmap(capsys, line(args, mine)) == (0, "")
    name = CASES[case][-1][-1]
    flags, gran, bits = bits_of(mine)[name]
    assert bits                                      # something to see
    assert nbd_dirty_ranges(mine, name, tmp_path) == ranges_of_bits(bits, gran, SIZE)


def test_merge_from_another_file(tmp_path, capsys):
    ref, mine = twins(tmp_path)
    other = str(tmp_path / "other.qcow2")
    u.qemu_create(other, SIZE)
    u.qemu_img("bitmap", "--add", "-g", "2k", other, "src")
    u.qemu_io(other, "write -P 9 1M 3k", "write -P 9 6M 70k")
    args = ["--merge", "src", "-b", other, "-F", "qcow2", "coarse"]
    assert qemu_bitmap(line(args, ref)).returncode == 0
    before = open(other, "rb").read()
    assert vdisk_bitmap(capsys, line(args, mine)) == (0, "")
    assert open(other, "rb").read() == before            # the source is only read
    assert_same(ref, mine)


# -- then written by QEMU and by vdisk ---------------------------------------------------------
@pytest.mark.parametrize("writer", ["qemu-io", "vdisk"])
def test_changed_images_are_written_and_tracked(tmp_path, capsys, writer):
    ref, mine = twins(tmp_path)
    for args in (["--add", "-g", "4k", "new"], ["--clear", "b0"], ["--enable", "off"], ["--disable", "coarse"],
                 ["--remove", "fine"]):
        assert qemu_bitmap(line(args, ref)).returncode == 0
        assert vdisk_bitmap(capsys, line(args, mine)) == (0, "")
    for path in (ref, mine):
        if writer == "qemu-io":
            u.qemu_io(path, *qemu_cmds(OPS))
        else:
            vdisk_apply(path, OPS)
    assert_same(ref, mine)
    assert bits_of(mine)["new"][2] and bits_of(mine)["off"][2]     # the enabled ones saw the writes


def test_bitmaps_added_by_vdisk_track_writes_in_the_same_session(tmp_path):
    """An image open for writing keeps tracking after its bitmaps changed (the editor's commit
    reloads what is enabled)."""
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
    ref, mine = twins(tmp_path)
    u.qemu_io(ref, "write -P 1 0 64k")
    u.qemu_img("bitmap", "--add", ref, "late")
    u.qemu_io(ref, "write -P 7 100000 5000")
    img = open_image(mine, "qcow2", writable=True)
    try:
        img.write(0, bytes([1]) * 65536)                    # before: tracked by the bitmaps there
        editor = img.bitmap_editor()
        editor.add("late")
        img.commit_bitmaps(editor)
        img.write(100000, bytes([7]) * 5000)                # after: the new bitmap sees it too
    finally:
        close_chain(img)
    assert_same(ref, mine)


# -- errors: qemu-img's messages and exit statuses --------------------------------------------
ERRORS = {
    "no-operation": ["b0"],
    "granularity-without-add": ["--clear", "-g", "4k", "b0"],
    "F-without-b": ["--merge", "b0", "-F", "qcow2", "off"],
    "b-without-merge": ["--add", "-b", "x.qcow2", "new"],
    "bad-granularity-text": ["--add", "-g", "abc", "new"],
    "exists": ["--add", "b0"],
    "empty-name": ["--add", ""],
    "granularity-not-power-of-two": ["--add", "-g", "3000", "new"],
    "granularity-too-small": ["--add", "-g", "256", "new"],
    "granularity-4G": ["--add", "-g", "4G", "new"],
    "name-too-long": ["--add", "n" * 1024],
    "remove-missing": ["--remove", "nope"],
    "clear-missing": ["--clear", "nope"],
    "enable-missing": ["--enable", "nope"],
    "disable-missing": ["--disable", "nope"],
    "merge-into-missing": ["--merge", "b0", "nope"],
    "merge-from-missing": ["--merge", "nope", "b0"],
    "partial-then-fails": ["--merge", "fine", "--remove", "--clear", "b0"],
    "add-twice": ["--add", "--add", "new"],
    "too-much-space": ["--add", "-g", "512", "new"],
}


def normalized(stderr, prefix, path):
    """The message without the program's prefix, qemu-img's continuation lines (those with its
    prefix; a hint line has none) joined, spaces collapsed (vdisk's messages are one line)."""
    lines = stderr.splitlines()
    assert lines and lines[0].startswith(prefix), stderr
    text = " ".join(x[len(prefix):] for x in lines if x.startswith(prefix))
    return " ".join(re.sub(r"#block\d+", path, text).split())


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_error_as_qemu_img(tmp_path, capsys, case):
    size = 64 << 40 if case == "too-much-space" else SIZE
    ref, mine = twins(tmp_path) if size == SIZE else (str(tmp_path / "qemu.qcow2"), str(tmp_path / "vdisk.qcow2"))
    if size != SIZE:
        for path in (ref, mine):
            u.qemu_create(path, size)
    args = ERRORS[case]
    with_file = args + [ref] if case == "no-operation" else line(args, ref)
    theirs = qemu_bitmap(with_file[:-2] + [with_file[-1]] if case == "no-operation" else with_file)
    mine_args = [a if a != ref else mine for a in with_file]
    if case == "no-operation":
        mine_args = mine_args[:-2] + [mine_args[-1]]
    rc, err = vdisk_bitmap(capsys, mine_args)
    assert theirs.returncode == rc == 1
    assert err.count("\n") == 1
    assert normalized(err, "vdisk: bitmap: ", mine).replace(mine, "FILE") == \
        normalized(theirs.stderr, "qemu-img: ", ref).replace(ref, "FILE")
    assert info_bitmaps(mine) == info_bitmaps(ref)
    assert bits_of(mine) == bits_of(ref)
    u.assert_check_clean(mine)


def set_in_use(path, names):
    with open(path, "rb") as f:
        data = f.read()
    where = bm.find_extension(data[:CS], struct.unpack_from(">I", data, 100)[0], hdr.EXT_BITMAPS)
    count, dummy, dir_size, dir_offset = hdr.BITMAPS_EXTENSION.unpack_from(data, where)
    entries = bm.parse_directory(data[dir_offset:dir_offset + dir_size], count, CS, len(data))
    for e in entries:
        if e.label in names:
            e.flags |= bm.FLAG_IN_USE
    u.raw_write(path, dir_offset, bm.pack_directory(entries))


@pytest.mark.parametrize("args", [["--clear", "fine"], ["--enable", "fine"], ["--disable", "fine"],
                                  ["--merge", "b0", "fine"], ["--merge", "fine", "b0"], ["--merge", "fine", "coarse"],
                                  ["--remove", "fine"]],
                         ids=["clear", "enable", "disable", "merge-into", "merge-from", "merge-from-into-in-use",
                              "remove"])
def test_inconsistent_bitmap_as_qemu_img(tmp_path, capsys, args):
    """A bitmap left in use may only be removed (qemu-img's words; its second line, a hint, is
    not part of vdisk's one-line message)."""
    ref, mine = twins(tmp_path)
    for path in (ref, mine):
        set_in_use(path, {"fine", "coarse"})
    theirs = qemu_bitmap(line(args, ref))
    rc, err = vdisk_bitmap(capsys, line(args, mine))
    assert rc == theirs.returncode
    if rc:
        assert normalized(err, "vdisk: bitmap: ", mine) == normalized(theirs.stderr, "qemu-img: ", ref)
    assert info_bitmaps(mine) == info_bitmaps(ref)
    u.assert_check_clean(mine)


def test_merge_of_different_sizes_is_refused(tmp_path, capsys):
    ref, mine = twins(tmp_path)
    other = str(tmp_path / "other.qcow2")
    u.qemu_create(other, 2 * SIZE)
    u.qemu_img("bitmap", "--add", other, "src")
    args = ["--merge", "src", "-b", other, "b0"]
    theirs = qemu_bitmap(line(args, ref))
    rc, err = vdisk_bitmap(capsys, line(args, mine))
    assert theirs.returncode == rc == 1
    assert normalized(err, "vdisk: bitmap: ", mine) == normalized(theirs.stderr, "qemu-img: ", ref)


@pytest.mark.parametrize("kind", ["v2", "raw"])
def test_refused_where_qemu_img_refuses(tmp_path, capsys, kind):
    ref, mine = str(tmp_path / "qemu.img"), str(tmp_path / "vdisk.img")
    fmt = "raw" if kind == "raw" else "qcow2"
    for path in (ref, mine):
        u.qemu_create(path, SIZE, fmt=fmt, options={"compat": "0.10"} if kind == "v2" else None)
    for args in (["--add", "-f", fmt, "b"], ["--remove", "-f", fmt, "b"], ["--merge", "x", "-f", fmt, "b"]):
        theirs = qemu_bitmap(line(args, ref))
        before = open(mine, "rb").read()
        rc, err = vdisk_bitmap(capsys, line(args, mine))
        assert theirs.returncode == rc == 1
        assert normalized(err, "vdisk: bitmap: ", mine).replace(mine, "FILE") == \
            normalized(theirs.stderr, "qemu-img: ", ref).replace(ref, "FILE")
        assert open(mine, "rb").read() == before


@pytest.mark.slow     # qemu-img takes over a minute to load 65535 bitmaps
def test_too_many_bitmaps(tmp_path, capsys):
    """An image that holds QEMU's maximum of 65535 bitmaps (disabled, sharing one empty table)."""
    ref, mine = str(tmp_path / "qemu.qcow2"), str(tmp_path / "vdisk.qcow2")
    u.qemu_create(ref, SIZE)
    u.qemu_img("bitmap", "--add", "--disable", ref, "b0")
    with open(ref, "rb") as f:
        data = f.read()
    where = bm.find_extension(data[:CS], struct.unpack_from(">I", data, 100)[0], hdr.EXT_BITMAPS)
    count, dummy, dir_size, dir_offset = hdr.BITMAPS_EXTENSION.unpack_from(data, where)
    first = bm.parse_directory(data[dir_offset:dir_offset + dir_size], count, CS, len(data))[0]
    entries = [bm.BitmapEntry(b"b%d" % i, first.table_offset, first.table_size, 0, first.granularity_bits)
               for i in range(bm.MAX_BITMAPS)]
    directory = bm.pack_directory(entries)
    end = -(-len(data) // CS) * CS
    u.raw_write(ref, end, directory + bytes(-len(directory) % CS))
    u.raw_write(ref, where, hdr.BITMAPS_EXTENSION.pack(len(entries), 0, len(directory), end))
    shutil.copy(ref, mine)
    args = ["--add", "one-more"]
    theirs = qemu_bitmap(line(args, ref))
    rc, err = vdisk_bitmap(capsys, line(args, mine))
    assert theirs.returncode == rc == 1
    # the crafted directory is not refcounted: qemu-img's second line is its complaint about that
    first = theirs.stderr.splitlines()[0]
    assert normalized(err, "vdisk: bitmap: ", mine).replace(mine, "FILE") == \
        normalized(first, "qemu-img: ", ref).replace(ref, "FILE")
    assert "Maximum number of persistent bitmaps is already reached" in err
