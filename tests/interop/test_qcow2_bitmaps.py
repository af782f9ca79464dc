"""Persistent dirty bitmaps in qcow2 images written by vdisk, judged by QEMU.

Images get bitmaps from ``qemu-img bitmap --add`` and first writes from qemu-io.  Then the
same guest writes go to two copies: through qemu-io on one, through vdisk on the other.
Afterwards the stored bits of every bitmap are the same bit for bit (both images parsed with
vdisk's parser), QEMU's own view of the bits (``qemu-nbd -B`` exported and read with
``qemu-img map``, where qemu-nbd is installed) marks exactly the granules vdisk marked,
``qemu-img check`` is clean and ``qemu-img info`` shows the flags as QEMU leaves them
(``in-use`` off after a clean close, disabled bitmaps untouched, an ``in-use`` bitmap kept).
"""
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

import qcow2_util as u
from qcow2_util import KiB, MiB, errors

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import bitmaps as bm
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image

pytestmark = pytest.mark.skipif(not (u.QEMU_IMG and u.QEMU_IO), reason="needs qemu-img and qemu-io")
QEMU_NBD = shutil.which("qemu-nbd")
SIZE = 8 * MiB
CS = 64 * KiB


# -- helpers -------------------------------------------------------------------------------
def stored_bitmaps(path):
    """{name: (flags, granularity, bits)} of an image's bitmaps, read with vdisk's parser."""
    with open(path, "rb") as f:
        data = f.read()
    cs = 1 << struct.unpack_from(">I", data, 20)[0]
    header_length = struct.unpack_from(">I", data, 100)[0]
    where = bm.find_extension(data[:cs], header_length, hdr.EXT_BITMAPS)
    count, dummy, dir_size, dir_offset = hdr.BITMAPS_EXTENSION.unpack_from(data, where)
    out = {}
    for e in bm.parse_directory(data[dir_offset:dir_offset + dir_size], count, cs, len(data), path):
        table = bm.parse_table(data[e.table_offset:e.table_offset + 8 * e.table_size], cs, len(data), e.label)
        bits = b"".join(data[t & bm.TABLE_OFFSET_MASK:(t & bm.TABLE_OFFSET_MASK) + cs]
                        if t & bm.TABLE_OFFSET_MASK else bytes(cs) for t in table)
        out[e.label] = (e.flags, e.granularity, bits.rstrip(b"\0"), e.table_offset)
    return out


def info_flags(path):
    info = json.loads(u.qemu_img("info", "--output=json", path).stdout)
    return {b["name"]: sorted(b["flags"]) for b in info["format-specific"]["data"].get("bitmaps", [])}


def base_image(path, size=SIZE):
    u.qemu_create(path, size)
    u.qemu_img("bitmap", "--add", path, "b0")
    u.qemu_img("bitmap", "--add", "-g", "4k", path, "fine")
    u.qemu_img("bitmap", "--add", "-g", "1M", path, "coarse")
    u.qemu_img("bitmap", "--add", "--disable", path, "off")
    u.qemu_io(path, "write -P 1 0 64k", "write -P 2 5M 4k")


OPS = [
    ("write", 100000, 5000),
    ("zero", 2 * MiB, 300 * KiB),
    ("discard", 3 * MiB, 64 * KiB),
    ("write", 4 * MiB - 1, 2),
    ("zero", 6 * MiB + 512, 512),
    ("write", SIZE - 4096, 4096),
]


def qemu_cmds(ops):
    out = []
    for kind, off, n in ops:
        out.append({"write": "write -P 7 %d %d", "zero": "write -z %d %d", "discard": "discard %d %d"}[kind]
                   % (off, n))
    return out


def vdisk_apply(path, ops):
    img = open_image(path, "qcow2", writable=True)
    try:
        for kind, off, n in ops:
            if kind == "write":
                img.write(off, bytes([7]) * n)
            elif kind == "zero":
                img.write_zeroes(off, n)
            else:
                img.discard(off, n)
    finally:
        close_chain(img)


def nbd_dirty_ranges(path, name, tmp_path):
    """QEMU's own view of a bitmap: the image exported by qemu-nbd with it, read by qemu-img map
    (dirty ranges show as ``data: false``)."""
    sock = str(tmp_path / ("nbd-%s.sock" % name))
    proc = subprocess.Popen([QEMU_NBD, "-r", "-f", "qcow2", "-B", name, "--socket=" + sock, "--persistent",
                             path], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.05)
        opts = "driver=nbd,server.type=unix,server.path=%s,x-dirty-bitmap=qemu:dirty-bitmap:%s" % (sock, name)
        entries = json.loads(u.qemu_img("map", "--output=json", "--image-opts", opts).stdout)
    finally:
        proc.terminate()
        proc.wait(10)
    return [(e["start"], e["length"]) for e in entries if not e["data"]]


def ranges_of_bits(bits, granularity, size):
    out = []
    for i in range(len(bits) * 8):
        if bits[i // 8] >> (i % 8) & 1:
            start, end = i * granularity, min(size, (i + 1) * granularity)
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], end - out[-1][0])
            else:
                out.append((start, end - start))
    return out


