"""vpc (VHD) against qemu-img 7.2: what is specific to vpc (the shared tests are in
test_format_conformance): CHS rounding, the creator application deciding the size, sector bitmaps.

The virtual size qemu-img gives each request and its geometry; a fixed image probes as raw, as in
QEMU (which looks only at offset 0); current_size or the CHS geometry, as the creator application
says (QEMU 7.2's list); new blocks are written bitmap, data, footer, BAT entry, with every sector
marked as qemu-img marks them, and a write into a Hyper-V block marks the sectors it covers; a
fixed footer claiming more than the file is read as QEMU reads it and never written over.
"""
import struct

import pytest

import helpers
import imgfmt_util as u
from conformance import BY_NAME
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vpc import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver, probe_file

FMT = "vpc"
VPC = BY_NAME[FMT]
poke_footer, qemu_create, vdisk_create, info_json = VPC.poke_footer, VPC.qemu_create, VPC.vdisk_create, VPC.info


def slow(values):
    return pytest.param(*values, marks=pytest.mark.slow)


@pytest.mark.parametrize("size", u.cells([1, 34816 + 512, 10 * MiB, 127 * 1024 * MiB, 300 * 1024 * MiB],
                                         (10 * MiB,)))
def test_chs_rounding_like_qemu(size):
    # the virtual size qemu-img gives each request, and its geometry, without writing images
    drv = get_driver(FMT)
    assert drv.probe(b"conectix", "x") == 100
    vsize, chs = hdr.rounded_size(-(-size // 512) * 512, False)
    assert vsize >= size
    if chs != (hdr.CHS_MAX_C, hdr.CHS_MAX_H, hdr.CHS_MAX_S):
        assert vsize == chs[0] * chs[1] * chs[2] * 512
        assert hdr.calculate_geometry(vsize // 512) == chs


def test_fixed_image_probes_as_raw_like_qemu(tmp_path):
    fixed = qemu_create(tmp_path / "f.img", MiB, subformat="fixed")
    assert probe_file(fixed) == "raw"            # QEMU looks only at offset 0: a fixed VHD probes as raw
    assert helpers.qemu_img("info", "--output=json", fixed).stdout.count(b'"raw"') == 1


@pytest.mark.parametrize("app,uses_size", [(b"vpc ", False), slow((b"qemu", False)), (b"win ", True),
                                           slow((b"qem2", True)), slow((b"d2v ", True)), slow((b"CTXS", True)),
                                           (b"tap\0", True), slow((b"xyz ", False))])
def test_size_from_creator_app_like_qemu(tmp_path, app, uses_size):
    # current_size and the CHS geometry disagree; the creator application decides, as in QEMU 7.2
    path = qemu_create(tmp_path / "q.vhd", 10 * MiB)
    poke_footer(path, 28, app)
    poke_footer(path, 48, struct.pack(">Q", 8 * MiB))
    got = info_json(path, "vdisk")
    assert got == info_json(path, "qemu")
    assert got["virtual-size"] == (8 * MiB if uses_size else 10514432)


def test_sector_bitmaps_and_allocation_order(tmp_path):
    path = vdisk_create(tmp_path / "v.vhd", 5222400)
    img = u.open_image(path, FMT, writable=True)
    try:
        writes = []
        real = img.host.pwrite

        def logged(data, offset):
            writes.append((offset, len(data)))
            real(data, offset)
        img.host.pwrite = logged
        img.write(2 * MiB + 1024, b"\x01" * 512)          # a new block: bitmap, data, footer, BAT entry
        first = 2048
        assert writes == [(first, 512), (first + 512 + 1024, 512), (first + 512 + 2 * MiB, 512), (1536 + 4, 4)]
        img.host.pwrite = real
    finally:
        img.close()
    with open(path, "rb") as f:
        f.seek(first)
        assert f.read(512) == b"\xff" * 512               # every sector marked, as qemu-img does
    # a Hyper-V block with only some sectors marked: a write marks the sectors it covers
    u.poke(path, first, bytes(512))
    img = u.open_image(path, FMT, writable=True)
    try:
        img.write(2 * MiB + 4096 + 100, b"\x02" * 1000)   # sectors 8 to 10 of the block
    finally:
        img.close()
    with open(path, "rb") as f:
        f.seek(first)
        assert f.read(2) == b"\x00\xe0"
    assert u.read_all(path, FMT)[2 * MiB + 4196:2 * MiB + 5196] == b"\x02" * 1000


def test_not_vhd_refused(tmp_path):
    raw = helpers.make_raw(tmp_path / "x.raw", 4096, [(0, 4096)])
    v = u.vdisk("info", "-f", FMT, raw)
    assert v.returncode == 1
    assert "invalid VPC image" in v.stderr


def test_fixed_footer_claiming_more_than_the_file(tmp_path):
    path = qemu_create(tmp_path / "q.vhd", 5222400, subformat="fixed")
    poke_footer(path, 56, struct.pack(">HBB", 300, 4, 17), at_end=True)     # CHS of a bigger disk
    assert info_json(path, "vdisk") == info_json(path, "qemu")
    img = u.open_image(path, FMT, writable=True)
    try:
        with pytest.raises(errors.CorruptImage):
            img.write(img.virtual_size - 512, b"x" * 512)   # would overwrite the footer
    finally:
        img.close()
    u.assert_same_as_qemu(path, FMT, tmp_path)
