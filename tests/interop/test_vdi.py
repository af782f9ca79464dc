"""vdi against qemu-img 7.2: what is specific to vdi (the shared tests are in test_format_conformance).

Sizes that are not whole sectors (as VBoxManage writes them) round up as in QEMU; zero writes
leave unallocated blocks unallocated; an allocation interrupted before its block map sector is
written leaves the block unreferenced, which check reports as qemu-img does; hostile block map
and data offsets are refused before anything is written.
"""
import json
import struct

import pytest

import helpers
import imgfmt_util as u
from conformance import BY_NAME
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vdi import header as hdr

FMT = "vdi"


qemu_create = BY_NAME[FMT].qemu_create


def check_json(path):
    proc = u.vdisk("check", "--output=json", "-f", FMT, path)
    return proc, json.loads(proc.stdout)


def test_odd_disk_size_rounded_up_like_qemu(tmp_path):
    # VBoxManage convertfromraw writes sizes that are not whole sectors: QEMU rounds them up
    path = qemu_create(tmp_path / "q.vdi", 3 * MiB)
    u.poke(path, 368, struct.pack("<Q", 2 * MiB + 100))
    assert u.info_json(path, FMT, "vdisk") == u.info_json(path, FMT, "qemu")
    assert u.info_json(path, FMT, "vdisk")["virtual-size"] == 2 * MiB + 512


def test_write_zeroes_and_allocation_order(tmp_path):
    path = u.create("vdisk", tmp_path / "v.vdi", FMT, 4 * MiB)
    img = u.open_image(path, FMT, writable=True)
    try:
        img.write(MiB, b"\x01" * 4096)
        img.write_zeroes(0, 4 * MiB)          # unallocated blocks stay unallocated
        assert img.read(0, 4 * MiB) == bytes(4 * MiB)
        assert [e for e in img.bmap] == [hdr.UNALLOCATED, 0, hdr.UNALLOCATED, hdr.UNALLOCATED]
        # an interrupted allocation: data and header written, the block map sector not
        writes = []
        real = img.host.pwrite

        def failing(data, offset):
            writes.append(offset)
            if offset == hdr.BMAP_OFFSET:
                raise OSError("interrupted")
            real(data, offset)
        img.host.pwrite = failing
        with pytest.raises(OSError):
            img.write(3 * MiB, b"\x02" * 512)
        assert writes == [img.header.offset_data + MiB, 0, hdr.BMAP_OFFSET]
    finally:
        img.host.pwrite = real
        img.close()
    assert u.read_all(path, FMT) == bytes(4 * MiB)       # the new block is not referenced
    q = helpers.qemu_check(path, FMT)
    v, vj = check_json(path)
    # qemu-img counts the unreferenced block as a mismatch of the allocated count; nothing else
    assert q["rc"] == 2
    assert v.returncode == 2
    assert q["corruptions"] == 1
    assert vj["corruptions"] == 1
    assert "allocated blocks mismatch, is 1, should be 2" in q["stderr"]
    assert v.stderr == q["stderr"]


def test_block_map_beyond_file_refused(tmp_path):
    path = qemu_create(tmp_path / "q.vdi", 3 * MiB)
    u.poke(path, 384, struct.pack("<I", 0x1FFFFF80))            # a 2 GiB block map in a 1 KiB file
    u.poke(path, 368, struct.pack("<Q", 1 << 40))
    with pytest.raises(errors.CorruptImage, match="block map"):
        u.open_image(path, FMT)
