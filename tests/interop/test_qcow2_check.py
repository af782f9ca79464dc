"""qcow2 check and repair on damaged images, in the style of QEMU's iotests 060/080/108/138.

For each damage: vdisk's exit class (0 clean, 2 corruptions, 3 leaks only) equals
qemu-img's, a plain check writes nothing, and ``check -r all`` leaves an image that
``qemu-img check`` finds clean, also where qemu-img's own repair gives up.
"""
import hashlib
import json
import os
import struct
import subprocess

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver

QCOW2 = get_driver("qcow2")
CS = 65536
L1 = 3 * CS          # qemu-img's layout for a small image: header, reftable, refblock, L1, ...
REFTABLE = 1 * CS
REFBLOCK = 2 * CS
L2 = 4 * CS


def run(*args, check=True):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check)


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def peek_u64(path, offset):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def u64(value):
    return struct.pack(">Q", value)


def image(tmp_path, extra=()):
    path = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-f", "qcow2", path, "4M")
    run("qemu-io", "-c", "write -P 1 0 200k", "-c", "write -P 2 1M 64k", *extra, path)
    return path


def damage_leak(path):
    run("qemu-img", "resize", path, "8M")                    # grows the file, leaves nothing leaked...
    poke(path, REFBLOCK + 2 * 20, b"\x00\x01")                # ...so mark cluster 20 as used


def damage_header_refcount_2(path):
    poke(path, REFBLOCK, b"\x00\x02")


def damage_header_refcount_0(path):
    poke(path, REFBLOCK, b"\x00\x00")


def damage_data_refcount_0(path):
    poke(path, REFBLOCK + 2 * 5, b"\x00\x00")


def damage_l1_past_eof(path):
    poke(path, L1, u64((1 << 63) | 0x10000000))


def damage_l1_unaligned(path):
    poke(path, L1, u64((1 << 63) | (L2 + 0x200)))


def damage_l2_overlaps_header(path):
    poke(path, L1, u64((1 << 63) | 0x200))


def damage_l2_entry_past_eof(path):
    poke(path, L2, u64((1 << 63) | 0x40000000))


def damage_l2_entry_unaligned(path):
    poke(path, L2, u64((1 << 63) | (5 * CS + 0x200)))


def damage_copied_dropped(path):
    poke(path, L2, u64(peek_u64(path, L2) & ~(1 << 63)))


def damage_l2_is_refblock(path):
    poke(path, L1, u64((1 << 63) | REFBLOCK))                 # the L2 table overlaps a refcount block


def damage_reftable_unaligned(path):
    poke(path, REFTABLE, u64(REFBLOCK + 0x200))


def damage_refblock_is_reftable(path):
    poke(path, REFTABLE, u64(REFTABLE))                       # a refcount block pointing at itself


def damage_snapshot_l1_unaligned(path):
    run("qemu-img", "snapshot", "-c", "test", path)
    snap_table = peek_u64(path, 64)
    poke(path, snap_table, u64(peek_u64(path, snap_table) + 0x200))


def damage_compressed_past_eof(path):
    # a compressed cluster whose data lies far beyond the end of the file
    x = 62 - (16 - 8)
    poke(path, L2, u64((1 << 62) | (3 << x) | 0x3000000))


DAMAGES = [
    damage_leak, damage_header_refcount_2, damage_header_refcount_0, damage_data_refcount_0,
    damage_l1_past_eof, damage_l1_unaligned, damage_l2_overlaps_header, damage_l2_entry_past_eof,
    damage_l2_entry_unaligned, damage_copied_dropped, damage_l2_is_refblock, damage_reftable_unaligned,
    damage_refblock_is_reftable, damage_snapshot_l1_unaligned, damage_compressed_past_eof,
]


