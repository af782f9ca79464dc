"""qcow2 external data files in the engine alone: layout, the offset-0 rule, check, options."""
import os
import struct

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import header as hdr
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import close_chain, open_image
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver

MiB = 1024 * 1024
CS = 65536


def make(tmp_path, **options):
    path = str(tmp_path / "a.qcow2")
    get_driver("qcow2").create(path, 4 * MiB, dict({"data_file": "d.raw"}, **options))
    return path


def l2_entries(path, count):
    with open(path, "rb") as f:
        data = f.read()
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    l2 = struct.unpack_from(">Q", data, l1_offset)[0] & hdr.OFFSET_MASK
    return struct.unpack_from(">%dQ" % count, data, l2)


def test_header_and_data_file_layout(tmp_path):
    path = make(tmp_path)
    assert os.path.getsize(tmp_path / "d.raw") == 4 * MiB
    img = open_image(path, "qcow2")
    try:
        data = img.info()["format-specific"]["data"]
        assert (data["data-file"], data["data-file-raw"]) == ("d.raw", False)
        assert img.header.incompatible_features & hdr.INCOMPAT_DATA_FILE
    finally:
        close_chain(img)


def test_guest_cluster_zero_sits_at_host_offset_zero(tmp_path):
    path = make(tmp_path)
    img = open_image(path, "qcow2", writable=True)
    try:
        img.write(0, b"\x5a" * 100)
        img.write(3 * CS + 7, b"\xa5" * 10)
    finally:
        close_chain(img)
    # COPIED with offset 0 is an allocated cluster in a data file; the others sit at their guest offset
    assert l2_entries(path, 4) == (hdr.OFLAG_COPIED, 0, 0, hdr.OFLAG_COPIED | 3 * CS)
    assert os.path.getsize(path) == 5 * CS      # header, refcount table and block, L1, one L2 table: no data
    raw = (tmp_path / "d.raw").read_bytes()
    assert raw[:100] == b"\x5a" * 100 and raw[3 * CS + 7:3 * CS + 17] == b"\xa5" * 10
    img = open_image(path, "qcow2")
    try:
        assert img.read(0, 101) == b"\x5a" * 100 + b"\0"
        assert [(e.offset, e.kind, e.host_offset) for e in img.extents(0, 4 * CS)] == [
            (0, "data", 0), (CS, "unallocated", None), (3 * CS, "data", 3 * CS)]
        result = img.check()
        assert (result.corruptions, result.leaks, result.allocated_clusters) == (0, 0, 2)
    finally:
        close_chain(img)


def test_raw_data_file_stays_raw(tmp_path):
    path = make(tmp_path, data_file_raw=True)
    img = open_image(path, "qcow2", writable=True)
    try:
        img.write(0, b"\x11" * (3 * CS))
        img.write_zeroes(CS, CS, unmap=True)
        img.discard(2 * CS, CS)
    finally:
        close_chain(img)
    raw = (tmp_path / "d.raw").read_bytes()
    assert raw[:CS] == b"\x11" * CS and raw[CS:3 * CS] == bytes(2 * CS)
    img = open_image(path, "qcow2")
    try:
        assert img.read(0, 4 * MiB) == raw
    finally:
        close_chain(img)


@pytest.mark.parametrize("options, message", [
    ({"data_file": None, "data_file_raw": True}, "data-file-raw requires data-file"),
    ({"compat": "0.10"}, "External data files are only supported with compatibility level 1.1"),
    ({"data_file_raw": True, "backing_file": "b.qcow2"}, "Backing file and data-file-raw cannot be used"),
])
def test_create_options(tmp_path, options, message):
    with pytest.raises(errors.InvalidOption, match=message):
        make(tmp_path, **options)


def test_missing_data_file_is_one_line(tmp_path):
    path = make(tmp_path)
    os.unlink(tmp_path / "d.raw")
    img = open_image(path, "qcow2")
    try:
        assert img.info()["format-specific"]["data"]["data-file"] == "d.raw"     # info never opens it
        with pytest.raises(errors.ImageError, match="Could not open '.*d.raw': No such file or directory"):
            list(img.extents())         # what map and convert ask first
    finally:
        close_chain(img)


def test_data_file_outside_the_tree_is_refused(tmp_path):
    (tmp_path / "img").mkdir()
    path = str(tmp_path / "img" / "a.qcow2")
    get_driver("qcow2").create(path, MiB, {"data_file": "../d.raw"})
    with pytest.raises(errors.PolicyError, match="data file '../d.raw' leaves the image's directory"):
        open_image(path, "qcow2")
    img = open_image(path, "qcow2", policy=Policy(allowed_dirs=(str(tmp_path),)))
    close_chain(img)


def test_compressed_write_and_snapshot_refused(tmp_path):
    path = make(tmp_path)
    img = open_image(path, "qcow2", writable=True)
    try:
        with pytest.raises(errors.UnsupportedFeature, match="external data file"):
            img.write_compressed(0, [(b"\1" * CS, b"x")])
        with pytest.raises(errors.UnsupportedFeature, match="external data file"):
            img.create_snapshot("s1")
    finally:
        close_chain(img)
