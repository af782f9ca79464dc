"""zstd-compressed qcow2 clusters, unit level: which module provides zstd, how a cluster is decoded.

The decoder must accept what QEMU's reader accepts (block/qcow2-threads.c): any sequence of zstd
frames, decoded until the cluster is full, whatever follows (the sector-rounded stored length
reaches into the next payload), and refuse the rest with one-line ``CorruptImage`` errors.
The module probe is exercised by making ``compression.zstd`` / ``backports.zstd`` unimportable
through ``sys.modules`` (a ``None`` entry makes ``import`` raise ImportError).
"""
import os
import struct
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk import errors
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2 import compress
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.qcow2.header import (
    COMPRESSION_ZLIB, COMPRESSION_ZSTD)

CS = 64 * 1024
SKIPPABLE_MAGIC = 0x184D2A50
MISSING = "zstd compression needs the Python package backports.zstd (pip install backports.zstd)"


def _zstd():
    """The zstd module the engine uses; a test run without one is a broken set-up, not a skip."""
    try:
        return compress.zstd_module()
    except errors.MissingPackage:
        pytest.fail("no zstd module: install backports.zstd (make venv) or use Python 3.14+")


def _cluster(seed: int = 1, size: int = CS) -> bytes:
    """Compressible, non-trivial cluster content."""
    return bytes((i * seed // 7 + i // 512) & 0xFF for i in range(size))


def _skippable(payload: bytes) -> bytes:
    return struct.pack("<II", SKIPPABLE_MAGIC, len(payload)) + payload


def _decode(data: bytes, size: int = CS) -> bytes:
    return compress.decompress_cluster(data, size, COMPRESSION_ZSTD, "img.qcow2", "0x50000")


@pytest.fixture
def no_zstd(monkeypatch):
    """Neither compression.zstd nor backports.zstd importable, and the engine's cache empty."""
    for name in ("compression", "compression.zstd", "backports.zstd"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(compress, "_zstd", None)


# -- where zstd comes from ---------------------------------------------------------------------

def test_the_standard_library_module_is_preferred(monkeypatch):
    fake = types.ModuleType("compression.zstd")
    monkeypatch.setitem(sys.modules, "compression.zstd", fake)
    monkeypatch.setattr(compress, "_zstd", None)
    assert compress.zstd_module() is fake


def test_backports_zstd_is_used_without_the_standard_library_module(monkeypatch):
    _zstd()
    monkeypatch.setitem(sys.modules, "compression", None)
    monkeypatch.setitem(sys.modules, "compression.zstd", None)
    monkeypatch.setattr(compress, "_zstd", None)
    try:
        import backports.zstd as expected  # noqa: F401  pylint: disable=import-outside-toplevel
    except ImportError:
        pytest.skip("this Python's zstd is compression.zstd; backports.zstd is not installed")
    assert compress.zstd_module() is expected
    assert compress.zstd_available()


def test_without_either_module_the_error_names_the_package(no_zstd):
    assert not compress.zstd_available()
    with pytest.raises(errors.MissingPackage) as exc:
        _decode(b"\x28\xb5\x2f\xfd" + bytes(60))
    assert str(exc.value) == "img.qcow2: compression_type: " + MISSING
    assert exc.value.package == "backports.zstd"
    with pytest.raises(errors.MissingPackage) as exc:
        compress.compress_cluster(bytes(CS), COMPRESSION_ZSTD, path="out.qcow2")
    assert str(exc.value) == "out.qcow2: compression_type: " + MISSING


def test_zlib_clusters_need_no_zstd_module(no_zstd):
    data = _cluster(3)
    payload = compress.compress_cluster(data, COMPRESSION_ZLIB)
    assert compress.decompress_cluster(payload + b"\xff" * 300, CS, COMPRESSION_ZLIB, "p", "w") == data


def test_importing_and_using_zlib_images_does_not_import_zstd(tmp_path):
    """Lazy: only a zstd cluster (or creating a zstd image) loads a zstd module."""
    script = (
        "import sys\n"
        "from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import get_driver\n"
        "from ansible_collections.vdisk.images.plugins.module_utils.vdisk.ops.chain import open_image\n"
        "d = get_driver('qcow2')\n"
        "d.create(sys.argv[1], 1 << 20, {})\n"
        "img = open_image(sys.argv[1], 'qcow2', writable=True)\n"
        "img.write_compressed(0, [(bytes(65536), img.compress_block(b'x' * 65536))])\n"
        "assert img.read(0, 65536) == b'x' * 65536\n"
        "img.close()\n"
        "loaded = [m for m in ('compression.zstd', 'backports.zstd') if m in sys.modules]\n"
        "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "z.qcow2")], capture_output=True,
                          text=True, env=dict(os.environ), timeout=60)
    assert proc.returncode == 0, proc.stderr


# -- decoding as QEMU does -----------------------------------------------------------------------

def test_one_frame_with_the_sector_rounding_tail():
    zstd = _zstd()
    data = _cluster(5)
    frame = zstd.compress(data)
    for tail in (b"", bytes(511), b"\x28\xb5\x2f\xfd" + b"\xaa" * 200):   # zeros, or the next payload
        assert _decode(frame + tail) == data


def test_several_frames_and_skippable_frames_make_one_cluster():
    zstd = _zstd()
    data = _cluster(7)
    parts = [zstd.compress(data[:1000]), _skippable(b"ignored"), zstd.compress(b""),
             zstd.compress(data[1000:CS // 2]), _skippable(b""), zstd.compress(data[CS // 2:])]
    assert _decode(b"".join(parts) + bytes(100)) == data


def test_decoding_stops_when_the_cluster_is_full():
    """A frame holding more than a cluster: QEMU fills the cluster and stops; so does vdisk."""
    zstd = _zstd()
    data = _cluster(9, 3 * CS)
    assert _decode(zstd.compress(data)) == data[:CS]
    # streamed without a content size in the header, and cut off after the cluster's worth
    c = zstd.ZstdCompressor()
    stream = c.compress(data) + c.flush()
    assert _decode(stream) == data[:CS]


def test_frames_from_a_streaming_compressor_decode():
    """QEMU writes with ZSTD_compressStream2: a frame with or without the content size both decode."""
    zstd = _zstd()
    data = _cluster(11)
    c = zstd.ZstdCompressor()
    stream = c.compress(data[:5000]) + c.compress(data[5000:]) + c.flush()
    assert _decode(stream + bytes(17)) == data


@pytest.mark.parametrize("case", ["short-frame", "short-then-zeros", "cut-inside", "garbage", "empty",
                                  "only-skippable", "bad-checksum"])
def test_bad_clusters_are_one_line_corruption_errors(case):
    zstd = _zstd()
    data = _cluster(13)
    frame = zstd.compress(data)
    bad = {
        "short-frame": zstd.compress(data[:CS - 1]),
        "short-then-zeros": zstd.compress(data[:CS // 2]) + bytes(600),
        "cut-inside": frame[:len(frame) // 2],
        "garbage": os.urandom(300),
        "empty": b"",
        "only-skippable": _skippable(bytes(40)),
        "bad-checksum": None,
    }[case]
    if bad is None:
        c = zstd.ZstdCompressor(options={zstd.CompressionParameter.checksum_flag: 1})
        good = c.compress(data, c.FLUSH_FRAME)
        bad = good[:-1] + bytes([good[-1] ^ 0xFF])
    with pytest.raises(errors.CorruptImage) as exc:
        _decode(bad)
    text = str(exc.value)
    assert "\n" not in text, text
    assert text.startswith("img.qcow2: compressed cluster"), text
    assert "0x50000" in text, text


def test_many_tiny_frames_take_linear_time():
    """A hostile cluster of ~7000 empty frames (one 64 KiB cluster's worth) decodes to an error
    quickly: the decoder gets one frame at a time, never a copy of the remainder."""
    zstd = _zstd()
    empty = zstd.compress(b"")
    with pytest.raises(errors.CorruptImage):
        _decode(empty * (CS // len(empty)))


# -- compressing -------------------------------------------------------------------------------

def test_a_compressed_cluster_is_one_frame_with_its_content_size():
    zstd = _zstd()
    data = _cluster(17)
    payload = compress.compress_cluster(data, COMPRESSION_ZSTD)
    assert zstd.get_frame_size(payload) == len(payload)
    assert zstd.get_frame_info(payload).decompressed_size == CS
    assert _decode(payload) == data
    assert len(compress.compress_cluster(data, COMPRESSION_ZSTD, level=19)) <= len(payload)


def test_compressing_in_threads_gives_what_one_thread_gives():
    """The compressed writer compresses clusters in a thread pool."""
    _zstd()
    clusters = [_cluster(s) for s in range(1, 33)]
    serial = [compress.compress_cluster(c, COMPRESSION_ZSTD) for c in clusters]
    with ThreadPoolExecutor(max_workers=8) as pool:
        parallel = list(pool.map(lambda c: compress.compress_cluster(c, COMPRESSION_ZSTD), clusters))
    assert parallel == serial
    with ThreadPoolExecutor(max_workers=8) as pool:
        decoded = list(pool.map(_decode, parallel))
    assert decoded == clusters


def test_unknown_compression_types_are_refused():
    with pytest.raises(errors.UnsupportedFeature):
        compress.compress_cluster(bytes(CS), 2)
    with pytest.raises(errors.UnsupportedFeature):
        compress.decompress_cluster(b"x", CS, 2, "p", "w")
