"""Engine core: sizes as qemu-img parses and prints them, host-file I/O, atomic output, options, policy."""
import os
import random
import subprocess

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk import io as vio
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.driver import Policy, split_option_string
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.errors import (
    ImageError, InvalidOption, PolicyError)
from ansible_collections.vdisk.images.plugins.module_utils.vdisk.units import (
    format_size, parse_relative_size, parse_size, round_up)


@pytest.mark.parametrize("text,value", [
    ("1.5G", 1610612736), ("1.1k", 1126), ("0x100", 256), ("1b", 1), ("1B", 1), ("10K", 10240), (" 5", 5),
    ("512", 512), ("20G", 20 << 30), ("1.5T", 1649267441664), ("8191P", 8191 << 50)])
def test_parse_size_accepts_what_qemu_img_accepts(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["1.5", "1e3", "5x", "8E", "-1", "", "G", "1.5.5G"])
def test_parse_size_refuses_what_qemu_img_refuses(text):
    with pytest.raises(InvalidOption) as info:
        parse_size(text)
    assert "\n" not in str(info.value)


def test_parse_size_agrees_with_qemu_img(tmp_path):
    for text in ("1.5G", "1.1k", "0x100", "10K", "3M"):
        out = subprocess.run(["qemu-img", "create", "-f", "raw", str(tmp_path / "x.raw"), text],
                             capture_output=True, text=True, check=True).stdout
        assert "size=%d" % parse_size(text) in out


@pytest.mark.parametrize("value,text", [(0, "0 B"), (512, "512 B"), (200704, "196 KiB"), (67108864, "64 MiB"),
                                        (21474836480, "20 GiB"), (1024000, "0.977 MiB"), (1047552, "0.999 MiB"),
                                        (1 << 40, "1 TiB")])
def test_format_size_is_qemus(value, text):
    assert format_size(value) == text


def test_relative_sizes_and_rounding():
    assert parse_relative_size("+5G") == ("+", 5 << 30)
    assert parse_relative_size("-1M") == ("-", 1 << 20)
    assert parse_relative_size("10G") == ("", 10 << 30)
    assert round_up(1000, 512) == 1024 and round_up(1024, 512) == 1024


def test_option_strings_like_qemu():
    assert split_option_string("a=1,b=off") == {"a": "1", "b": "off"}
    assert split_option_string("backing_file=a,,b.img,compat=v3") == {"backing_file": "a,b.img", "compat": "v3"}
    assert split_option_string("help") == {"help": "on"}
    with pytest.raises(InvalidOption):
        split_option_string("novalue")


def test_pread_past_end_reads_zeros_and_extents_follow_holes(tmp_path):
    path = tmp_path / "f"
    with open(path, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"x" * 65536)
    with vio.HostFile(str(path)) as host:
        assert host.pread(10, (4 << 20) - 5) == bytes(10)
        runs = list(host.data_extents(0, 4 << 20))
        assert sum(n for _, n, _ in runs) == 4 << 20
        data = [(o, n) for o, n, is_data in runs if is_data]
        assert any(o <= (1 << 20) < o + n for o, n in data)
        assert not any(o >= (2 << 20) for o, n in data)


def test_punch_hole_and_writes(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"y" * (1 << 20))
    with vio.HostFile(str(path), writable=True) as host:
        host.pwrite(b"abc", 10)
        assert host.pread(3, 10) == b"abc"
        assert host.punch_hole(0, 1 << 20)
        assert host.pread(16, 0) == bytes(16)
        assert host.size() == 1 << 20


def test_atomic_output_commit_abort_and_refusals(tmp_path):
    dest = tmp_path / "out.img"
    out = vio.AtomicOutput(str(dest))
    with open(out.tmp_path, "wb") as f:
        f.write(b"new")
    assert not dest.exists()
    out.commit()
    assert dest.read_bytes() == b"new"
    out = vio.AtomicOutput(str(dest))
    out.abort()
    assert dest.read_bytes() == b"new" and not os.path.exists(out.tmp_path)
    (tmp_path / "dir").mkdir()
    with pytest.raises(ImageError, match="not a regular file"):
        vio.AtomicOutput(str(tmp_path / "dir"))
    os.symlink(str(dest), str(tmp_path / "link"))
    with pytest.raises(ImageError, match="not a regular file"):
        vio.AtomicOutput(str(tmp_path / "link"))


def test_zero_detection():
    assert vio.is_zero(bytes(1 << 20)) and not vio.is_zero(bytes(1000) + b"\x01")
    runs = list(vio.find_nonzero_runs(bytes(4096) + b"\x01" * 4096 + bytes(8192), 4096))
    assert runs == [(0, 4096, True), (4096, 4096, False), (8192, 8192, True)]


