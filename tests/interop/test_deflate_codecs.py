"""Compressed images read through zlib-ng (the pip package's dependency) and through the standard
library's zlib (an Ansible target without it): both give qemu-img's guest bytes, for every format
whose data is deflated (qcow2 and qcow clusters, streamOptimized VMDK grains), and both refuse a
damaged stream with the same one-line error.  The inflater in use is switched by resetting
``deflate_codecs._inflate_module``; ``sys.modules["zlib_ng"] = None`` makes zlib-ng unimportable.
"""
import os
import random
import struct
import sys
import zlib

import pytest

import helpers
import imgfmt_util as u
from helpers import MiB
from ansible_collections.vdisk.images.plugins.module_utils.vdisk import deflate_codecs, errors


@pytest.fixture(params=["zlib-ng", "zlib"])
def inflater(request, monkeypatch):
    """The inflater the engine uses for the test: zlib-ng, or zlib as if zlib-ng were not installed."""
    if request.param == "zlib-ng":
        pytest.importorskip("zlib_ng")
    else:
        monkeypatch.setitem(sys.modules, "zlib_ng", None)
    monkeypatch.setattr(deflate_codecs, "_inflate_module", None)      # looked for again on first use
    monkeypatch.setattr(deflate_codecs, "ERRORS", (zlib.error,))
    yield request.param
    expected = "zlib_ng" if request.param == "zlib-ng" else "zlib"
    assert deflate_codecs._inflate_module is not None and deflate_codecs._inflate_module.__name__.rsplit(".", 1)[-1] == expected


def _compressible(size, seed):
    """Text-like guest data: deflate shrinks it, and its matches reach across the 4 KiB window."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghij klmnop\n") for dummy in range(rng.randint(3, 12))) for dummy in range(300)]
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words)
    return bytes(out[:size])


def _source(tmp_path, size=6 * MiB):
    path = str(tmp_path / "src.raw")
    with open(path, "wb") as f:
        f.truncate(size)
        f.write(_compressible(2 * MiB, 1))
        f.seek(3 * MiB)
        f.write(os.urandom(256 * 1024))           # incompressible: stored uncompressed by both tools
        f.write(_compressible(MiB, 2))
    return path


@pytest.mark.parametrize("fmt,opts", [("qcow2", []), ("qcow", []), ("vmdk", ["-o", "subformat=streamOptimized"])])
def test_qemu_compressed_images_read_identically(tmp_path, inflater, fmt, opts):
    src = _source(tmp_path)
    path = str(tmp_path / ("q." + fmt))
    # qemu-img 7.2 writes a whole qcow image with -c but exits 1 (see conformance.QCOW.convert_c)
    helpers.run("qemu-img", "convert", "-c", "-f", "raw", "-O", fmt, *opts, src, path, check=fmt != "qcow")
    assert helpers.qemu_img("info", "-f", fmt, path).returncode == 0
    with open(src, "rb") as f:
        assert u.read_all(path, fmt) == f.read()


def test_damaged_cluster_is_one_line_error(tmp_path, inflater):
    src = _source(tmp_path)
    path = str(tmp_path / "q.qcow2")
    helpers.run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", src, path)
    # the first compressed cluster's stream: a damaged block type (0b11 is reserved in deflate)
    with open(path, "r+b") as f:
        f.seek(_first_compressed_offset(path))
        f.write(b"\xff\xff\xff\xff")
    with pytest.raises(errors.CorruptImage, match="cannot be inflated"):
        u.read_all(path, "qcow2")


def _first_compressed_offset(path):
    """The host offset of the first compressed cluster (qcow2 L2 entry bit 62), read from the tables."""
    with open(path, "rb") as f:
        head = f.read(104)
        cluster_bits = struct.unpack_from(">I", head, 20)[0]
        l1_offset = struct.unpack_from(">Q", head, 40)[0]
        f.seek(l1_offset)
        l2_offset = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        f.seek(l2_offset)
        table = f.read(1 << cluster_bits)
    for i in range(0, len(table), 8):
        entry = struct.unpack_from(">Q", table, i)[0]
        if entry & (1 << 62):
            return entry & ((1 << (62 - (cluster_bits - 8))) - 1)
    raise AssertionError("no compressed cluster")


@pytest.fixture(params=["libdeflate", "zlib"])
def compressor(request, monkeypatch):
    """The zlib-stream compressor the engine uses: libdeflate (the deflate package), or zlib as if it
    were not installed."""
    if request.param == "libdeflate":
        pytest.importorskip("deflate")
    else:
        monkeypatch.setitem(sys.modules, "deflate", None)
    monkeypatch.setattr(deflate_codecs, "_zlib_compress", None)
    yield request.param
    expected = zlib.compress if request.param == "zlib" else sys.modules["deflate"].zlib_compress
    assert deflate_codecs._zlib_compress is expected


def test_zlib_compress_is_a_zlib_stream(compressor):
    data = _compressible(256 * 1024, 3)
    out = deflate_codecs.zlib_compress(data, 6)
    assert zlib.decompress(out) == data
    assert len(out) < len(data) // 2


def test_stream_optimized_vmdk_written_with_either_passes_qemu(tmp_path, compressor):
    src = _source(tmp_path)
    out = str(tmp_path / "v.vmdk")
    u.vdisk("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, out, check=True)
    assert helpers.qemu_check(out, "vmdk")["rc"] == 0
    assert helpers.qemu_compare(src, out, "raw", "vmdk")


def test_libdeflate_grains_no_larger_than_zlib(tmp_path, monkeypatch):
    """The faster compressor is taken only because its output is not larger (qemu-img's is zlib's)."""
    pytest.importorskip("deflate")
    grains = [_compressible(64 * 1024, seed) for seed in range(8)] + [os.urandom(64 * 1024)]
    monkeypatch.setattr(deflate_codecs, "_zlib_compress", None)
    fast = sum(len(deflate_codecs.zlib_compress(g, 6)) for g in grains)
    assert fast <= sum(len(zlib.compress(g, 6)) for g in grains)