# -- writes keep enabled bitmaps valid -------------------------------------------------------
@pytest.mark.parametrize("ops", [OPS, OPS[:1], [("discard", 0, SIZE)]], ids=["mixed", "one-write", "discard-all"])
def test_vdisk_writes_set_the_bits_qemu_sets(tmp_path, ops):
    base = str(tmp_path / "base.qcow2")
    base_image(base)
    ref, mine = str(tmp_path / "qemu.qcow2"), str(tmp_path / "vdisk.qcow2")
    shutil.copy(base, ref)
    shutil.copy(base, mine)
    before = stored_bitmaps(base)
    u.qemu_io(ref, *qemu_cmds(ops))
    vdisk_apply(mine, ops)
    u.assert_check_clean(mine)
    theirs, ours = stored_bitmaps(ref), stored_bitmaps(mine)
    assert {k: v[:3] for k, v in ours.items()} == {k: v[:3] for k, v in theirs.items()}
    assert ours["off"] == before["off"]                     # disabled: not even moved
    assert ours["b0"][2] != before["b0"][2]
    assert info_flags(mine) == {"b0": ["auto"], "fine": ["auto"], "coarse": ["auto"], "off": []}
    u.qemu_compare(ref, mine, "qcow2", "qcow2")


@pytest.mark.skipif(not QEMU_NBD, reason="needs qemu-nbd")
def test_qemu_reads_the_bits_vdisk_stored(tmp_path):
    path = str(tmp_path / "a.qcow2")
    base_image(path)
    vdisk_apply(path, OPS)
    ours = stored_bitmaps(path)
    for name in ("b0", "fine", "coarse"):
        flags, gran, bits, dummy = ours[name]
        assert nbd_dirty_ranges(path, name, tmp_path) == ranges_of_bits(bits, gran, SIZE), name


def test_convert_into_an_image_with_bitmaps_marks_the_writes(tmp_path):
    """``vdisk convert -n`` writes through the same paths: the target's bitmap sees the copy."""
    src, dst, ref = (str(tmp_path / n) for n in ("src.raw", "dst.qcow2", "ref.qcow2"))
    u.make_raw(src, SIZE)
    u.raw_write(src, 3 * MiB, u.pattern(3, 200 * KiB))
    u.qemu_create(dst, SIZE)
    u.qemu_img("bitmap", "--add", dst, "b0")
    shutil.copy(dst, ref)
    u.run(sys.executable, "-m", "ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main",
          "convert", "-n", "-f", "raw", "-O", "qcow2", src, dst)
    u.qemu_img("convert", "-n", "-f", "raw", "-O", "qcow2", src, ref)
    u.assert_check_clean(dst)
    assert stored_bitmaps(dst)["b0"][:3] == stored_bitmaps(ref)["b0"][:3]
    assert stored_bitmaps(dst)["b0"][2]
    assert info_flags(dst) == {"b0": ["auto"]}


def test_in_use_bitmap_is_left_as_qemu_leaves_it(tmp_path):
    """A bitmap found in use (a crashed writer) stays in use and untouched; the rest are tracked."""
    path = str(tmp_path / "a.qcow2")
    base_image(path)
    before = stored_bitmaps(path)
    with open(path, "rb") as f:
        data = f.read()
    where = bm.find_extension(data[:CS], struct.unpack_from(">I", data, 100)[0], hdr.EXT_BITMAPS)
    dummy, dummy, dir_size, dir_offset = hdr.BITMAPS_EXTENSION.unpack_from(data, where)
    entries = bm.parse_directory(data[dir_offset:dir_offset + dir_size], 4, CS, len(data))
    entries[1].flags |= bm.FLAG_IN_USE                     # "fine"
    u.raw_write(path, dir_offset, bm.pack_directory(entries))
    ref = str(tmp_path / "ref.qcow2")
    shutil.copy(path, ref)
    u.qemu_io(ref, *qemu_cmds(OPS))
    vdisk_apply(path, OPS)
    u.assert_check_clean(path)
    ours = stored_bitmaps(path)
    assert ours["fine"][2:] == before["fine"][2:]
    assert info_flags(path) == info_flags(ref) == {"b0": ["auto"], "fine": ["auto", "in-use"],
                                                    "coarse": ["auto"], "off": []}
    assert ours["b0"][:3] == stored_bitmaps(ref)["b0"][:3]


CHILD = r"""
import os, signal, sys
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import io as vio
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import open_image
img = open_image(sys.argv[1], "qcow2", writable=True)
img.write(1 << 20, b"x" * 4096)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_crash_leaves_the_bitmap_in_use(tmp_path):
    """Killed between a write and close: the enabled bitmaps say in-use (never trusted again),
    the disabled one does not, and qemu-img check is clean (it does not report in-use bitmaps)."""
    path = str(tmp_path / "a.qcow2")
    base_image(path)
    proc = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert info_flags(path) == {"b0": ["auto", "in-use"], "fine": ["auto", "in-use"],
                                "coarse": ["auto", "in-use"], "off": []}
    u.assert_check_clean(path)
    # a later writer leaves them in use, as QEMU does
    vdisk_apply(path, OPS[:1])
    assert info_flags(path)["b0"] == ["auto", "in-use"]
    u.assert_check_clean(path)


# -- what vdisk refuses ---------------------------------------------------------------------
def test_unusable_bitmap_directory_refuses_writes(tmp_path):
    path = str(tmp_path / "a.qcow2")
    base_image(path)
    with open(path, "rb") as f:
        data = f.read()
    where = bm.find_extension(data[:CS], struct.unpack_from(">I", data, 100)[0], hdr.EXT_BITMAPS)
    dir_offset = hdr.BITMAPS_EXTENSION.unpack_from(data, where)[3]
    u.raw_write(path, dir_offset + 17, b"\x28")             # granularity bits 40
    before = open(path, "rb").read()
    with pytest.raises(errors.CorruptImage) as exc:
        open_image(path, "qcow2", writable=True)
    assert "granularity bits 40" in str(exc.value) and "\n" not in str(exc.value)
    assert open(path, "rb").read() == before