def _runs_block_by_block(data, gran):
    out = []
    for p in range(0, len(data), gran):
        piece = data[p:p + gran]
        zero = piece == bytes(len(piece))
        if out and out[-1][2] == zero:
            out[-1] = (out[-1][0], out[-1][1] + len(piece), zero)
        else:
            out.append((p, len(piece), zero))
    return out


def test_zero_detection_agrees_with_a_block_by_block_scan():
    """find_nonzero_runs skips through data with bytes.find: unaligned zero runs, short last blocks,
    runs of zeros shorter or longer than a block must give exactly the block-by-block answer."""
    rnd = random.Random(20261125)
    for case in range(800):
        gran = rnd.choice([512, 1024, 4096])
        n = rnd.randrange(0, 12 * gran)
        data = bytearray(rnd.randrange(1, 256) for _ in range(n)) if rnd.random() < 0.3 else bytearray(n)
        for _ in range(rnd.randrange(0, 6)):
            a = rnd.randrange(0, n + 1)
            b = min(n, a + rnd.randrange(0, 3 * gran))
            zeros = rnd.random() < 0.4
            for i in range(a, b):
                data[i] = 0 if zeros or rnd.random() < 0.3 else rnd.randrange(1, 256)
        got = list(vio.find_nonzero_runs(bytes(data) if case % 2 else data, gran))
        assert got == _runs_block_by_block(bytes(data), gran), (case, gran, n)
        assert list(vio.find_nonzero_runs(data + b"\x01" * 7, gran, n)) == got    # only the first n bytes


def test_non_regular_input_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        vio.HostFile(str(fifo))      # must not block waiting for a writer
    with pytest.raises(ImageError, match="not a regular file"):
        vio.HostFile("/dev/null")


def test_two_readers_coexist_and_a_writer_is_refused(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(bytes(4096))
    a = vio.HostFile(str(path))
    b = vio.HostFile(str(path))
    try:
        with pytest.raises(ImageError, match="in use"):
            vio.HostFile(str(path), writable=True)
    finally:
        a.close()
        b.close()
    w = vio.HostFile(str(path), writable=True)
    try:
        with pytest.raises(ImageError, match="in use"):
            vio.HostFile(str(path))
        vio.HostFile(str(path), lock=False).close()   # -U: no locks
    finally:
        w.close()


@pytest.mark.parametrize("name", ["json:{\"file.filename\":\"/etc/passwd\"}", "nbd:localhost:10809",
                                  "/etc/passwd", "../../outside.img", "with\0nul"])
def test_policy_refuses_names_outside_or_with_protocols(tmp_path, name):
    image = tmp_path / "sub" / "img.qcow2"
    image.parent.mkdir()
    policy = Policy().with_root(str(image))
    with pytest.raises(PolicyError) as info:
        policy.resolve_reference(name, str(image))
    assert "\n" not in str(info.value)


def test_policy_allows_inside_and_widened(tmp_path):
    image = tmp_path / "sub" / "img.qcow2"
    image.parent.mkdir()
    (tmp_path / "sub" / "deeper").mkdir()
    policy = Policy().with_root(str(image))
    assert policy.resolve_reference("deeper/base.qcow2", str(image)).endswith("deeper/base.qcow2")
    other = tmp_path / "other"
    other.mkdir()
    wide = Policy(allowed_dirs=(str(other),)).with_root(str(image))
    assert wide.resolve_reference("../other/base.qcow2", str(image))
    os.symlink(str(other), str(tmp_path / "sub" / "escape"))
    with pytest.raises(PolicyError):
        policy.resolve_reference("escape/base.qcow2", str(image))


def test_pwrite_in_pieces(tmp_path, monkeypatch):
    """HostFile.pwrite hands the kernel at most WRITE_PIECE bytes per call (large aligned writes make the
    page cache take 2 MiB folios: docs/decisions.md) and writes every byte, whatever the buffer's format."""
    import array
    calls = []
    real = os.pwrite

    def recording(fd, data, offset):
        calls.append((len(memoryview(data).cast("B")), offset))
        return real(fd, data, offset)

    monkeypatch.setattr(vio.os, "pwrite", recording)
    path = str(tmp_path / "f")
    data = os.urandom(2 * vio.WRITE_PIECE + 3)
    words = array.array("Q", range(1000))          # 8-byte items: pieces are counted in bytes
    with vio.HostFile(path, writable=True, create=True) as host:
        host.pwrite(data, 4096)
        host.pwrite(words, 4096 + len(data))
    assert max(n for n, dummy in calls) == vio.WRITE_PIECE
    assert [off for dummy, off in calls[:3]] == [4096, 4096 + vio.WRITE_PIECE, 4096 + 2 * vio.WRITE_PIECE]
    with open(path, "rb") as f:
        assert f.read() == bytes(4096) + data + words.tobytes()