def vdisk_check(path, repair=None):
    img = QCOW2.open(str(path), writable=bool(repair), policy=Policy(repair=bool(repair)))
    try:
        return img.check(repair)
    finally:
        img.close()


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda f: f.__name__[len("damage_"):])
def test_check_classifies_like_qemu_and_repair_leaves_qemu_clean(tmp_path, damage):
    path = image(tmp_path)
    damage(path)
    qemu = run("qemu-img", "check", "--output=json", path, check=False)
    before = digest(path)
    result = vdisk_check(path)
    assert digest(path) == before, "a check without -r must not write"
    if qemu.returncode == 1:
        # qemu-img cannot finish ("Check failed"); vdisk finishes and reports the corruption
        assert result.exit_code() == 2, (result.to_json(), result.messages[:5])
    else:
        assert result.exit_code() == qemu.returncode, (result.to_json(), qemu.stdout, result.messages[:5])
    if qemu.returncode in (2, 3):
        q = json.loads(qemu.stdout)
        assert bool(result.corruptions) == bool(q.get("corruptions"))
        assert bool(result.leaks) == bool(q.get("leaks"))
    assert all("\n" not in m for m in result.messages)
    repaired = vdisk_check(path, "all")
    assert repaired.exit_code() == 0, repaired.messages
    after = run("qemu-img", "check", "--output=json", path, check=False)
    assert after.returncode == 0, after.stdout + after.stderr
    report = json.loads(after.stdout)
    assert "corruptions" not in report and "leaks" not in report
    run("qemu-img", "convert", "-O", "raw", path, tmp_path / "readable.raw")   # still readable by qemu


def test_repair_leaks_only_fixes_leaks(tmp_path):
    path = image(tmp_path)
    damage_header_refcount_2(path)
    result = vdisk_check(path, "leaks")
    assert result.leaks_fixed == 1 and result.exit_code() == 0
    assert run("qemu-img", "check", path, check=False).returncode == 0


def test_check_json_matches_qemu_on_clean_images(tmp_path):
    path = image(tmp_path, ("-c", "write -P 3 2M 300k", "-c", "write -z 3M 64k"))
    run("qemu-img", "snapshot", "-c", "s", path)
    run("qemu-io", "-c", "write -P 4 0 64k", path)
    mine = vdisk_check(path).to_json()
    theirs = json.loads(run("qemu-img", "check", "--output=json", path).stdout)
    theirs["filename"] = mine["filename"] = str(path)
    assert mine == theirs


def test_compressed_image_counts_like_qemu(tmp_path):
    raw = tmp_path / "src.raw"
    raw.write_bytes(bytes(range(256)) * 4096 + bytes(1 << 20))
    path = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-f", "raw", raw, path)
    mine = vdisk_check(path).to_json()
    theirs = json.loads(run("qemu-img", "check", "--output=json", path).stdout)
    theirs["filename"] = mine["filename"] = str(path)
    assert mine == theirs


# -- full, contiguous L2 tables: the check's whole-table shortcut -----------------------------------
def _full_table_image(tmp_path, snapshot=False):
    """4 KiB clusters, 8 MiB written in one go: four L2 tables of 512 consecutive clusters."""
    path = tmp_path / "full.qcow2"
    run("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", path, "16M")
    run("qemu-io", "-c", "write -P 7 0 8M", path)
    if snapshot:
        run("qemu-img", "snapshot", "-c", "s", path)
    return path


def _refcount_entry(path, host_offset):
    """File offset of the 16-bit refcount of the cluster at *host_offset*."""
    with open(path, "rb") as f:
        header = f.read(72)
        reftable = struct.unpack(">Q", header[48:56])[0]
        cluster = host_offset // 4096
        f.seek(reftable + 8 * (cluster // 2048))
        block = struct.unpack(">Q", f.read(8))[0]
    return block + 2 * (cluster % 2048)


def _data_host_offset(path, guest):
    extents = json.loads(run("qemu-img", "map", "--output=json", path).stdout)
    for e in extents:
        if e["start"] <= guest < e["start"] + e["length"] and e.get("offset") is not None:
            return e["offset"] + guest - e["start"]
    raise AssertionError("no data at %d" % guest)


@pytest.mark.parametrize("case", ["clean", "refcount-0", "refcount-2", "leak", "snapshot", "snapshot-refcount-1"])
def test_full_contiguous_tables_report_like_qemu(tmp_path, case):
    path = _full_table_image(tmp_path, snapshot=case.startswith("snapshot"))
    host = _data_host_offset(path, 3 * 1024 * 1024 + 4096)
    if case == "refcount-0":
        poke(path, _refcount_entry(path, host), b"\x00\x00")
    elif case in ("refcount-2", "snapshot-refcount-1"):
        poke(path, _refcount_entry(path, host), b"\x00\x02" if case == "refcount-2" else b"\x00\x01")
    elif case == "leak":
        poke(path, _refcount_entry(path, os.path.getsize(path)), b"\x00\x01")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) + 4096)
    mine = vdisk_check(path).to_json()
    theirs = json.loads(run("qemu-img", "check", "--output=json", path, check=False).stdout)
    theirs["filename"] = mine["filename"] = str(path)
    assert mine == theirs
